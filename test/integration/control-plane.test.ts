// The control plane of a real `serve --secondaries` process: the CLI verbs provision a secondary
// and export it; refused requests name their NVMe status and change nothing; the control socket
// answers malformed, unknown-version and token-less messages with an error and keeps serving; a
// server restarted with --state-dir, or started from a --config file, comes back provisioned.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, spawnServe, type Served } from '../support/server-process.js';
import { cli, runCli } from '../support/cli.js';
import { ioUringAvailable } from '../support/files.js';
import { VfioUserClient } from '../../src/vfio-user/client.js';
import { CONTROL_PROTOCOL_VERSION, decodeResponse, encodeRequest, FrameReader, type ControlResponse, type ServerStatus } from '../../src/mgmt/control/messages.js';

const VNQN = 'nqn.2026-11.io.example:control-plane';
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'nvu-control-'));
});
afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const statusOf = async (control: string[]): Promise<ServerStatus> => JSON.parse(await cli(['list', ...control, '--json'])) as ServerStatus;

/** Answers the vfio-user handshake on `socket`: the export is real, not only a file. */
async function expectHandshake(socket: string): Promise<void> {
  const client = VfioUserClient.connect(socket);
  try {
    expect(await client.negotiate()).toMatchObject({ max_data_xfer_size: expect.any(Number) });
  } finally {
    client.close();
  }
}

/** Sends raw bytes to a control socket and collects whole response frames until `count` arrive. */
async function raw(path: string, frames: Uint8Array[], count: number): Promise<ControlResponse[]> {
  const socket: Socket = connect(path);
  const reader = new FrameReader();
  const responses: ControlResponse[] = [];
  try {
    return await new Promise<ControlResponse[]>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`only ${responses.length} of ${count} responses`)), 10_000);
      socket.on('data', (chunk: Buffer) => {
        for (const body of reader.push(chunk)) responses.push(decodeResponse(body));
        if (responses.length >= count) {
          clearTimeout(timer);
          resolve(responses);
        }
      });
      socket.on('error', reject);
      socket.on('connect', () => {
        for (const f of frames) socket.write(f);
      });
    });
  } finally {
    socket.destroy();
  }
}

