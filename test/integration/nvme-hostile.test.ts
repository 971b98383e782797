// A guest that misbehaves, played by our TS host driver against the real `serve` process: commands
// whose PRPs/SGLs leave guest RAM, queues in unmapped memory, doorbells past the queue size or for
// queues that do not exist, a CQ the host never drains. Each abuse gets the NVMe status or the
// controller fatal status (CSTS.CFS) the spec prescribes, never a crash; after a fatal error a
// controller reset brings the controller back; and a second controller on the same server (same
// RAM namespace) keeps completing I/O throughout.

import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AdminOpcode, CSTS, NvmOpcode, Reg, SQE_SIZE, Status } from '../../src/nvme/spec.js';
import { HostQueue, NvmeHost, PAGE, pattern, type Completion } from '../support/nvme-host.js';
import { PciRegion } from '../../src/vfio-user/protocol.js';
import { startServerProcess, type ServerProcess } from '../support/server-process.js';

/** Guest RAM NvmeHost maps: [RAM_BASE, RAM_END). */
const RAM_BASE = 0x100000;
const RAM_END = RAM_BASE + (16 << 20);
/** Page-aligned addresses no DMA mapping covers. */
const UNMAPPED = 0x4000_0000;
const BELOW_RAM = 0x80000;
/** Beyond 2^53: not even representable as a JS safe integer on the server side. */
const HUGE = 0xffff_ffff_ffff_f000;
const BLOCK = 512;
const NSID = 1;

/** Asynchronous event completion dw0 (Base Figure 150): type 2:0, info 15:8, log page 23:16. */
const aerDw0 = (type: number, info: number, logPage: number): number => type | (info << 8) | (logPage << 16);
const INVALID_DOORBELL_REGISTER = aerDw0(0, 0x00, 0x01);
const INVALID_DOORBELL_VALUE = aerDw0(0, 0x01, 0x01);

let dir: string;
let server: ServerProcess;
/** The controller under abuse, and its I/O queue pair 1 (16 entries), fresh for every test. */
let a: NvmeHost;
let q: HostQueue;
/** The bystander: another controller of the same server, same namespace. */
let b: NvmeHost;
let bq: HostQueue;
let bBuffers: { write: number; read: number };
let bRounds = 0;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const rw = (lba: number, blocks: number, prp1: number, prp2 = 0): { nsid: number; prp1: number; prp2: number; cdw10: number; cdw12: number } => ({
  nsid: NSID,
  prp1,
  prp2,
  cdw10: lba,
  cdw12: blocks - 1,
});

/** Write + Read of 4 KiB at `lba` through `queue`, verifying the data. */
async function roundTrip(host: NvmeHost, queue: HostQueue, buffers: { write: number; read: number }, lba: number, seed: number): Promise<void> {
  const data = pattern(PAGE, seed);
  host.bytes(buffers.write, PAGE).set(data);
  host.bytes(buffers.read, PAGE).fill(0);
  const w = await queue.run(NvmOpcode.WRITE, rw(lba, PAGE / BLOCK, buffers.write));
  expect(w.status).toBe(Status.SUCCESS);
  const r = await queue.run(NvmOpcode.READ, rw(lba, PAGE / BLOCK, buffers.read));
  expect(r.status).toBe(Status.SUCCESS);
  expect(Buffer.from(host.bytes(buffers.read, PAGE)).equals(Buffer.from(data))).toBe(true);
}

async function csts(host: NvmeHost): Promise<number> {
  return host.read32(Reg.CSTS);
}

/** Waits for CSTS.CFS on controller A. */
async function expectFatal(): Promise<void> {
  const value = await a.waitStatus((s) => (s & CSTS.CFS) !== 0, 3000);
  expect(value & CSTS.CFS).toBe(CSTS.CFS);
}

