// A fake guest for the NVMe controller: flat guest memory behind DmaSpace, an IrqSink that records
// what fired, and a tiny "driver" that programs registers, submits commands and reaps completions.

import { DmaError, type DmaSpace, type IrqSink, type PinnedView } from '../../../src/vfio-user/device.js';
import { PciIrq, PciRegion } from '../../../src/vfio-user/protocol.js';
import { Cfg, Command, MsixCap } from '../../../src/pci/registers.js';
import { NvmeController, type ControllerOptions } from '../../../src/nvme/controller.js';
import { Namespace } from '../../../src/nvme/namespace.js';
import { RamBackend } from '../../../src/nvme/backend.js';
import { Subsystem } from '../../../src/nvme/subsystem.js';
import { buildCommand } from '../../../src/nvme/command.js';
import { AdminOpcode, CC, Reg } from '../../../src/nvme/spec.js';

export const PAGE = 4096;

/** Guest RAM [base, base+size); everything outside is a DmaError. */
export class GuestMemory implements DmaSpace {
  readonly bytes: Uint8Array;
  reads = 0;
  writes = 0;
  private readonly observers = new Set<(addr: number, length: number) => void>();

  constructor(
    readonly size = 32 << 20,
    readonly base = 0,
    /** false: force the message-style read/write path. */
    readonly views = true,
  ) {
    this.bytes = new Uint8Array(size);
  }

  private check(addr: number, length: number): number {
    if (addr < this.base || addr + length > this.base + this.size) throw new DmaError(addr, length, 'outside guest memory');
    return addr - this.base;
  }

  view(addr: number, length: number, forWrite?: boolean): Uint8Array | null {
    if (!this.views) return null;
    if (addr < this.base || addr + length > this.base + this.size) return null;
    if (forWrite) for (const o of this.observers) o(addr, length);
    return this.bytes.subarray(addr - this.base, addr - this.base + length);
  }

  direct<T>(addr: number, length: number, forWrite: boolean, access: (bytes: Uint8Array) => T): T | undefined {
    const view = this.view(addr, length, forWrite);
    return view ? access(view) : undefined;
  }

  loadWord(addr: number): number | undefined {
    return this.direct(addr, 4, false, (view) => new DataView(view.buffer, view.byteOffset, 4).getUint32(0, true));
  }

  storeWord(addr: number, value: number): boolean {
    return (
      this.direct(addr, 4, true, (view) => {
        new DataView(view.buffer, view.byteOffset, 4).setUint32(0, value, true);
        return true;
      }) ?? false
    );
  }

  pin(addr: number, length: number, forWrite: boolean): PinnedView | null {
    const bytes = this.view(addr, length, forWrite);
    return bytes ? { bytes, intact: () => true, release: () => undefined } : null;
  }

  /** Like DmaTable: mapped memory is read through its view; `reads` counts the message-style path. */
  async read(addr: number, length: number): Promise<Uint8Array> {
    const view = this.view(addr, length, false);
    if (view) return view.slice();
    this.reads++;
    const at = this.check(addr, length);
    return this.bytes.slice(at, at + length);
  }

  async write(addr: number, data: Uint8Array): Promise<void> {
    const view = this.view(addr, data.length, true);
    if (view) {
      view.set(data);
      return;
    }
    for (const o of this.observers) o(addr, data.length);
    this.writes++;
    const at = this.check(addr, data.length);
    this.bytes.set(data, at);
  }

  /** Like DmaTable.observeWrites: every range written through views, pins and write(). */
  observeWrites(observer: (addr: number, length: number) => void): () => void {
    this.observers.add(observer);
    return () => this.observers.delete(observer);
  }

  get32(addr: number): number {
    return new DataView(this.bytes.buffer).getUint32(addr - this.base, true);
  }

  set32(addr: number, v: number): void {
    new DataView(this.bytes.buffer).setUint32(addr - this.base, v >>> 0, true);
  }

  set64(addr: number, v: number): void {
    this.set32(addr, v % 0x1_0000_0000);
    this.set32(addr + 4, Math.floor(v / 0x1_0000_0000));
  }

  fill(addr: number, data: Uint8Array): void {
    this.bytes.set(data, addr - this.base);
  }

  slice(addr: number, length: number): Uint8Array {
    return this.bytes.slice(addr - this.base, addr - this.base + length);
  }
}

