// Doorbell writes (Base §3.1.4 "SQyTDBL"/"CQyHDBL") and the Doorbell Buffer (§5.8: shadow
// doorbells and EventIdx). With a doorbell buffer the shadow values in guest memory are
// authoritative: posted MMIO writes can arrive after newer shadow values (qemu-11-facts §7) and
// must never move a queue backwards.

import { performance } from 'node:perf_hooks';
import type { Logger } from '../log.js';
import type { InterruptMode } from '../pci/function.js';
import { DmaError, type DmaSpace } from '../vfio-user/device.js';
import type { CompletionPoster, InFlightWrites } from './completions.js';
import type { AsyncEvents } from './events.js';
import type { Interrupts } from './interrupts.js';
import { andThen, isPromise, runRounds, type MaybePromise } from './maybe-async.js';
import { AsyncEventInfo } from './spec.js';
import type { CompletionQueueState, ControllerState, SubmissionQueueState } from './state.js';
import { STARVED_REST_MS, TailPolling } from './tail-polling.js';
import { setTimeoutUs, usTimersAwake, type UsTimer } from './us-timer.js';

export interface DoorbellHost {
  readonly state: ControllerState;
  readonly log: Logger;
  readonly events: AsyncEvents;
  readonly poster: CompletionPoster;
  readonly interrupts: Interrupts;
  readonly writes: InFlightWrites;
  /** Doorbells count only while the controller is ready and not fatal. */
  acceptsDoorbells(): boolean;
  /** Guest memory, when the controller may touch it now (attached and not suspended). */
  hostDma(): DmaSpace | null;
  interruptMode(): InterruptMode;
  /** New entries may be in `qid`: fetch. */
  kick(qid: number): void;
  fatal(reason: string): void;
  /** How long a busy SQ's shadow tail is polled after it last took commands (µs; 0: never). */
  readonly tailPollUs: number;
  /** How often a deep SQ's commands are collected with its doorbells held back (ms; 0: never). */
  readonly deepQueueBatchMs: number;
  /**
   * Doorbell register `index` reads `value` from now on (a mapped doorbell page must show it):
   * 'start' for a queue created or loaded, 'known' for what the shadow doorbell told us.
   */
  readonly registerValue: ((index: number, value: number, why: 'start' | 'known') => void) | null;
}

/** How often watched shadow doorbells are looked at again (watchHead, watchTail). */
const SHADOW_CHECK_US = 1000;
/**
 * How much earlier a check may run when the process is awake anyway (us-timer.ts): a busy queue's
 * checks then ride on its doorbells' or batches' wake-ups instead of waking the process every
 * millisecond on their own.
 */
const SHADOW_CHECK_SLACK_US = 500;

export class Doorbells {
  /** CQs whose shadow head is being read, and whether to read it again when done. */
  private readonly headRefresh = new Map<number, { again: boolean }>();
  /** CQs whose head EventIdx is published once the host stops moving the head (watchHead). */
  private readonly quietHeads = new Set<number>();
  /**
   * SQs whose shadow tail is read once more at a check (watchTail), and when each was last fetched
   * (performance.now() ms): the re-read comes at least SHADOW_CHECK_SLACK_US after that, even when
   * a check runs sooner.
   */
  private readonly tailChecks = new Map<number, number>();
  private shadowTimer: UsTimer | null = null;
  private readonly polling: TailPolling;
  /** SQ ids whose batching was logged: once per id, not at every deep spell. */
  private readonly batchingLogged = new Set<number>();
  /** SQ ids whose leaving the batch starved was logged: once per id. */
  private readonly starvedLogged = new Set<number>();

