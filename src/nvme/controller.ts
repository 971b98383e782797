// The NVMe controller as a PCI function: BAR0 properties and doorbells, the CC/CSTS state machine,
// submission-queue fetching, completion posting (phase tags, full queues), interrupts, asynchronous
// events, quiesce/resume, and the in-process admin entry point. Command semantics live in admin.ts
// and io.ts; this file moves entries between queues and handlers.

import type { Logger } from '../log.js';
import { PciFunction } from '../pci/function.js';
import { DmaError, type DmaSpace } from '../vfio-user/device.js';
import { PciIrq } from '../vfio-user/protocol.js';
import { executeAdminCommand } from './admin.js';
import { DEFERRED, parseCommand, type Command, type HandlerResult } from './command.js';
import { executeIoCommand, numberOfBlocks } from './io.js';
import type { Namespace } from './namespace.js';
import { ASYNC_EVENT_LIMIT, CHANGED_NAMESPACE_LIMIT, ERROR_LOG_ENTRIES, IN_FLIGHT_DATA_BYTES, INTX_REASSERT_GRACE_MS, MAX_TIMER_MS } from './policy.js';
import {
  AdminOpcode,
  AQA,
  AsyncEventInfo,
  AsyncEventType,
  Cap,
  CC,
  Cqe,
  CQE_SIZE,
  CQE_SIZE_LOG2,
  CSTS,
  LogId,
  NVME_VERSION_1_4,
  NvmOpcode,
  PciIdentity,
  Reg,
  SQE_SIZE,
  SQE_SIZE_LOG2,
  Status,
  statusName,
  AsyncEventConfig,
} from './spec.js';
import {
  cloneState,
  defaultFeatures,
  initialState,
  type AsyncEvent,
  type CompletionQueueState,
  type ControllerState,
  type HeldCompletion,
  type SubmissionQueueState,
} from './state.js';
import type { Subsystem, SubsystemController } from './subsystem.js';
import { BufferDataTransfer, CommandError, GuestDataTransfer, type DataTransfer } from './transfer.js';

export type InterruptOffer = 'msix' | 'msi' | 'intx';
export const INTERRUPT_OFFERS: readonly InterruptOffer[] = ['msix', 'msi', 'intx'];

export interface ControllerOptions {
  subsystem: Subsystem;
  /** Defaults to the subsystem's next free ID. */
  cntlid?: number;
  /** I/O queue pairs the controller grants at most (default 8). */
  maxIoQueues?: number;
  /** Entries per queue at most, CAP.MQES + 1 (default 1024). */
  maxQueueEntries?: number;
  /** Maximum data transfer size as a power of two of the minimum page size (default 8: 1 MiB). */
  mdts?: number;
  /**
   * The best interrupt mode the function offers: 'msix' (MSI-X, MSI and INTx; the default), 'msi'
   * (MSI and INTx) or 'intx' (INTx only), to exercise a guest driver's fallbacks.
   */
  interrupts?: InterruptOffer;
  logger?: Logger;
}

export interface AdminResult {
  status: number;
  dw0: number;
  dw1: number;
  data?: Uint8Array;
}

export interface CommandResult {
  status: number;
  dw0: number;
  dw1: number;
}

// BAR layout: registers + doorbells in BAR0; MSI-X table and PBA alone in BAR4 (never mappable).
const BAR0_SIZE = 0x4000;
const MSIX_BAR = 4;
const MSIX_BAR_SIZE = 0x4000;
const MSIX_TABLE_OFFSET = 0x0000;
const MSIX_PBA_OFFSET = 0x2000;
const MAX_MSIX_VECTORS = MSIX_PBA_OFFSET / 16;

const MIN_PAGE_SHIFT = 12;
const MPSMIN = 0; // 4 KiB
const MPSMAX = 4; // 64 KiB
/** CAP.TO in 500 ms units: how long a host waits for CSTS.RDY to follow CC.EN. */
const READY_TIMEOUT = 15;

/** Per-SQ bookkeeping that is not state: fetch loop status and command counts. */
interface SqRuntime {
  fetching: boolean;
  again: boolean;
  /** Fetched and not yet posted (held completions included): bounded by the queue depth. */
  outstanding: number;
  /** Handlers running right now. */
  executing: number;
  deleting: boolean;
  idle: Array<() => void>;
}

/** A byte budget shared by running commands; waiters are served in arrival order. */
class ByteBudget {
  private used = 0;
  private readonly waiters: { bytes: number; wake: () => void }[] = [];

  constructor(private readonly limit: number) {}

  async acquire(bytes: number): Promise<number> {
    const granted = Math.min(bytes, this.limit);
    if (this.waiters.length > 0 || this.used + granted > this.limit) {
      await new Promise<void>((wake) => this.waiters.push({ bytes: granted, wake }));
    } else {
      this.used += granted;
    }
    return granted;
  }

  release(bytes: number): void {
    this.used -= bytes;
    while (this.waiters.length > 0 && this.used + this.waiters[0]!.bytes <= this.limit) {
      const next = this.waiters.shift()!;
      this.used += next.bytes;
      next.wake();
    }
  }
}

/** NVM commands whose handlers buffer NLB blocks of data. */
const DATA_OPCODES = new Set<number>([NvmOpcode.READ, NvmOpcode.WRITE, NvmOpcode.COMPARE, NvmOpcode.VERIFY]);

/** One macrotask hop: lets socket messages, timers and file I/O run between batches of guest work. */
const yieldToEventLoop = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** Thrown into a command's data transfer when the controller was reset under it. */
class StaleCommandError extends Error {}

export class NvmeController extends PciFunction implements SubsystemController {
  readonly cntlid: number;
  readonly subsystem: Subsystem;
  readonly log: Logger;
  readonly maxIoQueues: number;
  readonly maxQueueEntries: number;
  readonly mdts: number;
  readonly vectors: number;
  state: ControllerState;

  /** Bumped by every controller reset: commands of an older generation never touch the guest again. */
  private generation = 0;
  private sqRuntime = new Map<number, SqRuntime>();
  private quiesced = false;
  /** Handlers running (not counting held Asynchronous Event Requests or in-process calls). */
  private inflight = 0;
  private idleWaiters: Array<() => void> = [];
  private busySince = 0;
  private vectorsToRaise = new Set<number>();
  private raiseScheduled = false;
  private keepAliveTimer: NodeJS.Timeout | null = null;
  private intxRecheck: NodeJS.Timeout | null = null;
  private readonly dataBudget = new ByteBudget(IN_FLIGHT_DATA_BYTES);
  /** CQs whose shadow head is being read, and those asked to read it again when done. */
  private readonly headRefresh = new Map<number, { again: boolean }>();
  private poweredOnAt = Date.now();
  /** Fatal errors after the first, until the host resets the controller (logged then as a count). */
  private suppressedFatals = 0;
  /** When the last controller reset happened (Timestamp counts from here until the host sets it). */
  private resetAt = Date.now();

