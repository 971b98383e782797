// Reading backing files from the host side of a test.

import { closeSync, openSync, readSync } from 'node:fs';

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
