import { describe, it, expect } from 'vitest';
import { AdminOpcode, FeatureId, LogId, NvmOpcode, PciIdentity, Status } from '../../../src/nvme/spec.js';
import { Namespace } from '../../../src/nvme/namespace.js';
import { RamBackend } from '../../../src/nvme/backend.js';
import { Subsystem } from '../../../src/nvme/subsystem.js';
import { buildCommand } from '../../../src/nvme/command.js';
import { DATA, TestHost, code, tick, until } from './helpers.js';

const u16 = (b: Uint8Array, at: number): number => b[at]! | (b[at + 1]! << 8);
const u32 = (b: Uint8Array, at: number): number => new DataView(b.buffer, b.byteOffset).getUint32(at, true);
const u64 = (b: Uint8Array, at: number): number => Number(new DataView(b.buffer, b.byteOffset).getBigUint64(at, true));
const ascii = (b: Uint8Array, at: number, n: number): string => new TextDecoder().decode(b.subarray(at, at + n)).trim();

function twoNamespaces(): Namespace[] {
  return [new Namespace({ nsid: 1, backend: new RamBackend(16 << 20) }), new Namespace({ nsid: 3, backend: new RamBackend(8 << 20), lbaFormat: 1 })];
}

describe('Identify', () => {
  it('controller data structure', async () => {
    const h = new TestHost().start();
    const cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 1 });
    expect(cqe.status).toBe(0);
    const id = h.memory.slice(DATA, 4096);
    expect(u16(id, 0)).toBe(PciIdentity.VENDOR_ID);
    expect(ascii(id, 4, 20)).toBe(h.subsystem.serial);
    expect(ascii(id, 24, 40)).toBe(h.subsystem.model);
    expect(id[77]).toBe(8); // MDTS
    expect(u16(id, 78)).toBe(h.controller.cntlid);
    expect(u32(id, 80)).toBe(0x00010400);
    expect(id[512]).toBe(0x66);
    expect(id[513]).toBe(0x44);
    expect(u32(id, 516)).toBe(256); // NN
    expect(u16(id, 256) & (1 << 8)).toBeTruthy(); // OACS: doorbell buffer config
    expect(u32(id, 536) & 0x3).toBe(1); // SGLS
    expect(id[525]! & 1).toBe(0); // RAM only: no volatile write cache
    expect(ascii(id, 768, 256).replace(/\0+$/, '')).toBe(h.subsystem.nqn);
  });

  it('namespace, active list, descriptors, CSI structures', async () => {
    const h = new TestHost({ namespaces: twoNamespaces() }).start();
    let cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 3, cdw10: 0 });
    expect(cqe.status).toBe(0);
    const ns = h.memory.slice(DATA, 4096);
    expect(u64(ns, 0)).toBe((8 << 20) / 4096);
    expect(ns[25]).toBe(1); // two LBA formats
    expect(ns[26]).toBe(1); // 4 KiB in use
    expect(ns[128 + 2]).toBe(9);
    expect(ns[132 + 2]).toBe(12);
    // Inactive but valid NSID: zeros. Invalid NSIDs: error.
    h.memory.fill(DATA, new Uint8Array(4096).fill(0xaa));
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 2, cdw10: 0 });
    expect(cqe.status).toBe(0);
    expect(h.memory.slice(DATA, 4096).every((b) => b === 0)).toBe(true);
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 0, cdw10: 0 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_NAMESPACE));
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 1000, cdw10: 0 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_NAMESPACE));
    // Active namespace list.
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 0, cdw10: 2 });
    expect([u32(h.memory.slice(DATA, 12), 0), u32(h.memory.slice(DATA, 12), 4), u32(h.memory.slice(DATA, 12), 8)]).toEqual([1, 3, 0]);
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 1, cdw10: 2 });
    expect(u32(h.memory.slice(DATA, 8), 0)).toBe(3);
    // Descriptors: EUI-64, NGUID, UUID, CSI.
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 1, cdw10: 3 });
    expect(cqe.status).toBe(0);
    const d = h.memory.slice(DATA, 64);
    expect([d[0], d[1]]).toEqual([1, 8]);
    expect(d.subarray(4, 12)).toEqual(h.subsystem.namespace(1)!.ids.eui64);
    expect([d[12], d[13]]).toEqual([2, 16]);
    expect([d[32], d[33]]).toEqual([3, 16]);
    expect([d[52], d[53], d[56]]).toEqual([4, 1, 0]);
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 2, cdw10: 3 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_NAMESPACE));
    // CNS 05/06 with CSI 0, CNS 08, CNS 1C; unknown CSI / CNS.
    for (const [cns, nsid, csi] of [[5, 1, 0], [6, 0, 0], [7, 0, 0], [8, 1, 0], [0x1c, 0, 0]] as const) {
      cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid, cdw10: cns, cdw11: csi << 24 });
      expect(cqe.status, `CNS ${cns}`).toBe(0);
    }
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 1, cdw10: 8 });
    expect(h.memory.slice(DATA, 16)[14]).toBe(1); // NSTAT ready
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 6, cdw11: 2 << 24 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_FIELD));
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 0x55 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_FIELD));
  });

  it('unknown admin opcode and SGL on an admin command', async () => {
    const h = new TestHost().start();
    let cqe = await h.admin({ opcode: 0x7e });
    expect(code(cqe.status)).toBe(code(Status.INVALID_OPCODE));
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, flags: 1 << 6, prp1: DATA, cdw10: 1 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_FIELD));
    cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: 0x7000_0000, cdw10: 1 });
    expect(code(cqe.status)).toBe(code(Status.DATA_TRANSFER_ERROR));
  });
});

