// Shadow doorbells (Doorbell Buffer Config, Base §5.8): once the host has configured the buffers,
// the Shadow Doorbell values are authoritative. A trapped MMIO doorbell write only tells the
// controller "look at the shadow"; its value may be older than a shadow value the controller has
// already consumed (the MMIO write was posted before the host moved on), and it must never move a
// queue pointer backwards. Regression test: a stale SQ tail doorbell used to rewind the tail, and
// the controller then fetched almost a whole ring of zeroed SQEs (INVALID_NAMESPACE, CID 0).

import { performance } from 'node:perf_hooks';
import { describe, expect, it } from 'vitest';
import { buildCommand } from '../../../src/nvme/command.js';
import { AdminOpcode, NvmOpcode, Reg, Status } from '../../../src/nvme/spec.js';
import { Namespace } from '../../../src/nvme/namespace.js';
import { RamBackend } from '../../../src/nvme/backend.js';
import { DATA, TestHost, tick, until, type Cqe } from './helpers.js';
import { needsEvent } from '../../support/nvme-host.js';

const SHADOW = DATA + 0x10000;
const EVENT_IDX = DATA + 0x11000;
const QID = 1;

/** Byte offset of a queue's slot in the shadow doorbell / EventIdx pages (stride 4). */
const slot = (qid: number, completion: boolean): number => (2 * qid + (completion ? 1 : 0)) * 4;

const flush = (): Uint8Array => buildCommand({ opcode: NvmOpcode.FLUSH, nsid: 1 });
/** A one-block read of a RAM namespace: it completes in the fetch that takes it, as page-cache reads do. */
const read = (): Uint8Array => buildCommand({ opcode: NvmOpcode.READ, nsid: 1, prp1: DATA, cdw12: 0 });

/** Brings a controller up with Doorbell Buffer Config active and I/O queue pair 1. */
async function shadowHost(options: { size?: number; cqSize?: number; tailPollUs?: number; deepQueueBatchMs?: number; interrupts?: boolean } = {}): Promise<TestHost> {
  const { tailPollUs, deepQueueBatchMs } = options;
  const h = new TestHost({ controller: { ...(tailPollUs !== undefined ? { tailPollUs } : {}), ...(deepQueueBatchMs !== undefined ? { deepQueueBatchMs } : {}) } }).start();
  // Garbage in the EventIdx page: the controller must overwrite the slots it owns.
  h.memory.bytes.fill(0xff, EVENT_IDX, EVENT_IDX + 4096);
  const cqe = await h.admin({ opcode: AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1: SHADOW, prp2: EVENT_IDX });
  expect(cqe.status).toBe(0);
  const size = options.size ?? 16;
  if (options.cqSize === undefined) {
    await h.createIoQueuePair(QID, size, QID, { interrupts: options.interrupts ?? true });
  } else {
    // Separate sizes: a small CQ behind a deeper SQ, so the CQ can fill up.
    const cqBase = 0x100000 + QID * 0x20000;
    const sqBase = cqBase + 0x10000;
    let c = await h.admin({ opcode: AdminOpcode.CREATE_IO_CQ, prp1: cqBase, cdw10: ((options.cqSize - 1) << 16) | QID, cdw11: (QID << 16) | 0x3 });
    expect(c.status).toBe(0);
    c = await h.admin({ opcode: AdminOpcode.CREATE_IO_SQ, prp1: sqBase, cdw10: ((size - 1) << 16) | QID, cdw11: (QID << 16) | 0x1 });
    expect(c.status).toBe(0);
    h.queues.set(QID, { sqBase, cqBase, size, sqTail: 0, cqHead: 0, phase: 1 });
    // The helper's QueuePair has one size; track the CQ size separately below.
    cqSizes.set(h, options.cqSize);
  }
  return h;
}

const cqSizes = new WeakMap<TestHost, number>();

/** What a shadow-doorbell driver does: update the shadow tail, then ring the trapped doorbell. */
function ringShadowSq(h: TestHost, qid = QID): number {
  const tail = h.queues.get(qid)!.sqTail;
  h.memory.set32(SHADOW + slot(qid, false), tail);
  h.ringSq(qid);
  return tail;
}

