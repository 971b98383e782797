// Reading backing files from the host side of a test, and what the kernel offers for them.

import { closeSync, openSync, readSync } from 'node:fs';
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