describe('queue creation and deletion', () => {
  it('reports every create/delete error', async () => {
    const h = new TestHost().start();
    const cq = (qid: number, size: number, cdw11: number, prp1 = 0x200000) =>
      h.admin({ opcode: AdminOpcode.CREATE_IO_CQ, prp1, cdw10: ((size - 1) << 16) | qid, cdw11 });
    const sq = (qid: number, size: number, cqid: number, pc = 1, prp1 = 0x300000) =>
      h.admin({ opcode: AdminOpcode.CREATE_IO_SQ, prp1, cdw10: ((size - 1) << 16) | qid, cdw11: (cqid << 16) | pc });
    expect(code((await cq(0, 16, 3)).status)).toBe(code(Status.INVALID_QUEUE_IDENTIFIER));
    expect(code((await cq(9, 16, 3)).status)).toBe(code(Status.INVALID_QUEUE_IDENTIFIER)); // > 8 granted
    expect(code((await cq(1, 1, 3)).status)).toBe(code(Status.INVALID_QUEUE_SIZE));
    expect(code((await cq(1, 2000, 3)).status)).toBe(code(Status.INVALID_QUEUE_SIZE));
    expect(code((await cq(1, 16, 2)).status)).toBe(code(Status.INVALID_FIELD)); // PC=0 with CAP.CQR
    expect(code((await cq(1, 16, (9 << 16) | 3)).status)).toBe(code(Status.INVALID_INTERRUPT_VECTOR));
    expect(code((await cq(1, 16, 3, 0x200100)).status)).toBe(code(Status.PRP_OFFSET_INVALID));
    expect((await cq(1, 16, (1 << 16) | 3)).status).toBe(0);
    expect(code((await cq(1, 16, 3)).status)).toBe(code(Status.INVALID_QUEUE_IDENTIFIER)); // exists
    expect(code((await sq(1, 16, 2)).status)).toBe(code(Status.COMPLETION_QUEUE_INVALID));
    expect(code((await sq(1, 16, 0)).status)).toBe(code(Status.COMPLETION_QUEUE_INVALID));
    expect(code((await sq(0, 16, 1)).status)).toBe(code(Status.INVALID_QUEUE_IDENTIFIER));
    expect(code((await sq(1, 1, 1)).status)).toBe(code(Status.INVALID_QUEUE_SIZE));
    expect(code((await sq(1, 16, 1, 0)).status)).toBe(code(Status.INVALID_FIELD));
    expect((await sq(1, 16, 1)).status).toBe(0);
    expect(code((await sq(1, 16, 1)).status)).toBe(code(Status.INVALID_QUEUE_IDENTIFIER));
    // Delete: CQ with an SQ on it, unknown queues, admin queue.
    const del = (opcode: number, qid: number) => h.admin({ opcode, cdw10: qid });
    expect(code((await del(AdminOpcode.DELETE_IO_CQ, 1)).status)).toBe(code(Status.INVALID_QUEUE_DELETION));
    expect(code((await del(AdminOpcode.DELETE_IO_SQ, 0)).status)).toBe(code(Status.INVALID_QUEUE_IDENTIFIER));
    expect(code((await del(AdminOpcode.DELETE_IO_SQ, 2)).status)).toBe(code(Status.INVALID_QUEUE_IDENTIFIER));
    expect(code((await del(AdminOpcode.DELETE_IO_CQ, 0)).status)).toBe(code(Status.INVALID_QUEUE_IDENTIFIER));
    expect((await del(AdminOpcode.DELETE_IO_SQ, 1)).status).toBe(0);
    expect((await del(AdminOpcode.DELETE_IO_CQ, 1)).status).toBe(0);
    expect(h.controller.state.submissionQueues[1]).toBeNull();
  });

  it('Number of Queues limits the queue IDs and is fixed once queues exist', async () => {
    const h = new TestHost().start();
    let cqe = await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.NUMBER_OF_QUEUES, cdw11: (63 << 16) | 63 });
    expect(cqe.status).toBe(0);
    expect(cqe.dw0).toBe((7 << 16) | 7); // capped at 8 of each
    cqe = await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.NUMBER_OF_QUEUES, cdw11: (1 << 16) | 1 });
    expect(cqe.dw0).toBe((1 << 16) | 1);
    cqe = await h.admin({ opcode: AdminOpcode.CREATE_IO_CQ, prp1: 0x200000, cdw10: (15 << 16) | 3, cdw11: 1 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_QUEUE_IDENTIFIER));
    await h.createIoQueuePair(1);
    cqe = await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.NUMBER_OF_QUEUES, cdw11: 0 });
    expect(code(cqe.status)).toBe(code(Status.COMMAND_SEQUENCE_ERROR));
    cqe = await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.NUMBER_OF_QUEUES, cdw11: 0xffff });
    expect(code(cqe.status)).toBe(code(Status.INVALID_FIELD));
    cqe = await h.admin({ opcode: AdminOpcode.GET_FEATURES, cdw10: FeatureId.NUMBER_OF_QUEUES });
    expect(cqe.dw0).toBe((1 << 16) | 1);
  });

  it('processes several I/O queues with their own vectors', async () => {
    const h = new TestHost().start();
    for (const q of [1, 2, 3]) await h.createIoQueuePair(q);
    for (const q of [1, 2, 3]) {
      const cqe = await h.io(q, { opcode: NvmOpcode.FLUSH, nsid: 1 });
      expect(cqe.status).toBe(0);
      expect(cqe.sqid).toBe(q);
      expect(h.msixCount(q)).toBeGreaterThan(0);
    }
  });
});

