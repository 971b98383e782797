// The package as users get it: `npm pack` of a clean copy of this checkout, installed into a fresh
// project (the install builds the addon), globally, and through `npm link`; the command then runs
// through npm's bin links, npx and a plain symlink, and its `serve` answers a vfio-user handshake.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { cpSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { VfioUserClient } from '../../src/vfio-user/client.js';
import { repoRoot, startServerProcess } from '../support/server-process.js';

const version = (JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as { version: string }).version;
const NPM_FLAGS = ['--prefer-offline', '--no-audit', '--no-fund', '--loglevel=error'];

/** The environment of a user's shell: none of the npm_* variables of the `npm test` running us. */
const userEnv = (extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv => ({
  ...Object.fromEntries(Object.entries(process.env).filter(([key]) => !/^npm_/i.test(key))),
  ...extra,
});

function npm(args: string[], cwd: string, env: NodeJS.ProcessEnv = userEnv()): string {
  return execFileSync('npm', [...args, ...NPM_FLAGS], { cwd, env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 120_000 });
}

const run = (command: string, args: string[], cwd: string): SpawnSyncReturns<string> =>
  spawnSync(command, args, { cwd, env: userEnv(), encoding: 'utf8', timeout: 30_000 });

let dir: string;
let tarball: string;
/** A fresh project that depends on the tarball. */
let project: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'nvu-package-'));
  // Pack a copy with only what git would check out (no dist/, build/ or stray files), so the test
  // sees what a pack of a clean checkout ships; node_modules is shared, read-only in effect.
  const checkout = join(dir, 'checkout');
  const files = execFileSync('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], { cwd: repoRoot, encoding: 'utf8' })
    .split('\0')
    .filter((file) => file !== '' && existsSync(join(repoRoot, file)));
  for (const file of files) {
    mkdirSync(dirname(join(checkout, file)), { recursive: true });
    cpSync(join(repoRoot, file), join(checkout, file));
  }
  symlinkSync(join(repoRoot, 'node_modules'), join(checkout, 'node_modules'));
  const packed = JSON.parse(npm(['pack', '--json', '--pack-destination', dir], checkout)) as Array<{ filename: string }>;
  tarball = join(dir, packed[0]!.filename);

  project = join(dir, 'project');
  mkdirSync(project);
  // allowScripts: npm versions that block dependency install scripts by default still build the addon.
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'uses-nvme-vfio-user', version: '1.0.0', private: true, allowScripts: { 'nvme-vfio-user': true } }));
  npm(['install', tarball], project);
}, 240_000);

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('npm pack', () => {
  it('ships the built JavaScript and the addon sources, and no tests, bench, TypeScript or build output', () => {
    const files = execFileSync('tar', ['tzf', tarball], { encoding: 'utf8' }).trim().split('\n').map((f) => f.replace(/^package\//, ''));
    for (const needed of [
      'package.json',
      'README.md',
      'dist/src/bin/nvme-vfio-user.js',
      'dist/src/cli.js',
      'dist/src/native.js',
      'dist/src/mgmt/control/control.proto',
      'native/CMakeLists.txt',
      'native/src/addon.cc',
      'native/src/common.h',
    ]) {
      expect(files).toContain(needed);
    }
    const unwanted = files.filter((f) => /^(test|bench|scripts|src|build|node_modules|qemu-configs|docs)\//.test(f) || /\.(ts|map|node)$/.test(f));
    expect(unwanted).toEqual([]);
  });

  it('installs into an empty project, building the addon', () => {
    const installed = join(project, 'node_modules', 'nvme-vfio-user');
    expect(existsSync(join(installed, 'build', 'native', 'Release', 'vfio_native.node'))).toBe(true);
    expect(lstatSync(join(project, 'node_modules', '.bin', 'nvme-vfio-user')).isSymbolicLink()).toBe(true);
  });
});

describe('the installed command', () => {
  it('npx nvme-vfio-user --version and --help run through the bin link', () => {
    const versionRun = run('npx', ['--no-install', 'nvme-vfio-user', '--version'], project);
    expect({ status: versionRun.status, stdout: versionRun.stdout, stderr: versionRun.stderr }).toEqual({ status: 0, stdout: `${version}\n`, stderr: '' });
    const help = run('npx', ['--no-install', 'nvme-vfio-user', '--help'], project);
    expect(help.status).toBe(0);
    expect(help.stdout).toMatch(/^Usage: nvme-vfio-user <command>/);
    expect(help.stdout).toContain('--socket-mode');
  });

  it('serve through the node_modules/.bin link answers a vfio-user handshake on a 0600 socket; SIGTERM removes it', async () => {
    // Not through npx: it does not hand SIGTERM on to the command and wait for its exit status.
    await expectServesHandshake([join(project, 'node_modules', '.bin', 'nvme-vfio-user')], join(dir, 'bin-link-sockets'));
  });

  it('runs through a symlink to its bin file, as `serve` too', async () => {
    const link = join(dir, 'nvu-symlink');
    symlinkSync(join(project, 'node_modules', 'nvme-vfio-user', 'dist', 'src', 'bin', 'nvme-vfio-user.js'), link);
    const versionRun = run(link, ['--version'], dir);
    expect({ status: versionRun.status, stdout: versionRun.stdout }).toEqual({ status: 0, stdout: `${version}\n` });
    await expectServesHandshake([link], join(dir, 'symlink-sockets'));
  });

  it('npm install -g of the tarball and npm link of the unpacked package give a working command', () => {
    const globalPrefix = join(dir, 'global');
    npm(['install', '-g', '--prefix', globalPrefix, '--allow-scripts=nvme-vfio-user', tarball], dir);
    const globalRun = run(join(globalPrefix, 'bin', 'nvme-vfio-user'), ['--version'], dir);
    expect({ status: globalRun.status, stdout: globalRun.stdout }).toEqual({ status: 0, stdout: `${version}\n` });

    // npm link is a developer's move: in a copy with its dependencies installed.
    const unpacked = join(dir, 'unpacked');
    mkdirSync(unpacked);
    execFileSync('tar', ['xzf', tarball, '-C', unpacked]);
    const linkPrefix = join(dir, 'link-prefix');
    mkdirSync(linkPrefix);
    npm(['install'], join(unpacked, 'package'));
    npm(['link', '--allow-scripts=nvme-vfio-user'], join(unpacked, 'package'), userEnv({ NPM_CONFIG_PREFIX: linkPrefix }));
    const linkRun = run(join(linkPrefix, 'bin', 'nvme-vfio-user'), ['--version'], dir);
    expect({ status: linkRun.status, stdout: linkRun.stdout }).toEqual({ status: 0, stdout: `${version}\n` });
  }, 120_000);
});

async function expectServesHandshake(command: string[], socketDir: string): Promise<void> {
  const socket = join(socketDir, 'ctrl0.sock');
  const server = await startServerProcess(socket, ['--namespace', 'ram,size=16M', '--log-level', 'warn'], { command, cwd: project, env: userEnv(), timeoutMs: 30_000 });
  try {
    expect(statSync(socket).mode & 0o777).toBe(0o600);
    const client = VfioUserClient.connect(socket);
    try {
      const capabilities = await client.negotiate();
      expect(capabilities).toMatchObject({ max_data_xfer_size: 1 << 20, max_msg_fds: expect.any(Number) });
      expect((await client.deviceInfo()).numRegions).toBeGreaterThan(0);
    } finally {
      client.close();
    }
    expect(await server.stop('SIGTERM')).toBe(0);
    expect(existsSync(socket)).toBe(false);
    expect(server.log()).toBe('');
  } finally {
    await server.stop('SIGKILL');
  }
}