  constructor(options: ControllerOptions) {
    const maxIoQueues = options.maxIoQueues ?? 8;
    // Every queue pair needs its two doorbells inside BAR0.
    const doorbellPairs = (BAR0_SIZE - Reg.DOORBELLS) / 8;
    if (!Number.isInteger(maxIoQueues) || maxIoQueues < 1 || maxIoQueues >= doorbellPairs) throw new RangeError(`maxIoQueues ${maxIoQueues}`);
    const wanted = Math.min(MAX_MSIX_VECTORS, maxIoQueues + 1);
    const msiVectors = Math.min(32, 1 << Math.ceil(Math.log2(wanted)));
    const interrupts = options.interrupts ?? 'msix';
    // What the host may name as a CQ's interrupt vector under the best mode the function offers.
    const vectors = interrupts === 'msix' ? wanted : interrupts === 'msi' ? msiVectors : 1;
    super({
      identity: {
        vendorId: PciIdentity.VENDOR_ID,
        deviceId: PciIdentity.DEVICE_ID,
        subsystemVendorId: PciIdentity.SUBSYSTEM_VENDOR_ID,
        subsystemId: PciIdentity.SUBSYSTEM_ID,
        revision: PciIdentity.REVISION,
        classCode: PciIdentity.CLASS_CODE,
      },
      bars: [
        { index: 0, size: BAR0_SIZE, kind: 'mem64' },
        { index: MSIX_BAR, size: MSIX_BAR_SIZE, kind: 'mem32' },
      ],
      interruptPin: 1,
      msiVectors: interrupts === 'intx' ? 0 : msiVectors,
      msix: interrupts === 'msix' ? { vectors, tableBar: MSIX_BAR, tableOffset: MSIX_TABLE_OFFSET, pbaBar: MSIX_BAR, pbaOffset: MSIX_PBA_OFFSET } : null,
    });
    this.subsystem = options.subsystem;
    this.cntlid = options.cntlid ?? this.subsystem.allocateCntlid();
    this.maxIoQueues = maxIoQueues;
    this.maxQueueEntries = options.maxQueueEntries ?? 1024;
    if (this.maxQueueEntries < 2 || this.maxQueueEntries > 0x10000) throw new RangeError(`maxQueueEntries ${this.maxQueueEntries}`);
    this.mdts = options.mdts ?? 8;
    this.vectors = vectors;
    this.log = (options.logger ?? this.subsystem.log).child(`ctrl${this.cntlid}`);
    this.state = initialState(maxIoQueues, [...this.subsystem.namespaces.keys()]);
    this.subsystem.registerController(this);
  }

  // ---- derived register values ------------------------------------------------------------------

  get cap(): bigint {
    const low = (this.maxQueueEntries - 1) | (1 << Cap.CQR_SHIFT) | (READY_TIMEOUT << Cap.TO_SHIFT);
    const high =
      (Cap.CSS_NVM << (Cap.CSS_SHIFT - 32)) | (MPSMIN << (Cap.MPSMIN_SHIFT - 32)) | (MPSMAX << (Cap.MPSMAX_SHIFT - 32));
    return (BigInt(high >>> 0) << 32n) | BigInt(low >>> 0);
  }

  get enabled(): boolean {
    return (this.state.registers.csts & CSTS.RDY) !== 0;
  }

  get pageSize(): number {
    return 1 << (MIN_PAGE_SHIFT + ((this.state.registers.cc >>> CC.MPS_SHIFT) & CC.MPS_MASK));
  }

  /** MDTS in bytes. */
  get maxTransferBytes(): number {
    return (1 << MIN_PAGE_SHIFT) * 2 ** this.mdts;
  }

  /** Whether any attached namespace sits behind a volatile cache (Identify VWC bit 0). */
  get volatileWriteCachePresent(): boolean {
    return this.attachedNamespaces().some((ns) => ns.backend.volatileCache);
  }

  // ---- namespaces ---------------------------------------------------------------------------------

  isAttached(nsid: number): boolean {
    return this.state.attachedNamespaces.includes(nsid);
  }

  attachNamespace(nsid: number): void {
    if (this.isAttached(nsid)) return;
    this.state.attachedNamespaces.push(nsid);
    this.state.attachedNamespaces.sort((a, b) => a - b);
    this.namespaceChanged(nsid);
  }

  detachNamespace(nsid: number): void {
    if (!this.isAttached(nsid)) return;
    this.state.attachedNamespaces = this.state.attachedNamespaces.filter((n) => n !== nsid);
    this.namespaceChanged(nsid);
  }

  /** The active namespace `nsid` as this controller sees it. */
  namespace(nsid: number): Namespace | undefined {
    return this.isAttached(nsid) ? this.subsystem.namespace(nsid) : undefined;
  }

  attachedNamespaces(): Namespace[] {
    return this.state.attachedNamespaces.map((n) => this.subsystem.namespace(n)).filter((ns): ns is Namespace => ns !== undefined);
  }

  namespaceChanged(nsid: number): void {
    const list = this.state.changedNamespaces;
    if (list[0] !== 0xffff_ffff && !list.includes(nsid)) {
      if (list.length >= CHANGED_NAMESPACE_LIMIT) this.state.changedNamespaces = [0xffff_ffff];
      else list.push(nsid);
    }
    if (this.state.features.asyncEventConfig & AsyncEventConfig.NAMESPACE_ATTRIBUTE_NOTICES) {
      this.queueAsyncEvent({ type: AsyncEventType.NOTICE, info: AsyncEventInfo.NAMESPACE_ATTRIBUTE_CHANGED, logPage: LogId.CHANGED_NAMESPACES });
    }
  }

  // ---- PciFunction ------------------------------------------------------------------------------

  protected barRead(bar: number, offset: number, count: number): Uint8Array {
    const out = new Uint8Array(count);
    if (bar !== 0) return out;
    for (let i = 0; i < count; ) {
      const at = offset + i;
      const dword = at & ~3;
      const value = this.readRegister(dword);
      const within = at - dword;
      const n = Math.min(4 - within, count - i);
      for (let b = 0; b < n; b++) out[i + b] = (value >>> ((within + b) * 8)) & 0xff;
      i += n;
    }
    return out;
  }

