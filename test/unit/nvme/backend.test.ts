import { afterEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileBackend, type FileAio } from '../../../src/nvme/backend.js';
import { IoRing } from '../../../src/nvme/io-ring.js';
import { Namespace } from '../../../src/nvme/namespace.js';
import { NvmOpcode, Status } from '../../../src/nvme/spec.js';
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
  (backend as unknown as { inlineWrites: string }).inlineWrites = 'never';
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
