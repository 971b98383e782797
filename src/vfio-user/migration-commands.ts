// The wire side of migration v2: DEVICE_FEATURE (16), MIG_DATA_READ (17) and MIG_DATA_WRITE (18)
// decoded, checked against argsz and answered. Layouts and rules: vfio-user.rst, sections
// "VFIO_USER_DEVICE_FEATURE" (features 1, 2, 6, 7, 8), "VFIO_USER_MIG_DATA_READ/WRITE" and
// "Message sizes"; shared/reference/vfio-user-protocol.md §5. The state machine is MigrationController's.
//
// argsz: a GET whose argsz cannot hold the whole reply gets the 8-byte header with the argsz it
// needs and nothing else happens (a REPORT then clears nothing), so the client can ask again. A SET
// or PROBE is answered with its own payload; one whose argsz cannot hold that is refused before it
// acts, since a client could not tell whether asking again would act twice. MIG_DATA_READ never
// truncates: a shorter reply would mean end of stream.

import * as codec from './codec.js';
import { VfioError } from './device.js';
import { DirtyLog, type LoggedRange } from './dirty-log.js';
import type { DmaTable } from './dma.js';
import type { MigrationController } from './migration.js';
import { dirtyBitmapBytes, Errno, Feature, FeatureFlags, Limits, NO_DATA_FD, PayloadSize } from './protocol.js';

/** The smallest page a dirty log keeps: the page size this server offers (pgsizes). */
const MIN_LOG_PAGE = 4096;

export interface MigrationCommandsOptions {
  /** Null when the device has no DeviceMigration: its features and MIG_DATA_* are ENOTSUP. */
  migration: MigrationController | null;
  dma: DmaTable;
  /** The largest data payload this client takes or sends (min of both sides' max_data_xfer_size). */
  maxDataTransfer(): number;
}

interface FeatureHandler {
  /** The operations (FeatureFlags.GET/SET) the feature has. */
  readonly ops: number;
  readonly needsMigration: boolean;
  /** GET: checks the request data and says how many reply data bytes it takes, changing nothing. */
  getSize?(data: Uint8Array): number;
  get?(data: Uint8Array): Uint8Array;
  /** SET: acts, and returns the reply data (the request's, with what the device chose filled in). */
  set?(data: Uint8Array): Uint8Array | Promise<Uint8Array>;
}

export class MigrationCommands {
  private logging: { log: DirtyLog; stop: () => void } | null = null;
  private readonly features: ReadonlyMap<number, FeatureHandler>;

  constructor(private readonly options: MigrationCommandsOptions) {
    const { GET, SET } = FeatureFlags;
    this.features = new Map<number, FeatureHandler>([
      [Feature.MIGRATION, { ops: GET, needsMigration: true, getSize: () => PayloadSize.FEATURE_MIGRATION, get: () => this.migrationFlags() }],
      [
        Feature.MIG_DEVICE_STATE,
        { ops: GET | SET, needsMigration: true, getSize: () => PayloadSize.FEATURE_MIG_STATE, get: () => this.migrationState(), set: (d) => this.setMigrationState(d) },
      ],
      [Feature.DMA_LOGGING_START, { ops: SET, needsMigration: false, set: (d) => this.startLogging(d) }],
      [Feature.DMA_LOGGING_STOP, { ops: SET, needsMigration: false, set: (d) => this.stopLogging(d) }],
      [Feature.DMA_LOGGING_REPORT, { ops: GET, needsMigration: false, getSize: (d) => this.reportSize(d), get: (d) => this.report(d) }],
    ]);
  }

  /** The client is gone: its dirty log goes with its DMA table. */
  end(): void {
    this.logging?.stop();
    this.logging = null;
  }

