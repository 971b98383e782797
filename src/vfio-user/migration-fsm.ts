// The device migration state machine of vfio-user.rst, "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE"
// ("Direct State Transitions" and "Complex State Transitions"), as data: the arcs a device takes one
// at a time, and the rule that turns any requested state into a route along them. Nothing here
// touches a device; MigrationController runs the routes.

import { MigrationState } from './protocol.js';

const { STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY } = MigrationState;

/** The work done on one arc; MigrationController has one function per step. */
export type Step =
  | 'stop'
  | 'run'
  | 'beginStopCopy'
  | 'endStopCopy'
  | 'beginResuming'
  | 'load'
  | 'beginPreCopy'
  | 'endPreCopy'
  | 'stopAndCopy';

export interface Arc {
  readonly from: MigrationState;
  readonly to: MigrationState;
  readonly step: Step;
  /**
   * The device promises this step is all or nothing (it only reads state, or it verifies before it
   * commits): when the device refuses it, the state stays at `from`. Any other failure leaves the
   * device in a condition nobody knows, which is ERROR.
   */
  readonly atomic: boolean;
}

/** Every arc a device may take directly. Arcs touching PRE_COPY exist only when the device offers it. */
export const ARCS: readonly Arc[] = [
  { from: RUNNING, to: STOP, step: 'stop', atomic: false },
  { from: STOP, to: RUNNING, step: 'run', atomic: false },
  { from: STOP, to: STOP_COPY, step: 'beginStopCopy', atomic: true },
  { from: STOP_COPY, to: STOP, step: 'endStopCopy', atomic: true },
  { from: STOP, to: RESUMING, step: 'beginResuming', atomic: true },
  { from: RESUMING, to: STOP, step: 'load', atomic: true },
  { from: RUNNING, to: PRE_COPY, step: 'beginPreCopy', atomic: true },
  { from: PRE_COPY, to: RUNNING, step: 'endPreCopy', atomic: true },
  { from: PRE_COPY, to: STOP_COPY, step: 'stopAndCopy', atomic: false },
];

/** The saving group: a route may start or end in one of these but never pass through. */
export const SAVING_STATES: ReadonlySet<MigrationState> = new Set([PRE_COPY, STOP_COPY]);

/** Requests refused although a route exists: the spec forbids going back from STOP_COPY to PRE_COPY. */
export const FORBIDDEN_REQUESTS: readonly (readonly [from: MigrationState, to: MigrationState])[] = [[STOP_COPY, PRE_COPY]];

/** States a client may ask for (ERROR is only ever entered, and the P2P states are not vfio-user's). */
export function requestableStates(preCopy: boolean): ReadonlySet<MigrationState> {
  return new Set<MigrationState>(preCopy ? [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY] : [STOP, RUNNING, STOP_COPY, RESUMING]);
}

/**
 * The route from `from` to `to`: the shortest chain of arcs whose interior states are not saving
 * states, over the states `offered`. Empty when already there; null when the request is illegal.
 */
export function planRoute(from: MigrationState, to: number, offered: ReadonlySet<MigrationState>, arcs: readonly Arc[] = ARCS): Arc[] | null {
  if (!offered.has(to as MigrationState)) return null;
  if (FORBIDDEN_REQUESTS.some(([f, t]) => f === from && t === to)) return null;
  if (from === to) return [];
  const usable = arcs.filter((arc) => offered.has(arc.from) && offered.has(arc.to));
  // Breadth first, so the first route to reach `to` is a shortest one; ties go to the order of ARCS.
  const routes = new Map<MigrationState, Arc[]>([[from, []]]);
  let frontier: MigrationState[] = [from];
  while (frontier.length > 0) {
    const next: MigrationState[] = [];
    for (const state of frontier) {
      // Only the start of a route may be a saving state: from an interior one, nothing goes on.
      if (state !== from && SAVING_STATES.has(state)) continue;
      for (const arc of usable) {
        if (arc.from !== state || routes.has(arc.to)) continue;
        const route = [...routes.get(state)!, arc];
        if (arc.to === to) return route;
        routes.set(arc.to, route);
        next.push(arc.to);
      }
    }
    frontier = next;
  }
  return null;
}
