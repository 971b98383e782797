import { afterEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FILE_CACHES, FileBackend, type FileAio, type FileCache } from '../../../src/nvme/backend.js';
import { loadedNative } from '../../../src/native.js';
import { IoRing } from '../../../src/nvme/io-ring.js';
import { Namespace } from '../../../src/nvme/namespace.js';
import { AdminOpcode, NvmOpcode, Status } from '../../../src/nvme/spec.js';
import { DATA, TestHost, code, pattern } from './helpers.js';
import { diskScratchParent, ioUringAvailable, residentPages } from '../../support/files.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function scratchDir(parent = tmpdir()): string {
  const dir = mkdtempSync(join(parent, 'nvme-backend-'));
  dirs.push(dir);
  return dir;
}

async function fileBackend(parent = tmpdir(), aio?: FileAio): Promise<FileBackend> {
  return FileBackend.open(join(scratchDir(parent), 'disk.img'), { size: 1 << 20, ...(aio ? { aio } : {}) });
}

/** Makes the threadpool path of `backend` fail loudly, to prove a transfer did not take it. */
function forbidThreadpool(backend: FileBackend): { calls: string[] } {
  const seen = { calls: [] as string[] };
  const handle = (backend as unknown as { handle: FileHandle }).handle;
  for (const method of ['readv', 'writev', 'datasync'] as const) {
    (handle as unknown as Record<string, () => Promise<never>>)[method] = async () => {
      seen.calls.push(method);
      throw new Error(`threadpool ${method} was used`);
    };
  }
  return seen;
}

const isPromise = (x: unknown): boolean => x instanceof Promise;

const bytes = (n: number): Uint8Array => new Uint8Array(randomBytes(n));

/** A file system that accepts writes without storing a byte and without an error (seen on some FUSE/NFS setups). */
function storeNothing(backend: FileBackend): void {
  // Through the threadpool only, where the handle's writev is what stores.
  Object.assign(backend as unknown as object, { inlineWrites: 'never', ringWrites: false });
  const handle = (backend as unknown as { handle: FileHandle }).handle;
  handle.writev = (async (buffers: NodeJS.ArrayBufferView[]) => {
    await new Promise((resolve) => setImmediate(resolve)); // like real I/O: a threadpool round trip
    return { bytesWritten: 0, buffers };
  }) as FileHandle['writev'];
}

/** Settles with the promise, or rejects once `ms` pass: a hang becomes a failure, not a stuck suite. */
function bounded<T>(promise: Promise<T>, ms = 2000): Promise<T> {
  return Promise.race([promise, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`still running after ${ms} ms`)), ms).unref())]);
}