describe('a controlling function provisioned through the CLI, kept across a restart', () => {
  let server: Served;
  let control: string[];
  let stateDir: string;
  let exported: string;

  beforeAll(async () => {
    stateDir = join(dir, 'state');
    exported = join(dir, 'vm1.sock');
    const controlPath = join(dir, 'control.sock');
    control = ['--control', controlPath];
    server = await spawnServe(['--secondaries', '2', '--namespace', `file=${join(dir, 'disk.img')},size=64M`, '--control', controlPath, '--state-dir', stateDir, '--log-level', 'warn'], 'control on ');
  });
  afterAll(async () => {
    await server?.stop('SIGKILL');
  });

  it('nothing is exported before provisioning; the verbs provision, export and list a secondary', async () => {
    const before = await statusOf(control);
    expect(before.controllers.map((c) => [c.cntlid, c.role, c.online, c.socket])).toEqual([
      [0, 'primary', true, ''],
      [1, 'secondary', false, ''],
      [2, 'secondary', false, ''],
    ]);
    await cli(['vsubsys', 'create', ...control, '--virtual-nqn', VNQN]);
    await cli(['vsubsys', 'add', ...control, '--virtual-nqn', VNQN, '--ctrl', '1', '--vcid', '7']);
    await cli(['ctrl', 'assign', ...control, '--ctrl', '1', '--vq', '3', '--vi', '2']);
    await cli(['ctrl', 'online', ...control, '--ctrl', '1']);
    const exportOutput = await cli(['ctrl', 'export', ...control, '--ctrl', '1', '--socket', exported]);
    expect(exportOutput).toContain(`-device '{"driver":"vfio-user-pci","socket":{"path":"${exported}","type":"unix"}}'`);
    expect(statSync(exported).mode & 0o777).toBe(0o600);
    await expectHandshake(exported);
    const after = await statusOf(control);
    expect(after.controllers[1]).toMatchObject({ cntlid: 1, online: true, vq: 3, vi: 2, socket: exported, virtualNqn: VNQN, virtualCntlid: 7 });
    expect(after.virtualSubsystems.map((v) => [v.nqn, v.controllers])).toEqual([[VNQN, [{ cntlid: 1, virtualCntlid: 7 }]]]);
  });

  it('a refused request names its NVMe status, exits 1 and changes nothing; a bad argument exits 2', async () => {
    const before = await statusOf(control);
    // Changing an online controller's resources: Invalid Secondary Controller State.
    const refused = await runCli(['ctrl', 'assign', ...control, '--ctrl', '1', '--vq', '4', '--vi', '2']);
    expect(refused.code).toBe(1);
    expect(refused.stderr.trim().split('\n')).toHaveLength(1);
    expect(refused.stderr).toMatch(/NVMe status .*\(SCT 1h, SC 20h\)/);
    const taken = await runCli(['vsubsys', 'add', ...control, '--virtual-nqn', VNQN, '--ctrl', '2', '--vcid', '8']);
    expect(taken.code).toBe(1); // a second controller in a single-controller virtual subsystem
    expect(await statusOf(control)).toEqual(before);
    const bad = await runCli(['ctrl', 'online', ...control, '--ctrl', 'one']);
    expect({ code: bad.code, lines: bad.stderr.trim().split('\n').length }).toEqual({ code: 2, lines: 1 });
  });

  it('answers malformed, unknown-version and empty requests with errors, and keeps serving', async () => {
    const path = control[1]!;
    const garbage = new Uint8Array([5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff]);
    const responses = await raw(
      path,
      [garbage, encodeRequest({ version: 99, id: 2, status: {} }), encodeRequest({ version: CONTROL_PROTOCOL_VERSION, id: 3 }), encodeRequest({ version: CONTROL_PROTOCOL_VERSION, id: 4, status: {} })],
      4,
    );
    expect(responses[0]!.error).toMatch(/./);
    expect(responses[1]).toMatchObject({ id: 2, error: expect.stringMatching(/version 99/) });
    expect(responses[2]).toMatchObject({ id: 3, error: expect.stringMatching(/./) });
    expect(responses[3]!.error ?? '').toBe('');
    expect(responses[3]!.status!.controllers).toHaveLength(3);
    // A frame announcing more than the limit ends that connection only.
    const closed = await new Promise<boolean>((resolve) => {
      const socket = connect(path, () => socket.write(new Uint8Array([0xff, 0xff, 0xff, 0x7f])));
      const timer = setTimeout(() => resolve(false), 10_000);
      socket.on('error', () => undefined);
      socket.on('close', () => {
        clearTimeout(timer);
        resolve(true);
      });
    });
    expect(closed).toBe(true);
    expect(server.alive()).toBe(true);
    expect((await statusOf(control)).controllers).toHaveLength(3);
  });

  it('comes back after a restart with its virtual subsystem, resources, state and export', async () => {
    expect(await server.stop('SIGTERM')).toBe(0);
    expect(existsSync(exported)).toBe(false);
    // No provisioning flags: everything comes from the state directory.
    server = await spawnServe(['--secondaries', '2', '--namespace', `file=${join(dir, 'disk.img')},size=64M`, '--control', control[1]!, '--state-dir', stateDir, '--log-level', 'warn'], 'control on ');
    const after = await statusOf(control);
    expect(after.controllers[1]).toMatchObject({ cntlid: 1, online: true, vq: 3, vi: 2, socket: exported, virtualNqn: VNQN, virtualCntlid: 7 });
    expect(after.controllers[2]).toMatchObject({ online: false, socket: '' });
    await expectHandshake(exported);
    // Unexport and the removal from the virtual subsystem are recorded too.
    await cli(['ctrl', 'unexport', ...control, '--ctrl', '1']);
    await cli(['ctrl', 'offline', ...control, '--ctrl', '1']);
    await cli(['vsubsys', 'remove', ...control, '--virtual-nqn', VNQN, '--ctrl', '1']);
    expect(await server.stop('SIGTERM')).toBe(0);
    server = await spawnServe(['--secondaries', '2', '--namespace', `file=${join(dir, 'disk.img')},size=64M`, '--control', control[1]!, '--state-dir', stateDir, '--log-level', 'warn'], 'control on ');
    const last = await statusOf(control);
    expect(last.controllers[1]).toMatchObject({ online: false, socket: '', virtualNqn: '' });
    expect(last.virtualSubsystems.map((v) => [v.nqn, v.controllers])).toEqual([[VNQN, []]]);
  }, 60_000);
});

