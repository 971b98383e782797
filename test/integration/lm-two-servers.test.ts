// TP4159 live migration of an NVMe secondary between two server processes, no QEMU. A TS guest
// drives the secondary on A (five I/O queues at depth 32, reads, writes and flushes, shadow
// doorbells with EventIdx, two AERs outstanding, one CQ left full so the controller holds
// completions); mid-stream A's primary suspends it and its state is read out in chunks (Migration
// Receive), set into the same virtual controller on B (Set Controller State FIRST/MIDDLE/LAST) and
// resumed there; the guest moves to B with its queues and RAM. Track Memory Changes and a User
// Data Migration Queue on the source must report exactly what the controller wrote.

import { afterEach, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { Status } from '../../src/nvme/spec.js';
import { EntrySequence, LbaChangeRange, SequenceIndicator } from '../../src/lm/spec.js';
import { AdminCommandError, stateFacts, type UserDataMigrationQueue } from '../support/migration-host.js';
import {
  DEPTH,
  expectedDeviceWrites,
  finishOnTarget,
  GUEST_RAM,
  randomCut,
  RESOURCES,
  runToCut,
  startPair,
  STALLED_QUEUE,
  STALLED_CQ_ENTRIES,
  type Cut,
  type Guest,
  type MigrationPair,
  type MigrationServer,
} from '../support/migration-pair.js';
import { expectArrived, expectAsyncEventRequestsAlive } from '../support/migration-expect.js';
import { seededRandom, seedFromEnvironment } from '../support/nvme-workload.js';
import { waitUntil } from './helpers.js';

/** LBA Migration Queue entries per window: far more than a window writes, so it never fills. */
const USER_DATA_QUEUE_SLOTS = 2048;
const STATE_CHUNKS = [64, 256, 1024, 4096];
/**
 * Track Receive buffer: 15 descriptors, so a window's report (the guest's data pages, CQ pages and
 * queue memory: a few hundred scattered pages) takes several commands (MTR).
 */
const TRACK_RECEIVE_BYTES = 256;

let pair: MigrationPair | null = null;

afterEach(async () => {
  await pair?.close();
  pair = null;
});

interface HopResult {
  /** Commands the source fetched in the window, and completions it posted and held. */
  fetched: number;
  posted: number;
  held: number;
  trackedPages: number;
  /** Track Receive commands the report took. */
  trackReceives: number;
  loggedBlocks: number;
  stateBytes: number;
  /** Migration Receive commands, and the Set Controller State sequence indicators in order. */
  receiveCommands: number;
  setSequence: number[];
}

/**
 * One hop of the guest from `source` to `target`, cut as `cut` says. Asserts what a hop promises;
 * returns its figures. The source is left suspended with its state (not yet a valid target).
 */
async function hop(g: Guest, source: MigrationServer, target: MigrationServer, cut: Cut, chunk: number, label: string): Promise<HopResult> {
  const { host, workload } = g;
  await source.mmh.startMemoryTracking(source.cntlid, [{ addr: GUEST_RAM.base, bytes: GUEST_RAM.bytes }]);
  const log = await source.mmh.startUserDataLog(source.cntlid, USER_DATA_QUEUE_SLOTS);
  await runToCut(g, cut, label);

  // Suspend (deleting the log queue after its last entry), then the state in chunks.
  await source.mmh.suspend(source.cntlid, true);
  host.takeInterrupts();
  const silent = [...host.interruptCounts];
  const state = await source.mmh.getState(source.cntlid, chunk);
  const facts = stateFacts(state.bytes);
  const tracked = await source.mmh.trackedPages(source.cntlid, TRACK_RECEIVE_BYTES);
  await source.mmh.stopMemoryTracking(source.cntlid);
  await waitUntil(() => log.endsWithSuspend(), 5000, `${label}: the User Data Migration Queue's suspend entry`);

  host.takeInterrupts();
  expect(host.interruptCounts, `${label}: the suspended source raised an interrupt`).toEqual(silent);

  // The guest arrives at the target (same RAM, new eventfds), whose controller then takes the state.
  await host.moveTo(target.socket);
  await target.mmh.suspend(target.cntlid);
  const setSequence = await target.mmh.setState(target.cntlid, state.bytes, chunk);
  const record = workload.windowRecord(facts);
  await target.mmh.resume(target.cntlid);
  await finishOnTarget(g, cut, label);

  await expectArrived(g, label);
  expect(state.consistent && facts.suspendedThroughout, `${label}: CSUP and CSATTR`).toBe(true);
  expect(record.problems, `${label}: the host's record against the state`).toEqual([]);
  expect(tracked.pages, `${label}: Track Receive`).toEqual(expectedDeviceWrites(g, record));
  expect(tracked.suspended, `${label}: SUSP`).toBe(true);
  expectLoggedBlocks(log, record.lbas, label);
  // The admin queue was fetched to its tail (the AERs) and posted nothing in the window; the AERs travelled with the state.
  expect(facts.admin, `${label}: admin queues`).toEqual({ sqHead: host.admin.tail, cqTail: host.admin.cqHead });
  expect([...facts.asyncEventRequests].sort(), `${label}: AERs in the state`).toEqual([...g.asyncEventRequests].sort());
  if (cut.withFullCq) expect(facts.held.length, `${label}: held completions`).toBeGreaterThan(0);
  expect(facts.held.every((h) => h.sqid === STALLED_QUEUE), `${label}: only the stalled queue's CQ holds completions`).toBe(true);
  expect(sequenceIsWellFormed(setSequence), `${label}: SEQIND ${setSequence.join(',')}`).toBe(true);
  return {
    fetched: record.fetched,
    posted: record.posted,
    held: facts.held.length,
    trackedPages: tracked.pages.length,
    trackReceives: tracked.receives,
    loggedBlocks: record.lbas.length,
    stateBytes: state.bytes.length,
    receiveCommands: state.commands,
    setSequence,
  };
}

/** The log's entries: the first after the start, ordinary ones, then the suspend; their blocks are exactly `lbas`. */
function expectLoggedBlocks(log: UserDataMigrationQueue, lbas: number[], label: string): void {
  const entries = log.entries();
  const ranges = entries.slice(0, -1);
  expect(entries.at(-1), `${label}: last LBA Migration Queue entry`).toMatchObject({ sequence: EntrySequence.LAST_SUSPENDED, range: LbaChangeRange.NO_RANGE });
  expect(
    ranges.map((e) => e.sequence),
    `${label}: entry sequence attributes`,
  ).toEqual(ranges.map((_, i) => (i === 0 ? EntrySequence.FIRST_AFTER_START : EntrySequence.ORDINARY)));
  expect(ranges.every((e) => e.nsid === 1 && e.range === LbaChangeRange.RANGE && !e.deallocated), `${label}: entry fields`).toBe(true);
  const logged = new Set<number>();
  for (const e of ranges) for (let b = 0; b < e.blocks; b++) logged.add(e.slba + b);
  expect([...logged].sort((x, y) => x - y), `${label}: LBAs in the User Data Migration Queue`).toEqual(lbas);
}

/** ONLY, or FIRST, any MIDDLEs, LAST. */
function sequenceIsWellFormed(sequence: number[]): boolean {
  if (sequence.length === 1) return sequence[0] === SequenceIndicator.ONLY;
  return (
    sequence[0] === SequenceIndicator.FIRST &&
    sequence.at(-1) === SequenceIndicator.LAST &&
    sequence.slice(1, -1).every((s) => s === SequenceIndicator.MIDDLE)
  );
}

describe('TP4159 migration of a secondary between two server processes', () => {
  it('one hop A→B mid-stream: state in chunks, every command once, exact Track Receive and LBA Migration Queue', async () => {
    pair = await startPair({ managementHost: true });
    const { a, b } = pair;
    const seed = seedFromEnvironment();
    const guest = await pair.startGuest(seededRandom(seed));
    const identifyOnA = (await guest.host.identify(1)).data;
    const result = await hop(guest, a, b, { afterCompletions: 100, withFullCq: true, guestKeepsRunning: false, thenCompletions: 50 }, 256, `seed ${seed}`);

    expect(result.receiveCommands).toBeGreaterThanOrEqual(3);
    expect(result.setSequence.length).toBeGreaterThanOrEqual(3);
    // The stalled queue's commands: its CQ holds all it can, the controller the rest.
    expect(result.held).toBe(DEPTH - (STALLED_CQ_ENTRIES - 1));
    expect(result.loggedBlocks).toBeGreaterThan(0);
    expect(result.trackReceives).toBeGreaterThan(1);
    expect(guest.host.doorbellCounts.shadowOnly).toBeGreaterThan(0);
    // The same virtual controller: the guest sees byte-identical Identify data on B.
    expect(Buffer.from((await guest.host.identify(1)).data).equals(Buffer.from(identifyOnA))).toBe(true);
    // A still has the I/O queues of its state: an NVMe controller state is refused there until it is reset.
    const back = await a.mmh.getState(a.cntlid, 4096);
    await expect(a.mmh.setState(a.cntlid, back.bytes, 4096)).rejects.toSatisfy((e: unknown) => e instanceof AdminCommandError && (e.status & 0x7ff) === (Status.INVALID_FIELD & 0x7ff));
    await a.mmh.resetSecondary(a.cntlid, RESOURCES);
    await expectAsyncEventRequestsAlive(guest);
    console.error(`[lm one hop] seed ${seed}: ${JSON.stringify(result)}`);
  }, 60_000);

  it('A→B→A… 100 hops, each cut at random, the namespace holds what the guest wrote', async () => {
    pair = await startPair({ managementHost: true });
    const { a, b, disk } = pair;
    const seed = seedFromEnvironment();
    const random = seededRandom(seed);
    const guest = await pair.startGuest(random);
    // LM_HOPS runs fewer while iterating; the suite always runs 100.
    const hops = Number(process.env.LM_HOPS ?? 100);
    const started = performance.now();
    const totals = { fetched: 0, held: 0, trackedPages: 0, loggedBlocks: 0, guestRunning: 0 };
    for (let i = 0; i < hops; i++) {
      const [source, target] = i % 2 === 0 ? [a, b] : [b, a];
      const cut = randomCut(random);
      const chunk = STATE_CHUNKS[Math.floor(random() * STATE_CHUNKS.length)]!;
      const result = await hop(guest, source, target, cut, chunk, `seed ${seed} hop ${i + 1} ${source.name}→${target.name}`);
      // The old source becomes a valid target again: offline and online through its primary resets it.
      await source.mmh.resetSecondary(source.cntlid, RESOURCES);
      totals.fetched += result.fetched;
      totals.held += result.held;
      totals.trackedPages += result.trackedPages;
      totals.loggedBlocks += result.loggedBlocks;
      if (cut.guestKeepsRunning) totals.guestRunning++;
    }
    const seconds = (performance.now() - started) / 1000;
    const { workload } = guest;
    expect(workload.violations.join('\n')).toBe('');
    await expectAsyncEventRequestsAlive(guest);
    // Both servers wrote the one backing file: it holds exactly what the guest wrote, wherever it ran.
    expect(Buffer.from(readFileSync(disk)).equals(Buffer.from(workload.image))).toBe(true);
    console.error(
      `[lm 100 hops] seed ${seed}: ${hops} hops in ${seconds.toFixed(1)} s, ${workload.completions} commands ` +
        `(${Math.round(workload.completions / hops)} per hop, ${Math.round(totals.fetched / hops)} fetched by the source), ` +
        `${totals.held} held completions, ${totals.trackedPages} tracked pages, ${totals.loggedBlocks} logged blocks, ` +
        `${totals.guestRunning} hops with the guest running, shadow-only doorbells ${guest.host.doorbellCounts.shadowOnly} of ${guest.host.doorbellCounts.shadowOnly + guest.host.doorbellCounts.mmio}`,
    );
  }, 180_000);
});
