import { describe, it, expect } from 'vitest';
import { AdminOpcode, CSTS, NvmOpcode, Reg, SglType, Status } from '../../../src/nvme/spec.js';
import { buildCommand } from '../../../src/nvme/command.js';
import { loadControllerState, saveControllerState } from '../../../src/nvme/controller.js';
import { Namespace } from '../../../src/nvme/namespace.js';
import { RamBackend, type BlockBackend } from '../../../src/nvme/backend.js';
import { PciIrq } from '../../../src/vfio-user/protocol.js';
import { createLogger } from '../../../src/log.js';
import { DATA, GuestMemory, PAGE, TestHost, code, pattern, tick, until } from './helpers.js';

const SGL = 1 << 6; // PSDT = 01b

/** Writes a 16-byte SGL descriptor at `at` in guest memory. */
function descriptor(h: TestHost, at: number, addr: number, length: number, type: number, subtype = 0): void {
  h.memory.set64(at, addr);
  h.memory.set32(at + 8, length);
  h.memory.set32(at + 12, ((type << 4) | subtype) << 24);
}

interface Sgl1 {
  addr: number;
  length: number;
  id: number;
}

/** SGL1 of an SQE (bytes 24..39): too wide for prp1/prp2 numbers, so it is patched in. */
function sgl1(addr: number, length: number, type: number, subtype = 0): Sgl1 {
  return { addr, length, id: (type << 4) | subtype };
}

function sglCommand(fields: Parameters<typeof buildCommand>[0], sgl: Sgl1): Uint8Array {
  const sqe = buildCommand({ ...fields, prp1: sgl.addr });
  new DataView(sqe.buffer).setUint32(32, sgl.length, true);
  sqe[39] = sgl.id;
  return sqe;
}

/** A backend whose reads wait until released, to hold commands in flight. */
class GatedBackend extends RamBackend implements BlockBackend {
  private gate: Promise<void> = Promise.resolve();
  private open: () => void = () => {};
  close_(): void {
    this.gate = new Promise((resolve) => (this.open = resolve));
  }
  release(): void {
    this.open();
  }
  override async readv(offset: number, targets: readonly Uint8Array[]): Promise<void> {
    await this.gate;
    return super.readv(offset, targets);
  }
}

