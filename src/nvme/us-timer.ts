// Timers with microsecond resolution, for what NVMe times in 100 µs units (Interrupt Coalescing's
// Aggregation Time, §5.27.1.9) and for batching periods below a millisecond: Node's setTimeout
// counts whole milliseconds. One process-wide timerfd, armed for the earliest deadline, serves
// every timer; like an unref'd setTimeout, a pending timer does not keep the process alive.

import { performance } from 'node:perf_hooks';
import { loadedNative, type FdWatcher, type NativeAddon } from '../native.js';

export interface UsTimer {
  /** performance.now() milliseconds at which it is due. */
  readonly due: number;
  readonly callback: () => void;
}

/** Timers due within this much of the earliest fire with it: one wake-up instead of several. */
const SLACK_MS = 0.01;

class TimerWheel {
  private readonly pending = new Set<UsTimer>();
  private readonly addon: NativeAddon;
  private readonly fd: number;
  private readonly watcher: FdWatcher;
  /** The deadline the timerfd is armed for (Infinity: disarmed). */
  private armedFor = Infinity;

  constructor() {
    this.addon = loadedNative();
    this.fd = this.addon.timerfdCreate();
    this.watcher = this.addon.watchFd(this.fd, this.fire);
    this.watcher.unref();
  }

  add(timer: UsTimer): void {
    this.pending.add(timer);
    if (timer.due < this.armedFor) this.arm(timer.due);
  }

  delete(timer: UsTimer): void {
    // The timerfd stays armed: a wake-up that finds nothing due re-arms for what is left.
    this.pending.delete(timer);
  }

  private arm(due: number): void {
    this.armedFor = due;
    this.addon.timerfdArm(this.fd, Math.max(0.001, (due - performance.now()) * 1000));
  }

  private readonly fire = (): void => {
    this.addon.eventfdRead(this.fd);
    this.armedFor = Infinity;
    const now = performance.now() + SLACK_MS;
    const ready: UsTimer[] = [];
    let next = Infinity;
    for (const timer of this.pending) {
      if (timer.due <= now) ready.push(timer);
      else if (timer.due < next) next = timer.due;
    }
    if (next < Infinity) this.arm(next);
    // In deadline order; a callback may add timers, or clear one that is ready too (it then stays silent).
    ready.sort((a, b) => a.due - b.due);
    for (const timer of ready) if (this.pending.delete(timer)) timer.callback();
  };
}

let wheel: TimerWheel | undefined;

/** Calls `callback` once, `us` microseconds from now (fractions of a millisecond kept). */
export function setTimeoutUs(callback: () => void, us: number): UsTimer {
  // The first call loads the addon: the deadline counts from after that.
  const timers = (wheel ??= new TimerWheel());
  const timer: UsTimer = { due: performance.now() + us / 1000, callback };
  timers.add(timer);
  return timer;
}

export function clearTimeoutUs(timer: UsTimer): void {
  wheel?.delete(timer);
}