  constructor(private readonly host: DoorbellHost) {
    this.polling = new TailPolling(host.tailPollUs, host.deepQueueBatchMs, {
      peekTail: (qid) => this.peekTail(qid),
      worthPolling: (qid) => this.shallow(qid),
      suppress: (qid) => {
        const sq = host.state.submissionQueues[qid];
        if (sq) void this.publishEventIdx(qid, false, oneBehindTail(sq));
      },
      batching: (qid) => {
        if (this.batchingLogged.has(qid)) return;
        this.batchingLogged.add(qid);
        host.log.info(`SQ ${qid} is deep: its commands are collected every ${host.deepQueueBatchMs} ms, its doorbells held back (--batch-ms)`);
      },
      starvedOut: (qid) => {
        if (this.starvedLogged.has(qid)) return;
        this.starvedLogged.add(qid);
        host.log.info(`SQ ${qid}: the host reaps at once and waits for every batch, so its doorbells ring again (batching retried every ${STARVED_REST_MS} ms)`);
      },
      arm: (qid) => {
        const sq = host.state.submissionQueues[qid];
        if (!sq) return false;
        // Stored by message (write-through during a migration): let a fetch round re-read after it.
        if (isPromise(this.publishEventIdx(qid, false, sq.tail))) return true;
        return this.peekTail(qid) === 'moved';
      },
      kick: (qid) => host.kick(qid),
      backlog: (qid) => {
        const sq = host.state.submissionQueues[qid];
        const unconsumed = this.unconsumed(qid);
        const tail = this.shadowInPlace(qid, false);
        if (!sq || unconsumed === null || tail === null || tail === undefined || tail >= sq.size) return null;
        return { waiting: (tail - sq.tail + sq.size) % sq.size, unconsumed };
      },
    });
  }

  /** A write to doorbell register `index` (SQ tails even, CQ heads odd). */
  write(index: number, value: number): void {
    const host = this.host;
    // The process is awake for this doorbell (a message, or the mapped page's poll): checks due soon run now.
    usTimersAwake();
    if (!host.acceptsDoorbells()) return;
    const qid = index >>> 1;
    const state = host.state;
    if ((index & 1) === 0) {
      const sq = state.submissionQueues[qid];
      if (!sq) return this.invalid(AsyncEventInfo.INVALID_DOORBELL_REGISTER, qid);
      if (value >= sq.size) return this.invalid(AsyncEventInfo.INVALID_DOORBELL_VALUE, qid);
      // With a doorbell buffer the shadow is authoritative: this posted MMIO value may be older
      // than a shadow value already read, and taking it would move the tail backwards.
      if (!this.usesShadow(qid)) sq.tail = value;
      host.kick(qid);
      // With shadow doorbells a CQ head update may have skipped MMIO: look while completions wait.
      const cq = state.completionQueues[sq.cqid];
      if (cq && state.heldCompletions.some((h) => h.cqid === cq.qid)) this.refreshShadowHead(cq);
      return;
    }
    const cq = state.completionQueues[qid];
    if (!cq) return this.invalid(AsyncEventInfo.INVALID_DOORBELL_REGISTER, qid);
    if (this.usesShadow(qid)) {
      // The shadow head is authoritative and may already be newer than this posted value.
      if (value >= cq.size) return this.invalid(AsyncEventInfo.INVALID_DOORBELL_VALUE, qid);
      // Completions waiting for room need the new head now; otherwise it can wait for a quiet moment.
      if (state.heldCompletions.some((h) => h.cqid === qid)) this.refreshShadowHead(cq);
      else this.watchHead(cq);
      return;
    }
    if (!validCqHead(cq, value)) return this.invalid(AsyncEventInfo.INVALID_DOORBELL_VALUE, qid);
    cq.head = value;
    void this.publishEventIdx(cq.qid, true, value);
    host.poster.releaseHeld(cq);
    if (host.interruptMode() === 'intx' && cq.interruptsEnabled && cq.head !== cq.tail) host.interrupts.schedule(cq.vector);
  }

  /** Queue `qid` was created (at 0) or loaded (at its tail or head): its doorbell register starts there. */
  started(qid: number, completion: boolean, value: number): void {
    this.host.registerValue?.(2 * qid + (completion ? 1 : 0), value, 'start');
  }

  configureBuffer(shadow: number, eventIdx: number): void {
    this.host.state.doorbellBuffer = { shadow, eventIdx };
    this.publishAll();
  }

  /** Writes every I/O queue's EventIdx (a new buffer, or a resume after a silent spell). */
  publishAll(): void {
    for (const sq of this.host.state.submissionQueues) if (sq && sq.qid > 0) void this.publishEventIdx(sq.qid, false, sq.tail);
    for (const cq of this.host.state.completionQueues) if (cq && cq.qid > 0) void this.publishEventIdx(cq.qid, true, cq.head);
  }