describe('SGL data transfers', () => {
  it('reads through a data block, a segment and a last segment', async () => {
    const h = new TestHost().start();
    await h.createIoQueuePair(1);
    const data = pattern(3 * PAGE, 9);
    await h.subsystem.namespace(1)!.backend.write(0, data);
    // Single data block in the SQE.
    let r = await h.submit(1, sglCommand({ opcode: NvmOpcode.READ, nsid: 1, flags: SGL, cdw12: 7 }, sgl1(DATA, PAGE, SglType.DATA_BLOCK)));
    expect(r.status).toBe(0);
    expect(h.memory.slice(DATA, PAGE)).toEqual(data.subarray(0, PAGE));
    // SQE → segment [block 1000 B, block 1000 B, last segment →] → last segment [block rest].
    const seg1 = DATA + 0x10000;
    const seg2 = DATA + 0x11000;
    const bufs = [DATA + 0x20000, DATA + 0x21000, DATA + 0x30000];
    descriptor(h, seg1, bufs[0]!, 1000, SglType.DATA_BLOCK);
    descriptor(h, seg1 + 16, bufs[1]!, 1000, SglType.DATA_BLOCK);
    descriptor(h, seg1 + 32, seg2, 16, SglType.LAST_SEGMENT);
    descriptor(h, seg2, bufs[2]!, 3 * PAGE - 2000, SglType.DATA_BLOCK);
    r = await h.submit(1, sglCommand({ opcode: NvmOpcode.READ, nsid: 1, flags: SGL, cdw12: 23 }, sgl1(seg1, 48, SglType.SEGMENT)));
    expect(r.status).toBe(0);
    expect(h.memory.slice(bufs[0]!, 1000)).toEqual(data.subarray(0, 1000));
    expect(h.memory.slice(bufs[1]!, 1000)).toEqual(data.subarray(1000, 2000));
    expect(h.memory.slice(bufs[2]!, 3 * PAGE - 2000)).toEqual(data.subarray(2000));
    // Write through a last segment straight from the SQE.
    descriptor(h, seg2, bufs[0]!, 512, SglType.DATA_BLOCK);
    h.memory.fill(bufs[0]!, pattern(512, 10));
    r = await h.submit(1, sglCommand({ opcode: NvmOpcode.WRITE, nsid: 1, flags: SGL, cdw10: 100, cdw12: 0 }, sgl1(seg2, 16, SglType.LAST_SEGMENT)));
    expect(r.status).toBe(0);
    expect(await h.subsystem.namespace(1)!.backend.read(100 * 512, 512)).toEqual(pattern(512, 10));
  });

  it('rejects bad SGL descriptors', async () => {
    const h = new TestHost().start();
    await h.createIoQueuePair(1);
    const seg = DATA + 0x10000;
    const read = (sgl: Sgl1, cdw12 = 7) => h.submit(1, sglCommand({ opcode: NvmOpcode.READ, nsid: 1, flags: SGL, cdw12 }, sgl));
    // Too short for the transfer.
    expect(code((await read(sgl1(DATA, 100, SglType.DATA_BLOCK))).status)).toBe(code(Status.DATA_SGL_LENGTH_INVALID));
    // Unknown / unsupported types and subtypes.
    expect(code((await read(sgl1(DATA, PAGE, 0x7))).status)).toBe(code(Status.SGL_DESCRIPTOR_TYPE_INVALID));
    expect(code((await read(sgl1(DATA, PAGE, SglType.BIT_BUCKET))).status)).toBe(code(Status.SGL_DESCRIPTOR_TYPE_INVALID));
    expect(code((await read(sgl1(DATA, PAGE, SglType.DATA_BLOCK, 1))).status)).toBe(code(Status.SGL_DESCRIPTOR_TYPE_INVALID));
    // Segment length not a multiple of 16.
    expect(code((await read(sgl1(seg, 20, SglType.SEGMENT))).status)).toBe(code(Status.INVALID_SGL_SEGMENT_DESCRIPTOR));
    // A segment descriptor that is not last in its segment.
    descriptor(h, seg, seg + 0x100, 16, SglType.LAST_SEGMENT);
    descriptor(h, seg + 16, DATA, PAGE, SglType.DATA_BLOCK);
    expect(code((await read(sgl1(seg, 32, SglType.SEGMENT))).status)).toBe(code(Status.INVALID_SGL_SEGMENT_DESCRIPTOR));
    // A segment descriptor inside a last segment.
    expect(code((await read(sgl1(seg, 32, SglType.LAST_SEGMENT))).status)).toBe(code(Status.INVALID_SGL_SEGMENT_DESCRIPTOR));
    // A segment outside guest memory.
    expect(code((await read(sgl1(0x7000_0000, 16, SglType.SEGMENT))).status)).toBe(code(Status.DATA_TRANSFER_ERROR));
    // A segment chain that loops forever ends with an error, not a hang.
    descriptor(h, seg, seg, 16, SglType.SEGMENT);
    expect(code((await read(sgl1(seg, 16, SglType.SEGMENT))).status)).toBe(code(Status.INVALID_SGL_DESCRIPTOR_COUNT));
    // PSDT 11b is reserved.
    expect(code((await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, flags: 3 << 6, prp1: DATA })).status)).toBe(code(Status.INVALID_FIELD));
  });
});

/** A controller with one Read of LBA 0 into DATA fetched and held in its backend until release(). */
async function readHeldInFlight(fill?: number): Promise<{ backend: GatedBackend; h: TestHost }> {
  const backend = new GatedBackend(1 << 20);
  if (fill !== undefined) await backend.write(0, new Uint8Array(512).fill(fill));
  const h = new TestHost({ namespaces: [new Namespace({ nsid: 1, backend })] }).start();
  await h.createIoQueuePair(1);
  backend.close_();
  h.place(1, buildCommand({ opcode: NvmOpcode.READ, nsid: 1, prp1: DATA }));
  h.ringSq(1);
  await tick();
  return { backend, h };
}