/** What a driver does after CSTS.CFS: CC.EN = 0, wait for RDY = 0, set up again, CC.EN = 1; then use it. */
async function resetAndCheckA(seed: number): Promise<void> {
  await a.enable();
  expect((await csts(a)) & (CSTS.RDY | CSTS.CFS)).toBe(CSTS.RDY);
  const identify = await a.identify(1);
  expect(identify.completion.status).toBe(Status.SUCCESS);
  const queue = await a.createIoQueuePair(1, 16);
  await roundTrip(a, queue, { write: a.alloc(PAGE), read: a.alloc(PAGE) }, 2048 + seed * 8, seed);
}

/** No completion shows up on `queue` once the server has settled (polling consumes nothing if there is none). */
async function expectNoCompletion(queue: HostQueue): Promise<void> {
  await queue.host.settle();
  expect(queue.poll()).toBeNull();
}

/** Get Log Page, Error Information, first entry; reading it (RAE = 0) re-arms error events. */
async function readErrorLog(): Promise<{ errorCount: number; sqid: number; cid: number; status: number }> {
  const page = a.alloc(PAGE);
  const c = await a.admin.run(AdminOpcode.GET_LOG_PAGE, { prp1: page, cdw10: 0x01 | (15 << 16) });
  expect(c.status).toBe(Status.SUCCESS);
  const v = new DataView(a.bytes(page, 64).slice().buffer);
  return { errorCount: Number(v.getBigUint64(0, true)), sqid: v.getUint16(8, true), cid: v.getUint16(10, true), status: v.getUint16(12, true) >> 1 };
}

