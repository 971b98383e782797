// A mappable doorbell page (`--doorbells mapped`): BAR0's doorbells are offered as a sparse mmap
// area of a sealed memfd, the host stores doorbell values there instead of writing registers, and
// the controller polls them. These tests map the page as QEMU does and drive the controller only
// through it: nothing rings a trapped doorbell.

import { afterEach, describe, expect, it } from 'vitest';
import { buildCommand } from '../../../src/nvme/command.js';
import { NvmeController } from '../../../src/nvme/controller.js';
import { AdminOpcode, AsyncEventInfo, AsyncEventType, NvmOpcode, Reg, Status } from '../../../src/nvme/spec.js';
import { createLogger } from '../../../src/log.js';
import { native } from '../../../src/native.js';
import { PciRegion, RegionFlags } from '../../../src/vfio-user/protocol.js';
import { DATA, GuestMemory, pattern, TestHost, tick, until } from './helpers.js';

const BAR0_SIZE = 0x4000;
/** Where TestHost.createIoQueuePair puts CQ 1. */
const CQ1_BASE = 0x100000 + 0x20000;

interface MappedHost {
  h: TestHost;
  /** The doorbells as the guest sees them in its mapping, index 0 = SQ 0's tail. */
  doorbells: Uint32Array;
  trappedWrites: () => number;
}

const hosts: TestHost[] = [];
afterEach(() => {
  for (const h of hosts.splice(0)) h.controller.dispose();
});

/** A controller with a mapped doorbell page, and a TestHost that rings only through the page. */
function mappedHost(options: { use?: NvmeController; memory?: GuestMemory } = {}): MappedHost {
  const h = new TestHost(options.use ? { use: options.use, ...(options.memory ? { memory: options.memory } : {}) } : { controller: { mappedDoorbells: true } });
  hosts.push(h);
  const info = h.controller.regionInfo(PciRegion.BAR0);
  const mapping = native.mmap(info.mmap!.fd, 0n, BAR0_SIZE, true);
  const doorbells = new Uint32Array(mapping, Reg.DOORBELLS, (BAR0_SIZE - Reg.DOORBELLS) / 4);
  let trapped = 0;
  const write = h.controller.regionWrite.bind(h.controller);
  h.controller.regionWrite = (region, offset, data) => {
    if (region === PciRegion.BAR0 && offset >= Reg.DOORBELLS) trapped++;
    write(region, offset, data);
  };
  h.ringSq = (qid) => void (doorbells[2 * qid] = h.queues.get(qid)!.sqTail);
  h.ringCq = (qid) => void (doorbells[2 * qid + 1] = h.queues.get(qid)!.cqHead);
  return { h, doorbells, trappedWrites: () => trapped };
}