  usesShadow(qid: number): boolean {
    return this.host.state.doorbellBuffer !== null && qid > 0;
  }

  /**
   * EventIdx = the last value we saw: the host then rings the (trapped) doorbell for every update,
   * so trapped doorbells keep working. Admin queues are outside the buffer (as Linux uses it).
   * Done in place when the buffer is mapped; a message round trip otherwise.
   */
  publishEventIdx(qid: number, completion: boolean, value: number): MaybePromise<void> {
    const buffer = this.host.state.doorbellBuffer;
    const dma = this.host.hostDma();
    if (!buffer || qid === 0 || !dma) return;
    // A mapped doorbell page must read what we know before the host may ring again, or its next
    // store could equal a stale value there and go unseen (the host stores only when it passes
    // EventIdx, and may not have for a long time). A store this overwrites is in the host's shadow
    // doorbell, which every caller reads after publishing.
    const registerValue = this.host.registerValue;
    if (registerValue) {
      const known = completion ? this.host.state.completionQueues[qid]?.head : this.host.state.submissionQueues[qid]?.tail;
      if (known !== undefined) registerValue(2 * qid + (completion ? 1 : 0), known, 'known');
    }
    const addr = buffer.eventIdx + slot(qid, completion);
    const fail = (err: unknown): void => this.host.fatal(`EventIdx write: ${(err as Error).message}`);
    let stored: boolean;
    try {
      // One 32-bit store: the host reads EventIdx as a dword while we write it. The store is also
      // a full fence (Atomics.store: xchg on x86), the other half of Linux's mb() between its
      // shadow write and its EventIdx read: the shadow doorbell we read next cannot be older.
      stored = dma.storeWord(addr, value);
    } catch (err) {
      if (!(err instanceof DmaError)) throw err;
      fail(err);
      return;
    }
    if (stored) return;
    const bytes = new Uint8Array(4);
    new DataView(bytes.buffer).setUint32(0, value, true);
    return this.host.writes.track(dma.write(addr, bytes)).then(undefined, fail);
  }

  /**
   * Publishes our view of the tail (one behind it while the SQ is polled, so the host does not
   * ring), then re-reads the shadow tail; true when it moved.
   */
  refreshShadowTail(sq: SubmissionQueueState): MaybePromise<boolean> {
    if (!this.usesShadow(sq.qid)) return false;
    const stillThere = (): boolean => this.host.state.submissionQueues[sq.qid] === sq;
    const eventIdx = this.polling.isPolled(sq.qid) ? oneBehindTail(sq) : sq.tail;
    return andThen(this.publishEventIdx(sq.qid, false, eventIdx), () =>
      andThen(this.movedShadow(sq.qid, false, sq.tail, stillThere, (tail) => tail < sq.size), (tail) => {
        if (tail === null) return false;
        sq.tail = tail;
        return true;
      }),
    );
  }

  /**
   * Queue `qid`'s shadow doorbell when it differs from `current`, the queue is still there and the
   * value is `valid` for it; null otherwise (an invalid value is reported to the host).
   */
  private movedShadow(qid: number, completion: boolean, current: number, stillThere: () => boolean, valid: (value: number) => boolean): MaybePromise<number | null> {
    return andThen(this.readShadow(qid, completion), (value) => {
      if (value === null || value === current || !stillThere()) return null;
      if (valid(value)) return value;
      this.invalid(AsyncEventInfo.INVALID_DOORBELL_VALUE, qid);
      return null;
    });
  }

  /**
   * Takes the host's CQ head from the shadow doorbell and publishes it as EventIdx, so the host's
   * next head update rings the trapped doorbell again. That MMIO write is also QEMU's emulated EOI
   * for INTx: without it a level interrupt would stay asserted. Synchronous while the buffer is
   * mapped; after publishing it reads the head once more, since the host may have moved it before
   * it saw the new EventIdx.
   */
  refreshShadowHead(cq: CompletionQueueState): void {
    if (!this.usesShadow(cq.qid)) return;
    // One reader per CQ: with message-based DMA an older read could resolve after a newer one
    // and move the head backwards.
    const running = this.headRefresh.get(cq.qid);
    if (running) {
      running.again = true;
      return;
    }
    const refresh = { again: true };
    this.headRefresh.set(cq.qid, refresh);
    this.headRounds(cq, refresh);
  }