function mmioSq(h: TestHost, value: number, qid = QID): void {
  h.write32(Reg.DOORBELLS + slot(qid, false), value);
}

function mmioCq(h: TestHost, value: number, qid = QID): void {
  h.write32(Reg.DOORBELLS + slot(qid, true), value);
}

/** Consumes the next CQE of `qid` (waiting for it); publishes the new head in the shadow only. */
async function reapShadow(h: TestHost, qid = QID, ring = true): Promise<Cqe> {
  const q = h.queues.get(qid)!;
  const cqSize = cqSizes.get(h) ?? q.size;
  let cqe: Cqe | null = null;
  await until(() => (cqe = peekAt(h, qid, q.cqHead, q.phase)) !== null, `a completion on CQ ${qid}`);
  q.cqHead = (q.cqHead + 1) % cqSize;
  if (q.cqHead === 0) q.phase ^= 1;
  h.memory.set32(SHADOW + slot(qid, true), q.cqHead);
  if (ring) mmioCq(h, q.cqHead, qid);
  return cqe!;
}

/** The CQE in slot `index` if its phase tag is `phase`. */
function peekAt(h: TestHost, qid: number, index: number, phase: number): Cqe | null {
  const q = h.queues.get(qid)!;
  const raw = h.memory.slice(q.cqBase + index * 16, 16);
  const v = new DataView(raw.buffer);
  const flags = v.getUint16(14, true);
  if ((flags & 1) !== phase) return null;
  return { dw0: v.getUint32(0, true), dw1: v.getUint32(4, true), sqhd: v.getUint16(8, true), sqid: v.getUint16(10, true), cid: v.getUint16(12, true), phase: flags & 1, status: flags >> 1 };
}

/** Gives the controller plenty of event-loop turns to do anything it (wrongly) wants to do. */
async function settle(turns = 50): Promise<void> {
  for (let i = 0; i < turns; i++) await tick();
}

/** Places `n` flushes, publishes the tail through the shadow + MMIO, and returns their CIDs. */
function submitBatch(h: TestHost, n: number): number[] {
  const cids: number[] = [];
  for (let i = 0; i < n; i++) cids.push(h.place(QID, flush()));
  ringShadowSq(h);
  return cids;
}

async function expectCompletions(h: TestHost, cids: number[]): Promise<void> {
  for (const cid of cids) {
    const cqe = await reapShadow(h);
    expect({ cid: cqe.cid, status: cqe.status, sqid: cqe.sqid }).toEqual({ cid, status: Status.SUCCESS, sqid: QID });
  }
}

async function expectNoMoreCompletions(h: TestHost): Promise<void> {
  await settle();
  const q = h.queues.get(QID)!;
  expect(peekAt(h, QID, q.cqHead, q.phase)).toBeNull();
}

