// Typed encoders/decoders for the vfio-user header and the payload of every command 1–18.
// Layouts: shared/reference/vfio-user-protocol.md §1.2 (P-offsets), with the QEMU 11.1.3 framing of
// DMA_READ/DMA_WRITE (u64 count, data after it) measured in qemu-11-facts.md §2.

import { DecodeError, struct } from './struct.js';
import { HEADER_SIZE, HeaderFlags, PayloadSize, RegionCapId } from './protocol.js';

export { DecodeError };

export const headerCodec = struct([
  ['id', 'u16'],
  ['command', 'u16'],
  ['size', 'u32'],
  ['flags', 'u32'],
  ['error', 'u32'],
] as const);
export interface HeaderFields {
  id: number;
  command: number;
  size: number;
  flags: number;
  error: number;
}

export interface Message {
  header: HeaderFields;
  payload: Uint8Array;
  fds: number[];
}

export function decodeHeader(bytes: Uint8Array): HeaderFields {
  const { tail: _tail, ...header } = headerCodec.decode(bytes, 'header');
  return header;
}

export function encodeMessage(
  header: Omit<HeaderFields, 'size'>,
  payload: Uint8Array = new Uint8Array(0),
): Uint8Array {
  return headerCodec.encode({ ...header, size: HEADER_SIZE + payload.length }, payload);
}

export const isReply = (flags: number): boolean =>
  (flags & HeaderFlags.TYPE_MASK) === HeaderFlags.TYPE_REPLY;

// ---- VERSION (1) -------------------------------------------------------------------------------

const versionHead = struct([
  ['major', 'u16'],
  ['minor', 'u16'],
] as const);

export interface VersionPayload {
  major: number;
  minor: number;
  /** The JSON text without its terminating NUL; empty when absent. */
  json: string;
}

export const version = {
  encode(v: VersionPayload): Uint8Array {
    const text = v.json.length > 0 ? Buffer.from(`${v.json}\0`, 'utf8') : new Uint8Array(0);
    return versionHead.encode(v, text);
  },
  decode(bytes: Uint8Array): VersionPayload {
    const { major, minor, tail } = versionHead.decode(bytes, 'VERSION');
    if (tail.length === 0) return { major, minor, json: '' };
    if (tail[tail.length - 1] !== 0) throw new DecodeError('VERSION: JSON is not NUL-terminated');
    return { major, minor, json: Buffer.from(tail.subarray(0, tail.length - 1)).toString('utf8') };
  },
};

// ---- DMA_MAP (2) / DMA_UNMAP (3) ---------------------------------------------------------------

export const dmaMap = struct([
  ['argsz', 'u32'],
  ['flags', 'u32'],
  ['offset', 'u64'],
  ['iova', 'u64'],
  ['size', 'u64'],
] as const);

export const dmaUnmap = struct([
  ['argsz', 'u32'],
  ['flags', 'u32'],
  ['iova', 'u64'],
  ['size', 'u64'],
] as const);

// ---- DEVICE_GET_INFO (4) ------------------------------------------------------------------------

export const deviceInfo = struct([
  ['argsz', 'u32'],
  ['flags', 'u32'],
  ['numRegions', 'u32'],
  ['numIrqs', 'u32'],
] as const);

// ---- DEVICE_GET_REGION_INFO (5) ----------------------------------------------------------------

export const regionInfo = struct([
  ['argsz', 'u32'],
  ['flags', 'u32'],
  ['index', 'u32'],
  ['capOffset', 'u32'],
  ['size', 'u64'],
  ['offset', 'u64'],
] as const);

export const capHeader = struct([
  ['id', 'u16'],
  ['version', 'u16'],
  ['next', 'u32'],
] as const);

export const sparseMmapHeader = struct([
  ['id', 'u16'],
  ['version', 'u16'],
  ['next', 'u32'],
  ['nrAreas', 'u32'],
  ['reserved', 'u32'],
] as const);

export const sparseArea = struct([
  ['offset', 'u64'],
  ['size', 'u64'],
] as const);

export interface SparseArea {
  offset: bigint;
  size: bigint;
}

export function encodeSparseMmapCap(areas: readonly SparseArea[], next = 0): Uint8Array {
  const body = new Uint8Array(areas.length * PayloadSize.SPARSE_MMAP_AREA);
  areas.forEach((area, i) => body.set(sparseArea.encode(area), i * PayloadSize.SPARSE_MMAP_AREA));
  return sparseMmapHeader.encode({ id: RegionCapId.SPARSE_MMAP, version: 1, next, nrAreas: areas.length, reserved: 0 }, body);
}

export function decodeSparseMmapCap(bytes: Uint8Array): SparseArea[] {
  const { nrAreas, tail } = sparseMmapHeader.decode(bytes, 'sparse mmap capability');
  if (tail.length < nrAreas * PayloadSize.SPARSE_MMAP_AREA) {
    throw new DecodeError(`sparse mmap capability: ${nrAreas} areas do not fit in ${tail.length} bytes`);
  }
  return Array.from({ length: nrAreas }, (_, i) => {
    const { offset, size } = sparseArea.decode(tail.subarray(i * PayloadSize.SPARSE_MMAP_AREA), 'area');
    return { offset, size };
  });
}

// ---- DEVICE_GET_REGION_IO_FDS (6) --------------------------------------------------------------

export const regionIoFds = struct([
  ['argsz', 'u32'],
  ['flags', 'u32'],
  ['index', 'u32'],
  ['count', 'u32'],
] as const);

// ---- DEVICE_GET_IRQ_INFO (7) / DEVICE_SET_IRQS (8) ---------------------------------------------

