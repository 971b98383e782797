// Block storage behind a namespace. A file backend transfers on the event loop's own thread what
// cannot wait for a disk (a file in tmpfs; elsewhere, with RWF_NOWAIT, a page-cache hit) and sends
// the rest through an io_uring of its own (aio 'io_uring') or node:fs/promises (libuv's
// threadpool, aio 'threads'), so a slow disk never stalls the event loop that also serves the
// guest's doorbells.
//
// Measured on ext4 (bench/results/aio.md): reads that miss the page cache went 1.2-1.3x faster
// through the ring for 0.6-0.7x the server's CPU, but buffered writes 0.84x at QD32 for 1.3x the
// CPU: ext4 cannot write to the page cache without blocking, so io_uring hands every write to one
// kernel worker per file, in series, where the threadpool runs four. So writes go through the ring
// only on file systems that take RWF_NOWAIT writes (the inline attempt tells), else the threadpool.
// With cache=none or directsync a file is opened O_DIRECT: its transfers bypass this host's page
// cache (as QEMU's cache modes do), so they always go through the ring or the threadpool, and guest
// buffers that O_DIRECT cannot take go through an aligned bounce buffer.
//
// A RAM backend's reads and writes are a memcpy: they complete before readv/writev return, so a
// command on it needs no promise and no threadpool hop.

import { constants as fsConstants } from 'node:fs';
import { open, stat, unlink, type FileHandle } from 'node:fs/promises';
import { loadedNative, NOWAIT_UNSUPPORTED, NOWAIT_WOULD_BLOCK } from '../native.js';
import { IoRing } from './io-ring.js';
import type { MaybePromise } from './maybe-async.js';

export interface BlockBackend {
  /** Capacity in bytes (fixed for the backend's lifetime). */
  readonly size: number;
  /** True when acknowledged writes can still be lost on power failure until flush() (a page cache). */
  readonly volatileCache: boolean;
  read(offset: number, length: number): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array): Promise<void>;
  /**
   * Fills `targets` in order from [offset, offset + their total length): reads straight into guest
   * memory. May complete synchronously (then it returns undefined, or throws).
   */
  readv(offset: number, targets: readonly Uint8Array[]): MaybePromise<void>;
  /** Stores the concatenation of `sources` at `offset`: writes straight from guest memory. May complete synchronously. */
  writev(offset: number, sources: readonly Uint8Array[]): MaybePromise<void>;
  /** Makes every acknowledged write durable. */
  flush(): Promise<void>;
  /**
   * Forgets what this host cached, so the next reads come from storage: after a migration another
   * host may have written it (shared storage). Acknowledged writes are made durable first.
   */
  dropCache(): Promise<void>;
  /** Deallocates the range; later reads return zeros. */
  discard(offset: number, length: number): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
  /** For logs and management listings. */
  describe(): string;
}

/** Zeroing/discard works through bounded chunks so a huge range never allocates a huge buffer. */
const ZERO_CHUNK = 1 << 20;

/** read/write for callers that want a buffer, on top of each backend's scatter/gather. */
abstract class VectoredBackend implements BlockBackend {
  abstract readonly size: number;
  abstract readonly volatileCache: boolean;
  abstract readv(offset: number, targets: readonly Uint8Array[]): MaybePromise<void>;
  abstract writev(offset: number, sources: readonly Uint8Array[]): MaybePromise<void>;
  abstract flush(): Promise<void>;
  abstract dropCache(): Promise<void>;
  abstract discard(offset: number, length: number): Promise<void>;
  abstract writeZeroes(offset: number, length: number): Promise<void>;
  abstract close(): Promise<void>;
  abstract describe(): string;

  async read(offset: number, length: number): Promise<Uint8Array> {
    // Not zeroed up front: readv fills every byte.
    const out = Buffer.allocUnsafe(length);
    await this.readv(offset, [out]);
    return new Uint8Array(out.buffer, out.byteOffset, out.length);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.writev(offset, [data]);
  }
}