describe('FileBackend', () => {
  it('writev that stores 0 bytes fails with EIO instead of retrying forever', async () => {
    const backend = await fileBackend();
    storeNothing(backend);
    await expect(bounded((async () => backend.writev(4096, [new Uint8Array(512), new Uint8Array(512)]))())).rejects.toMatchObject({ code: 'EIO', message: expect.stringMatching(/stored 0 bytes/) });
    await backend.close();
  });

  it('a Write to such a file completes with Write Fault', async () => {
    const backend = await fileBackend();
    const ns = new Namespace({ nsid: 1, backend });
    const h = new TestHost({ namespaces: [ns] }).start();
    await h.createIoQueuePair(1);
    h.memory.fill(DATA, pattern(4096));
    storeNothing(backend);
    const cqe = await bounded(h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw12: 7 }));
    expect(code(cqe.status)).toBe(code(Status.WRITE_FAULT));
    await backend.close();
  });

  it('a file in tmpfs is read and written on the calling thread, a large transfer through the threadpool', async () => {
    const backend = await fileBackend('/dev/shm');
    const written = bytes(4096);
    expect(isPromise(backend.writev(8192, [written.subarray(0, 1000), written.subarray(1000)]))).toBe(false);
    const back = [new Uint8Array(100), new Uint8Array(3996)];
    expect(isPromise(backend.readv(8192, back))).toBe(false);
    expect(Buffer.concat(back).equals(Buffer.from(written))).toBe(true);

    const large = bytes(512 * 1024);
    const pendingWrite = backend.writev(65536, [large]);
    expect(isPromise(pendingWrite)).toBe(true);
    await pendingWrite;
    expect(Buffer.from(await backend.read(65536, large.length)).equals(Buffer.from(large))).toBe(true);
    await backend.close();
  });

  it('a page-cache hit on a disk file is read without the threadpool; writes land either way', async () => {
    const backend = await fileBackend();
    const written = bytes(4096);
    await backend.writev(4096, [written]);
    const back = new Uint8Array(4096);
    // Just written, so in the page cache: RWF_NOWAIT takes it at once (tmpfs copies it anyway).
    expect(isPromise(backend.readv(4096, [back]))).toBe(false);
    expect(Buffer.from(back).equals(Buffer.from(written))).toBe(true);
    await backend.close();
  });

  it('more buffers than one system call takes: the rest continues after the short transfer', async () => {
    for (const [parent, aio] of [['/dev/shm', 'threads'], [tmpdir(), 'threads'], ['/dev/shm', 'io_uring'], [tmpdir(), 'io_uring']] as const) {
      const backend = await fileBackend(parent, aio);
      // Off this thread: the threadpool or the ring takes all of it.
      (backend as unknown as { inlineReads: string }).inlineReads = 'never';
      const written = bytes(1500 * 16);
      await backend.writev(0, Array.from({ length: 1500 }, (_, i) => written.subarray(i * 16, i * 16 + 16)));
      const views = Array.from({ length: 1500 }, () => new Uint8Array(16));
      await backend.readv(0, views);
      expect(Buffer.concat(views).equals(Buffer.from(written))).toBe(true);
      await backend.close();
    }
  });
  it('dropCache writes a disk file back and drops its pages, so reads come from the disk; a file in memory keeps its pages', async () => {
    const onDisk = await fileBackend(diskScratchParent());
    const written = bytes(256 * 1024);
    await onDisk.writev(0, [written]);
    expect(residentPages(onDisk.path)).toBeGreaterThanOrEqual(64);
    await onDisk.dropCache();
    // Dirty pages would stay: none are left, so the write went back to the disk first.
    expect(residentPages(onDisk.path)).toBe(0);
    expect(Buffer.from(await onDisk.read(0, written.length)).equals(Buffer.from(written))).toBe(true);
    await onDisk.close();

    const inMemory = await fileBackend('/dev/shm');
    await inMemory.writev(0, [bytes(64 * 1024)]);
    await inMemory.dropCache();
    expect(residentPages(inMemory.path)).toBe(16);
    await inMemory.close();
  });
  it('write zeroes is fallocate(ZERO_RANGE) on a disk file (no data written, blocks kept), zeros written in tmpfs', async () => {
    for (const parent of [diskScratchParent(), '/dev/shm']) {
      const backend = await fileBackend(parent);
      await backend.writev(0, [bytes(256 * 1024)]);
      await backend.flush();
      const blocksBefore = statSync(backend.path).blocks;
      let writes = 0;
      const writev = backend.writev.bind(backend);
      backend.writev = (offset, sources) => {
        writes++;
        return writev(offset, sources);
      };
      await backend.writeZeroes(64 * 1024, 128 * 1024);
      const back = Buffer.from(await backend.read(0, 256 * 1024));
      expect(back.subarray(64 * 1024, 192 * 1024).every((b) => b === 0)).toBe(true);
      expect(back.subarray(0, 64 * 1024).some((b) => b !== 0)).toBe(true);
      expect(back.subarray(192 * 1024).some((b) => b !== 0)).toBe(true);
      const inMemory = parent === '/dev/shm';
      // tmpfs refuses ZERO_RANGE: the zeros are written, once per bounded chunk.
      expect({ parent, writes }).toEqual({ parent, writes: inMemory ? 1 : 0 });
      expect(statSync(backend.path).blocks).toBe(blocksBefore);
      await backend.close();
    }
  });

  it('after one failed fdatasync every later flush fails too: Linux reports a writeback error once, and the data is gone', async () => {
    const backend = await fileBackend(diskScratchParent(), 'threads');
    const handle = (backend as unknown as { handle: FileHandle }).handle;
    const datasync = handle.datasync.bind(handle);
    handle.datasync = () => Promise.reject(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO', syscall: 'fdatasync' }));
    await backend.writev(0, [bytes(4096)]);
    await expect(backend.flush()).rejects.toMatchObject({ code: 'EIO' });
    handle.datasync = datasync; // the next fdatasync would succeed: the kernel has forgotten the error
    await expect(backend.flush()).rejects.toThrow(/an earlier fdatasync failed/);
    await expect(backend.dropCache()).rejects.toThrow(/an earlier fdatasync failed/);
    await backend.close();
  });
});