export const irqInfo = struct([
  ['argsz', 'u32'],
  ['flags', 'u32'],
  ['index', 'u32'],
  ['count', 'u32'],
] as const);

export const setIrqs = struct([
  ['argsz', 'u32'],
  ['flags', 'u32'],
  ['index', 'u32'],
  ['start', 'u32'],
  ['count', 'u32'],
] as const);

// ---- REGION_READ (9) / REGION_WRITE (10) / DMA_READ (11) / DMA_WRITE (12) ----------------------

export const regionAccess = struct([
  ['offset', 'u64'],
  ['region', 'u32'],
  ['count', 'u32'],
] as const);

export const dmaAccess = struct([
  ['address', 'u64'],
  ['count', 'u64'],
] as const);

// ---- REGION_WRITE_MULTI (15) --------------------------------------------------------------------

export const writeMultiCount = struct([['wrCnt', 'u64']] as const);

export interface WriteMultiEntry {
  offset: bigint;
  region: number;
  count: number;
  data: Uint8Array;
}

export const writeMulti = {
  encode(entries: readonly WriteMultiEntry[]): Uint8Array {
    const body = new Uint8Array(entries.length * PayloadSize.WRITE_MULTI_ENTRY);
    entries.forEach((e, i) => {
      const data = new Uint8Array(PayloadSize.WRITE_MULTI_DATA);
      data.set(e.data.subarray(0, PayloadSize.WRITE_MULTI_DATA));
      body.set(regionAccess.encode(e, data), i * PayloadSize.WRITE_MULTI_ENTRY);
    });
    return writeMultiCount.encode({ wrCnt: BigInt(entries.length) }, body);
  },
  decode(bytes: Uint8Array): WriteMultiEntry[] {
    const { wrCnt, tail } = writeMultiCount.decode(bytes, 'REGION_WRITE_MULTI');
    if (wrCnt * BigInt(PayloadSize.WRITE_MULTI_ENTRY) !== BigInt(tail.length)) {
      throw new DecodeError(`REGION_WRITE_MULTI: ${wrCnt} entries do not match ${tail.length} bytes`);
    }
    const entries: WriteMultiEntry[] = [];
    for (let at = 0; at < tail.length; at += PayloadSize.WRITE_MULTI_ENTRY) {
      const { offset, region, count, tail: data } = regionAccess.decode(tail.subarray(at, at + PayloadSize.WRITE_MULTI_ENTRY));
      if (count > PayloadSize.WRITE_MULTI_DATA) {
        throw new DecodeError(`REGION_WRITE_MULTI: entry count ${count} exceeds ${PayloadSize.WRITE_MULTI_DATA}`);
      }
      entries.push({ offset, region, count, data: data.subarray(0, count) });
    }
    return entries;
  },
};

// ---- DEVICE_FEATURE (16) / MIG_DATA_READ (17) / MIG_DATA_WRITE (18) ----------------------------
// The feature structures are the data that follows the 8-byte DEVICE_FEATURE header (§5 of the
// digest gives them as P-offsets from 8).

export const deviceFeature = struct([
  ['argsz', 'u32'],
  ['flags', 'u32'],
] as const);

/** MIGRATION (1), GET reply data. */
export const featureMigration = struct([['flags', 'u64']] as const);

/** MIG_DEVICE_STATE (2), GET reply and SET request data. */
export const featureMigState = struct([
  ['deviceState', 'u32'],
  ['dataFd', 'u32'],
] as const);

export const dmaLoggingControl = struct([
  ['pageSize', 'u64'],
  ['numRanges', 'u32'],
  ['reserved', 'u32'],
] as const);

export const dmaLoggingRange = struct([
  ['iova', 'u64'],
  ['length', 'u64'],
] as const);

export interface DmaLoggingRange {
  iova: bigint;
  length: bigint;
}

/** DMA_LOGGING_START (6) / DMA_LOGGING_STOP (7) data: a page size and the ranges inline. */
export const dmaLogging = {
  encode(v: { pageSize: bigint; ranges: readonly DmaLoggingRange[] }): Uint8Array {
    const body = new Uint8Array(v.ranges.length * PayloadSize.DMA_LOGGING_RANGE);
    v.ranges.forEach((r, i) => body.set(dmaLoggingRange.encode(r), i * PayloadSize.DMA_LOGGING_RANGE));
    return dmaLoggingControl.encode({ pageSize: v.pageSize, numRanges: v.ranges.length, reserved: 0 }, body);
  },
  decode(bytes: Uint8Array): { pageSize: bigint; ranges: DmaLoggingRange[] } {
    const { pageSize, numRanges, tail } = dmaLoggingControl.decode(bytes, 'DMA logging control');
    if (tail.length < numRanges * PayloadSize.DMA_LOGGING_RANGE) {
      throw new DecodeError(`DMA logging control: ${numRanges} ranges do not fit in ${tail.length} bytes`);
    }
    const ranges = Array.from({ length: numRanges }, (_, i) => {
      const { iova, length } = dmaLoggingRange.decode(tail.subarray(i * PayloadSize.DMA_LOGGING_RANGE), 'range');
      return { iova, length };
    });
    return { pageSize, ranges };
  },
};

/** DMA_LOGGING_REPORT (8) GET request data; the reply appends the bitmap (u64 words, bit i = page iova+i·pageSize). */
export const dmaLoggingReport = struct([
  ['iova', 'u64'],
  ['length', 'u64'],
  ['pageSize', 'u64'],
] as const);

/** MIG_DATA_READ/WRITE: the data follows (a READ request carries none). */
export const migData = struct([
  ['argsz', 'u32'],
  ['size', 'u32'],
] as const);
