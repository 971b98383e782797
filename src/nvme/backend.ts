// Block storage behind a namespace. Every operation is asynchronous: a file backend goes through
// node:fs/promises (libuv's threadpool), so a slow disk never stalls the event loop that also
// serves the guest's doorbells.

import { open, stat, type FileHandle } from 'node:fs/promises';
import { native } from '../native.js';

export interface BlockBackend {
  /** Capacity in bytes (fixed for the backend's lifetime). */
  readonly size: number;
  /** True when acknowledged writes can still be lost on power failure until flush() (a page cache). */
  readonly volatileCache: boolean;
  read(offset: number, length: number): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Makes every acknowledged write durable. */
  flush(): Promise<void>;
  /** Deallocates the range; later reads return zeros. */
  discard(offset: number, length: number): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
  /** For logs and management listings. */
  describe(): string;
}

/** Zeroing/discard works through bounded chunks so a huge range never allocates a huge buffer. */
const ZERO_CHUNK = 1 << 20;

/** Guest RAM-like storage: sparse chunks allocated on first write, so a large namespace costs nothing until used. */
export class RamBackend implements BlockBackend {
  readonly volatileCache = false;
  private readonly chunks = new Map<number, Uint8Array>();
  private static readonly CHUNK = 1 << 20;

  constructor(readonly size: number) {
    if (!Number.isSafeInteger(size) || size <= 0) throw new RangeError(`RAM backend size ${size} is invalid`);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.check(offset, length);
    const out = new Uint8Array(length);
    this.each(offset, length, (chunk, at, done, n) => {
      const data = this.chunks.get(chunk);
      if (data) out.set(data.subarray(at, at + n), done);
    });
    return out;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.check(offset, data.length);
    this.each(offset, data.length, (chunk, at, done, n) => {
      let target = this.chunks.get(chunk);
      if (!target) {
        target = new Uint8Array(RamBackend.CHUNK);
        this.chunks.set(chunk, target);
      }
      target.set(data.subarray(done, done + n), at);
    });
  }

  async flush(): Promise<void> {}

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

export interface FileBackendOptions {
  /** Bytes. Required when the file does not exist (it is created sparse); grows a smaller file. */
  size?: number;
  readOnly?: boolean;
}

/** A raw image file. Writes land in the page cache (a volatile write cache); flush() is fdatasync. */
export class FileBackend implements BlockBackend {
  readonly volatileCache = true;
  /** Cleared the first time the file system refuses hole punching. */
  private punchHoles = true;

  private constructor(
    private readonly handle: FileHandle,
    readonly path: string,
    readonly size: number,
  ) {}

  static async open(path: string, options: FileBackendOptions = {}): Promise<FileBackend> {
    const existing = await stat(path).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return null;
      throw err;
    });
    if (!existing && options.size === undefined) throw new Error(`${path} does not exist and no size was given`);
    const handle = await open(path, existing ? (options.readOnly ? 'r' : 'r+') : 'w+');
    try {
      let size = existing?.size ?? 0;
      if (options.size !== undefined && options.size > size) {
        // truncate() extends with a hole: the image is sparse until written.
        await handle.truncate(options.size);
        size = options.size;
      }
      if (size <= 0) throw new Error(`${path} is empty`);
      return new FileBackend(handle, path, size);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    // Not zeroed up front: the read fills it, and only a short read past EOF needs zeros.
    const out = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.handle.read(out, done, length - done, offset + done);
      if (bytesRead === 0) {
        out.fill(0, done); // past EOF of a shorter file: the rest reads as zeros
        break;
      }
      done += bytesRead;
    }
    return new Uint8Array(out.buffer, out.byteOffset, out.length);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.handle.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
  }

  async flush(): Promise<void> {
    await this.handle.datasync();
  }

  /**
   * Punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE via the native addon, on the threadpool). A file
   * system without hole punching gets zeros written instead: the range still reads as zeros.
   */
  async discard(offset: number, length: number): Promise<void> {
    if (length === 0) return;
    if (this.punchHoles) {
      try {
        await native.punchHole(this.handle.fd, offset, length);
        return;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code !== 'EOPNOTSUPP' && code !== 'ENOSYS' && code !== 'EINVAL') throw err;
        this.punchHoles = false;
      }
    }
    await this.writeZeroes(offset, length);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    const zeros = new Uint8Array(Math.min(ZERO_CHUNK, length));
    for (let done = 0; done < length; ) {
      const n = Math.min(zeros.length, length - done);
      await this.write(offset + done, zeros.subarray(0, n));
      done += n;
    }
  }

  async close(): Promise<void> {
    await this.handle.close();
  }

  describe(): string {
    return `file:${this.path}`;
  }
}
