// The bytes MIG_DATA_READ hands out and MIG_DATA_WRITE takes in. vfio-user carries them as an opaque
// stream (chunking need not survive the trip); this framing is ours, not the protocol's: records
// around the device's own bytes, so that a target tells pre-copy parts from the final state, and a
// stream cut short from a whole one, before its device sees any of it.

import { VfioError } from './device.js';
import { Errno } from './protocol.js';
import { struct } from './struct.js';

/** 'VUMR' in little-endian: a record of a vfio-user migration stream. */
const RECORD_MAGIC = 0x524d5556;

export const RecordKind = {
  /** What a running device offered ahead (PRE_COPY); the final state supersedes it. */
  PRE_COPY: 1,
  /** The whole device state, taken while stopped (STOP_COPY); always the last record. */
  DEVICE_STATE: 2,
} as const;

const recordHeader = struct([
  ['magic', 'u32'],
  ['kind', 'u32'],
  ['length', 'u32'],
] as const);

export function encodeRecord(kind: (typeof RecordKind)[keyof typeof RecordKind], body: Uint8Array): Uint8Array {
  return recordHeader.encode({ magic: RECORD_MAGIC, kind, length: body.length }, body);
}

export interface ReceivedStream {
  preCopy: Uint8Array[];
  state: Uint8Array;
}

/** Splits a received stream into its records; a VfioError (EINVAL) says what is wrong with it. */
export function parseStream(bytes: Uint8Array): ReceivedStream {
  const refuse = (why: string): VfioError => new VfioError(Errno.EINVAL, `migration stream: ${why}`);
  const preCopy: Uint8Array[] = [];
  for (let at = 0; at < bytes.length; ) {
    if (bytes.length - at < recordHeader.size) throw refuse(`ends inside a record header at byte ${at}`);
    const { magic, kind, length } = recordHeader.decode(bytes.subarray(at));
    if (magic !== RECORD_MAGIC) throw refuse(`no record at byte ${at} (magic 0x${magic.toString(16)})`);
    const start = at + recordHeader.size;
    const end = start + length;
    if (end > bytes.length) throw refuse(`ends inside a record (${bytes.length - start} of its ${length} bytes)`);
    const body = bytes.subarray(start, end);
    if (kind === RecordKind.PRE_COPY) {
      preCopy.push(body);
    } else if (kind === RecordKind.DEVICE_STATE) {
      if (end !== bytes.length) throw refuse(`${bytes.length - end} bytes follow the device state`);
      return { preCopy, state: body };
    } else {
      throw refuse(`record of unknown kind ${kind} at byte ${at}`);
    }
    at = end;
  }
  throw refuse(bytes.length === 0 ? 'empty' : 'no device state after the pre-copy parts');
}

/** Bytes queued for MIG_DATA_READ: records appended whole, read out in whatever sizes the client asks. */
export class OutgoingStream {
  private chunks: Uint8Array[] = [];
  private offset = 0;

  get pending(): number {
    return this.chunks.reduce((n, c) => n + c.length, 0) - this.offset;
  }

  append(record: Uint8Array): void {
    if (record.length > 0) this.chunks.push(record);
  }

  take(max: number): Uint8Array {
    const out = new Uint8Array(Math.min(max, this.pending));
    for (let done = 0; done < out.length; ) {
      const head = this.chunks[0]!;
      const n = Math.min(head.length - this.offset, out.length - done);
      out.set(head.subarray(this.offset, this.offset + n), done);
      done += n;
      this.offset += n;
      if (this.offset === head.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
    return out;
  }
}

/** Bytes MIG_DATA_WRITE delivered, kept until RESUMING→STOP hands them to the device. */
export class IncomingStream {
  private chunks: Uint8Array[] = [];
  private size = 0;

  constructor(private readonly limit: number) {}

  get length(): number {
    return this.size;
  }

  append(data: Uint8Array): void {
    if (this.size + data.length > this.limit) {
      throw new VfioError(Errno.ENOSPC, `migration stream larger than ${this.limit} bytes`);
    }
    // The payload may be a view into a larger socket read: keep only these bytes.
    this.chunks.push(data.slice());
    this.size += data.length;
  }

  bytes(): Uint8Array {
    const out = new Uint8Array(this.size);
    let at = 0;
    for (const chunk of this.chunks) {
      out.set(chunk, at);
      at += chunk.length;
    }
    return out;
  }
}
