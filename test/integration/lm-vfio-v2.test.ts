// vfio-user migration v2 of an NVMe secondary between two server processes, our TS client as the
// VMM on each side (QEMU 11 does not speak it yet). The guest runs its I/O on the source; mid-stream
// the VMM moves the device RUNNING→STOP_COPY (the primary suspends the secondary and takes its
// state), reads the stream in chunks, and on the target resets the device, moves it to RESUMING,
// writes the stream and moves it to RUNNING; the guest goes on there. DMA logging on the source
// must report exactly the pages the controller wrote.

import { afterEach, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { MigrationState } from '../../src/vfio-user/protocol.js';
import { parseStream } from '../../src/vfio-user/migration-stream.js';
import { stateFacts } from '../support/migration-host.js';
import {
  expectedDeviceWrites,
  finishOnTarget,
  GUEST_RAM,
  randomCut,
  runToCut,
  startPair,
  type MigrationPair,
} from '../support/migration-pair.js';
import { expectArrived, expectAsyncEventRequestsAlive } from '../support/migration-expect.js';
import { PAGE } from '../support/nvme-host.js';
import { seededRandom, seedFromEnvironment } from '../support/nvme-workload.js';

const STREAM_CHUNKS = [512, 1000, 4096, 64 << 10];

let pair: MigrationPair | null = null;

afterEach(async () => {
  await pair?.close();
  pair = null;
});

describe('vfio-user migration v2 of an NVMe secondary between two server processes', () => {
  it('the VMM moves it A→B→A… with I/O in flight: every completion once, DMA logging equals the pages the controller wrote', async () => {
    // Provisioned through the control socket; migration itself is only the VMM's vfio-user requests.
    pair = await startPair({ managementHost: false });
    const { a, b, disk } = pair;
    const seed = seedFromEnvironment();
    const random = seededRandom(seed);
    const guest = await pair.startGuest(random);
    const { host, workload } = guest;
    // LM_HOPS runs more (or fewer) while iterating; the suite always runs 10.
    const hops = Number(process.env.LM_HOPS ?? 10);
    let streamReads = 0;
    for (let i = 0; i < hops; i++) {
      const [source, target] = i % 2 === 0 ? [a, b] : [b, a];
      const label = `seed ${seed} hop ${i + 1} ${source.name}→${target.name}`;
      const cut = randomCut(random);
      const chunk = STREAM_CHUNKS[Math.floor(random() * STREAM_CHUNKS.length)]!;

      expect(await host.client.startDmaLogging(PAGE, [{ iova: GUEST_RAM.base, length: GUEST_RAM.bytes }])).toBe(PAGE);
      await runToCut(guest, cut, label);
      await host.client.setMigrationState(MigrationState.STOP_COPY);
      host.takeInterrupts();
      const silent = [...host.interruptCounts];
      const { data: stream, reads } = await host.client.readMigrationStream(chunk);
      streamReads += reads;
      const dirty = await host.client.dirtyPages(GUEST_RAM.base, GUEST_RAM.bytes, PAGE);
      const facts = stateFacts(parseStream(stream).state);
      host.takeInterrupts();
      expect(host.interruptCounts, `${label}: the stopped source raised an interrupt`).toEqual(silent);

      // The VMM on the target: the guest's RAM and eventfds, a device reset, then the stream.
      await host.moveTo(target.socket);
      await host.client.reset();
      await host.client.setMigrationState(MigrationState.RESUMING);
      const writes = await host.client.writeMigrationStream(stream, chunk);
      expect(writes, label).toBe(Math.ceil(stream.length / chunk));
      const record = workload.windowRecord(facts);
      await host.client.setMigrationState(MigrationState.RUNNING);
      await finishOnTarget(guest, cut, label);

      await expectArrived(guest, label);
      expect(await host.client.migrationState(), label).toBe(MigrationState.RUNNING);
      expect(facts.suspendedThroughout, `${label}: CSATTR`).toBe(true);
      expect(record.problems, `${label}: the host's record against the state`).toEqual([]);
      expect(dirty, `${label}: DMA_LOGGING_REPORT`).toEqual(expectedDeviceWrites(guest, record));
      if (cut.withFullCq) expect(facts.held.length, `${label}: held completions`).toBeGreaterThan(0);
    }
    expect(streamReads).toBeGreaterThan(hops);
    await expectAsyncEventRequestsAlive(guest);
    expect(Buffer.from(readFileSync(disk)).equals(Buffer.from(workload.image))).toBe(true);
    console.error(`[lm v2] seed ${seed}: ${hops} hops, ${workload.completions} commands, ${streamReads} MIG_DATA_READs`);
  }, 120_000);
});