/** The open flags of `backend`'s file, as the kernel holds them (/proc/self/fdinfo, octal). */
function openFlags(backend: FileBackend): number {
  const fd = (backend as unknown as { handle: FileHandle }).handle.fd;
  const line = /^flags:\s*([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
  if (!line) throw new Error(`no flags in /proc/self/fdinfo/${fd}`);
  return parseInt(line[1]!, 8);
}
const O_DIRECT = 0o40000;
const O_DSYNC = 0o10000;

/** `n` random bytes at a page-aligned address, as guest RAM is. */
function alignedBytes(n: number): Uint8Array {
  const out = new Uint8Array(loadedNative().alignedBuffer(n, 4096));
  out.set(randomBytes(n));
  return out;
}

async function cachedBackend(cache: FileCache, aio?: FileAio, parent = diskScratchParent()): Promise<FileBackend> {
  return FileBackend.open(join(scratchDir(parent), 'disk.img'), { size: 1 << 20, cache, ...(aio ? { aio } : {}) });
}

describe('FileBackend cache modes (QEMU cache=)', () => {
  it('open flags and the volatile write cache follow the mode: O_DIRECT for none/directsync, O_DSYNC without a write cache', async () => {
    const expected: Record<FileCache, { direct: boolean; dsync: boolean }> = {
      writeback: { direct: false, dsync: false },
      none: { direct: true, dsync: false },
      writethrough: { direct: false, dsync: true },
      directsync: { direct: true, dsync: true },
    };
    for (const cache of FILE_CACHES) {
      const backend = await cachedBackend(cache);
      const flags = openFlags(backend);
      expect({ cache, direct: (flags & O_DIRECT) !== 0, dsync: (flags & O_DSYNC) !== 0 }).toEqual({ cache, ...expected[cache] });
      expect(backend.volatileCache).toBe(!expected[cache].dsync);
      expect(backend.cache).toBe(cache);
      await backend.close();
    }
    const byDefault = await fileBackend(diskScratchParent());
    expect(byDefault.cache).toBe('writeback');
    expect(openFlags(byDefault) & (O_DIRECT | O_DSYNC)).toBe(0);
    await byDefault.close();
  });

  it('cache=none on a disk file leaves none of its pages in the page cache, through the ring and the threadpool', async () => {
    for (const aio of ['io_uring', 'threads'] as const) {
      if (aio === 'io_uring' && !ioUringAvailable()) continue;
      const backend = await cachedBackend('none', aio);
      const written = alignedBytes(256 * 1024);
      await backend.writev(64 * 1024, [written.subarray(0, 4096), written.subarray(4096)]);
      const back = new Uint8Array(loadedNative().alignedBuffer(written.length, 4096));
      await backend.readv(64 * 1024, [back]);
      expect(Buffer.from(back).equals(Buffer.from(written))).toBe(true);
      // Buffered, the write alone would leave 64 pages here.
      expect(residentPages(backend.path)).toBe(0);
      await backend.flush();
      await backend.close();
    }
  });

  it('guest buffers O_DIRECT cannot take (any address, any length) go through an aligned copy', async () => {
    const backend = await cachedBackend('directsync');
    const memory = alignedBytes(64 * 1024);
    // A PRP list may start at any dword: views at +4 with lengths that are not whole blocks.
    const sources = [memory.subarray(4, 4 + 1000), memory.subarray(8192 + 12, 8192 + 12 + 7192)];
    await backend.writev(4096, sources);
    const targets = [new Uint8Array(3000), memory.subarray(40_000 + 4, 40_000 + 4 + 5192)];
    await backend.readv(4096, targets);
    expect(Buffer.concat(targets).equals(Buffer.concat(sources))).toBe(true);
    expect(residentPages(backend.path)).toBe(0);
    // The same through read()/write(), whose buffers come from Node's allocator.
    const data = bytes(8192);
    await backend.write(0, data);
    expect(Buffer.from(await backend.read(0, 8192)).equals(Buffer.from(data))).toBe(true);
    await backend.close();
  });

  it('write zeroes and discard on an O_DIRECT file read back as zeros', async () => {
    const backend = await cachedBackend('none');
    await backend.writev(0, [alignedBytes(128 * 1024)]);
    await backend.writeZeroes(4096, 16 * 1024);
    await backend.discard(64 * 1024, 8192);
    const back = Buffer.from(await backend.read(0, 128 * 1024));
    expect(back.subarray(4096, 20 * 1024).every((b) => b === 0)).toBe(true);
    expect(back.subarray(64 * 1024, 72 * 1024).every((b) => b === 0)).toBe(true);
    expect(back.subarray(0, 4096).some((b) => b !== 0)).toBe(true);
    await backend.close();
  });

  it('without a volatile write cache, zeroed and deallocated ranges are made durable before they complete', async () => {
    for (const [cache, durable] of [['directsync', true], ['writethrough', true], ['none', false], ['writeback', false]] as const) {
      const backend = await cachedBackend(cache);
      let flushes = 0;
      const flush = backend.flush.bind(backend);
      backend.flush = () => {
        flushes++;
        return flush();
      };
      await backend.writeZeroes(0, 8192);
      await backend.discard(8192, 8192);
      expect({ cache, flushes }).toEqual({ cache, flushes: durable ? 2 : 0 });
      await backend.close();
    }
  });

  it('writethrough writes (O_DSYNC, each an fdatasync) go through the threadpool, never inline or through the ring', async () => {
    const backend = await cachedBackend('writethrough', ioUringAvailable() ? 'io_uring' : 'threads');
    // Not even tried inline: where a file system takes RWF_NOWAIT buffered writes (XFS) the O_DSYNC
    // fdatasync would run on the event loop.
    expect((backend as unknown as { inlineWrites: string }).inlineWrites).toBe('never');
    const seen = forbidThreadpool(backend);
    await expect(Promise.resolve(backend.writev(0, [bytes(4096)]))).rejects.toThrow(/threadpool writev was used/);
    expect(seen.calls).toEqual(['writev']);
    await backend.close();
  });

  it('an unknown cache mode (a hand-edited state record) is refused with the modes, and a refused new file is not left behind', async () => {
    const dir = scratchDir(diskScratchParent());
    await expect(FileBackend.open(join(dir, 'a.img'), { size: 1 << 20, cache: 'unsafe' as FileCache })).rejects.toThrow(/cache must be writeback, none, writethrough, directsync, got 'unsafe'/);
    await expect(FileBackend.open(join(dir, 'b.img'), { size: 1 << 20, cache: 'none', blockSize: 256 })).rejects.toThrow(/cache=none needs blocks/);
    expect(readdirSync(dir)).toEqual([]);
  });

  it('a block smaller than what O_DIRECT needs on the file system is refused with the fix', async () => {
    const path = join(scratchDir(diskScratchParent()), 'small.img');
    writeFileSync(path, new Uint8Array(1 << 20));
    const fd = openSync(path, 'r');
    const needs = loadedNative().directIoAlignment(fd).offset || 4096;
    closeSync(fd);
    await expect(FileBackend.open(path, { cache: 'none', blockSize: needs / 2 })).rejects.toThrow(
      new RegExp(`cache=none needs blocks of ${needs} bytes or more here .*use lbads=4096 \\(ns add: --block-size 4096\\) or cache=writeback`),
    );
  });

  it('in tmpfs, O_DIRECT is a plain copy: transfers stay on this thread and nothing is bounced', async () => {
    const backend = await cachedBackend('none', undefined, '/dev/shm');
    const seen = forbidThreadpool(backend);
    const written = bytes(4096 + 3);
    expect(isPromise(backend.writev(512, [written]))).toBe(false);
    const back = new Uint8Array(written.length);
    expect(isPromise(backend.readv(512, [back]))).toBe(false);
    expect(Buffer.from(back).equals(Buffer.from(written))).toBe(true);
    expect(seen.calls).toEqual([]);
    await backend.close();
  });

  it('a write-back namespace attached after the host was told there is no volatile write cache flushes each write itself', async () => {
    const h = new TestHost().start(); // a RAM namespace: no volatile write cache
    expect((await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 1 })).status).toBe(0);
    expect(h.memory.slice(DATA, 4096)[525]! & 1).toBe(0);
    const backend = await cachedBackend('writeback');
    let flushes = 0;
    const flush = backend.flush.bind(backend);
    backend.flush = () => (flushes++, flush());
    h.subsystem.addNamespace(new Namespace({ nsid: 2, backend }));
    await h.createIoQueuePair(1);
    h.memory.fill(DATA, pattern(4096, 3));
    expect(code((await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 2, prp1: DATA, cdw12: 7 })).status)).toBe(0);
    expect(flushes).toBe(1);
    await backend.close();
  });

  it('Identify reports no volatile write cache when every file namespace writes through', async () => {
    for (const [cache, vwc] of [['directsync', 0], ['writethrough', 0], ['none', 1]] as const) {
      const backend = await cachedBackend(cache);
      const h = new TestHost({ namespaces: [new Namespace({ nsid: 1, backend })] }).start();
      expect((await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 1 })).status).toBe(0);
      expect({ cache, vwc: h.memory.slice(DATA, 4096)[525]! & 1 }).toEqual({ cache, vwc });
      // A Write through the controller lands, bounced or not.
      await h.createIoQueuePair(1);
      h.memory.fill(DATA, pattern(8192, 7));
      expect(code((await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, prp2: DATA + 4096, cdw12: 15 })).status)).toBe(0);
      expect(Buffer.from(await backend.read(0, 8192)).equals(Buffer.from(pattern(8192, 7)))).toBe(true);
      await backend.close();
    }
  });
});

