// Moving command data between the controller and its host. Handlers see one DataTransfer
// interface; for commands from a submission queue it walks the PRPs or SGL of the SQE through the
// guest's DmaSpace, for in-process callers it is a plain buffer. A bad pointer or descriptor
// becomes a CommandError with the status the spec names for it.

import { DmaError, type DmaSpace, type PinnedView } from '../vfio-user/device.js';
import { field64 } from './command.js';
import { andThen, isPromise, type MaybePromise } from './maybe-async.js';
import { Psdt, SGL_DESCRIPTOR_SIZE, SGL_SUBTYPE_ADDRESS, SglType, Sqe, Status } from './spec.js';

/** Completes the command with `status` (thrown by handlers and walkers, caught by the dispatcher). */
export class CommandError extends Error {
  constructor(
    readonly status: number,
    message = '',
    /** Optional CQE DW0 to report with the failure. */
    readonly dw0 = 0,
  ) {
    super(message);
    this.name = 'CommandError';
  }
}

export interface DataTransfer {
  /** Copies `data` into the host's data buffer, from its start. */
  toHost(data: Uint8Array): Promise<void>;
  /** Reads the first `length` bytes of the host's data buffer. */
  fromHost(length: number): Promise<Uint8Array>;
  /**
   * Runs `io` on the host's data buffer itself (the first `length` bytes, as scatter/gather
   * pieces), so a backend can read into or write from guest memory with no copy. `toHost` says
   * which way the data flows. Falls back to a bounce buffer where memory cannot be pinned.
   */
  direct(length: number, toHost: boolean, io: (buffers: Uint8Array[]) => MaybePromise<void>): MaybePromise<void>;
}

/** A guest-physical range. */
export interface Segment {
  addr: number;
  length: number;
}

/** Runs a data-pointer access; a DMA failure is the command's Data Transfer Error. */
async function dataAccess<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof DmaError) throw new CommandError(Status.DATA_TRANSFER_ERROR, err.message);
    throw err;
  }
}



/** A synchronous copy through a view (DmaSpace.direct); memory truncated under it is a Data Transfer Error. */
function copyDirect<T>(dma: DmaSpace, s: Segment, forWrite: boolean, access: (bytes: Uint8Array) => T): T | undefined {
  try {
    return dma.direct(s.addr, s.length, forWrite, access);
  } catch (err) {
    if (err instanceof DmaError) throw new CommandError(Status.DATA_TRANSFER_ERROR, 'guest memory was truncated during the copy');
    throw err;
  }
}

function pushMerged(segments: Segment[], addr: number, length: number): void {
  const last = segments[segments.length - 1];
  if (last && last.addr + last.length === addr) last.length += length;
  else segments.push({ addr, length });
}

// ---- PRP (Base §4.3.1 "Physical Region Page Entry and List") -------------------------------------

/**
 * The guest ranges a PRP pair describes. Synchronous unless a PRP list must come by message: the
 * common 4 KiB command (PRP1 alone) or a list in mapped memory resolves in the caller's turn.
 */
export function walkPrps(dma: DmaSpace, prp1: number, prp2: number, length: number, pageSize: number): MaybePromise<Segment[]> {
  const segments: Segment[] = [];
  if (length === 0) return segments;
  // The first entry may start anywhere dword-aligned inside a page; every later entry starts a page.
  if (prp1 % 4 !== 0) throw new CommandError(Status.PRP_OFFSET_INVALID, 'PRP1 not dword aligned');
  const first = Math.min(length, pageSize - (prp1 % pageSize));
  pushMerged(segments, prp1, first);
  const remaining = length - first;
  if (remaining === 0) return segments;
  if (remaining <= pageSize) {
    if (prp2 % pageSize !== 0) throw new CommandError(Status.PRP_OFFSET_INVALID, 'PRP2 data pointer has an offset');
    pushMerged(segments, prp2, remaining);
    return segments;
  }
  // PRP2 points at a list; a list that does not fit its page chains through its last entry.
  if (prp2 % 8 !== 0) throw new CommandError(Status.PRP_OFFSET_INVALID, 'PRP list pointer not qword aligned');
  const walkList = (list: number, remaining: number): MaybePromise<Segment[]> => {
    const slots = (pageSize - (list % pageSize)) / 8;
    const pagesLeft = Math.ceil(remaining / pageSize);
    const chains = pagesLeft > slots;
    const count = chains ? slots : pagesLeft;
    return andThen(readGuest(dma, list, count * 8), (entries) => {
      let left = remaining;
      for (let i = 0; i < count; i++) {
        const entry = field64(entries, i * 8);
        if (chains && i === count - 1) {
          // Only PRP2 may point into the middle of a page. Chained lists start a page, so every step
          // after the first consumes data pages and a list that points at itself cannot loop forever.
          if (entry % pageSize !== 0) throw new CommandError(Status.PRP_OFFSET_INVALID, 'chained PRP list pointer not page aligned');
          return walkList(entry, left);
        }
        if (entry % pageSize !== 0) throw new CommandError(Status.PRP_OFFSET_INVALID, `PRP list entry ${i} has an offset`);
        const n = Math.min(pageSize, left);
        pushMerged(segments, entry, n);
        left -= n;
      }
      return segments;
    });
  };
  return walkList(prp2, remaining);
}