describe('a whole host from one --config file', () => {
  it('builds the namespaces, virtual subsystems, assignments and exports it declares', async () => {
    const configDir = join(dir, 'declared');
    const socket = join(configDir, 'vm2.sock');
    const controlPath = join(configDir, 'control.sock');
    mkdirSync(configDir, { mode: 0o700 });
    const config = join(configDir, 'host.json');
    writeFileSync(
      config,
      JSON.stringify({
        secondaries: 2,
        control: 'control.sock',
        namespaces: [{ file: 'disk.img', size: '32M' }, 'ram,size=16M'],
        virtualSubsystems: [{ nqn: VNQN, namespaces: [{ vnsid: 5, nsid: 2 }], controllers: [{ cntlid: 2, vcid: 1 }] }],
        controllers: [{ cntlid: 2, vq: 2, vi: 2, online: true, socket: 'vm2.sock' }],
      }),
    );
    const server = await spawnServe(['--config', config, '--log-level', 'warn'], 'control on ');
    try {
      const status = await statusOf(['--control', controlPath]);
      expect(status.namespaces.map((n) => n.nsid)).toEqual([1, 2]);
      expect(status.controllers[2]).toMatchObject({ cntlid: 2, online: true, vq: 2, vi: 2, socket, virtualNqn: VNQN, virtualCntlid: 1 });
      expect(status.controllers[1]).toMatchObject({ online: false, socket: '' });
      await expectHandshake(socket);
    } finally {
      expect(await server.stop('SIGTERM')).toBe(0);
    }
  }, 60_000);
});

describe('a control socket on TCP', () => {
  it('refuses every request without the token, and serves one that carries it', async () => {
    const token = join(dir, 'token');
    writeFileSync(token, 'a-long-enough-shared-secret\n', { mode: 0o600 });
    const port = await freePort();
    const address = `tcp:127.0.0.1:${port}`;
    const server = await spawnServe(['--secondaries', '1', '--namespace', 'ram,size=16M', '--control', address, '--control-token', token, '--log-level', 'warn'], 'control on ');
    try {
      const without = await runCli(['list', '--control', address]);
      expect(without.code).toBe(1);
      expect(without.stderr).toMatch(/token/);
      const wrong = join(dir, 'wrong-token');
      writeFileSync(wrong, 'not-the-shared-secret-at-all\n');
      expect((await runCli(['list', '--control', address, '--control-token', wrong])).code).toBe(1);
      const withToken = JSON.parse(await cli(['list', '--control', address, '--control-token', token, '--json'])) as ServerStatus;
      expect(withToken.controllers).toHaveLength(2);
      expect(server.alive()).toBe(true);
    } finally {
      await server.stop('SIGTERM');
    }
    // A short token is refused at start: one line, exit 2.
    const short = join(dir, 'short-token');
    writeFileSync(short, 'short\n');
    const refused = await runCli(['serve', '--secondaries', '1', '--namespace', 'ram,size=16M', '--control', `tcp:127.0.0.1:${port + 1}`, '--control-token', short]);
    expect(refused.code).toBe(2);
    expect(refused.stderr.trim().split('\n')).toHaveLength(1);
  }, 60_000);
});

