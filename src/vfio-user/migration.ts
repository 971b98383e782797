// Runs the migration state machine (migration-fsm.ts) against a device's DeviceMigration: one
// function per arc, the outgoing and incoming data streams, and what DEVICE_RESET and a client
// leaving do to them. It belongs to the device, not to one connection, so ERROR outlives a client.
//
// Decisions the spec leaves open (vfio-user.rst, MIG_DEVICE_STATE):
// - A failed step enters ERROR, except a step the device promises is all or nothing (save, load)
//   and that the device refused: the state then stays where the step began. A refused load thus
//   keeps RESUMING with what was received, so a client whose stream was cut short can send the rest.
// - DEVICE_RESET keeps the migration state (libvfio-user #844/#853: a reset during PRE_COPY must not
//   change the state under the VMM's feet); it drops migration data in flight in both directions,
//   which described the device before the reset, and it is the only way out of ERROR (→ RUNNING).
// - A client leaving ends any migration: data is dropped and a stopped device runs again, because the
//   next client, like every VMM, assumes a device it connects to is RUNNING. ERROR stays.

import type { Logger } from '../log.js';
import { VfioError, type DeviceMigration } from './device.js';
import { planRoute, requestableStates, type Arc, type Step } from './migration-fsm.js';
import { encodeRecord, IncomingStream, OutgoingStream, parseStream, RecordKind } from './migration-stream.js';
import { Errno, Limits, MigrationFlags, MigrationState, migrationStateName } from './protocol.js';

const { ERROR, RUNNING, STOP_COPY, RESUMING, PRE_COPY } = MigrationState;

export class MigrationController {
  private current: MigrationState = RUNNING;
  private outgoing: OutgoingStream | null = null;
  private incoming: IncomingStream | null = null;
  /** The next pre-copy part opens a new pre-copy session. */
  private preCopyFirst = true;
  /** Operations run one after another, whichever connection asked (a SET may outlive its client). */
  private queue: Promise<unknown> = Promise.resolve();
  private readonly offered: ReadonlySet<MigrationState>;

  private readonly steps: Record<Step, () => Promise<void>> = {
    stop: () => this.device.stop(),
    run: () => this.device.run(),
    beginStopCopy: async () => {
      const stream = new OutgoingStream();
      stream.append(encodeRecord(RecordKind.DEVICE_STATE, await this.device.save()));
      this.outgoing = stream;
    },
    endStopCopy: async () => {
      this.outgoing = null;
    },
    beginResuming: async () => {
      this.incoming = new IncomingStream(Limits.maxMigrationStream);
    },
    load: async () => {
      const { preCopy, state } = parseStream(this.incoming!.bytes());
      await this.device.load(state, preCopy);
      this.incoming = null;
    },
    beginPreCopy: async () => {
      this.outgoing = new OutgoingStream();
      this.preCopyFirst = true;
    },
    endPreCopy: async () => {
      this.outgoing = null;
    },
    stopAndCopy: async () => {
      await this.device.stop();
      // What the client has not read of the pre-copy parts still goes first: one stream throughout.
      this.outgoing!.append(encodeRecord(RecordKind.DEVICE_STATE, await this.device.save()));
    },
  };

  constructor(
    private readonly device: DeviceMigration,
    private readonly log: Logger,
  ) {
    this.offered = requestableStates(this.preCopyOffered);
  }

  get state(): MigrationState {
    return this.current;
  }

  get preCopyOffered(): boolean {
    return this.device.savePreCopy !== undefined;
  }

  /** The MIGRATION feature's flags: STOP_COPY always, PRE_COPY when the device offers it. */
  get flags(): bigint {
    return MigrationFlags.STOP_COPY | (this.preCopyOffered ? MigrationFlags.PRE_COPY : 0n);
  }

