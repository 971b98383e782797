// A small NVMe host driver in TypeScript that talks to our server through the vfio-user client,
// with memfd "guest RAM": what the guest's nvme driver does, but scriptable, so tests can also
// behave like a hostile guest (bad PRPs, queues in unmapped memory, bogus doorbells). Like a
// migrating VM it can keep its queues and guest RAM and move to another server's socket, and like
// Linux it can use shadow doorbells (Doorbell Buffer Config) and be driven by its MSI-X eventfds.

import { native, type FdWatcher } from '../../src/native.js';
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
    /** Entries of the completion queue (a smaller CQ fills up while its SQ still holds commands). */
    readonly cqSize = size,
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

  /** Rings the SQ tail doorbell for everything placed so far (through the shadow doorbell when the host has a doorbell buffer). */
  ring(): void {
    this.host.ringSqDoorbell(this.id, this.tail);
  }

  /** The completion `ahead` entries past the head if the controller posted it (its phase matches), without consuming it. */
  peek(ahead = 0): (Completion & { slot: number }) | null {
    const slot = (this.cqHead + ahead) % this.cqSize;
    const phase = this.cqHead + ahead >= this.cqSize ? this.phase ^ 1 : this.phase;
    const entry = this.host.cqEntry(this.cqAddr, slot);
    if (entry.phase !== phase) return null;
    return { dw0: entry.dw0, sqHead: entry.sqHead, sqId: entry.sqId, cid: entry.cid, status: entry.status, slot };
  }

  /** Posted completions not consumed yet. */
  posted(): number {
    let count = 0;
    while (count < this.cqSize - 1 && this.peek(count)) count++;
    return count;
  }

  /** Consumes every posted completion, then rings the head doorbell once, as Linux does per interrupt. */
  reap(): (Completion & { slot: number })[] {
    const reaped: (Completion & { slot: number })[] = [];
    for (let next = this.peek(); next; next = this.peek()) {
      reaped.push(next);
      this.advanceHead();
    }
    if (reaped.length > 0) this.host.ringCqDoorbell(this.id, this.cqHead);
    return reaped;
  }

  /** The next completion if one is posted (phase matches), consuming it and ringing the CQ doorbell. */
  poll(): (Completion & { slot: number }) | null {
    const completion = this.peek();
    if (!completion) return null;
    this.advanceHead();
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

  private advanceHead(): void {
    this.cqHead = (this.cqHead + 1) % this.cqSize;
    if (this.cqHead === 0) this.phase ^= 1;
  }
}

/** Doorbell Buffer Config's two pages: the host's shadow doorbells and the controller's EventIdx values. */
export interface DoorbellBuffer {
  shadow: number;
  eventIdx: number;
}

/** Byte offset of queue `qid`'s tail (SQ) or head (CQ) doorbell in a doorbell buffer (stride 4). */
export const doorbellSlot = (qid: number, completion: boolean): number => (2 * qid + (completion ? 1 : 0)) * 4;

/**
 * Linux's nvme_dbbuf_need_event: the new value passed the controller's EventIdx since the old one,
 * so the controller asked to hear about it (16-bit arithmetic, as the queue indexes wrap).
 */
export const needsEvent = (eventIdx: number, value: number, old: number): boolean => ((value - eventIdx - 1) & 0xffff) < ((value - old) & 0xffff);

export interface AttachOptions {
  ramBase?: number;
  ramBytes?: number;
  vectors?: number;
}

export class NvmeHost {
  admin!: HostQueue;
  private nextPage: number;
  /** The MSI-X eventfds of vectors 0.. on the current connection. */
  irqFds: number[] = [];
  /** Interrupts per vector since the host attached to its current server. */
  interruptCounts: number[] = [];
  /** Set by watchInterrupts(): called for each vector that fired (eventfds drained first). */
  private interruptListener: ((vector: number) => void) | null = null;
  private watchers: FdWatcher[] = [];
  doorbellBuffer: DoorbellBuffer | null = null;
  /** Doorbell updates of I/O queues: rung through MMIO, or only stored in the shadow doorbell. */
  readonly doorbellCounts = { mmio: 0, shadowOnly: 0 };
  /** Guest RAM and any further memory mapped with addMemory(), which close() releases too. */
  private readonly memories: GuestMemory[];