  protected barWrite(bar: number, offset: number, data: Uint8Array): void {
    if (bar !== 0) return;
    try {
      // Split into dword writes; an 8-byte write to ASQ/ACQ/CAP is its two halves, low first.
      for (let i = 0; i < data.length; ) {
        const at = offset + i;
        const dword = at & ~3;
        const within = at - dword;
        const n = Math.min(4 - within, data.length - i);
        let value = n === 4 ? 0 : dword < Reg.DOORBELLS ? this.readRegister(dword) : 0;
        for (let b = 0; b < n; b++) {
          const shift = (within + b) * 8;
          value = (value & ~(0xff << shift)) | (data[i + b]! << shift);
        }
        this.writeRegister(dword, value >>> 0);
        i += n;
      }
    } catch (err) {
      // Never let a guest write crash the process: the controller goes fatal instead.
      this.fatal(`BAR0 write at 0x${offset.toString(16)} failed: ${(err as Error).stack ?? String(err)}`);
    }
  }

  protected resetDevice(): void {
    this.controllerReset('function-level reset');
    this.state.registers = { cc: 0, csts: 0, aqa: 0, asq: 0, acq: 0, intms: 0 };
  }

  // A new client has not mapped guest memory yet when it attaches: completions held while no
  // client was there are posted at the host's next doorbell or bus-master enable, not now.

  protected override onBusMasterChange(enabled: boolean): void {
    if (!enabled) return;
    for (const cq of this.state.completionQueues) if (cq) this.releaseHeld(cq);
    this.kickAll();
  }

  irqsChanged(index: number): void {
    if (index !== PciIrq.INTX || this.interruptMode() !== 'intx' || this.intxRecheck) return;
    // INTx is level-triggered: when the host re-arms it, assert again if completions still wait.
    // QEMU re-arms on *any* BAR access (its emulated EOI), another vCPU's SQ doorbell included,
    // usually just before the handler consumes what is pending. Re-asserting at once would make
    // an interrupt per stray EOI; a short grace lets the handler's CQ head arrive first, and still
    // catches an interrupt the stray EOI cleared before the guest took it.
    this.intxRecheck = setTimeout(() => {
      this.intxRecheck = null;
      if (this.interruptMode() !== 'intx') return;
      for (const cq of this.state.completionQueues) if (cq && cq.interruptsEnabled && cq.head !== cq.tail) this.scheduleInterrupt(cq.vector);
    }, INTX_REASSERT_GRACE_MS);
    this.intxRecheck.unref();
  }

  // ---- registers (Base §3.1.4) --------------------------------------------------------------------

  private readRegister(offset: number): number {
    const r = this.state.registers;
    const cap = this.cap;
    switch (offset) {
      case Reg.CAP:
        return Number(cap & 0xffff_ffffn);
      case Reg.CAP + 4:
        return Number(cap >> 32n);
      case Reg.VS:
        return NVME_VERSION_1_4;
      case Reg.INTMS:
      case Reg.INTMC:
        return r.intms;
      case Reg.CC:
        return r.cc;
      case Reg.CSTS:
        return r.csts;
      case Reg.AQA:
        return r.aqa;
      case Reg.ASQ:
        return r.asq % 0x1_0000_0000;
      case Reg.ASQ + 4:
        return Math.floor(r.asq / 0x1_0000_0000);
      case Reg.ACQ:
        return r.acq % 0x1_0000_0000;
      case Reg.ACQ + 4:
        return Math.floor(r.acq / 0x1_0000_0000);
      default:
        return 0; // reserved, NSSR (no subsystem reset), doorbells (write-only)
    }
  }

  private writeRegister(offset: number, value: number): void {
    const r = this.state.registers;
    if (offset >= Reg.DOORBELLS) {
      this.doorbell((offset - Reg.DOORBELLS) >>> 2, value);
      return;
    }
    const adminQueueWritable = (r.cc & CC.EN) === 0;
    const setLow = (old: number, low: number): number => Math.floor(old / 0x1_0000_0000) * 0x1_0000_0000 + ((low & ~0xfff) >>> 0);
    switch (offset) {
      case Reg.INTMS:
        // Under MSI-X the host masks in the MSI-X table; INTMS/INTMC are for MSI and INTx only.
        if (this.interruptMode() !== 'msix') r.intms = (r.intms | value) >>> 0;
        return;
      case Reg.INTMC:
        if (this.interruptMode() !== 'msix') this.unmaskInterrupts(value);
        return;
      case Reg.CC:
        this.writeCc(value);
        return;
      case Reg.AQA:
        if (adminQueueWritable) r.aqa = value & ((AQA.ACQS_MASK << AQA.ACQS_SHIFT) | AQA.ASQS_MASK);
        return;
      case Reg.ASQ:
        if (adminQueueWritable) r.asq = setLow(r.asq, value);
        return;
      case Reg.ASQ + 4:
        if (adminQueueWritable) r.asq = value * 0x1_0000_0000 + (r.asq % 0x1_0000_0000);
        return;
      case Reg.ACQ:
        if (adminQueueWritable) r.acq = setLow(r.acq, value);
        return;
      case Reg.ACQ + 4:
        if (adminQueueWritable) r.acq = value * 0x1_0000_0000 + (r.acq % 0x1_0000_0000);
        return;
      default:
        return; // CAP, VS, CSTS, NSSR and reserved space are read-only here
    }
  }

  private writeCc(value: number): void {
    const r = this.state.registers;
    const next = value & CC.WRITABLE;
    const wasEnabled = (r.cc & CC.EN) !== 0;
    const enable = (next & CC.EN) !== 0;
    if (wasEnabled && !enable) {
      this.controllerReset('CC.EN cleared');
      r.cc = next;
      return;
    }
    if (!wasEnabled && enable) {
      r.cc = next;
      this.enable();
      return;
    }
    if (wasEnabled) {
      // While enabled only the shutdown notification may change.
      const shnMask = CC.SHN_MASK << CC.SHN_SHIFT;
      const before = r.cc & shnMask;
      r.cc = (r.cc & ~shnMask) | (next & shnMask);
      if (before === 0 && (next & shnMask) !== 0) void this.shutdown();
      return;
    }
    r.cc = next;
  }

