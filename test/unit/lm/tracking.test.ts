// Track Send/Receive, Controller Data Queues and Feature 21h with fake guests: the primary's host
// creates a User Data Migration Queue in its memory and sees LBA Migration Queue entries for what
// a secondary writes; Track Receive reports exactly the pages the secondary wrote.

import { describe, expect, it } from 'vitest';
import { buildCommand } from '../../../src/nvme/command.js';
import { RamBackend } from '../../../src/nvme/backend.js';
import { Namespace } from '../../../src/nvme/namespace.js';
import { AdminOpcode, NvmOpcode, PrimaryOpcode, Status, VirtAction, VirtResource } from '../../../src/nvme/spec.js';
import { Subsystem } from '../../../src/nvme/subsystem.js';
import { silentLogger } from '../../../src/log.js';
import { ControllingFunction } from '../../../src/nvme/virt/controlling-function.js';
import { liveMigrationFor } from '../../../src/lm/primary.js';
import { code, DATA, PAGE, TestHost } from '../nvme/helpers.js';

const CDQ = 0x900000;

function setup(): { cf: ControllingFunction; mgmt: TestHost; guest: TestHost } {
  const subsystem = new Subsystem({ nqn: 'nqn.2026-11.host:t' });
  subsystem.addNamespace(new Namespace({ nsid: 1, backend: new RamBackend(8 << 20) }));
  const cf = new ControllingFunction({ subsystem, secondaries: 2, ioQueues: 2, logger: silentLogger, extraCommandSets: (f) => liveMigrationFor(f).commandSets });
  cf.virtualization.manage(VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, 1, 3);
  cf.virtualization.manage(VirtAction.SECONDARY_ASSIGN, VirtResource.INTERRUPT, 1, 3);
  cf.virtualization.manage(VirtAction.SECONDARY_ONLINE, 0, 1, 0);
  const mgmt = new TestHost({ use: cf.primary }).start();
  const guest = new TestHost({ use: cf.controller(1)! }).start();
  return { cf, mgmt, guest };
}

interface Entry {
  nsid: number;
  nlb: number;
  slba: bigint;
  phase: number;
  esa: number;
  dlba: boolean;
  lbacir: number;
}

function entry(host: TestHost, slot: number): Entry {
  const raw = host.memory.slice(CDQ + slot * 32, 32);
  const v = new DataView(raw.buffer);
  const a = raw[31]!;
  return { nsid: v.getUint32(0, true), nlb: v.getUint32(4, true), slba: v.getBigUint64(8, true), phase: a & 1, esa: (a >> 1) & 7, dlba: (a & 0x20) !== 0, lbacir: a >> 6 };
}

async function until(predicate: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 2000;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}

