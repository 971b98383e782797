// A vfio-user client in TypeScript: the same protocol QEMU speaks, over a real socket. Tests use it
// to drive the server like a VMM would (including a hostile one), and tools use it to reach a
// device without QEMU. It can hand memfd-backed "guest RAM" to the server and answers the
// server's DMA_READ/DMA_WRITE for ranges mapped without an fd.

import * as codec from './codec.js';
import { native, type Connection } from '../native.js';
import { MessageFramer } from './framer.js';
import {
  dirtyBitmapBytes,
  Command,
  commandName,
  DmaMapFlags,
  DmaUnmapFlags,
  Errno,
  errnoName,
  Feature,
  FeatureFlags,
  HeaderFlags,
  Limits,
  NO_DATA_FD,
  PayloadSize,
  PciRegion,
  RegionFlags,
  SetIrqsFlags,
} from './protocol.js';

export class VfioClientError extends Error {
  constructor(
    readonly command: number,
    readonly errno: number,
  ) {
    super(`${commandName(command)} failed: ${errnoName(errno)}`);
    this.name = 'VfioClientError';
  }
}

export interface RegionInfoReply {
  argsz: number;
  flags: number;
  index: number;
  size: number;
  offset: bigint;
  sparseAreas: codec.SparseArea[];
  fd: number | undefined;
}

/** Guest RAM the client owns: a memfd mapped here and (optionally) handed to the server. */
export class GuestMemory {
  readonly fd: number;
  readonly bytes: Uint8Array;
  private readonly buffer: ArrayBuffer;

  constructor(
    readonly iova: number,
    readonly size: number,
  ) {
    this.fd = native.memfdCreate('guest-ram', size);
    this.buffer = native.mmap(this.fd, 0n, size, true);
    this.bytes = new Uint8Array(this.buffer);
  }

  contains(addr: number, length: number): boolean {
    return addr >= this.iova && addr + length <= this.iova + this.size;
  }

  slice(addr: number, length: number): Uint8Array {
    return this.bytes.subarray(addr - this.iova, addr - this.iova + length);
  }

  close(): void {
    native.munmap(this.buffer);
    native.closeFd(this.fd);
  }
}

interface Waiter {
  resolve(message: codec.Message): void;
  reject(error: Error): void;
}

export class VfioUserClient {
  private readonly framer = new MessageFramer(Limits.maxMessageSize);
  private readonly waiters = new Map<number, Waiter>();
  private nextId = 1;
  private closed = false;
  private closeReason: string | null = null;
  private readonly closeListeners: ((reason: string) => void)[] = [];
  /**
   * Memory mapped for the server, with or without fd: the server may send DMA_READ/DMA_WRITE for
   * any of it (without fd it must; with one it does while routing writes through its client).
   */
  private readonly mappedMemory: GuestMemory[] = [];
  /** Counts server→client DMA requests, so tests can see which path DMA took. */
  dmaRequests = { read: 0, write: 0 };
  /** Each DMA_WRITE the server sent, in order: what a VMM would mark dirty. */
  readonly dmaWrites: { address: number; count: number }[] = [];
  /** While set, the server's DMA requests wait unanswered (a slow VMM): see releaseServerRequests(). */
  holdServerRequests = false;
  private readonly heldRequests: codec.Message[] = [];

  private constructor(private readonly connection: Connection) {
    connection.start(
      (data, fds) => this.receive(data, fds),
      (code) => this.shutdown(code ?? 'EOF'),
    );
  }

  static connect(path: string): VfioUserClient {
    return new VfioUserClient(native.connect(path));
  }

  get isClosed(): boolean {
    return this.closed;
  }

  onClose(listener: (reason: string) => void): void {
    if (this.closed) listener(this.closeReason ?? 'closed');
    else this.closeListeners.push(listener);
  }

  close(): void {
    this.connection.close();
    this.shutdown('closed by client');
  }

  // ---- raw access (for malformed-input tests) -----------------------------------------------------

  sendRaw(bytes: Uint8Array, fds: readonly number[] = []): void {
    this.connection.send(bytes, fds);
  }

  /** Sends a command and waits for its reply; rejects with VfioClientError on an error reply. */
  request(command: number, payload: Uint8Array = new Uint8Array(0), fds: readonly number[] = []): Promise<codec.Message> {
    const id = this.allocateId();
    const reply = this.waitFor(id, command);
    // Closed: the reply is already a rejection, and the socket would throw EBADF on top of it.
    if (this.closed) return reply;
    this.connection.send(codec.encodeMessage({ id, command, flags: HeaderFlags.TYPE_COMMAND, error: 0 }, payload), fds);
    return reply;
  }

