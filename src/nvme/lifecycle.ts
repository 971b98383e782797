// Whether a controller may fetch commands and touch its host, as one transition table. TP4159's
// Suspend/Resume (Base 2.1 §8.1.12 "Host Managed Live Migration") and vfio-user migration's
// RUNNING/STOP states both drive it; nothing else decides whether the controller is silent.

export type RunState = 'running' | 'quiescing' | 'suspended' | 'stopped';

interface RunStateRules {
  /** New commands are fetched from submission queues. */
  fetches: boolean;
  /** The controller writes guest memory and raises interrupts (commands already fetched finish). */
  touchesHost: boolean;
  /** Timers (keep alive) run. */
  timersRun: boolean;
  next: readonly RunState[];
}

const RULES: Record<RunState, RunStateRules> = {
  running: { fetches: true, touchesHost: true, timersRun: true, next: ['quiescing', 'stopped'] },
  // Suspend requested: fetched commands finish and post, nothing new starts.
  quiescing: { fetches: false, touchesHost: true, timersRun: false, next: ['suspended', 'running', 'stopped'] },
  // Suspended: silent. Completions, events and interrupts wait for the resume.
  suspended: { fetches: false, touchesHost: false, timersRun: false, next: ['running', 'stopped'] },
  // Disposed: never again.
  stopped: { fetches: false, touchesHost: false, timersRun: false, next: [] },
};

export class Lifecycle {
  private current: RunState = 'running';

  get state(): RunState {
    return this.current;
  }

  get fetches(): boolean {
    return RULES[this.current].fetches;
  }

  get touchesHost(): boolean {
    return RULES[this.current].touchesHost;
  }

  get timersRun(): boolean {
    return RULES[this.current].timersRun;
  }

  can(to: RunState): boolean {
    return to === this.current || RULES[this.current].next.includes(to);
  }

  /** Moves to `to`; returns the state it left. Throws on an arc the table does not have. */
  move(to: RunState): RunState {
    const from = this.current;
    if (!this.can(to)) throw new Error(`controller cannot go from ${from} to ${to}`);
    this.current = to;
    return from;
  }
}