  private headRounds(cq: CompletionQueueState, refresh: { again: boolean }): void {
    runRounds(
      refresh,
      () => this.headRound(cq),
      () => this.headRefresh.delete(cq.qid),
      (err) => {
        this.headRefresh.delete(cq.qid);
        this.host.fatal(`CQ ${cq.qid} head refresh: ${(err as Error).stack ?? String(err)}`);
      },
    );
  }

  /** Reads the shadow head once; when it moved, takes it, publishes it and posts what waited for room. */
  private headRound(cq: CompletionQueueState): MaybePromise<boolean> {
    return andThen(this.takeShadowHead(cq), (moved) => {
      if (!moved) return false;
      return andThen(this.publishEventIdx(cq.qid, true, cq.head), () => {
        this.host.poster.releaseHeld(cq);
        return true;
      });
    });
  }

  /** Takes the shadow head as the CQ's head if it moved (validly); true when it did. */
  private takeShadowHead(cq: CompletionQueueState): MaybePromise<boolean> {
    const stillThere = (): boolean => this.host.state.completionQueues[cq.qid] === cq;
    return andThen(this.movedShadow(cq.qid, true, cq.head, stillThere, (head) => validCqHead(cq, head)), (head) => {
      if (head === null) return false;
      cq.head = head;
      return true;
    });
  }

  /**
   * Completions went to `cq`, or the host rang its head doorbell with nothing waiting for room:
   * its head is taken and published as EventIdx once the host has stopped moving it, checked
   * every SHADOW_CHECK_US. While completions flow the host's head runs past a stale EventIdx and
   * rings no CQ doorbell (a VM exit and a socket message each); a CQ that looks full reads the
   * shadow head at once (completionHeld), and an idle one ends with EventIdx equal to the shadow.
   */
  watchHead(cq: CompletionQueueState): void {
    if (!this.usesShadow(cq.qid)) return;
    this.quietHeads.add(cq.qid);
    this.armShadowCheck();
  }

  /**
   * SQ `qid` took commands: read its shadow tail once more at the next check. A host that follows
   * EventIdx rings for whatever it submits after we published it; this is for one that moves the
   * shadow tail without looking, whose commands are then taken within a check period.
   */
  watchTail(qid: number): void {
    if (!this.usesShadow(qid)) return;
    if (this.polling.enabled && this.peekTail(qid) !== 'gone' && this.polling.took(qid)) return;
    this.tailChecks.set(qid, performance.now());
    this.armShadowCheck();
  }

  private armShadowCheck(): void {
    if (this.shadowTimer) return;
    // Like every µs timer, it does not keep a stopping process alive.
    this.shadowTimer = setTimeoutUs(this.checkShadows, SHADOW_CHECK_US, SHADOW_CHECK_SLACK_US);
  }

  private readonly checkShadows = (): void => {
    this.shadowTimer = null;
    // A check may run the moment after a fetch asked for one (slack): a tail gets its re-read only
    // once the host had time to move it, or it would be read once, too early, and then forgotten.
    const readFrom = performance.now() - SHADOW_CHECK_SLACK_US / 1000;
    const tails = [...this.tailChecks].filter(([, since]) => since <= readFrom).map(([qid]) => qid);
    for (const qid of tails) this.tailChecks.delete(qid);
    for (const qid of tails) this.host.kick(qid);
    this.publishQuietHeads();
    if (this.tailChecks.size > 0) this.armShadowCheck();
  };

  private publishQuietHeads(): void {
    for (const qid of [...this.quietHeads]) {
      const cq = this.host.state.completionQueues[qid];
      if (!cq || !this.usesShadow(qid) || !this.host.hostDma()) {
        this.quietHeads.delete(qid);
        continue;
      }
      const moved = this.takeShadowHead(cq);
      if (isPromise(moved)) {
        // Message-based DMA: the ordinary refresh publishes as it goes.
        this.quietHeads.delete(qid);
        this.refreshShadowHead(cq);
        continue;
      }
      if (moved) {
        this.host.poster.releaseHeld(cq);
        continue; // still moving: look again at the next check
      }
      // Quiet since the last check: publish, then look once more for a move that raced with it.
      this.quietHeads.delete(qid);
      void this.publishEventIdx(qid, true, cq.head);
      const raced = this.takeShadowHead(cq);
      if (raced === true) {
        this.host.poster.releaseHeld(cq);
        this.quietHeads.add(qid);
      }
    }
    if (this.quietHeads.size > 0) this.armShadowCheck();
  }

