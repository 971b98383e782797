// One client connection: frames messages, answers commands in arrival order, and issues the
// server→client DMA_READ/DMA_WRITE requests for guest memory the client gave us no fd for.
// Behaviour per shared/reference/vfio-user-protocol.md and qemu-11-facts.md §2.

import * as codec from './codec.js';
import { DecodeError } from './codec.js';
import { DmaError, VfioError, type DeviceContext, type VfioDevice } from './device.js';
import { DmaTable } from './dma.js';
import { MessageFramer } from './framer.js';
import { IrqTable } from './irqs.js';
import type { MigrationController } from './migration.js';
import { MigrationCommands } from './migration-commands.js';
import type { Logger } from '../log.js';
import {
  Command,
  commandName,
  DeviceFlags,
  DmaMapFlags,
  DmaUnmapFlags,
  Errno,
  errnoName,
  HEADER_SIZE,
  HeaderFlags,
  Limits,
  PayloadSize,
  PROTOCOL_MAJOR,
  PROTOCOL_MINOR,
  RegionFlags,
  SetIrqsFlags,
} from './protocol.js';
import type { NativeEventFds, NativeMemory, Transport } from './transport.js';

export interface SessionOptions {
  device: VfioDevice;
  transport: Transport;
  native: NativeMemory & NativeEventFds;
  log: Logger;
  /** Offer REGION_WRITE_MULTI to clients that support it. */
  writeMultiple?: boolean;
  /** How long a server→client request may wait for its reply. */
  requestTimeoutMs?: number;
  /** The device's migration state machine (null: the device does not migrate); it outlives connections. */
  migration: MigrationController | null;
}

interface Reply {
  payload?: Uint8Array;
  fds?: number[];
}

interface ClientCaps {
  maxDataTransfer: number;
  maxFds: number;
  writeMultiple: boolean;
}

interface PendingRequest {
  resolve(message: codec.Message): void;
  reject(error: Error): void;
  timer: NodeJS.Timeout;
}

/** Commands that may legitimately carry fds (all others get theirs closed and an error). */
const FD_CARRYING = new Set<number>([Command.DMA_MAP, Command.DEVICE_SET_IRQS]);

export class Session {
  readonly dma: DmaTable;
  /** What went through messages because no mapping (or write-through) allowed a direct access. */
  readonly counters = { dmaWriteBytes: 0 };
  readonly irqs: IrqTable;
  private readonly framer = new MessageFramer(Limits.maxMessageSize, Limits.maxMessageFds);
  private negotiated: ClientCaps | null = null;
  private closed = false;
  private nextRequestId = 0;
  private readonly pending = new Map<number, PendingRequest>();
  /** Commands that arrived while an earlier one still waits to reply (replies are never held). */
  private backlog: codec.Message[] = [];
  private waitingForReply = false;
  private readonly device: VfioDevice;
  private readonly log: Logger;
  /** Region sizes never change for a device: looked up once, not on every MMIO access. */
  private readonly regionSizes: number[];
  private readonly migration: MigrationController | null;
  private readonly migrationCommands: MigrationCommands;