describe('features', () => {
  it('gets and sets each advertised feature', async () => {
    const h = new TestHost().start();
    const set = (fid: number, cdw11: number, extra: { prp1?: number; cdw10?: number } = {}) =>
      h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: fid | (extra.cdw10 ?? 0), cdw11, prp1: extra.prp1 ?? 0 });
    const get = (fid: number, cdw11 = 0, sel = 0, prp1 = 0) => h.admin({ opcode: AdminOpcode.GET_FEATURES, cdw10: fid | (sel << 8), cdw11, prp1 });
    for (const [fid, value] of [
      [FeatureId.ARBITRATION, 0x03020103],
      [FeatureId.INTERRUPT_COALESCING, 0x0a05],
      [FeatureId.WRITE_ATOMICITY, 1],
      [FeatureId.ASYNC_EVENT_CONFIG, 0x100],
      [FeatureId.KEEP_ALIVE_TIMER, 0],
      [FeatureId.ERROR_RECOVERY, 50],
    ] as const) {
      expect((await set(fid, value)).status, `set ${fid}`).toBe(0);
      expect((await get(fid)).dw0, `get ${fid}`).toBe(value);
    }
    // Power state 1 does not exist.
    expect(code((await set(FeatureId.POWER_MANAGEMENT, 1)).status)).toBe(code(Status.INVALID_FIELD));
    expect((await set(FeatureId.POWER_MANAGEMENT, 0)).status).toBe(0);
    // Temperature threshold: over/under for the composite sensor; other sensors invalid.
    expect((await set(FeatureId.TEMPERATURE_THRESHOLD, 350)).status).toBe(0);
    expect((await set(FeatureId.TEMPERATURE_THRESHOLD, (1 << 20) | 270)).status).toBe(0);
    expect((await get(FeatureId.TEMPERATURE_THRESHOLD)).dw0).toBe(350);
    expect((await get(FeatureId.TEMPERATURE_THRESHOLD, 1 << 20)).dw0).toBe(270);
    expect(code((await set(FeatureId.TEMPERATURE_THRESHOLD, (3 << 16) | 300)).status)).toBe(code(Status.INVALID_FIELD));
    // Interrupt vector configuration.
    expect((await set(FeatureId.INTERRUPT_VECTOR_CONFIG, (1 << 16) | 2)).status).toBe(0);
    expect((await get(FeatureId.INTERRUPT_VECTOR_CONFIG, 2)).dw0).toBe((1 << 16) | 2);
    expect(code((await get(FeatureId.INTERRUPT_VECTOR_CONFIG, 100)).status)).toBe(code(Status.INVALID_FIELD));
    // DULBE not supported; VWC absent on a RAM-only controller; unknown feature; save.
    expect(code((await set(FeatureId.ERROR_RECOVERY, 1 << 16)).status)).toBe(code(Status.INVALID_FIELD));
    expect(code((await get(FeatureId.VOLATILE_WRITE_CACHE)).status)).toBe(code(Status.INVALID_FIELD));
    expect(code((await get(0x77)).status)).toBe(code(Status.INVALID_FIELD));
    expect(code((await set(FeatureId.ARBITRATION, 0, { cdw10: 1 << 31 })).status)).toBe(code(Status.FEATURE_NOT_SAVEABLE));
    // Select: default and capabilities.
    expect((await get(FeatureId.ARBITRATION, 0, 1)).dw0).toBe(0);
    expect((await get(FeatureId.ARBITRATION, 0, 3)).dw0).toBe(4);
    // Timestamp: set 8 bytes, read back close to it with origin "set".
    const ts = new Uint8Array(8);
    new DataView(ts.buffer).setUint32(0, 123456789, true);
    h.memory.fill(DATA, ts);
    expect((await set(FeatureId.TIMESTAMP, 0, { prp1: DATA })).status).toBe(0);
    expect((await get(FeatureId.TIMESTAMP, 0, 0, DATA + 4096)).status).toBe(0);
    const back = h.memory.slice(DATA + 4096, 8);
    expect(u32(back, 0) - 123456789).toBeLessThan(1000);
    expect(back[6]).toBe(2);
    // Host behavior support: 512 bytes round trip.
    const hb = new Uint8Array(512);
    hb[0] = 1;
    h.memory.fill(DATA, hb);
    expect((await set(FeatureId.HOST_BEHAVIOR_SUPPORT, 0, { prp1: DATA })).status).toBe(0);
    expect((await get(FeatureId.HOST_BEHAVIOR_SUPPORT, 0, 0, DATA + 8192)).status).toBe(0);
    expect(h.memory.slice(DATA + 8192, 1)[0]).toBe(1);
  });

  it('volatile write cache appears with a file-like backend and can be turned off', async () => {
    const backend = new RamBackend(1 << 20);
    Object.defineProperty(backend, 'volatileCache', { value: true });
    let flushes = 0;
    backend.flush = async () => void flushes++;
    const h = new TestHost({ namespaces: [new Namespace({ nsid: 1, backend })] }).start();
    await h.createIoQueuePair(1);
    expect((await h.admin({ opcode: AdminOpcode.GET_FEATURES, cdw10: FeatureId.VOLATILE_WRITE_CACHE })).dw0).toBe(1);
    await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA });
    expect(flushes).toBe(0);
    await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw12: 1 << 30 }); // FUA
    expect(flushes).toBe(1);
    await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.VOLATILE_WRITE_CACHE, cdw11: 0 });
    await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA });
    expect(flushes).toBe(2);
  });
});