  /**
   * SQ `qid`'s shadow tail against the tail we hold, read in place only; 'gone' when that cannot
   * be done now. An invalid value counts as 'still': the fetch loop reports it once.
   */
  private peekTail(qid: number): 'moved' | 'still' | 'gone' {
    const sq = this.host.state.submissionQueues[qid];
    if (!sq || !this.host.acceptsDoorbells()) return 'gone';
    const value = this.shadowInPlace(qid, false);
    if (value === null || value === undefined) return 'gone';
    return value !== sq.tail && value < sq.size ? 'moved' : 'still';
  }

  /**
   * SQ `qid` is shallow: its CQ holds at most one completion the host has not consumed (by the
   * shadow head, read in place). A host at queue depth 1 always is; one that keeps many commands
   * in flight is not, as soon as the controller completes faster than the host reaps.
   */
  private shallow(qid: number): boolean {
    const unconsumed = this.unconsumed(qid);
    return unconsumed !== null && unconsumed <= 1;
  }

  /** Completions SQ `qid`'s CQ holds that the host has not consumed (by its shadow head, read in place); null when unknown. */
  private unconsumed(qid: number): number | null {
    const state = this.host.state;
    const cq = state.completionQueues[state.submissionQueues[qid]?.cqid ?? -1];
    const head = cq ? this.shadowInPlace(cq.qid, true) : null;
    if (!cq || head === null || head === undefined || head >= cq.size) return null;
    return (cq.tail - head + cq.size) % cq.size;
  }

  /** A shadow doorbell's value: read in place when mapped, by message otherwise; null when there is none. */
  private readShadow(qid: number, completion: boolean): MaybePromise<number | null> {
    const inPlace = this.shadowInPlace(qid, completion);
    if (inPlace !== undefined) return inPlace;
    const addr = this.host.state.doorbellBuffer!.shadow + slot(qid, completion);
    return this.host.hostDma()!.read(addr, 4).then(
      (bytes) => new DataView(bytes.buffer, bytes.byteOffset).getUint32(0, true),
      (err: unknown) => this.shadowFailed(err),
    );
  }

  /**
   * A shadow doorbell's value read in place; undefined when the buffer is not mapped (a message
   * must fetch it), null when there is none to read (no buffer, no guest memory, admin queue).
   */
  private shadowInPlace(qid: number, completion: boolean): number | null | undefined {
    const buffer = this.host.state.doorbellBuffer;
    const dma = this.host.hostDma();
    if (!buffer || qid === 0 || !dma) return null;
    try {
      return dma.loadWord(buffer.shadow + slot(qid, completion));
    } catch (err) {
      if (!(err instanceof DmaError)) throw err;
      return this.shadowFailed(err);
    }
  }

  private shadowFailed(err: unknown): null {
    this.host.fatal(`shadow doorbell read: ${(err as Error).message}`);
    return null;
  }

  private invalid(info: number, qid: number): void {
    this.host.log.debug(`invalid doorbell write (${info === AsyncEventInfo.INVALID_DOORBELL_REGISTER ? 'no such queue' : 'bad value'}) for queue ${qid}`);
    this.host.events.invalidDoorbell(info, qid);
  }
}

/** Byte offset of a queue's doorbell inside a doorbell buffer (stride 4, as CAP.DSTRD = 0). */
const slot = (qid: number, completion: boolean): number => (2 * qid + (completion ? 1 : 0)) * 4;

/** The EventIdx of a polled SQ: a host's next tail update never passes it, so it never rings. */
const oneBehindTail = (sq: SubmissionQueueState): number => (sq.tail + sq.size - 1) % sq.size;

/** A CQ head may only move forward over entries the controller posted. */
function validCqHead(cq: CompletionQueueState, head: number): boolean {
  if (head >= cq.size) return false;
  const posted = (cq.tail - cq.head + cq.size) % cq.size;
  return (head - cq.head + cq.size) % cq.size <= posted;
}