describe('FileBackend with aio=io_uring', () => {
  it('is the default where the kernel offers io_uring, threads otherwise', async () => {
    const backend = await fileBackend();
    expect(backend.aio).toBe(ioUringAvailable() ? 'io_uring' : 'threads');
    await backend.close();
    const threaded = await fileBackend(tmpdir(), 'threads');
    expect(threaded.aio).toBe('threads');
    await threaded.close();
  });

  it('reads that cannot be done inline, flushes and large tmpfs writes go through the ring, not the threadpool', async () => {
    for (const parent of [tmpdir(), '/dev/shm']) {
      const backend = await fileBackend(parent, 'io_uring');
      const written = bytes(512 * 1024);
      await backend.writev(4096, [written]);
      (backend as unknown as { inlineReads: string }).inlineReads = 'never';
      const seen = forbidThreadpool(backend);
      const back = [new Uint8Array(1000), new Uint8Array(written.length - 1000)];
      const pending = backend.readv(4096, back);
      expect(isPromise(pending)).toBe(true);
      await pending;
      expect(Buffer.concat(back).equals(Buffer.from(written))).toBe(true);
      await backend.flush();
      // tmpfs writes NOWAIT, so its writes past the inline size take the ring too.
      if (parent === '/dev/shm') await backend.writev(0, [bytes(300 * 1024)]);
      expect(seen.calls).toEqual([]);
      await backend.close();
    }
  });

  it('on a file system that refuses RWF_NOWAIT writes (ext4), writes stay on the threadpool', async () => {
    const backend = await fileBackend(tmpdir(), 'io_uring');
    await backend.writev(0, [bytes(4096)]);
    const refused = (backend as unknown as { inlineWrites: string }).inlineWrites === 'never';
    const seen = forbidThreadpool(backend);
    const write = Promise.resolve(backend.writev(8192, [bytes(4096)]));
    if (refused) {
      await expect(write).rejects.toThrow(/threadpool writev was used/);
      expect(seen.calls).toEqual(['writev']);
    } else {
      await write;
      expect(seen.calls).toEqual([]);
    }
    await backend.close();
  });

  it('when the ring has no room, transfers and flushes take the threadpool instead', async () => {
    const backend = await fileBackend('/dev/shm', 'io_uring');
    const ring = (backend as unknown as { ring: IoRing }).ring;
    ring.readv = ring.writev = ring.datasync = () => null;
    (backend as unknown as { inlineReads: string }).inlineReads = 'never';
    (backend as unknown as { inlineWrites: string }).inlineWrites = 'never';
    const handle = (backend as unknown as { handle: FileHandle }).handle;
    const used: string[] = [];
    for (const method of ['readv', 'writev', 'datasync'] as const) {
      const original = (handle[method] as (...args: unknown[]) => Promise<unknown>).bind(handle);
      (handle as unknown as Record<string, unknown>)[method] = (...args: unknown[]) => {
        used.push(method);
        return original(...args);
      };
    }
    const written = bytes(4096);
    await backend.writev(0, [written]);
    const back = new Uint8Array(4096);
    await backend.readv(0, [back]);
    await backend.flush();
    expect(Buffer.from(back).equals(Buffer.from(written))).toBe(true);
    expect(used).toEqual(['writev', 'readv', 'datasync']);
    await backend.close();
  });

  it('past the end of a file that shrank, the rest of a ring read is zeros', async () => {
    const dir = scratchDir();
    const path = join(dir, 'disk.img');
    const backend = await FileBackend.open(path, { size: 1 << 20, aio: 'io_uring' });
    (backend as unknown as { inlineReads: string }).inlineReads = 'never';
    writeFileSync(path, Buffer.alloc(6000, 0xab)); // truncated behind the backend's back
    const back = new Uint8Array(8192).fill(1);
    await backend.readv(4096, [back]);
    expect(back.subarray(0, 1904).every((b) => b === 0xab)).toBe(true);
    expect(back.subarray(1904).every((b) => b === 0)).toBe(true);
    await backend.close();
  });

  it('close() waits for the transfers in flight', async () => {
    const backend = await fileBackend('/dev/shm', 'io_uring');
    const written = bytes(1 << 19);
    await backend.writev(0, [written]);
    (backend as unknown as { inlineReads: string }).inlineReads = 'never';
    const back = new Uint8Array(written.length);
    let read = false;
    const reading = Promise.resolve(backend.readv(0, [back])).then(() => (read = true));
    await backend.close();
    expect(read).toBe(true);
    await reading;
    expect(Buffer.from(back).equals(Buffer.from(written))).toBe(true);
  });
});