  /** Sends a command with NO_REPLY, as QEMU posts BAR writes. */
  post(command: number, payload: Uint8Array): void {
    const id = this.allocateId();
    this.connection.send(codec.encodeMessage({ id, command, flags: HeaderFlags.TYPE_COMMAND | HeaderFlags.NO_REPLY, error: 0 }, payload));
  }

  /** Waits for a reply to a message id the caller sent with sendRaw. */
  waitFor(id: number, command: number): Promise<codec.Message> {
    if (this.closed) return Promise.reject(new Error(`connection closed (${this.closeReason})`));
    return new Promise((resolve, reject) => {
      this.waiters.set(id, {
        resolve: (message) => {
          if (message.header.flags & HeaderFlags.ERROR) reject(new VfioClientError(command, message.header.error));
          else resolve(message);
        },
        reject,
      });
    });
  }

  allocateId(): number {
    const id = this.nextId;
    this.nextId = (this.nextId + 1) & 0xffff;
    return id;
  }

  // ---- typed commands ----------------------------------------------------------------------------

  async negotiate(capabilities: Record<string, unknown> = defaultCapabilities()): Promise<Record<string, unknown>> {
    const json = JSON.stringify({ capabilities });
    const reply = await this.request(Command.VERSION, codec.version.encode({ major: 0, minor: 0, json }));
    const version = codec.version.decode(reply.payload);
    if (version.major !== 0 || version.minor !== 0) throw new Error(`server speaks ${version.major}.${version.minor}`);
    return (JSON.parse(version.json) as { capabilities: Record<string, unknown> }).capabilities;
  }

  /** Maps `memory` for the server; with `viaMessages` no fd is sent and DMA comes back as messages. */
  async dmaMap(memory: GuestMemory, options: { viaMessages?: boolean; readOnly?: boolean } = {}): Promise<void> {
    const flags = DmaMapFlags.READ | (options.readOnly ? 0 : DmaMapFlags.WRITE);
    const payload = codec.dmaMap.encode({ argsz: PayloadSize.DMA_MAP, flags, offset: 0n, iova: BigInt(memory.iova), size: BigInt(memory.size) });
    await this.request(Command.DMA_MAP, payload, options.viaMessages ? [] : [memory.fd]);
    this.mappedMemory.push(memory);
  }

  async dmaUnmap(iova: number, size: number): Promise<void> {
    await this.request(Command.DMA_UNMAP, codec.dmaUnmap.encode({ argsz: PayloadSize.DMA_UNMAP, flags: 0, iova: BigInt(iova), size: BigInt(size) }));
    const index = this.mappedMemory.findIndex((m) => m.iova === iova && m.size === size);
    if (index >= 0) this.mappedMemory.splice(index, 1);
  }

  async dmaUnmapAll(): Promise<void> {
    await this.request(Command.DMA_UNMAP, codec.dmaUnmap.encode({ argsz: PayloadSize.DMA_UNMAP, flags: DmaUnmapFlags.ALL, iova: 0n, size: 0n }));
    this.mappedMemory.length = 0;
  }

  async deviceInfo(): Promise<{ flags: number; numRegions: number; numIrqs: number }> {
    const reply = await this.request(Command.DEVICE_GET_INFO, codec.deviceInfo.encode({ argsz: PayloadSize.DEVICE_INFO, flags: 0, numRegions: 0, numIrqs: 0 }));
    const { flags, numRegions, numIrqs } = codec.deviceInfo.decode(reply.payload);
    return { flags, numRegions, numIrqs };
  }

  /** Asks like QEMU does: first with room for the bare struct, again with the argsz the server needs. */
  async regionInfo(index: number, argsz: number = PayloadSize.REGION_INFO): Promise<RegionInfoReply> {
    const reply = await this.request(
      Command.DEVICE_GET_REGION_INFO,
      codec.regionInfo.encode({ argsz, flags: 0, index, capOffset: 0, size: 0n, offset: 0n }),
    );
    const info = codec.regionInfo.decode(reply.payload);
    if (info.argsz > argsz) {
      for (const fd of reply.fds) native.closeFd(fd);
      return this.regionInfo(index, info.argsz);
    }
    const sparseAreas = info.flags & RegionFlags.CAPS && info.capOffset >= PayloadSize.REGION_INFO
      ? codec.decodeSparseMmapCap(reply.payload.subarray(info.capOffset))
      : [];
    return { argsz: info.argsz, flags: info.flags, index: info.index, size: Number(info.size), offset: info.offset, sparseAreas, fd: reply.fds[0] };
  }

