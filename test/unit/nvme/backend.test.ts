import { afterEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileBackend } from '../../../src/nvme/backend.js';
import { Namespace } from '../../../src/nvme/namespace.js';
import { NvmOpcode, Status } from '../../../src/nvme/spec.js';
import { DATA, TestHost, code, pattern } from './helpers.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

async function fileBackend(parent = tmpdir()): Promise<FileBackend> {
  const dir = mkdtempSync(join(parent, 'nvme-backend-'));
  dirs.push(dir);
  return FileBackend.open(join(dir, 'disk.img'), { size: 1 << 20 });
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
    for (const parent of ['/dev/shm', tmpdir()]) {
      const backend = await fileBackend(parent);
      const written = bytes(1500 * 16);
      await backend.writev(0, Array.from({ length: 1500 }, (_, i) => written.subarray(i * 16, i * 16 + 16)));
      const views = Array.from({ length: 1500 }, () => new Uint8Array(16));
      await backend.readv(0, views);
      expect(Buffer.concat(views).equals(Buffer.from(written))).toBe(true);
      await backend.close();
    }
  });
});