describe('log pages', () => {
  it('serves error, SMART, firmware, changed-namespace and effects logs', async () => {
    const h = new TestHost().start();
    const log = (lid: number, dwords: number, extra: { nsid?: number; offset?: number } = {}) =>
      h.admin({ opcode: AdminOpcode.GET_LOG_PAGE, prp1: DATA, nsid: extra.nsid ?? 0xffffffff, cdw10: lid | ((dwords - 1) << 16), cdw12: extra.offset ?? 0 });
    expect((await log(LogId.ERROR_INFORMATION, 16)).status).toBe(0);
    expect((await log(LogId.SMART_HEALTH, 128)).status).toBe(0);
    expect((await log(LogId.FIRMWARE_SLOT, 128)).status).toBe(0);
    expect(h.memory.slice(DATA, 1)[0]).toBe(1);
    expect(ascii(h.memory.slice(DATA, 16), 8, 8)).toBe(h.subsystem.firmware);
    expect((await log(LogId.CHANGED_NAMESPACES, 1024)).status).toBe(0);
    expect((await log(LogId.COMMANDS_SUPPORTED_AND_EFFECTS, 1024)).status).toBe(0);
    const effects = h.memory.slice(DATA, 4096);
    expect(u32(effects, AdminOpcode.IDENTIFY * 4) & 1).toBe(1);
    expect(u32(effects, 1024 + NvmOpcode.WRITE * 4) & 3).toBe(3);
    expect(u32(effects, 0x7e * 4)).toBe(0);
    expect(code((await log(0x70, 16)).status)).toBe(code(Status.INVALID_LOG_PAGE));
    expect(code((await log(LogId.SMART_HEALTH, 128, { nsid: 1 })).status)).toBe(code(Status.INVALID_FIELD));
    expect(code((await log(LogId.SMART_HEALTH, 16, { offset: 2 })).status)).toBe(code(Status.INVALID_FIELD));
    // Offset into a page.
    await h.admin({ opcode: 0x7e }); // logs an error
    expect((await log(LogId.ERROR_INFORMATION, 16, { offset: 0 })).status).toBe(0);
    expect(u64(h.memory.slice(DATA, 8), 0)).toBeGreaterThan(0);
  });
});