  deviceFeature(payload: Uint8Array): Uint8Array | Promise<Uint8Array> {
    const { argsz, flags, tail: data } = codec.deviceFeature.decode(payload, 'DEVICE_FEATURE');
    if (argsz < PayloadSize.DEVICE_FEATURE) throw invalid(`DEVICE_FEATURE argsz ${argsz}`);
    const known = FeatureFlags.FEATURE_MASK | FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE;
    if (flags & ~known) throw invalid(`DEVICE_FEATURE flags 0x${flags.toString(16)}`);
    const index = flags & FeatureFlags.FEATURE_MASK;
    const feature = this.features.get(index);
    if (!feature || (feature.needsMigration && !this.options.migration)) {
      throw new VfioError(Errno.ENOTSUP, `device feature ${index} is not supported`);
    }
    const ops = flags & (FeatureFlags.GET | FeatureFlags.SET);
    const missing = ops & ~feature.ops;
    if (missing) throw invalid(`device feature ${index} has no ${missing & FeatureFlags.GET ? 'GET' : 'SET'}`);
    if (flags & FeatureFlags.PROBE) return this.echo(payload, argsz);
    if (ops === FeatureFlags.GET) {
      const needed = PayloadSize.DEVICE_FEATURE + feature.getSize!(data);
      const header = codec.deviceFeature.encode({ argsz: needed, flags });
      return argsz < needed ? header : concat(header, feature.get!(data));
    }
    if (ops === FeatureFlags.SET) {
      this.echo(payload, argsz);
      const reply = feature.set!(data);
      const withHeader = (d: Uint8Array): Uint8Array => concat(payload.subarray(0, PayloadSize.DEVICE_FEATURE), d);
      return reply instanceof Promise ? reply.then(withHeader) : withHeader(reply);
    }
    throw invalid(`DEVICE_FEATURE needs exactly one of GET and SET, or PROBE (flags 0x${flags.toString(16)})`);
  }

  async migDataRead(payload: Uint8Array): Promise<Uint8Array> {
    const migration = this.requireMigration('MIG_DATA_READ');
    const { argsz, size } = codec.migData.decode(payload, 'MIG_DATA_READ');
    if (size > this.options.maxDataTransfer()) throw invalid(`MIG_DATA_READ of ${size} bytes (at most ${this.options.maxDataTransfer()})`);
    if (argsz < PayloadSize.MIG_DATA + size) throw invalid(`MIG_DATA_READ argsz ${argsz} cannot hold ${size} bytes`);
    const data = await migration.readData(size);
    return codec.migData.encode({ argsz: PayloadSize.MIG_DATA + data.length, size: data.length }, data);
  }

  async migDataWrite(payload: Uint8Array): Promise<void> {
    const migration = this.requireMigration('MIG_DATA_WRITE');
    const { size, tail } = codec.migData.decode(payload, 'MIG_DATA_WRITE');
    if (tail.length !== size) throw invalid(`MIG_DATA_WRITE size ${size} but ${tail.length} data bytes`);
    if (size > this.options.maxDataTransfer()) throw invalid(`MIG_DATA_WRITE of ${size} bytes (at most ${this.options.maxDataTransfer()})`);
    await migration.writeData(tail);
  }

  // ---- features ---------------------------------------------------------------------------------

  private migrationFlags(): Uint8Array {
    return codec.featureMigration.encode({ flags: this.options.migration!.flags });
  }

  private migrationState(): Uint8Array {
    return codec.featureMigState.encode({ deviceState: this.options.migration!.state, dataFd: NO_DATA_FD });
  }

  private async setMigrationState(data: Uint8Array): Promise<Uint8Array> {
    const { deviceState } = codec.featureMigState.decode(data, 'MIG_DEVICE_STATE');
    await this.options.migration!.setState(deviceState);
    return data;
  }

