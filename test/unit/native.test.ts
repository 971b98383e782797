import { describe, it, expect, beforeEach, afterEach } from 'vitest';
import { spawnSync } from 'node:child_process';
import { ftruncateSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { native, type Connection, type Listener, type NativeError } from '../../src/native.js';
import { until } from './nvme/helpers.js';
import { diskScratchParent } from '../support/files.js';

const openFdCount = (): number => readdirSync('/proc/self/fd').length;

function errorOf(fn: () => unknown): NativeError {
  try {
    fn();
  } catch (err) {
    return err as NativeError;
  }
  throw new Error('expected an exception');
}

interface Received {
  data: Buffer;
  fds: number[];
}

/** Collects a server-side connection's input; resolves when `bytes` have arrived. */
function collect(conn: Connection) {
  const chunks: Received[] = [];
  let closed: { code: string | null } | undefined;
  const waiters: Array<() => void> = [];
  const wake = () => waiters.splice(0).forEach((w) => w());
  conn.start(
    (data, fds) => {
      chunks.push({ data, fds });
      wake();
    },
    (code) => {
      closed = { code };
      wake();
    },
  );
  const total = () => chunks.reduce((n, c) => n + c.data.length, 0);
  return {
    chunks,
    closed: () => closed,
    async waitFor(pred: () => boolean, timeoutMs = 5000): Promise<void> {
      const deadline = Date.now() + timeoutMs;
      while (!pred()) {
        if (Date.now() > deadline) throw new Error('timeout');
        await new Promise<void>((resolve) => {
          waiters.push(resolve);
          setTimeout(resolve, 50);
        });
      }
    },
    total,
  };
}

describe('native addon', () => {
  let dir: string;
  let sockPath: string;
  let listener: Listener | undefined;
  const accepted: Connection[] = [];

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'vfio-native-'));
    sockPath = join(dir, 'sock');
  });
  afterEach(() => {
    listener?.close();
    listener = undefined;
    accepted.splice(0).forEach((c) => c.close());
    rmSync(dir, { recursive: true, force: true });
  });

  async function listenAndConnect(): Promise<{ client: Connection; server: Connection }> {
    let resolveServer!: (c: Connection) => void;
    const serverP = new Promise<Connection>((r) => (resolveServer = r));
    listener = new native.Listener(sockPath, (c) => {
      accepted.push(c);
      resolveServer(c);
    });
    const client = native.connect(sockPath);
    accepted.push(client);
    const server = await serverP;
    expect(server).toBeInstanceOf(native.Connection);
    return { client, server };
  }

  it('passes data and fds; received fds refer to the same memfd', async () => {
    const { client, server } = await listenAndConnect();
    const page = native.pageSize();
    const a = native.memfdCreate('a', page);
    const b = native.memfdCreate('b', 2 * page);
    const rx = collect(server);
    client.send(Buffer.from('hello'), [a, b]);
    await rx.waitFor(() => rx.total() === 5);
    expect(Buffer.concat(rx.chunks.map((c) => c.data)).toString()).toBe('hello');
    const fds = rx.chunks.flatMap((c) => c.fds);
    expect(fds).toHaveLength(2);
    expect(fds).not.toContain(a);
    expect(native.fdStat(fds[0]!).size).toBe(page);
    expect(native.fdStat(fds[1]!).size).toBe(2 * page);

    const mine = native.mmap(b, BigInt(page), page, true);
    const theirs = native.mmap(fds[1]!, BigInt(page), page, false);
    new Uint8Array(mine).set([1, 2, 3, 4], 100);
    expect([...new Uint8Array(theirs, 100, 4)]).toEqual([1, 2, 3, 4]);
    native.munmap(mine);
    native.munmap(theirs);
    for (const fd of [a, b, ...fds]) native.closeFd(fd);
  });

  it('delivers a 2 MiB message completely, in order, across chunks', async () => {
    const { client, server } = await listenAndConnect();
    const big = Buffer.alloc(2 * 1024 * 1024);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7 + (i >> 11)) & 0xff;
    const rx = collect(server);
    client.send(big);
    client.send(Buffer.from('tail'));
    expect(client.pendingWriteBytes()).toBeGreaterThan(0); // socket buffer is smaller than 2 MiB
    await rx.waitFor(() => rx.total() === big.length + 4);
    expect(rx.chunks.length).toBeGreaterThan(1);
    expect(Buffer.concat(rx.chunks.map((c) => c.data)).equals(Buffer.concat([big, Buffer.from('tail')]))).toBe(true);
    expect(client.pendingWriteBytes()).toBe(0);
  });

  it('queued fds still arrive with their message', async () => {
    const { client, server } = await listenAndConnect();
    const big = Buffer.alloc(1024 * 1024, 0xab);
    const memfd = native.memfdCreate('q', 4096);
    client.send(big); // fills the socket buffer, so the next send is queued
    client.send(Buffer.from('X'), [memfd]);
    native.closeFd(memfd); // the caller keeps ownership; the queue holds a dup
    const rx = collect(server);
    await rx.waitFor(() => rx.total() === big.length + 1);
    const withFds = rx.chunks.filter((c) => c.fds.length > 0);
    expect(withFds).toHaveLength(1);
    // The kernel may glue earlier bytes in front of the fd-carrying message in
    // one recvmsg, but never bytes after it: fds belong to the last message
    // that starts in their chunk.
    expect(withFds[0]!.data.at(-1)).toBe('X'.charCodeAt(0));
    expect(native.fdStat(withFds[0]!.fds[0]!).size).toBe(4096);
    native.closeFd(withFds[0]!.fds[0]!);
  });

  it('reports EOF with onClose(null) and then closes the socket', async () => {
    const { client, server } = await listenAndConnect();
    const rx = collect(server);
    client.close();
    client.close(); // idempotent
    expect(client.fd).toBe(-1);
    await rx.waitFor(() => rx.closed() !== undefined);
    expect(rx.closed()).toEqual({ code: null });
    expect(server.fd).toBe(-1);
    expect(errorOf(() => server.send(Buffer.from('x'))).code).toBe('EBADF');
  });

  it('reports a send to a closed peer through onClose', async () => {
    const { client, server } = await listenAndConnect();
    let closedWith: string | null | undefined;
    client.start(
      () => {},
      (code) => (closedWith = code),
    );
    server.close();
    client.send(Buffer.from('x'));
    await until(() => closedWith !== undefined, 'onClose', 5000);
    expect([null, 'EPIPE', 'ECONNRESET']).toContain(closedWith);
  });

  it('errors carry errno codes', () => {
    const e = errorOf(() => native.connect(join(dir, 'missing')));
    expect(e).toBeInstanceOf(Error);
    expect(e.code).toBe('ENOENT');
    expect(e.message).toContain('connect');
    expect(e.message).toContain(join(dir, 'missing'));

    listener = new native.Listener(sockPath, () => {});
    const e2 = errorOf(() => new native.Listener(sockPath, () => {}));
    expect(e2.code).toBe('EADDRINUSE');
    expect(e2.message).toContain('bind');

    expect(errorOf(() => native.closeFd(-1))).toBeInstanceOf(RangeError);
    expect(errorOf(() => native.fdStat('3' as unknown as number))).toBeInstanceOf(TypeError);
    expect(errorOf(() => native.fdStat(999999)).code).toBe('EBADF');
    expect(errorOf(() => new (native.Connection as unknown as new () => unknown)())).toBeInstanceOf(TypeError);
  });

  it('mmap/munmap detaches views; double munmap is EINVAL', () => {
    const page = native.pageSize();
    const fd = native.memfdCreate('m', 2 * page);
    const buf = native.mmap(fd, 0n, 2 * page, true);
    const view = new Uint8Array(buf);
    view[0] = 42;
    expect(view.length).toBe(2 * page);
    native.munmap(buf);
    expect(view.length).toBe(0);
    expect(buf.byteLength).toBe(0);
    expect(errorOf(() => native.munmap(buf)).code).toBe('EINVAL');
    expect(errorOf(() => native.munmap(new ArrayBuffer(8))).code).toBe('EINVAL');
    expect(errorOf(() => native.mmap(fd, 1n, page, true)).code).toBe('EINVAL');
    expect(errorOf(() => native.mmap(fd, 0n, 0, true)).code).toBe('EINVAL');
    expect(errorOf(() => native.mmap(fd, 0n, -1, true)).code).toBe('EINVAL');
    // Data written through the first mapping is visible through a new one.
    const again = native.mmap(fd, 0n, page, false);
    expect(new Uint8Array(again)[0]).toBe(42);
    native.munmap(again);
    native.closeFd(fd);
  });

  it('a mapping whose file shrinks under it turns into zero pages and counts, instead of SIGBUS', () => {
    const page = native.pageSize();
    const fd = native.memfdCreate('shrinks', 4 * page);
    const buffer = native.mmap(fd, 0n, 4 * page, true);
    const view = new Uint8Array(buffer);
    view.fill(0x5a);
    const slot = native.guardSlot(buffer);
    expect(slot).toBeGreaterThanOrEqual(0);
    const before = native.poisonCounts[slot]!;
    expect(native.fdStat(fd).shrinkSealed).toBe(false);
    ftruncateSync(fd, page); // pages 1..3 are gone
    expect(view[2 * page]).toBe(0);
    expect(view[0]).toBe(0); // the whole mapping was replaced, not just the faulting page
    expect(native.poisonCounts[slot]).toBe(before + 1);
    view.fill(0x11, 2 * page); // stores too, once replaced without another fault
    expect(view[3 * page]).toBe(0x11);
    expect(native.poisonCounts[slot]).toBe(before + 1);
    // The file itself is untouched by the replacement: its first page still holds what we wrote.
    const fresh = native.mmap(fd, 0n, page, false);
    expect(new Uint8Array(fresh)[0]).toBe(0x5a);
    native.munmap(fresh);
    native.munmap(buffer);
    native.closeFd(fd);
  });

  it('memfds sealed like QEMU\'s cannot shrink, and fdStat says so', () => {
    const fd = native.memfdCreate('sealed', 4096, true);
    expect(native.fdStat(fd)).toMatchObject({ size: 4096, shrinkSealed: true });
    expect(() => ftruncateSync(fd, 0)).toThrow(expect.objectContaining({ code: 'EPERM' }));
    native.closeFd(fd);
  });

  it('a SIGBUS that is not about a guarded mapping still ends the process', () => {
    const script = "import('./src/native.ts').then(({ native }) => { native.pageSize(); process.kill(process.pid, 'SIGBUS'); setTimeout(() => console.log('survived'), 1000); })";
    const result = spawnSync(process.execPath, ['--import', 'tsx', '-e', script], { cwd: fileURLToPath(new URL('../..', import.meta.url)), encoding: 'utf8', timeout: 20_000 });
    expect({ signal: result.signal, stdout: result.stdout }).toEqual({ signal: 'SIGBUS', stdout: '' });
  });

  it('eventfd write/read/EAGAIN', () => {
    const fd = native.eventfd();
    expect(native.eventfdRead(fd)).toBe(0n);
    native.eventfdWrite(fd);
    native.eventfdWrite(fd, 5n);
    expect(native.eventfdRead(fd)).toBe(6n);
    expect(native.eventfdRead(fd)).toBe(0n);
    native.eventfdWrite(fd, 0xfffffffffffffffen); // the maximum counter value
    expect(errorOf(() => native.eventfdWrite(fd, 1n)).code).toBe('EAGAIN');
    native.closeFd(fd);
    expect(native.eventfdRead(native.eventfd(3))).toBe(3n); // leaks one fd, fine in a test
  });

  it('watchFd fires when an eventfd is written, and not once closed', async () => {
    const fd = native.eventfd();
    let fired = 0;
    const w = native.watchFd(fd, () => {
      fired++;
      native.eventfdRead(fd);
    });
    native.eventfdWrite(fd);
    await until(() => fired === 1, 'the watcher', 5000);
    w.close();
    w.close();
    // A control watcher made readable at the same moment: once it has fired, libuv has polled
    // both fds, so the closed watcher would have fired too.
    const control = native.eventfd();
    let controlFired = false;
    const cw = native.watchFd(control, () => {
      controlFired = true;
      native.eventfdRead(control);
    });
    native.eventfdWrite(fd);
    native.eventfdWrite(control);
    await until(() => controlFired, 'the control watcher', 5000);
    expect(fired).toBe(1);
    cw.close();
    native.closeFd(control);
    native.closeFd(fd);
  });

  it('does not leak fds over 1000 connect/close cycles', async () => {
    let serverSideClosed = 0;
    listener = new native.Listener(sockPath, (c) => {
      c.start(
        (_data, fds) => fds.forEach((fd) => native.closeFd(fd)),
        () => serverSideClosed++,
      );
    });
    const cycle = () => {
      const c = native.connect(sockPath);
      const fd = native.memfdCreate('leak', 4096);
      c.send(Buffer.from('x'), [fd]);
      native.closeFd(fd);
      c.close();
    };
    cycle();
    await until(() => serverSideClosed === 1, 'the first connection to be torn down', 5000);
    const before = openFdCount();
    for (let i = 0; i < 1000; i++) {
      cycle();
      // connect() blocks while the backlog (4) is full, so let the listener accept.
      await new Promise((r) => setImmediate(r));
    }
    await until(() => serverSideClosed === 1001, 'every connection to be torn down', 10_000);
    expect(openFdCount()).toBe(before);
  });
});