/** The views left once `n` bytes of them were transferred (a short readv/writev). */
function advance(views: readonly Uint8Array[], n: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let skip = n;
  for (const v of views) {
    if (skip >= v.length) {
      skip -= v.length;
      continue;
    }
    out.push(skip > 0 ? v.subarray(skip) : v);
    skip = 0;
  }
  return out;
}

const totalLength = (views: readonly Uint8Array[]): number => views.reduce((n, v) => n + v.length, 0);

/** Guest RAM-like storage: sparse chunks allocated on first write, so a large namespace costs nothing until used. */
export class RamBackend extends VectoredBackend {
  readonly volatileCache = false;
  private readonly chunks = new Map<number, Uint8Array>();
  private static readonly CHUNK = 1 << 20;

  constructor(readonly size: number) {
    super();
    if (!Number.isSafeInteger(size) || size <= 0) throw new RangeError(`RAM backend size ${size} is invalid`);
  }

  readv(offset: number, targets: readonly Uint8Array[]): void {
    this.check(offset, totalLength(targets));
    let pos = offset;
    for (const target of targets) {
      this.each(pos, target.length, (chunk, at, done, n) => {
        const data = this.chunks.get(chunk);
        if (data) target.set(data.subarray(at, at + n), done);
        else target.fill(0, done, done + n);
      });
      pos += target.length;
    }
  }

  writev(offset: number, sources: readonly Uint8Array[]): void {
    this.check(offset, totalLength(sources));
    let pos = offset;
    for (const source of sources) {
      this.each(pos, source.length, (chunk, at, done, n) => {
        let target = this.chunks.get(chunk);
        if (!target) {
          target = new Uint8Array(RamBackend.CHUNK);
          this.chunks.set(chunk, target);
        }
        target.set(source.subarray(done, done + n), at);
      });
      pos += source.length;
    }
  }

  async flush(): Promise<void> {}

  /** The memory is the storage: nothing is cached in front of it. */
  async dropCache(): Promise<void> {}

  async discard(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    this.each(offset, length, (chunk, at, _done, n) => {
      const data = this.chunks.get(chunk);
      if (!data) return;
      if (n === RamBackend.CHUNK) this.chunks.delete(chunk);
      else data.fill(0, at, at + n);
    });
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.discard(offset, length);
  }

  async close(): Promise<void> {
    this.chunks.clear();
  }

  describe(): string {
    return `ram:${this.size}`;
  }

  private check(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.size) throw new RangeError(`access ${offset}+${length} beyond ${this.size}`);
  }

  private each(offset: number, length: number, fn: (chunk: number, at: number, done: number, n: number) => void): void {
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const chunk = Math.floor(pos / RamBackend.CHUNK);
      const at = pos % RamBackend.CHUNK;
      const n = Math.min(RamBackend.CHUNK - at, length - done);
      fn(chunk, at, done, n);
      done += n;
    }
  }
}

/** How transfers that may wait for a disk are done (QEMU's -drive aio= names). */
export type FileAio = 'threads' | 'io_uring';
export const FILE_AIO_MODES: readonly FileAio[] = ['threads', 'io_uring'];

/** QEMU's -drive cache= modes. */
export type FileCache = 'writeback' | 'none' | 'writethrough' | 'directsync';

/**
 * Per cache mode, as QEMU's cache.direct and cache.writeback: whether transfers bypass this host's
 * page cache (O_DIRECT), and whether a write may complete before it is durable (a volatile write
 * cache the guest flushes) rather than each write being synchronous (O_DSYNC).
 */
export const FILE_CACHE_MODES: Readonly<Record<FileCache, { readonly direct: boolean; readonly writeCache: boolean }>> = {
  writeback: { direct: false, writeCache: true },
  none: { direct: true, writeCache: true },
  writethrough: { direct: false, writeCache: false },
  directsync: { direct: true, writeCache: false },
};
export const FILE_CACHES = Object.keys(FILE_CACHE_MODES) as readonly FileCache[];

/** For values from outside (flags, config, control requests, a state record): is it a mode we have? */
export const isFileAio = (value: unknown): value is FileAio => (FILE_AIO_MODES as readonly unknown[]).includes(value);
export const isFileCache = (value: unknown): value is FileCache => (FILE_CACHES as readonly unknown[]).includes(value);

