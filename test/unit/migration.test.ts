// MigrationController against a fake device: what each arc asks of the device, what a failed step
// leaves, what DEVICE_RESET and a departing client do, and the data streams.

import { describe, expect, it } from 'vitest';
import { VfioError, type DeviceMigration } from '../../src/vfio-user/device.js';
import { MigrationController } from '../../src/vfio-user/migration.js';
import { encodeRecord, IncomingStream, parseStream, RecordKind } from '../../src/vfio-user/migration-stream.js';
import { Errno, MigrationFlags, MigrationState, migrationStateName } from '../../src/vfio-user/protocol.js';
import { silentLogger } from '../../src/log.js';

const { ERROR, STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY, RUNNING_P2P, PRE_COPY_P2P } = MigrationState;
const name = migrationStateName;

type Call = 'stop' | 'run' | 'save' | 'savePreCopy' | 'load';

/** Records every call; `failures` makes the next call of a kind throw the given error. */
class FakeDevice implements DeviceMigration {
  calls: Call[] = [];
  running = true;
  state = new Uint8Array([1, 2, 3]);
  preCopyParts: Uint8Array[] = [];
  loaded: { state: Uint8Array; preCopy: readonly Uint8Array[] } | null = null;
  readonly failures = new Map<Call, Error>();
  readonly savePreCopy?: (first: boolean) => Promise<Uint8Array>;

  constructor(preCopy = true) {
    if (preCopy) {
      this.savePreCopy = async (first) => {
        this.enter('savePreCopy');
        return first ? new Uint8Array([0xf0]) : (this.preCopyParts.shift() ?? new Uint8Array(0));
      };
    }
  }

  async stop(): Promise<void> {
    this.enter('stop');
    this.running = false;
  }
  async run(): Promise<void> {
    this.enter('run');
    this.running = true;
  }
  async save(): Promise<Uint8Array> {
    this.enter('save');
    return this.state;
  }
  async load(state: Uint8Array, preCopy: readonly Uint8Array[]): Promise<void> {
    this.enter('load');
    this.loaded = { state: state.slice(), preCopy: preCopy.map((p) => p.slice()) };
  }

  private enter(call: Call): void {
    this.calls.push(call);
    const failure = this.failures.get(call);
    if (failure) {
      this.failures.delete(call);
      throw failure;
    }
  }
}

function setup(preCopy = true): { device: FakeDevice; migration: MigrationController } {
  const device = new FakeDevice(preCopy);
  return { device, migration: new MigrationController(device, silentLogger) };
}

const stateRecord = (bytes: number[]): Uint8Array => encodeRecord(RecordKind.DEVICE_STATE, new Uint8Array(bytes));

/** Brings a fresh controller to `state` the legal way, then forgets the calls it took. */
async function reach({ device, migration }: { device: FakeDevice; migration: MigrationController }, state: MigrationState): Promise<void> {
  if (state === ERROR) {
    device.failures.set('stop', new Error('device wedged'));
    await expect(migration.setState(STOP)).rejects.toThrow('wedged');
  } else {
    await migration.setState(state);
  }
  expect(migration.state).toBe(state);
  device.calls = [];
}

/** A target in RESUMING needs a whole stream before it may leave. */
async function feedStream(migration: MigrationController): Promise<void> {
  if (migration.state === RESUMING) await migration.writeData(stateRecord([9, 9]));
}


/** A test that moves from `from` to `to` and expects exactly `calls` of the device, in order. */
function itMovesWithCalls(from: MigrationState, to: MigrationState, calls: Call[]): void {
  it(`${name(from)} → ${name(to)} asks the device for ${calls.join(', ') || 'nothing'}`, async () => {
    const t = setup();
    await reach(t, from);
    await feedStream(t.migration);
    await t.migration.setState(to);
    expect(t.migration.state).toBe(to);
    expect(t.device.calls).toEqual(calls);
  });
}

