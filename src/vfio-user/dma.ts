// The client's DMA table: every guest-physical range the device may touch. fd-backed ranges are
// mmapped once and accessed in place; ranges without an fd go through DMA_READ/DMA_WRITE messages.
// Every device write to guest memory passes here, so this is also where writes are observed (dirty
// logging) and where they can be routed through the client (write-through during a migration).
//
// A client can shrink the file behind a mapping. The native guard (native/src/memory.cc) then
// turns the mapping into zero pages instead of letting the access kill the process, and counts it:
// from then on the mapping is refused (a DmaError for every access) until the client unmaps it,
// and an access whose copy saw the count move fails too, since it read zeros or wrote nowhere.

import { DmaError, VfioError, type DmaSpace, type PinnedView, type WriteObserver } from './device.js';
import { Errno } from './protocol.js';
import type { NativeMemory } from './transport.js';

export interface DmaMapping {
  iova: number;
  size: number;
  readable: boolean;
  writable: boolean;
  /** Bytes of the mapping, or null when it has no fd and goes through messages. */
  bytes: Uint8Array | null;
  /** The same memory as dwords (little-endian hosts, 4-aligned mappings): loadWord/storeWord. */
  words: Int32Array | null;
  /** The whole mmapped buffer (page-rounded), kept to unmap it. */
  backing: ArrayBuffer | null;
  /** Pinned views in use: the munmap of a mapping the client removed waits for them. */
  pins: number;
  removed: boolean;
  /** The mapping's slot in the native poison counters (-1: unguarded), and the count it started at. */
  guardSlot: number;
  poisonAtMap: number;
}

const TRUNCATED = 'into guest memory its owner truncated';

/** Int32Array reads and stores in the host's byte order; guest structures are little-endian. */
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** The dword at `offset` of a mapping whose words cannot be used (unaligned, big-endian host). */
const wordView = (mapping: DmaMapping, offset: number): DataView => new DataView(mapping.bytes!.buffer, mapping.bytes!.byteOffset + offset, 4);

/** Carries DMA for ranges without an fd: the session's DMA_READ/DMA_WRITE requests. */
export interface RemoteDma {
  read(addr: number, length: number): Promise<Uint8Array>;
  write(addr: number, data: Uint8Array): Promise<void>;
}

export class DmaTable implements DmaSpace {
  /** Sorted by iova, never overlapping. */
  private mappings: DmaMapping[] = [];
  /** Pinned views outstanding across all mappings, and who waits for them to reach zero. */
  private pinned = 0;
  private unpinnedWaiters: (() => void)[] = [];
  /** The same for views pinned for writing, which write-through must outlive. */
  private pinnedForWrite = 0;
  private writePinWaiters: (() => void)[] = [];
  /** Replaced, never mutated, so a notification round survives an observer leaving mid-way. */
  private writeObservers: readonly WriteObserver[] = [];
  private writeThrough = false;

  /** The native poison counters, read on every access (held here, not looked up through `memory` each time). */
  private readonly poisonCounts: Uint32Array;

  constructor(
    private readonly memory: NativeMemory,
    private readonly maxMappings: number,
    private remote: RemoteDma | null = null,
  ) {
    this.poisonCounts = memory.poisonCounts;
  }

  setRemote(remote: RemoteDma | null): void {
    this.remote = remote;
  }

  get count(): number {
    return this.mappings.length;
  }

  list(): readonly DmaMapping[] {
    return this.mappings;
  }