  constructor(private readonly options: SessionOptions) {
    this.device = options.device;
    this.log = options.log;
    this.regionSizes = Array.from({ length: this.device.deviceInfo().numRegions }, (_, i) => this.device.regionInfo(i).size);
    this.dma = new DmaTable(options.native, Limits.maxDmaMaps, {
      read: (addr, length) => this.clientRead(addr, length),
      write: (addr, data) => this.clientWrite(addr, data),
    });
    this.irqs = new IrqTable(options.native, (index) => this.device.irqInfo(index), this.device.deviceInfo().numIrqs);
    this.migration = options.migration;
    this.migrationCommands = new MigrationCommands({ migration: this.migration, dma: this.dma, maxDataTransfer: () => this.chunkSize() });
    const context: DeviceContext = { dma: this.dma, irqs: this.irqs };
    this.device.attach(context);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Feeds bytes read from the socket. Returns false once the session has ended. */
  receive(chunk: Uint8Array, fds: number[]): boolean {
    if (this.closed) {
      this.closeFds(fds);
      return false;
    }
    const { messages, error } = this.framer.push(chunk, fds);
    for (const message of messages) {
      if (this.closed) {
        this.closeFds(message.fds);
        continue;
      }
      // Commands run strictly in order, so they wait behind one that has not replied yet; replies
      // to our own DMA requests never wait (the pending command may depend on them).
      if (this.waitingForReply && !codec.isReply(message.header.flags)) this.backlog.push(message);
      else this.dispatch(message);
    }
    if (error && !this.closed) {
      // A bad length field leaves no way to find the next message boundary.
      this.log.warn(`client stream unusable: ${error.message}; disconnecting`);
      this.end();
    }
    return !this.closed;
  }

  /** Client gone (or we hung up): release everything the client gave us; the device keeps its state. */
  end(): void {
    if (this.closed) return;
    this.closed = true;
    this.options.transport.close();
    for (const [, request] of this.pending) {
      clearTimeout(request.timer);
      request.reject(new Error('client disconnected'));
    }
    this.pending.clear();
    for (const message of this.backlog) this.closeFds(message.fds);
    this.backlog = [];
    this.device.detach();
    this.migrationCommands.end();
    void this.migration?.clientGone();
    this.dma.setRemote(null);
    this.dma.unmapAll();
    this.irqs.disableAll();
    this.closeFds(this.framer.drainFds());
  }

  // ---- incoming ---------------------------------------------------------------------------------

  private dispatch(message: codec.Message): void {
    const { header } = message;
    const type = header.flags & HeaderFlags.TYPE_MASK;
    if (type === HeaderFlags.TYPE_REPLY) {
      this.closeFds(message.fds);
      this.completeRequest(message);
      return;
    }
    const noReply = (header.flags & HeaderFlags.NO_REPLY) !== 0;
    if (type !== HeaderFlags.TYPE_COMMAND) {
      this.closeFds(message.fds);
      this.fail(header, noReply, new VfioError(Errno.EINVAL, `message type ${type} is neither command nor reply`));
      return;
    }
    if (message.fds.length > 0 && !FD_CARRYING.has(header.command)) {
      this.closeFds(message.fds);
      this.fail(header, noReply, new VfioError(Errno.EINVAL, `${commandName(header.command)} carries ${message.fds.length} unexpected fds`));
      return;
    }
    try {
      if (header.command !== Command.VERSION && !this.negotiated) {
        throw new VfioError(Errno.EINVAL, `${commandName(header.command)} before VERSION`);
      }
      const reply = this.execute(message, noReply);
      if (reply instanceof Promise) {
        this.waitingForReply = true;
        reply.then(
          (settled) => {
            if (!noReply) this.sendReply(header, settled.payload, settled.fds);
          },
          (error: unknown) => this.fail(header, noReply, error),
        ).finally(() => {
          this.waitingForReply = false;
          this.drainBacklog();
        });
        return;
      }
      if (!noReply) this.sendReply(header, reply.payload, reply.fds);
    } catch (error) {
      this.closeFds(message.fds);
      this.fail(header, noReply, error);
    }
  }

  private drainBacklog(): void {
    while (!this.closed && !this.waitingForReply && this.backlog.length > 0) this.dispatch(this.backlog.shift()!);
  }

  private fail(header: codec.HeaderFields, noReply: boolean, error: unknown): void {
    const errno = toErrno(error);
    const what = `${commandName(header.command)} #${header.id}`;
    if (errno === null) {
      // A bug of ours, not bad input: say so loudly, answer EIO, and keep serving.
      this.log.error(`${what} failed: ${(error as Error)?.stack ?? String(error)}`);
    } else {
      this.log.debug(`${what} -> ${errnoName(errno)}: ${(error as Error).message}`);
    }
    if (noReply) return;
    this.send({ id: header.id, command: header.command, flags: HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR, error: errno ?? Errno.EIO });
  }

  /** Runs one command; fds in `message` become the handler's to keep or close. */
  private execute(message: codec.Message, noReply: boolean): Reply | Promise<Reply> {
    const { header, payload, fds } = message;
    switch (header.command) {
      case Command.VERSION:
        return { payload: this.negotiate(payload, header.size) };
      case Command.DMA_MAP:
        this.dmaMap(payload, fds);
        return {};
      case Command.DMA_UNMAP:
        return { payload: this.dmaUnmap(payload) };
      case Command.DEVICE_GET_INFO:
        return { payload: this.deviceInfo(payload) };
      case Command.DEVICE_GET_REGION_INFO:
        return this.regionInfo(payload);
      case Command.DEVICE_GET_REGION_IO_FDS:
        return { payload: this.regionIoFds(payload) };
      case Command.DEVICE_GET_IRQ_INFO:
        return { payload: this.irqInfo(payload) };
      case Command.DEVICE_SET_IRQS:
        this.setIrqs(payload, fds);
        return {};
      case Command.REGION_READ:
        return { payload: this.regionRead(payload) };
      case Command.REGION_WRITE:
        return { payload: this.regionWrite(payload, noReply) };
      case Command.DEVICE_RESET:
        expectEmpty(payload, 'DEVICE_RESET');
        return this.deviceReset();
      case Command.REGION_WRITE_MULTI:
        return { payload: this.regionWriteMulti(payload) };
      case Command.DEVICE_FEATURE: {
        const reply = this.migrationCommands.deviceFeature(payload);
        return reply instanceof Promise ? reply.then((p) => ({ payload: p })) : { payload: reply };
      }
      case Command.MIG_DATA_READ:
        return this.migrationCommands.migDataRead(payload).then((p) => ({ payload: p }));
      case Command.MIG_DATA_WRITE:
        return this.migrationCommands.migDataWrite(payload).then(() => ({}));
      case Command.DMA_READ:
      case Command.DMA_WRITE:
        throw new VfioError(Errno.EINVAL, `${commandName(header.command)} is a server-to-client request`);
      default:
        throw new VfioError(Errno.ENOSYS, `unknown command ${header.command}`);
    }
  }

  private deviceReset(): Reply | Promise<Reply> {
    this.device.reset();
    // I/O already reading into pinned guest memory cannot be called back: the reset is done
    // (and the guest may reuse that memory) only once it has finished.
    const unpinned = this.dma.whenUnpinned();
    if (!this.migration) return unpinned ? unpinned.then(() => ({})) : {};
    return (unpinned ?? Promise.resolve()).then(() => this.migration!.deviceReset()).then(() => ({}));
  }

  private negotiate(payload: Uint8Array, requestSize: number): Uint8Array {
    // Negotiation happens once per connection; a second VERSION must not change the parameters
    // that replies and DMA requests already in flight were sized by.
    if (this.negotiated) throw new VfioError(Errno.EINVAL, 'VERSION on a connection that already negotiated');
    const request = codec.version.decode(payload);
    if (request.major !== PROTOCOL_MAJOR) {
      throw new VfioError(Errno.ENOTSUP, `protocol ${request.major}.${request.minor} unsupported (server speaks ${PROTOCOL_MAJOR}.${PROTOCOL_MINOR})`);
    }
    const caps = parseClientCaps(request.json);
    const writeMultiple = caps.writeMultiple && this.options.writeMultiple === true;
    this.negotiated = { ...caps, writeMultiple };
    // QEMU reads the reply into a buffer the size of its own request: keep ours shorter.
    const offers: Record<string, unknown>[] = [
      {
        max_msg_fds: Limits.maxMessageFds,
        max_data_xfer_size: Limits.maxDataTransfer,
        pgsizes: 4096,
        max_dma_maps: Limits.maxDmaMaps,
        ...(writeMultiple ? { write_multiple: true } : {}),
      },
      { max_msg_fds: Limits.maxMessageFds, max_data_xfer_size: Limits.maxDataTransfer },
    ];
    const candidates = offers.map((c) => codec.version.encode({ major: PROTOCOL_MAJOR, minor: PROTOCOL_MINOR, json: JSON.stringify({ capabilities: c }) }));
    return candidates.find((c) => c.length + HEADER_SIZE <= requestSize) ?? candidates[candidates.length - 1]!;
  }

  private dmaMap(payload: Uint8Array, fds: number[]): void {
    const request = codec.dmaMap.decode(payload, 'DMA_MAP');
    if (request.argsz < PayloadSize.DMA_MAP) throw new VfioError(Errno.EINVAL, `DMA_MAP argsz ${request.argsz}`);
    if (fds.length > 1) throw new VfioError(Errno.EINVAL, `DMA_MAP with ${fds.length} fds`);
    const readable = (request.flags & DmaMapFlags.READ) !== 0;
    const writable = (request.flags & DmaMapFlags.WRITE) !== 0;
    if (!readable && !writable) throw new VfioError(Errno.EINVAL, 'DMA_MAP neither readable nor writable');
    if ((request.flags & ~(DmaMapFlags.READ | DmaMapFlags.WRITE)) !== 0) {
      throw new VfioError(Errno.EINVAL, `DMA_MAP flags 0x${request.flags.toString(16)}`);
    }
    const fd = fds[0];
    try {
      this.dma.map({ iova: request.iova, size: request.size, readable, writable, fd, fileOffset: request.offset });
    } catch (error) {
      if (error instanceof Error && 'code' in error && typeof error.code === 'string' && error.code in Errno) {
        throw new VfioError(Errno[error.code as keyof typeof Errno], error.message);
      }
      throw error;
    }
    // The mapping holds its own reference to the memory; the fd itself is no longer needed.
    if (fd !== undefined) this.options.native.closeFd(fd);
  }

  private dmaUnmap(payload: Uint8Array): Uint8Array {
    const request = codec.dmaUnmap.decode(payload, 'DMA_UNMAP');
    if (request.argsz < PayloadSize.DMA_UNMAP) throw new VfioError(Errno.EINVAL, `DMA_UNMAP argsz ${request.argsz}`);
    if (request.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) throw new VfioError(Errno.ENOTSUP, 'DMA_UNMAP dirty bitmap');
    if (request.flags & ~DmaUnmapFlags.ALL) throw new VfioError(Errno.EINVAL, `DMA_UNMAP flags 0x${request.flags.toString(16)}`);
    if (request.flags & DmaUnmapFlags.ALL) {
      if (request.iova !== 0n || request.size !== 0n) throw new VfioError(Errno.EINVAL, 'DMA_UNMAP ALL with a range');
      this.dma.unmapAll();
    } else {
      this.dma.unmap(request.iova, request.size);
    }
    return payload.subarray(0, PayloadSize.DMA_UNMAP);
  }

  private deviceInfo(payload: Uint8Array): Uint8Array {
    const { argsz } = codec.deviceInfo.decode(payload, 'DEVICE_GET_INFO');
    if (argsz < PayloadSize.DEVICE_INFO) throw new VfioError(Errno.EINVAL, `DEVICE_GET_INFO argsz ${argsz}`);
    const info = this.device.deviceInfo();
    return codec.deviceInfo.encode({ argsz: PayloadSize.DEVICE_INFO, flags: info.flags | DeviceFlags.PCI, numRegions: info.numRegions, numIrqs: info.numIrqs });
  }

  private regionInfo(payload: Uint8Array): { payload: Uint8Array; fds?: number[] } {
    const request = codec.regionInfo.decode(payload, 'DEVICE_GET_REGION_INFO');
    if (request.argsz < PayloadSize.REGION_INFO) throw new VfioError(Errno.EINVAL, `GET_REGION_INFO argsz ${request.argsz}`);
    this.checkRegionIndex(request.index);
    const info = this.device.regionInfo(request.index);
    const cap = info.mmap && info.mmap.areas.length > 0
      ? codec.encodeSparseMmapCap(info.mmap.areas.map((a) => ({ offset: BigInt(a.offset), size: BigInt(a.size) })))
      : new Uint8Array(0);
    const needed = PayloadSize.REGION_INFO + cap.length;
    let flags = info.flags | (info.mmap ? RegionFlags.MMAP : 0);
    const base = { index: request.index, size: BigInt(info.size), offset: BigInt(info.mmap?.fileOffset ?? 0) };
    if (request.argsz < needed) {
      // QEMU 11.1 fails realize if CAPS is set on a reply too short to hold them: clear it, state
      // the argsz we need, send no fd, and QEMU asks again with room (qemu-11-facts.md §2).
      flags &= ~(RegionFlags.CAPS | RegionFlags.MMAP);
      return { payload: codec.regionInfo.encode({ ...base, argsz: needed, flags, capOffset: 0 }) };
    }
    if (cap.length > 0) flags |= RegionFlags.CAPS;
    const reply = codec.regionInfo.encode({ ...base, argsz: needed, flags, capOffset: cap.length > 0 ? PayloadSize.REGION_INFO : 0 }, cap);
    return info.mmap ? { payload: reply, fds: [info.mmap.fd] } : { payload: reply };
  }

  private regionIoFds(payload: Uint8Array): Uint8Array {
    const request = codec.regionIoFds.decode(payload, 'DEVICE_GET_REGION_IO_FDS');
    if (request.argsz < PayloadSize.REGION_IO_FDS) throw new VfioError(Errno.EINVAL, `GET_REGION_IO_FDS argsz ${request.argsz}`);
    this.checkRegionIndex(request.index);
    // We offer no ioeventfds: every region is served by messages or shared memory.
    return codec.regionIoFds.encode({ argsz: PayloadSize.REGION_IO_FDS, flags: 0, index: request.index, count: 0 });
  }

  private irqInfo(payload: Uint8Array): Uint8Array {
    const request = codec.irqInfo.decode(payload, 'DEVICE_GET_IRQ_INFO');
    if (request.argsz < PayloadSize.IRQ_INFO) throw new VfioError(Errno.EINVAL, `GET_IRQ_INFO argsz ${request.argsz}`);
    if (request.index >= this.device.deviceInfo().numIrqs) throw new VfioError(Errno.EINVAL, `IRQ index ${request.index} out of range`);
    const info = this.device.irqInfo(request.index);
    return codec.irqInfo.encode({ argsz: PayloadSize.IRQ_INFO, flags: info.flags, index: request.index, count: info.count });
  }

  private setIrqs(payload: Uint8Array, fds: number[]): void {
    const request = codec.setIrqs.decode(payload, 'DEVICE_SET_IRQS');
    if (request.argsz < PayloadSize.SET_IRQS) throw new VfioError(Errno.EINVAL, `SET_IRQS argsz ${request.argsz}`);
    if (fds.length > Limits.maxMessageFds) throw new VfioError(Errno.EINVAL, `SET_IRQS with ${fds.length} fds`);
    this.irqs.apply({ ...request, data: request.tail, fds });
    const data = request.flags & SetIrqsFlags.DATA_MASK;
    const rewired = (request.flags & SetIrqsFlags.ACTION_TRIGGER) !== 0 && data !== SetIrqsFlags.DATA_BOOL;
    const unmasked = (request.flags & SetIrqsFlags.ACTION_UNMASK) !== 0 && data !== SetIrqsFlags.DATA_EVENTFD;
    if (rewired || unmasked) this.device.irqsChanged?.(request.index);
  }

  private regionRead(payload: Uint8Array): Uint8Array {
    const request = codec.regionAccess.decode(payload, 'REGION_READ');
    const offset = this.checkRegionAccess(request.region, request.offset, request.count);
    if (request.tail.length !== 0) throw new VfioError(Errno.EINVAL, 'REGION_READ carries data');
    const data = this.device.regionRead(request.region, offset, request.count);
    if (data.length !== request.count) throw new Error(`device returned ${data.length} bytes for a ${request.count}-byte read`);
    return codec.regionAccess.encode({ offset: request.offset, region: request.region, count: request.count }, data);
  }

  /** Posted (NO_REPLY) writes are the doorbell hot path: no reply is built for them. */
  private regionWrite(payload: Uint8Array, noReply: boolean): Uint8Array | undefined {
    const request = codec.regionAccess.decode(payload, 'REGION_WRITE');
    const offset = this.checkRegionAccess(request.region, request.offset, request.count);
    if (request.tail.length !== request.count) {
      throw new VfioError(Errno.EINVAL, `REGION_WRITE count ${request.count} but ${request.tail.length} data bytes`);
    }
    this.device.regionWrite(request.region, offset, request.tail);
    return noReply ? undefined : codec.regionAccess.encode({ offset: request.offset, region: request.region, count: request.count });
  }

  private regionWriteMulti(payload: Uint8Array): Uint8Array {
    const entries = codec.writeMulti.decode(payload);
    for (const entry of entries) this.checkRegionAccess(entry.region, entry.offset, entry.count);
    for (const entry of entries) this.device.regionWrite(entry.region, Number(entry.offset), entry.data);
    return codec.writeMultiCount.encode({ wrCnt: BigInt(entries.length) });
  }

  private checkRegionIndex(index: number): void {
    if (index >= this.regionSizes.length) throw new VfioError(Errno.EINVAL, `region ${index} out of range`);
  }

  private checkRegionAccess(region: number, offset: bigint, count: number): number {
    this.checkRegionIndex(region);
    if (count === 0 || count > Limits.maxDataTransfer) throw new VfioError(Errno.EINVAL, `region access of ${count} bytes`);
    const size = this.regionSizes[region]!;
    // Region sizes are far below 2^53: compare as numbers unless the offset is huge.
    if (offset > BigInt(size) || Number(offset) + count > size) {
      throw new VfioError(Errno.EINVAL, `region ${region} access 0x${offset.toString(16)}+${count} past its size 0x${size.toString(16)}`);
    }
    return Number(offset);
  }

  // ---- outgoing ---------------------------------------------------------------------------------

  private sendReply(request: codec.HeaderFields, payload: Uint8Array | undefined, fds: number[] | undefined): void {
    this.send({ id: request.id, command: request.command, flags: HeaderFlags.TYPE_REPLY, error: 0 }, payload, fds);
  }

  private send(header: Omit<codec.HeaderFields, 'size'>, payload?: Uint8Array, fds?: readonly number[]): void {
    if (this.closed) return;
    this.options.transport.send(codec.encodeMessage(header, payload), fds);
    // A client that sends requests but never reads the replies would grow our queue without end.
    if (this.options.transport.pendingWriteBytes() > Limits.maxQueuedReplyBytes) {
      this.log.warn(`client is not reading its replies (${this.options.transport.pendingWriteBytes()} bytes queued); disconnecting`);
      this.end();
    }
  }

  private request(command: number, payload: Uint8Array): Promise<codec.Message> {
    if (this.closed) return Promise.reject(new Error('client disconnected'));
    const id = this.nextRequestId;
    this.nextRequestId = (this.nextRequestId + 1) & 0xffff;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`${commandName(command)} #${id}: no reply from the client`));
      }, this.options.requestTimeoutMs ?? 10_000);
      this.pending.set(id, { resolve, reject, timer });
      this.send({ id, command, flags: HeaderFlags.TYPE_COMMAND, error: 0 }, payload);
    });
  }

  private completeRequest(reply: codec.Message): void {
    const pending = this.pending.get(reply.header.id);
    if (!pending) {
      this.log.debug(`reply #${reply.header.id} (${commandName(reply.header.command)}) matches no request`);
      return;
    }
    this.pending.delete(reply.header.id);
    clearTimeout(pending.timer);
    if (reply.header.flags & HeaderFlags.ERROR) {
      pending.reject(new Error(`refused by the client: ${errnoName(reply.header.error)}`));
    } else {
      pending.resolve(reply);
    }
  }

  private chunkSize(): number {
    return Math.min(this.negotiated?.maxDataTransfer ?? Limits.maxDataTransfer, Limits.maxDataTransfer);
  }

  /**
   * Reads the client's physical address space through DMA_READ messages, mapped or not: guest RAM,
   * and also the function's own BARs as the VMM emulates them (QEMU routes such accesses to its
   * MSI-X table emulation, which a migration replays this way).
   */
  async clientRead(addr: number, length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length);
    for (let done = 0; done < length; ) {
      const count = Math.min(this.chunkSize(), length - done);
      const reply = await this.dmaRequest(Command.DMA_READ, addr + done, count, codec.dmaAccess.encode({ address: BigInt(addr + done), count: BigInt(count) }));
      const tail = reply.payload.subarray(PayloadSize.DMA_ACCESS);
      if (tail.length < count) throw new DmaError(addr + done, count, `short DMA_READ reply (${tail.length} bytes)`);
      out.set(tail.subarray(0, count), done);
      done += count;
    }
    return out;
  }

  /** Writes the client's physical address space through DMA_WRITE messages (see clientRead). */
  async clientWrite(addr: number, data: Uint8Array): Promise<void> {
    for (let done = 0; done < data.length; ) {
      const count = Math.min(this.chunkSize(), data.length - done);
      const chunk = data.subarray(done, done + count);
      await this.dmaRequest(Command.DMA_WRITE, addr + done, count, codec.dmaAccess.encode({ address: BigInt(addr + done), count: BigInt(count) }, chunk));
      this.counters.dmaWriteBytes += count;
      done += count;
    }
  }

  /** A DMA_READ/DMA_WRITE round trip whose every failure (refusal, timeout, disconnect) is a DmaError. */
  private async dmaRequest(command: number, addr: number, count: number, payload: Uint8Array): Promise<codec.Message> {
    try {
      return await this.request(command, payload);
    } catch (error) {
      if (error instanceof DmaError) throw error;
      throw new DmaError(addr, count, `${commandName(command)} failed: ${(error as Error).message}`);
    }
  }

  private closeFds(fds: readonly number[]): void {
    for (const fd of fds) {
      try {
        this.options.native.closeFd(fd);
      } catch {
        // Already closed by its consumer: nothing left to release.
      }
    }
  }
}