  async irqInfo(index: number): Promise<{ flags: number; count: number }> {
    const reply = await this.request(Command.DEVICE_GET_IRQ_INFO, codec.irqInfo.encode({ argsz: PayloadSize.IRQ_INFO, flags: 0, index, count: 0 }));
    const { flags, count } = codec.irqInfo.decode(reply.payload);
    return { flags, count };
  }

  /** Wires `fds` as the eventfds of vectors start.. of `index` (no fds: de-assign `count` vectors). */
  async setIrqEventfds(index: number, start: number, fds: number[], count = fds.length): Promise<void> {
    await this.request(
      Command.DEVICE_SET_IRQS,
      codec.setIrqs.encode({ argsz: PayloadSize.SET_IRQS, flags: SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER, index, start, count }),
      fds,
    );
  }

  async disableIrqs(index: number): Promise<void> {
    await this.request(
      Command.DEVICE_SET_IRQS,
      codec.setIrqs.encode({ argsz: PayloadSize.SET_IRQS, flags: SetIrqsFlags.DATA_NONE | SetIrqsFlags.ACTION_TRIGGER, index, start: 0, count: 0 }),
    );
  }

  async regionRead(region: number, offset: number, count: number): Promise<Uint8Array> {
    const reply = await this.request(Command.REGION_READ, codec.regionAccess.encode({ offset: BigInt(offset), region, count }));
    const decoded = codec.regionAccess.decode(reply.payload);
    if (decoded.count !== count || decoded.tail.length !== count) throw new Error(`REGION_READ returned ${decoded.tail.length} of ${count} bytes`);
    return decoded.tail;
  }

  async regionWrite(region: number, offset: number, data: Uint8Array): Promise<void> {
    await this.request(Command.REGION_WRITE, codec.regionAccess.encode({ offset: BigInt(offset), region, count: data.length }, data));
  }

  postRegionWrite(region: number, offset: number, data: Uint8Array): void {
    this.post(Command.REGION_WRITE, codec.regionAccess.encode({ offset: BigInt(offset), region, count: data.length }, data));
  }

  configRead(offset: number, count: number): Promise<Uint8Array> {
    return this.regionRead(PciRegion.CONFIG, offset, count);
  }

  configWrite(offset: number, data: Uint8Array): Promise<void> {
    return this.regionWrite(PciRegion.CONFIG, offset, data);
  }

  async read32(region: number, offset: number): Promise<number> {
    const bytes = await this.regionRead(region, offset, 4);
    return new DataView(bytes.buffer, bytes.byteOffset).getUint32(0, true);
  }

  async write32(region: number, offset: number, value: number): Promise<void> {
    const bytes = new Uint8Array(4);
    new DataView(bytes.buffer).setUint32(0, value >>> 0, true);
    await this.regionWrite(region, offset, bytes);
  }

