// The controller's clocks: the Keep Alive timer (Base §3.9), the Timestamp feature (§5.27.1.11)
// and the power-on hours SMART reports. Their state is relative (milliseconds as of one instant),
// so a saved controller carries no host's wall clock and its Timestamp does not jump elsewhere;
// the instant they are true as of, and the timer itself, are derived and rebuilt. While the
// controller is suspended its time stands still: a state taken twice, or loaded and taken again,
// is the same bytes.

import type { ClockControl } from './context.js';
import { MAX_TIMER_MS } from './policy.js';
import type { ControllerState } from './state.js';

export interface ClockHost {
  readonly state: ControllerState;
  /** Keep Alive runs only while the controller is enabled and its timers run (not suspended). */
  keepAliveArmed(): boolean;
  /** Keep Alive expired without a command: controller fatal status. */
  keepAliveExpired(timeoutMs: number): void;
}

const now = (): number => performance.now();

export class Clocks implements ClockControl {
  /** The instant the relative values in state.clocks are true as of. */
  private anchor = now();
  /** False while suspended: no time passes for the controller. */
  private ticking = true;
  private timer: NodeJS.Timeout | null = null;
  /** When the running Keep Alive timer expires (on the now() scale); null when it is not running. */
  private deadline: number | null = null;
  /** Bumped whenever the timer is disarmed, so a callback already queued does nothing. */
  private generation = 0;

  constructor(private readonly host: ClockHost) {}

  private get values(): ControllerState['clocks'] {
    return this.host.state.clocks;
  }

  /** Brings the relative values up to now, so the state can be copied as it is. */
  normalize(): void {
    const t = now();
    const elapsed = this.ticking ? t - this.anchor : 0;
    this.anchor = t;
    const v = this.values;
    v.sinceResetMs += elapsed;
    if (v.timestampMs !== null) v.timestampMs += elapsed;
    this.host.state.smart.powerOnMs += elapsed;
    if (this.deadline !== null) v.keepAliveRemainingMs = Math.max(0, this.deadline - t);
  }

  timestampNow(): { value: number; hostSet: boolean } {
    const elapsed = this.elapsed();
    const v = this.values;
    if (v.timestampMs !== null) return { value: Math.floor(v.timestampMs + elapsed), hostSet: true };
    return { value: Math.floor(v.sinceResetMs + elapsed), hostSet: false };
  }

  setTimestamp(value: number): void {
    this.normalize();
    this.values.timestampMs = value;
  }

  powerOnMs(): number {
    return this.host.state.smart.powerOnMs + this.elapsed();
  }

  /** A Keep Alive command or a new timeout: the full timeout starts again. */
  restartKeepAlive(): void {
    const timeout = this.host.state.features.keepAliveTimeoutMs;
    this.values.keepAliveRemainingMs = timeout === 0 ? null : timeout;
    this.disarm();
    this.arm();
  }

  /** Stops time and the timer, keeping what was left of it in the state (suspend). */
  pause(): void {
    this.normalize();
    this.ticking = false;
    this.disarm();
  }

  /** Time runs again, and the timer for what was left of it. */
  resume(): void {
    this.disarm();
    this.anchor = now();
    this.ticking = true;
    this.arm();
  }

  /** Controller Level Reset: no timer, the Timestamp counts from zero again. */
  reset(): void {
    this.disarm();
    this.normalize();
    const v = this.values;
    v.sinceResetMs = 0;
    v.timestampMs = null;
    v.keepAliveRemainingMs = null;
  }

  /** A new state was loaded: its values are true as of now (and stand still if suspended). */
  rebase(): void {
    this.disarm();
    this.anchor = now();
    this.arm();
  }

  private elapsed(): number {
    return this.ticking ? now() - this.anchor : 0;
  }

  dispose(): void {
    this.disarm();
  }

  private arm(): void {
    const remaining = this.values.keepAliveRemainingMs;
    if (remaining === null || !this.host.keepAliveArmed()) return;
    const timeout = this.host.state.features.keepAliveTimeoutMs;
    const generation = this.generation;
    this.deadline = now() + remaining;
    const wait = (): void => {
      const left = this.deadline! - now();
      this.timer = setTimeout(
        () => {
          if (generation !== this.generation) return;
          if (now() >= this.deadline!) {
            this.disarm();
            this.values.keepAliveRemainingMs = null;
            this.host.keepAliveExpired(timeout);
          } else {
            wait();
          }
        },
        Math.min(Math.max(left, 0), MAX_TIMER_MS),
      );
      this.timer.unref();
    };
    wait();
  }

  private disarm(): void {
    this.generation++;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.deadline = null;
  }
}
