// The QMP client and the QEMU-side migration primitives against real QEMU 11 processes (TCG, q35,
// no guest kernel: firmware at most), one of them with vfio-user-pci devices served by our server.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { qemuBinary } from '../e2e/guest.js';
import { startServerProcess, type ServerProcess } from '../support/server-process.js';
import { SCRATCH_DEVICE_ID, SCRATCH_MAGIC, SCRATCH_VENDOR_ID } from '../../src/pci/scratch-device.js';
import { parseQmpAddress, QmpClient, QmpConnectionError, QmpError, QmpEventTimeoutError, type QmpEvent } from '../../src/mgmt/qemu/qmp.js';
import { HmpError, readPhysical, readPort, writePort } from '../../src/mgmt/qemu/hmp.js';
import { findVfioUserDevices, socketPathFromRegionNames, type VfioUserDeviceInfo } from '../../src/mgmt/qemu/devices.js';
import {
  formatPciAddress,
  locateEcam,
  readConfig,
  readConfigSpace,
  writeConfig,
  writeConfigSequence,
  type EcamWindow,
  type PciAddress,
} from '../../src/mgmt/qemu/pci-config.js';
import {
  cont,
  migrate,
  migrateCancel,
  migrateContinue,
  migrateIncoming,
  MigrationFailedError,
  queryMigrate,
  queryStatus,
  setMigrationCapabilities,
  stop,
  waitForMigrationStatus,
} from '../../src/mgmt/qemu/migration.js';

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

// ---------------------------------------------------------------------------------------------