describe('shadow doorbells', () => {
  it('writes EventIdx: the queue creation value, then the SQ tail the controller has seen', async () => {
    const h = await shadowHost();
    await until(() => h.memory.get32(EVENT_IDX + slot(QID, false)) === 0 && h.memory.get32(EVENT_IDX + slot(QID, true)) === 0, 'EventIdx at creation');
    // Slots of queues that do not exist are not the controller's to write.
    expect(h.memory.get32(EVENT_IDX + slot(2, false))).toBe(0xffff_ffff);
    const cids = submitBatch(h, 3);
    await expectCompletions(h, cids);
    await until(() => h.memory.get32(EVENT_IDX + slot(QID, false)) === 3, 'EventIdx = SQ tail 3');
    // Admin queues stay outside the buffer.
    expect(h.memory.get32(EVENT_IDX + slot(0, false))).toBe(0xffff_ffff);
  });

  it('a stale SQ tail MMIO doorbell does not move the tail backwards', async () => {
    const h = await shadowHost({ size: 16 });
    const N = 5;
    const cids = submitBatch(h, N);
    await expectCompletions(h, cids);
    await until(() => h.memory.get32(EVENT_IDX + slot(QID, false)) === N, 'EventIdx = N');
    const sq = h.controller.state.submissionQueues[QID]!;
    expect({ head: sq.head, tail: sq.tail }).toEqual({ head: N, tail: N });

    // The MMIO write the host posted while it had placed only 2 of the 5 commands arrives late.
    mmioSq(h, 2);
    await expectNoMoreCompletions(h);
    expect({ head: sq.head, tail: sq.tail }).toEqual({ head: N, tail: N });
    // So does an even older one (tail 0 is a valid value, "the ring is empty from 0").
    mmioSq(h, 0);
    await expectNoMoreCompletions(h);
    expect({ head: sq.head, tail: sq.tail }).toEqual({ head: N, tail: N });
    expect(h.controller.state.errorLog.count).toBe(0);

    // The queue keeps working exactly as before: the next batch, and nothing else, completes.
    const more = submitBatch(h, 4);
    await expectCompletions(h, more);
    await expectNoMoreCompletions(h);
  });

  it('stale SQ tail doorbells interleaved with newer ones, across ring wraps, lose and invent nothing', async () => {
    const h = await shadowHost({ size: 8 });
    const expected: number[] = [];
    let previous = 0;
    for (let round = 0; round < 6; round++) {
      // Place 3, publish; place 2 more, publish; then the first publish's MMIO write again (late).
      const first = submitBatch(h, 3);
      const firstTail = h.queues.get(QID)!.sqTail;
      const second = submitBatch(h, 2);
      mmioSq(h, firstTail);
      mmioSq(h, previous);
      previous = h.queues.get(QID)!.sqTail;
      expected.push(...first, ...second);
      await expectCompletions(h, [...first, ...second]);
      await expectNoMoreCompletions(h);
    }
    expect(expected).toHaveLength(30);
    const sq = h.controller.state.submissionQueues[QID]!;
    expect(sq.head).toBe(30 % 8);
    expect(sq.tail).toBe(30 % 8);
  });

  it('a shadow tail that moved without an MMIO write is picked up at the next ring; the late MMIO value is ignored', async () => {
    const h = await shadowHost({ size: 16 });
    // The host publishes tail 2 with an MMIO write, then tails 3 and 4 in the shadow only (EventIdx
    // had not asked for a ring yet): the MMIO value 2 is stale by the time the controller reads it.
    const cids = [h.place(QID, flush()), h.place(QID, flush())];
    h.memory.set32(SHADOW + slot(QID, false), 2);
    cids.push(h.place(QID, flush()), h.place(QID, flush()));
    h.memory.set32(SHADOW + slot(QID, false), 4);
    mmioSq(h, 2);
    await expectCompletions(h, cids);
    await expectNoMoreCompletions(h);
    expect(h.controller.state.submissionQueues[QID]!.tail).toBe(4);
  });

  it('a tail the host moves without ringing just after a fetch is taken at a later check, also when a check ran early in between', async () => {
    const h = await shadowHost({ size: 16 });
    await expectCompletions(h, submitBatch(h, 1));
    // A shadow check is pending (the CQ head is watched). Past the start of its slack (us-timer.ts)...
    const start = performance.now();
    while (performance.now() - start < 0.6) {
      // Busy, so that nothing else runs meanwhile.
    }
    // ...a ring wakes the controller: its fetch asks for one more read of the tail, and the pending
    // check runs as soon as the ring returns, before the host has moved anything.
    const rung = submitBatch(h, 1);
    await Promise.resolve();
    // A host that does not look at EventIdx then moves the shadow tail and does not ring.
    const quiet = h.place(QID, flush());
    h.memory.set32(SHADOW + slot(QID, false), h.queues.get(QID)!.sqTail);
    await expectCompletions(h, [...rung, quiet]);
    await expectNoMoreCompletions(h);
  });

  it('a stale CQ head MMIO doorbell does not move the CQ head backwards; held completions keep flowing', async () => {
    // CQ of 4 (3 usable slots) behind an SQ of 16: 8 commands overrun the CQ, 5 are held.
    const h = await shadowHost({ size: 16, cqSize: 4 });
    const cids = submitBatch(h, 8);
    const cq = h.controller.state.completionQueues[QID]!;
    await until(() => h.controller.state.heldCompletions.length === 5, 'five held completions');
    expect({ head: cq.head, tail: cq.tail }).toEqual({ head: 0, tail: 3 });

    // The host consumes 2 entries and publishes head 2 through the shadow and MMIO...
    const got: Cqe[] = [await reapShadow(h, QID, false), await reapShadow(h, QID, false)];
    mmioCq(h, 2);
    await until(() => cq.head === 2, 'CQ head 2');
    // ...then consumes the rest and publishes head 1 (wrapped) in the shadow only; an SQ doorbell
    // makes the controller look at the shadow CQ head (it has completions waiting).
    while (got.length < 5) got.push(await reapShadow(h, QID, false));
    expect(h.queues.get(QID)!.cqHead).toBe(1);
    mmioSq(h, h.queues.get(QID)!.sqTail);
    await until(() => got.length < 8 && peekAt(h, QID, 1, 0) !== null, 'released completions after head 1');
    expect(h.controller.state.heldCompletions).toHaveLength(0);
    expect({ head: cq.head, tail: cq.tail }).toEqual({ head: 1, tail: 0 });
    // The CQ is full again from the controller's view: slots 1, 2, 3 are posted and unconsumed.
    const cqBytes = (): Uint8Array => h.memory.slice(h.queues.get(QID)!.cqBase, 4 * 16);
    const before = cqBytes();

    // Now MMIO head writes the host posted long ago arrive (late): 2 (really written before the
    // wrap) and 0. Taken at face value, 0 would mean "the CQ is empty" and the next completions
    // would overwrite the unconsumed entries in slots 1 and 2.
    mmioCq(h, 2);
    mmioCq(h, 0);
    await settle();
    expect(cq.head).toBe(1);
    const later = submitBatch(h, 2);
    await until(() => h.controller.state.heldCompletions.length === 2, 'two more held completions');
    await settle();
    expect(cq.head).toBe(1);
    expect(cqBytes()).toEqual(before);

    // Consuming the three posted entries and publishing head 0 releases the two held ones.
    while (got.length < 8) got.push(await reapShadow(h));
    got.push(await reapShadow(h), await reapShadow(h));
    expect(got.map((c) => c.cid)).toEqual([...cids, ...later]);
    expect(got.every((c) => c.status === Status.SUCCESS && c.sqid === QID)).toBe(true);
    await expectNoMoreCompletions(h);
    expect(h.controller.state.heldCompletions).toHaveLength(0);

    // And the queue pair still works end to end.
    const more = submitBatch(h, 2);
    await expectCompletions(h, more);
    await expectNoMoreCompletions(h);
  });

  // Regression: a suspended controller ignores doorbells, so the CQ head the host publishes then is
  // only in the shadow. Resume published the stale head as EventIdx and never read the shadow: the
  // host (Linux's nvme_dbbuf_need_event) then saw its EventIdx already crossed and stopped ringing.
  it('a CQ head the host moved while the controller was suspended is read back at resume', async () => {
    const h = await shadowHost({ size: 16 });
    const cids = submitBatch(h, 3);
    const cq = h.controller.state.completionQueues[QID]!;
    await until(() => cq.tail === 3, 'three posted completions');
    await h.controller.suspend();
    await expectCompletions(h, cids);
    await settle();
    expect(cq.head).toBe(0);
    h.controller.resume();
    await until(() => cq.head === 3 && h.memory.get32(EVENT_IDX + slot(QID, true)) === 3, 'head 3 from the shadow, published as EventIdx');
    const more = submitBatch(h, 2);
    await expectCompletions(h, more);
    await expectNoMoreCompletions(h);
  });

  // Regression: in shadow mode the controller's CQ head can already be newer than a posted MMIO
  // head write; checking that late value against it reported a bogus "Invalid Doorbell Write
  // Value" event to the AER Linux always keeps outstanding.
  it('a late CQ head MMIO doorbell is not reported as an invalid doorbell write', async () => {
    // Flush number 8 waits for a gate: it completes while the host's MMIO write is "in flight".
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    let flushes = 0;
    class GatedBackend extends RamBackend {
      override async flush(): Promise<void> {
        if (++flushes === 8) await gate;
      }
    }
    const h = new TestHost({ namespaces: [new Namespace({ nsid: 1, backend: new GatedBackend(1 << 20) })] }).start();
    const cq8 = await (async () => {
      const c = await h.admin({ opcode: AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1: SHADOW, prp2: EVENT_IDX });
      expect(c.status).toBe(0);
      const cqBase = 0x100000 + QID * 0x20000;
      const sqBase = cqBase + 0x10000;
      expect((await h.admin({ opcode: AdminOpcode.CREATE_IO_CQ, prp1: cqBase, cdw10: (7 << 16) | QID, cdw11: (QID << 16) | 0x3 })).status).toBe(0);
      expect((await h.admin({ opcode: AdminOpcode.CREATE_IO_SQ, prp1: sqBase, cdw10: (15 << 16) | QID, cdw11: (QID << 16) | 0x1 })).status).toBe(0);
      h.queues.set(QID, { sqBase, cqBase, size: 16, sqTail: 0, cqHead: 0, phase: 1 });
      cqSizes.set(h, 8);
      return h.controller.state.completionQueues[QID]!;
    })();
    h.place(0, buildCommand({ opcode: AdminOpcode.ASYNC_EVENT_REQUEST }));
    h.ringSq(0);
    await until(() => h.controller.state.asyncEvents.outstanding.length === 1, 'AER outstanding');

    // 8 flushes into a CQ of 8 (7 usable slots): 7 are posted, the 8th waits at the gate.
    const cids = submitBatch(h, 8);
    await until(() => cq8.tail === 7, 'seven posted completions');
    // The host consumes one entry and publishes head 1: shadow write, then an MMIO write that is
    // still on its way. It consumes two more and publishes head 3 in the shadow only.
    const got = [await reapShadow(h, QID, false), await reapShadow(h, QID, false), await reapShadow(h, QID, false)];
    // Flush 8 completes now: the CQ looks full, so the controller reads the shadow head (3) and posts.
    open();
    await until(() => cq8.head === 3 && cq8.tail === 0, 'head 3 from the shadow, 8th completion posted');
    // Only now does the MMIO write of head 1 arrive.
    mmioCq(h, 1);
    await settle();
    expect(cq8.head).toBe(3);
    while (got.length < 8) got.push(await reapShadow(h));
    expect(got.map((c) => c.cid)).toEqual(cids);
    expect(got.every((c) => c.status === Status.SUCCESS)).toBe(true);
    // Observed: an AER completion with dw0 0x00010100 (Error / Invalid Doorbell Write Value /
    // log page 01h) and an Error Information log entry for SQID 1.
    expect(h.peek(0)).toBeNull();
    expect(h.controller.state.errorLog.count).toBe(0);
  });
});

