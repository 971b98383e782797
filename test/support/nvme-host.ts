// A small NVMe host driver in TypeScript that talks to our server through the vfio-user client,
// with memfd "guest RAM": what the guest's nvme driver does, but scriptable, so tests can also
// behave like a hostile guest (bad PRPs, queues in unmapped memory, bogus doorbells).

import { native } from '../../src/native.js';
import { GuestMemory, VfioUserClient } from '../../src/vfio-user/client.js';
import { PciIrq, PciRegion } from '../../src/vfio-user/protocol.js';
import { Cfg, Command as PciCommand, MsixCap } from '../../src/pci/registers.js';
import { AdminOpcode, CC, CQE_SIZE, CSTS, Reg, SQE_SIZE } from '../../src/nvme/spec.js';
import { buildCommand, type CommandFields } from '../../src/nvme/command.js';

export const PAGE = 4096;

/** Deterministic pseudo-random bytes: data a test writes and expects back. */
export const pattern = (length: number, seed: number): Uint8Array => {
  const out = new Uint8Array(length);
  let x = (seed * 2654435761) >>> 0;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
};

export interface Completion {
  dw0: number;
  sqHead: number;
  sqId: number;
  cid: number;
  /** The 15-bit status field (without the phase bit). */
  status: number;
}

export type SubmitOptions = Omit<CommandFields, 'opcode' | 'cid'>;

export class HostQueue {
  tail = 0;
  cqHead = 0;
  phase = 1;
  private nextCid = 0;

  constructor(
    readonly host: NvmeHost,
    readonly id: number,
    readonly sqAddr: number,
    readonly cqAddr: number,
    readonly size: number,
  ) {}

  /** Writes an SQE at the tail and rings the doorbell; returns the command id. */
  submit(opcode: number, options: SubmitOptions = {}): number {
    const cid = this.place(opcode, options);
    this.ring();
    return cid;
  }

  /** Writes an SQE at the tail without ringing the doorbell; returns the command id. */
  place(opcode: number, options: SubmitOptions = {}): number {
    const cid = this.nextCid;
    this.nextCid = (this.nextCid + 1) & 0xffff;
    this.host.bytes(this.sqAddr + this.tail * SQE_SIZE, SQE_SIZE).set(buildCommand({ ...options, opcode, cid }));
    this.tail = (this.tail + 1) % this.size;
    return cid;
  }

  /** Rings the SQ tail doorbell for everything placed so far. */
  ring(): void {
    this.host.ringSqDoorbell(this.id, this.tail);
  }

  /** The next completion if one is posted (phase matches), consuming it and ringing the CQ doorbell. */
  poll(): Completion | null {
    const entry = this.host.bytes(this.cqAddr + this.cqHead * CQE_SIZE, CQE_SIZE);
    const view = new DataView(entry.buffer, entry.byteOffset, CQE_SIZE);
    const dw3 = view.getUint32(12, true);
    if (((dw3 >>> 16) & 1) !== this.phase) return null;
    const completion = {
      dw0: view.getUint32(0, true),
      sqHead: view.getUint16(8, true),
      sqId: view.getUint16(10, true),
      cid: dw3 & 0xffff,
      status: dw3 >>> 17,
    };
    this.cqHead = (this.cqHead + 1) % this.size;
    if (this.cqHead === 0) this.phase ^= 1;
    this.host.ringCqDoorbell(this.id, this.cqHead);
    return completion;
  }

  async wait(timeoutMs = 5000): Promise<Completion> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      // Let the server run: its posted doorbell writes are in flight on the socket.
      await this.host.client.read32(PciRegion.BAR0, Reg.CSTS);
      const c = this.poll();
      if (c) return c;
      if (Date.now() > deadline) throw new Error(`queue ${this.id}: no completion within ${timeoutMs} ms`);
      await new Promise((r) => setImmediate(r));
    }
  }

  async run(opcode: number, options: SubmitOptions = {}): Promise<Completion> {
    const cid = this.submit(opcode, options);
    const completion = await this.wait();
    if (completion.cid !== cid) throw new Error(`expected completion for cid ${cid}, got ${completion.cid}`);
    return completion;
  }
}

export class NvmeHost {
  admin!: HostQueue;
  private nextPage: number;
  readonly irqFds: number[] = [];
  /** Guest RAM and any further memory mapped with addMemory(), which close() releases too. */
  private readonly memories: GuestMemory[];

  private constructor(
    readonly client: VfioUserClient,
    readonly ram: GuestMemory,
  ) {
    this.nextPage = ram.iova;
    this.memories = [ram];
  }