describe('asynchronous events', () => {
  it('reports an invalid doorbell write only while an AER is outstanding', async () => {
    const h = new TestHost().start();
    // No AER outstanding: ignored.
    h.write32(0x1000 + 8 * 5, 1);
    const cid = h.place(0, aer());
    h.ringSq(0);
    await until(() => h.controller.state.asyncEvents.outstanding.length === 1, 'the AER to be outstanding');
    await tick(); // delivery of queued events runs in a microtask
    expect(h.peek(0)).toBeNull();
    // Doorbell of a queue that does not exist.
    h.write32(0x1000 + 8 * 5, 1);
    const cqe = await h.reap(0);
    expect(cqe.cid).toBe(cid);
    expect(cqe.dw0 & 0x7).toBe(0); // error
    expect((cqe.dw0 >> 8) & 0xff).toBe(0); // write to invalid doorbell register
    expect((cqe.dw0 >> 16) & 0xff).toBe(LogId.ERROR_INFORMATION);
    // A bad value (tail beyond the admin queue) with a fresh AER, after reading the error log.
    await h.admin({ opcode: AdminOpcode.GET_LOG_PAGE, prp1: DATA, cdw10: LogId.ERROR_INFORMATION | (15 << 16) });
    h.place(0, aer());
    h.ringSq(0);
    await until(() => h.controller.state.asyncEvents.outstanding.length === 1, 'the second AER to be outstanding');
    h.write32(0x1000, 999);
    const second = await h.reap(0);
    expect((second.dw0 >> 8) & 0xff).toBe(1); // invalid doorbell write value
  });

  it('limits outstanding AERs and delivers namespace-change notices', async () => {
    const h = new TestHost().start();
    await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.ASYNC_EVENT_CONFIG, cdw11: 0x100 });
    for (let i = 0; i < 4; i++) h.place(0, aer());
    h.ringSq(0);
    const fifth = await h.admin({ opcode: AdminOpcode.ASYNC_EVENT_REQUEST });
    expect(code(fifth.status)).toBe(code(Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED));
    h.subsystem.addNamespace(new Namespace({ nsid: 7, backend: new RamBackend(1 << 20) }));
    const notice = await h.reap(0);
    expect(notice.dw0).toBe(2 | (LogId.CHANGED_NAMESPACES << 16));
    // A second change while the first is unread is not reported yet.
    h.subsystem.addNamespace(new Namespace({ nsid: 8, backend: new RamBackend(1 << 20) }));
    await until(() => h.controller.state.asyncEvents.queued.length === 1, 'the second notice to be queued');
    await tick();
    expect(h.peek(0)).toBeNull();
    const logCid = h.place(0, buildCommand({ opcode: AdminOpcode.GET_LOG_PAGE, prp1: DATA, cdw10: LogId.CHANGED_NAMESPACES | (1023 << 16) }));
    h.ringSq(0);
    // Reading the log cleared it (both NSIDs were listed) and unmasked notices: the queued one fires.
    const both = [await h.reap(0), await h.reap(0)];
    expect(both.find((c) => c.cid === logCid)!.status).toBe(0);
    expect([u32(h.memory.slice(DATA, 12), 0), u32(h.memory.slice(DATA, 12), 4)]).toEqual([7, 8]);
    const next = both.find((c) => c.cid !== logCid)!;
    expect(next.dw0).toBe(2 | (LogId.CHANGED_NAMESPACES << 16));
  });
});