function parseClientCaps(json: string): ClientCaps {
  const defaults: ClientCaps = { maxDataTransfer: Limits.maxDataTransfer, maxFds: 1, writeMultiple: false };
  if (json === '') return defaults;
  let parsed: unknown;
  try {
    parsed = JSON.parse(json);
  } catch {
    throw new VfioError(Errno.EINVAL, 'VERSION capabilities are not JSON');
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new VfioError(Errno.EINVAL, 'VERSION capabilities are not a JSON object');
  }
  const caps = (parsed as { capabilities?: Record<string, unknown> }).capabilities ?? {};
  const number = (key: string, fallback: number): number => {
    const value = caps[key];
    if (value === undefined) return fallback;
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) {
      throw new VfioError(Errno.EINVAL, `VERSION capability ${key} is not a positive integer`);
    }
    return value;
  };
  const maxDataTransfer = number('max_data_xfer_size', defaults.maxDataTransfer);
  // Message-based DMA is cut into pieces of this size: below a page, one NVMe data page would take
  // several round trips (one per byte at 1), a client-made slowdown of every controller's event loop.
  if (maxDataTransfer < Limits.minClientDataTransfer) {
    throw new VfioError(Errno.EINVAL, `VERSION capability max_data_xfer_size ${maxDataTransfer} is below ${Limits.minClientDataTransfer}`);
  }
  return {
    maxDataTransfer,
    maxFds: number('max_msg_fds', defaults.maxFds),
    writeMultiple: caps.write_multiple === true,
  };
}

function expectEmpty(payload: Uint8Array, what: string): void {
  if (payload.length !== 0) throw new VfioError(Errno.EINVAL, `${what} carries ${payload.length} payload bytes`);
}

function toErrno(error: unknown): number | null {
  if (error instanceof VfioError) return error.errno;
  if (error instanceof DecodeError) return Errno.EINVAL;
  if (error instanceof DmaError) return Errno.EFAULT;
  return null;
}