describe('quiesce, reset and state', () => {
  it('quiesce stops fetching, waits for in-flight commands, resume continues', async () => {
    const { backend, h } = await readHeldInFlight();
    let quiesced = false;
    const q = h.controller.quiesce().then(() => (quiesced = true));
    // Submitted after quiesce: must not be fetched.
    h.place(1, buildCommand({ opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + PAGE }));
    h.ringSq(1);
    await tick();
    expect(quiesced).toBe(false);
    backend.release();
    await q;
    const first = h.peek(1);
    expect(first?.status).toBe(0);
    await h.reap(1);
    // Fetching and executing run in microtasks: one tick lets a (wrong) fetch finish.
    await tick();
    expect(h.peek(1)).toBeNull();
    expect(h.controller.state.submissionQueues[1]!.head).toBe(1);
    h.controller.resume();
    expect((await h.reap(1)).status).toBe(0);
  });

  it('controller reset with a command in flight: RDY stays set until it drains, no completion, no DMA after RDY=0', async () => {
    const { backend, h } = await readHeldInFlight(0x55);
    h.write32(Reg.CC, 0);
    // The read may still land in guest memory, so the reset is not done yet.
    expect(h.read32(Reg.CSTS) & CSTS.RDY).toBe(CSTS.RDY);
    backend.release();
    await until(() => (h.read32(Reg.CSTS) & CSTS.RDY) === 0, 'RDY to clear once the read has drained');
    expect(h.peek(1)).toBeNull();
    // Once RDY reads 0 the host owns its buffers again: nothing writes them any more (what could
    // still run would be microtasks of the finished command, which a tick lets finish).
    h.memory.bytes.fill(0xaa, DATA, DATA + 512);
    await tick();
    expect(h.memory.slice(DATA, 4).every((b) => b === 0xaa)).toBe(true);
  });

  it('deleting an SQ waits for its running commands', async () => {
    const { backend, h } = await readHeldInFlight();
    const cid = h.place(0, buildCommand({ opcode: AdminOpcode.DELETE_IO_SQ, cdw10: 1 }));
    h.ringSq(0);
    await until(() => h.controller.state.submissionQueues[0]!.head === h.queues.get(0)!.sqTail, 'the Delete I/O SQ command to be fetched');
    await tick();
    expect(h.peek(0)).toBeNull();
    backend.release();
    const cqe = await h.reap(0);
    expect(cqe.cid).toBe(cid);
    expect(cqe.status).toBe(0);
  });

  it('queue memory outside guest RAM is a controller fatal status', async () => {
    const h = new TestHost().start();
    const cqe = await h.admin({ opcode: AdminOpcode.CREATE_IO_CQ, prp1: 0x7000_0000, cdw10: (15 << 16) | 1, cdw11: 1 });
    expect(cqe.status).toBe(0);
    await h.admin({ opcode: AdminOpcode.CREATE_IO_SQ, prp1: 0x7100_0000, cdw10: (15 << 16) | 1, cdw11: (1 << 16) | 1 });
    h.write32(0x1008, 1);
    await until(() => (h.read32(Reg.CSTS) & CSTS.CFS) !== 0, 'CFS');
  });

  it('saves and loads controller state as plain data, into a fresh controller', async () => {
    const h = new TestHost().start();
    await h.createIoQueuePair(1, 16);
    await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: 0x0b, cdw11: 0x100 });
    h.place(0, buildCommand({ opcode: AdminOpcode.ASYNC_EVENT_REQUEST }));
    h.ringSq(0);
    for (let i = 0; i < 3; i++) await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw10: i });
    await h.controller.quiesce();
    const saved = saveControllerState(h.controller);
    const json = JSON.parse(JSON.stringify(saved));
    expect(json).toEqual(saved);
    expect(saved.asyncEvents.outstanding).toHaveLength(1);
    expect(saved.completionQueues[1]!.tail).toBe(3);

    // A second controller on the same subsystem and guest memory takes over.
    const target = new TestHost({ memory: h.memory, subsystem: h.subsystem });
    target.enableBusMaster();
    target.enableMsix();
    loadControllerState(target.controller, json);
    expect(target.read32(Reg.CSTS) & CSTS.RDY).toBe(1);
    expect(target.read64(Reg.ASQ)).toBe(h.read64(Reg.ASQ));
    target.queues.set(0, { ...h.queues.get(0)! });
    target.queues.set(1, { ...h.queues.get(1)! });
    const cqe = await target.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + PAGE, cdw10: 2 });
    expect(cqe.status).toBe(0);
    expect(cqe.sqhd).toBe(4);
    // The AER carried over is completed by the new controller.
    h.subsystem.notifyNamespaceChanged(1, h.controller);
    const event = await target.reap(0);
    expect(event.dw0 & 7).toBe(2);
    expect(saveControllerState(target.controller).smart.hostWriteCommands).toBe(3);
  });
});