  /** Maps more guest memory (its own memfd) for the server; queues and buffers may live in it. */
  async addMemory(memory: GuestMemory): Promise<void> {
    this.memories.push(memory);
    await this.client.dmaMap(memory);
  }

  /** Connects, maps `ramBytes` of guest RAM at `ramBase`, enables bus mastering and MSI-X. */
  static async attach(socketPath: string, options: { ramBase?: number; ramBytes?: number; vectors?: number } = {}): Promise<NvmeHost> {
    const client = VfioUserClient.connect(socketPath);
    await client.negotiate();
    const ram = new GuestMemory(options.ramBase ?? 0x100000, options.ramBytes ?? 16 << 20);
    await client.dmaMap(ram);
    const host = new NvmeHost(client, ram);
    await client.configWrite(Cfg.COMMAND, new Uint8Array([PciCommand.MEMORY | PciCommand.BUS_MASTER, 0]));
    const vectors = options.vectors ?? 4;
    for (let i = 0; i < vectors; i++) host.irqFds.push(native.eventfd());
    await client.setIrqEventfds(PciIrq.MSIX, 0, host.irqFds);
    const msix = await host.findCapability(0x11);
    await client.configWrite(msix + MsixCap.CONTROL + 1, new Uint8Array([MsixCap.CTRL_ENABLE >> 8]));
    return host;
  }

