/**
 * Typed loader for the native addon (native/ -> build/native/Release/vfio_native.node).
 *
 * The addon knows nothing about NVMe or vfio-user: it provides AF_UNIX stream
 * sockets with fd passing (SCM_RIGHTS), mmap of shared memory as zero-copy
 * ArrayBuffers, eventfds, memfds and an fd readiness watcher, all driven by
 * the Node event loop (libuv) and never blocking it.
 *
 * Errors from syscalls are `Error`s with Node-style `.code` (errno name, e.g.
 * 'EADDRINUSE'), `.errno` (negative), `.syscall` and, where relevant, `.path`.
 * Bad argument types throw `TypeError`/`RangeError`.
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface NativeError extends Error {
  code: string;
  errno?: number;
  syscall?: string;
  path?: string;
}

/**
 * A connected AF_UNIX stream socket. Created only by `Listener` or `connect()`.
 * While started (or while it has queued writes) it keeps itself and the process
 * alive until closed; otherwise an unreferenced Connection is closed by GC.
 */
export interface Connection {
  /** The socket fd, or -1 once closed. */
  readonly fd: number;
  /**
   * Start reading. `onData` gets each recvmsg() chunk as-is (chunks are not
   * merged or framed; up to 256 KiB each) with the fds that arrived with it,
   * which the callee now owns and must close.
   *
   * fd attribution: fds ride on the first byte of the peer's sendmsg. Linux may
   * glue bytes of EARLIER messages in front of that byte within one recvmsg,
   * but stops the chunk at (or inside) the fd-carrying message, and never puts
   * two fd-carrying sends in one chunk. So the fds of a chunk belong to the
   * LAST message that starts in that chunk, not necessarily the first.
   *
   * `onClose(null)` on
   * EOF, `onClose(code)` on error (e.g. 'ECONNRESET', 'EPIPE', or 'EMSGSIZE'
   * when too many fds arrived); the socket is closed before `onClose` runs and
   * no callbacks follow. Exceptions thrown by the callbacks become uncaught
   * exceptions. Can be called once.
   */
  start(onData: (data: Buffer, fds: number[]) => void, onClose: (errorCode: string | null) => void): void;
  /**
   * Send one message; `fds` (max 253) ride on its first byte and remain owned by
   * the caller. Never blocks: unsent data is queued (fds are dup'ed if needed)
   * and flushed in order when writable. Peer errors (EPIPE, ECONNRESET) are
   * reported later via `onClose`, not thrown. Throws EBADF once closed.
   */
  send(data: Uint8Array, fds?: readonly number[]): void;
  /** Idempotent; drops queued data. Does not call `onClose`. */
  close(): void;
  /** Bytes queued but not yet written to the socket. */
  pendingWriteBytes(): number;
}

export interface Listener {
  /** Idempotent. Does not unlink the socket path. */
  close(): void;
}

export interface ListenerConstructor {
  /**
   * Bind + listen (backlog 4) on `path`. The path must not exist (the caller
   * unlinks stale sockets). The listener keeps the process alive until closed.
   */
  new (path: string, onConnection: (conn: Connection) => void): Listener;
}

export interface FdWatcher {
  /** Idempotent. Close the watcher before closing the fd it watches. */
  close(): void;
  /** From now on the watcher alone does not keep the process alive. */
  unref(): void;
}

/** An io_uring of the addon's own (native/src/uring.cc); src/nvme/io-ring.ts is its one user. */
export interface IoRingHandle {
  /** Becomes readable when completions wait; reap() drains it. */
  readonly eventFd: number;
  /**
   * Queues op 0 (readv), 1 (writev) or 2 (fdatasync) on `fd` at `offset` over at most 1,024 of
   * `views`, completing as `tag`: false when the SQ is full (submit first). EFAULT for a detached view.
   */
  queue(op: number, fd: number, views: readonly Uint8Array[], offset: number, tag: number): boolean;
  /** io_uring_enter for everything queued: how many entries the kernel took. */
  submit(): number;
  /** Writes (tag, result) pairs into `out` (result: bytes, or -errno): how many. */
  reap(out: Float64Array): number;
  /** Idempotent; the kernel finishes or cancels what is still in flight. */
  close(): void;
}

export interface NativeAddon {
  Listener: ListenerConstructor;
  /** io_uring_setup with a CQ 8 times `sqEntries` (a power of two up to 4,096) and an eventfd. */
  IoRing: new (sqEntries: number) => IoRingHandle;
  /** The Connection class, for `instanceof` only: it cannot be constructed from JS. */
  Connection: abstract new () => Connection;
  /** Blocking AF_UNIX connect (immediate for local sockets); the result is non-blocking. */
  connect(path: string): Connection;

  /**
   * mmap(MAP_SHARED) `length` bytes of `fd` at page-aligned `offset`, as an
   * external ArrayBuffer (zero copy). Unmapped by `munmap` or when collected.
   *
   * Every mapping is guarded against its file shrinking under it (see
   * native/src/memory.cc): an access past the file's new end, which would be
   * SIGBUS for the whole process, instead turns the mapping into zero pages
   * and bumps `poisonCounts[guardSlot(buffer)]`. ENOSPC when the guard table
   * is full and the fd is not sealed against shrinking.
   */
  mmap(fd: number, offset: bigint, length: number, writable: boolean): ArrayBuffer;
  /** Unmap and detach: views of the buffer become length 0. EINVAL if not a live mapping. */
  munmap(buffer: ArrayBuffer): void;
  /** The guard slot of a live mapping from `mmap`, or -1 if it has none (sealed fd, full table). */
  guardSlot(buffer: ArrayBuffer): number;
  /** Per guard slot: how often a mapping there was replaced by zero pages. Only ever grows. */
  readonly poisonCounts: Uint32Array;

