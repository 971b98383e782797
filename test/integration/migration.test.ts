// Migration v2 and DMA dirty logging over a real socket: two real server processes (`serve
// --device scratch`) and our client as the VMM on each side, with memfd-backed guest RAM.

import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as codec from '../../src/vfio-user/codec.js';
import { GuestMemory, VfioUserClient } from '../../src/vfio-user/client.js';
import { Command, Errno, Feature, FeatureFlags, MigrationFlags, MigrationState, PayloadSize, PciRegion } from '../../src/vfio-user/protocol.js';
import { fnv1a, pattern, ScratchDmaCommand, ScratchDmaControl, ScratchDmaStatus, ScratchReg } from '../../src/pci/scratch-device.js';
import { Cfg, MsixCap } from '../../src/pci/registers.js';
import { startServerProcess, type ServerProcess } from '../support/server-process.js';
import { connectClient } from '../support/nvme-host.js';
import { waitUntil } from './helpers.js';

const { STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY } = MigrationState;
const BAR0 = PciRegion.BAR0;
const PAGE = 4096;
const RAM = { iova: 0x10_0000, size: 1 << 20 };

let dir: string;
let source: ServerProcess;
let target: ServerProcess;
const opened: { client: VfioUserClient; memory: GuestMemory }[] = [];

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'nvu-mig-'));
  const args = ['--device', 'scratch', '--log-level', process.env.TEST_LOG ? 'debug' : 'error'];
  [source, target] = await Promise.all([startServerProcess(join(dir, 'source.sock'), args), startServerProcess(join(dir, 'target.sock'), args)]);
});

afterEach(async () => {
  for (const { client, memory } of opened.splice(0)) {
    client.close();
    memory.close();
  }
});

afterAll(async () => {
  expect(await source.stop()).toBe(0);
  expect(await target.stop()).toBe(0);
  rmSync(dir, { recursive: true, force: true });
});

/**
 * A VMM on `server`: negotiated, guest RAM mapped by fd, device reset to power-on. Retries while
 * the server still says goodbye to the previous test's client (one client per socket).
 */
async function attach(server: ServerProcess): Promise<{ client: VfioUserClient; memory: GuestMemory }> {
  const client = await connectClient(server.socketPath);
  const memory = new GuestMemory(RAM.iova, RAM.size);
  opened.push({ client, memory });
  await client.dmaMap(memory);
  await client.reset();
  return { client, memory };
}

/** Programs the scratch device's DMA engine and waits (bounded) for it to finish; returns DMA_STATUS. */
async function deviceDma(client: VfioUserClient, command: number, addr: number, length: number, value = 0): Promise<number> {
  await startDma(client, command, addr, length, value);
  return dmaFinished(client);
}

async function startDma(client: VfioUserClient, command: number, addr: number, length: number, value = 0, posted = false): Promise<void> {
  await client.write64(BAR0, ScratchReg.DMA_ADDRESS, BigInt(addr));
  await client.write32(BAR0, ScratchReg.DMA_LENGTH, length);
  await client.write32(BAR0, ScratchReg.DMA_PATTERN, value);
  const bytes = new Uint8Array([command, 0, 0, 0]);
  if (posted) client.postRegionWrite(BAR0, ScratchReg.DMA_COMMAND, bytes);
  else await client.regionWrite(BAR0, ScratchReg.DMA_COMMAND, bytes);
}