/** A copy of guest memory: taken in place when mapped, by message otherwise (a failure is a Data Transfer Error). */
function readGuest(dma: DmaSpace, addr: number, length: number): MaybePromise<Uint8Array> {
  return copyDirect(dma, { addr, length }, false, (view) => view.slice()) ?? dataAccess(() => dma.read(addr, length));
}

// ---- SGL (Base §4.3.2 "Scatter Gather List") ----------------------------------------------------

/** Bounds the walk, so a segment chain that loops cannot spin forever. */
const MAX_SGL_DESCRIPTORS = 1 << 16;

interface Descriptor {
  addr: number;
  length: number;
  type: number;
  subtype: number;
}

function descriptor(bytes: Uint8Array, at: number): Descriptor {
  const view = new DataView(bytes.buffer, bytes.byteOffset + at, SGL_DESCRIPTOR_SIZE);
  const id = view.getUint8(15);
  return { addr: field64(bytes, at), length: view.getUint32(8, true), type: id >> 4, subtype: id & 0xf };
}

export async function walkSgl(dma: DmaSpace, sgl1: Uint8Array, length: number): Promise<Segment[]> {
  const segments: Segment[] = [];
  let total = 0;
  let seen = 0;
  const takeData = (d: Descriptor): void => {
    if (d.type !== SglType.DATA_BLOCK || d.subtype !== SGL_SUBTYPE_ADDRESS) {
      throw new CommandError(Status.SGL_DESCRIPTOR_TYPE_INVALID, `SGL descriptor type ${d.type}/${d.subtype}`);
    }
    const n = Math.min(d.length, length - total);
    if (n > 0) pushMerged(segments, d.addr, n);
    total += n;
  };
  let current = descriptor(sgl1, 0);
  // `current` is either a data block (the whole SGL) or points at the next segment.
  for (;;) {
    if (total >= length) break;
    if (current.type === SglType.DATA_BLOCK) {
      takeData(current);
      break;
    }
    if (current.type !== SglType.SEGMENT && current.type !== SglType.LAST_SEGMENT) {
      throw new CommandError(Status.SGL_DESCRIPTOR_TYPE_INVALID, `SGL descriptor type ${current.type}`);
    }
    if (current.subtype !== SGL_SUBTYPE_ADDRESS) throw new CommandError(Status.SGL_DESCRIPTOR_TYPE_INVALID, `SGL segment subtype ${current.subtype}`);
    if (current.length === 0 || current.length % SGL_DESCRIPTOR_SIZE !== 0) {
      throw new CommandError(Status.INVALID_SGL_SEGMENT_DESCRIPTOR, `SGL segment length ${current.length}`);
    }
    const count = current.length / SGL_DESCRIPTOR_SIZE;
    seen += count;
    if (seen > MAX_SGL_DESCRIPTORS) throw new CommandError(Status.INVALID_SGL_DESCRIPTOR_COUNT, 'SGL too long');
    const isLast = current.type === SglType.LAST_SEGMENT;
    const at = current.addr;
    const bytes = await dataAccess(() => dma.read(at, current.length));
    let next: Descriptor | null = null;
    for (let i = 0; i < count && total < length; i++) {
      const d = descriptor(bytes, i * SGL_DESCRIPTOR_SIZE);
      if (d.type === SglType.SEGMENT || d.type === SglType.LAST_SEGMENT) {
        // Only the final descriptor of a non-last segment may point onwards.
        if (isLast || i !== count - 1) throw new CommandError(Status.INVALID_SGL_SEGMENT_DESCRIPTOR, 'misplaced SGL segment descriptor');
        next = d;
        break;
      }
      takeData(d);
    }
    if (total >= length) break;
    if (!next) break;
    current = next;
  }
  if (total < length) throw new CommandError(Status.DATA_SGL_LENGTH_INVALID, `SGL describes ${total} of ${length} bytes`);
  return segments;
}

// ---- transfers ----------------------------------------------------------------------------------

/** The pins of one direct transfer, released together (on every path, after checkIntact). */
function releaseAll(pins: readonly PinnedView[]): void {
  for (const pin of pins) pin.release();
}

/** After the I/O: memory truncated under a pin read zeros or wrote nowhere. */
function checkIntact(pins: readonly PinnedView[]): void {
  for (const pin of pins) if (!pin.intact()) throw new CommandError(Status.DATA_TRANSFER_ERROR, 'guest memory was truncated during the transfer');
}

export interface GuestTransferOptions {
  dma: DmaSpace;
  sqe: Uint8Array;
  pageSize: number;
  /** SGLs are for I/O commands only; admin commands over PCIe use PRPs. */
  allowSgl: boolean;
  /** Throws when the command must no longer touch guest memory (controller reset meanwhile). */
  guard: () => void;
}

/** The data pointer of a queued command, resolved on first use. */
export class GuestDataTransfer implements DataTransfer {
  constructor(private readonly options: GuestTransferOptions) {}