describe('each direct arc', () => {
  const arcs: [MigrationState, MigrationState, Call[]][] = [
    [RUNNING, STOP, ['stop']],
    [STOP, RUNNING, ['run']],
    [STOP, STOP_COPY, ['save']],
    [STOP_COPY, STOP, []],
    [STOP, RESUMING, []],
    [RESUMING, STOP, ['load']],
    [RUNNING, PRE_COPY, []],
    [PRE_COPY, RUNNING, []],
    [PRE_COPY, STOP_COPY, ['stop', 'save']],
  ];
  for (const [from, to, calls] of arcs) {
    itMovesWithCalls(from, to, calls);
  }
});

describe('routes through several arcs', () => {
  const routes: [MigrationState, MigrationState, Call[]][] = [
    [RUNNING, STOP_COPY, ['stop', 'save']],
    [RUNNING, RESUMING, ['stop']],
    [STOP, PRE_COPY, ['run']],
    [STOP_COPY, RUNNING, ['run']],
    [RESUMING, RUNNING, ['load', 'run']],
    [RESUMING, PRE_COPY, ['load', 'run']],
    [PRE_COPY, STOP, ['stop']],
    [PRE_COPY, RESUMING, ['stop']],
  ];
  for (const [from, to, calls] of routes) {
    itMovesWithCalls(from, to, calls);
  }

  it('PRE_COPY → STOP takes the RUNNING side, so the device is never saved on the way', async () => {
    const t = setup();
    await reach(t, PRE_COPY);
    await t.migration.setState(STOP);
    expect(t.device.calls).not.toContain('save');
  });
});