describe('IoRing', () => {
  it('a kernel error rejects with its code', async () => {
    const ring = new IoRing();
    const path = join(scratchDir(), 'wo.img');
    writeFileSync(path, Buffer.alloc(4096));
    const fd = openSync(path, 'a'); // write-only: a read is EBADF
    try {
      await expect(ring.readv(fd, [new Uint8Array(4096)], 0)).rejects.toMatchObject({ code: 'EBADF', syscall: 'preadv' });
      await expect(ring.writev(fd, [new Uint8Array(4096).fill(7)], 0)).resolves.toBe(4096);
    } finally {
      await ring.close();
      closeSync(fd);
    }
  });

  it('past the transfers it can hold in flight, it declines (null) instead of queueing without bound', async () => {
    const ring = new IoRing();
    const path = join(scratchDir('/dev/shm'), 'many.img');
    writeFileSync(path, Buffer.alloc(4096, 5));
    const fd = openSync(path, 'r');
    try {
      const views = [new Uint8Array(16)];
      const started: Promise<number>[] = [];
      for (;;) {
        const p = ring.readv(fd, views, 0);
        if (!p) break;
        started.push(p);
      }
      expect(started.length).toBe(2048);
      expect(ring.pending).toBe(2048);
      expect(await Promise.all(started)).toEqual(started.map(() => 16));
      expect(ring.pending).toBe(0);
      expect(ring.readv(fd, views, 0)).not.toBeNull();
    } finally {
      await ring.close();
      closeSync(fd);
    }
  });
});