  async toHost(data: Uint8Array): Promise<void> {
    const segments = await this.segments(data.length);
    this.options.guard();
    await this.copyToGuest(segments, data);
  }

  async fromHost(length: number): Promise<Uint8Array> {
    const segments = await this.segments(length);
    this.options.guard();
    return this.copyFromGuest(segments, length);
  }

  direct(length: number, toHost: boolean, io: (buffers: Uint8Array[]) => MaybePromise<void>): MaybePromise<void> {
    const segments = this.segments(length);
    if (isPromise(segments)) return segments.then((s) => this.directOn(s, length, toHost, io));
    return this.directOn(segments, length, toHost, io);
  }

  /**
   * direct() once the segments are known. Written out rather than chained through closures: it
   * runs for every data command, and at QD32 the allocations were a measurable part of its cost.
   */
  private directOn(segments: Segment[], length: number, toHost: boolean, io: (buffers: Uint8Array[]) => MaybePromise<void>): MaybePromise<void> {
    this.options.guard();
    const pins: PinnedView[] = [];
    const buffers: Uint8Array[] = [];
    for (const s of segments) {
      const pin = this.options.dma.pin(s.addr, s.length, toHost);
      if (!pin) break;
      pins.push(pin);
      buffers.push(pin.bytes);
    }
    if (pins.length < segments.length) {
      releaseAll(pins);
      return this.bounce(segments, length, toHost, io);
    }
    // Pinned: a DMA_UNMAP meanwhile waits for us instead of pulling the memory away.
    let moved: MaybePromise<void>;
    try {
      moved = io(buffers);
    } catch (err) {
      releaseAll(pins);
      throw err;
    }
    if (isPromise(moved)) return moved.then(() => checkIntact(pins)).finally(() => releaseAll(pins));
    try {
      checkIntact(pins);
    } finally {
      releaseAll(pins);
    }
  }

  /** Message-based DMA (no fd): through a bounce buffer and the copy path. */
  private async bounce(segments: Segment[], length: number, toHost: boolean, io: (buffers: Uint8Array[]) => MaybePromise<void>): Promise<void> {
    if (toHost) {
      const bounce = Buffer.allocUnsafe(length);
      await io([bounce]);
      await this.copyToGuest(segments, bounce);
    } else {
      await io([await this.copyFromGuest(segments, length)]);
    }
  }

  private async copyToGuest(segments: Segment[], data: Uint8Array): Promise<void> {
    const { dma } = this.options;
    let done = 0;
    for (const s of segments) {
      const chunk = data.subarray(done, done + s.length);
      // Mapped guest memory is written in place; only message-based DMA needs to wait.
      const copied = copyDirect(dma, s, true, (view) => {
        view.set(chunk);
        return true;
      });
      if (!copied) await dataAccess(() => dma.write(s.addr, chunk));
      done += s.length;
    }
  }

  private async copyFromGuest(segments: Segment[], length: number): Promise<Uint8Array> {
    const { dma } = this.options;
    // Every byte is overwritten below, so the buffer need not be zeroed first.
    const out = Buffer.allocUnsafe(length);
    let done = 0;
    for (const s of segments) {
      const copied = copyDirect(dma, s, false, (view) => {
        out.set(view, done);
        return true;
      });
      if (!copied) out.set(await dataAccess(() => dma.read(s.addr, s.length)), done);
      done += s.length;
    }
    return out;
  }

  private segments(length: number): MaybePromise<Segment[]> {
    const { dma, sqe, pageSize, allowSgl } = this.options;
    const psdt = (sqe[Sqe.FLAGS]! >> Sqe.PSDT_SHIFT) & Sqe.PSDT_MASK;
    if (psdt === Psdt.PRP) return walkPrps(dma, field64(sqe, Sqe.PRP1), field64(sqe, Sqe.PRP2), length, pageSize);
    if (!allowSgl || psdt === 3) return Promise.reject(new CommandError(Status.INVALID_FIELD, `PSDT ${psdt} not allowed here`));
    return walkSgl(dma, sqe.subarray(Sqe.SGL1, Sqe.SGL1 + SGL_DESCRIPTOR_SIZE), length);
  }
}

/** For in-process callers: data in is a buffer, data out is collected. */
export class BufferDataTransfer implements DataTransfer {
  output: Uint8Array | undefined;

  constructor(private readonly input?: Uint8Array) {}

  async toHost(data: Uint8Array): Promise<void> {
    this.output = data.slice();
  }

  async fromHost(length: number): Promise<Uint8Array> {
    if (length === 0) return new Uint8Array(0);
    if (!this.input || this.input.length < length) {
      throw new CommandError(Status.DATA_SGL_LENGTH_INVALID, `command needs ${length} bytes of data, caller gave ${this.input?.length ?? 0}`);
    }
    return this.input.slice(0, length);
  }

  async direct(length: number, toHost: boolean, io: (buffers: Uint8Array[]) => MaybePromise<void>): Promise<void> {
    if (toHost) {
      const out = Buffer.allocUnsafe(length);
      await io([out]);
      this.output = out;
    } else {
      await io([await this.fromHost(length)]);
    }
  }
}
