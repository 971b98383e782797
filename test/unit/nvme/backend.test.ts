import { afterEach, describe, expect, it } from 'vitest';
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

async function fileBackend(): Promise<FileBackend> {
  const dir = mkdtempSync(join(tmpdir(), 'nvme-backend-'));
  dirs.push(dir);
  return FileBackend.open(join(dir, 'disk.img'), { size: 1 << 20 });
}

/** A file system that accepts writes without storing a byte and without an error (seen on some FUSE/NFS setups). */
function storeNothing(backend: FileBackend): void {
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
    await expect(bounded(backend.writev(4096, [new Uint8Array(512), new Uint8Array(512)]))).rejects.toMatchObject({ code: 'EIO', message: expect.stringMatching(/stored 0 bytes/) });
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
});