describe('User Data Migration Queues', () => {
  it('logs every LBA range the secondary changes, in order, with phase tags, and ends with the suspend', async () => {
    const { cf, mgmt, guest } = setup();
    const create = await mgmt.admin({ opcode: PrimaryOpcode.CONTROLLER_DATA_QUEUE, prp1: CDQ, cdw10: 0, cdw11: (1 << 16) | 1, cdw12: 16 * 8 });
    expect(create.status).toBe(0);
    const cdqid = create.dw0 & 0xffff;
    expect(cdqid).toBeGreaterThan(0);
    expect((await mgmt.admin({ opcode: PrimaryOpcode.TRACK_SEND, cdw10: 0 | (1 << 16), cdw11: cdqid })).status).toBe(0);
    await guest.createIoQueuePair(1, 16);
    expect((await guest.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw10: 8, cdw12: 7 })).status).toBe(0);
    expect((await guest.io(1, { opcode: NvmOpcode.WRITE_ZEROES, nsid: 1, cdw10: 100, cdw12: (1 << 25) | 3 })).status).toBe(0);
    expect((await guest.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA, cdw10: 8, cdw12: 7 })).status).toBe(0); // not a change
    await until(() => entry(mgmt, 1).phase === 1, 'two entries');
    expect(entry(mgmt, 0)).toMatchObject({ nsid: 1, nlb: 7, slba: 8n, phase: 1, esa: 1, dlba: false, lbacir: 0 });
    expect(entry(mgmt, 1)).toMatchObject({ nsid: 1, nlb: 3, slba: 100n, phase: 1, esa: 0, dlba: true, lbacir: 0 });
    expect(entry(mgmt, 2).phase).toBe(0);
    // Head moves over what was posted; a tail trigger on the next slot gives a one-shot event naming the queue.
    const aer = mgmt.place(0, buildCommand({ opcode: AdminOpcode.ASYNC_EVENT_REQUEST }));
    mgmt.ringSq(0);
    expect((await mgmt.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: 0x21, cdw11: (1 << 31) | cdqid, cdw12: 2, cdw13: 2 })).status).toBe(0);
    expect(code((await mgmt.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: 0x21, cdw11: cdqid, cdw12: 5 })).status)).toBe(code(Status.INVALID_FIELD));
    const got = await mgmt.admin({ opcode: AdminOpcode.GET_FEATURES, cdw10: 0x21, cdw11: cdqid, prp1: DATA });
    expect(got.dw0).toBe(((1 << 31) | cdqid) >>> 0);
    expect(new DataView(mgmt.memory.slice(DATA, 8).buffer).getUint32(0, true)).toBe(2);
    expect((await guest.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw10: 300, cdw12: 0 })).status).toBe(0);
    const event = await mgmt.reap(0);
    expect(event.cid).toBe(aer);
    expect(event.dw0 & 0xffff).toBe(0x0004); // One-Shot, CDQ Tail Pointer
    expect(event.dw1 & 0xffff).toBe(cdqid);
    // Suspend: a last "suspended" entry, and DUDMQ deletes the queue.
    const suspend = await cf.primary.executeAdmin(buildCommand({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: 0, cdw11: (1 << 31) | (1 << 16) | 1 }));
    expect(suspend.status).toBe(0);
    await until(() => entry(mgmt, 3).phase === 1, 'the suspend entry');
    expect(entry(mgmt, 3)).toMatchObject({ esa: 3, lbacir: 2 });
    expect(code((await mgmt.admin({ opcode: PrimaryOpcode.CONTROLLER_DATA_QUEUE, cdw10: 1, cdw11: cdqid })).status)).toBe(code(Status.INVALID_CONTROLLER_DATA_QUEUE));
  });

  it('a full queue gets a last entry and a one-shot event, and logging stops', async () => {
    const { mgmt, guest } = setup();
    const cdqid = (await mgmt.admin({ opcode: PrimaryOpcode.CONTROLLER_DATA_QUEUE, prp1: CDQ, cdw11: (1 << 16) | 1, cdw12: 4 * 8 })).dw0;
    await mgmt.admin({ opcode: PrimaryOpcode.TRACK_SEND, cdw10: 1 << 16, cdw11: cdqid });
    mgmt.place(0, buildCommand({ opcode: AdminOpcode.ASYNC_EVENT_REQUEST }));
    mgmt.ringSq(0);
    await guest.createIoQueuePair(1, 16);
    for (let i = 0; i < 6; i++) await guest.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw10: i, cdw12: 0 });
    const event = await mgmt.reap(0);
    expect(event.dw0 & 0xffff).toBe(0x0104); // One-Shot, CDQ Full
    expect(entry(mgmt, 2)).toMatchObject({ esa: 7, lbacir: 2 });
    expect(entry(mgmt, 3).phase).toBe(0);
  });

  it('refuses what the spec refuses', async () => {
    const { mgmt } = setup();
    const cdq = (cdw11: number, cdw12 = 64, prp1 = CDQ, cdw10 = 0) => mgmt.admin({ opcode: PrimaryOpcode.CONTROLLER_DATA_QUEUE, prp1, cdw10, cdw11, cdw12 });
    expect(code((await cdq((0 << 16) | 1)).status)).toBe(code(Status.INVALID_CONTROLLER_IDENTIFIER)); // the primary itself
    expect(code((await cdq((9 << 16) | 1)).status)).toBe(code(Status.INVALID_CONTROLLER_IDENTIFIER));
    expect(code((await cdq((1 << 16) | 1, 60)).status)).toBe(code(Status.INVALID_FIELD)); // not whole entries
    expect(code((await cdq((1 << 16) | 1, 64, CDQ + 8)).status)).toBe(code(Status.PRP_OFFSET_INVALID));
    expect(code((await cdq((1 << 16) | 1, 64, CDQ, 0xc0 << 16)).status)).toBe(code(Status.INVALID_FIELD)); // vendor queue type
    const id = (await cdq((1 << 16) | 1)).dw0;
    expect(code((await cdq((1 << 16) | 1)).status)).toBe(code(Status.INVALID_FIELD)); // a second one for controller 1
    expect(code((await mgmt.admin({ opcode: PrimaryOpcode.TRACK_SEND, cdw10: 1 << 16, cdw11: id + 5 })).status)).toBe(code(Status.INVALID_CONTROLLER_DATA_QUEUE));
    expect((await mgmt.admin({ opcode: PrimaryOpcode.TRACK_SEND, cdw10: 1 << 16, cdw11: id })).status).toBe(0);
    expect(code((await mgmt.admin({ opcode: PrimaryOpcode.TRACK_SEND, cdw10: 1 << 16, cdw11: id })).status)).toBe(code(Status.INVALID_CONTROLLER_DATA_QUEUE));
    expect(code((await mgmt.admin({ opcode: AdminOpcode.GET_FEATURES, cdw10: 0x21, cdw11: 77, prp1: DATA })).status)).toBe(code(Status.INVALID_CONTROLLER_DATA_QUEUE));
    const idCtrl = await mgmt.admin({ opcode: AdminOpcode.IDENTIFY, cdw10: 1, prp1: DATA });
    expect(idCtrl.status).toBe(0);
    const page = mgmt.memory.slice(DATA, PAGE);
    expect(page[576]).toBe(0x3); // TRATTR: THMCS, TUDCS
    expect(new DataView(page.buffer).getUint16(578, true)).toBeGreaterThan(0); // MCUDMQ
  });
});