  private enable(): void {
    const r = this.state.registers;
    const mps = (r.cc >>> CC.MPS_SHIFT) & CC.MPS_MASK;
    const css = (r.cc >>> CC.CSS_SHIFT) & CC.CSS_MASK;
    const ams = (r.cc >>> CC.AMS_SHIFT) & CC.AMS_MASK;
    const asqs = (r.aqa & AQA.ASQS_MASK) + 1;
    const acqs = ((r.aqa >>> AQA.ACQS_SHIFT) & AQA.ACQS_MASK) + 1;
    const problems: string[] = [];
    if (mps < MPSMIN || mps > MPSMAX) problems.push(`CC.MPS ${mps}`);
    if (css !== CC.CSS_NVM) problems.push(`CC.CSS ${css}`);
    if (ams !== CC.AMS_ROUND_ROBIN) problems.push(`CC.AMS ${ams}`);
    if (asqs < 2 || acqs < 2) problems.push(`AQA ${r.aqa.toString(16)}`);
    // Like QEMU's hw/nvme: entry sizes other than ours would make us misparse every I/O queue.
    const iosqes = (r.cc >>> CC.IOSQES_SHIFT) & CC.ES_MASK;
    const iocqes = (r.cc >>> CC.IOCQES_SHIFT) & CC.ES_MASK;
    if (iosqes !== SQE_SIZE_LOG2 || iocqes !== CQE_SIZE_LOG2) problems.push(`CC.IOSQES/IOCQES ${iosqes}/${iocqes}`);
    if (r.asq % this.pageSize !== 0 || r.acq % this.pageSize !== 0 || r.asq === 0 || r.acq === 0) problems.push('ASQ/ACQ alignment');
    if (r.csts & CSTS.CFS) problems.push('controller fatal status is set');
    if (problems.length > 0) {
      this.fatal(`enable refused: ${problems.join(', ')}`);
      return;
    }
    this.state.completionQueues[0] = { qid: 0, base: r.acq, size: acqs, head: 0, tail: 0, phase: 1, interruptsEnabled: true, vector: 0 };
    this.state.submissionQueues[0] = { qid: 0, base: r.asq, size: asqs, head: 0, tail: 0, cqid: 0, priority: 0 };
    this.sqRuntime.set(0, newSqRuntime());
    r.csts = CSTS.RDY;
    this.log.debug(`enabled: admin SQ ${asqs} @0x${r.asq.toString(16)}, CQ ${acqs} @0x${r.acq.toString(16)}, page ${this.pageSize}`);
  }

  /** Controller Level Reset: every queue, command and feature value is gone; AQA/ASQ/ACQ stay. */
  private controllerReset(reason: string): void {
    const r = this.state.registers;
    if (r.csts & CSTS.RDY && ((r.csts & CSTS.SHST_MASK) >>> CSTS.SHST_SHIFT) !== CSTS.SHST_COMPLETE) this.state.smart.unsafeShutdowns++;
    this.generation++;
    this.log.debug(`controller reset (${reason})`);
    if (this.suppressedFatals > 0) {
      this.log.warn(`${this.suppressedFatals} further fatal errors before this reset were not logged`);
      this.suppressedFatals = 0;
    }
    this.sqRuntime = new Map();
    this.vectorsToRaise.clear();
    this.stopKeepAlive();
    this.resetAt = Date.now();
    const s = this.state;
    s.submissionQueues = [];
    s.completionQueues = [];
    s.heldCompletions = [];
    s.pendingInterrupts = [];
    s.features = defaultFeatures(this.maxIoQueues);
    s.asyncEvents = { outstanding: [], queued: [], masked: [] };
    s.doorbellBuffer = null;
    r.intms = 0;
    // Reads land in guest memory straight from the backend: until the commands already running
    // have finished, CSTS.RDY stays set, so the host (which waits for RDY=0) reuses no buffer we
    // may still write. Their completions are dropped either way.
    r.csts = this.inflight > 0 ? CSTS.RDY : 0;
    if (this.inflight > 0) {
      const generation = this.generation;
      void this.waitIdle().then(() => {
        if (generation === this.generation && !(r.cc & CC.EN)) r.csts &= ~CSTS.RDY;
      });
    }
  }

  private async shutdown(): Promise<void> {
    const generation = this.generation;
    const r = this.state.registers;
    r.csts = (r.csts & ~CSTS.SHST_MASK) | (CSTS.SHST_OCCURRING << CSTS.SHST_SHIFT);
    try {
      await this.waitIdle();
      for (const ns of this.attachedNamespaces()) await ns.backend.flush();
    } catch (err) {
      this.log.warn(`flush during shutdown failed: ${(err as Error).message}`);
    }
    if (generation !== this.generation) return;
    r.csts = (r.csts & ~CSTS.SHST_MASK) | (CSTS.SHST_COMPLETE << CSTS.SHST_SHIFT);
    this.log.debug('shutdown complete');
  }

  /** Sets CSTS.CFS: the host must reset the controller. Processing stops. */
  fatal(reason: string): void {
    // One line per state change: a broken host can make every queued command fail the same way.
    if (this.state.registers.csts & CSTS.CFS) {
      this.suppressedFatals++;
      return;
    }
    this.log.error(`controller fatal status: ${reason}`);
    this.state.registers.csts |= CSTS.CFS;
  }

  // ---- doorbells ----------------------------------------------------------------------------------

  private doorbell(index: number, value: number): void {
    const r = this.state.registers;
    if (!(r.csts & CSTS.RDY) || r.csts & CSTS.CFS) return;
    const qid = index >>> 1;
    if ((index & 1) === 0) {
      const sq = this.state.submissionQueues[qid];
      if (!sq) return this.invalidDoorbell(AsyncEventInfo.INVALID_DOORBELL_REGISTER, qid);
      if (value >= sq.size) return this.invalidDoorbell(AsyncEventInfo.INVALID_DOORBELL_VALUE, qid);
      // With a doorbell buffer the shadow is authoritative: this posted MMIO value may be older than
      // a shadow value already read, and taking it would move the tail backwards.
      if (!this.usesShadowDoorbells(qid)) sq.tail = value;
      this.kick(qid);
      // With shadow doorbells a CQ head update may have skipped MMIO: look while completions wait.
      const cq = this.state.completionQueues[sq.cqid];
      if (cq && this.state.heldCompletions.some((h) => h.cqid === cq.qid)) void this.refreshShadowHead(cq);
      return;
    }
    const cq = this.state.completionQueues[qid];
    if (!cq) return this.invalidDoorbell(AsyncEventInfo.INVALID_DOORBELL_REGISTER, qid);
    if (this.usesShadowDoorbells(qid)) {
      // The shadow head is authoritative and may already be newer than this posted value.
      if (value >= cq.size) return this.invalidDoorbell(AsyncEventInfo.INVALID_DOORBELL_VALUE, qid);
      void this.refreshShadowHead(cq);
      return;
    }
    if (!this.validCqHead(cq, value)) return this.invalidDoorbell(AsyncEventInfo.INVALID_DOORBELL_VALUE, qid);
    cq.head = value;
    void this.updateEventIdx(cq.qid, true, value);
    this.releaseHeld(cq);
    if (this.interruptMode() === 'intx' && cq.interruptsEnabled && cq.head !== cq.tail) this.scheduleInterrupt(cq.vector);
  }

