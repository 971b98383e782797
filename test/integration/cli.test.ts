import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot, SOURCE_COMMAND, startServerProcess } from '../support/server-process.js';

const cli = (...args: string[]) =>
  spawnSync(SOURCE_COMMAND[0]!, [...SOURCE_COMMAND.slice(1), ...args], { cwd: repoRoot, encoding: 'utf8', timeout: 20_000 });

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'nvu-cli-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Expects `args` to fail before serving, with one line on stderr matching `message`, and exit code `status`. */
function expectRefused(args: string[], message: RegExp, status = 2): void {
  const result = cli(...args);
  expect({ status: result.status, lines: result.stderr.trim().split('\n').length }).toEqual({ status, lines: 1 });
  expect(result.stderr).toMatch(message);
  expect(result.stdout).not.toMatch(/listening on/);
}

describe('nvme-vfio-user CLI', () => {
  it.each([
    [['serve', '--bogus'], /Unknown option '--bogus'/],
    [['serve', '--device', 'floppy'], /unknown device 'floppy'/],
    [['serve', '--log-level', 'loud'], /unknown --log-level 'loud'/],
    [['serve', '--socket', '/tmp/a', '--socket-path', '/tmp/a'], /same socket is given twice/],
    [['serve', '--io-queues', '0'], /--io-queues '0'/],
    [['serve', '--interrupts', 'nmi'], /unknown interrupt mode 'nmi'/],
    [['serve', '--poll-us', '2ms'], /--poll-us '2ms' must be a whole number of microseconds/],
    [['serve', '--poll-us', '1000001'], /--poll-us '1000001'/],
    [['serve', '--batch-ms', '0.02'], /--batch-ms '0.02' must be 0 \(off\) or from 0.05 to 100 milliseconds/],
    [['serve', '--batch-ms', '1e-1'], /--batch-ms '1e-1'/],
    [['serve', '--batch-ms', '101'], /--batch-ms '101'/],
    [['serve', '--namespace', 'ram'], /needs size=/],
    [['serve', '--config', '/nonexistent.json'], /ENOENT/],
    [['serve', '--socket'], /argument missing|--socket/],
    [['serve', '--socket-mode', '0200'], /--socket-mode '0200' must be octal permission bits with owner read\/write/],
    [['serve', '--socket-mode', '0400'], /--socket-mode '0400'/],
    [['serve', '--socket-mode', 'rw'], /--socket-mode 'rw'/],
    [['serve', '--socket-mode', '0770'], /no execute bits/],
    [['frobnicate'], /unknown command 'frobnicate'/],
  ])('%j fails with one clear line and exit code 2', (args, message) => {
    expectRefused(args as string[], message as RegExp);
  });

  it('a socket directory that cannot be created is one line and exit code 2, not a stack trace', () => {
    const file = join(dir, 'a-file');
    writeFileSync(file, '');
    expectRefused(['serve', '--socket', join(file, 'sub', 'ctrl.sock')], /^nvme-vfio-user: serve: cannot create socket directory .*a-file\/sub: ENOTDIR$/m);
  });

  it('refuses a world-writable socket directory (one line, exit code 2)', () => {
    const open = join(dir, 'world-writable');
    mkdirSync(open);
    chmodSync(open, 0o1777);
    expectRefused(['serve', '--socket', join(open, 'ctrl.sock')], /socket directory .*world-writable is world-writable/);
    expect(existsSync(join(open, 'ctrl.sock'))).toBe(false);
  });

  it('refuses to replace a path that is not a socket, and leaves it alone', () => {
    const path = join(dir, 'precious.img');
    writeFileSync(path, 'keep me');
    expectRefused(['serve', '--socket', path], /precious\.img exists and is not a socket; refusing to replace it/);
    expect(readFileSync(path, 'utf8')).toBe('keep me');
  });

  it('creates sockets 0600 whatever the umask, and --socket-mode widens the vfio-user ones', async () => {
    const privateSocket = join(dir, 'private.sock');
    const groupSocket = join(dir, 'group.sock');
    // A umask of 0 would leave a plain bind() at 0777: anyone could connect.
    const command = ['sh', '-c', 'umask 000 && exec "$0" "$@"', ...SOURCE_COMMAND];
    const server = await startServerProcess(privateSocket, ['--log-level', 'warn'], { command });
    try {
      expect(statSync(privateSocket).mode & 0o777).toBe(0o600);
    } finally {
      await server.stop();
    }
    const widened = await startServerProcess(groupSocket, ['--socket-mode', '0660', '--log-level', 'warn'], { command });
    try {
      expect(statSync(groupSocket).mode & 0o777).toBe(0o660);
      // The control socket manages the whole server: it stays private.
      expect(statSync(join(dir, 'control.sock')).mode & 0o777).toBe(0o600);
    } finally {
      await widened.stop();
    }
  });

  it('--help documents every serve option', () => {
    const result = cli('serve', '--help');
    expect(result.status).toBe(0);
    for (const option of ['--socket', '--socket-mode', '--namespace', '--config', '--device', '--io-queues', '--queue-entries', '--mdts', '--interrupts', '--poll-us', '--batch-ms', '--nqn', '--write-multiple', '--log-level']) expect(result.stdout).toContain(option);
  });

  it('keeps serving when whoever read its stdout and stderr goes away (EPIPE)', async () => {
    const control = join(dir, 'epipe-control.sock');
    const child = spawn(SOURCE_COMMAND[0]!, [...SOURCE_COMMAND.slice(1), 'serve', '--secondaries', '1', '--control', control], { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] });
    try {
      // As `serve | head -0` would: the reading ends are gone before the server prints anything.
      child.stdout!.destroy();
      child.stderr!.destroy();
      const deadline = Date.now() + 20_000;
      while (!existsSync(control) && child.exitCode === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      // Its "control on" line and its log lines have met EPIPE by now.
      await new Promise((r) => setTimeout(r, 500));
      expect(child.exitCode).toBe(null);
      const listed = cli('vsubsys', 'list', '--control', control);
      expect(listed.status).toBe(0);
    } finally {
      child.kill('SIGTERM');
      if (child.exitCode === null) await new Promise((r) => child.once('exit', r));
    }
  });

  it('refuses a socket path held by a live server, and SIGINT removes the socket', async () => {
    const socket = join(dir, 'a.sock');
    const first = await startServerProcess(socket);
    try {
      expectRefused(['serve', '--socket', socket], /in use by another server/, 1);
      expect(await first.stop('SIGINT')).toBe(0);
      expect(existsSync(socket)).toBe(false);
    } finally {
      await first.stop();
    }
  });

  it('an unhandled rejection in serve is logged once as a bug, repeats as a count, and the process lives on', () => {
    const script = [
      "import { installBugReporter } from './src/cli.ts';",
      "import { createLogger } from './src/log.ts';",
      "installBugReporter(createLogger('info'));",
      "for (let i = 0; i < 12; i++) Promise.reject(new Error('boom'));",
      // Rejections are reported when the microtask queue drains, before the next macrotask.
      "setImmediate(() => setImmediate(() => console.log('still serving')));",
    ].join('\n');
    const result = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: repoRoot, encoding: 'utf8', timeout: 20_000 });
    expect({ status: result.status, stdout: result.stdout }).toEqual({ status: 0, stdout: 'still serving\n' });
    const bugLines = result.stderr.split('\n').filter((line) => line.includes('BUG:'));
    expect(bugLines).toEqual([
      expect.stringMatching(/BUG: unhandled promise rejection \(please report it; still serving\): Error: boom$/),
      expect.stringMatching(/BUG: unhandled promise rejection "Error: boom" has now happened 10 times$/),
    ]);
    expect(result.stderr).toMatch(/Error: boom\n\s+at /); // the stack comes with the first report
  });
});