  /** SET MIG_DEVICE_STATE: walks the route to `target`; resolves once there. */
  setState(target: number): Promise<void> {
    return this.exclusive(async () => {
      const route = planRoute(this.current, target, this.offered);
      if (!route) {
        throw new VfioError(Errno.EINVAL, `no migration from ${migrationStateName(this.current)} to ${migrationStateName(target)}`);
      }
      for (const arc of route) await this.take(arc);
    });
  }

  /** MIG_DATA_READ: up to `max` bytes of the stream; fewer means the stream has no more for now. */
  readData(max: number): Promise<Uint8Array> {
    return this.exclusive(async () => {
      if (this.current !== PRE_COPY && this.current !== STOP_COPY) {
        throw new VfioError(Errno.EINVAL, `MIG_DATA_READ in ${migrationStateName(this.current)} (only PRE_COPY or STOP_COPY)`);
      }
      const stream = this.outgoing!;
      if (this.current === PRE_COPY && stream.pending === 0) {
        const part = await this.device.savePreCopy!(this.preCopyFirst);
        this.preCopyFirst = false;
        if (part.length > 0) stream.append(encodeRecord(RecordKind.PRE_COPY, part));
      }
      return stream.take(max);
    });
  }

  /** MIG_DATA_WRITE: appends to the stream the device loads on RESUMING→STOP. */
  writeData(data: Uint8Array): Promise<void> {
    return this.exclusive(async () => {
      if (this.current !== RESUMING) {
        throw new VfioError(Errno.EINVAL, `MIG_DATA_WRITE in ${migrationStateName(this.current)} (only RESUMING)`);
      }
      this.incoming!.append(data);
    });
  }

  /** After the device itself was reset (DEVICE_RESET). */
  deviceReset(): Promise<void> {
    return this.exclusive(async () => {
      switch (this.current) {
        case ERROR:
          await this.device.run();
          this.outgoing = null;
          this.incoming = null;
          this.current = RUNNING;
          this.log.info('migration: DEVICE_RESET left ERROR for RUNNING');
          return;
        case RUNNING:
          return;
        case PRE_COPY:
          this.outgoing = new OutgoingStream();
          this.preCopyFirst = true;
          return;
        case STOP_COPY:
          // The state already captured is the device's before the reset: the client reads the end of
          // the stream, and a target refuses what it got as incomplete.
          this.outgoing = new OutgoingStream();
          break;
        case RESUMING:
          this.incoming = new IncomingStream(Limits.maxMigrationStream);
          break;
      }
      // A reset must not wake a device the state machine holds stopped.
      await this.device.stop();
    });
  }

  /** The client went away; see the header for why the device then runs again. */
  clientGone(): Promise<void> {
    return this.exclusive(async () => {
      this.outgoing = null;
      this.incoming = null;
      if (this.current === ERROR || this.current === RUNNING) return;
      const wasStopped = this.current !== PRE_COPY;
      this.current = RUNNING;
      if (!wasStopped) return;
      try {
        await this.device.run();
      } catch (error) {
        this.current = ERROR;
        this.log.error(`migration: the device did not run again after its client left: ${(error as Error).message}`);
      }
    });
  }

  private async take(arc: Arc): Promise<void> {
    try {
      await this.steps[arc.step]();
      this.current = arc.to;
      this.log.debug(`migration: ${migrationStateName(arc.from)} → ${migrationStateName(arc.to)}`);
    } catch (error) {
      const refused = error instanceof VfioError;
      if (!(arc.atomic && refused)) {
        this.current = ERROR;
        this.outgoing = null;
        this.incoming = null;
      }
      this.log.warn(`migration: ${migrationStateName(arc.from)} → ${migrationStateName(arc.to)} failed (${migrationStateName(this.current)} now): ${(error as Error).message}`);
      throw error;
    }
  }

  private exclusive<T>(operation: () => Promise<T>): Promise<T> {
    const result = this.queue.then(operation);
    this.queue = result.catch(() => undefined);
    return result;
  }
}