  /** A CQ head may only move forward over entries the controller posted. */
  private validCqHead(cq: CompletionQueueState, head: number): boolean {
    if (head >= cq.size) return false;
    const posted = (cq.tail - cq.head + cq.size) % cq.size;
    return (head - cq.head + cq.size) % cq.size <= posted;
  }

  /** Base §3.1.4 doorbell rules: reported as an error event only while an AER is outstanding. */
  private invalidDoorbell(info: number, qid: number): void {
    this.log.debug(`invalid doorbell write (${info === AsyncEventInfo.INVALID_DOORBELL_REGISTER ? 'no such queue' : 'bad value'}) for queue ${qid}`);
    if (this.state.asyncEvents.outstanding.length === 0) return;
    this.recordError({ sqid: qid, cid: 0xffff, status: Status.INVALID_FIELD, nsid: 0, lba: 0 });
    this.queueAsyncEvent({ type: AsyncEventType.ERROR, info, logPage: LogId.ERROR_INFORMATION });
  }

  // ---- fetching -----------------------------------------------------------------------------------

  private canFetch(): boolean {
    const r = this.state.registers;
    return (
      (r.csts & (CSTS.RDY | CSTS.CFS | CSTS.SHST_MASK)) === CSTS.RDY &&
      !this.quiesced &&
      this.context !== null &&
      this.busMasterEnabled
    );
  }

  private kickAll(): void {
    for (const sq of this.state.submissionQueues) if (sq) this.kick(sq.qid);
  }

  private kick(qid: number): void {
    const rt = this.sqRuntime.get(qid);
    if (!rt) return;
    rt.again = true;
    if (rt.fetching) return;
    rt.fetching = true;
    void (async () => {
      try {
        while (rt.again) {
          rt.again = false;
          await this.fetch(qid, rt);
        }
      } catch (err) {
        this.fatal(`fetch loop for SQ ${qid}: ${(err as Error).stack ?? String(err)}`);
      } finally {
        rt.fetching = false;
      }
    })();
  }

  private async fetch(qid: number, rt: SqRuntime): Promise<void> {
    const generation = this.generation;
    for (;;) {
      const sq = this.state.submissionQueues[qid];
      if (!sq || rt.deleting || generation !== this.generation || !this.canFetch()) return;
      // With shadow doorbells the host moves the tail in memory and rings only when EventIdx asks.
      if (this.usesShadowDoorbells(qid)) await this.refreshShadowTail(sq);
      if (sq.head === sq.tail) return;
      const room = sq.size - 1 - rt.outstanding;
      if (room <= 0) return; // a completion kicks us again
      const available = (sq.tail - sq.head + sq.size) % sq.size;
      const count = Math.min(available, room, sq.size - sq.head);
      // Commands keep the DMA space they were fetched through: if the client leaves, that space is
      // emptied and their data transfers fail cleanly instead of reaching a detached controller.
      const dma = this.context!.dma;
      let entries: Uint8Array;
      try {
        entries = await dma.read(sq.base + sq.head * SQE_SIZE, count * SQE_SIZE);
      } catch (err) {
        if (err instanceof DmaError) {
          if (generation === this.generation) this.fatal(`SQ ${qid} fetch: ${err.message}`);
          return;
        }
        throw err;
      }
      // The world may have changed while the read was in flight.
      if (generation !== this.generation || this.state.submissionQueues[qid] !== sq || rt.deleting || !this.canFetch()) return;
      for (let i = 0; i < count; i++) {
        const sqe = entries.subarray(i * SQE_SIZE, (i + 1) * SQE_SIZE);
        sq.head = (sq.head + 1) % sq.size;
        rt.outstanding++;
        this.dispatch(sq, rt, sqe, dma, generation).catch((err: unknown) => {
          this.fatal(`dispatch on SQ ${qid}: ${(err as Error).stack ?? String(err)}`);
        });
      }
      // With shadow doorbells every step can be an already-settled promise, so a guest that keeps
      // moving its shadow tail would keep this loop (and the whole process) from yielding.
      if (this.usesShadowDoorbells(qid)) await yieldToEventLoop();
    }
  }

  private async dispatch(sq: SubmissionQueueState, rt: SqRuntime, sqe: Uint8Array, dma: DmaSpace, generation: number): Promise<void> {
    const cmd = parseCommand(sqe, sq.qid);
    const isAdmin = sq.qid === 0;
    rt.executing++;
    this.commandStarted();
    let result: CommandResult | typeof DEFERRED;
    let budget = 0;
    try {
      budget = isAdmin ? 0 : await this.dataBudget.acquire(this.dataBytes(cmd));
      const transfer = new GuestDataTransfer({
        dma,
        sqe,
        pageSize: this.pageSize,
        allowSgl: !isAdmin,
        guard: () => {
          if (generation !== this.generation) throw new StaleCommandError('controller was reset');
        },
      });
      result = await this.execute(cmd, transfer, isAdmin);
    } finally {
      if (budget > 0) this.dataBudget.release(budget);
      rt.executing--;
      this.commandFinished();
      if (rt.executing === 0) rt.idle.splice(0).forEach((wake) => wake());
    }
    if (result === DEFERRED || generation !== this.generation) return;
    this.postCompletion({ cqid: sq.cqid, sqid: sq.qid, cid: cmd.cid, ...result });
  }

  /** Data an I/O command moves (what its handler will allocate), for the in-flight budget. */
  private dataBytes(cmd: Command): number {
    if (!DATA_OPCODES.has(cmd.opcode)) return 0;
    const ns = this.namespace(cmd.nsid);
    return ns ? numberOfBlocks(cmd) * ns.blockSize : 0;
  }