describe('Track Memory Changes', () => {
  const trackData = (ranges: { addr: number; granules: number }[], granularity = 0): Uint8Array => {
    const out = new Uint8Array(8 + ranges.length * 12);
    const v = new DataView(out.buffer);
    out[3] = granularity;
    v.setUint32(4, ranges.length, true);
    ranges.forEach((r, i) => {
      v.setBigUint64(8 + i * 12, BigInt(r.addr), true);
      v.setUint32(16 + i * 12, r.granules, true);
    });
    return out;
  };

  it('reports exactly the pages the secondary wrote, drains as it reports, and says when the target is suspended', async () => {
    const { cf, mgmt, guest } = setup();
    const start = (data: Uint8Array, cntlid = 1) => cf.primary.executeAdmin(buildCommand({ opcode: PrimaryOpcode.TRACK_SEND, cdw10: 1 | (1 << 16), cdw11: cntlid }), data);
    const receive = async (dwords = 1023) => {
      const r = await cf.primary.executeAdmin(buildCommand({ opcode: PrimaryOpcode.TRACK_RECEIVE, cdw11: 1, cdw12: dwords - 1 }));
      expect(r.status).toBe(0);
      const v = new DataView(r.data!.buffer, r.data!.byteOffset);
      const runs = Array.from({ length: v.getUint32(4, true) }, (_, i) => ({ addr: Number(v.getBigUint64(16 + i * 16, true)), granules: v.getUint32(24 + i * 16, true) }));
      return { attributes: v.getUint8(1), cntlid: v.getUint16(2, true), granularity: v.getUint16(8, true), runs };
    };
    await guest.createIoQueuePair(1, 16);
    expect(code((await start(trackData([{ addr: 0, granules: 16 }]), 0)).status)).toBe(code(Status.INVALID_CONTROLLER_IDENTIFIER));
    expect(code((await start(trackData([{ addr: 0, granules: 16 }], 12))).status)).toBe(code(Status.INVALID_FIELD));
    expect(code((await start(trackData([{ addr: 100, granules: 16 }]))).status)).toBe(code(Status.INVALID_FIELD));
    expect((await start(trackData([{ addr: 0, granules: (32 << 20) / PAGE }]))).status).toBe(0);
    expect(code((await start(trackData([{ addr: 0, granules: 1 }]))).status)).toBe(code(Status.INVALID_CONTROLLER_IDENTIFIER));
    // Two reads of 8 KiB land in DATA+2p..3p and DATA+8p..9p; each posts a CQE into CQ 1's first page.
    await guest.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + 2 * PAGE, prp2: DATA + 3 * PAGE, cdw12: 15 });
    await guest.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + 8 * PAGE, prp2: DATA + 9 * PAGE, cdw12: 15 });
    const cqPage = guest.queues.get(1)!.cqBase;
    const report = await receive();
    expect(report.cntlid).toBe(1);
    expect(report.granularity).toBe(0);
    expect(report.runs).toEqual([
      { addr: cqPage, granules: 1 },
      { addr: DATA + 2 * PAGE, granules: 2 },
      { addr: DATA + 8 * PAGE, granules: 2 },
    ]);
    expect(report.attributes).toBe(0);
    // Drained: nothing more until the next write; a small buffer gets one run and MTR.
    expect((await receive()).runs).toEqual([]);
    await guest.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + 20 * PAGE, cdw12: 7 });
    const small = await receive(8); // room for one descriptor
    expect(small.runs).toHaveLength(1);
    expect(small.attributes & 1).toBe(1);
    expect((await receive()).runs).toHaveLength(1);
    // Suspended: SUSP set, and nothing more is written.
    await cf.primary.executeAdmin(buildCommand({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: 0, cdw11: (1 << 16) | 1 }));
    expect((await receive()).attributes).toBe(2);
    void mgmt;
  });
});