describe('two controllers on one server, one of them abused', () => {
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'nvu-hostile-'));
    server = await startServerProcess(join(dir, 'a.sock'), [
      '--socket', join(dir, 'b.sock'),
      '--namespace', 'ram,size=64M',
      '--log-level', process.env.TEST_LOG ? 'debug' : 'warn',
    ]);
    b = await NvmeHost.attach(join(dir, 'b.sock'));
    await b.enable();
    bq = await b.createIoQueuePair(1, 16);
    bBuffers = { write: b.alloc(PAGE), read: b.alloc(PAGE) };
    await roundTrip(b, bq, bBuffers, 0, 1);
    a = await NvmeHost.attach(join(dir, 'a.sock'));
  });

  afterAll(async () => {
    if (process.env.TEST_LOG) console.log(server?.log());
    a?.close();
    b?.close();
    if (server) expect(await server.stop()).toBe(0);
    rmSync(dir, { recursive: true, force: true });
  });

  beforeEach(async () => {
    await a.enable();
    expect((await csts(a)) & (CSTS.RDY | CSTS.CFS)).toBe(CSTS.RDY);
    q = await a.createIoQueuePair(1, 16);
  });

  afterEach(async () => {
    // Whatever controller A just went through: the process is alive, controller B still does I/O
    // (on a range of the shared namespace A never touches) and B is not in a fatal state.
    expect(server.alive()).toBe(true);
    bRounds++;
    await roundTrip(b, bq, bBuffers, 65536 + 8 * bRounds, 100 + bRounds);
    expect((await csts(b)) & (CSTS.RDY | CSTS.CFS)).toBe(CSTS.RDY);
    expect(server.log()).not.toMatch(/TypeError|RangeError|ReferenceError|Uncaught|unhandled|failed unexpectedly/i);
  });

  describe('hostile data pointers: the command fails, the controller carries on', () => {
    it('Read/Write with PRP1 outside every DMA mapping → Data Transfer Error', async () => {
      const cases: Array<[string, number, number]> = [
        ['read, PRP1 unmapped', NvmOpcode.READ, UNMAPPED],
        ['write, PRP1 unmapped', NvmOpcode.WRITE, UNMAPPED],
        ['read, PRP1 below guest RAM', NvmOpcode.READ, BELOW_RAM],
        ['read, PRP1 at the end of guest RAM', NvmOpcode.READ, RAM_END],
        ['write, PRP1 beyond 2^53', NvmOpcode.WRITE, HUGE],
        ['read, PRP1 beyond 2^53', NvmOpcode.READ, HUGE],
      ];
      const observed: Record<string, number> = {};
      for (const [what, opcode, prp1] of cases) observed[what] = (await q.run(opcode, rw(100, 8, prp1))).status;
      expect(observed).toEqual(Object.fromEntries(cases.map(([what]) => [what, Status.DATA_TRANSFER_ERROR])));
      // SCT 0 (generic), SC 0x04, DNR clear (a transient-class error the host may retry).
      expect(Status.DATA_TRANSFER_ERROR).toBe(0x04);
      expect((await csts(a)) & CSTS.CFS).toBe(0);
      await roundTrip(a, q, { write: a.alloc(PAGE), read: a.alloc(PAGE) }, 100, 2);
    });

    it('a failed Write leaves the namespace untouched', async () => {
      const buffers = { write: a.alloc(PAGE), read: a.alloc(PAGE) };
      await roundTrip(a, q, buffers, 300, 3);
      // 8 KiB write: PRP1 fine, PRP2 (second page) unmapped.
      const w = await q.run(NvmOpcode.WRITE, rw(300, 16, buffers.write, UNMAPPED));
      expect(w.status).toBe(Status.DATA_TRANSFER_ERROR);
      a.bytes(buffers.read, PAGE).fill(0);
      expect((await q.run(NvmOpcode.READ, rw(300, 8, buffers.read))).status).toBe(Status.SUCCESS);
      expect(Buffer.from(a.bytes(buffers.read, PAGE)).equals(Buffer.from(pattern(PAGE, 3)))).toBe(true);
    });

    it('PRP2 / PRP list entries outside memory → Data Transfer Error; misaligned entries → PRP Offset Invalid', async () => {
      const data = a.alloc(3 * PAGE);
      const list = a.alloc(PAGE);
      const setList = (...entries: number[]): void => {
        const v = new DataView(a.bytes(list, PAGE).buffer, a.bytes(list, PAGE).byteOffset, PAGE);
        entries.forEach((e, i) => v.setBigUint64(i * 8, BigInt(e), true));
      };
      const observed: Record<string, number> = {};
      // 8 KiB: PRP2 is the second page's address.
      observed['PRP2 data pointer unmapped'] = (await q.run(NvmOpcode.READ, rw(0, 16, data, UNMAPPED))).status;
      observed['PRP2 data pointer with an offset'] = (await q.run(NvmOpcode.READ, rw(0, 16, data, data + PAGE + 0x100))).status;
      // 12 KiB: PRP2 points at a PRP list.
      observed['PRP list pointer unmapped'] = (await q.run(NvmOpcode.READ, rw(0, 24, data, UNMAPPED))).status;
      setList(data + PAGE, UNMAPPED);
      observed['PRP list entry unmapped (read)'] = (await q.run(NvmOpcode.READ, rw(0, 24, data, list))).status;
      observed['PRP list entry unmapped (write)'] = (await q.run(NvmOpcode.WRITE, rw(0, 24, data, list))).status;
      setList(data + PAGE, HUGE);
      observed['PRP list entry beyond 2^53'] = (await q.run(NvmOpcode.READ, rw(0, 24, data, list))).status;
      setList(data + PAGE, data + 2 * PAGE + 0x200);
      observed['PRP list entry with a non-zero offset'] = (await q.run(NvmOpcode.READ, rw(0, 24, data, list))).status;
      setList(data + PAGE, data + 2 * PAGE);
      observed['PRP list pointer not qword aligned'] = (await q.run(NvmOpcode.READ, rw(0, 24, data, list + 4))).status;
      observed['PRP1 not dword aligned'] = (await q.run(NvmOpcode.READ, rw(0, 8, data + 2))).status;
      expect(observed).toEqual({
        'PRP2 data pointer unmapped': Status.DATA_TRANSFER_ERROR,
        'PRP2 data pointer with an offset': Status.PRP_OFFSET_INVALID,
        'PRP list pointer unmapped': Status.DATA_TRANSFER_ERROR,
        'PRP list entry unmapped (read)': Status.DATA_TRANSFER_ERROR,
        'PRP list entry unmapped (write)': Status.DATA_TRANSFER_ERROR,
        'PRP list entry beyond 2^53': Status.DATA_TRANSFER_ERROR,
        'PRP list entry with a non-zero offset': Status.PRP_OFFSET_INVALID,
        'PRP list pointer not qword aligned': Status.PRP_OFFSET_INVALID,
        'PRP1 not dword aligned': Status.PRP_OFFSET_INVALID,
      });
      // PRP Offset Invalid: SCT 0, SC 0x13, DNR set.
      expect(Status.PRP_OFFSET_INVALID & 0xff).toBe(0x13);
      // The same list, now valid, works.
      expect((await q.run(NvmOpcode.READ, rw(0, 24, data, list))).status).toBe(Status.SUCCESS);
      expect((await csts(a)) & CSTS.CFS).toBe(0);
    });

    it('SGL data block or segment outside memory → Data Transfer Error', async () => {
      const sgl = (addr: number, length: number, type: number): Uint8Array => {
        const d = new DataView(new ArrayBuffer(16));
        d.setBigUint64(0, BigInt(addr), true);
        d.setUint32(8, length, true);
        d.setUint8(15, type << 4);
        return new Uint8Array(d.buffer);
      };
      const PSDT_SGL = 1 << 6;
      const base = { nsid: NSID, cdw10: 0, cdw12: 7, flags: PSDT_SGL };
      const data = a.alloc(PAGE);
      const block = await q.run(NvmOpcode.READ, { ...base, dptr: sgl(UNMAPPED, PAGE, 0x0) });
      const segment = await q.run(NvmOpcode.READ, { ...base, dptr: sgl(UNMAPPED, 32, 0x3) });
      const fine = await q.run(NvmOpcode.READ, { ...base, dptr: sgl(data, PAGE, 0x0) });
      expect({ block: block.status, segment: segment.status, fine: fine.status }).toEqual({
        block: Status.DATA_TRANSFER_ERROR,
        segment: Status.DATA_TRANSFER_ERROR,
        fine: Status.SUCCESS,
      });
    });
  });

  describe('queues in unmapped memory: controller fatal status, then a reset recovers', () => {
    it('I/O CQ in unmapped memory: creation succeeds, the first completion posted there sets CSTS.CFS', async () => {
      // The controller does not (and need not) probe queue memory at creation time.
      expect((await a.createCq(2, UNMAPPED, 16)).status).toBe(Status.SUCCESS);
      const sqAddr = a.alloc(16 * SQE_SIZE);
      expect((await a.createSq(2, sqAddr, 16)).status).toBe(Status.SUCCESS);
      // Submit only: the completion would go to the unmapped CQ (never polled).
      new HostQueue(a, 2, sqAddr, UNMAPPED, 16).submit(NvmOpcode.FLUSH, { nsid: NSID });
      await expectFatal();
      // A fatal controller processes nothing more: queue 1 stays silent.
      q.submit(NvmOpcode.FLUSH, { nsid: NSID });
      await expectNoCompletion(q);
      await resetAndCheckA(1);
    });

    it('I/O SQ in unmapped memory: creation succeeds, the first fetch sets CSTS.CFS', async () => {
      expect((await a.createSq(2, UNMAPPED, 16, 1)).status).toBe(Status.SUCCESS);
      a.ringSqDoorbell(2, 1);
      await expectFatal();
      await resetAndCheckA(2);
    });

    it('I/O SQ running off the end of guest RAM: the part in RAM works, fetching past the end sets CSTS.CFS', async () => {
      const cqAddr = a.alloc(128 * 16);
      const sqAddr = RAM_END - PAGE; // 64 of its 128 entries are in RAM
      expect((await a.createCq(2, cqAddr, 128)).status).toBe(Status.SUCCESS);
      expect((await a.createSq(2, sqAddr, 128)).status).toBe(Status.SUCCESS);
      const q2 = new HostQueue(a, 2, sqAddr, cqAddr, 128);
      for (let i = 0; i < 3; i++) expect((await q2.run(NvmOpcode.FLUSH, { nsid: NSID })).status).toBe(Status.SUCCESS);
      a.ringSqDoorbell(2, 100);
      await expectFatal();
      await resetAndCheckA(3);
    });

    it('admin SQ (ASQ) in unmapped memory: enabling works, the first admin doorbell sets CSTS.CFS', async () => {
      await a.enable(32, { sq: UNMAPPED, cq: a.alloc(32 * 16) });
      expect((await csts(a)) & (CSTS.RDY | CSTS.CFS)).toBe(CSTS.RDY);
      a.ringSqDoorbell(0, 1);
      await expectFatal();
      await resetAndCheckA(4);
    });

    it('admin CQ (ACQ) in unmapped memory: the first admin completion sets CSTS.CFS', async () => {
      await a.enable(32, { sq: a.alloc(32 * SQE_SIZE), cq: BELOW_RAM });
      expect((await csts(a)) & (CSTS.RDY | CSTS.CFS)).toBe(CSTS.RDY);
      a.admin.submit(AdminOpcode.IDENTIFY, { prp1: a.alloc(PAGE), cdw10: 1 });
      await expectFatal();
      await resetAndCheckA(5);
    });

    it('ASQ/ACQ offsets are reserved bits (dropped); an admin queue of 1 entry makes CC.EN set CSTS.CFS', async () => {
      await a.write32(Reg.CC, 0);
      await a.waitStatus((s) => (s & CSTS.RDY) === 0);
      const page = a.alloc(PAGE);
      await a.client.write64(PciRegion.BAR0, Reg.ASQ, BigInt(page + 0x100));
      expect(Number(await a.client.read64(PciRegion.BAR0, Reg.ASQ))).toBe(page);
      // AQA.ASQS = ACQS = 0 (1 entry) is not a queue: enabling fails with CSTS.CFS, not RDY.
      await a.enable(1);
      expect((await csts(a)) & (CSTS.RDY | CSTS.CFS)).toBe(CSTS.CFS);
      await resetAndCheckA(6);
    });
  });

  describe('invalid doorbell writes: ignored, reported through an outstanding AER', () => {
    /** Arms an AER, lets `abuse` write a doorbell, and returns the AER completion. */
    async function reported(abuse: () => void): Promise<Completion> {
      const cid = a.aer();
      await a.sync();
      expect(a.admin.poll()).toBeNull(); // nothing to report yet
      abuse();
      const c = await a.admin.wait(2000);
      expect(c.cid).toBe(cid);
      expect(c.status).toBe(Status.SUCCESS);
      return c;
    }

    it('SQ tail doorbell ≥ queue size → ignored, Invalid Doorbell Write Value event', async () => {
      const event = await reported(() => a.ringSqDoorbell(1, 16));
      expect(event.dw0).toBe(INVALID_DOORBELL_VALUE);
      // The Error Information log names the queue; reading it (RAE = 0) re-arms error events.
      expect(await readErrorLog()).toMatchObject({ sqid: 1, cid: 0xffff, status: Status.INVALID_FIELD });
      const again = await reported(() => a.ringSqDoorbell(1, 0xffff));
      expect(again.dw0).toBe(INVALID_DOORBELL_VALUE);
      await readErrorLog();
      // The tail did not move: nothing was fetched, and the queue works exactly as before.
      await expectNoCompletion(q);
      expect((await q.run(NvmOpcode.FLUSH, { nsid: NSID })).status).toBe(Status.SUCCESS);
      await expectNoCompletion(q);
      await roundTrip(a, q, { write: a.alloc(PAGE), read: a.alloc(PAGE) }, 400, 7);
    });

    it('admin SQ tail doorbell ≥ admin queue size → Invalid Doorbell Write Value event', async () => {
      const event = await reported(() => a.ringSqDoorbell(0, 32));
      expect(event.dw0).toBe(INVALID_DOORBELL_VALUE);
      expect(await readErrorLog()).toMatchObject({ sqid: 0 });
    });

    it('doorbells of queues that do not exist → Invalid Doorbell Register events', async () => {
      const observed: Record<string, number> = {};
      const cases: Array<[string, () => void]> = [
        ['SQ 5 tail', () => a.ringSqDoorbell(5, 1)],
        ['CQ 7 head', () => a.ringCqDoorbell(7, 0)],
        ['SQ 9 tail (beyond the queues granted)', () => a.ringSqDoorbell(9, 1)],
        ['SQ 0x3ff tail (end of BAR0 doorbells)', () => a.ringSqDoorbell(0x3ff, 1)],
      ];
      for (const [what, abuse] of cases) {
        observed[what] = (await reported(abuse)).dw0;
        await readErrorLog();
      }
      expect(observed).toEqual(Object.fromEntries(cases.map(([what]) => [what, INVALID_DOORBELL_REGISTER])));
      expect((await q.run(NvmOpcode.FLUSH, { nsid: NSID })).status).toBe(Status.SUCCESS);
    });

    it('CQ head doorbell ≥ queue size or past the posted entries → Invalid Doorbell Write Value events', async () => {
      const observed: Record<string, number> = {};
      observed['CQ 1 head = size'] = (await reported(() => a.ringCqDoorbell(1, 16))).dw0;
      await readErrorLog();
      // Nothing was posted to CQ 1 yet: head 3 would consume entries that do not exist.
      observed['CQ 1 head past tail'] = (await reported(() => a.ringCqDoorbell(1, 3))).dw0;
      expect(await readErrorLog()).toMatchObject({ sqid: 1 });
      expect(observed).toEqual({ 'CQ 1 head = size': INVALID_DOORBELL_VALUE, 'CQ 1 head past tail': INVALID_DOORBELL_VALUE });
      // The CQ head did not move: completions land where the host expects them.
      for (let i = 0; i < 20; i++) expect((await q.run(NvmOpcode.FLUSH, { nsid: NSID })).status).toBe(Status.SUCCESS);
    });

    it('without an outstanding AER an invalid doorbell is ignored silently (and not reported later)', async () => {
      a.ringSqDoorbell(1, 16);
      a.ringSqDoorbell(6, 1);
      await a.sync();
      a.aer();
      await expectNoCompletion(a.admin);
      expect((await csts(a)) & CSTS.CFS).toBe(0);
      expect((await q.run(NvmOpcode.FLUSH, { nsid: NSID })).status).toBe(Status.SUCCESS);
    });
  });

  describe('CQ overrun: the host never advances the CQ head', () => {
    it('completions are held, posted entries are never overwritten, and flow once the head moves', async () => {
      const CQ_SIZE = 4; // 3 usable slots
      const cqAddr = a.alloc(CQ_SIZE * 16);
      const sqAddr = a.alloc(16 * SQE_SIZE);
      expect((await a.createCq(2, cqAddr, CQ_SIZE)).status).toBe(Status.SUCCESS);
      expect((await a.createSq(2, sqAddr, 16)).status).toBe(Status.SUCCESS);
      const sq = new HostQueue(a, 2, sqAddr, cqAddr, 16); // submit only; the CQ is read raw below
      const cids: number[] = [];
      for (let i = 0; i < 8; i++) cids.push(sq.submit(NvmOpcode.FLUSH, { nsid: NSID }));
      const deadline = Date.now() + 3000;
      while (a.cqEntry(cqAddr, 2).phase !== 1) {
        if (Date.now() > deadline) throw new Error('CQ never filled');
        await a.sync();
      }
      await a.settle();
      // Slots 0..2 hold the first three completions; slot 3 stays empty (a full CQ keeps one free).
      const snapshot = Buffer.from(a.bytes(cqAddr, CQ_SIZE * 16)).toString('hex');
      expect([0, 1, 2].map((i) => a.cqEntry(cqAddr, i))).toEqual(
        cids.slice(0, 3).map((cid) => expect.objectContaining({ cid, sqId: 2, status: Status.SUCCESS, phase: 1 })),
      );
      expect(Buffer.from(a.bytes(cqAddr + 3 * 16, 16)).every((x) => x === 0)).toBe(true);
      // Nothing is overwritten while the host sits on them, and the controller is not fatal.
      await a.settle();
      expect(Buffer.from(a.bytes(cqAddr, CQ_SIZE * 16)).toString('hex')).toBe(snapshot);
      expect((await csts(a)) & CSTS.CFS).toBe(0);
      // Other queues of the same controller are not blocked by the full CQ.
      expect((await a.identify(1)).completion.status).toBe(Status.SUCCESS);
      expect((await q.run(NvmOpcode.FLUSH, { nsid: NSID })).status).toBe(Status.SUCCESS);

      // Now drain: every held completion arrives, in order, exactly once.
      const got: Array<Completion & { phase: number }> = [];
      let head = 0;
      let phase = 1;
      while (got.length < 8) {
        const entry = a.cqEntry(cqAddr, head);
        if (entry.phase !== phase) {
          if (Date.now() > deadline + 2000) throw new Error(`only ${got.length} completions`);
          await a.sync();
          continue;
        }
        got.push(entry);
        head = (head + 1) % CQ_SIZE;
        if (head === 0) phase ^= 1;
        a.ringCqDoorbell(2, head);
      }
      expect(got.map((c) => c.cid)).toEqual(cids);
      expect(got.every((c) => c.status === Status.SUCCESS && c.sqId === 2)).toBe(true);
      await a.settle();
      expect(a.cqEntry(cqAddr, head).phase).not.toBe(phase);
      // SQ 2 keeps working after the overrun.
      const next = sq.submit(NvmOpcode.FLUSH, { nsid: NSID });
      for (;;) {
        const entry = a.cqEntry(cqAddr, head);
        if (entry.phase === phase) {
          expect(entry).toMatchObject({ cid: next, status: Status.SUCCESS });
          break;
        }
        await a.sync();
      }
    });
  });
});