  map(options: { iova: bigint; size: bigint; readable: boolean; writable: boolean; fd?: number; fileOffset: bigint }): void {
    const { iova, size } = checkRange(options.iova, options.size);
    if (this.mappings.length >= this.maxMappings) throw new VfioError(Errno.ENOSPC, 'too many DMA mappings');
    const at = this.insertionIndex(iova);
    const before = this.mappings[at - 1];
    const after = this.mappings[at];
    if ((before && before.iova + before.size > iova) || (after && iova + size > after.iova)) {
      throw new VfioError(Errno.EEXIST, `DMA range 0x${iova.toString(16)}+0x${size.toString(16)} overlaps a mapping`);
    }
    let bytes: Uint8Array | null = null;
    let backing: ArrayBuffer | null = null;
    let words: Int32Array | null = null;
    let guardSlot = -1;
    if (options.fd !== undefined) {
      const stat = this.memory.fdStat(options.fd);
      // Touching a mapping past the end of its file is SIGBUS, which would take every controller
      // of the process down: refuse ranges the fd does not hold.
      if (options.fileOffset + BigInt(size) > BigInt(stat.size)) {
        throw new VfioError(Errno.EINVAL, `DMA range ends past its fd (offset 0x${options.fileOffset.toString(16)}+0x${size.toString(16)}, fd size 0x${stat.size.toString(16)})`);
      }
      // hugetlbfs wants offsets aligned to its huge page, which st_blksize reports.
      const block = BigInt(Math.max(stat.blockSize, 4096));
      const alignedOffset = options.fileOffset - (options.fileOffset % block);
      const slack = Number(options.fileOffset - alignedOffset);
      const length = Math.min(roundUp(slack + size, Number(block)), Number(BigInt(stat.size) - alignedOffset));
      backing = this.memory.mmap(options.fd, alignedOffset, length, options.writable);
      bytes = new Uint8Array(backing, slack, size);
      if (LITTLE_ENDIAN && slack % 4 === 0) words = new Int32Array(backing, slack, size >>> 2);
      guardSlot = this.memory.guardSlot(backing);
    }
    this.mappings.splice(at, 0, {
      iova,
      size,
      readable: options.readable,
      writable: options.writable,
      bytes,
      words,
      backing,
      pins: 0,
      removed: false,
      guardSlot,
      poisonAtMap: guardSlot < 0 ? 0 : this.poisonCounts[guardSlot]!,
    });
  }

  unmap(iovaBig: bigint, sizeBig: bigint): void {
    const { iova, size } = checkRange(iovaBig, sizeBig);
    const index = this.mappings.findIndex((m) => m.iova === iova && m.size === size);
    if (index < 0) {
      throw new VfioError(Errno.ENOENT, `no DMA mapping at 0x${iova.toString(16)}+0x${size.toString(16)}`);
    }
    this.release(this.mappings.splice(index, 1)[0]!);
  }

  unmapAll(): void {
    for (const mapping of this.mappings) this.release(mapping);
    this.mappings = [];
  }

  view(addr: number, length: number, forWrite: boolean): Uint8Array | null {
    const mapping = this.directMapping(addr, length, forWrite);
    return mapping ? this.bytesFor(mapping, addr, length, forWrite) : null;
  }

  /** The bytes of [addr, addr+length) in `mapping`; a write is reported to the observers first. */
  private bytesFor(mapping: DmaMapping, addr: number, length: number, forWrite: boolean): Uint8Array {
    // The caller writes before its next await, so no report can come between this and the bytes.
    if (forWrite) this.notifyWrite(addr, length);
    const start = addr - mapping.iova;
    return mapping.bytes!.subarray(start, start + length);
  }

  pin(addr: number, length: number, forWrite: boolean): PinnedView | null {
    const mapping = this.directMapping(addr, length, forWrite);
    if (!mapping) return null;
    mapping.pins++;
    this.pinned++;
    if (forWrite) this.pinnedForWrite++;
    return new Pin(this, mapping, addr, length, forWrite, this.bytesFor(mapping, addr, length, forWrite));
  }

  /** Pin.release(): the pin's counts go, and whoever waited for them to reach zero wakes. */
  unpin(mapping: DmaMapping, addr: number, length: number, forWrite: boolean): void {
    if (forWrite) {
      // The I/O landed after the pin: a report taken meanwhile cleared these pages too early.
      this.notifyWrite(addr, length);
      if (--this.pinnedForWrite === 0 && this.writePinWaiters.length > 0) this.writePinWaiters.splice(0).forEach((wake) => wake());
    }
    mapping.pins--;
    if (mapping.removed && mapping.pins === 0) this.memory.munmap(mapping.backing!);
    if (--this.pinned === 0 && this.unpinnedWaiters.length > 0) this.unpinnedWaiters.splice(0).forEach((wake) => wake());
  }