  /** Runs one command through its handler; never throws. */
  private async execute(cmd: Command, transfer: DataTransfer, isAdmin: boolean): Promise<CommandResult | typeof DEFERRED> {
    let outcome: HandlerResult;
    try {
      outcome = isAdmin ? await executeAdminCommand(this, cmd, transfer) : await executeIoCommand(this, cmd, transfer);
    } catch (err) {
      if (err instanceof CommandError) {
        this.log.debug(`${isAdmin ? 'admin' : 'I/O'} opcode 0x${cmd.opcode.toString(16)} cid ${cmd.cid}: ${statusName(err.status)} ${err.message}`);
        this.recordError({ sqid: cmd.sqid ?? 0xffff, cid: cmd.cid, status: err.status, nsid: cmd.nsid, lba: 0 });
        return { status: err.status, dw0: err.dw0, dw1: 0 };
      }
      if (err instanceof StaleCommandError) return { status: Status.ABORT_REQUESTED, dw0: 0, dw1: 0 };
      this.log.error(`opcode 0x${cmd.opcode.toString(16)} cid ${cmd.cid} failed unexpectedly: ${(err as Error).stack ?? String(err)}`);
      this.recordError({ sqid: cmd.sqid ?? 0xffff, cid: cmd.cid, status: Status.INTERNAL_ERROR, nsid: cmd.nsid, lba: 0 });
      return { status: Status.INTERNAL_ERROR, dw0: 0, dw1: 0 };
    }
    if (outcome === DEFERRED) return DEFERRED;
    return { status: Status.SUCCESS, dw0: (outcome?.dw0 ?? 0) >>> 0, dw1: (outcome?.dw1 ?? 0) >>> 0 };
  }

  private commandStarted(): void {
    if (this.inflight++ === 0) this.busySince = Date.now();
  }

  private commandFinished(): void {
    if (--this.inflight === 0) {
      this.state.smart.busyTimeMs += Date.now() - this.busySince;
      this.idleWaiters.splice(0).forEach((wake) => wake());
    }
  }

  /** Called by the AER handler: the command stays outstanding without counting as running. */
  deferAsyncEventRequest(cid: number): void {
    const aer = this.state.asyncEvents;
    if (aer.outstanding.length >= ASYNC_EVENT_LIMIT) throw new CommandError(Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED);
    aer.outstanding.push(cid);
    queueMicrotask(() => this.deliverAsyncEvents());
  }

  // ---- completions --------------------------------------------------------------------------------

  private postCompletion(entry: HeldCompletion): void {
    const cq = this.state.completionQueues[entry.cqid];
    // A fatal controller posts nothing more: the host must reset it, which discards the queues.
    if (!cq || this.state.registers.csts & CSTS.CFS) {
      this.completionGone(entry);
      return;
    }
    // Keep completion order per CQ: once one waits, later ones wait behind it. Without a client
    // (detached) there is no guest memory to post to: hold until the next attach.
    if (!this.context || this.isFull(cq) || this.state.heldCompletions.some((h) => h.cqid === cq.qid)) {
      this.state.heldCompletions.push(entry);
      void this.refreshShadowHead(cq);
      return;
    }
    this.writeCompletion(cq, entry);
  }

  private isFull(cq: CompletionQueueState): boolean {
    return (cq.tail + 1) % cq.size === cq.head;
  }

  private writeCompletion(cq: CompletionQueueState, entry: HeldCompletion): void {
    const sq = this.state.submissionQueues[entry.sqid];
    const cqe = new Uint8Array(CQE_SIZE);
    const v = new DataView(cqe.buffer);
    v.setUint32(Cqe.DW0, entry.dw0 >>> 0, true);
    v.setUint32(Cqe.DW1, entry.dw1 >>> 0, true);
    v.setUint16(Cqe.SQHD, sq ? sq.head : 0, true);
    v.setUint16(Cqe.SQID, entry.sqid, true);
    v.setUint16(Cqe.CID, entry.cid, true);
    // Phase tag and status share the last word, written last: the host polls the phase.
    v.setUint16(Cqe.STATUS_PHASE, ((entry.status << Cqe.STATUS_SHIFT) | cq.phase) & 0xffff, true);
    const addr = cq.base + cq.tail * CQE_SIZE;
    cq.tail = (cq.tail + 1) % cq.size;
    if (cq.tail === 0) cq.phase ^= 1;
    const generation = this.generation;
    const done = (): void => {
      this.completionGone(entry);
      if (cq.interruptsEnabled) this.scheduleInterrupt(cq.vector);
    };
    const dma = this.context!.dma;
    // The fast path writes in place synchronously; remote DMA is a message round trip.
    const view = dma.view(addr, CQE_SIZE, true);
    if (view) {
      view.set(cqe);
      done();
      return;
    }
    dma.write(addr, cqe).then(
      () => {
        if (generation === this.generation) done();
      },
      (err: unknown) => {
        if (generation === this.generation) this.fatal(`CQ ${cq.qid} post: ${(err as Error).message}`);
      },
    );
  }

  /** A fetched command is fully finished: its SQ slot is free again. */
  private completionGone(entry: HeldCompletion): void {
    const rt = this.sqRuntime.get(entry.sqid);
    if (!rt) return;
    rt.outstanding = Math.max(0, rt.outstanding - 1);
    const sq = this.state.submissionQueues[entry.sqid];
    if (sq && sq.head !== sq.tail) this.kick(entry.sqid);
  }

  private releaseHeld(cq: CompletionQueueState): void {
    const held = this.state.heldCompletions;
    while (this.context && !this.isFull(cq)) {
      const index = held.findIndex((h) => h.cqid === cq.qid);
      if (index < 0) return;
      const [entry] = held.splice(index, 1);
      this.writeCompletion(cq, entry!);
    }
  }

  // ---- interrupts ---------------------------------------------------------------------------------

  /**
   * Interrupt Coalescing is stored and reported but applied only as batching: completions posted in
   * the same event-loop turn share one interrupt per vector. Aggregation time/threshold are not
   * enforced (the spec allows a controller to interrupt earlier than they ask).
   */
  private scheduleInterrupt(vector: number): void {
    this.vectorsToRaise.add(vector);
    if (this.raiseScheduled) return;
    this.raiseScheduled = true;
    queueMicrotask(() => {
      this.raiseScheduled = false;
      const vectors = [...this.vectorsToRaise];
      this.vectorsToRaise.clear();
      for (const v of vectors) this.fire(v);
    });
  }