  /** EFD_NONBLOCK | EFD_CLOEXEC. */
  eventfd(initial?: number): number;
  /** Adds `value` (default 1n). Throws EAGAIN if the counter would overflow. */
  eventfdWrite(fd: number, value?: bigint): void;
  /** Reads and resets the counter; 0n if it was zero. Clears a timerfd that fired too. */
  eventfdRead(fd: number): bigint;
  /** timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC). */
  timerfdCreate(): number;
  /** Arms the timerfd to fire once, `us` µs from now (fractions allowed); 0 disarms it. */
  timerfdArm(fd: number, us: number): void;
  /**
   * memfd_create(MFD_CLOEXEC) + ftruncate(size); `sealed` adds the seals QEMU's
   * memory-backend-memfd uses (no shrink, no grow, no further seals).
   */
  memfdCreate(name: string, size: number, sealed?: boolean): number;

  closeFd(fd: number): void;
  /**
   * fstat(): size, and st_blksize (what mmap offsets of this fd must align to); and whether
   * F_GET_SEALS says the file can no longer shrink.
   */
  fdStat(fd: number): { size: number; blockSize: number; shrinkSealed: boolean };
  pageSize(): number;
  /** sched_yield(): lets another runnable thread have this CPU (polling loops). */
  yieldCpu(): void;

  /**
   * Call `onReadable` whenever `fd` is readable (level-triggered: the callback
   * must drain it, e.g. eventfdRead, or it fires again immediately). Keeps the
   * process alive until closed. At most one watcher per fd, and not on fds that
   * a Connection/Listener already polls.
   */
  watchFd(fd: number, onReadable: () => void): FdWatcher;

  /**
   * fallocate(PUNCH_HOLE | KEEP_SIZE) on the libuv threadpool: deallocates [offset, offset+length)
   * of a regular file, which then reads as zeros. Rejects with `.code` (e.g. 'EOPNOTSUPP').
   */
  punchHole(fd: number, offset: number, length: number): Promise<void>;
  /**
   * fallocate(ZERO_RANGE | KEEP_SIZE) on the libuv threadpool: [offset, offset+length) reads as
   * zeros, no data written, blocks kept allocated. Rejects with `.code` ('EOPNOTSUPP' on tmpfs).
   */
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
  /**
   * fdatasync, then posix_fadvise(DONTNEED) over the whole file, on the libuv threadpool: the next
   * reads of the file come from storage, not from this host's page cache. Rejects with `.code`.
   */
  dropPageCache(fd: number): Promise<void>;
  /**
   * preadv2/pwritev2 on this thread, over at most 1,024 of `views`, with RWF_NOWAIT when `noWait`:
   * the bytes transferred (maybe fewer than asked), NOWAIT_WOULD_BLOCK when the kernel would have
   * to wait for the disk, NOWAIT_UNSUPPORTED when the file does not take RWF_NOWAIT in that
   * direction. Other errors throw with `.code` (EFAULT for guest memory its owner truncated).
   */
  preadvInline(fd: number, views: readonly Uint8Array[], offset: number, noWait: boolean): number;
  pwritevInline(fd: number, views: readonly Uint8Array[], offset: number, noWait: boolean): number;
  /** The file lives in memory (tmpfs, ramfs, hugetlbfs): its reads and writes never wait for a disk. */
  memoryBackedFile(fd: number): boolean;
  /**
   * statx(STATX_DIOALIGN): the alignment of memory addresses and of file offsets and lengths that
   * O_DIRECT transfers on `fd` need; 0 and 0 where the file system does not say (tmpfs).
   */
  directIoAlignment(fd: number): { memory: number; offset: number };
  /**
   * Whether each view's address is a multiple of `memory` and its length a multiple of `length`
   * (both powers of two): what O_DIRECT needs of every buffer. False for a detached view.
   */
  alignedForDirectIo(views: readonly Uint8Array[], memory: number, length: number): boolean;
  /** `size` zeroed bytes at an address that is a multiple of `alignment` (a power of two): a bounce buffer. */
  alignedBuffer(size: number, alignment: number): ArrayBuffer;
}

/** What preadvInline/pwritevInline return instead of a byte count. */
export const NOWAIT_WOULD_BLOCK = -1;
export const NOWAIT_UNSUPPORTED = -2;

const ADDON_RELATIVE_PATH = join('build', 'native', 'Release', 'vfio_native.node');

/** Walk up from this module (src/ or dist/src/) to the package root. */
function findPackageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, 'package.json'))) return dir;
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`vfio_native: no package.json above ${fileURLToPath(import.meta.url)}`);
    dir = parent;
  }
}

function loadAddon(): NativeAddon {
  const path = join(findPackageRoot(), ADDON_RELATIVE_PATH);
  const require = createRequire(import.meta.url);
  try {
    return require(path) as NativeAddon;
  } catch (err) {
    // One line a user can act on: npm may skip a dependency's install script (which builds the
    // addon) when its allowScripts setting does not name this package.
    const reason = String((err as Error).message ?? err).split('\n')[0];
    throw new Error(`the native addon is not built (${reason}); run \`npm run build:native\` in ${findPackageRoot()}`, { cause: err });
  }
}

let addon: NativeAddon | undefined;

/** The addon itself, loaded now if it was not yet: for the hot paths, which `native`'s indirection would cost on every call. */
export function loadedNative(): NativeAddon {
  return (addon ??= loadAddon());
}

/**
 * Loaded on first use, not on import: commands that never touch it (--help, --version) work
 * without the compiled addon, and a missing addon is an error where serving starts.
 */
export const native: NativeAddon = new Proxy({} as NativeAddon, {
  get: (_target, key) => loadedNative()[key as keyof NativeAddon],
});
export default native;
