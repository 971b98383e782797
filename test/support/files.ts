// Reading backing files from the host side of a test, and what the kernel offers for them.

import { spawn } from 'node:child_process';
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

/**
 * Writes `path` back and drops its pages from the page cache (GNU dd's documented idiom), so the
 * next reads of it wait for the disk. Rejects when either step fails.
 */
export async function dropFromPageCache(path: string): Promise<void> {
  for (const [cmd, args] of [['sync', [path]], ['dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none']]] as const) {
    await new Promise<void>((resolve, reject) => {
      spawn(cmd, args, { stdio: 'ignore' })
        .on('error', reject)
        .on('exit', (code, signal) => (code === 0 ? resolve() : reject(new Error(`${cmd} ${args.join(' ')} failed (${code ?? signal})`))));
    });
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
