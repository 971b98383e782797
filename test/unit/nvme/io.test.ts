import { describe, it, expect, afterEach } from 'vitest';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AdminOpcode, NvmOpcode, Status } from '../../../src/nvme/spec.js';
import { FileBackend, RamBackend } from '../../../src/nvme/backend.js';
import { Namespace } from '../../../src/nvme/namespace.js';
import { DATA, PAGE, TestHost, code, pattern, until } from './helpers.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

async function ioHost(namespaces?: Namespace[], mdts?: number): Promise<TestHost> {
  const h = new TestHost({ ...(namespaces ? { namespaces } : {}), ...(mdts ? { controller: { mdts } } : {}) }).start();
  await h.createIoQueuePair(1);
  return h;
}

describe('NVMe I/O', () => {
  it('round-trips a write and a read through a RAM namespace (single page)', async () => {
    const h = await ioHost();
    const data = pattern(PAGE);
    h.memory.fill(DATA, data);
    const w = await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw10: 8, cdw12: 7 });
    expect(w.status).toBe(0);
    expect(w.sqid).toBe(1);
    const r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + 0x10000, cdw10: 8, cdw12: 7 });
    expect(r.status).toBe(0);
    expect(h.memory.slice(DATA + 0x10000, PAGE)).toEqual(data);
    expect(h.msixCount(1)).toBeGreaterThanOrEqual(2);
  });

  it('crosses a page boundary with PRP1 offset + PRP2', async () => {
    const h = await ioHost();
    const data = pattern(PAGE, 2);
    await h.controller.subsystem.namespace(1)!.backend.write(0, data);
    const prp1 = DATA + PAGE - 512; // 512 bytes in the first page, the rest at PRP2
    const prp2 = DATA + 8 * PAGE;
    const r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1, prp2, cdw12: 7 });
    expect(r.status).toBe(0);
    expect(h.memory.slice(prp1, 512)).toEqual(data.subarray(0, 512));
    expect(h.memory.slice(prp2, PAGE - 512)).toEqual(data.subarray(512));
  });

  it('walks PRP lists, chaining at the last entry of a list page', async () => {
    const h = await ioHost(undefined, 10); // MDTS 4 MiB
    const pages = 600; // > 512 entries: the first list page chains to a second
    const length = pages * PAGE;
    const data = pattern(length, 3);
    await h.controller.subsystem.namespace(1)!.backend.write(0, data);
    const list1 = DATA;
    const list2 = DATA + PAGE;
    const buffers = DATA + 0x10000;
    // PRP1 = page 0; list holds pages 1..; last slot of list1 chains to list2.
    const addr = (i: number): number => buffers + i * 2 * PAGE; // scattered: every other page
    let slot = 0;
    for (let i = 1; i < pages; i++) {
      if (slot === 511) {
        h.memory.set64(list1 + 511 * 8, list2);
        slot = 512;
      }
      const at = slot < 512 ? list1 + slot * 8 : list2 + (slot - 512) * 8;
      h.memory.set64(at, addr(i));
      slot++;
    }
    const nlb = length / 512 - 1;
    const r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: addr(0), prp2: list1, cdw12: nlb });
    expect(r.status).toBe(0);
    for (const i of [0, 1, 510, 511, 512, 599]) expect(h.memory.slice(addr(i), PAGE)).toEqual(data.subarray(i * PAGE, (i + 1) * PAGE));
  });

  it('rejects malformed PRPs', async () => {
    const h = await ioHost();
    // A list entry with an offset.
    h.memory.set64(DATA, DATA + 0x10000);
    h.memory.set64(DATA + 8, DATA + 0x20000 + 0x10);
    let r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + 0x30000, prp2: DATA, cdw12: 23 });
    expect(code(r.status)).toBe(code(Status.PRP_OFFSET_INVALID));
    // A list outside guest memory.
    r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA, prp2: 0x7000_0000, cdw12: 23 });
    expect(code(r.status)).toBe(code(Status.DATA_TRANSFER_ERROR));
    // A data page outside guest memory.
    r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: 0x7000_0000, cdw12: 7 });
    expect(code(r.status)).toBe(code(Status.DATA_TRANSFER_ERROR));
    // PRP2 data pointer with an offset.
    r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA, prp2: DATA + 0x10008, cdw12: 15 });
    expect(code(r.status)).toBe(code(Status.PRP_OFFSET_INVALID));
    // PRP1 not dword aligned.
    r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + 2, cdw12: 0 });
    expect(code(r.status)).toBe(code(Status.PRP_OFFSET_INVALID));
  });

  it('checks namespace, LBA range and MDTS', async () => {
    const h = await ioHost();
    const blocks = (16 << 20) / 512;
    let r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 2, prp1: DATA, cdw12: 0 });
    expect(code(r.status)).toBe(code(Status.INVALID_NAMESPACE));
    r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA, cdw10: blocks - 1, cdw12: 1 });
    expect(code(r.status)).toBe(code(Status.LBA_OUT_OF_RANGE));
    r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA, cdw10: 0, cdw11: 1, cdw12: 0 });
    expect(code(r.status)).toBe(code(Status.LBA_OUT_OF_RANGE));
    r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA, cdw12: 2048 }); // 1 MiB + 512
    expect(code(r.status)).toBe(code(Status.INVALID_FIELD));
    r = await h.io(1, { opcode: 0x7f, nsid: 1 });
    expect(code(r.status)).toBe(code(Status.INVALID_OPCODE));
    r = await h.io(1, { opcode: NvmOpcode.WRITE_ZEROES, nsid: 1, cdw10: blocks - 4, cdw12: 7 });
    expect(code(r.status)).toBe(code(Status.LBA_OUT_OF_RANGE));
  });

  it('writes zeroes, deallocates, compares and verifies', async () => {
    const h = await ioHost();
    const backend = h.controller.subsystem.namespace(1)!.backend;
    await backend.write(0, pattern(8 * PAGE, 4));
    // Compare: equal, then different.
    h.memory.fill(DATA, pattern(8 * PAGE, 4).subarray(0, PAGE));
    let r = await h.io(1, { opcode: NvmOpcode.COMPARE, nsid: 1, prp1: DATA, cdw12: 7 });
    expect(r.status).toBe(0);
    h.memory.fill(DATA + 100, Uint8Array.of(0xee ^ h.memory.slice(DATA + 100, 1)[0]!));
    r = await h.io(1, { opcode: NvmOpcode.COMPARE, nsid: 1, prp1: DATA, cdw12: 7 });
    expect(code(r.status)).toBe(code(Status.COMPARE_FAILURE));
    // Write Zeroes over blocks 0..7.
    r = await h.io(1, { opcode: NvmOpcode.WRITE_ZEROES, nsid: 1, cdw10: 0, cdw12: 7 });
    expect(r.status).toBe(0);
    expect(await backend.read(0, PAGE)).toEqual(new Uint8Array(PAGE));
    // DSM deallocate blocks 8..15 and 24..31.
    const ranges = new Uint8Array(32);
    const v = new DataView(ranges.buffer);
    v.setUint32(4, 8, true);
    v.setBigUint64(8, 8n, true);
    v.setUint32(16 + 4, 8, true);
    v.setBigUint64(16 + 8, 24n, true);
    h.memory.fill(DATA, ranges);
    r = await h.io(1, { opcode: NvmOpcode.DATASET_MANAGEMENT, nsid: 1, prp1: DATA, cdw10: 1, cdw11: 1 << 2 });
    expect(r.status).toBe(0);
    expect(await backend.read(8 * 512, 8 * 512)).toEqual(new Uint8Array(8 * 512));
    expect((await backend.read(16 * 512, 8 * 512)).some((b) => b !== 0)).toBe(true);
    // DSM range out of bounds.
    v.setBigUint64(8, BigInt((16 << 20) / 512), true);
    h.memory.fill(DATA, ranges);
    r = await h.io(1, { opcode: NvmOpcode.DATASET_MANAGEMENT, nsid: 1, prp1: DATA, cdw10: 0, cdw11: 1 << 2 });
    expect(code(r.status)).toBe(code(Status.LBA_OUT_OF_RANGE));
    r = await h.io(1, { opcode: NvmOpcode.VERIFY, nsid: 1, cdw10: 0, cdw12: 100 });
    expect(r.status).toBe(0);
    r = await h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 });
    expect(r.status).toBe(0);
    r = await h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 0xffffffff });
    expect(r.status).toBe(0);
  });

  it('round-trips through a file namespace created sparse, with FUA and flush', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'nvme-unit-'));
    dirs.push(dir);
    const path = join(dir, 'disk.img');
    const backend = await FileBackend.open(path, { size: 8 << 20 });
    expect(statSync(path).size).toBe(8 << 20);
    expect(statSync(path).blocks * 512).toBeLessThan(8 << 20); // sparse
    const ns = new Namespace({ nsid: 1, backend, lbaFormat: 1 }); // 4 KiB blocks
    const h = await ioHost([ns]);
    const data = pattern(3 * PAGE, 5);
    h.memory.fill(DATA, data.subarray(0, PAGE));
    h.memory.fill(DATA + 0x10000, data.subarray(PAGE));
    let r = await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, prp2: DATA + 0x20000, cdw10: 5, cdw12: (1 << 30) | 2 });
    // PRP2 here is a list pointer (3 pages): build the list.
    expect(r.status === 0 || code(r.status) === code(Status.DATA_TRANSFER_ERROR)).toBe(true);
    h.memory.set64(DATA + 0x20000, DATA + 0x10000);
    h.memory.set64(DATA + 0x20008, DATA + 0x11000);
    r = await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, prp2: DATA + 0x20000, cdw10: 5, cdw12: (1 << 30) | 2 });
    expect(r.status).toBe(0);
    r = await h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 });
    expect(r.status).toBe(0);
    r = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + 0x40000, prp2: DATA + 0x41000, cdw10: 5, cdw12: 1 });
    expect(r.status).toBe(0);
    expect(h.memory.slice(DATA + 0x40000, PAGE)).toEqual(data.subarray(0, PAGE));
    expect(h.memory.slice(DATA + 0x41000, PAGE)).toEqual(data.subarray(PAGE, 2 * PAGE));
    await backend.close();
    const again = await FileBackend.open(path);
    expect(await again.read(5 * PAGE, 3 * PAGE)).toEqual(data);
    // Discard punches a hole: zeros, same size, fewer blocks.
    const blocksBefore = statSync(path).blocks;
    await again.discard(5 * PAGE, 2 * PAGE);
    expect(await again.read(5 * PAGE, PAGE)).toEqual(new Uint8Array(PAGE));
    expect(await again.read(7 * PAGE, PAGE)).toEqual(data.subarray(2 * PAGE));
    expect(statSync(path).size).toBe(8 << 20);
    expect(statSync(path).blocks).toBeLessThan(blocksBefore);
    await again.close();
  });

  it('holds completions while the CQ is full and posts them when the head moves', async () => {
    const h = new TestHost().start();
    await h.createIoQueuePair(1, 4); // 4 entries: at most 3 posted at once
    for (let i = 0; i < 3; i++) h.place(1, buildFlush());
    h.ringSq(1);
    const first: number[] = [];
    for (let i = 0; i < 3; i++) first.push((await h.reap(1, false)).cid);
    // The CQ is now full from the controller's view (head never advanced): 3 more must wait.
    for (let i = 0; i < 3; i++) h.place(1, buildFlush());
    h.ringSq(1);
    await until(() => h.controller.state.heldCompletions.length === 3, 'three completions held');
    expect(h.peek(1)).toBeNull(); // slot 3 is never written while full
    expect(h.controller.state.heldCompletions.length).toBe(3);
    h.ringCq(1); // free the 3 slots
    const rest: number[] = [];
    for (let i = 0; i < 3; i++) rest.push((await h.reap(1)).cid);
    expect(new Set([...first, ...rest]).size).toBe(6);
  });

  it('holds already-finished completions in state while the CQ is full', async () => {
    const h = new TestHost().start();
    // CQ of 2 entries (1 usable), SQ of 8: several commands finish while the CQ is full.
    const cqBase = 0x200000;
    const sqBase = 0x210000;
    await h.admin({ opcode: AdminOpcode.CREATE_IO_CQ, prp1: cqBase, cdw10: (1 << 16) | 1, cdw11: (1 << 16) | 3 });
    await h.admin({ opcode: AdminOpcode.CREATE_IO_SQ, prp1: sqBase, cdw10: (7 << 16) | 1, cdw11: (1 << 16) | 1 });
    h.queues.set(1, { sqBase, cqBase, size: 2, sqTail: 0, cqHead: 0, phase: 1 } as never);
    // The SQ and CQ differ in size: drive the SQ by hand.
    const sqe = buildFlush();
    for (let i = 0; i < 4; i++) {
      const e = sqe.slice();
      e[2] = 10 + i;
      h.memory.fill(sqBase + i * 64, e);
    }
    h.write32(0x1000 + 8, 4);
    await until(() => h.controller.state.heldCompletions.length === 3, 'three finished completions held');
    expect(h.peek(1)).toMatchObject({ cid: 10 }); // the one usable slot holds the first
    const seen: number[] = [];
    for (let i = 0; i < 4; i++) seen.push((await h.reap(1)).cid);
    expect(seen.sort()).toEqual([10, 11, 12, 13]);
    expect(h.controller.state.heldCompletions.length).toBe(0);
  });

  it('counts SMART data units and commands', async () => {
    const h = await ioHost();
    for (let i = 0; i < 3; i++) await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw12: 7 });
    await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA, cdw12: 7 });
    const s = h.controller.state.smart;
    expect(s.hostWriteCommands).toBe(3);
    expect(s.hostReadCommands).toBe(1);
    expect(s.dataUnitsWritten).toBe(24);
    expect(s.dataUnitsRead).toBe(8);
    // Through the log page: thousands of 512-byte units, rounded up.
    const cqe = await h.admin({ opcode: AdminOpcode.GET_LOG_PAGE, prp1: DATA + 0x80000, nsid: 0xffffffff, cdw10: 0x02 | (127 << 16) });
    expect(cqe.status).toBe(0);
    const log = new DataView(h.memory.slice(DATA + 0x80000, 512).buffer);
    expect(log.getUint32(32, true)).toBe(1);
    expect(log.getUint32(48, true)).toBe(1);
    expect(log.getUint32(64, true)).toBe(1);
    expect(log.getUint32(80, true)).toBe(3);
    expect(log.getUint16(1, true)).toBeGreaterThan(273);
  });

  it('serves a RAM namespace with a backend that is smaller than one block gracefully', async () => {
    const ns = new Namespace({ nsid: 1, backend: new RamBackend(2048), lbaFormat: 1 }); // 4 KiB blocks
    expect(ns.blockCount).toBe(0);
    const h = await ioHost([ns]);
    const read = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA, cdw10: 0, cdw12: 0 });
    expect(code(read.status)).toBe(code(Status.LBA_OUT_OF_RANGE));
    const identify = await h.admin({ opcode: AdminOpcode.IDENTIFY, nsid: 1, prp1: DATA + 0x10000, cdw10: 0 });
    expect(identify.status).toBe(0);
    expect(new DataView(h.memory.slice(DATA + 0x10000, 8).buffer).getBigUint64(0, true)).toBe(0n); // NSZE
  });
});

function buildFlush(): Uint8Array {
  const sqe = new Uint8Array(64);
  sqe[0] = NvmOpcode.FLUSH;
  sqe[4] = 1;
  return sqe;
}
