// The DMA table's write observers and write-through mode, and the dirty-page log they feed, against
// fake "mmapped" memory and a fake client (no addon, no socket).

import { describe, expect, it } from 'vitest';
import { DirtyLog } from '../../src/vfio-user/dirty-log.js';
import { DmaTable, type RemoteDma } from '../../src/vfio-user/dma.js';
import type { NativeMemory } from '../../src/vfio-user/transport.js';

const PAGE = 4096;
const MAPPED = { iova: 0x10_0000, size: 16 * PAGE };
const VIA_MESSAGES = { iova: 0x80_0000, size: 4 * PAGE };

/** Files are ArrayBuffers; "mmap" of a whole file returns the buffer itself, so both sides share it. */
function fakeMemory(files: Map<number, ArrayBuffer>): NativeMemory {
  return {
    mmap: (fd, offset, length) => {
      const file = files.get(fd)!;
      if (offset !== 0n || length !== file.byteLength) throw new Error('the fake maps whole files only');
      return file;
    },
    munmap: () => undefined,
    fdStat: (fd) => ({ size: files.get(fd)!.byteLength, blockSize: PAGE, shrinkSealed: true }),
    // An ArrayBuffer cannot shrink under us: nothing to guard.
    guardSlot: () => -1,
    poisonCounts: new Uint32Array(0),
  };
}

/** A client that notes what the table sends it as DMA_WRITE and answers DMA_READ with zeros. */
class FakeClient implements RemoteDma {
  readonly writes: { addr: number; length: number }[] = [];
  reads = 0;
  async read(_addr: number, length: number): Promise<Uint8Array> {
    this.reads++;
    return new Uint8Array(length);
  }
  async write(addr: number, data: Uint8Array): Promise<void> {
    this.writes.push({ addr, length: data.length });
  }
}

function setup(): { table: DmaTable; guest: Uint8Array; client: FakeClient } {
  const file = new ArrayBuffer(MAPPED.size);
  const client = new FakeClient();
  const table = new DmaTable(fakeMemory(new Map([[3, file]])), 16, client);
  table.map({ iova: BigInt(MAPPED.iova), size: BigInt(MAPPED.size), readable: true, writable: true, fd: 3, fileOffset: 0n });
  table.map({ iova: BigInt(VIA_MESSAGES.iova), size: BigInt(VIA_MESSAGES.size), readable: true, writable: true, fileOffset: 0n });
  return { table, guest: new Uint8Array(file), client };
}

function observe(table: DmaTable): { seen: [number, number][]; stop: () => void } {
  const seen: [number, number][] = [];
  const stop = table.observeWrites((addr, length) => seen.push([addr, length]));
  return { seen, stop };
}

describe('write observers', () => {
  it('see views and pins taken for writing, not for reading', () => {
    const { table } = setup();
    const { seen } = observe(table);
    table.view(MAPPED.iova + 0x10, 8, false);
    table.pin(MAPPED.iova, 8, false)!.release();
    expect(seen).toEqual([]);
    table.view(MAPPED.iova + 0x10, 8, true);
    expect(seen).toEqual([[MAPPED.iova + 0x10, 8]]);
  });

  it('see a dword stored in place, little-endian, aligned or not; a dword loaded is not a write', () => {
    const { table, guest } = setup();
    const { seen } = observe(table);
    for (const offset of [0x40, 0x81]) {
      expect(table.storeWord(MAPPED.iova + offset, 0x8765_4321)).toBe(true);
      expect(Array.from(guest.subarray(offset, offset + 4))).toEqual([0x21, 0x43, 0x65, 0x87]);
      expect(table.loadWord(MAPPED.iova + offset)).toBe(0x8765_4321);
    }
    expect(seen).toEqual([[MAPPED.iova + 0x40, 4], [MAPPED.iova + 0x81, 4]]);
    // Memory without an fd has no place to load or store in: the caller sends a message.
    expect(table.loadWord(VIA_MESSAGES.iova)).toBeUndefined();
    expect(table.storeWord(VIA_MESSAGES.iova, 1)).toBe(false);
    expect(table.loadWord(MAPPED.iova + MAPPED.size - 2)).toBeUndefined();
  });

  it('see a pinned write again at release, when its I/O has landed', () => {
    const { table } = setup();
    const { seen } = observe(table);
    const pin = table.pin(MAPPED.iova + PAGE, 2 * PAGE, true)!;
    expect(seen).toEqual([[MAPPED.iova + PAGE, 2 * PAGE]]);
    pin.release();
    pin.release(); // a second release is a no-op
    expect(seen).toEqual([
      [MAPPED.iova + PAGE, 2 * PAGE],
      [MAPPED.iova + PAGE, 2 * PAGE],
    ]);
  });

  it('see write() to mapped memory once and message writes before and after they go out', async () => {
    const { table, client } = setup();
    const { seen } = observe(table);
    await table.write(MAPPED.iova + 3, new Uint8Array(5));
    expect(seen).toEqual([[MAPPED.iova + 3, 5]]);
    seen.length = 0;
    await table.write(VIA_MESSAGES.iova + 100, new Uint8Array(10));
    expect(client.writes).toEqual([{ addr: VIA_MESSAGES.iova + 100, length: 10 }]);
    expect(seen).toEqual([
      [VIA_MESSAGES.iova + 100, 10],
      [VIA_MESSAGES.iova + 100, 10],
    ]);
  });

  it('stop when unsubscribed, even while several are registered', async () => {
    const { table } = setup();
    const first = observe(table);
    const second = observe(table);
    first.stop();
    await table.write(MAPPED.iova, new Uint8Array(1));
    expect(first.seen).toEqual([]);
    expect(second.seen).toEqual([[MAPPED.iova, 1]]);
  });
});