  private startLogging(data: Uint8Array): Uint8Array {
    if (this.logging) throw new VfioError(Errno.EBUSY, 'DMA logging is already on');
    const control = codec.dmaLoggingControl.decode(data, 'DMA_LOGGING_START');
    const request = codec.dmaLogging.decode(data);
    if (request.ranges.length > Limits.maxDmaLoggingRanges) {
      throw new VfioError(Errno.E2BIG, `${request.ranges.length} DMA logging ranges (at most ${Limits.maxDmaLoggingRanges})`);
    }
    const asked = request.pageSize;
    if (!isPowerOfTwo(asked) || asked > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(`DMA logging page size ${asked}`);
    const ranges = request.ranges.map((r): LoggedRange => {
      if (r.length === 0n || r.iova % asked !== 0n || r.length % asked !== 0n) {
        throw invalid(`DMA logging range 0x${r.iova.toString(16)}+0x${r.length.toString(16)} is empty or not aligned to ${asked}`);
      }
      return { start: safeNumber(r.iova), end: safeNumber(r.iova + r.length) };
    });
    ranges.sort((a, b) => a.start - b.start);
    for (let i = 1; i < ranges.length; i++) if (ranges[i]!.start < ranges[i - 1]!.end) throw invalid('DMA logging ranges overlap');
    // The spec lets the device pick its page size; smaller than a page buys nothing.
    const pageSize = Math.max(Number(asked), MIN_LOG_PAGE);
    const log = new DirtyLog(pageSize, ranges);
    this.logging = { log, stop: this.options.dma.observeWrites(log.record) };
    return codec.dmaLoggingControl.encode({ ...control, pageSize: BigInt(pageSize) }, control.tail);
  }

  private stopLogging(data: Uint8Array): Uint8Array {
    this.end();
    return data;
  }

  private reportRequest(data: Uint8Array): { iova: number; length: number; pageSize: number; bitmapBytes: number } {
    if (!this.logging) throw invalid('DMA_LOGGING_REPORT while DMA logging is off');
    const { iova, length, pageSize } = codec.dmaLoggingReport.decode(data, 'DMA_LOGGING_REPORT');
    if (pageSize < BigInt(MIN_LOG_PAGE) || !isPowerOfTwo(pageSize) || pageSize > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw invalid(`DMA_LOGGING_REPORT page size ${pageSize}`);
    }
    if (length === 0n) throw invalid('DMA_LOGGING_REPORT of an empty range');
    safeNumber(iova + length);
    const bitmapBytes = dirtyBitmapBytes(Number(length), Number(pageSize));
    if (bitmapBytes > Limits.maxDataTransfer) {
      throw new VfioError(Errno.E2BIG, `DMA_LOGGING_REPORT bitmap of ${bitmapBytes} bytes (at most ${Limits.maxDataTransfer}): ask for less at once`);
    }
    return { iova: Number(iova), length: Number(length), pageSize: Number(pageSize), bitmapBytes };
  }

  private reportSize(data: Uint8Array): number {
    return PayloadSize.DMA_LOGGING_REPORT + this.reportRequest(data).bitmapBytes;
  }

  private report(data: Uint8Array): Uint8Array {
    const { iova, length, pageSize } = this.reportRequest(data);
    return concat(data.subarray(0, PayloadSize.DMA_LOGGING_REPORT), this.logging!.log.report(iova, length, pageSize));
  }

  // ---- helpers ----------------------------------------------------------------------------------

  /** A SET or PROBE reply is the request itself: refuse one whose argsz cannot hold it. */
  private echo(payload: Uint8Array, argsz: number): Uint8Array {
    if (argsz < payload.length) throw invalid(`DEVICE_FEATURE argsz ${argsz} cannot hold the ${payload.length}-byte reply`);
    return payload;
  }

  private requireMigration(what: string): MigrationController {
    if (!this.options.migration) throw new VfioError(Errno.ENOTSUP, `${what}: this device does not support migration over vfio-user`);
    return this.options.migration;
  }
}

const invalid = (message: string): VfioError => new VfioError(Errno.EINVAL, message);

const isPowerOfTwo = (value: bigint): boolean => value > 0n && (value & (value - 1n)) === 0n;

function safeNumber(value: bigint): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(`address 0x${value.toString(16)} beyond 2^53`);
  return Number(value);
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}