async function dmaFinished(client: VfioUserClient, timeoutMs = 3000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = await client.read32(BAR0, ScratchReg.DMA_STATUS);
    if (status !== ScratchDmaStatus.BUSY) return status;
    if (Date.now() > deadline) throw new Error('DMA did not finish');
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** The 4 KiB pages [addr, addr+length) touches. */
const pagesOf = (addr: number, length: number): number[] => {
  const pages: number[] = [];
  for (let page = Math.floor(addr / PAGE) * PAGE; page < addr + length; page += PAGE) pages.push(page);
  return pages;
};

describe('migration between two server processes', () => {
  it('carries registers, counters, DMA results, config space and the MSI-X table, streamed in chunks', async () => {
    const src = await attach(source);
    expect(await src.client.migrationFlags()).toBe(MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY);
    await src.client.write32(BAR0, ScratchReg.SCRATCH32, 0xdeadbeef);
    await src.client.write64(BAR0, ScratchReg.SCRATCH64, 0x0123456789abcdefn);
    await src.client.configWrite(Cfg.COMMAND, new Uint8Array([0x06, 0x00]));
    const msixEntry = Uint8Array.from({ length: MsixCap.TABLE_ENTRY_SIZE }, (_, i) => 0x40 + i);
    await src.client.regionWrite(BAR0, 0x2000 + MsixCap.TABLE_ENTRY_SIZE, msixEntry);
    expect(await deviceDma(src.client, ScratchDmaCommand.WRITE_PATTERN, RAM.iova + 0x200, 64, 0xa5a5f00d)).toBe(ScratchDmaStatus.DONE);
    expect(await deviceDma(src.client, ScratchDmaCommand.READ_HASH, RAM.iova, 4 * PAGE)).toBe(ScratchDmaStatus.DONE);
    const hash = await src.client.read32(BAR0, ScratchReg.DMA_RESULT);
    expect(hash).toBe(fnv1a(src.memory.slice(RAM.iova, 4 * PAGE)));
    const writes = await src.client.read32(BAR0, ScratchReg.WRITE_COUNT);
    expect(writes).toBe(2 + 2 * 4); // the MSI-X table is the function's, not a BAR0 register

    await src.client.setMigrationState(STOP_COPY); // RUNNING → STOP → STOP_COPY
    expect(await src.client.migrationState()).toBe(STOP_COPY);
    const { data: stream, reads } = await src.client.readMigrationStream(1000);
    expect(reads).toBe(Math.floor(stream.length / 1000) + 1);
    expect(reads).toBeGreaterThan(2);
    await expect(src.client.write32(BAR0, ScratchReg.IRQ_DOORBELL, 0)).rejects.toMatchObject({ errno: Errno.EBUSY });
    await src.client.setMigrationState(STOP);
    await expect(src.client.readMigrationData(16)).rejects.toMatchObject({ errno: Errno.EINVAL });

    const tgt = await attach(target);
    await expect(tgt.client.writeMigrationData(stream.subarray(0, 16))).rejects.toMatchObject({ errno: Errno.EINVAL });
    await tgt.client.setMigrationState(RESUMING); // RUNNING → STOP → RESUMING
    expect(await tgt.client.migrationState()).toBe(RESUMING);
    expect(await tgt.client.writeMigrationStream(stream, 777)).toBe(Math.ceil(stream.length / 777));
    await tgt.client.setMigrationState(RUNNING); // RESUMING → STOP → RUNNING
    expect(await tgt.client.migrationState()).toBe(RUNNING);

    expect(await tgt.client.read32(BAR0, ScratchReg.SCRATCH32)).toBe(0xdeadbeef);
    expect(await tgt.client.read64(BAR0, ScratchReg.SCRATCH64)).toBe(0x0123456789abcdefn);
    expect(await tgt.client.read32(BAR0, ScratchReg.WRITE_COUNT)).toBe(writes);
    expect(await tgt.client.read32(BAR0, ScratchReg.DMA_STATUS)).toBe(ScratchDmaStatus.DONE);
    expect(await tgt.client.read32(BAR0, ScratchReg.DMA_RESULT)).toBe(hash);
    expect(Array.from(await tgt.client.configRead(Cfg.COMMAND, 2))).toEqual([0x06, 0x00]);
    expect(Array.from(await tgt.client.regionRead(BAR0, 0x2000 + MsixCap.TABLE_ENTRY_SIZE, MsixCap.TABLE_ENTRY_SIZE))).toEqual(Array.from(msixEntry));
    // The target runs: it takes work; the source runs again once told so.
    expect(await deviceDma(tgt.client, ScratchDmaCommand.WRITE_PATTERN, RAM.iova, 8, 0x01020304)).toBe(ScratchDmaStatus.DONE);
    expect(Array.from(tgt.memory.slice(RAM.iova, 8))).toEqual([4, 3, 2, 1, 4, 3, 2, 1]);
    await src.client.setMigrationState(RUNNING);
    await src.client.write32(BAR0, ScratchReg.IRQ_DOORBELL, 0);
  });

  it('PRE_COPY streams parts while the device runs, then the final state behind them', async () => {
    const src = await attach(source);
    await src.client.write32(BAR0, ScratchReg.SCRATCH32, 1);
    await src.client.setMigrationState(PRE_COPY);
    const first = await src.client.readMigrationStream(4096);
    expect(first.data.length).toBeGreaterThan(0);
    expect((await src.client.readMigrationStream(4096)).data.length).toBe(0); // nothing changed since
    await src.client.write32(BAR0, ScratchReg.SCRATCH32, 2); // still running: it takes writes
    const second = await src.client.readMigrationStream(4096);
    expect(second.data.length).toBeGreaterThan(0);
    await src.client.write32(BAR0, ScratchReg.SCRATCH32, 3);
    await src.client.setMigrationState(STOP_COPY);
    const rest = await src.client.readMigrationStream(4096);

    const tgt = await attach(target);
    await tgt.client.setMigrationState(RESUMING);
    await tgt.client.writeMigrationStream(Buffer.concat([first.data, second.data, rest.data]));
    await tgt.client.setMigrationState(RUNNING);
    expect(await tgt.client.read32(BAR0, ScratchReg.SCRATCH32)).toBe(3);
  });

  it('a target refuses a cut or foreign stream, keeps its own state, and takes the rest or a new stream', async () => {
    const src = await attach(source);
    await src.client.write32(BAR0, ScratchReg.SCRATCH32, 0x5005);
    await src.client.setMigrationState(STOP_COPY);
    const { data: stream } = await src.client.readMigrationStream();
    await src.client.setMigrationState(RUNNING);

    const tgt = await attach(target);
    await tgt.client.write32(BAR0, ScratchReg.SCRATCH32, 0x7777);
    await tgt.client.setMigrationState(RESUMING);
    await tgt.client.writeMigrationStream(stream.subarray(0, stream.length - 10));
    await expect(tgt.client.setMigrationState(RUNNING)).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(await tgt.client.migrationState()).toBe(RESUMING);
    expect(await tgt.client.read32(BAR0, ScratchReg.SCRATCH32)).toBe(0x7777);
    await tgt.client.writeMigrationData(stream.subarray(stream.length - 10));
    await tgt.client.setMigrationState(STOP);

    // A well-framed stream whose device state is not this device's: the device refuses it.
    await tgt.client.setMigrationState(RESUMING);
    const foreign = Uint8Array.from(stream);
    foreign[12] ^= 0xff; // the device state's own magic, right after the 12-byte record header
    await tgt.client.writeMigrationStream(foreign);
    await expect(tgt.client.setMigrationState(STOP)).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(await tgt.client.migrationState()).toBe(RESUMING);
    await tgt.client.reset(); // drops the received bytes, keeps RESUMING
    expect(await tgt.client.migrationState()).toBe(RESUMING);
    await tgt.client.writeMigrationStream(stream);
    await tgt.client.setMigrationState(RUNNING);
    expect(await tgt.client.read32(BAR0, ScratchReg.SCRATCH32)).toBe(0x5005);
  });

  it('a client leaving mid-migration leaves the device RUNNING for the next one', async () => {
    const first = await attach(source);
    await first.client.setMigrationState(STOP);
    first.client.close();
    await waitUntil(() => first.client.isClosed);
    const next = await attach(source);
    expect(await next.client.migrationState()).toBe(RUNNING);
    await next.client.write32(BAR0, ScratchReg.IRQ_DOORBELL, 0);
  });

  it('STOP waits for the DMA the device has in flight', async () => {
    const { client, memory } = await attach(source);
    await client.write32(BAR0, ScratchReg.DMA_CONTROL, ScratchDmaControl.WRITE_THROUGH_CLIENT);
    client.holdServerRequests = true; // a slow VMM: the device's DMA_WRITE waits for us
    await startDma(client, ScratchDmaCommand.WRITE_PATTERN, RAM.iova + PAGE, 32, 0x11223344, true);
    const events: string[] = [];
    const stopped = client.setMigrationState(STOP).then(() => events.push('STOP replied'));
    await waitUntil(() => client.heldServerRequests === 1, 3000, 'the device DMA_WRITE');
    events.push('DMA answered');
    client.releaseServerRequests();
    await stopped;
    expect(events).toEqual(['DMA answered', 'STOP replied']);
    expect(await client.read32(BAR0, ScratchReg.DMA_STATUS)).toBe(ScratchDmaStatus.DONE);
    expect(Array.from(memory.slice(RAM.iova + PAGE, 4))).toEqual([0x44, 0x33, 0x22, 0x11]);
  });
});

describe('DEVICE_FEATURE and MIG_DATA rules', () => {
  it('refuses MIG_DATA in the wrong state and illegal state requests', async () => {
    const { client } = await attach(source);
    await expect(client.readMigrationData(64)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.writeMigrationData(new Uint8Array(64))).rejects.toMatchObject({ errno: Errno.EINVAL });
    await client.setMigrationState(STOP_COPY);
    await expect(client.writeMigrationData(new Uint8Array(64))).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.setMigrationState(PRE_COPY)).rejects.toMatchObject({ errno: Errno.EINVAL });
    for (const state of [MigrationState.ERROR, MigrationState.RUNNING_P2P, MigrationState.PRE_COPY_P2P, 9]) {
      await expect(client.setMigrationState(state)).rejects.toMatchObject({ errno: Errno.EINVAL });
    }
    expect(await client.migrationState()).toBe(STOP_COPY);
    await client.setMigrationState(RUNNING);
  });

  it('PROBE answers with the request itself, and only for operations the feature has', async () => {
    const { client } = await attach(source);
    const probe = codec.deviceFeature.encode({ argsz: 8, flags: Feature.MIGRATION | FeatureFlags.PROBE | FeatureFlags.GET });
    const reply = await client.request(Command.DEVICE_FEATURE, probe);
    expect(Array.from(reply.payload)).toEqual(Array.from(probe));
    await client.probeFeature(Feature.MIG_DEVICE_STATE, FeatureFlags.GET | FeatureFlags.SET);
    await client.probeFeature(Feature.DMA_LOGGING_REPORT, FeatureFlags.GET);
    await expect(client.probeFeature(Feature.MIGRATION, FeatureFlags.SET)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.probeFeature(Feature.DMA_LOGGING_START, FeatureFlags.GET)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.probeFeature(3)).rejects.toMatchObject({ errno: Errno.ENOTSUP });
    await expect(client.deviceFeature(Feature.MIG_DEVICE_STATE | FeatureFlags.GET | FeatureFlags.SET, new Uint8Array(8))).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.deviceFeature(Feature.MIG_DEVICE_STATE)).rejects.toMatchObject({ errno: Errno.EINVAL });
  });

  it('keeps replies within argsz', async () => {
    const { client } = await attach(source);
    // A GET without room for its data: the header with the argsz needed, and nothing else.
    const short = await client.deviceFeature(Feature.MIGRATION | FeatureFlags.GET, new Uint8Array(0), 0);
    expect(short.argsz).toBe(PayloadSize.DEVICE_FEATURE + PayloadSize.FEATURE_MIGRATION);
    expect(short.data.length).toBe(0);
    // A SET whose echo does not fit acts not at all.
    const set = codec.featureMigState.encode({ deviceState: STOP, dataFd: 0 });
    await expect(client.deviceFeature(Feature.MIG_DEVICE_STATE | FeatureFlags.SET, set, 0)).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(await client.migrationState()).toBe(RUNNING);
    await client.setMigrationState(STOP_COPY);
    await expect(client.readMigrationData(64, PayloadSize.MIG_DATA + 63)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.readMigrationData((1 << 20) + 1)).rejects.toMatchObject({ errno: Errno.EINVAL });
    const data = await client.readMigrationData(64);
    expect(data.length).toBe(64);
    await client.setMigrationState(RUNNING);
  });
});

