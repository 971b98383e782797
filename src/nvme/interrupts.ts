// Raising a controller's interrupts in whichever mode the host enabled: per-CQ vectors batched per
// event-loop turn, coalesced as Interrupt Coalescing asks (coalescing.ts), INTMS/INTMC masking for
// MSI and INTx (Base §3.1.4.3/4), and INTx's re-assertion after QEMU re-arms the line. A silent
// (suspended) controller raises nothing: what is due when it goes silent is raised first, and its
// resume raises every vector whose queue still holds unconsumed completions.

import type { InterruptMode } from '../pci/function.js';
import { coalescingSettings, InterruptAggregator } from './coalescing.js';
import { INTX_REASSERT_GRACE_MS } from './policy.js';
import type { ControllerState } from './state.js';

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
  private intxRecheck: NodeJS.Timeout | null = null;
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
    for (const cq of this.host.state.completionQueues) if (cq && cq.interruptsEnabled && cq.head !== cq.tail) this.schedule(cq.vector);
  }

  /**
   * INTx is level-triggered: when the host re-arms it, assert again if completions still wait.
   * QEMU re-arms on *any* BAR access (its emulated EOI), another vCPU's SQ doorbell included,
   * usually just before the handler consumes what is pending. Re-asserting at once would make an
   * interrupt per stray EOI; a short grace lets the handler's CQ head arrive first, and still
   * catches an interrupt the stray EOI cleared before the guest took it.
   */
  intxRearmed(): void {
    if (this.host.interruptMode() !== 'intx' || this.intxRecheck) return;
    this.intxRecheck = setTimeout(() => {
      this.intxRecheck = null;
      if (this.host.interruptMode() === 'intx') this.raiseUnconsumed();
    }, INTX_REASSERT_GRACE_MS);
    this.intxRecheck.unref();
  }

  reset(): void {
    this.toRaise.clear();
    this.aggregator.clear();
  }

  dispose(): void {
    if (this.intxRecheck) clearTimeout(this.intxRecheck);
    this.intxRecheck = null;
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
    this.host.raise(vector);
  }
}