describe('vfio-user-pci devices, config space and memory through QMP/HMP', () => {
  let server: ServerProcess;
  let guest: Vm;
  const socket = (name: string): string => join(workDir, `${name}.sock`);
  const deviceJson = (name: string, extra: Record<string, string> = {}): string =>
    JSON.stringify({ driver: 'vfio-user-pci', ...extra, socket: { path: socket(name), type: 'unix' } });
  const HOST_BRIDGE: PciAddress = { bus: 0, slot: 0, function: 0 };
  const ROOT_PORT: PciAddress = { bus: 0, slot: 3, function: 0 };
  const GUEST_LATCH = 0x8000_f85c; // what a guest might have left in 0xcf8
  const BAR0 = 0xfebf_0000;

  const byQomPath = (devices: VfioUserDeviceInfo[], qomPath: string): VfioUserDeviceInfo => {
    const found = devices.find((d) => d.qomPath === qomPath);
    if (!found) throw new Error(`${qomPath} not among ${devices.map((d) => d.qomPath).join(', ')}`);
    return found;
  };

  beforeAll(async () => {
    server = await startServerProcess(socket('a'), ['--device', 'scratch', '--socket', socket('b'), '--socket', socket('c')]);
    guest = await vm('devices', [
      '-device', 'pcie-root-port,id=rp1,chassis=1,addr=0x3.0',
      '-device', deviceJson('a'),
      '-device', deviceJson('b', { id: 'nvu1', addr: '0x6.0' }),
      '-device', deviceJson('c', { bus: 'rp1' }),
    ]);
  });

  afterAll(async () => {
    if (guest) await killVms(guest);
    await server?.stop();
  });

  it('finds every vfio-user-pci device with its address, socket and BARs', async () => {
    const devices = await findVfioUserDevices(guest.qmp);
    expect(devices).toHaveLength(3);
    const anonymous = byQomPath(devices, '/machine/peripheral-anon/device[0]');
    expect(anonymous).toEqual({
      qomPath: '/machine/peripheral-anon/device[0]',
      id: null,
      socketPath: socket('a'),
      parentBus: '/machine/q35/pcie.0',
      devfn: 0x08,
      address: { bus: 0, slot: 1, function: 0 },
      vendorId: SCRATCH_VENDOR_ID,
      deviceId: SCRATCH_DEVICE_ID,
      classCode: 0xff00,
      bars: [{ index: 0, type: 'memory', address: null, size: 16384, is64Bit: true, prefetchable: false }],
    });
    const named = byQomPath(devices, '/machine/peripheral/nvu1');
    expect(named).toMatchObject({ id: 'nvu1', socketPath: socket('b'), devfn: 0x30, address: { bus: 0, slot: 6, function: 0 } });
    // Behind a root port whose secondary bus firmware has not numbered yet: no address.
    const bridged = byQomPath(devices, '/machine/peripheral-anon/device[1]');
    expect(bridged).toMatchObject({ socketPath: socket('c'), parentBus: '/machine/peripheral/rp1/rp1', devfn: 0, address: null, bars: [] });
  });

  it('recovers socket paths from escaped region names', () => {
    const path = '/tmp/a [weird]\\dir/x BAR 1.sock';
    const escaped = path.replace(/[/[\]\\]/g, (c) => `\\x${c.charCodeAt(0).toString(16)}`);
    expect(socketPathFromRegionNames([`vfio-user:${escaped} base BAR 0[0]`, 'msix-table[0]', `vfio-user:${escaped} BAR 0[0]`])).toBe(path);
    expect(socketPathFromRegionNames(['bus master[0]'])).toBeNull();
  });

  it('writes and reads config space through 0xcf8/0xcfc, keeping the guest latch', async () => {
    const dev: PciAddress = { bus: 0, slot: 1, function: 0 };
    await writePort(guest.qmp, 0xcf8, 4, GUEST_LATCH);

    expect(await readConfig(guest.qmp, dev, 0x00, 2)).toBe(SCRATCH_VENDOR_ID);
    expect(await readConfig(guest.qmp, dev, 0x02, 2)).toBe(SCRATCH_DEVICE_ID);
    expect(await readConfig(guest.qmp, dev, 0x00, 4)).toBe(((SCRATCH_DEVICE_ID << 16) | SCRATCH_VENDOR_ID) >>> 0);
    expect(await readConfig(guest.qmp, dev, 0x0b, 1)).toBe(0xff); // base class "other"

    await writeConfigSequence(guest.qmp, dev, [
      { offset: 0x10, size: 4, value: BAR0 },
      { offset: 0x14, size: 4, value: 0 },
      { offset: 0x04, size: 2, value: 0x0002 }, // memory space on, after the BAR as a replay does it
    ]);
    expect(await readConfig(guest.qmp, dev, 0x10, 4)).toBe(BAR0 + 0x4); // 64-bit memory BAR type bits
    expect((await readConfig(guest.qmp, dev, 0x04, 2)) & 0x7).toBe(0x2);
    expect(await readPort(guest.qmp, 0xcf8, 4)).toBe(GUEST_LATCH);

    const [device] = (await findVfioUserDevices(guest.qmp)).filter((d) => d.socketPath === socket('a'));
    expect(device!.bars[0]!.address).toBe(BAR0);

    // Numbering the root port's secondary bus (what firmware does) puts the device behind it on bus 1.
    await writeConfig(guest.qmp, ROOT_PORT, 0x18, 4, 0x00_01_01_00); // subordinate 1, secondary 1, primary 0
    const bridged = (await findVfioUserDevices(guest.qmp)).find((d) => d.socketPath === socket('c'));
    expect(bridged?.address).toEqual({ bus: 1, slot: 0, function: 0 });
    expect(await readConfig(guest.qmp, bridged!.address!, 0x00, 2)).toBe(SCRATCH_VENDOR_ID);
    expect(await readPort(guest.qmp, 0xcf8, 4)).toBe(GUEST_LATCH);
  });

  it('keeps concurrent config accesses on one client from interleaving', async () => {
    await writePort(guest.qmp, 0xcf8, 4, GUEST_LATCH);
    const hostBridgeId = await readConfig(guest.qmp, HOST_BRIDGE, 0x00, 4);
    const scratchId = ((SCRATCH_DEVICE_ID << 16) | SCRATCH_VENDOR_ID) >>> 0;
    const targets = Array.from({ length: 12 }, (_, i) => (i % 2 === 0 ? HOST_BRIDGE : { bus: 0, slot: 6, function: 0 }));
    const ids = await Promise.all(targets.map((address) => readConfig(guest.qmp, address, 0x00, 4)));
    expect(ids).toEqual(targets.map((_, i) => (i % 2 === 0 ? hostBridgeId : scratchId)));
    expect(await readPort(guest.qmp, 0xcf8, 4)).toBe(GUEST_LATCH);
  });

  it('refuses config accesses the ports cannot make', async () => {
    const dev: PciAddress = { bus: 0, slot: 1, function: 0 };
    await expect(readConfig(guest.qmp, dev, 0x100, 4)).rejects.toThrow(RangeError);
    await expect(readConfig(guest.qmp, dev, 0x02, 4)).rejects.toThrow(/not aligned/);
    await expect(writeConfig(guest.qmp, dev, 0x04, 2, 0x10000)).rejects.toThrow(/does not fit/);
    await expect(readConfig(guest.qmp, { bus: 0, slot: 32, function: 0 }, 0, 4)).rejects.toThrow(/out of range/);
  });

  it('reads config space through ECAM once PCIEXBAR is enabled, without touching the latch', async () => {
    await expect(locateEcam(guest.qmp)).rejects.toThrow(/not enabled/);
    // Firmware's job, done the same way: PCIEXBAR (MCH 0x60) = base | enable.
    await writeConfigSequence(guest.qmp, HOST_BRIDGE, [
      { offset: 0x64, size: 4, value: 0 },
      { offset: 0x60, size: 4, value: 0xb000_0001 },
    ]);
    const ecam = await locateEcam(guest.qmp);
    expect(ecam).toEqual({ base: 0xb000_0000, size: 256 << 20 });
    expect(await guest.qmp.hmp('info mtree')).toMatch(/00000000b0000000-00000000bfffffff \(prio 0, i\/o\): pcie-mmcfg-mmio/);

    const dev: PciAddress = { bus: 0, slot: 1, function: 0 };
    await writePort(guest.qmp, 0xcf8, 4, GUEST_LATCH);
    const header = await readConfigSpace(guest.qmp, dev, 64, { ecam });
    expect(await readPort(guest.qmp, 0xcf8, 4)).toBe(GUEST_LATCH);
    for (let offset = 0; offset < 64; offset += 4) {
      expect(header.readUInt32LE(offset), `dword ${offset} of ${formatPciAddress(dev)}`).toBe(await readConfig(guest.qmp, dev, offset, 4));
    }
    expect(header.readUInt32LE(0x10)).toBe(BAR0 + 0x4);

    const whole = await readConfigSpace(guest.qmp, dev, 4096);
    expect(whole.length).toBe(4096);
    expect(whole.subarray(0, 64)).toEqual(header);
    expect((await readConfigSpace(guest.qmp, dev, 2, { offset: 0x0a, ecam })).readUInt16LE(0)).toBe(0xff00);
    expect((await readConfigSpace(guest.qmp, { bus: 1, slot: 0, function: 0 }, 4, { ecam })).readUInt32LE(0)).toBe(
      ((SCRATCH_DEVICE_ID << 16) | SCRATCH_VENDOR_ID) >>> 0,
    );
  });

  it('reads guest-physical memory with xp: the BAR reaches our server, ROM parses alike in every unit', async () => {
    const magic = await readPhysical(guest.qmp, BAR0, 4, { unitSize: 4 });
    expect(magic.readUInt32LE(0)).toBe(SCRATCH_MAGIC);

    const resetVector = 0xffff0; // the BIOS's far jump, 16 bytes below 1 MiB
    const asBytes = await readPhysical(guest.qmp, resetVector, 24);
    expect(asBytes[0]).toBe(0xea);
    for (const unitSize of [2, 4, 8] as const) {
      expect(await readPhysical(guest.qmp, resetVector, 24, { unitSize }), `unit ${unitSize}`).toEqual(asBytes);
    }
    expect(await readPhysical(guest.qmp, resetVector, 13)).toEqual(asBytes.subarray(0, 13));
    // 128 KiB is more than one xp request: the pieces are stitched in order.
    const biosArea = await readPhysical(guest.qmp, 0xe0000, 0x20000, { unitSize: 8 });
    expect(biosArea.subarray(resetVector - 0xe0000, resetVector - 0xe0000 + 16)).toEqual(asBytes.subarray(0, 16));
    expect(await readPhysical(guest.qmp, 0xe0000, 0x20000)).toEqual(biosArea);
    await expect(readPhysical(guest.qmp, 0xffff_ffff_f000n, 16)).rejects.toThrow(HmpError);
    await expect(readPhysical(guest.qmp, resetVector + 2, 8, { unitSize: 4 })).rejects.toThrow(/aligned/);
  });
});