  /** Resolves once no I/O holds pinned guest memory (it may be writing it right now). */
  whenUnpinned(): Promise<void> | null {
    if (this.pinned === 0) return null;
    return new Promise((resolve) => this.unpinnedWaiters.push(resolve));
  }

  observeWrites(observer: WriteObserver): () => void {
    this.writeObservers = [...this.writeObservers, observer];
    return () => {
      this.writeObservers = this.writeObservers.filter((o) => o !== observer);
    };
  }

  get routesWritesThroughClient(): boolean {
    return this.writeThrough;
  }

  routeWritesThroughClient(on: boolean): Promise<void> {
    this.writeThrough = on;
    if (!on || this.pinnedForWrite === 0) return Promise.resolve();
    return new Promise((resolve) => this.writePinWaiters.push(resolve));
  }

  private notifyWrite(addr: number, length: number): void {
    if (this.writeObservers.length === 0) return;
    for (const observer of this.writeObservers) observer(addr, length);
  }

  /** The one mapping that holds [addr, addr+length) in memory we can touch, if any (never a poisoned one). */
  private directMapping(addr: number, length: number, forWrite: boolean): DmaMapping | undefined {
    if (forWrite && this.writeThrough) return undefined;
    const mapping = this.find(addr);
    if (!mapping || !mapping.bytes || addr + length > mapping.iova + mapping.size) return undefined;
    if (forWrite ? !mapping.writable : !mapping.readable) return undefined;
    if (this.poisoned(mapping)) return undefined;
    return mapping;
  }

  poisoned(mapping: DmaMapping): boolean {
    return mapping.guardSlot >= 0 && this.poisonCounts[mapping.guardSlot] !== mapping.poisonAtMap;
  }

  /** Runs `access` on the mapped bytes of [addr, addr+length) if one mapping holds them; undefined otherwise. */
  direct<T>(addr: number, length: number, forWrite: boolean, access: (bytes: Uint8Array) => T): T | undefined {
    const mapping = this.directMapping(addr, length, forWrite);
    if (!mapping) return undefined;
    const result = access(this.bytesFor(mapping, addr, length, forWrite));
    if (this.poisoned(mapping)) throw new DmaError(addr, length, TRUNCATED);
    return result;
  }

  loadWord(addr: number): number | undefined {
    const mapping = this.directMapping(addr, 4, false);
    if (!mapping) return undefined;
    const offset = addr - mapping.iova;
    const value = mapping.words && offset % 4 === 0 ? mapping.words[offset >>> 2]! >>> 0 : wordView(mapping, offset).getUint32(0, true);
    if (this.poisoned(mapping)) throw new DmaError(addr, 4, TRUNCATED);
    return value;
  }

  storeWord(addr: number, value: number): boolean {
    const mapping = this.directMapping(addr, 4, true);
    if (!mapping) return false;
    this.notifyWrite(addr, 4);
    const offset = addr - mapping.iova;
    if (mapping.words && offset % 4 === 0) Atomics.store(mapping.words, offset >>> 2, value | 0);
    else wordView(mapping, offset).setUint32(0, value, true);
    if (this.poisoned(mapping)) throw new DmaError(addr, 4, TRUNCATED);
    return true;
  }

  async read(addr: number, length: number): Promise<Uint8Array> {
    const direct = this.direct(addr, length, false, (bytes) => bytes.slice());
    if (direct) return direct;
    const out = new Uint8Array(length);
    await this.walk(addr, length, false, async (mapping, at, n) => {
      const data = mapping.bytes
        ? mapping.bytes.subarray(at - mapping.iova, at - mapping.iova + n)
        : await this.requireRemote(addr, length).read(at, n);
      out.set(data, at - addr);
    });
    return out;
  }