/**
 * Submits as Linux's nvme_dbbuf_update_and_check_event does: shadow tail first, then EventIdx
 * read, and the trapped doorbell only when EventIdx asks. Returns whether it rang.
 */
function submitLikeLinux(h: TestHost, count: number, command = flush): { cids: number[]; rang: boolean } {
  const old = h.memory.get32(SHADOW + slot(QID, false));
  const cids = Array.from({ length: count }, () => h.place(QID, command()));
  const tail = h.queues.get(QID)!.sqTail;
  h.memory.set32(SHADOW + slot(QID, false), tail);
  const rang = needsEvent(h.memory.get32(EVENT_IDX + slot(QID, false)), tail, old);
  if (rang) mmioSq(h, tail);
  return { cids, rang };
}

/** Shallow fetches in a row before an SQ is polled (tail-polling.ts SHALLOW_STREAK). */
const SHALLOW_STREAK = 8;

/** A QD1 host: one command at a time, reaped before the next; returns how many of them rang. */
async function qd1(h: TestHost, commands: number, command = flush): Promise<number> {
  let rings = 0;
  for (let i = 0; i < commands; i++) {
    const one = submitLikeLinux(h, 1, command);
    if (one.rang) rings++;
    await expectCompletions(h, one.cids);
  }
  return rings;
}