export class RecordingIrqs implements IrqSink {
  readonly fired: Array<{ index: number; vector: number }> = [];
  trigger(index: number, vector: number): boolean {
    this.fired.push({ index, vector });
    return true;
  }
  isWired(): boolean {
    return true;
  }
  count(index: number, vector?: number): number {
    return this.fired.filter((f) => f.index === index && (vector === undefined || f.vector === vector)).length;
  }
}

export interface Cqe {
  dw0: number;
  dw1: number;
  sqhd: number;
  sqid: number;
  cid: number;
  phase: number;
  /** Status field without the phase bit (15 bits: DNR, M, CRD, SCT, SC). */
  status: number;
}

/** Status without DNR/More/CRD: what tests compare against spec Status values. */
export const code = (status: number): number => status & 0x7ff;

interface QueuePair {
  sqBase: number;
  cqBase: number;
  size: number;
  sqTail: number;
  cqHead: number;
  phase: number;
}

export const ADMIN_SQ = 0x10000;
export const ADMIN_CQ = 0x20000;
/** Data buffers start here; tests carve their pages out of this range. */
export const DATA = 0x400000;

export const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

export async function until(predicate: () => boolean, what = 'condition', limit = 2000): Promise<void> {
  const deadline = Date.now() + limit;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await tick();
  }
}

export class TestHost {
  readonly memory: GuestMemory;
  readonly irqs = new RecordingIrqs();
  readonly subsystem: Subsystem;
  readonly controller: NvmeController;
  readonly queues = new Map<number, QueuePair>();
  private nextCid = 1;

  constructor(
    options: {
      memory?: GuestMemory;
      subsystem?: Subsystem;
      controller?: Partial<ControllerOptions>;
      namespaces?: Namespace[];
      /** Drive this controller (e.g. a secondary) instead of creating one. */
      use?: NvmeController;
    } = {},
  ) {
    this.memory = options.memory ?? new GuestMemory();
    this.subsystem = options.use?.subsystem ?? options.subsystem ?? new Subsystem();
    const namespaces = options.namespaces ?? (options.subsystem || options.use ? [] : [new Namespace({ nsid: 1, backend: new RamBackend(16 << 20) })]);
    for (const ns of namespaces) this.subsystem.addNamespace(ns);
    this.controller = options.use ?? new NvmeController({ subsystem: this.subsystem, ...options.controller });
    this.controller.attach({ dma: this.memory, irqs: this.irqs });
  }

  // ---- PCI ----------------------------------------------------------------------------------------

  configWrite16(offset: number, value: number): void {
    this.controller.regionWrite(PciRegion.CONFIG, offset, Uint8Array.of(value & 0xff, value >> 8));
  }

  enableBusMaster(): void {
    this.configWrite16(Cfg.COMMAND, Command.MEMORY | Command.BUS_MASTER);
  }

  enableMsix(): void {
    const msix = this.controller.config.caps.msix!;
    this.configWrite16(msix + MsixCap.CONTROL, MsixCap.CTRL_ENABLE);
  }

  // ---- registers ----------------------------------------------------------------------------------

  read32(offset: number): number {
    return new DataView(this.controller.regionRead(PciRegion.BAR0, offset, 4).buffer).getUint32(0, true);
  }

  read64(offset: number): bigint {
    return new DataView(this.controller.regionRead(PciRegion.BAR0, offset, 8).buffer).getBigUint64(0, true);
  }

