// Raising a controller's interrupts in whichever mode the host enabled: per-CQ vectors batched per
// event-loop turn, coalesced as Interrupt Coalescing asks (coalescing.ts), INTMS/INTMC masking for
// MSI and INTx (Base §3.1.4.3/4), and INTx's re-assertion after QEMU re-arms the line. A silent
// (suspended) controller raises nothing: what is due when it goes silent is raised first, and its
// resume raises every vector whose queue still holds unconsumed completions.

import { performance } from 'node:perf_hooks';
import type { InterruptMode } from '../pci/function.js';
import { coalescingSettings, InterruptAggregator } from './coalescing.js';
import { INTX_REARM_DEADLINE_MS, INTX_REASSERT_GRACE_MS } from './policy.js';
import type { CompletionQueueState, ControllerState } from './state.js';

export interface InterruptHost {
  readonly state: ControllerState;
  interruptMode(): InterruptMode;
  /** Signals `vector` in the enabled mode (the PCI function folds it onto MSI/INTx). */
  raise(vector: number): void;
  touchesHost(): boolean;
}

export class Interrupts {
  private readonly toRaise = new Set<number>();
  private scheduled = false;
  private scheduledAfterIteration = false;
  /** The pending look at INTx (intxCheck), if any. */
  private intxRecheck: NodeJS.Timeout | null = null;
  /** When INTx was last triggered with QEMU not having re-armed it since (performance.now() ms); null: re-armed. */
  private intxTriggeredAt: number | null = null;
  /** An aggregation time ended: raise now (its timer or immediate already waited for the turn to end). */
  private readonly aggregator = new InterruptAggregator((vector) => {
    this.toRaise.add(vector);
    this.raiseScheduled();
  });

  constructor(private readonly host: InterruptHost) {}

  /**
   * A completion entry was posted to a CQ of `vector` with interrupts enabled. The Admin CQ and
   * vectors with Coalescing Disable interrupt at once; I/O CQs otherwise wait as Interrupt
   * Coalescing's threshold and time ask.
   */
  completionPosted(vector: number, adminQueue: boolean, fromCallback = false): void {
    const features = this.host.state.features;
    const settings = adminQueue || features.coalescingDisabled.includes(vector) ? null : coalescingSettings(features.interruptCoalescing);
    if (settings && !this.aggregator.add(vector, settings)) return;
    // A completion from an I/O callback of its own (a file backend's threadpool result) shares its
    // interrupt with the other results libuv hands over in the same iteration: each callback
    // drains the microtasks, so "end of this turn" would mean one interrupt per result.
    if (fromCallback && !adminQueue) this.scheduleAfterIteration(vector);
    else this.schedule(vector);
  }

  /**
   * Raises `vector` at the end of this turn: everything posted in the same event-loop turn shares
   * one interrupt per vector.
   */
  schedule(vector: number): void {
    this.toRaise.add(vector);
    if (this.scheduled) return;
    this.scheduled = true;
    queueMicrotask(() => this.raiseScheduled());
  }

  /** Raises `vector` once the event loop has handled every callback that is ready now (its check phase). */
  private scheduleAfterIteration(vector: number): void {
    this.toRaise.add(vector);
    if (this.scheduledAfterIteration) return;
    this.scheduledAfterIteration = true;
    setImmediate(() => {
      this.scheduledAfterIteration = false;
      this.raiseScheduled();
    });
  }

  /** Raises now what is due or gathering (a controller about to go silent). */
  flush(): void {
    for (const vector of this.aggregator.takeAll()) this.toRaise.add(vector);
    this.raiseScheduled();
  }

  private raiseScheduled(): void {
    this.scheduled = false;
    if (this.toRaise.size === 0) return;
    const vectors = [...this.toRaise];
    this.toRaise.clear();
    for (const v of vectors) {
      this.aggregator.covered(v);
      this.fire(v);
    }
  }

  /** INTMS: under MSI-X the host masks in the MSI-X table instead. */
  mask(bits: number): void {
    if (this.host.interruptMode() === 'msix') return;
    const r = this.host.state.registers;
    r.intms = (r.intms | bits) >>> 0;
  }