const MIXED_ROUNDS = 120;

/** Commands mixedRounds submits when every `deepEvery`-th round is a batch of 3. */
const mixedRoundsSubmitted = (deepEvery: number): number => MIXED_ROUNDS + 2 * Math.floor(MIXED_ROUNDS / deepEvery);

/**
 * A host following EventIdx: rounds of one command, every `deepEvery`-th a batch of 3, every
 * `idleEvery`-th followed by an idle spell; every command must complete, none twice, and the SQ
 * must end with head = tail where the host put it. Returns how many submissions rang.
 */
async function mixedRounds(h: TestHost, o: { deepEvery: number; idleEvery: number; idleMs: number; command: () => Uint8Array }): Promise<number> {
  let rings = 0;
  let submitted = 0;
  for (let round = 0; round < MIXED_ROUNDS; round++) {
    const batch = submitLikeLinux(h, round % o.deepEvery === o.deepEvery - 1 ? 3 : 1, o.command);
    submitted += batch.cids.length;
    if (batch.rang) rings++;
    await expectCompletions(h, batch.cids);
    if (round % o.idleEvery === o.idleEvery - 1) await new Promise((resolve) => setTimeout(resolve, o.idleMs));
  }
  await expectNoMoreCompletions(h);
  expect(submitted).toBe(mixedRoundsSubmitted(o.deepEvery));
  const sq = h.controller.state.submissionQueues[QID]!;
  const size = h.queues.get(QID)!.size;
  expect({ head: sq.head, tail: sq.tail }).toEqual({ head: submitted % size, tail: submitted % size });
  return rings;
}

