// The QMP client against real QEMU 11 processes (TCG, q35, no guest kernel).

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { qemuBinary } from '../e2e/guest.js';
import { parseQmpAddress, QmpClient, QmpConnectionError, QmpError, QmpEventTimeoutError, type QmpEvent } from '../../src/mgmt/qemu/qmp.js';

const GUEST_RAM = '64M';
let workDir: string;

// ---------------------------------------------------------------------------------------------
// QEMU processes: every one is SIGKILLed by afterAll, and by process exit if the worker dies first.

interface Vm {
  qmp: QmpClient;
  kill(): Promise<void>;
}

const liveQemus = new Set<ChildProcess>();
const vms: Vm[] = [];
process.on('exit', () => {
  for (const child of liveQemus) child.kill('SIGKILL');
});

/** A paused (-S) q35 VM with memfd-backed shared RAM and a QMP socket; killed by afterAll at the latest. */
async function vm(name: string, extraArgs: string[] = []): Promise<Vm> {
  const qmpPath = join(workDir, `${name}.qmp`);
  const child = spawn(
    qemuBinary(),
    [
      '-machine', 'q35,memory-backend=mem', '-m', GUEST_RAM,
      '-object', `memory-backend-memfd,id=mem,size=${GUEST_RAM},share=on`,
      '-accel', 'tcg', '-nodefaults', '-display', 'none', '-S',
      '-qmp', `unix:${qmpPath},server=on,wait=off`,
      ...extraArgs,
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  liveQemus.add(child);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) =>
    child.on('exit', () => {
      liveQemus.delete(child);
      resolve();
    }),
  );
  const killProcess = async (): Promise<void> => {
    if (liveQemus.has(child)) child.kill('SIGKILL');
    await exited;
  };
  const diedEarly = exited.then(() => {
    throw new Error(`QEMU ${name} exited before its QMP socket answered: ${stderr}`);
  });
  diedEarly.catch(() => undefined); // only interesting while connecting
  try {
    const qmp = await Promise.race([QmpClient.connect(`unix:${qmpPath}`, { timeoutMs: 20_000 }), diedEarly]);
    const started: Vm = {
      qmp,
      kill: async () => {
        await qmp.close();
        await killProcess();
      },
    };
    vms.push(started);
    return started;
  } catch (error) {
    await killProcess();
    throw error;
  }
}

async function killVms(...which: Vm[]): Promise<void> {
  await Promise.all(which.map((v) => v.kill()));
}

beforeAll(() => {
  if (!existsSync(qemuBinary())) {
    throw new Error(`QEMU is missing at ${qemuBinary()}: run \`bash scripts/setup-qemu.sh\` (npm test does it for you)`);
  }
  workDir = mkdtempSync(join(tmpdir(), 'nvu-qmp-'));
});