  private fire(vector: number): void {
    const mode = this.interruptMode();
    if (mode === 'none') return;
    if (mode !== 'msix') {
      // INTMS masks MSI and INTx per vector; a masked vector is remembered and raised on INTMC.
      const bit = vector & 31;
      if (this.state.registers.intms & (1 << bit)) {
        if (!this.state.pendingInterrupts.includes(bit)) this.state.pendingInterrupts.push(bit);
        return;
      }
    }
    this.raiseInterrupt(vector);
  }

  private unmaskInterrupts(bits: number): void {
    const r = this.state.registers;
    r.intms = (r.intms & ~bits) >>> 0;
    const release = this.state.pendingInterrupts.filter((bit) => (bits >>> bit) & 1);
    this.state.pendingInterrupts = this.state.pendingInterrupts.filter((bit) => !((bits >>> bit) & 1));
    for (const bit of release) this.raiseInterrupt(bit);
  }

  // ---- queue management (for the admin handlers) ------------------------------------------------

  createCompletionQueue(cq: Omit<CompletionQueueState, 'head' | 'tail' | 'phase'>): void {
    this.state.completionQueues[cq.qid] = { ...cq, head: 0, tail: 0, phase: 1 };
    void this.updateEventIdx(cq.qid, true, 0);
  }

  createSubmissionQueue(sq: Omit<SubmissionQueueState, 'head' | 'tail'>): void {
    this.state.submissionQueues[sq.qid] = { ...sq, head: 0, tail: 0 };
    this.sqRuntime.set(sq.qid, newSqRuntime());
    void this.updateEventIdx(sq.qid, false, 0);
  }

  /** Stops fetching, lets running commands finish, drops their completions, removes the queue. */
  async deleteSubmissionQueue(qid: number): Promise<void> {
    const rt = this.sqRuntime.get(qid);
    const sq = this.state.submissionQueues[qid];
    if (!sq) return;
    if (rt) {
      rt.deleting = true;
      while (rt.executing > 0) await new Promise<void>((resolve) => rt.idle.push(resolve));
    }
    if (this.state.submissionQueues[qid] !== sq) return;
    this.state.heldCompletions = this.state.heldCompletions.filter((h) => h.sqid !== qid);
    this.state.submissionQueues[qid] = null;
    this.sqRuntime.delete(qid);
  }

  deleteCompletionQueue(qid: number): void {
    this.state.completionQueues[qid] = null;
    this.state.heldCompletions = this.state.heldCompletions.filter((h) => h.cqid !== qid);
  }

  hasIoQueues(): boolean {
    return this.state.submissionQueues.some((q, i) => q && i > 0) || this.state.completionQueues.some((q, i) => q && i > 0);
  }

  // ---- shadow doorbells (Doorbell Buffer Config, Base §5.8) ------------------------------------

  configureDoorbellBuffer(shadow: number, eventIdx: number): void {
    this.state.doorbellBuffer = { shadow, eventIdx };
    for (const sq of this.state.submissionQueues) if (sq && sq.qid > 0) void this.updateEventIdx(sq.qid, false, sq.tail);
    for (const cq of this.state.completionQueues) if (cq && cq.qid > 0) void this.updateEventIdx(cq.qid, true, cq.head);
  }

  private doorbellSlot(qid: number, completion: boolean): number {
    return (2 * qid + (completion ? 1 : 0)) * 4;
  }

  /**
   * EventIdx = the last value we saw: the host then rings the (trapped) doorbell for every update,
   * so trapped doorbells keep working. Admin queues are outside the buffer (as Linux uses it).
   */
  private async updateEventIdx(qid: number, completion: boolean, value: number): Promise<void> {
    const buffer = this.state.doorbellBuffer;
    if (!buffer || qid === 0 || !this.context) return;
    const bytes = new Uint8Array(4);
    new DataView(bytes.buffer).setUint32(0, value, true);
    try {
      await this.context.dma.write(buffer.eventIdx + this.doorbellSlot(qid, completion), bytes);
    } catch (err) {
      this.fatal(`EventIdx write: ${(err as Error).message}`);
    }
  }

  private async readShadow(qid: number, completion: boolean): Promise<number | null> {
    const buffer = this.state.doorbellBuffer;
    if (!buffer || qid === 0 || !this.context) return null;
    try {
      const bytes = await this.context.dma.read(buffer.shadow + this.doorbellSlot(qid, completion), 4);
      return new DataView(bytes.buffer, bytes.byteOffset).getUint32(0, true);
    } catch (err) {
      this.fatal(`shadow doorbell read: ${(err as Error).message}`);
      return null;
    }
  }

  private usesShadowDoorbells(qid: number): boolean {
    return this.state.doorbellBuffer !== null && qid > 0;
  }

  /** Publishes our view of the tail, then re-reads the shadow tail; true when it moved. */
  private async refreshShadowTail(sq: SubmissionQueueState): Promise<boolean> {
    if (!this.state.doorbellBuffer || sq.qid === 0) return false;
    await this.updateEventIdx(sq.qid, false, sq.tail);
    const tail = await this.readShadow(sq.qid, false);
    if (tail === null || tail === sq.tail || this.state.submissionQueues[sq.qid] !== sq) return false;
    if (tail >= sq.size) {
      this.invalidDoorbell(AsyncEventInfo.INVALID_DOORBELL_VALUE, sq.qid);
      return false;
    }
    sq.tail = tail;
    return true;
  }

  /**
   * Takes the host's CQ head from the shadow doorbell and publishes it as EventIdx, so the host's
   * next head update rings the trapped doorbell again. That MMIO write is also QEMU's emulated EOI
   * for INTx: without it a level interrupt would stay asserted.
   */
  private async refreshShadowHead(cq: CompletionQueueState): Promise<void> {
    if (!this.state.doorbellBuffer || cq.qid === 0) return;
    // One reader per CQ: with message-based DMA an older read could resolve after a newer one
    // and move the head backwards.
    const running = this.headRefresh.get(cq.qid);
    if (running) {
      running.again = true;
      return;
    }
    const state = { again: true };
    this.headRefresh.set(cq.qid, state);
    try {
      while (state.again) {
        state.again = false;
        const head = await this.readShadow(cq.qid, true);
        if (head === null || this.state.completionQueues[cq.qid] !== cq || head === cq.head) continue;
        if (!this.validCqHead(cq, head)) {
          this.invalidDoorbell(AsyncEventInfo.INVALID_DOORBELL_VALUE, cq.qid);
          continue;
        }
        cq.head = head;
        await this.updateEventIdx(cq.qid, true, head);
        this.releaseHeld(cq);
        // The host may have moved the head again before it saw the new EventIdx: look once more,
        // after letting the rest of the process run.
        state.again = true;
        await yieldToEventLoop();
      }
    } finally {
      this.headRefresh.delete(cq.qid);
    }
  }