/** Resolves to the promise's value, or to 'timeout' after `ms` (the loser's rejection is swallowed). */
function within<T>(promise: Promise<T>, ms: number): Promise<T | 'timeout'> {
  promise.catch(() => undefined);
  return Promise.race([promise, sleep(ms).then(() => 'timeout' as const)]);
}

// Regression: a PRP list pointer with room for one entry (offset 0xff8) whose entry chains back to
// itself consumed no data page per step; the walk spun on settled promises, starved the event loop
// and hung every controller of the process. Chained lists must now start a page.
describe('a PRP list that chains to itself', () => {
  let dir2: string;
  let server2: ServerProcess;
  const hosts: NvmeHost[] = [];

  beforeAll(async () => {
    dir2 = mkdtempSync(join(tmpdir(), 'nvu-hostile-prp-'));
    server2 = await startServerProcess(join(dir2, 'x.sock'), ['--socket', join(dir2, 'y.sock'), '--namespace', 'ram,size=16M', '--log-level', 'warn']);
  });

  afterAll(async () => {
    for (const h of hosts) h.close();
    // A starved event loop never runs the SIGTERM handler.
    if (server2) await server2.stop(server2.alive() ? 'SIGKILL' : 'SIGTERM');
    rmSync(dir2, { recursive: true, force: true });
  });

  it('fails the command instead of looping forever (and hanging every controller)', async () => {
    const x = await NvmeHost.attach(join(dir2, 'x.sock'));
    hosts.push(x);
    const y = await NvmeHost.attach(join(dir2, 'y.sock'));
    hosts.push(y);
    await x.enable();
    await y.enable();
    const xq = await x.createIoQueuePair(1, 16);
    const yq = await y.createIoQueuePair(1, 16);
    const data = x.alloc(PAGE);
    const list = x.alloc(PAGE) + PAGE - 8; // the last qword of its page: one slot
    x.bytes(list, 8).set(new Uint8Array(new BigUint64Array([BigInt(list)]).buffer));
    // 12 KiB read: PRP1 covers the first page, the remaining two pages need a list.
    xq.submit(NvmOpcode.READ, rw(0, 24, data, list));
    const completion = await within(xq.wait(1500), 2000);
    expect(completion).not.toBe('timeout');
    expect((completion as Completion).status).toBe(Status.PRP_OFFSET_INVALID);
    // The other controller still answers.
    const yBuffers = { write: y.alloc(PAGE), read: y.alloc(PAGE) };
    expect(await within(roundTrip(y, yq, yBuffers, 0, 9), 2000)).not.toBe('timeout');
    expect(server2.alive()).toBe(true);
  });
});