// ---------------------------------------------------------------------------------------------

describe('live migration between two QEMU processes', () => {
  const capabilities = { events: true, 'pause-before-switchover': true };

  /** A running source (firmware only) and a paused target listening on a unix socket. */
  async function migrationPair(name: string, exitOnError?: boolean) {
    const [source, target] = await Promise.all([vm(`${name}-src`), vm(`${name}-dst`, ['-incoming', 'defer'])]);
    const uri = `unix:${join(workDir, `${name}-migration.sock`)}`;
    await Promise.all([setMigrationCapabilities(source.qmp, capabilities), setMigrationCapabilities(target.qmp, capabilities)]);
    const incoming = await migrateIncoming(target.qmp, uri, exitOnError === undefined ? {} : { exitOnError });
    await cont(source.qmp);
    return { source, target, uri, incoming };
  }

  /** Polls until SeaBIOS has enabled ECAM, which it does after filling the interrupt vector table in low RAM. */
  async function waitForFirmwarePciSetup(source: Vm): Promise<EcamWindow> {
    const deadline = Date.now() + 15_000;
    for (;;) {
      const ecam = await locateEcam(source.qmp).catch(() => null);
      if (ecam) return ecam;
      if (Date.now() > deadline) throw new Error('firmware did not enable ECAM within 15 s');
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  it('steps through setup, pre-switchover and migrate-continue to completed', async () => {
    const { source, target, uri, incoming } = await migrationPair('complete');
    const sourceEvents: QmpEvent[] = [];
    source.qmp.onEvent((e) => sourceEvents.push(e));
    const sourceEcam = await waitForFirmwarePciSetup(source);
    const sourceLowRam = await readPhysical(source.qmp, 0, 4096, { unitSize: 8 });
    expect(sourceLowRam.some((b) => b !== 0)).toBe(true);

    const started = await migrate(source.qmp, uri);
    expect(await waitForMigrationStatus(source.qmp, 'setup', { since: started })).toBe('setup');
    expect(await waitForMigrationStatus(source.qmp, 'pre-switchover', { since: started })).toBe('pre-switchover');
    expect(await queryStatus(source.qmp)).toEqual({ status: 'finish-migrate', running: false });
    expect((await queryMigrate(source.qmp)).status).toBe('pre-switchover');

    const continued = await migrateContinue(source.qmp);
    await waitForMigrationStatus(source.qmp, 'completed', { since: continued });
    expect(await waitForMigrationStatus(target.qmp, 'completed', { since: incoming })).toBe('completed');

    // MIGRATION_PASS events come as often as RAM passes need: leave them out of the sequence.
    const sequence = sourceEvents
      .filter((e) => e.event !== 'MIGRATION_PASS')
      .map((e) => (e.event === 'MIGRATION' ? `MIGRATION ${String(e.data.status)}` : e.event));
    expect(sequence).toEqual([
      'MIGRATION setup',
      'MIGRATION active',
      'STOP',
      'MIGRATION pre-switchover',
      'MIGRATION device',
      'MIGRATION completed',
    ]);

    const info = await queryMigrate(source.qmp);
    expect(info.status).toBe('completed');
    expect(info.totalTimeMs).toBeGreaterThan(0);
    expect(info.downtimeMs).toBeGreaterThanOrEqual(0);
    expect(info.ram?.totalBytes).toBeGreaterThanOrEqual(64 << 20);
    expect(info.ram?.transferredBytes).toBeGreaterThan(0);
    expect(info.errorDesc).toBeUndefined();

    // The target never ran firmware: its low RAM and its ECAM window can only be the source's.
    expect(await readPhysical(target.qmp, 0, 4096, { unitSize: 8 })).toEqual(await readPhysical(source.qmp, 0, 4096, { unitSize: 8 }));
    expect(await locateEcam(target.qmp)).toEqual(sourceEcam);
    expect(await queryStatus(source.qmp)).toEqual({ status: 'postmigrate', running: false });
    expect(await queryStatus(target.qmp)).toEqual({ status: 'paused', running: false });
    const resumed = await cont(target.qmp);
    await target.qmp.waitForEvent('RESUME', undefined, 5000, { since: resumed });
    expect((await queryStatus(target.qmp)).running).toBe(true);
    await killVms(source, target);
  });

  it('cancels from pre-switchover back to a running source; the target reports the failure', async () => {
    const { source, target, uri, incoming } = await migrationPair('cancel', false);
    const started = await migrate(source.qmp, uri);
    await waitForMigrationStatus(source.qmp, 'pre-switchover', { since: started });
    expect((await queryStatus(source.qmp)).running).toBe(false);

    const cancelled = await migrateCancel(source.qmp);
    expect(await waitForMigrationStatus(source.qmp, 'cancelled', { since: cancelled })).toBe('cancelled');
    await source.qmp.waitForEvent('RESUME', undefined, 5000, { since: cancelled });
    expect(await queryStatus(source.qmp)).toEqual({ status: 'running', running: true });
    expect((await queryMigrate(source.qmp)).errorDesc).toBe('Switchover is interrupted');

    const targetOutcome = await waitForMigrationStatus(target.qmp, 'completed', { since: incoming }).catch((e: unknown) => e);
    expect(targetOutcome).toBeInstanceOf(MigrationFailedError);
    expect(targetOutcome).toMatchObject({ status: 'failed' });
    expect((targetOutcome as MigrationFailedError).errorDesc).toMatch(/load of migration failed/);

    // The source is still an ordinary VM: it stops and runs again on request.
    const stopped = await stop(source.qmp);
    await source.qmp.waitForEvent('STOP', undefined, 5000, { since: stopped });
    await cont(source.qmp);
    expect((await queryStatus(source.qmp)).running).toBe(true);
    await killVms(source, target);
  });
});