describe('write-through to the client', () => {
  it('sends every write as a message while reads stay on the mapping', async () => {
    const { table, guest, client } = setup();
    await table.routeWritesThroughClient(true);
    expect(table.routesWritesThroughClient).toBe(true);
    expect(table.view(MAPPED.iova, 8, true)).toBeNull();
    expect(table.pin(MAPPED.iova, 8, true)).toBeNull();
    expect(table.view(MAPPED.iova, 8, false)).not.toBeNull();
    expect(table.storeWord(MAPPED.iova, 1)).toBe(false);
    guest[8] = 0x5a;
    expect(table.loadWord(MAPPED.iova + 8)).toBe(0x5a);
    guest[8] = 0;
    await table.write(MAPPED.iova + 2 * PAGE, new Uint8Array([1, 2, 3]));
    expect(client.writes).toEqual([{ addr: MAPPED.iova + 2 * PAGE, length: 3 }]);
    expect(guest[2 * PAGE]).toBe(0); // the client writes its memory, not us
    guest[5] = 0x5a;
    expect((await table.read(MAPPED.iova + 5, 1))[0]).toBe(0x5a);
    expect(client.reads).toBe(0);
    await table.routeWritesThroughClient(false);
    await table.write(MAPPED.iova, new Uint8Array([7]));
    expect(guest[0]).toBe(7);
    expect(client.writes).toHaveLength(1);
  });

  it('resolves the switch only once views pinned for writing before it are released', async () => {
    const { table } = setup();
    const pin = table.pin(MAPPED.iova, PAGE, true)!;
    const readPin = table.pin(MAPPED.iova, PAGE, false)!; // reads may go on
    let switched = false;
    const done = table.routeWritesThroughClient(true).then(() => (switched = true));
    await Promise.resolve();
    expect(switched).toBe(false);
    pin.release();
    await done;
    expect(switched).toBe(true);
    readPin.release();
  });
});

describe('the dirty log', () => {
  const base = 0x4000_0000;

  it('reports exactly the pages written, once', () => {
    const log = new DirtyLog(PAGE, []);
    log.record(base + 3 * PAGE + 10, 16); // page 3
    log.record(base + 8 * PAGE - 16, 32); // pages 7 and 8
    log.record(base + 20 * PAGE, 2 * PAGE); // pages 20 and 21
    const bitmap = log.report(base, 64 * PAGE, PAGE);
    expect(bitmap.length).toBe(8);
    expect(setBits(bitmap)).toEqual([3, 7, 8, 20, 21]);
    expect(setBits(log.report(base, 64 * PAGE, PAGE))).toEqual([]);
  });

  it('pads the bitmap to whole u64 words and leaves bits past the range zero', () => {
    const log = new DirtyLog(PAGE, []);
    log.record(base, 70 * PAGE);
    const bitmap = log.report(base, 65 * PAGE, PAGE);
    expect(bitmap.length).toBe(16);
    expect(setBits(bitmap)).toEqual(Array.from({ length: 65 }, (_, i) => i));
  });

  it('reports at a coarser page size by merging, at a finer one by spreading', () => {
    const log = new DirtyLog(PAGE, []);
    log.record(base + 5 * PAGE, 1);
    expect(setBits(log.report(base, 16 * PAGE, 4 * PAGE))).toEqual([1]);
    const coarse = new DirtyLog(4 * PAGE, []);
    coarse.record(base + 5 * PAGE, 1);
    expect(setBits(coarse.report(base, 16 * PAGE, PAGE))).toEqual([4, 5, 6, 7]);
  });

  it('keeps a logged page that a report only partly covers, and reports from an unaligned iova', () => {
    const log = new DirtyLog(4 * PAGE, []);
    log.record(base, 1);
    expect(setBits(log.report(base, PAGE, PAGE))).toEqual([0]);
    expect(setBits(log.report(base, PAGE, PAGE))).toEqual([0]); // still dirty: never reported whole
    expect(setBits(log.report(base, 4 * PAGE, 4 * PAGE))).toEqual([0]);
    expect(setBits(log.report(base, 4 * PAGE, 4 * PAGE))).toEqual([]);
    log.record(base + 4 * PAGE, 1);
    expect(setBits(log.report(base + 2 * PAGE, 4 * PAGE, PAGE))).toEqual([2, 3]);
  });

  it('logs only the ranges asked for', () => {
    const log = new DirtyLog(PAGE, [{ start: base, end: base + 4 * PAGE }]);
    log.record(base + 3 * PAGE, 2 * PAGE); // half inside
    log.record(base + 10 * PAGE, 1); // outside
    expect(setBits(log.report(base, 16 * PAGE, PAGE))).toEqual([3]);
  });

  it('costs memory for the pages touched, not the space logged', () => {
    const log = new DirtyLog(PAGE, []);
    log.record(2 ** 45, 1);
    log.record(PAGE, 1);
    expect(setBits(log.report(0, 2 * PAGE, PAGE))).toEqual([1]);
    expect(setBits(log.report(2 ** 45, PAGE, PAGE))).toEqual([0]);
    // A wide report at a large page size visits only the slices that exist.
    log.record(2 ** 44 + 7, 1);
    expect(setBits(log.report(0, 2 ** 46, 2 ** 30))).toEqual([2 ** 14]);
  });
});

function setBits(bitmap: Uint8Array): number[] {
  const out: number[] = [];
  for (let bit = 0; bit < bitmap.length * 8; bit++) if (bitmap[bit >> 3]! & (1 << (bit & 7))) out.push(bit);
  return out;
}