  /** INTMC: unmasks and raises what fired while masked. */
  unmask(bits: number): void {
    if (this.host.interruptMode() === 'msix') return;
    const state = this.host.state;
    state.registers.intms = (state.registers.intms & ~bits) >>> 0;
    const release = state.pendingInterrupts.filter((bit) => (bits >>> bit) & 1);
    state.pendingInterrupts = state.pendingInterrupts.filter((bit) => !((bits >>> bit) & 1));
    for (const bit of release) this.fire(bit);
  }

  /** Every vector whose CQ holds completions the host has not consumed (resume, INTx re-arm). */
  raiseUnconsumed(): void {
    for (const cq of this.host.state.completionQueues) if (cq && awaitsInterrupt(cq)) this.schedule(cq.vector);
  }

  /**
   * INTx is level-triggered, and QEMU lowers the line only on a BAR access (its emulated EOI),
   * then re-arms it (this call). A trigger that reaches QEMU after the handler consumed what it
   * was for leaves the line up with nothing pending: it fires until some BAR access, and when no
   * I/O follows, until Linux disables it ("nobody cared"). So INTx is never triggered at once:
   * intxCheck looks INTX_REASSERT_GRACE_MS later, when the handler's CQ head has arrived, and
   * triggers only for completions still unconsumed, and only on a re-armed line. The same look
   * follows every re-arm, stray ones (another vCPU's SQ doorbell) included.
   */
  intxRearmed(): void {
    this.intxTriggeredAt = null;
    this.cancelIntxCheck();
    if (this.host.interruptMode() === 'intx') this.lookAtIntx(INTX_REASSERT_GRACE_MS);
  }

  private cancelIntxCheck(): void {
    if (this.intxRecheck) clearTimeout(this.intxRecheck);
    this.intxRecheck = null;
  }

  private lookAtIntx(afterMs: number): void {
    if (this.intxRecheck) return;
    this.intxRecheck = setTimeout(this.intxCheck, afterMs);
    this.intxRecheck.unref();
  }

  private readonly intxCheck = (): void => {
    this.intxRecheck = null;
    if (!this.host.touchesHost() || this.host.interruptMode() !== 'intx') return;
    const state = this.host.state;
    const due = state.completionQueues.find((cq) => cq && awaitsInterrupt(cq) && !(state.registers.intms & (1 << (cq.vector & 31))));
    if (!due) return;
    const now = performance.now();
    if (this.intxTriggeredAt !== null && now - this.intxTriggeredAt < INTX_REARM_DEADLINE_MS) {
      // The line is still up: its re-arm looks again. The deadline covers a re-arm that never comes.
      this.lookAtIntx(INTX_REARM_DEADLINE_MS - (now - this.intxTriggeredAt));
      return;
    }
    this.intxTriggeredAt = now;
    this.host.raise(due.vector);
  };

  reset(): void {
    this.toRaise.clear();
    this.aggregator.clear();
  }

  dispose(): void {
    this.cancelIntxCheck();
    this.aggregator.clear();
  }

  private fire(vector: number): void {
    if (!this.host.touchesHost()) return;
    const mode = this.host.interruptMode();
    if (mode === 'none') return;
    if (mode !== 'msix') {
      // INTMS masks MSI and INTx per vector; a masked vector is remembered and raised on INTMC.
      const bit = vector & 31;
      const state = this.host.state;
      if (state.registers.intms & (1 << bit)) {
        if (!state.pendingInterrupts.includes(bit)) state.pendingInterrupts.push(bit);
        return;
      }
    }
    if (mode === 'intx') this.lookAtIntx(INTX_REASSERT_GRACE_MS);
    else this.host.raise(vector);
  }
}

/** A CQ that interrupts and holds completions the host has not consumed. */
const awaitsInterrupt = (cq: CompletionQueueState): boolean => cq.interruptsEnabled && cq.head !== cq.tail;
