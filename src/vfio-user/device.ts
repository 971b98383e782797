// The seam between the protocol and whatever device sits behind it. The session speaks vfio-user
// and calls these methods; the PCI layer implements them. Tests plug fakes in on either side.

import { Errno } from './protocol.js';

/** A failure that becomes a vfio-user error reply carrying `errno`. */
export class VfioError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
    this.name = 'VfioError';
  }
}

export const invalid = (message: string): VfioError => new VfioError(Errno.EINVAL, message);

export interface DeviceInfo {
  flags: number;
  numRegions: number;
  numIrqs: number;
}

export interface MmapArea {
  offset: number;
  size: number;
}

export interface RegionInfo {
  size: number;
  /** RegionFlags READ/WRITE; MMAP is added by the session when `mmap` is present. */
  flags: number;
  /** Shared memory behind (parts of) the region: QEMU maps `areas` of `fd` starting at `fileOffset`. */
  mmap?: { fd: number; fileOffset: number; areas: MmapArea[] };
}

export interface IrqInfo {
  count: number;
  flags: number;
}

/** A view of guest memory that stays mapped until released, even if the client unmaps it meanwhile. */
export interface PinnedView {
  bytes: Uint8Array;
  /**
   * False once the memory was lost under the view (its owner truncated the file behind it): what
   * was read through it since is zeros, what was written went nowhere. Check after the I/O.
   */
  intact(): boolean;
  release(): void;
}

/** Guest memory as the device sees it: bounds-checked, by guest-physical address. */
export interface DmaSpace {
  /**
   * A zero-copy view when [addr, addr+length) lies in one fd-backed mapping, else null. Valid only
   * until the next await: a DMA_UNMAP may take the memory away. If the client truncates the memory
   * under a copy through the view, the copy completes on zero pages and the mapping is refused
   * from then on (view() returns null, read/write fail): a caller that must know the copy was
   * real uses direct().
   */
  view(addr: number, length: number, forWrite: boolean): Uint8Array | null;
  /**
   * Runs `access` synchronously on the zero-copy view of [addr, addr+length) and returns what it
   * returned; undefined, without calling it, where view() would be null. Throws DmaError when the
   * client truncated the memory under the access (it touched the guard's zero pages): the one
   * lookup that tells a caller its copy was real.
   */
  direct<T>(addr: number, length: number, forWrite: boolean, access: (bytes: Uint8Array) => T): T | undefined;
  /**
   * The little-endian dword at `addr` read in place, as direct() would (undefined where it would
   * not run, DmaError on truncation), without allocating: for values polled every event-loop turn.
   */
  loadWord(addr: number): number | undefined;
  /**
   * Stores a little-endian dword at `addr` in place as one 32-bit store, as direct() would (false
   * where it would not run, DmaError on truncation). An aligned store is Atomics.store, a full
   * fence: what the device reads next cannot be older than it.
   */
  storeWord(addr: number, value: number): boolean;
  /** Like view(), but the memory stays mapped until release(): for I/O that outlives this turn. */
  pin(addr: number, length: number, forWrite: boolean): PinnedView | null;
  read(addr: number, length: number): Promise<Uint8Array>;
  write(addr: number, data: Uint8Array): Promise<void>;
  /**
   * While on, view() and pin() for writing return null and write() sends every byte to the client
   * as DMA_WRITE, even where guest memory is mapped; reads still use the mapping. A VMM that tracks
   * dirty pages itself (QEMU during a stock migration) then sees each device write. Resolves once
   * no view pinned for writing before the switch is still held.
   */
  routeWritesThroughClient?(on: boolean): Promise<void>;
  /**
   * Calls `observer` with every range the device writes (views and pins taken for writing, and
   * write()); returns the function that stops it. A range may be reported more than once: a pinned
   * view again at release, a message write again once the client has it.
   */
  observeWrites?(observer: WriteObserver): () => void;
}

export type WriteObserver = (addr: number, length: number) => void;

export class DmaError extends Error {
  constructor(
    readonly addr: number,
    readonly length: number,
    readonly reason: string,
  ) {
    super(`DMA ${reason} at 0x${addr.toString(16)}+${length}`);
    this.name = 'DmaError';
  }
}

/** Where the device raises interrupts; the session owns the eventfds behind it. */
export interface IrqSink {
  /** Signals vector `vector` of IRQ index `index`; false when no eventfd is wired there. */
  trigger(index: number, vector: number): boolean;
  isWired(index: number, vector: number): boolean;
}

export interface DeviceContext {
  dma: DmaSpace;
  irqs: IrqSink;
}

/**
 * What a device does for vfio-user migration v2. The session runs the state machine, streams the
 * data (MIG_DATA_READ/WRITE) and calls these one step at a time, never two at once.
 */
export interface DeviceMigration {
  /**
   * RUNNING→STOP: stop touching guest memory and raising interrupts; resolves once the device is
   * quiet. Also called on a device that is already stopped (after DEVICE_RESET), where it must do nothing.
   */
  stop(): Promise<void>;
  /** STOP→RUNNING, and leaving ERROR after DEVICE_RESET. Harmless on a running device; may come while no client is attached. */
  run(): Promise<void>;
  /** STOP_COPY: the whole device state, taken while stopped. Must not change the device. */
  save(): Promise<Uint8Array>;
  /**
   * Present iff the device offers PRE_COPY: state that may travel ahead while the device still
   * runs. `first` opens a new pre-copy session (send what a target needs); later calls return what
   * changed since the previous part, empty when nothing did. The final save() supersedes all parts.
   */
  savePreCopy?(first: boolean): Promise<Uint8Array>;
  /**
   * RESUMING→STOP: check `state` (and the pre-copy parts that came before it, in order), then
   * commit all of it. Throw a VfioError to refuse: the device must then be exactly as before.
   */
  load(state: Uint8Array, preCopy: readonly Uint8Array[]): Promise<void>;
}

export interface VfioDevice {
  /** Migration v2 over vfio-user; without it DEVICE_FEATURE's migration features and MIG_DATA_* answer ENOTSUP. */
  readonly migration?: DeviceMigration;
  deviceInfo(): DeviceInfo;
  regionInfo(index: number): RegionInfo;
  irqInfo(index: number): IrqInfo;
  /** Throws VfioError for accesses the device refuses. Bounds are already checked against regionInfo. */
  regionRead(index: number, offset: number, count: number): Uint8Array;
  regionWrite(index: number, offset: number, data: Uint8Array): void;
  /** DEVICE_RESET: the whole function goes back to its power-on state. */
  reset(): void;
  /** A client connected (DMA table and IRQ wiring are empty at this point). */
  attach(context: DeviceContext): void;
  /** The client went away: stop touching guest memory; keep device state. */
  detach(): void;
  /** The client rewired or unmasked the eventfds of `index`: re-raise what is still pending. */
  irqsChanged?(index: number): void;
}