describe('punchHole', () => {
  it('deallocates a range of a file, which then reads as zeros, without changing its size', async () => {
    const { mkdtempSync, openSync, writeSync, readFileSync, statSync, closeSync, rmSync } = await import('node:fs');
    const { join } = await import('node:path');
    const { tmpdir } = await import('node:os');
    const dir = mkdtempSync(join(tmpdir(), 'nvu-punch-'));
    const path = join(dir, 'disk.img');
    const fd = openSync(path, 'w+');
    try {
      writeSync(fd, Buffer.alloc(1 << 20, 0xab), 0, 1 << 20, 0);
      const blocksBefore = statSync(path).blocks;
      await native.punchHole(fd, 65536, 262144);
      const data = readFileSync(path);
      expect(data.length).toBe(1 << 20);
      expect(data.subarray(65536, 65536 + 262144).every((b) => b === 0)).toBe(true);
      expect(data[65535]).toBe(0xab);
      expect(data[65536 + 262144]).toBe(0xab);
      expect(statSync(path).blocks).toBeLessThan(blocksBefore);
      await expect(native.punchHole(9999, 0, 4096)).rejects.toMatchObject({ code: 'EBADF' });
    } finally {
      closeSync(fd);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('zeroRange', () => {
  it('zeroes a range of a disk file in place, keeping its size; a bad fd rejects with its errno', async () => {
    const { mkdtempSync, openSync, writeSync, readSync, fstatSync, closeSync, rmSync } = await import('node:fs');
    // A disk file system: tmpfs refuses ZERO_RANGE.
    const dir = mkdtempSync(join(diskScratchParent(), 'nvu-zero-'));
    try {
      const fd = openSync(join(dir, 'disk.img'), 'w+');
      writeSync(fd, Buffer.alloc(65536, 0xcd), 0, 65536, 0);
      await native.zeroRange(fd, 4096, 8192);
      const back = Buffer.alloc(65536);
      readSync(fd, back, 0, 65536, 0);
      expect([back.subarray(4096, 12288).every((b) => b === 0), back[4095], back[12288], fstatSync(fd).size]).toEqual([true, 0xcd, 0xcd, 65536]);
      closeSync(fd);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    await expect(native.zeroRange(9999, 0, 4096)).rejects.toMatchObject({ code: 'EBADF' });
    expect(() => native.zeroRange(3, 0, 0)).toThrow(RangeError);
  });
});

describe('dropPageCache', () => {
  it('rejects a bad fd with its errno, and a fd that is not a number with a TypeError', async () => {
    await expect(native.dropPageCache(9999)).rejects.toMatchObject({ code: 'EBADF' });
    expect(() => native.dropPageCache('3' as unknown as number)).toThrow(TypeError);
  });

  it('works on its own copy of the fd: closing the caller fd at once does not make it fail', async () => {
    const { mkdtempSync, openSync, writeSync, closeSync, rmSync } = await import('node:fs');
    const { join } = await import('node:path');
    const { tmpdir } = await import('node:os');
    const dir = mkdtempSync(join(tmpdir(), 'nvu-drop-'));
    try {
      const fd = openSync(join(dir, 'disk.img'), 'w+');
      writeSync(fd, Buffer.alloc(65536, 0xcd), 0, 65536, 0);
      const dropped = native.dropPageCache(fd);
      closeSync(fd);
      await expect(dropped).resolves.toBeUndefined();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('O_DIRECT helpers', () => {
  it('alignedBuffer gives zeroed memory at the asked alignment, as alignedForDirectIo sees it', () => {
    for (const alignment of [512, 4096, 65536]) {
      const bytes = new Uint8Array(native.alignedBuffer(3 * alignment, alignment));
      expect(bytes.every((b) => b === 0)).toBe(true);
      expect(native.alignedForDirectIo([bytes, bytes.subarray(alignment)], alignment, 512)).toBe(true);
      // An address one byte past, and a length that is not whole 512-byte blocks, are both refused.
      expect(native.alignedForDirectIo([bytes.subarray(1, 1 + 512)], 2, 512)).toBe(false);
      expect(native.alignedForDirectIo([bytes.subarray(0, 1000)], alignment, 512)).toBe(false);
    }
    expect(native.alignedForDirectIo([], 512, 512)).toBe(true);
    // An empty view transfers nothing, wherever it points.
    expect(native.alignedForDirectIo([new Uint8Array(native.alignedBuffer(1024, 512)).subarray(3, 3)], 512, 512)).toBe(true);
  });

  it('refuse bad arguments with a clear error', () => {
    expect(() => native.alignedBuffer(4096, 3)).toThrow(/power of two/);
    expect(() => native.alignedBuffer(0, 4096)).toThrow(RangeError);
    expect(() => native.alignedForDirectIo([new Uint8Array(8)], 0, 512)).toThrow(/power of two/);
    expect(() => native.alignedForDirectIo(['x' as unknown as Uint8Array], 512, 512)).toThrow(TypeError);
    expect(() => native.directIoAlignment(-1)).toThrow();
    expect(() => native.directIoAlignment(9999)).toThrow(expect.objectContaining({ code: 'EBADF' }));
  });
});

describe('IoRing', () => {
  it('refuses bad arguments with a clear error, and a closed ring', () => {
    const thrown = (fn: () => unknown): Error => {
      try {
        fn();
      } catch (err) {
        return err as Error;
      }
      throw new Error('did not throw');
    };
    expect(thrown(() => new native.IoRing(3)).message).toMatch(/power of two/);
    expect(thrown(() => new native.IoRing(8192))).toBeInstanceOf(RangeError);
    const ring = new native.IoRing(8);
    try {
      expect(ring.eventFd).toBeGreaterThan(2);
      expect(thrown(() => ring.queue(7, 0, [], 0, 1)).message).toMatch(/op must be/);
      expect(thrown(() => ring.queue(0, 0, 'x' as unknown as Uint8Array[], 0, 1))).toBeInstanceOf(TypeError);
      expect(thrown(() => ring.queue(0, 0, [], -1, 1))).toBeInstanceOf(RangeError);
      expect(thrown(() => ring.queue(0, 0, [], 0, 1 << 20))).toBeInstanceOf(RangeError);
      expect(thrown(() => ring.reap(new Float32Array(4) as unknown as Float64Array))).toBeInstanceOf(TypeError);
      // Eight entries fit before a submit; the ninth is declined, not dropped.
      for (let i = 0; i < 8; i++) expect(ring.queue(2, 0, [], 0, i)).toBe(true);
      expect(ring.queue(2, 0, [], 0, 8)).toBe(false);
      expect(ring.submit()).toBe(8);
    } finally {
      ring.close();
    }
    expect(thrown(() => ring.submit()).message).toMatch(/closed/);
  });
});