describe('in-process admin and DMA paths', () => {
  it('executeAdmin shares the handlers and returns data', async () => {
    const h = new TestHost();
    let result = await h.controller.executeAdmin(buildCommand({ opcode: AdminOpcode.IDENTIFY, cdw10: 1 }));
    expect(result.status).toBe(0);
    expect(result.data).toHaveLength(4096);
    expect(result.data![78]).toBe(h.controller.cntlid);
    result = await h.controller.executeAdmin(buildCommand({ opcode: AdminOpcode.GET_FEATURES, cdw10: 0x07 }));
    expect(result.dw0).toBe((7 << 16) | 7);
    const ts = new Uint8Array(8);
    ts[0] = 42;
    result = await h.controller.executeAdmin(buildCommand({ opcode: AdminOpcode.SET_FEATURES, cdw10: 0x0e }), ts);
    expect(result.status).toBe(0);
    result = await h.controller.executeAdmin(buildCommand({ opcode: AdminOpcode.SET_FEATURES, cdw10: 0x0e }));
    expect(code(result.status)).toBe(code(Status.DATA_SGL_LENGTH_INVALID));
    result = await h.controller.executeAdmin(buildCommand({ opcode: 0x7e }));
    expect(code(result.status)).toBe(code(Status.INVALID_OPCODE));
    result = await h.controller.executeAdmin(buildCommand({ opcode: AdminOpcode.ASYNC_EVENT_REQUEST }));
    expect(code(result.status)).toBe(code(Status.COMMAND_SEQUENCE_ERROR));
  });

  it('works with message-style DMA (no mapped views) and MSI', async () => {
    const memory = new GuestMemory(32 << 20, 0, false);
    const h = new TestHost({ memory });
    h.enableBusMaster();
    const msi = h.controller.config.caps.msi!;
    h.configWrite16(msi + 2, 0x1); // MSI enable, one vector
    h.enable();
    await h.createIoQueuePair(1);
    const data = pattern(2 * PAGE, 11);
    h.memory.fill(DATA, data.subarray(0, PAGE));
    h.memory.fill(DATA + 0x8000, data.subarray(PAGE));
    expect((await h.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, prp2: DATA + 0x8000, cdw12: 15 })).status).toBe(0);
    expect((await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + 0x10000, prp2: DATA + 0x18000, cdw12: 15 })).status).toBe(0);
    expect(h.memory.slice(DATA + 0x18000, PAGE)).toEqual(data.subarray(PAGE));
    expect(memory.reads + memory.writes).toBeGreaterThan(0);
    expect(h.irqs.count(PciIrq.MSI)).toBeGreaterThan(0);
    expect(h.irqs.count(PciIrq.MSIX)).toBe(0);
  });

  it('an unexpected exception inside a command is Internal Error, logged', async () => {
    const backend = new RamBackend(1 << 20);
    backend.read = async () => undefined as never; // a broken backend: Compare then throws a TypeError
    const lines: string[] = [];
    const logger = createLogger('error', '', (line) => lines.push(line));
    const h = new TestHost({ namespaces: [new Namespace({ nsid: 1, backend })], controller: { logger } }).start();
    await h.createIoQueuePair(1);
    const cqe = await h.io(1, { opcode: NvmOpcode.COMPARE, nsid: 1, prp1: DATA });
    expect(code(cqe.status)).toBe(code(Status.INTERNAL_ERROR));
    expect(lines.some((l) => l.includes('failed unexpectedly'))).toBe(true);
    expect(h.read32(Reg.CSTS) & CSTS.CFS).toBe(0);
  });

  it('a failing backend is a media error', async () => {
    const backend = new RamBackend(1 << 20);
    backend.flush = () => {
      throw new TypeError('boom');
    };
    const h = new TestHost({ namespaces: [new Namespace({ nsid: 1, backend })] }).start();
    await h.createIoQueuePair(1);
    const cqe = await h.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 });
    // Backend failures are media errors; the controller stays alive.
    expect(code(cqe.status)).toBe(code(Status.WRITE_FAULT));
    expect(h.read32(Reg.CSTS) & CSTS.CFS).toBe(0);
  });
});
