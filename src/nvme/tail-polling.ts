// Adaptive polling of shadow SQ tails (Base §5.8 Doorbell Buffer Config), the idea of virtio's
// EVENT_IDX with a poll window. While an SQ is busy the controller reads its shadow tail on every
// event-loop turn and keeps its EventIdx one entry behind the tail: a host that follows EventIdx
// (Linux's nvme_dbbuf_update_and_check_event) then never rings the trapped doorbell, which spares
// a VM exit, a vfio-user message and a wake-up of this process per submission. Once the SQ took no
// command for a whole window, EventIdx is armed again (equal to the tail) and polling stops, so an
// idle queue costs nothing and its next submission rings as before.
//
// Only shallow queues are polled (worthPolling; doorbells.ts: at most one completion the host has
// not consumed), and only after SHALLOW_STREAK shallow fetches in a row. A deep queue gains
// nothing: its doorbells already come with several commands each, and polling takes them one by
// one, each with its own interrupt. On a guest whose vCPUs are the bottleneck (TCG) that cost 20 %
// of the IOPS at QD32 without the depth test, and 8-17 % at 2 jobs x QD128 without the streak.
//
// Deep queues can be batched instead (batchMs): EventIdx is held one behind the tail as for a
// polled queue, but the shadow tail is read on a timer, every batchMs, and what came meanwhile is
// taken at once, with one interrupt. That trades up to batchMs of latency (and a ceiling of queue
// depth / batchMs per queue) for far fewer doorbell exits, wake-ups and interrupts per I/O, which
// pays where the guest's vCPUs are the bottleneck: a TCG guest at 4k QD32 measured +10-40 % IOPS
// and half the server CPU per I/O. A batched queue whose tail did not move for a whole period
// gets its EventIdx armed again, so an idle queue costs nothing.

import { performance } from 'node:perf_hooks';
import { native } from '../native.js';
import { setTimeoutUs, type UsTimer } from './us-timer.js';

export interface PolledQueues {
  /**
   * SQ `qid`'s shadow tail compared with the tail the controller holds: 'moved', 'still', or
   * 'gone' when it cannot be read in place now (queue deleted, no mapped guest memory, suspended).
   */
  peekTail(qid: number): 'moved' | 'still' | 'gone';
  /** Whether SQ `qid` gains from polling now (a shallow queue; see below). */
  worthPolling(qid: number): boolean;
  /** Writes EventIdx one behind SQ `qid`'s tail: the host need not ring while we look. */
  suppress(qid: number): void;
  /** SQ `qid` went deep and is batched now (it was neither batched nor polled). */
  batching(qid: number): void;
  /** SQ `qid` left the batch because its host waits on every period (see STARVED_COLLECTIONS). */
  starvedOut(qid: number): void;
  /** Writes EventIdx = SQ `qid`'s tail, then reads the shadow tail again; true when it had moved. */
  arm(qid: number): boolean;
  /** New entries are in SQ `qid`: fetch. */
  kick(qid: number): void;
  /**
   * SQ `qid`'s backlog by its shadow doorbells: entries the host placed that were not fetched yet,
   * and completions its CQ holds that the host did not consume; null when they cannot be read now.
   */
  backlog(qid: number): { waiting: number; unconsumed: number } | null;
}

/**
 * Fetches in a row that must find an SQ shallow before it is polled: a deep host's queue looks
 * shallow now and then (a quarter of its fetches at 2 jobs x QD128), a QD1 host's always.
 */
const SHALLOW_STREAK = 8;

/**
 * Batch collections in a row that must find a host starved (it consumed every completion and
 * every command it has is waiting in the SQ) before its queue leaves the batch. A host that reaps
 * at once (KVM) is starved at every collection: batching only makes it wait. A TCG guest at QD32
 * was starved at fewer than 1 % of them, and never this many in a row.
 */
const STARVED_COLLECTIONS = 8;

/** How long a queue that left the batch starved rings its doorbells before it may be batched again. */
export const STARVED_REST_MS = 100;

export class TailPolling {
  /** Polled SQs and when each last took commands (performance.now() milliseconds). */
  private readonly hot = new Map<number, number>();
  /** Per SQ, how many fetches in a row found it shallow. */
  private readonly shallowStreak = new Map<number, number>();
  private scheduled = false;
  private readonly windowMs: number;
  /** Deep SQs whose shadow tail is read every batchMs instead of waiting for doorbells. */
  private readonly batched = new Set<number>();
  private batchTimer: UsTimer | null = null;
  /**
   * Per batched SQ: the most commands seen outstanding at a collection (the host's depth, as far
   * as we can tell), and how many collections in a row found all of them waiting on us.
   */
  private readonly batchBacklog = new Map<number, { peak: number; starved: number }>();
  /** SQs that left the batch starved, and until when (performance.now() ms) they stay out. */
  private readonly resting = new Map<number, number>();

  /**
   * `windowUs` is how long a shallow SQ stays polled after it last took commands, `batchMs` the
   * period at which a deep SQ's commands are collected; 0 turns either off.
   */
  constructor(
    windowUs: number,
    private readonly batchMs: number,
    private readonly queues: PolledQueues,
  ) {
    this.windowMs = windowUs / 1000;
  }

  get enabled(): boolean {
    return this.windowMs > 0 || this.batchMs > 0;
  }