describe('illegal requests', () => {
  const illegal: [MigrationState, number][] = [];
  for (const from of [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY]) {
    for (const to of [ERROR, RUNNING_P2P, PRE_COPY_P2P, 8, 0x7fffffff]) illegal.push([from, to]);
  }
  illegal.push([STOP_COPY, PRE_COPY]);
  for (const to of [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY]) illegal.push([ERROR, to]);

  for (const [from, to] of illegal) {
    it(`${name(from)} → ${name(to)} is EINVAL and changes nothing`, async () => {
      const t = setup();
      await reach(t, from);
      await expect(t.migration.setState(to)).rejects.toMatchObject({ errno: Errno.EINVAL });
      expect(t.migration.state).toBe(from);
      expect(t.device.calls).toEqual([]);
    });
  }

  it('PRE_COPY is refused when the device does not offer it, and MIGRATION says so', async () => {
    const t = setup(false);
    expect(t.migration.flags).toBe(MigrationFlags.STOP_COPY);
    expect(setup(true).migration.flags).toBe(MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY);
    await expect(t.migration.setState(PRE_COPY)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await reach(t, STOP);
    await expect(t.migration.setState(PRE_COPY)).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(t.device.calls).toEqual([]);
  });

  it('asking for the current state succeeds without touching the device', async () => {
    const t = setup();
    for (const state of [RUNNING, STOP, STOP_COPY]) {
      await reach(t, state);
      await t.migration.setState(state);
      expect(t.device.calls).toEqual([]);
    }
  });
});

describe('failures', () => {
  it('a failing stop enters ERROR; everything but DEVICE_RESET is then refused', async () => {
    const t = setup();
    t.device.failures.set('stop', new VfioError(Errno.EIO, 'stuck'));
    await expect(t.migration.setState(STOP_COPY)).rejects.toMatchObject({ errno: Errno.EIO });
    expect(t.migration.state).toBe(ERROR);
    expect(t.device.calls).toEqual(['stop']);
    await expect(t.migration.setState(RUNNING)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(t.migration.readData(16)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(t.migration.writeData(new Uint8Array(1))).rejects.toMatchObject({ errno: Errno.EINVAL });
    await t.migration.deviceReset();
    expect(t.migration.state).toBe(RUNNING);
    expect(t.device.running).toBe(true);
  });

  it('stays in ERROR when the device does not run again after DEVICE_RESET', async () => {
    const t = setup();
    await reach(t, ERROR);
    t.device.failures.set('run', new Error('still broken'));
    await expect(t.migration.deviceReset()).rejects.toThrow('still broken');
    expect(t.migration.state).toBe(ERROR);
  });

  it('a failing run half way through a route leaves ERROR, not the state before', async () => {
    const t = setup();
    await reach(t, STOP_COPY);
    t.device.failures.set('run', new Error('no'));
    await expect(t.migration.setState(RUNNING)).rejects.toThrow('no');
    expect(t.migration.state).toBe(ERROR);
    expect(t.device.calls).toEqual(['run']);
  });

  it('a refused save keeps STOP (saving changes nothing), a crashing one is ERROR', async () => {
    const t = setup();
    await reach(t, STOP);
    t.device.failures.set('save', new VfioError(Errno.ENOMEM, 'no room'));
    await expect(t.migration.setState(STOP_COPY)).rejects.toMatchObject({ errno: Errno.ENOMEM });
    expect(t.migration.state).toBe(STOP);
    t.device.failures.set('save', new TypeError('bug'));
    await expect(t.migration.setState(STOP_COPY)).rejects.toThrow('bug');
    expect(t.migration.state).toBe(ERROR);
  });

  it('a refused load keeps RESUMING and what was received: the rest of a cut stream can follow', async () => {
    const t = setup();
    await reach(t, RESUMING);
    const whole = Buffer.concat([encodeRecord(RecordKind.PRE_COPY, new Uint8Array([7])), stateRecord([4, 5, 6])]);
    await t.migration.writeData(whole.subarray(0, whole.length - 2));
    await expect(t.migration.setState(RUNNING)).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(t.migration.state).toBe(RESUMING);
    expect(t.device.calls).toEqual([]); // the device never saw an incomplete stream
    await t.migration.writeData(whole.subarray(whole.length - 2));
    await t.migration.setState(RUNNING);
    expect(t.device.calls).toEqual(['load', 'run']);
    expect(Array.from(t.device.loaded!.state)).toEqual([4, 5, 6]);
    expect(t.device.loaded!.preCopy.map((p) => Array.from(p))).toEqual([[7]]);
  });

  it('a load the device refuses keeps RESUMING; DEVICE_RESET then drops the stream for a fresh one', async () => {
    const t = setup();
    await reach(t, RESUMING);
    await t.migration.writeData(stateRecord([1]));
    t.device.failures.set('load', new VfioError(Errno.EINVAL, 'not my format'));
    await expect(t.migration.setState(STOP)).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(t.migration.state).toBe(RESUMING);
    await t.migration.deviceReset();
    expect(t.migration.state).toBe(RESUMING);
    await expect(t.migration.setState(STOP)).rejects.toThrow(/empty/);
    await t.migration.writeData(stateRecord([2]));
    await t.migration.setState(STOP);
    expect(Array.from(t.device.loaded!.state)).toEqual([2]);
  });
});

describe('DEVICE_RESET and departing clients', () => {
  it('DEVICE_RESET keeps the migration state and keeps a stopped device stopped', async () => {
    for (const state of [STOP, STOP_COPY, RESUMING]) {
      const t = setup();
      await reach(t, state);
      await t.migration.deviceReset();
      expect(t.migration.state).toBe(state);
      expect(t.device.calls).toEqual(['stop']);
    }
    for (const state of [RUNNING, PRE_COPY]) {
      const t = setup();
      await reach(t, state);
      await t.migration.deviceReset();
      expect(t.migration.state).toBe(state);
      expect(t.device.calls).toEqual([]);
    }
  });

  it('DEVICE_RESET in STOP_COPY drops the captured state: the client reads the end of the stream', async () => {
    const t = setup();
    await reach(t, STOP_COPY);
    const head = await t.migration.readData(4);
    expect(head.length).toBe(4);
    await t.migration.deviceReset();
    expect((await t.migration.readData(4)).length).toBe(0);
  });

  it('a client leaving mid-migration runs the device again; ERROR stays', async () => {
    for (const state of [STOP, STOP_COPY, RESUMING, PRE_COPY]) {
      const t = setup();
      await reach(t, state);
      await t.migration.clientGone();
      expect(t.migration.state).toBe(RUNNING);
      expect(t.device.calls).toEqual(state === PRE_COPY ? [] : ['run']);
      expect(t.device.running).toBe(true);
    }
    const t = setup();
    await reach(t, ERROR);
    await t.migration.clientGone();
    expect(t.migration.state).toBe(ERROR);
  });
});

describe('data streams', () => {
  it('MIG_DATA_READ only in PRE_COPY and STOP_COPY, MIG_DATA_WRITE only in RESUMING', async () => {
    for (const state of [RUNNING, STOP, RESUMING]) {
      const t = setup();
      await reach(t, state);
      await expect(t.migration.readData(8)).rejects.toMatchObject({ errno: Errno.EINVAL });
    }
    for (const state of [RUNNING, STOP, STOP_COPY, PRE_COPY]) {
      const t = setup();
      await reach(t, state);
      await expect(t.migration.writeData(new Uint8Array(8))).rejects.toMatchObject({ errno: Errno.EINVAL });
    }
  });

  it('STOP_COPY streams the saved state in whatever pieces the client asks for, then ends', async () => {
    const t = setup();
    t.device.state = Uint8Array.from({ length: 100 }, (_, i) => i);
    await reach(t, STOP_COPY);
    const pieces: Uint8Array[] = [];
    for (;;) {
      const piece = await t.migration.readData(7);
      pieces.push(piece);
      if (piece.length < 7) break;
    }
    const stream = parseStream(Buffer.concat(pieces));
    expect(stream.preCopy).toEqual([]);
    expect(Array.from(stream.state)).toEqual(Array.from(t.device.state));
    expect((await t.migration.readData(7)).length).toBe(0);
  });

  it('PRE_COPY asks the device for parts while it runs; STOP_COPY appends the final state behind the unread rest', async () => {
    const t = setup();
    await reach(t, PRE_COPY);
    const first = await t.migration.readData(1024);
    expect(t.device.calls).toEqual(['savePreCopy']);
    expect(await t.migration.readData(1024)).toHaveLength(0); // nothing new: a short read
    t.device.preCopyParts.push(new Uint8Array([0xa1, 0xa2]));
    const second = await t.migration.readData(5); // part of the second record only
    expect(t.device.running).toBe(true);
    await t.migration.setState(STOP_COPY);
    const rest = await t.migration.readData(1024);
    const stream = parseStream(Buffer.concat([first, second, rest]));
    expect(stream.preCopy.map((p) => Array.from(p))).toEqual([[0xf0], [0xa1, 0xa2]]);
    expect(Array.from(stream.state)).toEqual([1, 2, 3]);
  });

  it('a new pre-copy session starts over with a first part', async () => {
    const t = setup();
    await reach(t, PRE_COPY);
    await t.migration.readData(64);
    await t.migration.setState(RUNNING);
    await t.migration.setState(PRE_COPY);
    const again = parseStream(Buffer.concat([await t.migration.readData(64), stateRecord([0])]));
    expect(again.preCopy.map((p) => Array.from(p))).toEqual([[0xf0]]);
  });

  it('a target refuses a stream larger than it will buffer, keeping what it had', () => {
    const incoming = new IncomingStream(10);
    incoming.append(new Uint8Array(6));
    expect(() => incoming.append(new Uint8Array(5))).toThrow(expect.objectContaining({ errno: Errno.ENOSPC }));
    expect(incoming.length).toBe(6);
  });
});

describe('stream framing', () => {
  it('refuses what is not a whole stream of records ending in the device state', () => {
    const pre = encodeRecord(RecordKind.PRE_COPY, new Uint8Array([1]));
    const state = stateRecord([2, 3]);
    const cases: [string, Uint8Array, RegExp][] = [
      ['empty', new Uint8Array(0), /empty/],
      ['pre-copy only', pre, /no device state/],
      ['a cut header', state.subarray(0, 5), /inside a record header/],
      ['a cut body', state.subarray(0, state.length - 1), /inside a record/],
      ['bytes after the state', Buffer.concat([state, pre]), /follow the device state/],
      ['garbage', new Uint8Array(16).fill(0x41), /no record/],
      ['an unknown kind', Buffer.concat([encodeRecord(9 as 1, new Uint8Array(0)), state]), /unknown kind/],
    ];
    for (const [, bytes, why] of cases) {
      expect(() => parseStream(bytes)).toThrow(why);
      expect(() => parseStream(bytes)).toThrow(expect.objectContaining({ errno: Errno.EINVAL }));
    }
    expect(parseStream(Buffer.concat([pre, pre, state])).preCopy).toHaveLength(2);
  });
});
