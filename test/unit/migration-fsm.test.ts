// The route table, written out by hand from vfio-user.rst's rules (direct arcs; otherwise the
// shortest path with no saving state inside; STOP_COPY→PRE_COPY refused) and checked against
// planRoute, which computes it from the arc table.

import { describe, expect, it } from 'vitest';
import { ARCS, planRoute, requestableStates } from '../../src/vfio-user/migration-fsm.js';
import { MigrationState, migrationStateName } from '../../src/vfio-user/protocol.js';

const { ERROR, STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY, RUNNING_P2P, PRE_COPY_P2P } = MigrationState;
const ALL = [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY];
const name = migrationStateName;

/** [from, to, states passed through including `to`], or null for a refused request. */
const EXPECTED: [MigrationState, MigrationState, MigrationState[] | null][] = [
  [RUNNING, STOP, [STOP]],
  [RUNNING, STOP_COPY, [STOP, STOP_COPY]],
  [RUNNING, RESUMING, [STOP, RESUMING]],
  [RUNNING, PRE_COPY, [PRE_COPY]],
  [STOP, RUNNING, [RUNNING]],
  [STOP, STOP_COPY, [STOP_COPY]],
  [STOP, RESUMING, [RESUMING]],
  [STOP, PRE_COPY, [RUNNING, PRE_COPY]],
  [STOP_COPY, STOP, [STOP]],
  [STOP_COPY, RUNNING, [STOP, RUNNING]],
  [STOP_COPY, RESUMING, [STOP, RESUMING]],
  [STOP_COPY, PRE_COPY, null],
  [RESUMING, STOP, [STOP]],
  [RESUMING, RUNNING, [STOP, RUNNING]],
  [RESUMING, STOP_COPY, [STOP, STOP_COPY]],
  [RESUMING, PRE_COPY, [STOP, RUNNING, PRE_COPY]],
  [PRE_COPY, RUNNING, [RUNNING]],
  [PRE_COPY, STOP_COPY, [STOP_COPY]],
  [PRE_COPY, STOP, [RUNNING, STOP]],
  [PRE_COPY, RESUMING, [RUNNING, STOP, RESUMING]],
];

const through = (route: { to: MigrationState }[] | null): MigrationState[] | null => route?.map((arc) => arc.to) ?? null;

describe('the arc table', () => {
  it('holds exactly the nine direct arcs of the spec', () => {
    expect(ARCS.map((a) => `${name(a.from)}→${name(a.to)}`).sort()).toEqual(
      [
        'RUNNING→STOP',
        'STOP_COPY→STOP',
        'RESUMING→STOP',
        'PRE_COPY→RUNNING',
        'STOP→RUNNING',
        'RUNNING→PRE_COPY',
        'STOP→STOP_COPY',
        'PRE_COPY→STOP_COPY',
        'STOP→RESUMING',
      ].sort(),
    );
  });

  it('routes every direct arc in one step', () => {
    const offered = requestableStates(true);
    for (const arc of ARCS) expect(planRoute(arc.from, arc.to, offered)).toEqual([arc]);
  });
});

describe('routes between states', () => {
  const offered = requestableStates(true);

  for (const [from, to, states] of EXPECTED) {
    it(`${name(from)} → ${name(to)}: ${states ? states.map(name).join(' → ') : 'refused'}`, () => {
      expect(through(planRoute(from, to, offered))).toEqual(states);
    });
  }

  it('covers every ordered pair of distinct states', () => {
    const pairs = new Set(EXPECTED.map(([f, t]) => `${f}-${t}`));
    for (const from of ALL) for (const to of ALL) if (from !== to) expect(pairs.has(`${from}-${to}`)).toBe(true);
  });

  it('never passes through a saving state', () => {
    for (const from of ALL) {
      for (const to of ALL) {
        const states = through(planRoute(from, to, offered)) ?? [];
        for (const inner of states.slice(0, -1)) expect([PRE_COPY, STOP_COPY]).not.toContain(inner);
      }
    }
  });

  it('the no-saving-state rule, not the order of the arc table, picks between equally short routes', () => {
    const reversed = [...ARCS].reverse();
    for (const [from, to, states] of EXPECTED) expect(through(planRoute(from, to, offered, reversed))).toEqual(states);
  });

  it('asking for the state the device is in is an empty route', () => {
    for (const state of ALL) expect(planRoute(state, state, offered)).toEqual([]);
  });

  it('refuses ERROR, the P2P states and values past the enum, from anywhere', () => {
    for (const from of [...ALL, ERROR]) {
      for (const to of [ERROR, RUNNING_P2P, PRE_COPY_P2P, 8, 0xffffffff]) expect(planRoute(from, to, offered)).toBeNull();
    }
  });

  it('leaves ERROR only by DEVICE_RESET: no route goes out of it', () => {
    for (const to of ALL) expect(planRoute(ERROR, to, offered)).toBeNull();
  });
});

describe('without PRE_COPY', () => {
  const offered = requestableStates(false);

  it('refuses PRE_COPY and keeps every other route', () => {
    for (const [from, to, states] of EXPECTED) {
      if (from === PRE_COPY) continue;
      expect(through(planRoute(from, to, offered))).toEqual(to === PRE_COPY ? null : states);
    }
  });
});