  // ---- asynchronous events ------------------------------------------------------------------------

  queueAsyncEvent(event: AsyncEvent): void {
    const aer = this.state.asyncEvents;
    if (!aer.queued.some((e) => e.type === event.type && e.info === event.info && e.logPage === event.logPage)) aer.queued.push(event);
    this.deliverAsyncEvents();
  }

  /** The host read `logPage` without Retain Asynchronous Event: events for it may flow again. */
  logPageRead(logPage: number): void {
    const aer = this.state.asyncEvents;
    aer.masked = aer.masked.filter((l) => l !== logPage);
    if (logPage === LogId.CHANGED_NAMESPACES) this.state.changedNamespaces = [];
    this.deliverAsyncEvents();
  }

  private deliverAsyncEvents(): void {
    const aer = this.state.asyncEvents;
    while (aer.outstanding.length > 0) {
      const index = aer.queued.findIndex((e) => !aer.masked.includes(e.logPage));
      if (index < 0) return;
      const [event] = aer.queued.splice(index, 1);
      const cid = aer.outstanding.shift()!;
      aer.masked.push(event!.logPage);
      const dw0 = event!.type | (event!.info << 8) | (event!.logPage << 16);
      this.postCompletion({ cqid: 0, sqid: 0, cid, status: Status.SUCCESS, dw0, dw1: 0 });
    }
  }

  // ---- error log ------------------------------------------------------------------------------------

  recordError(entry: { sqid: number; cid: number; status: number; nsid: number; lba: number }): void {
    const log = this.state.errorLog;
    log.count++;
    log.entries.unshift({ errorCount: log.count, parameterLocation: 0xffff, ...entry });
    if (log.entries.length > ERROR_LOG_ENTRIES) log.entries.length = ERROR_LOG_ENTRIES;
  }

  // ---- keep alive ---------------------------------------------------------------------------------

  /** (Re)arms the Keep Alive timer; expiry without a Keep Alive command is a controller fatal error. */
  restartKeepAlive(): void {
    this.stopKeepAlive();
    const timeout = this.state.features.keepAliveTimeoutMs;
    if (timeout === 0 || !this.enabled) return;
    const generation = this.generation;
    const deadline = Date.now() + timeout;
    const arm = (): void => {
      const left = deadline - Date.now();
      this.keepAliveTimer = setTimeout(() => {
        if (generation !== this.generation) return;
        if (Date.now() >= deadline) this.fatal(`keep alive timeout (${timeout} ms) expired`);
        else arm();
      }, Math.min(Math.max(left, 0), MAX_TIMER_MS));
      this.keepAliveTimer.unref();
    };
    arm();
  }

  private stopKeepAlive(): void {
    if (this.keepAliveTimer) clearTimeout(this.keepAliveTimer);
    this.keepAliveTimer = null;
  }

  // ---- time ---------------------------------------------------------------------------------------

  /** Timestamp feature value now (ms) and whether the host set it. */
  timestampNow(): { value: number; hostSet: boolean } {
    const ts = this.state.features.timestamp;
    if (ts) return { value: ts.value + (Date.now() - ts.setAt), hostSet: true };
    return { value: Date.now() - this.resetAt, hostSet: false };
  }

  powerOnMs(): number {
    return this.state.smart.powerOnMs + (Date.now() - this.poweredOnAt);
  }

  // ---- public operations --------------------------------------------------------------------------

  /**
   * Stops fetching new commands and resolves once every fetched command has finished and posted
   * its completion (or holds it in state because the CQ is full). Held AERs stay outstanding.
   */
  async quiesce(): Promise<void> {
    this.quiesced = true;
    await this.waitIdle();
  }

  resume(): void {
    this.quiesced = false;
    this.kickAll();
  }

  get isQuiesced(): boolean {
    return this.quiesced;
  }

  private waitIdle(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * Runs an admin command from an in-process host (e.g. the control socket) through the same
   * handlers the admin queue uses. `data` is the host-to-controller buffer if the command needs one.
   */
  async executeAdmin(command: Uint8Array, data?: Uint8Array): Promise<AdminResult> {
    const cmd = parseCommand(command, null);
    if (cmd.opcode === AdminOpcode.ASYNC_EVENT_REQUEST) {
      return { status: Status.COMMAND_SEQUENCE_ERROR, dw0: 0, dw1: 0 };
    }
    const transfer = new BufferDataTransfer(data);
    const result = await this.execute(cmd, transfer, true);
    if (result === DEFERRED) return { status: Status.INTERNAL_ERROR, dw0: 0, dw1: 0 };
    return { ...result, ...(transfer.output ? { data: transfer.output } : {}) };
  }

  /** Releases timers and leaves the subsystem; the namespaces stay with the subsystem. */
  dispose(): void {
    this.controllerReset('disposed');
    this.subsystem.unregisterController(this);
  }

  // ---- state ------------------------------------------------------------------------------------

  /** Plain-data snapshot; meaningful after quiesce() (commands in flight are not part of it). */
  saveState(): ControllerState {
    const copy = cloneState(this.state);
    copy.smart.powerOnMs = this.powerOnMs();
    return copy;
  }

  /** Replaces the controller's state and rebuilds everything derived from it. */
  loadState(state: ControllerState): void {
    if (state.version !== 1) throw new Error(`unsupported controller state version ${String(state.version)}`);
    this.generation++;
    this.stopKeepAlive();
    this.state = cloneState(state);
    this.poweredOnAt = Date.now();
    this.sqRuntime = new Map();
    for (const sq of this.state.submissionQueues) if (sq) this.sqRuntime.set(sq.qid, newSqRuntime());
    // Held AERs and held completions occupy their SQ slots.
    const admin = this.sqRuntime.get(0);
    if (admin) admin.outstanding += this.state.asyncEvents.outstanding.length;
    for (const h of this.state.heldCompletions) {
      const rt = this.sqRuntime.get(h.sqid);
      if (rt) rt.outstanding++;
    }
    this.restartKeepAlive();
    this.kickAll();
  }
}

function newSqRuntime(): SqRuntime {
  return { fetching: false, again: false, outstanding: 0, executing: 0, deleting: false, idle: [] };
}

/** Plain-data snapshot of a controller's state (see NvmeController.saveState). */
export const saveControllerState = (c: NvmeController): ControllerState => c.saveState();
export const loadControllerState = (c: NvmeController, state: ControllerState): void => c.loadState(state);

