// The dirty-page log behind DMA_LOGGING_START/STOP/REPORT: which pages of guest memory the device
// wrote since they were last reported. The bitmap is sparse (slices are allocated as pages in them
// get dirty), so logging all of memory costs in proportion to what the device touches, not to the
// size of the ranges asked for.

import { dirtyBitmapBytes } from './protocol.js';

/** Pages per slice: 4 KiB of bitmap, 128 MiB of guest memory at 4 KiB pages. */
const SLICE_PAGES = 1 << 15;

export interface LoggedRange {
  /** Byte addresses, [start, end). */
  start: number;
  end: number;
}

export class DirtyLog {
  private readonly slices = new Map<number, Uint8Array>();

  /** `ranges` empty means every write is logged. */
  constructor(
    readonly pageSize: number,
    readonly ranges: readonly LoggedRange[],
  ) {}

  /** A DmaTable write observer: marks the pages [addr, addr+length) touches. */
  readonly record = (addr: number, length: number): void => {
    if (length <= 0) return;
    const end = addr + length;
    if (this.ranges.length === 0) {
      this.markPages(addr, end);
      return;
    }
    for (const range of this.ranges) {
      const from = Math.max(addr, range.start);
      const to = Math.min(end, range.end);
      if (from < to) this.markPages(from, to);
    }
  };

  /**
   * The pages of [iova, iova+length) written since the last report, at `reportPageSize` (bit i is
   * the page at iova + i·reportPageSize, u64-padded, little-endian), and forgets them. A logged page
   * only partly inside the range stays dirty: reporting it twice is harmless, losing it is not.
   */
  report(iova: number, length: number, reportPageSize: number): Uint8Array {
    const end = iova + length;
    const out = new Uint8Array(dirtyBitmapBytes(length, reportPageSize));
    const firstPage = Math.floor(iova / this.pageSize);
    const lastPage = Math.floor((end - 1) / this.pageSize);
    for (const [index, slice] of this.slicesBetween(firstPage, lastPage)) {
      const base = index * SLICE_PAGES;
      const from = Math.max(firstPage, base) - base;
      const to = Math.min(lastPage, base + SLICE_PAGES - 1) - base;
      for (let bit = from; bit <= to; ) {
        if (slice[bit >> 3] === 0 && (bit & 7) === 0) {
          bit += 8;
          continue;
        }
        if (slice[bit >> 3]! & (1 << (bit & 7))) {
          const pageStart = (base + bit) * this.pageSize;
          const pageEnd = pageStart + this.pageSize;
          const a = Math.max(pageStart, iova);
          const b = Math.min(pageEnd, end);
          setBits(out, Math.floor((a - iova) / reportPageSize), Math.floor((b - 1 - iova) / reportPageSize) + 1);
          if (pageStart >= iova && pageEnd <= end) slice[bit >> 3]! &= ~(1 << (bit & 7));
        }
        bit++;
      }
    }
    return out;
  }

  private markPages(from: number, to: number): void {
    const first = Math.floor(from / this.pageSize);
    const last = Math.floor((to - 1) / this.pageSize);
    for (let page = first; page <= last; ) {
      const index = Math.floor(page / SLICE_PAGES);
      const base = index * SLICE_PAGES;
      const upTo = Math.min(last, base + SLICE_PAGES - 1);
      let slice = this.slices.get(index);
      if (!slice) {
        slice = new Uint8Array(SLICE_PAGES / 8);
        this.slices.set(index, slice);
      }
      setBits(slice, page - base, upTo - base + 1);
      page = upTo + 1;
    }
  }

  /** The allocated slices that hold pages first..last, visiting whichever side is smaller. */
  private slicesBetween(first: number, last: number): [number, Uint8Array][] {
    const lo = Math.floor(first / SLICE_PAGES);
    const hi = Math.floor(last / SLICE_PAGES);
    if (hi - lo + 1 > this.slices.size) {
      return [...this.slices].filter(([index]) => index >= lo && index <= hi);
    }
    const out: [number, Uint8Array][] = [];
    for (let index = lo; index <= hi; index++) {
      const slice = this.slices.get(index);
      if (slice) out.push([index, slice]);
    }
    return out;
  }
}

/** Sets bits [from, to) of a little-endian bitmap, whole bytes at a time in the middle. */
function setBits(bitmap: Uint8Array, from: number, to: number): void {
  let bit = from;
  for (; bit < to && (bit & 7) !== 0; bit++) bitmap[bit >> 3]! |= 1 << (bit & 7);
  const wholeEnd = to - (to & 7);
  if (bit < wholeEnd) {
    bitmap.fill(0xff, bit >> 3, wholeEnd >> 3);
    bit = wholeEnd;
  }
  for (; bit < to; bit++) bitmap[bit >> 3]! |= 1 << (bit & 7);
}