  /** attach(), retrying while the server still serves the socket's previous client (it refuses a second one). */
  static async attachWhenFree(socketPath: string, options: Parameters<typeof NvmeHost.attach>[1] = {}, timeoutMs = 5000): Promise<NvmeHost> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        return await NvmeHost.attach(socketPath, options);
      } catch (error) {
        if (Date.now() > deadline || !/connection closed/.test(String(error))) throw error;
        await new Promise((r) => setTimeout(r, 5));
      }
    }
  }

  async findCapability(id: number): Promise<number> {
    for (let at = (await this.client.configRead(Cfg.CAPABILITY_LIST, 1))[0]!; at !== 0; ) {
      const [capId, next] = await this.client.configRead(at, 2);
      if (capId === id) return at;
      at = next!;
    }
    throw new Error(`capability 0x${id.toString(16)} not found`);
  }

  /** A page-aligned block of guest RAM (zeroed). */
  alloc(bytes: number): number {
    const addr = this.nextPage;
    const size = Math.ceil(bytes / PAGE) * PAGE;
    if (addr + size > this.ram.iova + this.ram.size) throw new Error('test guest RAM exhausted');
    this.nextPage += size;
    this.ram.bytes.fill(0, addr - this.ram.iova, addr - this.ram.iova + size);
    return addr;
  }

  /** Guest memory at [addr, addr+length), in whichever mapping holds it. */
  bytes(addr: number, length: number): Uint8Array {
    const memory = this.memories.find((m) => m.contains(addr, length));
    if (!memory) throw new Error(`0x${addr.toString(16)}+${length} is in no guest memory of this host`);
    return memory.slice(addr, length);
  }

  read32(offset: number): Promise<number> {
    return this.client.read32(PciRegion.BAR0, offset);
  }

  write32(offset: number, value: number): Promise<void> {
    return this.client.write32(PciRegion.BAR0, offset, value);
  }

  ringSqDoorbell(qid: number, tail: number): void {
    this.client.postRegionWrite(PciRegion.BAR0, Reg.DOORBELLS + 2 * qid * 4, u32(tail));
  }

  ringCqDoorbell(qid: number, head: number): void {
    this.client.postRegionWrite(PciRegion.BAR0, Reg.DOORBELLS + (2 * qid + 1) * 4, u32(head));
  }

  /** Resets and enables the controller with an admin queue pair of `size` entries. */
  async enable(size = 32, addresses?: { sq: number; cq: number }): Promise<void> {
    await this.write32(Reg.CC, 0);
    await this.waitStatus((s) => (s & CSTS.RDY) === 0);
    const sq = addresses?.sq ?? this.alloc(size * SQE_SIZE);
    const cq = addresses?.cq ?? this.alloc(size * CQE_SIZE);
    await this.write32(Reg.AQA, ((size - 1) << 16) | (size - 1));
    await this.client.write64(PciRegion.BAR0, Reg.ASQ, BigInt(sq));
    await this.client.write64(PciRegion.BAR0, Reg.ACQ, BigInt(cq));
    await this.write32(Reg.CC, CC.EN | (6 << CC.IOSQES_SHIFT) | (4 << CC.IOCQES_SHIFT));
    await this.waitStatus((s) => (s & (CSTS.RDY | CSTS.CFS)) !== 0);
    this.admin = new HostQueue(this, 0, sq, cq, size);
  }

  async waitStatus(predicate: (csts: number) => boolean, timeoutMs = 5000): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const csts = await this.read32(Reg.CSTS);
      if (predicate(csts)) return csts;
      if (Date.now() > deadline) throw new Error(`CSTS stuck at 0x${csts.toString(16)}`);
      await new Promise((r) => setTimeout(r, 2));
    }
  }

  /** Creates I/O CQ+SQ pair `qid` (interrupt vector = qid % vectors). */
  async createIoQueuePair(qid: number, size = 64): Promise<HostQueue> {
    const cq = this.alloc(size * CQE_SIZE);
    const sq = this.alloc(size * SQE_SIZE);
    const vector = qid % this.irqFds.length;
    const c1 = await this.admin.run(AdminOpcode.CREATE_IO_CQ, { prp1: cq, cdw10: ((size - 1) << 16) | qid, cdw11: (vector << 16) | 0x3 });
    if (c1.status !== 0) throw new Error(`create CQ ${qid}: status 0x${c1.status.toString(16)}`);
    const c2 = await this.admin.run(AdminOpcode.CREATE_IO_SQ, { prp1: sq, cdw10: ((size - 1) << 16) | qid, cdw11: (qid << 16) | 0x1 });
    if (c2.status !== 0) throw new Error(`create SQ ${qid}: status 0x${c2.status.toString(16)}`);
    return new HostQueue(this, qid, sq, cq, size);
  }

  /** Identify with CNS `cns` into a fresh page; returns the 4 KiB structure. */
  async identify(cns: number, nsid = 0): Promise<{ completion: Completion; data: Uint8Array }> {
    const page = this.alloc(PAGE);
    const completion = await this.admin.run(AdminOpcode.IDENTIFY, { nsid, prp1: page, cdw10: cns });
    return { completion, data: this.bytes(page, PAGE).slice() };
  }

  // ---- helpers for hostile-guest tests (raw access, no bookkeeping) ----------------------------

  /** Returns once the server has handled every write posted before (a non-posted read round trip). */
  async sync(): Promise<void> {
    await this.read32(Reg.CSTS);
  }

  /**
   * Returns once the server has also finished what those writes started short of backend I/O
   * (fetching, executing against a RAM namespace, posting): the first round trip can be answered
   * in the same event-loop turn as a doorbell, the second only after that turn's work has run.
   */
  async settle(): Promise<void> {
    await this.sync();
    await this.sync();
  }

  /** Submits an Asynchronous Event Request on the admin queue; it stays outstanding. Returns its CID. */
  aer(): number {
    return this.admin.submit(AdminOpcode.ASYNC_EVENT_REQUEST);
  }

  /** The raw CQE in slot `index` of the CQ at `cqAddr`, phase tag included, without consuming it. */
  cqEntry(cqAddr: number, index: number): Completion & { phase: number } {
    const entry = this.bytes(cqAddr + index * CQE_SIZE, CQE_SIZE);
    const view = new DataView(entry.buffer, entry.byteOffset, CQE_SIZE);
    const dw3 = view.getUint32(12, true);
    return {
      dw0: view.getUint32(0, true),
      sqHead: view.getUint16(8, true),
      sqId: view.getUint16(10, true),
      cid: dw3 & 0xffff,
      status: dw3 >>> 17,
      phase: (dw3 >>> 16) & 1,
    };
  }

  /** Create I/O Completion Queue with any base address (even outside guest RAM); returns the completion. */
  createCq(qid: number, addr: number, size: number, vector = qid % this.irqFds.length): Promise<Completion> {
    return this.admin.run(AdminOpcode.CREATE_IO_CQ, { prp1: addr, cdw10: ((size - 1) << 16) | qid, cdw11: (vector << 16) | 0x3 });
  }

  /** Create I/O Submission Queue with any base address; returns the completion. */
  createSq(qid: number, addr: number, size: number, cqid = qid): Promise<Completion> {
    return this.admin.run(AdminOpcode.CREATE_IO_SQ, { prp1: addr, cdw10: ((size - 1) << 16) | qid, cdw11: (cqid << 16) | 0x1 });
  }

  close(): void {
    this.client.close();
    for (const fd of this.irqFds) native.closeFd(fd);
    for (const memory of this.memories) memory.close();
  }
}

const u32 = (value: number): Uint8Array => {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, value >>> 0, true);
  return out;
};