  /** SQ `qid` keeps its EventIdx one behind its tail: polled or batched. */
  isPolled(qid: number): boolean {
    return this.hot.has(qid) || this.batched.has(qid);
  }

  /** SQ `qid` is not worth polling now: arm its EventIdx and stop polling it, if it was. */
  release(qid: number): void {
    this.shallowStreak.delete(qid);
    this.stopPolling(qid);
  }

  /** SQ `qid` just took commands: poll it for another window if that is worth it; true when it is. */
  took(qid: number): boolean {
    if (!this.queues.worthPolling(qid)) {
      if (this.batchMs === 0 || this.rests(qid)) {
        this.release(qid);
        return false;
      }
      this.shallowStreak.delete(qid);
      // A polled queue that went deep keeps its EventIdx suppressed: it moves to the batch.
      const suppressed = this.hot.delete(qid) || this.batched.has(qid);
      this.batched.add(qid);
      if (!suppressed) {
        this.queues.suppress(qid);
        this.queues.batching(qid);
      }
      this.scheduleBatch();
      return true;
    }
    if (this.windowMs === 0) {
      this.release(qid);
      return false;
    }
    const wasBatched = this.batched.delete(qid);
    const streak = (this.shallowStreak.get(qid) ?? 0) + 1;
    this.shallowStreak.set(qid, streak);
    const polled = this.hot.has(qid);
    if (!polled && streak < SHALLOW_STREAK) {
      // Left the batch but not polled yet: the host must ring again.
      if (wasBatched && this.queues.arm(qid)) this.queues.kick(qid);
      return false;
    }
    this.hot.set(qid, performance.now());
    // A batched queue that went shallow keeps its EventIdx suppressed: it moves to polling.
    if (!polled && !wasBatched) this.queues.suppress(qid);
    this.schedule();
    return true;
  }

  /** SQ `qid` left the batch starved a moment ago: it rings its doorbells for now. */
  private rests(qid: number): boolean {
    const until = this.resting.get(qid);
    if (until === undefined) return false;
    if (performance.now() < until) return true;
    this.resting.delete(qid);
    return false;
  }

  /** At a collection that found new commands: true when the host has been waiting on us for several periods. */
  private starved(qid: number): boolean {
    const backlog = this.queues.backlog(qid);
    if (!backlog) return false;
    const outstanding = backlog.waiting + backlog.unconsumed;
    const seen = this.batchBacklog.get(qid) ?? { peak: 0, starved: 0 };
    seen.peak = Math.max(seen.peak, outstanding);
    seen.starved = backlog.unconsumed === 0 && backlog.waiting >= seen.peak ? seen.starved + 1 : 0;
    this.batchBacklog.set(qid, seen);
    return seen.starved >= STARVED_COLLECTIONS;
  }

  private stopPolling(qid: number): void {
    this.batchBacklog.delete(qid);
    const suppressed = this.hot.delete(qid) || this.batched.delete(qid);
    if (suppressed && this.queues.arm(qid)) this.queues.kick(qid);
  }

  private scheduleBatch(): void {
    if (this.batchTimer || this.batched.size === 0) return;
    // A µs timer: periods below a millisecond are kept (and, like the rest here, it does not keep a
    // stopping process alive).
    this.batchTimer = setTimeoutUs(this.collectBatches, this.batchMs * 1000);
  }

  private readonly collectBatches = (): void => {
    this.batchTimer = null;
    for (const qid of [...this.batched]) {
      const seen = this.queues.peekTail(qid);
      // Suspended, detached or deleted: no memory to touch (a resume publishes EventIdx anew).
      if (seen === 'gone') this.batched.delete(qid);
      else if (seen === 'moved') {
        // A host that waits for every period gets its doorbells back for a while.
        if (this.starved(qid)) {
          this.resting.set(qid, performance.now() + STARVED_REST_MS);
          this.queues.starvedOut(qid);
          // Arms EventIdx and fetches what is waiting.
          this.stopPolling(qid);
        } else {
          // The fetch ends in took(), which judges the depth again.
          this.queues.kick(qid);
        }
      }
      // Nothing came for a whole period: the next submission rings.
      else this.stopPolling(qid);
    }
    this.scheduleBatch();
  };

  private schedule(): void {
    if (this.scheduled || this.hot.size === 0) return;
    this.scheduled = true;
    // An immediate keeps libuv's poll phase from blocking: every loop turn still serves sockets.
    setImmediate(this.turn);
  }

  private readonly turn = (): void => {
    this.scheduled = false;
    const now = performance.now();
    for (const [qid, lastTook] of this.hot) {
      const seen = this.queues.peekTail(qid);
      if (seen === 'gone') {
        // Suspended, detached or deleted: no memory to touch. The streak stands for a resume.
        this.hot.delete(qid);
      } else if (seen === 'moved') {
        // The fetch ends in took(), which judges the depth.
        this.queues.kick(qid);
      } else if (!this.queues.worthPolling(qid)) {
        // Gone deep without new commands (completions that came later).
        this.release(qid);
      } else if (now - lastTook >= this.windowMs) {
        // Idle, not deep: the streak stands, and the next command that comes in is polled for again.
        this.stopPolling(qid);
      }
    }
    // On a host with few cores the guest's vCPU threads want this CPU too: polling must not take
    // it from them, only use it when nothing else would.
    if (this.hot.size > 0) native.yieldCpu();
    this.schedule();
  };
}