export interface FileBackendOptions {
  /** Bytes. Required when the file does not exist (it is created sparse); grows a smaller file. */
  size?: number;
  readOnly?: boolean;
  /** Default 'io_uring' where the kernel offers it, else 'threads'. */
  aio?: FileAio;
  /** Default 'writeback'. */
  cache?: FileCache;
  /**
   * The namespace's logical block in bytes (default 512): every transfer is a multiple of it. With
   * O_DIRECT it must be a multiple of the file system's alignment, or the file is refused.
   */
  blockSize?: number;
}

/** Where the file system does not say what O_DIRECT needs: the largest logical block in use. */
const DIRECT_IO_FALLBACK_ALIGNMENT = 4096;

/**
 * A file in memory is always copied on this thread; elsewhere RWF_NOWAIT takes what the page cache
 * holds (reads: ext4 refuses it for buffered writes on Linux 6.18); 'never' once the file refused.
 */
type InlineMode = 'always' | 'no-wait' | 'never';

/**
 * Transfers up to this size try the inline path: a page-cache copy of 256 KiB takes tens of µs,
 * about what the threadpool hop costs; larger ones would hold the event loop (and every other
 * controller's doorbells) for longer than they save.
 */
const INLINE_MAX_BYTES = 256 * 1024;

/**
 * A raw image file. Writes land in the page cache (a volatile write cache; flush() is fdatasync),
 * or with O_DIRECT in the disk's own cache, unless the cache mode makes every write synchronous.
 */
export class FileBackend extends VectoredBackend {
  readonly volatileCache: boolean;
  /** The fallocate modes this file system refused once (EOPNOTSUPP): not tried again. */
  private readonly refusedFallocate = new Set<'punchHole' | 'zeroRange'>();
  /** Set by the first fdatasync that failed: see writeBack(). */
  private writeBackFailed: Error | null = null;
  /** The file lives in memory (tmpfs, ramfs, hugetlbfs): its pages are its storage. */
  private readonly inMemory: boolean;
  /** Per direction: how a transfer is tried on this thread before the threadpool. */
  private inlineReads: InlineMode;
  private inlineWrites: InlineMode;
  /** Writes that may wait go through the ring, unless it would run them in series (see above). */
  private ringWrites: boolean;
  /** With O_DIRECT on a disk file system: what each buffer's address and length must be a multiple of. */
  private readonly directAlignment: { memory: number; length: number } | null;
  /** The addon itself, not the lazy `native` Proxy: every inline transfer calls it. */
  private readonly addon = loadedNative();

  private constructor(
    private readonly handle: FileHandle,
    readonly path: string,
    readonly size: number,
    /** With aio 'io_uring': what may wait for a disk goes through it. */
    private readonly ring: IoRing | null,
    readonly cache: FileCache,
    blockSize: number,
  ) {
    super();
    const mode = FILE_CACHE_MODES[cache];
    this.volatileCache = mode.writeCache;
    this.inMemory = this.addon.memoryBackedFile(handle.fd);
    // tmpfs takes O_DIRECT as a plain copy: nothing to align, nothing that waits.
    this.directAlignment = mode.direct && !this.inMemory ? FileBackend.directAlignmentOf(handle.fd, path, cache, blockSize) : null;
    // An O_DIRECT read or write waits for the disk even with RWF_NOWAIT, and so does an O_DSYNC
    // write (its fdatasync) where the file system takes buffered RWF_NOWAIT writes: never on this thread.
    this.inlineReads = this.inMemory ? 'always' : this.directAlignment ? 'never' : 'no-wait';
    this.inlineWrites = this.inMemory ? 'always' : this.directAlignment || !mode.writeCache ? 'never' : 'no-wait';
    // io_uring runs buffered O_DSYNC writes on one kernel worker per file, in series, as ext4's
    // buffered writes; O_DIRECT ones it submits at once.
    this.ringWrites = this.inMemory || this.directAlignment !== null || mode.writeCache;
  }