afterAll(async () => {
  await killVms(...vms);
  if (workDir) rmSync(workDir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------

describe('QmpClient against QEMU', () => {
  let plain: Vm;
  beforeAll(async () => {
    plain = await vm('plain');
  });

  it('reads the greeting and leaves negotiation mode', async () => {
    expect(plain.qmp.greeting.version.qemu.major).toBeGreaterThanOrEqual(11);
    // Only possible after qmp_capabilities: before it, QEMU answers CommandNotFound.
    expect(await plain.qmp.execute('query-status')).toEqual({ status: 'prelaunch', running: false });
  });

  it("throws QmpError with QMP's class, desc and the command name, and stays usable", async () => {
    const unknown = await plain.qmp.execute('no-such-command').catch((e: unknown) => e);
    expect(unknown).toBeInstanceOf(QmpError);
    expect(unknown).toMatchObject({ command: 'no-such-command', errorClass: 'CommandNotFound' });
    expect((unknown as QmpError).desc).toContain('no-such-command');

    const missing = await plain.qmp.execute('qom-get', { path: '/machine/nowhere', property: 'type' }).catch((e: unknown) => e);
    expect(missing).toMatchObject({ command: 'qom-get', errorClass: 'DeviceNotFound' });
    expect(String(missing)).toContain('/machine/nowhere');

    expect(await plain.qmp.execute('qom-get', { path: '/machine/q35', property: 'type' })).toBe('q35-pcihost');
  });

  it('answers many outstanding requests each with its own reply', async () => {
    const typeOf: Record<string, string> = {
      '/machine/q35': 'q35-pcihost',
      '/machine/q35/pcie.0': 'PCIE',
      '/machine/q35/mch': 'mch',
    };
    const paths = Object.keys(typeOf);
    const requests = Array.from({ length: 90 }, (_, i) =>
      i % 4 === 3
        ? plain.qmp.execute('qom-get', { path: `/machine/missing-${i}`, property: 'type' }).then(
            () => `unexpected success ${i}`,
            (e: QmpError) => e.desc,
          )
        : plain.qmp.execute<string>('qom-get', { path: paths[i % 3]!, property: 'type' }),
    );
    const answers = await Promise.all(requests);
    answers.forEach((answer, i) => {
      if (i % 4 === 3) expect(answer).toContain(`/machine/missing-${i}`);
      else expect(answer).toBe(typeOf[paths[i % 3]!]);
    });
  });

  it('returns HMP text', async () => {
    expect(await plain.qmp.hmp('info status')).toMatch(/VM status: paused \(prelaunch\)/);
  });

  it('waits for events with a cursor, including ones QEMU sent before the reply', async () => {
    const seen: string[] = [];
    const unsubscribe = plain.qmp.onEvent((e) => seen.push(e.event));

    const beforeCont = plain.qmp.eventCursor();
    await plain.qmp.execute('cont');
    // QEMU sent RESUME before cont's reply: a wait started only now, without the cursor, would miss it.
    expect(plain.qmp.eventCursor()).toBeGreaterThan(beforeCont);
    const resume = await plain.qmp.waitForEvent('RESUME', undefined, 5000, { since: beforeCont });
    expect(resume.seq).toBeGreaterThanOrEqual(beforeCont);
    expect(resume.timestamp.seconds).toBeGreaterThan(0);
    // Without a cursor only new events count, so an old RESUME does not satisfy a new wait.
    await expect(plain.qmp.waitForEvent('RESUME', undefined, 200)).rejects.toThrow(QmpEventTimeoutError);

    // A wait set up first sees the event of the command issued after it; predicates filter.
    const stopped = plain.qmp.waitForEvent('STOP', (e: QmpEvent) => e.seq > resume.seq, 5000);
    await plain.qmp.execute('stop');
    await stopped;
    unsubscribe();
    await plain.qmp.execute('cont');
    await plain.qmp.execute('stop');
    expect(seen).toEqual(['RESUME', 'STOP']);
  });

  it('rejects everything once QEMU quits', async () => {
    const sawShutdown = plain.qmp.waitForEvent('SHUTDOWN', undefined, 5000);
    const neverComing = plain.qmp.waitForEvent('RESET', undefined, 5000);
    await plain.qmp.execute('quit');
    await sawShutdown;
    await expect(neverComing).rejects.toThrow(/closed by QEMU/);
    const late = await plain.qmp.execute('query-status').catch((e: unknown) => e);
    expect(late).toBeInstanceOf(QmpConnectionError);
    expect(String(late)).toMatch(/closed by QEMU.*; cannot run query-status/);
    expect(plain.qmp.closed).toBe(true);
  });
});

describe('QmpClient against a scripted peer', () => {
  /** A minimal QMP server on TCP that greets, accepts qmp_capabilities and then does what `onCommand` says. */
  async function scriptedPeer(onCommand: (command: string, socket: net.Socket, id: number) => void): Promise<{ address: string; close(): void }> {
    const server = net.createServer((socket) => {
      socket.write('{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 99}, "package": ""}, "capabilities": []}}\r\n');
      let buffered = '';
      socket.on('data', (chunk) => {
        buffered += chunk.toString();
        for (let nl; (nl = buffered.indexOf('\n')) >= 0; buffered = buffered.slice(nl + 1)) {
          const request = JSON.parse(buffered.slice(0, nl)) as { execute: string; id: number };
          if (request.execute === 'qmp_capabilities') socket.write(`{"return": {}, "id": ${request.id}}\r\n`);
          else onCommand(request.execute, socket, request.id);
        }
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return { address: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`, close: () => server.close() };
  }

  it('rejects every pending request, naming it, when the connection breaks', async () => {
    let received = 0;
    const peer = await scriptedPeer((_, socket) => {
      if (++received === 3) socket.destroy(); // QEMU "crashes" with three requests in flight
    });
    try {
      const client = await QmpClient.connect(peer.address);
      expect(client.greeting.version.qemu.major).toBe(99);
      const waiting = client.waitForEvent('MIGRATION', undefined, 10_000);
      const results = await Promise.allSettled(['query-status', 'query-migrate', 'query-pci'].map((c) => client.execute(c)));
      for (const [i, command] of ['query-status', 'query-migrate', 'query-pci'].entries()) {
        const result = results[i]!;
        expect(result.status).toBe('rejected');
        const reason = (result as PromiseRejectedResult).reason as QmpConnectionError;
        expect(reason).toBeInstanceOf(QmpConnectionError);
        expect(reason.command).toBe(command);
        expect(reason.message).toBe(`QMP connection to ${peer.address} closed by QEMU while ${command} was pending`);
      }
      await expect(waiting).rejects.toThrow(QmpConnectionError);
    } finally {
      peer.close();
    }
  });

  it('rejects a cursor the event buffer no longer reaches', async () => {
    const peer = await scriptedPeer((_, socket, id) => {
      const event = (name: string): string => `{"event": "${name}", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n`;
      socket.write(`${event('STOP')}${event('RESUME')}{"return": {}, "id": ${id}}\r\n`);
    });
    try {
      const client = await QmpClient.connect(peer.address, { eventBufferSize: 1 });
      const before = client.eventCursor();
      await client.execute('emit-two');
      expect((await client.waitForEvent('RESUME', undefined, 1000, { since: before + 1 })).seq).toBe(before + 1);
      // STOP has been pushed out: the first match since `before` is unknowable, so no answer is given.
      await expect(client.waitForEvent('STOP', undefined, 1000, { since: before })).rejects.toThrow(/only events from 1 on/);
      await expect(client.waitForEvent('RESUME', undefined, 1000, { since: before })).rejects.toThrow(/only events from 1 on/);
      await client.close();
    } finally {
      peer.close();
    }
  });

  it('rejects pending requests when the client closes', async () => {
    const peer = await scriptedPeer(() => undefined); // never answers
    try {
      const client = await QmpClient.connect(peer.address);
      const outcome = expect(client.execute('query-status')).rejects.toThrow(/closed by the client while query-status was pending/);
      await client.close();
      await outcome;
    } finally {
      peer.close();
    }
  });

  it('fails a connect that never gets a greeting within its bound', async () => {
    const silent = net.createServer(() => undefined);
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    try {
      const address = `tcp:127.0.0.1:${(silent.address() as net.AddressInfo).port}`;
      await expect(QmpClient.connect(address, { timeoutMs: 300 })).rejects.toThrow(/did not finish within 300 ms/);
    } finally {
      silent.close();
    }
  });

  it('parses unix and tcp addresses', () => {
    expect(parseQmpAddress('unix:/run/q.sock')).toEqual({ kind: 'unix', path: '/run/q.sock' });
    expect(parseQmpAddress('tcp:[::1]:4444')).toEqual({ kind: 'tcp', host: '::1', port: 4444 });
    expect(() => parseQmpAddress('tcp:host')).toThrow(/tcp:HOST:PORT/);
    expect(() => parseQmpAddress('/run/q.sock')).toThrow(/unix: or tcp:/);
  });
});
