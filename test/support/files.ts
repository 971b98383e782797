// Reading backing files from the host side of a test, and what the kernel offers for them.

import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { loadedNative } from '../../src/native.js';
import { IoRing } from '../../src/nvme/io-ring.js';

/** Whether this kernel lets a process set up an io_uring (file namespaces' default aio then). */
export function ioUringAvailable(): boolean {
  try {
    void new IoRing().close();
    return true;
  } catch {
    return false;
  }
}

/**
 * Writes `path` back and drops its pages from the page cache (the addon's dropPageCache, as a
 * migration's destination does), so the next reads of it wait for the disk.
 */
export async function dropFromPageCache(path: string): Promise<void> {
  const handle = await open(path, 'r');
  try {
    await loadedNative().dropPageCache(handle.fd);
  } finally {
    await handle.close();
  }
}

/** `length` bytes of `path` from `offset` (zeros past its end). */
export function fileRange(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const out = Buffer.alloc(length);
    readSync(fd, out, 0, length, offset);
    return out;
  } finally {
    closeSync(fd);
  }
}

/** How many of `path`'s pages are in this host's page cache (util-linux fincore). */
export function residentPages(path: string): number {
  const out = execFileSync('fincore', ['--noheadings', '--output', 'PAGES', path], { encoding: 'utf8' });
  const pages = Number(out.trim());
  if (!Number.isInteger(pages)) throw new Error(`fincore ${path}: unexpected output '${out.trim()}'`);
  return pages;
}

/**
 * A directory for files that must live on a disk file system (with a page cache in front of it):
 * the OS temp dir, else /var/tmp. Throws when neither is on one, so such a test fails with the reason.
 */
export function diskScratchParent(): string {
  for (const dir of [tmpdir(), '/var/tmp']) {
    if (!existsSync(dir)) continue;
    const fd = openSync(dir, 'r');
    try {
      if (!loadedNative().memoryBackedFile(fd)) return dir;
    } finally {
      closeSync(fd);
    }
  }
  throw new Error(`neither ${tmpdir()} nor /var/tmp is on a disk file system: this test needs a page cache in front of a disk`);
}