  private static directAlignmentOf(fd: number, path: string, cache: FileCache, blockSize: number): { memory: number; length: number } {
    const reported = loadedNative().directIoAlignment(fd);
    const memory = reported.memory || DIRECT_IO_FALLBACK_ALIGNMENT;
    const length = reported.offset || DIRECT_IO_FALLBACK_ALIGNMENT;
    if (blockSize % length !== 0) {
      const why = reported.offset ? "its file system's O_DIRECT alignment" : 'the file system does not say what O_DIRECT needs, so 4096 is assumed';
      const fix = length <= 4096 ? 'lbads=4096 (ns add: --block-size 4096) or cache=writeback' : 'cache=writeback';
      throw new Error(`${path}: cache=${cache} needs blocks of ${length} bytes or more here (${why}); use ${fix}`);
    }
    return { memory, length };
  }

  static async open(path: string, options: FileBackendOptions = {}): Promise<FileBackend> {
    const existing = await stat(path).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return null;
      throw err;
    });
    if (!existing && options.size === undefined) throw new Error(`${path} does not exist and no size was given`);
    const cache = options.cache ?? 'writeback';
    // Checked here too: a hand-edited --state-dir record reaches this without the config's checks.
    if (!isFileCache(cache)) throw new Error(`${path}: cache must be ${FILE_CACHES.join(', ')}, got '${String(cache)}'`);
    if (options.aio !== undefined && !isFileAio(options.aio)) throw new Error(`${path}: aio must be ${FILE_AIO_MODES.join(' or ')}, got '${String(options.aio)}'`);
    const mode = FILE_CACHE_MODES[cache];
    const flags =
      (options.readOnly && existing ? fsConstants.O_RDONLY : fsConstants.O_RDWR) |
      (existing ? 0 : fsConstants.O_CREAT) |
      (mode.direct ? fsConstants.O_DIRECT : 0) |
      (mode.writeCache ? 0 : fsConstants.O_DSYNC);
    /** A file this call created is removed again when the open fails: a refused namespace leaves nothing behind. */
    const undoCreate = async (): Promise<void> => {
      if (!existing) await unlink(path).catch(() => undefined);
    };
    const handle = await open(path, flags, 0o666).catch(async (err: NodeJS.ErrnoException) => {
      await undoCreate(); // O_DIRECT is refused only once the file exists
      if (mode.direct && err.code === 'EINVAL') throw new Error(`${path}: its file system does not take O_DIRECT (cache=${cache}); use cache=writeback or writethrough`, { cause: err });
      throw err;
    });
    // Widened on purpose: TypeScript would narrow it to null in the catch below.
    let ring = null as IoRing | null;
    try {
      let size = existing?.size ?? 0;
      if (options.size !== undefined && options.size > size) {
        // truncate() extends with a hole: the image is sparse until written.
        await handle.truncate(options.size);
        size = options.size;
      }
      if (size <= 0) throw new Error(`${path} is empty`);
      if (options.aio !== 'threads') {
        try {
          ring = new IoRing();
        } catch (err) {
          // Containers often refuse io_uring (seccomp, io_uring_disabled): the default falls back.
          if (options.aio === 'io_uring') throw new Error(`${path}: aio=io_uring is not available here (${(err as Error).message}); use aio=threads`, { cause: err });
        }
      }
      return new FileBackend(handle, path, size, ring, cache, options.blockSize ?? 512);
    } catch (err) {
      await ring?.close();
      await handle.close();
      await undoCreate();
      throw err;
    }
  }

  readv(offset: number, targets: readonly Uint8Array[]): MaybePromise<void> {
    return this.transfer(false, offset, targets);
  }

  writev(offset: number, sources: readonly Uint8Array[]): MaybePromise<void> {
    return this.transfer(true, offset, sources);
  }

  /**
   * On this thread what cannot wait (see InlineMode) and is small enough not to hold the event loop
   * for long; the rest, or all of it, on the threadpool.
   */
  private transfer(write: boolean, offset: number, views: readonly Uint8Array[]): MaybePromise<void> {
    const direct = this.directAlignment;
    if (direct && !this.addon.alignedForDirectIo(views, direct.memory, direct.length)) return this.bounce(write, offset, views, direct.memory);
    const mode = write ? this.inlineWrites : this.inlineReads;
    let done = 0;
    if (mode !== 'never') {
      const total = totalLength(views);
      if (total <= INLINE_MAX_BYTES) {
        const fd = this.handle.fd;
        const noWait = mode === 'no-wait';
        const n = write ? this.addon.pwritevInline(fd, views, offset, noWait) : this.addon.preadvInline(fd, views, offset, noWait);
        if (n === NOWAIT_UNSUPPORTED) {
          if (write) {
            this.inlineWrites = 'never';
            this.ringWrites = false;
          } else {
            this.inlineReads = 'never';
          }
        } else if (n !== NOWAIT_WOULD_BLOCK) {
          if (n === total) return;
          done = n; // short: the threadpool continues (past EOF it reads zeros)
        }
      }
    }
    const rest = done > 0 ? advance(views, done) : views;
    return write ? this.writevQueued(offset + done, rest) : this.readvQueued(offset + done, rest);
  }

  /** preadv off this thread: through the ring when there is one and it has room, else the threadpool. */
  private async preadv(views: readonly Uint8Array[], pos: number): Promise<number> {
    return (await this.ring?.readv(this.handle.fd, views, pos)) ?? (await this.handle.readv(views, pos)).bytesRead;
  }

  private async pwritev(views: readonly Uint8Array[], pos: number): Promise<number> {
    // A file that refuses RWF_NOWAIT writes would have them run one by one on a kernel worker.
    const ring = this.ringWrites ? this.ring : null;
    return (await ring?.writev(this.handle.fd, views, pos)) ?? (await this.handle.writev(views, pos)).bytesWritten;
  }

  private async readvQueued(offset: number, targets: readonly Uint8Array[]): Promise<void> {
    let pending = targets.filter((t) => t.length > 0);
    let pos = offset;
    while (pending.length > 0) {
      // At most IOV_MAX buffers go per call; a short read continues where it stopped.
      const bytesRead = await this.preadv(pending, pos);
      if (bytesRead === 0) {
        for (const t of pending) t.fill(0); // past EOF of a shorter file: the rest reads as zeros
        return;
      }
      pos += bytesRead;
      pending = advance(pending, bytesRead);
    }
  }

  private async writevQueued(offset: number, sources: readonly Uint8Array[]): Promise<void> {
    let pending = sources.filter((v) => v.length > 0);
    let pos = offset;
    while (pending.length > 0) {
      const bytesWritten = await this.pwritev(pending, pos);
      // A file system that accepts nothing (and reports no error) would otherwise be retried forever.
      if (bytesWritten === 0) throw Object.assign(new Error(`${this.path}: write at ${pos} stored 0 bytes`), { code: 'EIO' });
      pos += bytesWritten;
      pending = advance(pending, bytesWritten);
    }
  }

  /**
   * An O_DIRECT transfer whose buffers are not aligned (a guest PRP list may start anywhere on a
   * 4-byte boundary) goes through an aligned copy. The namespace keeps offsets and lengths whole
   * blocks, which the open checked are aligned.
   */
  private async bounce(write: boolean, offset: number, views: readonly Uint8Array[], alignment: number): Promise<void> {
    const total = totalLength(views);
    if (total === 0) return;
    const copy = new Uint8Array(this.addon.alignedBuffer(total, alignment));
    if (write) {
      let at = 0;
      for (const v of views) {
        copy.set(v, at);
        at += v.length;
      }
      await this.writevQueued(offset, [copy]);
      return;
    }
    // Where each view starts, taken now: a view whose mapping went away meanwhile (length 0; the
    // controller pins guest memory for a command, so only a bug could do it) is skipped, not shifted onto.
    const starts: number[] = [];
    let at = 0;
    for (const v of views) {
      starts.push(at);
      at += v.length;
    }
    await this.readvQueued(offset, [copy]);
    views.forEach((v, i) => {
      if (v.length > 0) v.set(copy.subarray(starts[i]!, starts[i]! + v.length));
    });
  }

  /** How transfers that may wait for a disk are done. */
  get aio(): FileAio {
    return this.ring ? 'io_uring' : 'threads';
  }

  async flush(): Promise<void> {
    await this.writeBack(() => this.ring?.datasync(this.handle.fd) ?? this.handle.datasync());
  }

  /**
   * As QEMU's file driver does when a migrated VM starts on its destination (fdatasync, then
   * POSIX_FADV_DONTNEED). A file in memory is skipped: no other host can share it, and dropping
   * its pages would only push them to swap.
   */
  async dropCache(): Promise<void> {
    // O_DIRECT kept nothing in this host's page cache (QEMU skips this step for it too).
    if (this.inMemory || this.directAlignment) {
      if (this.writeBackFailed) throw this.writeBackFailed;
      return;
    }
    await this.writeBack(() => this.addon.dropPageCache(this.handle.fd));
  }

  /**
   * Runs an fdatasync-based step. Linux reports a writeback error to one fdatasync only, and the
   * pages it failed to write are then clean (their data lost): after one failure, every later
   * flush fails too, as QEMU's file driver does (page_cache_inconsistent), so no later Flush or
   * migration step reports durable what is not.
   */
  private async writeBack(step: () => Promise<unknown>): Promise<void> {
    if (this.writeBackFailed) throw this.writeBackFailed;
    try {
      await step();
    } catch (err) {
      const cause = err as NodeJS.ErrnoException;
      // A refused posix_fadvise (dropCache's second half) lost nothing.
      if (cause.syscall === 'posix_fadvise') throw err;
      this.writeBackFailed = Object.assign(new Error(`${this.path}: an earlier fdatasync failed (${cause.message}): acknowledged writes may be lost`, { cause }), { code: 'EIO' });
      throw err;
    }
  }

  /**
   * Punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE via the native addon, on the threadpool). A file
   * system without hole punching gets zeros written instead: the range still reads as zeros.
   */
  async discard(offset: number, length: number): Promise<void> {
    if (length === 0) return;
    if (!(await this.fallocate('punchHole', offset, length))) await this.writeZeroes(offset, length);
  }

  /**
   * fallocate(ZERO_RANGE) where the file system takes it (ext4, XFS: no data written, the blocks
   * stay allocated, as QEMU does); zeros written in bounded chunks elsewhere (tmpfs).
   */
  async writeZeroes(offset: number, length: number): Promise<void> {
    if (length === 0) return;
    if (!(await this.fallocate('zeroRange', offset, length))) await this.writeZeroChunks(offset, length);
  }

  /** The addon's fallocate call (on the threadpool): false when this file system does not offer the mode. */
  private async fallocate(mode: 'punchHole' | 'zeroRange', offset: number, length: number): Promise<boolean> {
    if (this.refusedFallocate.has(mode)) return false;
    try {
      await this.addon[mode](this.handle.fd, offset, length);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'EOPNOTSUPP' && code !== 'ENOSYS' && code !== 'EINVAL') throw err;
      this.refusedFallocate.add(mode);
      return false;
    }
    // Without a volatile write cache the guest never flushes: the new extents must be durable now
    // (O_DSYNC covers only writes), or a power loss could bring the old data back.
    if (!this.volatileCache) await this.flush();
    return true;
  }

  private async writeZeroChunks(offset: number, length: number): Promise<void> {
    const size = Math.min(ZERO_CHUNK, length);
    // Aligned for O_DIRECT, so the zeros need no bounce copy.
    const zeros = this.directAlignment ? new Uint8Array(this.addon.alignedBuffer(size, this.directAlignment.memory)) : new Uint8Array(size);
    for (let done = 0; done < length; ) {
      const n = Math.min(zeros.length, length - done);
      await this.write(offset + done, zeros.subarray(0, n));
      done += n;
    }
  }

  async close(): Promise<void> {
    // The ring's transfers hold the fd: they end before it closes.
    await this.ring?.close();
    await this.handle.close();
  }

  describe(): string {
    // Namespace identifiers derive from this: how transfers are done must not change them.
    return `file:${this.path}`;
  }
}