  async read64(region: number, offset: number): Promise<bigint> {
    const bytes = await this.regionRead(region, offset, 8);
    return new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true);
  }

  async write64(region: number, offset: number, value: bigint): Promise<void> {
    const bytes = new Uint8Array(8);
    new DataView(bytes.buffer).setBigUint64(0, value, true);
    await this.regionWrite(region, offset, bytes);
  }

  async reset(): Promise<void> {
    await this.request(Command.DEVICE_RESET);
  }

  async writeMulti(entries: codec.WriteMultiEntry[]): Promise<number> {
    const reply = await this.request(Command.REGION_WRITE_MULTI, codec.writeMulti.encode(entries));
    return Number(codec.writeMultiCount.decode(reply.payload).wrCnt);
  }

  // ---- migration v2 (DEVICE_FEATURE, MIG_DATA_*) -------------------------------------------------

  /** One DEVICE_FEATURE round trip; `argsz` defaults to room for the header and `replyRoom` data bytes. */
  async deviceFeature(flags: number, data: Uint8Array = new Uint8Array(0), replyRoom = data.length, argsz = PayloadSize.DEVICE_FEATURE + replyRoom): Promise<{ argsz: number; flags: number; data: Uint8Array }> {
    const reply = await this.request(Command.DEVICE_FEATURE, codec.deviceFeature.encode({ argsz, flags }, data));
    const decoded = codec.deviceFeature.decode(reply.payload, 'DEVICE_FEATURE reply');
    return { argsz: decoded.argsz, flags: decoded.flags, data: decoded.tail };
  }

  /** Resolves if the server has `feature` with every operation in `ops` (FeatureFlags.GET/SET). */
  async probeFeature(feature: number, ops = 0): Promise<void> {
    await this.deviceFeature(feature | ops | FeatureFlags.PROBE);
  }

  /** The MIGRATION feature's flags (MigrationFlags). */
  async migrationFlags(): Promise<bigint> {
    const reply = await this.deviceFeature(Feature.MIGRATION | FeatureFlags.GET, new Uint8Array(0), PayloadSize.FEATURE_MIGRATION);
    return codec.featureMigration.decode(reply.data, 'MIGRATION').flags;
  }

  async migrationState(): Promise<number> {
    const reply = await this.deviceFeature(Feature.MIG_DEVICE_STATE | FeatureFlags.GET, new Uint8Array(0), PayloadSize.FEATURE_MIG_STATE);
    return codec.featureMigState.decode(reply.data, 'MIG_DEVICE_STATE').deviceState;
  }

  /** Resolves once the server reached `state` (MigrationState). */
  async setMigrationState(state: number): Promise<void> {
    await this.deviceFeature(Feature.MIG_DEVICE_STATE | FeatureFlags.SET, codec.featureMigState.encode({ deviceState: state, dataFd: NO_DATA_FD }));
  }

  /** One MIG_DATA_READ: at most `size` bytes; fewer means the stream has no more (for now). */
  async readMigrationData(size: number, argsz = PayloadSize.MIG_DATA + size): Promise<Uint8Array> {
    const reply = await this.request(Command.MIG_DATA_READ, codec.migData.encode({ argsz, size }));
    const decoded = codec.migData.decode(reply.payload, 'MIG_DATA_READ reply');
    if (decoded.size > size || decoded.tail.length !== decoded.size) throw new Error(`MIG_DATA_READ returned ${decoded.tail.length} bytes, size ${decoded.size}, of ${size} asked`);
    return decoded.tail;
  }

  /** Reads in `chunkSize` pieces until a short one: the whole stream (STOP_COPY), or what there is now (PRE_COPY). */
  async readMigrationStream(chunkSize = 64 << 10): Promise<{ data: Uint8Array; reads: number }> {
    const chunks: Uint8Array[] = [];
    for (let reads = 1; ; reads++) {
      const chunk = await this.readMigrationData(chunkSize);
      chunks.push(chunk);
      if (chunk.length < chunkSize) return { data: Buffer.concat(chunks), reads };
    }
  }

  async writeMigrationData(data: Uint8Array): Promise<void> {
    await this.request(Command.MIG_DATA_WRITE, codec.migData.encode({ argsz: PayloadSize.MIG_DATA + data.length, size: data.length }, data));
  }

  /** Sends `data` in `chunkSize` pieces; returns how many messages it took. */
  async writeMigrationStream(data: Uint8Array, chunkSize = 64 << 10): Promise<number> {
    let writes = 0;
    for (let at = 0; at < data.length; at += chunkSize, writes++) await this.writeMigrationData(data.subarray(at, at + chunkSize));
    return writes;
  }

  /** DMA_LOGGING_START over `ranges` (none: all memory); resolves to the page size the server chose. */
  async startDmaLogging(pageSize: number, ranges: { iova: number; length: number }[] = []): Promise<number> {
    const data = codec.dmaLogging.encode({ pageSize: BigInt(pageSize), ranges: ranges.map((r) => ({ iova: BigInt(r.iova), length: BigInt(r.length) })) });
    const reply = await this.deviceFeature(Feature.DMA_LOGGING_START | FeatureFlags.SET, data);
    return Number(codec.dmaLogging.decode(reply.data).pageSize);
  }

  async stopDmaLogging(): Promise<void> {
    await this.deviceFeature(Feature.DMA_LOGGING_STOP | FeatureFlags.SET);
  }

  /** DMA_LOGGING_REPORT: the bitmap of [iova, iova+length) at `pageSize` (bit i = page iova + i·pageSize). */
  async dmaLoggingReport(iova: number, length: number, pageSize: number): Promise<Uint8Array> {
    const request = codec.dmaLoggingReport.encode({ iova: BigInt(iova), length: BigInt(length), pageSize: BigInt(pageSize) });
    const reply = await this.deviceFeature(Feature.DMA_LOGGING_REPORT | FeatureFlags.GET, request, PayloadSize.DMA_LOGGING_REPORT + dirtyBitmapBytes(length, pageSize));
    return reply.data.subarray(PayloadSize.DMA_LOGGING_REPORT);
  }

  /** The addresses of the dirty pages DMA_LOGGING_REPORT gives for [iova, iova+length). */
  async dirtyPages(iova: number, length: number, pageSize: number): Promise<number[]> {
    const bitmap = await this.dmaLoggingReport(iova, length, pageSize);
    const pages: number[] = [];
    for (let bit = 0; bit < bitmap.length * 8; bit++) if (bitmap[bit >> 3]! & (1 << (bit & 7))) pages.push(iova + bit * pageSize);
    return pages;
  }

  // ---- incoming ----------------------------------------------------------------------------------

  private receive(data: Uint8Array, fds: number[]): void {
    const { messages, error } = this.framer.push(data, fds);
    for (const message of messages) {
      if (codec.isReply(message.header.flags)) {
        const waiter = this.waiters.get(message.header.id);
        if (waiter) {
          this.waiters.delete(message.header.id);
          waiter.resolve(message);
        } else {
          for (const fd of message.fds) native.closeFd(fd);
        }
      } else {
        for (const fd of message.fds) native.closeFd(fd);
        if (this.holdServerRequests) this.heldRequests.push(message);
        else this.serveServerRequest(message);
      }
    }
    if (error) {
      this.connection.close();
      this.shutdown(`bad stream from server: ${error.message}`);
    }
  }

  get heldServerRequests(): number {
    return this.heldRequests.length;
  }

  /** Answers the requests held so far, in order, and stops holding. */
  releaseServerRequests(): void {
    this.holdServerRequests = false;
    for (const message of this.heldRequests.splice(0)) this.serveServerRequest(message);
  }

  /** Answers DMA_READ/DMA_WRITE with QEMU 11.1.3's framing (u64 count, data after it). */
  private serveServerRequest(message: codec.Message): void {
    const { header } = message;
    const replyHeader = { id: header.id, command: header.command, flags: HeaderFlags.TYPE_REPLY, error: 0 };
    const fail = (errno: number): void =>
      this.connection.send(codec.encodeMessage({ ...replyHeader, flags: HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR, error: errno }));
    try {
      const request = codec.dmaAccess.decode(message.payload);
      const addr = Number(request.address);
      const count = Number(request.count);
      const memory = this.mappedMemory.find((m) => m.contains(addr, count));
      if (!memory) return fail(Errno.EFAULT);
      if (header.command === Command.DMA_READ) {
        this.dmaRequests.read++;
        this.connection.send(codec.encodeMessage(replyHeader, codec.dmaAccess.encode(request, memory.slice(addr, count))));
      } else if (header.command === Command.DMA_WRITE) {
        this.dmaRequests.write++;
        if (request.tail.length !== count) return fail(Errno.EINVAL);
        this.dmaWrites.push({ address: addr, count });
        memory.slice(addr, count).set(request.tail);
        this.connection.send(codec.encodeMessage(replyHeader, codec.dmaAccess.encode(request)));
      } else {
        fail(Errno.ENOSYS);
      }
    } catch {
      fail(Errno.EINVAL);
    }
  }

  private shutdown(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.closeReason = reason;
    for (const fd of this.framer.drainFds()) native.closeFd(fd);
    for (const [, waiter] of this.waiters) waiter.reject(new Error(`connection closed (${reason})`));
    this.waiters.clear();
    for (const listener of this.closeListeners) listener(reason);
  }
}

export function defaultCapabilities(): Record<string, unknown> {
  // What QEMU 11.1.3 proposes (qemu-11-facts.md §2).
  return {
    max_msg_fds: 16,
    max_data_xfer_size: 1048576,
    pgsizes: 4096,
    max_dma_maps: 65535,
    migration: { pgsize: 4096, max_bitmap_size: 268435456 },
    write_multiple: true,
  };
}
