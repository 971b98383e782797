// Posting completion queue entries (Base §4.6): phase tags, per-CQ order, and completions held in
// state while their CQ is full, no client is attached or the controller is silent. The ring
// arithmetic is shared with every ring the controller writes with a phase tag (the Controller
// Data Queue too).

import { DmaError, type DmaSpace } from '../vfio-user/device.js';
import type { Interrupts } from './interrupts.js';
import { Cqe, CQE_SIZE } from './spec.js';
import type { CompletionQueueState, ControllerState, HeldCompletion } from './state.js';

/** A ring the device fills and the host drains, with a phase tag that flips on every wrap. */
export interface PhaseRing {
  base: number;
  /** Entries. */
  size: number;
  /** Next slot the device writes. */
  tail: number;
  /** Phase tag the next entry carries. */
  phase: number;
}

/** Takes the ring's next slot: its address and the phase tag to write there. */
export function claimSlot(ring: PhaseRing, entrySize: number): { addr: number; phase: number } {
  const slot = { addr: ring.base + ring.tail * entrySize, phase: ring.phase };
  ring.tail = (ring.tail + 1) % ring.size;
  if (ring.tail === 0) ring.phase ^= 1;
  return slot;
}

/** Counts message-based guest writes not yet acknowledged: a suspend waits until none is left. */
export class InFlightWrites {
  private count = 0;
  private waiters: Array<() => void> = [];

  track<T>(write: Promise<T>): Promise<T> {
    this.count++;
    return write.finally(() => {
      if (--this.count === 0) this.waiters.splice(0).forEach((wake) => wake());
    });
  }

  whenSettled(): Promise<void> | null {
    if (this.count === 0) return null;
    return new Promise((resolve) => this.waiters.push(resolve));
  }
}

export interface CompletionHost {
  readonly state: ControllerState;
  readonly interrupts: Interrupts;
  readonly writes: InFlightWrites;
  /** Guest memory, when completions may be written now (a client attached, not suspended). */
  postingDma(): DmaSpace | null;
  /** A fatal controller posts nothing more: the host must reset it, which discards the queues. */
  isFatal(): boolean;
  /** Bumped by every Controller Level Reset: a write of an older generation must not report. */
  generation(): number;
  /** The command behind `entry` is finished: its SQ slot is free again. */
  completionGone(entry: HeldCompletion): void;
  /** A completion is held behind a full CQ: the host's head may have moved without a doorbell. */
  completionHeld(cq: CompletionQueueState): void;
  /** A completion went into `cq`: the host will move its head. */
  completionPosted(cq: CompletionQueueState): void;
  fatal(reason: string): void;
}

export class CompletionPoster {
  constructor(private readonly host: CompletionHost) {}

  /**
   * Posts `entry`, or holds it while its CQ is full. `fromCallback`: the command finished in an I/O
   * callback of a later event-loop iteration (a file backend's threadpool result), whose interrupt
   * waits for the other results of that iteration (Interrupts.completionPosted).
   */
  post(entry: HeldCompletion, fromCallback = false): void {
    const state = this.host.state;
    const cq = state.completionQueues[entry.cqid];
    if (!cq || this.host.isFatal()) {
      this.host.completionGone(entry);
      return;
    }
    // Keep completion order per CQ: once one waits, later ones wait behind it.
    if (!this.host.postingDma() || isFull(cq) || state.heldCompletions.some((h) => h.cqid === cq.qid)) {
      state.heldCompletions.push(entry);
      this.host.completionHeld(cq);
      return;
    }
    this.write(cq, entry, fromCallback);
  }

  /** Posts what waits for `cq` while it has room. */
  releaseHeld(cq: CompletionQueueState): void {
    const held = this.host.state.heldCompletions;
    while (this.host.postingDma() && !isFull(cq)) {
      const index = held.findIndex((h) => h.cqid === cq.qid);
      if (index < 0) return;
      const [entry] = held.splice(index, 1);
      this.write(cq, entry!, false);
    }
  }

  releaseAll(): void {
    for (const cq of this.host.state.completionQueues) if (cq) this.releaseHeld(cq);
  }

  private write(cq: CompletionQueueState, entry: HeldCompletion, fromCallback: boolean): void {
    const dma = this.host.postingDma()!;
    const sq = this.host.state.submissionQueues[entry.sqid];
    const sqHead = sq ? sq.head : 0;
    const { addr, phase } = claimSlot(cq, CQE_SIZE);
    // Phase tag and status share the last dword, stored last: the host polls the phase, and x86
    // makes stores visible in program order.
    const statusPhase = ((entry.status << Cqe.STATUS_SHIFT) | phase) & 0xffff;
    // The fast path stores in place synchronously; remote DMA is a message round trip.
    let stored: boolean | undefined;
    try {
      stored = dma.direct(addr, CQE_SIZE, true, (view) => {
        fillCqe(new DataView(view.buffer, view.byteOffset, CQE_SIZE), entry, sqHead, statusPhase);
        return true;
      });
    } catch (err) {
      if (!(err instanceof DmaError)) throw err;
      // The entry landed in the guard's zero pages: the host never sees it and the queue is lost.
      this.host.fatal(`CQ ${cq.qid} post: guest memory was truncated under the completion`);
      return;
    }
    if (stored) {
      this.posted(cq, entry, fromCallback);
      return;
    }
    const cqe = new Uint8Array(CQE_SIZE);
    fillCqe(new DataView(cqe.buffer), entry, sqHead, statusPhase);
    const generation = this.host.generation();
    this.host.writes.track(dma.write(addr, cqe)).then(
      () => {
        if (generation === this.host.generation()) this.posted(cq, entry, false);
      },
      (err: unknown) => {
        if (generation === this.host.generation()) this.host.fatal(`CQ ${cq.qid} post: ${(err as Error).message}`);
      },
    );
  }

  /** The entry is in the CQ: its command is finished, and the CQ's vector is due. */
  private posted(cq: CompletionQueueState, entry: HeldCompletion, fromCallback: boolean): void {
    this.host.completionGone(entry);
    this.host.completionPosted(cq);
    if (cq.interruptsEnabled) this.host.interrupts.completionPosted(cq.vector, cq.qid === 0, fromCallback);
  }
}

/** A completion queue entry (Base §4.6, Figure 92) into `v`, the status and phase dword last. */
function fillCqe(v: DataView, entry: HeldCompletion, sqHead: number, statusPhase: number): void {
  v.setUint32(Cqe.DW0, entry.dw0 >>> 0, true);
  v.setUint32(Cqe.DW1, entry.dw1 >>> 0, true);
  v.setUint32(Cqe.SQHD, (sqHead | (entry.sqid << 16)) >>> 0, true);
  v.setUint32(Cqe.CID, (entry.cid | (statusPhase << 16)) >>> 0, true);
}

export function isFull(cq: CompletionQueueState): boolean {
  return (cq.tail + 1) % cq.size === cq.head;
}