describe('namespaces added through the control socket', () => {
  it('take --aio for files, report it in the status, and refuse it for RAM or a bad value', async () => {
    const control = ['--control', join(dir, 'ns-control.sock')];
    const server = await spawnServe(['--namespace', 'ram,size=16M', ...control, '--log-level', 'warn'], 'control on ');
    try {
      await cli(['ns', 'add', ...control, '--file', join(dir, 'threads.img'), '--size', '16M', '--aio', 'threads']);
      await cli(['ns', 'add', ...control, '--file', join(dir, 'default.img'), '--size', '16M']);
      const status = await statusOf(control);
      expect(status.namespaces.map((n) => [n.nsid, n.aio])).toEqual([[1, ''], [2, 'threads'], [3, ioUringAvailable() ? 'io_uring' : 'threads']]);
      expect(await cli(['list', ...control])).toMatch(/2: file:\S+threads\.img, aio=threads, cache=writeback, 512-byte blocks/);
      for (const bad of [['--ram', '--size', '16M', '--aio', 'threads'], ['--file', join(dir, 'x.img'), '--size', '16M', '--aio', 'native']]) {
        const refused = await runCli(['ns', 'add', ...control, ...bad]);
        expect({ code: refused.code, lines: refused.stderr.trim().split('\n').length }).toEqual({ code: 2, lines: 1 });
      }
      // The server checks too, for clients other than ours.
      const [answer] = await raw(control[1]!, [encodeRequest({ version: CONTROL_PROTOCOL_VERSION, id: 9, namespaceAdd: { file: join(dir, 'y.img'), size: 16 << 20, aio: 'native' } })], 1);
      expect(answer!.error).toMatch(/aio native \(threads or io_uring\)/);
      expect((await statusOf(control)).namespaces).toHaveLength(3);
    } finally {
      await server.stop('SIGTERM');
    }
  }, 60_000);

  it('take --cache as QEMU names it, report it, keep it in --state-dir, and refuse it for RAM or a bad value', async () => {
    const control = ['--control', join(dir, 'cache-control.sock')];
    const state = ['--state-dir', join(dir, 'cache-state')];
    const serve = (namespace = 'ram,size=16M'): Promise<Served> => spawnServe(['--secondaries', '1', '--namespace', namespace, ...control, ...state, '--log-level', 'warn'], 'control on ');
    let server = await serve();
    try {
      await cli(['ns', 'add', ...control, '--file', join(dir, 'direct.img'), '--size', '16M', '--cache', 'none']);
      await cli(['ns', 'add', ...control, '--file', join(dir, 'sync.img'), '--size', '16M', '--cache', 'directsync', '--block-size', '4096']);
      await cli(['ns', 'add', ...control, '--file', join(dir, 'cached.img'), '--size', '16M']);
      const modes = (status: ServerStatus): unknown => status.namespaces.map((n) => [n.nsid, n.cache]);
      const expected = [[1, ''], [2, 'none'], [3, 'directsync'], [4, 'writeback']];
      expect(modes(await statusOf(control))).toEqual(expected);
      expect(await cli(['list', ...control])).toMatch(/2: file:\S+direct\.img, aio=\w+, cache=none, 512-byte blocks/);
      for (const bad of [['--ram', '--size', '16M', '--cache', 'none'], ['--file', join(dir, 'x.img'), '--size', '16M', '--cache', 'unsafe']]) {
        const refused = await runCli(['ns', 'add', ...control, ...bad]);
        expect({ code: refused.code, lines: refused.stderr.trim().split('\n').length }).toEqual({ code: 2, lines: 1 });
      }
      const [answer] = await raw(control[1]!, [encodeRequest({ version: CONTROL_PROTOCOL_VERSION, id: 9, namespaceAdd: { file: join(dir, 'y.img'), size: 16 << 20, cache: 'unsafe' } })], 1);
      expect(answer!.error).toMatch(/cache unsafe \(writeback, none, writethrough, directsync\)/);
      expect(await server.stop('SIGTERM')).toBe(0);
      // The state wins over a flag that asks for another mode, and the server says so.
      server = await serve(`file=${join(dir, 'direct.img')},size=16M,cache=writeback`);
      expect(modes(await statusOf(control))).toEqual(expected);
      expect(server.log()).toMatch(/--namespace file=\S+direct\.img is not applied: .* it keeps lbads=512,aio=default,cache=none, not lbads=512,aio=default,cache=writeback/);
    } finally {
      await server.stop('SIGTERM');
    }
  }, 60_000);
});
