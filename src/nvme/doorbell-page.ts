// A mappable doorbell page: BAR0's doorbells (Base §3.1.4 SQyTDBL/CQyHDBL) live in a sealed memfd
// the client maps into the guest (a sparse mmap area of BAR0), so a doorbell write is a plain
// store: no VM exit, no vfio-user message, no wake-up of this process. The controller polls the
// page instead, and every live queue's doorbell that differs from the value last taken goes
// through Doorbells.write as a trapped write would (validation, shadow doorbells, AERs included).
//
// The poll is adaptive: every event-loop turn while some doorbell moved within the poll window,
// every IDLE_POLL_MS otherwise. An idle controller costs a timer tick per millisecond; the first
// command after an idle spell waits up to IDLE_POLL_MS; a busy one costs a core's poll loop (it
// yields the CPU to any other runnable thread at every turn, as tail polling does).
//
// What the page cannot do: a store to the doorbell of a queue that does not exist is not seen
// (trapped, it is an Invalid Doorbell Register event), as with SPDK's mappable BAR0. And the
// page's values are guest state: a queue created starts its doorbells at 0, a loaded state writes
// its tails and heads back, publishing an EventIdx writes the known value first (doorbells.ts: the
// host's next store must differ from the page), and a suspend takes what the page holds before the
// state is saved.

import { performance } from 'node:perf_hooks';
import type { NativeAddon } from '../native.js';
import type { RegionInfo } from '../vfio-user/device.js';
import { Reg } from './spec.js';
import type { ControllerState } from './state.js';

/** How often an idle page is looked at. Node's timers go no finer. */
const IDLE_POLL_MS = 1;

export interface DoorbellPageHost {
  readonly state: ControllerState;
  /**
   * Whether the page is worth reading now: the controller is ready, not fatal, running and has a
   * client. The loop stops when it is not; poll() starts it again.
   */
  serving(): boolean;
  /** Doorbell register `index` (SQ tails even, CQ heads odd) was written with `value`. */
  write(index: number, value: number): void;
}

export class DoorbellPage {
  private readonly fd: number;
  private readonly mapping: ArrayBuffer;
  /** The page's doorbells as dwords, index 0 = SQ 0's tail. */
  private readonly doorbells: Uint32Array;
  /** Per doorbell, the value last taken from the page (or written there by us). */
  private readonly taken: Uint32Array;
  private readonly windowMs: number;
  /** Doorbell writes taken from the page, and written by message, since the client attached. */
  private fromPage = 0;
  private byMessage = 0;
  private lastMoved = 0;
  /** The loop runs (it stops by itself once doorbells no longer count). */
  private active = false;
  /** A turn is pending (an immediate or the idle timer). */
  private pending = false;
  private idleTimer: NodeJS.Timeout | null = null;

  /** `barSize` bytes of BAR0, doorbells from Reg.DOORBELLS (stride 4) to its end. */
  constructor(
    private readonly addon: NativeAddon,
    private readonly barSize: number,
    windowUs: number,
    private readonly host: DoorbellPageHost,
  ) {
    // Sealed: the client gets the fd, and a shrink under our mapping would fault this process.
    this.fd = addon.memfdCreate('nvme-doorbells', barSize, true);
    this.mapping = addon.mmap(this.fd, 0n, barSize, true);
    this.doorbells = new Uint32Array(this.mapping, Reg.DOORBELLS, (barSize - Reg.DOORBELLS) / 4);
    this.taken = new Uint32Array(this.doorbells.length);
    this.windowMs = windowUs / 1000;
  }

  /** BAR0's mmap offer: the whole BAR in the fd, only the doorbell pages mappable. */
  region(): NonNullable<RegionInfo['mmap']> {
    return { fd: this.fd, fileOffset: 0, areas: [{ offset: Reg.DOORBELLS, size: this.barSize - Reg.DOORBELLS }] };
  }

  /** Doorbell `index` holds `value` from now on (a queue created: 0; a state loaded: its tail or head). */
  set(index: number, value: number): void {
    if (index >= this.doorbells.length) return;
    this.doorbells[index] = value;
    this.taken[index] = value;
  }

