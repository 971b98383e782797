// Timers with microsecond resolution, for what NVMe times in 100 µs units (Interrupt Coalescing's
// Aggregation Time, §5.27.1.9) and for batching periods below a millisecond: Node's setTimeout
// counts whole milliseconds. One process-wide timerfd, armed for the earliest deadline, serves
// every timer; like an unref'd setTimeout, a pending timer does not keep the process alive.
//
// A timer may also take slack (Linux's hrtimer ranges, timer_slack): it then runs at the first
// moment this process is awake anyway from `due - slack` on, and wakes it only at `due`. A sleep
// and wake-up costs this process more CPU than most of what it does awake (bench/wake-floor.ts:
// about 40 µs of Node on the project's machines), so a periodic check that a busy process does
// while awake for doorbells or a batch costs it no wake-up of its own. Wake-ups other than this
// module's own tell it through awake().

import { performance } from 'node:perf_hooks';
import { loadedNative, type FdWatcher, type NativeAddon } from '../native.js';

export interface UsTimer {
  /** performance.now() milliseconds at which it is due: the latest it runs (give or take the kernel). */
  readonly due: number;
  /** The earliest it may run (performance.now() ms): `due` less its slack. */
  readonly earliest: number;
  readonly callback: () => void;
}

/** Timers due within this much of the earliest fire with it: one wake-up instead of several. */
const FIRE_TOGETHER_MS = 0.01;

class TimerWheel {
  private readonly pending = new Set<UsTimer>();
  private readonly addon: NativeAddon;
  private readonly fd: number;
  private readonly watcher: FdWatcher;
  /** The deadline the timerfd is armed for (Infinity: disarmed). */
  private armedFor = Infinity;
  /** No pending timer with slack may run before this (performance.now() ms; Infinity: none pending). */
  private earliestRunnable = Infinity;
  /** A microtask will run what awake() found runnable. */
  private awakeQueued = false;
  /** run() is calling timers back. */
  private running = false;

  constructor() {
    this.addon = loadedNative();
    this.fd = this.addon.timerfdCreate();
    this.watcher = this.addon.watchFd(this.fd, this.fire);
    this.watcher.unref();
  }

  add(timer: UsTimer): void {
    this.pending.add(timer);
    if (timer.earliest < timer.due && timer.earliest < this.earliestRunnable) this.earliestRunnable = timer.earliest;
    // Added by a timer's callback: run() arms once the callbacks are done, with one syscall at most.
    if (!this.running && timer.due < this.armedFor) this.arm(timer.due);
  }

  /** This process is awake for something else: timers whose slack has begun run before it sleeps (only those). */
  awake(): void {
    // Not from a timer's callback: one that re-adds itself with all its time as slack would loop.
    if (this.awakeQueued || this.running || performance.now() < this.earliestRunnable) return;
    this.awakeQueued = true;
    // After the callback that woke us (a socket's, a ring's) returns, not inside it.
    queueMicrotask(this.runAwake);
  }

  private readonly runAwake = (): void => {
    this.awakeQueued = false;
    this.run(performance.now(), true);
  };

  delete(timer: UsTimer): void {
    if (!this.pending.delete(timer)) return;
    // The timerfd armed for this one would wake the process for nothing: a syscall now is cheaper.
    // (From a callback, run() re-arms once its callbacks are done.)
    if (!this.running && timer.due === this.armedFor) this.rearm();
  }

  /** Arms the timerfd for `due`, or disarms it (Infinity). */
  private arm(due: number): void {
    this.armedFor = due;
    this.addon.timerfdArm(this.fd, due === Infinity ? 0 : Math.max(0.001, (due - performance.now()) * 1000));
  }

  private readonly fire = (): void => {
    this.addon.eventfdRead(this.fd);
    this.armedFor = Infinity;
    this.run(performance.now() + FIRE_TOGETHER_MS, false);
  };

  /**
   * Runs the timers that may run at `now` (with `slackOnly`, those that took slack: a timer without
   * keeps its moment, from the timerfd, as a batch period or an aggregation time must), then arms
   * the timerfd for the earliest due of what is left.
   */
  private run(now: number, slackOnly: boolean): void {
    const ready: UsTimer[] = [];
    for (const timer of this.pending) if (timer.earliest <= now && (!slackOnly || timer.earliest < timer.due)) ready.push(timer);
    // In deadline order; a callback may add timers, or clear one that is ready too (it then stays silent).
    ready.sort((a, b) => a.due - b.due);
    this.running = true;
    try {
      for (const timer of ready) if (this.pending.delete(timer)) timer.callback();
    } finally {
      this.running = false;
      this.rearm();
    }
  }

  private rearm(): void {
    let nextDue = Infinity;
    let nextEarliest = Infinity;
    for (const timer of this.pending) {
      if (timer.due < nextDue) nextDue = timer.due;
      if (timer.earliest < timer.due && timer.earliest < nextEarliest) nextEarliest = timer.earliest;
    }
    this.earliestRunnable = nextEarliest;
    // Run early, a timer must not wake us at its due all the same: the timerfd follows what is left.
    if (nextDue !== this.armedFor) this.arm(nextDue);
  }
}

let wheel: TimerWheel | undefined;

/**
 * Calls `callback` once, `us` microseconds from now (fractions of a millisecond kept); with
 * `slackUs`, as early as that much before, if this process is awake then anyway.
 */
export function setTimeoutUs(callback: () => void, us: number, slackUs = 0): UsTimer {
  // The first call loads the addon: the deadline counts from after that.
  const timers = (wheel ??= new TimerWheel());
  const due = performance.now() + us / 1000;
  const timer: UsTimer = { due, earliest: due - Math.min(Math.max(slackUs, 0), us) / 1000, callback };
  timers.add(timer);
  return timer;
}

/**
 * This process was woken by something other than a timer of this module (a doorbell message, an
 * I/O completion): timers whose slack has begun run once the current callback returns. Timers
 * without slack are not moved.
 */
export function usTimersAwake(): void {
  wheel?.awake();
}

export function clearTimeoutUs(timer: UsTimer): void {
  wheel?.delete(timer);
}
