// File I/O through an io_uring of the addon's own (native/src/uring.cc) instead of libuv's
// threadpool: entries queued during one stretch of synchronous work (the commands of one doorbell)
// go to the kernel with a single io_uring_enter at the next microtask checkpoint, and completions
// come back through one eventfd on the event loop. Each transfer is a promise resolved with the
// kernel's result; short counts are the caller's to continue, as with preadv/pwritev.

import { constants } from 'node:os';
import { loadedNative, type FdWatcher, type IoRingHandle } from '../native.js';
import { usTimersAwake } from './us-timer.js';

/** The addon's operation codes (RingOp in native/src/uring.cc). */
const enum RingOp {
  Readv = 0,
  Writev = 1,
  Datasync = 2,
}

/** SQ entries; the CQ holds 8 times as many, and the kernel keeps what would overflow it. */
const SQ_ENTRIES = 256;
/** Transfers in flight at most: past this, callers get null and use another path. */
const MAX_IN_FLIGHT = SQ_ENTRIES * 8;

const ERRNO_NAMES = new Map<number, string>(Object.entries(constants.errno).map(([name, n]) => [n, name]));

function ringError(errno: number, syscall: string): NodeJS.ErrnoException {
  const code = ERRNO_NAMES.get(errno) ?? 'EUNKNOWN';
  return Object.assign(new Error(`${syscall} ${code} (io_uring)`), { code, errno: -errno, syscall });
}

interface InFlight {
  resolve: (result: number) => void;
  reject: (err: Error) => void;
  syscall: string;
  /** Kept referenced until the kernel is done with their memory. */
  views: readonly Uint8Array[] | null;
}

export class IoRing {
  private readonly ring: IoRingHandle;
  private readonly watcher: FdWatcher;
  /** Per tag, the transfer it stands for; tags are reused once reaped. */
  private readonly inFlight: (InFlight | undefined)[] = [];
  private readonly freeTags: number[] = [];
  private count = 0;
  private submitScheduled = false;
  private readonly completions = new Float64Array(2 * 256);
  private closed = false;
  private drained: (() => void) | null = null;
  /** The native ring is gone: nothing may touch it. */
  private released = false;

  /** Throws (with .code) where the kernel refuses io_uring: ENOSYS, EPERM (io_uring_disabled, seccomp). */
  constructor() {
    const addon = loadedNative();
    this.ring = new addon.IoRing(SQ_ENTRIES);
    try {
      this.watcher = addon.watchFd(this.ring.eventFd, this.reap);
    } catch (err) {
      this.ring.close();
      throw err;
    }
  }

  /** Transfers in flight now. */
  get pending(): number {
    return this.count;
  }

  /** preadv at `offset` into `views` (at most 1,024 of them): the bytes read. null when the ring is full. */
  readv(fd: number, views: readonly Uint8Array[], offset: number): Promise<number> | null {
    return this.start(RingOp.Readv, fd, views, offset, 'preadv');
  }

  /** pwritev of `views` at `offset`: the bytes written. null when the ring is full. */
  writev(fd: number, views: readonly Uint8Array[], offset: number): Promise<number> | null {
    return this.start(RingOp.Writev, fd, views, offset, 'pwritev');
  }

  /** fdatasync. null when the ring is full. */
  datasync(fd: number): Promise<number> | null {
    return this.start(RingOp.Datasync, fd, null, 0, 'fdatasync');
  }

  /** Waits for every transfer in flight, then releases the ring. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.count > 0) {
      this.submit();
      await new Promise<void>((resolve) => (this.drained = resolve));
    }
    this.watcher.close();
    this.ring.close();
    this.released = true;
  }

  private start(op: RingOp, fd: number, views: readonly Uint8Array[] | null, offset: number, syscall: string): Promise<number> | null {
    if (this.closed || this.count >= MAX_IN_FLIGHT) return null;
    const tag = this.freeTags.pop() ?? this.inFlight.length;
    let queued: boolean;
    try {
      // Throws synchronously for a detached view (EFAULT), like the inline path.
      queued = this.ring.queue(op, fd, views ?? [], offset, tag);
      if (!queued) {
        this.submit();
        queued = this.ring.queue(op, fd, views ?? [], offset, tag);
      }
    } catch (err) {
      this.freeTags.push(tag);
      throw err;
    }
    if (!queued) {
      this.freeTags.push(tag);
      return null;
    }
    this.count++;
    if (!this.submitScheduled) {
      this.submitScheduled = true;
      queueMicrotask(this.submit);
    }
    return new Promise<number>((resolve, reject) => {
      this.inFlight[tag] = { resolve, reject, syscall, views };
    });
  }

  private readonly submit = (): void => {
    this.submitScheduled = false;
    if (this.released) return;
    try {
      this.ring.submit();
    } catch {
      // io_uring_enter itself failed (not an entry: those fail in their completion). The entries
      // stay queued; try again shortly rather than end the process from a microtask.
      if (!this.submitScheduled) {
        this.submitScheduled = true;
        setTimeout(this.submit, 1);
      }
    }
  };

  private readonly reap = (): void => {
    for (;;) {
      const n = this.ring.reap(this.completions);
      for (let i = 0; i < n; i++) {
        const tag = this.completions[2 * i]!;
        const result = this.completions[2 * i + 1]!;
        const op = this.inFlight[tag];
        if (!op) continue;
        this.inFlight[tag] = undefined;
        this.freeTags.push(tag);
        this.count--;
        if (result < 0) op.reject(ringError(-result, op.syscall));
        else op.resolve(result);
      }
      if (n < this.completions.length / 2) break;
    }
    // Entries the kernel refused for the moment (EAGAIN, EBUSY) go again now that room was made.
    this.submit();
    // Completions woke the process: checks due soon run now rather than wake it again, after the
    // continuations of the transfers just resolved (queued first) have posted their completions.
    usTimersAwake();
    if (this.count === 0 && this.drained) {
      this.drained();
      this.drained = null;
    }
  };
}