const sqEventIdx = (h: TestHost): number => h.memory.get32(EVENT_IDX + slot(QID, false));

/** EventIdx one behind the SQ's tail: the controller is polling it. */
async function untilPolled(h: TestHost, what: string): Promise<void> {
  const sq = h.controller.state.submissionQueues[QID]!;
  await until(() => sqEventIdx(h) === (sq.tail + sq.size - 1) % sq.size, what);
}

describe('tail polling (serve --poll-us)', () => {
  it('a QD1 host is polled after a streak of shallow fetches: EventIdx stays one behind the tail and nothing rings', async () => {
    // A window far longer than this test: the SQ stays polled throughout.
    const h = await shadowHost({ size: 16, tailPollUs: 10_000_000 });
    // Every command rings until the streak is complete (EventIdx armed, as without polling).
    expect(await qd1(h, SHALLOW_STREAK - 1)).toBe(SHALLOW_STREAK - 1);
    expect(sqEventIdx(h)).toBe(SHALLOW_STREAK - 1);
    expect(await qd1(h, 1)).toBe(1);
    await untilPolled(h, 'polled after the streak');
    expect(await qd1(h, 40)).toBe(0);
    await expectNoMoreCompletions(h);
    await untilPolled(h, 'still polled');
  });

  it('a host polling a CQ without interrupts (Linux poll queues, SPDK) is polled too, and gets no interrupt', async () => {
    const h = await shadowHost({ size: 16, tailPollUs: 10_000_000, interrupts: false });
    const adminInterrupts = h.msixCount();
    expect(adminInterrupts).toBeGreaterThan(0);
    expect(await qd1(h, SHALLOW_STREAK)).toBe(SHALLOW_STREAK);
    await untilPolled(h, 'polled after the streak');
    expect(await qd1(h, 40)).toBe(0);
    await expectNoMoreCompletions(h);
    expect(h.msixCount()).toBe(adminInterrupts);
  });

  it('after a window with no commands, EventIdx is armed again and polling stops; the next command is polled at once', async () => {
    const h = await shadowHost({ size: 16, tailPollUs: 50_000 });
    await qd1(h, SHALLOW_STREAK);
    await untilPolled(h, 'polled');
    const sq = h.controller.state.submissionQueues[QID]!;
    await until(() => sqEventIdx(h) === sq.tail, 'window over: EventIdx armed at the tail');
    // Polling has stopped: a command written only to the shadow, without the ring EventIdx asks
    // for, is not taken (the 1 ms re-check of the trapped mode is not running either).
    const q = h.queues.get(QID)!;
    const cid = h.place(QID, flush());
    h.memory.set32(SHADOW + slot(QID, false), q.sqTail);
    await expectNoMoreCompletions(h);
    await new Promise((resolve) => setTimeout(resolve, 20));
    await expectNoMoreCompletions(h);
    // The ring it asked for brings the command in, and an idle spell does not end the streak:
    // the SQ is polled again right away.
    mmioSq(h, q.sqTail);
    await expectCompletions(h, [cid]);
    await untilPolled(h, 'polled again');
    expect(submitLikeLinux(h, 1).rang).toBe(false);
  });

  it('a deep queue is not polled: completions the host has not reaped arm EventIdx and restart the streak', async () => {
    const h = await shadowHost({ size: 16, tailPollUs: 10_000_000 });
    await qd1(h, SHALLOW_STREAK);
    await untilPolled(h, 'polled');
    // Four commands at once, unreaped: deep.
    const deep = submitLikeLinux(h, 4);
    expect(deep.rang).toBe(false);
    const cq = h.controller.state.completionQueues[QID]!;
    const sq = h.controller.state.submissionQueues[QID]!;
    await until(() => cq.tail === (SHALLOW_STREAK + 4) % 16, 'four more posted completions');
    await settle();
    expect(sqEventIdx(h)).toBe(sq.tail);
    expect(submitLikeLinux(h, 1).rang).toBe(true);
    await expectCompletions(h, deep.cids);
    await until(() => cq.tail === (SHALLOW_STREAK + 5) % 16, 'the fifth');
    await reapShadow(h);
    // Back at QD1: it rings until a new streak is complete, then is polled again.
    expect(await qd1(h, SHALLOW_STREAK)).toBe(SHALLOW_STREAK);
    await untilPolled(h, 'polled after a new streak');
    expect(await qd1(h, 5)).toBe(0);
  });

  it('a host following EventIdx loses no command across polled, idle and deep spells, ring wraps included', async () => {
    const h = await shadowHost({ size: 8, tailPollUs: 300 });
    // Mostly QD1; every 30th round a batch of 3 (deep); every 5th an idle spell past the window.
    const rings = await mixedRounds(h, { deepEvery: 30, idleEvery: 5, idleMs: 3, command: flush });
    // A ring per idle spell and per new streak, never one per submission.
    expect(rings).toBeGreaterThanOrEqual(24);
    expect(rings).toBeLessThan(100);
  });

  it('a suspension ends polling; resume arms EventIdx so the next submission rings', async () => {
    const h = await shadowHost({ size: 16, tailPollUs: 10_000_000 });
    await qd1(h, SHALLOW_STREAK);
    await untilPolled(h, 'polled');
    await h.controller.suspend();
    // Written while suspended, shadow only (EventIdx still says "no need to ring"): not taken.
    const during = submitLikeLinux(h, 1);
    expect(during.rang).toBe(false);
    await expectNoMoreCompletions(h);
    h.controller.resume();
    await expectCompletions(h, during.cids);
    await untilPolled(h, 'polled again after resume');
    expect(await qd1(h, 3)).toBe(0);
    await expectNoMoreCompletions(h);
  });
});