  /**
   * Doorbell `index` is `value` as the host's shadow doorbell told the controller, which is about
   * to publish EventIdx. A store the page still shows unseen was served through the shadow: it
   * counts as a doorbell from the page, and keeps the poll loop busy as if the scan had seen it
   * (or a QD1 stream whose stores are all served that way would poll at the idle pace).
   */
  sync(index: number, value: number): void {
    if (index >= this.doorbells.length) return;
    if (this.doorbells[index] !== this.taken[index]) {
      this.fromPage++;
      this.lastMoved = performance.now();
    }
    this.set(index, value);
  }

  /**
   * Doorbell `index` was written by message (QEMU traps the page for a while after each INTx
   * interrupt). The register holds what was written last, however it came: a later store of the
   * value the page held before these messages (the queue wrapped meanwhile) must still read as a
   * change. Safe from reordering: QEMU sends BAR writes non-posted once a region is mappable.
   */
  trapped(index: number, value: number): void {
    this.byMessage++;
    this.set(index, value);
  }

  /** The client left: how it rang its doorbells (nothing when it rang none), and the counts start over. */
  clientLeft(): string | null {
    if (this.fromPage + this.byMessage === 0) return null;
    // Some by message are normal (the firmware's, under INTx); nearly all means QEMU never mapped the page.
    const summary = `doorbells from this client: ${this.fromPage} from the mapped page, ${this.byMessage} by message`;
    this.fromPage = 0;
    this.byMessage = 0;
    return summary;
  }

  /** A controller reset: no queue is left, every doorbell reads 0. */
  clear(): void {
    this.doorbells.fill(0);
    this.taken.fill(0);
  }

  /** Takes every live queue's doorbell that moved, if the page is served now; true when one did. */
  scan(): boolean {
    return this.host.serving() && this.takeMoved();
  }

  private takeMoved(): boolean {
    const { submissionQueues, completionQueues } = this.host.state;
    let moved = false;
    for (let qid = 0; qid < submissionQueues.length; qid++) if (submissionQueues[qid] && this.take(2 * qid)) moved = true;
    for (let qid = 0; qid < completionQueues.length; qid++) if (completionQueues[qid] && this.take(2 * qid + 1)) moved = true;
    return moved;
  }

  private take(index: number): boolean {
    const value = this.doorbells[index];
    if (value === undefined || value === this.taken[index]) return false;
    this.taken[index] = value;
    this.fromPage++;
    this.host.write(index, value);
    return true;
  }

  /** Starts the poll loop if it is not running (the controller became ready, was loaded or resumed, or got a client). */
  poll(): void {
    this.lastMoved = performance.now();
    if (this.active) return;
    this.active = true;
    // An immediate left over from a stopped loop carries on as this one.
    if (!this.pending) this.next('turn');
  }

  /** Stops the loop and unmaps the page (the controller is disposed). */
  dispose(): void {
    this.active = false;
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.idleTimer = null;
    this.pending = false;
    this.addon.munmap(this.mapping);
    this.addon.closeFd(this.fd);
  }

  private next(how: 'turn' | 'idle'): void {
    this.pending = true;
    if (how === 'turn') {
      setImmediate(this.turn);
      return;
    }
    this.idleTimer = setTimeout(this.turn, IDLE_POLL_MS);
    // Nothing here must keep a stopping process alive.
    this.idleTimer.unref();
  }

  private readonly turn = (): void => {
    this.pending = false;
    this.idleTimer = null;
    // Disabled, reset, fatal, suspended or without a client: poll() starts the loop anew.
    if (!this.active || !this.host.serving()) {
      this.active = false;
      return;
    }
    const now = performance.now();
    if (this.takeMoved()) this.lastMoved = now;
    if (now - this.lastMoved >= this.windowMs) {
      this.next('idle');
      return;
    }
    // Polling must not take the CPU from a guest's vCPU threads on a host with few cores.
    this.addon.yieldCpu();
    this.next('turn');
  };
}