  write32(offset: number, value: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, value >>> 0, true);
    this.controller.regionWrite(PciRegion.BAR0, offset, b);
  }

  write64(offset: number, value: bigint): void {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, value, true);
    this.controller.regionWrite(PciRegion.BAR0, offset, b);
  }

  /** Programs the admin queue and sets CC.EN, the way a driver brings the controller up. */
  enable(options: { adminSize?: number; mps?: number } = {}): void {
    const size = options.adminSize ?? 32;
    this.write32(Reg.AQA, ((size - 1) << 16) | (size - 1));
    this.write64(Reg.ASQ, BigInt(ADMIN_SQ));
    this.write64(Reg.ACQ, BigInt(ADMIN_CQ));
    this.write32(Reg.CC, CC.EN | ((options.mps ?? 0) << CC.MPS_SHIFT) | (6 << CC.IOSQES_SHIFT) | (4 << CC.IOCQES_SHIFT));
    this.queues.set(0, { sqBase: ADMIN_SQ, cqBase: ADMIN_CQ, size, sqTail: 0, cqHead: 0, phase: 1 });
  }

  /** Bus master + MSI-X + enable. */
  start(options: { adminSize?: number; mps?: number } = {}): this {
    this.enableBusMaster();
    this.enableMsix();
    this.enable(options);
    return this;
  }

  // ---- queues -------------------------------------------------------------------------------------

  /** Places a command in SQ `qid` (filling in a fresh CID unless given) without ringing. */
  place(qid: number, sqe: Uint8Array): number {
    const q = this.queues.get(qid)!;
    const v = new DataView(sqe.buffer, sqe.byteOffset, 64);
    let cid = v.getUint16(2, true);
    if (cid === 0) {
      cid = this.nextCid++ & 0xffff || this.nextCid++;
      v.setUint16(2, cid, true);
    }
    this.memory.fill(q.sqBase + q.sqTail * 64, sqe);
    q.sqTail = (q.sqTail + 1) % q.size;
    return cid;
  }

  ringSq(qid: number): void {
    this.write32(Reg.DOORBELLS + 2 * qid * 4, this.queues.get(qid)!.sqTail);
  }

  ringCq(qid: number): void {
    this.write32(Reg.DOORBELLS + (2 * qid + 1) * 4, this.queues.get(qid)!.cqHead);
  }

  /** The next CQE if its phase says it is new, without consuming it. */
  peek(qid: number): Cqe | null {
    const q = this.queues.get(qid)!;
    const at = q.cqBase + q.cqHead * 16;
    const raw = this.memory.slice(at, 16);
    const v = new DataView(raw.buffer);
    const flags = v.getUint16(14, true);
    if ((flags & 1) !== q.phase) return null;
    return { dw0: v.getUint32(0, true), dw1: v.getUint32(4, true), sqhd: v.getUint16(8, true), sqid: v.getUint16(10, true), cid: v.getUint16(12, true), phase: flags & 1, status: flags >> 1 };
  }

  /** Waits for and consumes the next CQE (does not ring the CQ head doorbell unless asked). */
  async reap(qid: number, ring = true): Promise<Cqe> {
    let cqe: Cqe | null = null;
    await until(() => (cqe = this.peek(qid)) !== null, `a completion on CQ ${qid}`);
    const q = this.queues.get(qid)!;
    q.cqHead = (q.cqHead + 1) % q.size;
    if (q.cqHead === 0) q.phase ^= 1;
    if (ring) this.ringCq(qid);
    return cqe!;
  }

  async submit(qid: number, sqe: Uint8Array): Promise<Cqe> {
    const cid = this.place(qid, sqe);
    this.ringSq(qid);
    const cqe = await this.reap(qid);
    if (cqe.cid !== cid) throw new Error(`expected CID ${cid}, got ${cqe.cid}`);
    return cqe;
  }

  admin(fields: Parameters<typeof buildCommand>[0]): Promise<Cqe> {
    return this.submit(0, buildCommand(fields));
  }

  /**
   * Creates CQ and SQ `qid` with `size` entries; queue memory at a fixed spot per qid. With
   * `interrupts: false` the CQ has IEN clear: the host polls it.
   */
  async createIoQueuePair(qid: number, size = 64, vector = qid, { interrupts = true }: { interrupts?: boolean } = {}): Promise<void> {
    const cqBase = 0x100000 + qid * 0x20000;
    const sqBase = cqBase + 0x10000;
    const cq = await this.admin({ opcode: AdminOpcode.CREATE_IO_CQ, prp1: cqBase, cdw10: ((size - 1) << 16) | qid, cdw11: interrupts ? (vector << 16) | 0x3 : 0x1 });
    if (cq.status !== 0) throw new Error(`create CQ ${qid}: status 0x${cq.status.toString(16)}`);
    const sq = await this.admin({ opcode: AdminOpcode.CREATE_IO_SQ, prp1: sqBase, cdw10: ((size - 1) << 16) | qid, cdw11: (qid << 16) | 0x1 });
    if (sq.status !== 0) throw new Error(`create SQ ${qid}: status 0x${sq.status.toString(16)}`);
    this.queues.set(qid, { sqBase, cqBase, size, sqTail: 0, cqHead: 0, phase: 1 });
  }

  io(qid: number, fields: Parameters<typeof buildCommand>[0]): Promise<Cqe> {
    return this.submit(qid, buildCommand(fields));
  }

  msixCount(vector?: number): number {
    return this.irqs.count(PciIrq.MSIX, vector);
  }
}

export const pattern = (length: number, seed = 1): Uint8Array => {
  const out = new Uint8Array(length);
  let x = seed * 2654435761;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
};