describe('DMA dirty logging', () => {
  it('reports exactly the pages the device wrote, once, at the page size asked', async () => {
    const { client, memory } = await attach(source);
    expect(await client.startDmaLogging(PAGE, [{ iova: RAM.iova, length: RAM.size }])).toBe(PAGE);
    const writes: [number, number][] = [
      [RAM.iova + 0x3000 + 40, 16],
      [RAM.iova + 0x8000 - 16, 32],
      [RAM.iova + 0x20000, 2 * PAGE],
    ];
    for (const [addr, length] of writes) {
      expect(await deviceDma(client, ScratchDmaCommand.WRITE_PATTERN, addr, length, 0xc0ffee00)).toBe(ScratchDmaStatus.DONE);
      expect(Array.from(memory.slice(addr, length))).toEqual(Array.from(pattern(0xc0ffee00, length)));
    }
    expect(await deviceDma(client, ScratchDmaCommand.READ_HASH, RAM.iova + 0x50000, 4 * PAGE)).toBe(ScratchDmaStatus.DONE);
    const expected = [...new Set(writes.flatMap(([addr, length]) => pagesOf(addr, length)))].sort((a, b) => a - b);
    expect(await client.dirtyPages(RAM.iova, RAM.size, PAGE)).toEqual(expected);
    expect(await client.dirtyPages(RAM.iova, RAM.size, PAGE)).toEqual([]); // reported means forgotten

    await deviceDma(client, ScratchDmaCommand.WRITE_PATTERN, RAM.iova + 0x5000, 1, 0);
    // Without room for the bitmap: the size needed, and the page stays dirty.
    const bitmapBytes = Math.ceil(RAM.size / (2 * PAGE) / 64) * 8;
    const request = codec.dmaLoggingReport.encode({ iova: BigInt(RAM.iova), length: BigInt(RAM.size), pageSize: BigInt(2 * PAGE) });
    const short = await client.deviceFeature(Feature.DMA_LOGGING_REPORT | FeatureFlags.GET, request, PayloadSize.DMA_LOGGING_REPORT);
    expect(short.argsz).toBe(PayloadSize.DEVICE_FEATURE + PayloadSize.DMA_LOGGING_REPORT + bitmapBytes);
    expect(short.data.length).toBe(0);
    expect(await client.dirtyPages(RAM.iova, RAM.size, 2 * PAGE)).toEqual([RAM.iova + 0x4000]);

    await expect(client.startDmaLogging(PAGE)).rejects.toMatchObject({ errno: Errno.EBUSY });
    await client.stopDmaLogging();
    await expect(client.dmaLoggingReport(RAM.iova, RAM.size, PAGE)).rejects.toMatchObject({ errno: Errno.EINVAL });
  });

  it('logs all memory when no range is given, and picks its own page size for a smaller hint', async () => {
    const { client } = await attach(source);
    expect(await client.startDmaLogging(512)).toBe(PAGE);
    await deviceDma(client, ScratchDmaCommand.WRITE_PATTERN, RAM.iova + 0x9000 + 5, 3, 1);
    expect(await client.dirtyPages(RAM.iova, RAM.size, PAGE)).toEqual([RAM.iova + 0x9000]);
    await client.stopDmaLogging();
  });

  it('refuses malformed logging requests', async () => {
    const { client } = await attach(source);
    await expect(client.startDmaLogging(3000)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.startDmaLogging(PAGE, [{ iova: RAM.iova + 1, length: PAGE }])).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.startDmaLogging(PAGE, [{ iova: RAM.iova, length: 0 }])).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(
      client.startDmaLogging(PAGE, [
        { iova: RAM.iova, length: 2 * PAGE },
        { iova: RAM.iova + PAGE, length: PAGE },
      ]),
    ).rejects.toMatchObject({ errno: Errno.EINVAL });
    const tooMany = Array.from({ length: 257 }, (_, i) => ({ iova: RAM.iova + i * PAGE, length: PAGE }));
    await expect(client.startDmaLogging(PAGE, tooMany)).rejects.toMatchObject({ errno: Errno.E2BIG });
    await client.startDmaLogging(PAGE);
    await expect(client.dmaLoggingReport(RAM.iova, RAM.size, 1000)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.dmaLoggingReport(RAM.iova, 0, PAGE)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.dmaLoggingReport(0, 2 ** 40, PAGE)).rejects.toMatchObject({ errno: Errno.E2BIG });
    await client.stopDmaLogging();
  });
});