  private constructor(
    public client: VfioUserClient,
    readonly ram: GuestMemory,
    readonly vectors: number,
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
  static async attach(socketPath: string, options: AttachOptions = {}): Promise<NvmeHost> {
    const client = VfioUserClient.connect(socketPath);
    await client.negotiate();
    return NvmeHost.setUp(client, options);
  }

  /** attach(), waiting while the server still serves the socket's previous client (it refuses a second one). */
  static async attachWhenFree(socketPath: string, options: AttachOptions = {}, timeoutMs = 5000): Promise<NvmeHost> {
    return NvmeHost.setUp(await connectClient(socketPath, timeoutMs), options);
  }

  private static async setUp(client: VfioUserClient, options: AttachOptions): Promise<NvmeHost> {
    const ram = new GuestMemory(options.ramBase ?? 0x100000, options.ramBytes ?? 16 << 20);
    await client.dmaMap(ram);
    const host = new NvmeHost(client, ram, options.vectors ?? 4);
    await client.configWrite(Cfg.COMMAND, new Uint8Array([PciCommand.MEMORY | PciCommand.BUS_MASTER, 0]));
    await host.wireInterrupts(client);
    const msix = await host.findCapability(0x11);
    await client.configWrite(msix + MsixCap.CONTROL + 1, new Uint8Array([MsixCap.CTRL_ENABLE >> 8]));
    return host;
  }

  /**
   * Moves to another server's socket the way a migrated VM arrives there: the same guest memory
   * (the same memfds, DMA_MAPped again) and fresh MSI-X eventfds; queues, registers and PCI config are
   * whatever the controller state set on that side says, so nothing is written to the device.
   * The old connection is closed once the new one is ready.
   */
  async moveTo(socketPath: string): Promise<void> {
    const client = await connectClient(socketPath);
    for (const memory of this.memories) await client.dmaMap(memory);
    const old = { client: this.client, fds: this.irqFds, watchers: this.watchers };
    this.watchers = [];
    await this.wireInterrupts(client);
    this.client = client;
    for (const watcher of old.watchers) watcher.close();
    old.client.close();
    for (const fd of old.fds) native.closeFd(fd);
  }

  /** Calls `listener` for every vector that fires, on this connection and on those moveTo() makes. */
  watchInterrupts(listener: (vector: number) => void): void {
    this.interruptListener = listener;
    this.watchFds();
  }

  /**
   * Takes what the current eventfds hold now, as the watchers would on their next turn: counts it
   * and tells the listener. For a moment that must not wait for the event loop (a silence check).
   */
  takeInterrupts(): void {
    this.irqFds.forEach((fd, vector) => this.interrupted(fd, vector));
  }

  private async wireInterrupts(client: VfioUserClient): Promise<void> {
    const fds = Array.from({ length: this.vectors }, () => native.eventfd());
    await client.setIrqEventfds(PciIrq.MSIX, 0, fds);
    this.irqFds = fds;
    this.interruptCounts = fds.map(() => 0);
    if (this.interruptListener) this.watchFds();
  }

  private watchFds(): void {
    for (const watcher of this.watchers) watcher.close();
    this.watchers = this.irqFds.map((fd, vector) => native.watchFd(fd, () => this.interrupted(fd, vector)));
  }

  private interrupted(fd: number, vector: number): void {
    const count = Number(native.eventfdRead(fd));
    if (count === 0 || this.irqFds[vector] !== fd) return;
    this.interruptCounts[vector] = (this.interruptCounts[vector] ?? 0) + count;
    this.interruptListener?.(vector);
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
    if (this.needsMmio(qid, false, tail)) this.client.postRegionWrite(PciRegion.BAR0, Reg.DOORBELLS + 2 * qid * 4, u32(tail));
  }

  ringCqDoorbell(qid: number, head: number): void {
    if (this.needsMmio(qid, true, head)) this.client.postRegionWrite(PciRegion.BAR0, Reg.DOORBELLS + (2 * qid + 1) * 4, u32(head));
  }

  /**
   * Doorbell Buffer Config (shadow doorbells and EventIdx in two fresh pages of guest RAM). From
   * then on I/O queue doorbells go to the shadow page and through MMIO only when EventIdx asks.
   */
  async configureDoorbellBuffer(): Promise<Completion> {
    const buffer = { shadow: this.alloc(PAGE), eventIdx: this.alloc(PAGE) };
    const completion = await this.admin.run(AdminOpcode.DOORBELL_BUFFER_CONFIG, { prp1: buffer.shadow, prp2: buffer.eventIdx });
    if (completion.status === 0) this.doorbellBuffer = buffer;
    return completion;
  }

  /** A value in the doorbell buffer: the shadow doorbell we wrote, or the EventIdx the controller wrote. */
  doorbellBufferValue(page: 'shadow' | 'eventIdx', qid: number, completion: boolean): number {
    const buffer = this.doorbellBuffer;
    if (!buffer) throw new Error('no doorbell buffer');
    return this.view(buffer[page] + doorbellSlot(qid, completion), 4).getUint32(0, true);
  }

  /** Linux's nvme_dbbuf_update_and_check_event: the admin queue always rings, I/O queues store the shadow first. */
  private needsMmio(qid: number, completion: boolean, value: number): boolean {
    const buffer = this.doorbellBuffer;
    if (!buffer || qid === 0) return true;
    const shadow = this.view(buffer.shadow + doorbellSlot(qid, completion), 4);
    const old = shadow.getUint32(0, true);
    shadow.setUint32(0, value, true);
    const ring = needsEvent(this.doorbellBufferValue('eventIdx', qid, completion), value, old);
    if (ring) this.doorbellCounts.mmio++;
    else this.doorbellCounts.shadowOnly++;
    return ring;
  }

  private view(addr: number, length: number): DataView {
    const bytes = this.bytes(addr, length);
    return new DataView(bytes.buffer, bytes.byteOffset, length);
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

  /**
   * Creates I/O CQ+SQ pair `qid` (interrupt vector = qid % vectors); the CQ may be smaller than the
   * SQ. With `interrupts: false` the CQ has IEN clear and its completions are only seen by polling
   * it, as Linux's poll queues (nvme.poll_queues) do.
   */
  async createIoQueuePair(qid: number, size = 64, cqSize = size, { interrupts = true }: { interrupts?: boolean } = {}): Promise<HostQueue> {
    const cq = this.alloc(cqSize * CQE_SIZE);
    const sq = this.alloc(size * SQE_SIZE);
    const vector = interrupts ? qid % this.vectors : 0;
    const c1 = await this.admin.run(AdminOpcode.CREATE_IO_CQ, { prp1: cq, cdw10: ((cqSize - 1) << 16) | qid, cdw11: (vector << 16) | (interrupts ? 0x3 : 0x1) });
    if (c1.status !== 0) throw new Error(`create CQ ${qid}: status 0x${c1.status.toString(16)}`);
    const c2 = await this.admin.run(AdminOpcode.CREATE_IO_SQ, { prp1: sq, cdw10: ((size - 1) << 16) | qid, cdw11: (qid << 16) | 0x1 });
    if (c2.status !== 0) throw new Error(`create SQ ${qid}: status 0x${c2.status.toString(16)}`);
    return new HostQueue(this, qid, sq, cq, size, cqSize);
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
  createCq(qid: number, addr: number, size: number, vector = qid % this.vectors): Promise<Completion> {
    return this.admin.run(AdminOpcode.CREATE_IO_CQ, { prp1: addr, cdw10: ((size - 1) << 16) | qid, cdw11: (vector << 16) | 0x3 });
  }

  /** Create I/O Submission Queue with any base address; returns the completion. */
  createSq(qid: number, addr: number, size: number, cqid = qid): Promise<Completion> {
    return this.admin.run(AdminOpcode.CREATE_IO_SQ, { prp1: addr, cdw10: ((size - 1) << 16) | qid, cdw11: (cqid << 16) | 0x1 });
  }

  close(): void {
    for (const watcher of this.watchers) watcher.close();
    this.client.close();
    for (const fd of this.irqFds) native.closeFd(fd);
    for (const memory of this.memories) memory.close();
  }
}

/**
 * A negotiated client of the server on `socketPath`. A server still saying goodbye to the previous
 * client refuses the next one (one client per socket): try again, for a bounded time.
 */
export async function connectClient(socketPath: string, timeoutMs = 5000): Promise<VfioUserClient> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const client = VfioUserClient.connect(socketPath);
    const closed = new Promise<'closed'>((resolve) => client.onClose(() => resolve('closed')));
    const outcome = await Promise.race([client.negotiate().then(() => 'ok' as const, () => 'closed' as const), closed]);
    if (outcome === 'ok') return client;
    client.close();
    if (Date.now() > deadline) throw new Error(`${socketPath} keeps refusing clients`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

const u32 = (value: number): Uint8Array => {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, value >>> 0, true);
  return out;
};