describe('deep-queue batching (serve --batch-ms)', () => {
  it.each([5, 0.2])('a deep queue is batched (every %s ms): EventIdx stays one behind, commands that did not ring come in one batch with one interrupt', async (deepQueueBatchMs) => {
    const h = await shadowHost({ size: 32, deepQueueBatchMs });
    const first = submitLikeLinux(h, 4, read);
    expect(first.rang).toBe(true);
    // Four completions posted and not reaped yet: deep, so its doorbells are held back.
    await untilPolled(h, 'batched after a deep fetch');
    await expectCompletions(h, first.cids);
    const interrupts = h.msixCount();
    const batch = submitLikeLinux(h, 3, read);
    expect(batch.rang).toBe(false);
    await expectCompletions(h, batch.cids);
    expect(h.msixCount() - interrupts).toBe(1);
    await untilPolled(h, 'still batched');
    // A period with nothing new arms EventIdx: the next submission rings, nothing waits for a timer.
    const sq = h.controller.state.submissionQueues[QID]!;
    await until(() => sqEventIdx(h) === sq.tail, 'idle: EventIdx armed at the tail');
    const after = submitLikeLinux(h, 1, read);
    expect(after.rang).toBe(true);
    await expectCompletions(h, after.cids);
  });

  it('a shallow (QD1) queue is not batched: every submission rings and none waits for the period', async () => {
    const h = await shadowHost({ size: 16, deepQueueBatchMs: 50 });
    const started = performance.now();
    expect(await qd1(h, 12, read)).toBe(12);
    // Twelve round trips well inside one 50 ms period: nothing waited for a batch.
    expect(performance.now() - started).toBeLessThan(50);
    expect(sqEventIdx(h)).toBe(h.controller.state.submissionQueues[QID]!.tail);
  });

  it('a host following EventIdx loses no command across batched, polled and idle spells, ring wraps included', async () => {
    const h = await shadowHost({ size: 8, tailPollUs: 300, deepQueueBatchMs: 2 });
    // Mostly QD1; every 4th round a batch of 3 (deep); every 7th an idle spell past both periods.
    const rings = await mixedRounds(h, { deepEvery: 4, idleEvery: 7, idleMs: 6, command: read });
    expect(rings).toBeLessThan(mixedRoundsSubmitted(4));
  });

  /** Batched at once: 4 commands ring, and their completions, unconsumed, make the queue deep. */
  async function batchedHost(): Promise<TestHost> {
    const h = await shadowHost({ size: 64, deepQueueBatchMs: 2 });
    const first = submitLikeLinux(h, 4, read);
    await untilPolled(h, 'batched');
    await expectCompletions(h, first.cids);
    return h;
  }

  it('a host that reaps at once and resubmits its whole depth each period gets its doorbells back for a while', async () => {
    const h = await batchedHost();
    // Like a KVM guest at QD8: everything it has waits in the SQ at every collection.
    let round = 0;
    let rang = false;
    for (; round < 20 && !rang; round++) {
      const batch = submitLikeLinux(h, 8, read);
      rang = batch.rang;
      await expectCompletions(h, batch.cids);
    }
    expect(rang).toBe(true);
    // tail-polling.ts STARVED_COLLECTIONS collections in a row, then the next submission rings.
    expect(round).toBeGreaterThan(8);
    // It rests out of the batch: every submission rings (a deep fetch alone would batch it again).
    for (let i = 0; i < 5; i++) {
      const batch = submitLikeLinux(h, 8, read);
      expect(batch.rang).toBe(true);
      await expectCompletions(h, batch.cids);
    }
  });

  it('a host that submits less than its depth per period (a slow guest) stays batched', async () => {
    const h = await batchedHost();
    const full = submitLikeLinux(h, 8, read);
    expect(full.rang).toBe(false);
    await expectCompletions(h, full.cids);
    for (let round = 0; round < 20; round++) {
      const batch = submitLikeLinux(h, 2, read);
      expect([round, batch.rang]).toEqual([round, false]);
      await expectCompletions(h, batch.cids);
    }
  });

  it('a suspension ends batching; resume arms EventIdx and takes what came meanwhile', async () => {
    const h = await shadowHost({ size: 32, deepQueueBatchMs: 10_000 });
    const deep = submitLikeLinux(h, 4, read);
    await untilPolled(h, 'batched');
    await expectCompletions(h, deep.cids);
    await h.controller.suspend();
    const during = submitLikeLinux(h, 2, read);
    expect(during.rang).toBe(false);
    await expectNoMoreCompletions(h);
    // Resumed long before the 10 s period: what came while suspended is taken at once.
    h.controller.resume();
    await expectCompletions(h, during.cids);
    const sq = h.controller.state.submissionQueues[QID]!;
    await until(() => sqEventIdx(h) === sq.tail || sqEventIdx(h) === (sq.tail + sq.size - 1) % sq.size, 'EventIdx published after resume');
  });
});