describe('other admin commands', () => {
  it('abort, keep alive, doorbell buffer config', async () => {
    const h = new TestHost().start();
    let cqe = await h.admin({ opcode: AdminOpcode.ABORT, cdw10: (5 << 16) | 1 });
    expect(cqe.status).toBe(0);
    expect(cqe.dw0 & 1).toBe(1);
    cqe = await h.admin({ opcode: AdminOpcode.KEEP_ALIVE });
    expect(cqe.status).toBe(0);
    cqe = await h.admin({ opcode: AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1: DATA + 8, prp2: DATA + 4096 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_FIELD));
    const shadow = DATA + 0x10000;
    const eventIdx = DATA + 0x11000;
    cqe = await h.admin({ opcode: AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1: shadow, prp2: eventIdx });
    expect(cqe.status).toBe(0);
    await h.createIoQueuePair(1);
    // With shadow doorbells, the host writes the shadow tail; an MMIO ring tells us to look.
    h.place(1, flushCmd());
    h.memory.set32(shadow + 8, 1);
    h.ringSq(1);
    expect((await h.reap(1)).status).toBe(0);
    await until(() => h.memory.get32(eventIdx + 8) === 1, 'EventIdx update');
    // A shadow-only update (no MMIO) is picked up when the controller re-reads the shadow.
    h.place(1, flushCmd());
    h.place(1, flushCmd());
    h.memory.set32(shadow + 8, 2);
    h.ringSq(1);
    h.memory.set32(shadow + 8, 3);
    await h.reap(1);
    await h.reap(1);
  });

  it('keep alive timeout sets CSTS.CFS', async () => {
    const h = new TestHost().start();
    await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.KEEP_ALIVE_TIMER, cdw11: 30 });
    await h.admin({ opcode: AdminOpcode.KEEP_ALIVE });
    await until(() => (h.read32(0x1c) & 2) !== 0, 'CFS', 1000);
  });

  it('formats a namespace to another LBA size and erases it', async () => {
    const h = new TestHost().start();
    const ns = h.subsystem.namespace(1)!;
    await ns.backend.write(0, new Uint8Array(4096).fill(7));
    let cqe = await h.admin({ opcode: AdminOpcode.FORMAT_NVM, nsid: 1, cdw10: 1 | (1 << 9) });
    expect(cqe.status).toBe(0);
    expect(ns.blockSize).toBe(4096);
    expect((await ns.backend.read(0, 4096)).every((b) => b === 0)).toBe(true);
    cqe = await h.admin({ opcode: AdminOpcode.FORMAT_NVM, nsid: 1, cdw10: 5 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_FORMAT));
    cqe = await h.admin({ opcode: AdminOpcode.FORMAT_NVM, nsid: 1, cdw10: 1 << 5 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_FORMAT));
    cqe = await h.admin({ opcode: AdminOpcode.FORMAT_NVM, nsid: 1, cdw10: 2 << 9 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_FIELD));
    cqe = await h.admin({ opcode: AdminOpcode.FORMAT_NVM, nsid: 9, cdw10: 0 });
    expect(code(cqe.status)).toBe(code(Status.INVALID_NAMESPACE));
  });
});

describe('subsystem', () => {
  it('hosts several controllers with distinct CNTLIDs sharing namespaces, with per-controller attachment', async () => {
    const subsystem = new Subsystem({ nqn: 'nqn.2024-01.test:shared' });
    subsystem.addNamespace(new Namespace({ nsid: 1, backend: new RamBackend(1 << 20) }));
    const a = new TestHost({ subsystem }).start();
    const b = new TestHost({ subsystem }).start();
    expect(a.controller.cntlid).not.toBe(b.controller.cntlid);
    b.controller.detachNamespace(1);
    let cqe = await b.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 2 });
    expect(u32(h(b), 0)).toBe(0);
    cqe = await a.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 2 });
    expect(u32(h(a), 0)).toBe(1);
    cqe = await a.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 1 });
    expect(cqe.status).toBe(0);
    expect(h(a)[76]! & 2).toBe(2); // CMIC: more than one controller
  });
});

const h = (host: TestHost): Uint8Array => host.memory.slice(DATA, 4096);

function aer(): Uint8Array {
  const sqe = new Uint8Array(64);
  sqe[0] = AdminOpcode.ASYNC_EVENT_REQUEST;
  return sqe;
}

function flushCmd(): Uint8Array {
  const sqe = new Uint8Array(64);
  sqe[0] = NvmOpcode.FLUSH;
  sqe[4] = 1;
  return sqe;
}