describe('writes routed through the client', () => {
  it('turns the device writes into DMA_WRITE messages while its reads stay on the mapping', async () => {
    const { client, memory } = await attach(source);
    await client.startDmaLogging(PAGE, [{ iova: RAM.iova, length: RAM.size }]);
    await client.write32(BAR0, ScratchReg.DMA_CONTROL, ScratchDmaControl.WRITE_THROUGH_CLIENT);
    const addr = RAM.iova + 0x1000 + 12;
    const length = 3 * PAGE;
    expect(await deviceDma(client, ScratchDmaCommand.WRITE_PATTERN, addr, length, 0xfeedbeef)).toBe(ScratchDmaStatus.DONE);
    expect(client.dmaWrites).toEqual([{ address: addr, count: length }]);
    expect(Array.from(memory.slice(addr, length))).toEqual(Array.from(pattern(0xfeedbeef, length)));
    // The device's own log saw the routed write too.
    expect(await client.dirtyPages(RAM.iova, RAM.size, PAGE)).toEqual(pagesOf(addr, length));

    const readsBefore = client.dmaRequests.read;
    expect(await deviceDma(client, ScratchDmaCommand.READ_HASH, addr, length)).toBe(ScratchDmaStatus.DONE);
    expect(await client.read32(BAR0, ScratchReg.DMA_RESULT)).toBe(fnv1a(memory.slice(addr, length)));
    expect(client.dmaRequests.read).toBe(readsBefore);

    await client.write32(BAR0, ScratchReg.DMA_CONTROL, 0);
    expect(await deviceDma(client, ScratchDmaCommand.WRITE_PATTERN, RAM.iova, 16, 0x0badcafe)).toBe(ScratchDmaStatus.DONE);
    expect(client.dmaWrites).toHaveLength(1);
    expect(Array.from(memory.slice(RAM.iova, 4))).toEqual([0xfe, 0xca, 0xad, 0x0b]);
    await client.stopDmaLogging();
  });
});