describe('mapped doorbell page', () => {
  it('is offered as a sparse mmap area of BAR0 over a memfd the client cannot shrink', () => {
    const { h } = mappedHost();
    const info = h.controller.regionInfo(PciRegion.BAR0);
    expect(info.size).toBe(BAR0_SIZE);
    expect(info.mmap?.areas).toEqual([{ offset: Reg.DOORBELLS, size: BAR0_SIZE - Reg.DOORBELLS }]);
    expect(native.fdStat(info.mmap!.fd).shrinkSealed).toBe(true);
    expect(info.flags & RegionFlags.WRITE).toBe(RegionFlags.WRITE);
    // A trapped controller offers no mapping.
    const trapped = new TestHost();
    hosts.push(trapped);
    expect(trapped.controller.regionInfo(PciRegion.BAR0).mmap).toBeUndefined();
  });

  it('runs admin and I/O commands rung only through the page', async () => {
    const { h, trappedWrites } = mappedHost();
    h.start();
    await h.createIoQueuePair(1, 16);
    const data = pattern(4096, 7);
    h.memory.fill(DATA, data);
    expect((await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw10: 8, cdw12: 7 })).status).toBe(Status.SUCCESS);
    h.memory.fill(DATA + 0x1000, new Uint8Array(4096));
    // Enough commands to wrap the 16-entry queue and its CQ (heads come back through the page too).
    for (let i = 0; i < 40; i++) {
      const cqe = await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + 0x1000, cdw10: 8, cdw12: 7 });
      expect(cqe.status).toBe(Status.SUCCESS);
    }
    expect(h.memory.slice(DATA + 0x1000, 4096)).toEqual(data);
    expect(trappedWrites()).toBe(0);
  });

  it('starts a re-created queue at 0, whatever its predecessor left in the page', async () => {
    const { h, doorbells } = mappedHost();
    h.start();
    await h.createIoQueuePair(1, 16);
    for (let i = 0; i < 5; i++) expect((await h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 })).status).toBe(Status.SUCCESS);
    expect(doorbells[2]).toBe(5);
    expect((await h.admin({ opcode: AdminOpcode.DELETE_IO_SQ, cdw10: 1 })).status).toBe(Status.SUCCESS);
    expect((await h.admin({ opcode: AdminOpcode.DELETE_IO_CQ, cdw10: 1 })).status).toBe(Status.SUCCESS);
    // Stale values a sloppy host leaves behind after the delete.
    doorbells[2] = 5;
    doorbells[3] = 5;
    // As a driver does, the new CQ's memory starts zeroed (no old phase bits).
    h.memory.fill(CQ1_BASE, new Uint8Array(16 * 16));
    await h.createIoQueuePair(1, 16);
    expect([doorbells[2], doorbells[3]]).toEqual([0, 0]);
    // The first commands of the new queue (tails 1..5) are all taken, none skipped as "unchanged".
    for (let i = 0; i < 5; i++) expect((await h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 })).status).toBe(Status.SUCCESS);
  });

  it('sees a store of the value the page held before doorbells came by message (QEMU traps the page after INTx)', async () => {
    const { h, doorbells } = mappedHost();
    h.start();
    await h.createIoQueuePair(1, 4);
    const flush = (): Promise<unknown> => h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 });
    await flush(); // stored: the page holds tail 1
    expect(doorbells[2]).toBe(1);
    // Three by message (tails 2, 3, 0), as while QEMU has the mapping switched off.
    const stored = { sq: h.ringSq, cq: h.ringCq };
    h.ringSq = (qid) => h.write32(Reg.DOORBELLS + 2 * qid * 4, h.queues.get(qid)!.sqTail);
    h.ringCq = (qid) => h.write32(Reg.DOORBELLS + (2 * qid + 1) * 4, h.queues.get(qid)!.cqHead);
    for (let i = 0; i < 3; i++) await flush();
    // Stored again: tail 1, the value the page held before the messages.
    h.ringSq = stored.sq;
    h.ringCq = stored.cq;
    const cqe = await h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 });
    expect(cqe.status).toBe(Status.SUCCESS);
  });

  it('reports a doorbell value beyond the queue as a trapped write would (Invalid Doorbell Write Value)', async () => {
    const { h, doorbells } = mappedHost();
    h.start();
    await h.createIoQueuePair(1, 16);
    const aer = h.place(0, buildCommand({ opcode: AdminOpcode.ASYNC_EVENT_REQUEST }));
    h.ringSq(0);
    doorbells[2] = 16; // SQ 1 has 16 entries: 16 is out of range
    const cqe = await h.reap(0);
    expect(cqe.cid).toBe(aer);
    expect(cqe.dw0 & 0x7).toBe(AsyncEventType.ERROR);
    expect((cqe.dw0 >>> 8) & 0xff).toBe(AsyncEventInfo.INVALID_DOORBELL_VALUE);
  });

  it('clears the page on a controller reset', async () => {
    const { h, doorbells } = mappedHost();
    h.start();
    await h.createIoQueuePair(1, 16);
    expect((await h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 })).status).toBe(Status.SUCCESS);
    expect(doorbells[2]).toBe(1);
    h.write32(Reg.CC, 0);
    await until(() => (h.read32(Reg.CSTS) & 1) === 0, 'CSTS.RDY = 0');
    expect(doorbells.subarray(0, 4)).toEqual(new Uint32Array(4));
  });

  it('takes what the guest stored before a suspend, and a loaded state shows its tails and heads', async () => {
    const { h } = mappedHost();
    h.start();
    await h.createIoQueuePair(1, 16);
    expect((await h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 })).status).toBe(Status.SUCCESS);
    // Stored, and suspended at once: no poll turn ran in between.
    h.place(1, buildCommand({ opcode: NvmOpcode.FLUSH, nsid: 1 }));
    h.ringSq(1);
    await h.controller.suspend();
    const state = h.controller.saveState();
    expect(state.submissionQueues[1]!.tail).toBe(2);
    expect(state.submissionQueues[1]!.head).toBe(2);
    expect(h.peek(1)?.status).toBe(Status.SUCCESS);

    // A second controller over the same guest memory takes the state: its page starts where the
    // first one's stopped, so the host's next store is a change it sees.
    const target = new NvmeController({ subsystem: h.subsystem, mappedDoorbells: true });
    const moved = mappedHost({ use: target, memory: h.memory });
    // PCI config space is not in the controller state (a migration carries it beside).
    moved.h.enableBusMaster();
    moved.h.enableMsix();
    moved.h.queues.set(0, { ...h.queues.get(0)! });
    moved.h.queues.set(1, { ...h.queues.get(1)! });
    await target.suspend();
    target.loadState(state);
    target.resume();
    expect([moved.doorbells[0], moved.doorbells[2], moved.doorbells[3]]).toEqual([state.submissionQueues[0]!.tail, 2, state.completionQueues[1]!.head]);
    await moved.h.reap(1);
    expect((await moved.h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 })).status).toBe(Status.SUCCESS);
  });

  it('counts, for the client that leaves, the doorbells taken from the page and those written by message', async () => {
    const lines: string[] = [];
    const h = new TestHost({ controller: { mappedDoorbells: true, logger: createLogger('info', '', (line) => lines.push(line)) } });
    hosts.push(h);
    h.start();
    await h.createIoQueuePair(1, 16);
    for (let i = 0; i < 3; i++) expect((await h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 })).status).toBe(Status.SUCCESS);
    const info = h.controller.regionInfo(PciRegion.BAR0);
    const doorbells = new Uint32Array(native.mmap(info.mmap!.fd, 0n, BAR0_SIZE, true), Reg.DOORBELLS, 8);
    h.ringSq = (qid) => void (doorbells[2 * qid] = h.queues.get(qid)!.sqTail);
    h.ringCq = (qid) => void (doorbells[2 * qid + 1] = h.queues.get(qid)!.cqHead);
    for (let i = 0; i < 2; i++) expect((await h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 })).status).toBe(Status.SUCCESS);
    // The last CQ head store is seen at the poll loop's next turn.
    await tick();
    h.controller.detach();
    // By message: 2 admin commands (SQ tail + CQ head each) and 3 flushes; from the page: 2 flushes.
    expect(lines.filter((l) => l.includes('doorbells from this client'))).toEqual([expect.stringContaining('4 from the mapped page, 10 by message')]);
  });
});