  async write(addr: number, data: Uint8Array): Promise<void> {
    const done = this.direct(addr, data.length, true, (bytes) => {
      bytes.set(data);
      return true;
    });
    if (done) return;
    await this.walk(addr, data.length, true, async (mapping, at, n) => {
      const part = data.subarray(at - addr, at - addr + n);
      this.notifyWrite(at, n);
      if (mapping.bytes && !this.writeThrough) {
        mapping.bytes.set(part, at - mapping.iova);
        return;
      }
      await this.requireRemote(addr, data.length).write(at, part);
      // Sent in several messages, the piece may straddle a report: say it again now that it landed.
      this.notifyWrite(at, n);
    });
  }

  /**
   * Visits [addr, addr+length) mapping by mapping. Each step looks its mapping up afresh, so a
   * DMA_UNMAP that lands while a message-based piece is in flight ends the walk with a DmaError
   * instead of touching a mapping that is gone.
   */
  private async walk(
    addr: number,
    length: number,
    forWrite: boolean,
    visit: (mapping: DmaMapping, at: number, n: number) => Promise<void>,
  ): Promise<void> {
    if (!Number.isSafeInteger(addr) || addr < 0 || length < 0) throw new DmaError(addr, length, 'invalid range');
    const end = addr + length;
    for (let cursor = addr; cursor < end; ) {
      const mapping = this.find(cursor);
      if (!mapping) throw new DmaError(addr, length, 'outside every mapping');
      if (forWrite ? !mapping.writable : !mapping.readable) {
        throw new DmaError(addr, length, forWrite ? 'to a read-only mapping' : 'from a write-only mapping');
      }
      if (this.poisoned(mapping)) throw new DmaError(addr, length, TRUNCATED);
      const pieceEnd = Math.min(end, mapping.iova + mapping.size);
      await visit(mapping, cursor, pieceEnd - cursor);
      if (this.poisoned(mapping)) throw new DmaError(addr, length, TRUNCATED);
      cursor = pieceEnd;
    }
  }

  private requireRemote(addr: number, length: number): RemoteDma {
    if (!this.remote) throw new DmaError(addr, length, 'needs a client for message-based DMA');
    return this.remote;
  }

  private find(addr: number): DmaMapping | undefined {
    const at = this.insertionIndex(addr + 1) - 1;
    const mapping = this.mappings[at];
    return mapping && addr >= mapping.iova && addr < mapping.iova + mapping.size ? mapping : undefined;
  }

  /** First index whose iova is >= addr. */
  private insertionIndex(addr: number): number {
    let lo = 0;
    let hi = this.mappings.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.mappings[mid]!.iova < addr) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Leaves the table now; the memory goes once no pinned view uses it (the protocol's rule). */
  private release(mapping: DmaMapping): void {
    mapping.removed = true;
    if (mapping.backing && mapping.pins === 0) this.memory.munmap(mapping.backing);
  }
}

function checkRange(iova: bigint, size: bigint): { iova: number; size: number } {
  if (size === 0n) throw new VfioError(Errno.EINVAL, 'DMA range of size 0');
  if (iova + size > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new VfioError(Errno.EINVAL, `DMA range 0x${iova.toString(16)}+0x${size.toString(16)} beyond 2^53`);
  }
  return { iova: Number(iova), size: Number(size) };
}

const roundUp = (value: number, to: number): number => Math.ceil(value / to) * to;

/** A view of guest memory held against DMA_UNMAP until released (DmaTable.pin): one object per pin, as it is taken per command. */
class Pin implements PinnedView {
  private released = false;

  constructor(
    private readonly table: DmaTable,
    private readonly mapping: DmaMapping,
    private readonly addr: number,
    private readonly length: number,
    private readonly forWrite: boolean,
    readonly bytes: Uint8Array,
  ) {}

  intact(): boolean {
    return !this.table.poisoned(this.mapping);
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    this.table.unpin(this.mapping, this.addr, this.length, this.forWrite);
  }
}
