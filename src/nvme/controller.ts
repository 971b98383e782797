// The NVMe controller as a PCI function: it maps BAR0 onto the controller properties and doorbells,
// owns the controller's state, and composes the parts that act on it (queues and fetching,
// completion posting, doorbells, interrupts, events, clocks, the run-state table). Command
// semantics live in admin.ts, io.ts and the command sets a controller carries; they see the
// controller only through ControllerContext.

import type { Logger } from '../log.js';
import { loadedNative } from '../native.js';
import { PciFunction, type InterruptMode } from '../pci/function.js';
import type { DeviceContext, DeviceMigration, DmaSpace, RegionInfo, WriteObserver } from '../vfio-user/device.js';
import { PciIrq } from '../vfio-user/protocol.js';
import { Clocks } from './clocks.js';
import { DEFERRED, parseCommand, type Command } from './command.js';
import { CompletionPoster, InFlightWrites } from './completions.js';
import type { AdminCommandSet, ControllerContext, ControllerIdentity, ControllerLimits, NamespaceView, ResetKind } from './context.js';
import { DoorbellPage } from './doorbell-page.js';
import { Doorbells } from './doorbells.js';
import { AsyncEvents } from './events.js';
import { executeCommand } from './execution.js';
import { Interrupts } from './interrupts.js';
import { numberOfBlocks } from './io.js';
import { Lifecycle, type RunState } from './lifecycle.js';
import { createNamespaceView, type NamespaceNaming } from './namespace-view.js';
import type { Namespace } from './namespace.js';
import { ControllerProperties } from './properties.js';
import { QueueEngine } from './queues.js';
import {
  AdminOpcode,
  AQA,
  Cap,
  CC,
  CQE_SIZE_LOG2,
  CSTS,
  NvmOpcode,
  PciIdentity,
  Reg,
  SQE_SIZE_LOG2,
  Status,
} from './spec.js';
import { cloneState, defaultFeatures, initialState, type ControllerState, type FeatureValues, type SmartCounters } from './state.js';
import type { Subsystem, SubsystemController } from './subsystem.js';
import { BufferDataTransfer } from './transfer.js';

export type { NamespaceNaming } from './namespace-view.js';
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
  /** Admin commands beyond the base set (a primary's virtualization and migration commands). */
  commandSets?: readonly AdminCommandSet[];
  /**
   * Poll a busy SQ's shadow tail for this long (µs) after it last took commands, with EventIdx
   * keeping the host from ringing meanwhile (tail-polling.ts); 0, the default, never polls.
   */
  tailPollUs?: number;
  /**
   * Collect a deep SQ's commands every this many ms, with EventIdx keeping the host from ringing
   * meanwhile (tail-polling.ts); 0, the default, never batches.
   */
  deepQueueBatchMs?: number;
  /**
   * Offer BAR0's doorbells as a page the client maps into the guest, polled here instead of
   * trapped (doorbell-page.ts). tailPollUs is then the page's busy poll window
   * (MAPPED_DOORBELL_POLL_US when 0), and shadow tails are not polled as well.
   */
  mappedDoorbells?: boolean;
  logger?: Logger;
}

/**
 * The mapped doorbell page's busy window when none is given: longer than a TCG guest takes
 * between two QD1 submissions (about 200 µs here), so a QD1 stream is polled all along.
 */
export const MAPPED_DOORBELL_POLL_US = 1000;

export interface AdminResult {
  status: number;
  dw0: number;
  dw1: number;
  data?: Uint8Array;
  /** Why it failed, when it did. */
  detail?: string;
}

/** What a secondary controller may use, as its primary assigned it (Base §8.2.6). */
export interface SecondaryResources {
  readonly online: boolean;
  /** Virtual Queue resources: the admin queue pair and I/O queue pairs. */
  readonly queues: number;
  /** Virtual Interrupt resources: interrupt vectors. */
  readonly interrupts: number;
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

/** NVM commands whose handlers buffer NLB blocks of data. */
const DATA_OPCODES = new Set<number>([NvmOpcode.READ, NvmOpcode.WRITE, NvmOpcode.COMPARE, NvmOpcode.VERIFY]);

export class NvmeController extends PciFunction implements ControllerContext, SubsystemController {
  /** The controller's ID in its (physical) subsystem. */
  readonly cntlid: number;
  readonly subsystem: Subsystem;
  readonly log: Logger;
  private readonly carriedSets: AdminCommandSet[] = [];
  /** How a VMM migrates this function over vfio-user (set for secondaries by the live-migration layer). */
  migration: DeviceMigration | undefined;
  state: ControllerState;

  readonly lifecycle = new Lifecycle();
  readonly writes = new InFlightWrites();
  readonly interrupts: Interrupts;
  readonly events: AsyncEvents;
  readonly poster: CompletionPoster;
  readonly doorbells: Doorbells;
  /** BAR0's doorbells as a mappable, polled page (ControllerOptions.mappedDoorbells); null: trapped. */
  private readonly doorbellPage: DoorbellPage | null;
  readonly queues: QueueEngine;
  readonly clocks: Clocks;
  private readonly properties: ControllerProperties;

  /** What the function was built for; a secondary's assigned resources narrow it. */
  private readonly hardware: ControllerLimits;
  /** MDTS in bytes, checked on every data command. */
  readonly maxTransferBytes: number;
  private secondaryResources: SecondaryResources | null = null;
  private identityOverride: ControllerIdentity | null = null;
  private naming: NamespaceNaming | null = null;
  /** Bumped by every Controller Level Reset: commands of an older generation never touch the guest again. */
  private generationCount = 0;
  /** Fatal errors after the first, until the host resets the controller (logged then as a count). */
  private suppressedFatals = 0;
  private readonly writeObservers = new Map<WriteObserver, { stop: (() => void) | null }>();
  private readonly userDataObservers = new Set<UserDataObserver>();

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
    const maxQueueEntries = options.maxQueueEntries ?? 1024;
    if (maxQueueEntries < 2 || maxQueueEntries > 0x10000) throw new RangeError(`maxQueueEntries ${maxQueueEntries}`);
    this.hardware = { maxIoQueues, maxQueueEntries, mdts: options.mdts ?? 8, vectors };
    this.maxTransferBytes = (1 << MIN_PAGE_SHIFT) * 2 ** this.hardware.mdts;
    this.subsystem = options.subsystem;
    this.cntlid = options.cntlid ?? this.subsystem.allocateCntlid();
    this.carriedSets.push(...(options.commandSets ?? []));
    this.log = (options.logger ?? this.subsystem.log).child(`ctrl${this.cntlid}`);
    this.state = initialState(maxIoQueues, [...this.subsystem.namespaces.keys()]);

    // The parts read `state` through getters: loadState() replaces the whole object.
    const self = this;
    const touchesHost = (): boolean => this.lifecycle.touchesHost && this.context !== null;
    this.interrupts = new Interrupts({
      get state() {
        return self.state;
      },
      interruptMode: () => this.interruptMode(),
      raise: (vector) => void this.raiseInterrupt(vector),
      touchesHost,
    });
    this.events = new AsyncEvents({
      get state() {
        return self.state;
      },
      // Events wait from the moment a suspend begins: outstanding requests stay outstanding.
      touchesHost: () => this.lifecycle.fetches && this.context !== null,
      completeRequest: (cid, dw0, dw1) => this.poster.post({ cqid: 0, sqid: 0, cid, status: Status.SUCCESS, dw0, dw1 }),
    });
    this.poster = new CompletionPoster({
      get state() {
        return self.state;
      },
      interrupts: this.interrupts,
      writes: this.writes,
      postingDma: () => (touchesHost() ? this.context!.dma : null),
      isFatal: () => (this.state.registers.csts & CSTS.CFS) !== 0,
      generation: () => this.generationCount,
      completionGone: (entry) => this.queues.completionGone(entry),
      completionHeld: (cq) => this.doorbells.refreshShadowHead(cq),
      completionPosted: (cq) => this.doorbells.watchHead(cq),
      fatal: (reason) => this.fatal(reason),
    });
    this.doorbells = new Doorbells({
      get state() {
        return self.state;
      },
      log: this.log,
      events: this.events,
      poster: this.poster,
      interrupts: this.interrupts,
      writes: this.writes,
      acceptsDoorbells: () => this.acceptsDoorbells(),
      hostDma: () => (touchesHost() ? this.context!.dma : null),
      interruptMode: () => this.interruptMode(),
      kick: (qid) => this.queues.kick(qid),
      fatal: (reason) => this.fatal(reason),
      tailPollUs: options.mappedDoorbells ? 0 : (options.tailPollUs ?? 0),
      deepQueueBatchMs: options.deepQueueBatchMs ?? 0,
      // Only a mapped page needs the values: trapped doorbells pay nothing for it per fetch round.
      registerValue: options.mappedDoorbells ? (index, value, why) => (why === 'start' ? this.doorbellPage?.set(index, value) : this.doorbellPage?.sync(index, value)) : null,
    });
    this.doorbellPage = options.mappedDoorbells
      ? new DoorbellPage(loadedNative(), BAR0_SIZE, options.tailPollUs || MAPPED_DOORBELL_POLL_US, {
          get state() {
            return self.state;
          },
          serving: () => this.acceptsDoorbells() && this.lifecycle.state === 'running' && this.context !== null,
          write: (index, value) => this.doorbells.write(index, value),
        })
      : null;
    this.queues = new QueueEngine({
      get state() {
        return self.state;
      },
      log: this.log,
      doorbells: this.doorbells,
      poster: this.poster,
      get pageSize() {
        return self.pageSize;
      },
      generation: () => this.generationCount,
      fetchDma: () => (this.canFetch() ? this.context!.dma : null),
      dataBytes: (cmd) => this.dataBytes(cmd),
      execute: (cmd, transfer, isAdmin) => executeCommand(this, cmd, transfer, isAdmin),
      fatal: (reason) => this.fatal(reason),
    });
    this.clocks = new Clocks({
      get state() {
        return self.state;
      },
      keepAliveArmed: () => this.lifecycle.timersRun && this.enabled,
      keepAliveExpired: (timeout) => this.fatal(`keep alive timeout (${timeout} ms) expired`),
    });
    this.properties = new ControllerProperties({
      get state() {
        return self.state;
      },
      interrupts: this.interrupts,
      get cap() {
        return self.cap;
      },
      get visibleCsts() {
        return self.visibleCsts;
      },
      enable: () => this.enable(),
      controllerReset: (reason) => this.controllerReset(reason),
      shutdown: () => void this.shutdown(),
    });
    this.subsystem.registerController(this);
  }

  // ---- what handlers see (ControllerContext) -----------------------------------------------------

  get commandSets(): readonly AdminCommandSet[] {
    return this.carriedSets;
  }

  /** Gives the controller more admin commands (a primary gets its management and migration sets). */
  addCommandSet(set: AdminCommandSet): void {
    this.carriedSets.push(set);
  }

  get limits(): ControllerLimits {
    const r = this.secondaryResources;
    if (!r) return this.hardware;
    return {
      ...this.hardware,
      maxIoQueues: Math.max(0, Math.min(this.hardware.maxIoQueues, r.queues - 1)),
      vectors: Math.min(this.hardware.vectors, r.interrupts),
    };
  }

  get identity(): ControllerIdentity {
    if (this.identityOverride) return this.identityOverride;
    const sub = this.subsystem;
    return {
      cntlid: this.cntlid,
      nqn: sub.nqn,
      serial: sub.serial,
      model: sub.model,
      firmware: sub.firmware,
      ieeeOui: 0,
      multiController: sub.controllers.size > 1,
    };
  }

  get namespaces(): NamespaceView {
    return this.namespaceView;
  }

  private readonly namespaceView = createNamespaceView({
    naming: () => this.naming,
    attached: () => this.state.attachedNamespaces,
    attachedNamespace: (nsid) => (this.isAttached(nsid) ? this.subsystem.namespace(nsid) : undefined),
    maxNamespaces: () => this.subsystem.maxNamespaces,
  });

  get features(): FeatureValues {
    return this.state.features;
  }

  get smart(): SmartCounters {
    return this.state.smart;
  }

  get cap(): bigint {
    const low = (this.hardware.maxQueueEntries - 1) | (1 << Cap.CQR_SHIFT) | (READY_TIMEOUT << Cap.TO_SHIFT);
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

  get volatileWriteCachePresent(): boolean {
    return this.namespaces.list().some((a) => a.namespace.backend.volatileCache);
  }

  hostToldNoVolatileWriteCache = false;

  override interruptMode(): InterruptMode {
    return super.interruptMode();
  }

  configureDoorbellBuffer(shadow: number, eventIdx: number): void {
    this.doorbells.configureBuffer(shadow, eventIdx);
  }

  namespaceAttributesChanged(nsid: number): void {
    this.subsystem.notifyNamespaceChanged(nsid, this);
  }

  userDataChanged(hostNsid: number, slba: number, blocks: number, deallocated: boolean): void {
    if (this.userDataObservers.size === 0) return;
    const nsid = this.naming ? this.naming.physical(hostNsid) : hostNsid;
    if (nsid === undefined) return;
    // The observers' LBAs are 64-bit; the I/O path keeps SLBA a number (below 2^53, see io.ts).
    const lba = BigInt(slba);
    for (const observer of this.userDataObservers) observer(nsid, lba, blocks, deallocated);
  }

  // ---- observers (live migration's tracking) -----------------------------------------------------

  /** Calls `observer` for every range of guest memory this controller writes; returns the unsubscribe. */
  observeWrites(observer: WriteObserver): () => void {
    const subscription = { stop: this.context?.dma.observeWrites?.(observer) ?? null };
    this.writeObservers.set(observer, subscription);
    return () => {
      subscription.stop?.();
      this.writeObservers.delete(observer);
    };
  }

  /** Calls `observer` (with the subsystem's NSIDs) whenever this controller changes user data. */
  observeUserData(observer: UserDataObserver): () => void {
    this.userDataObservers.add(observer);
    return () => this.userDataObservers.delete(observer);
  }

  /**
   * The memory of this controller's host, while it has one and may touch it: where a primary posts
   * the Controller Data Queues its host created.
   */
  hostMemory(): DmaSpace | null {
    return this.lifecycle.touchesHost && this.context !== null ? this.context.dma : null;
  }

  /** Observers follow the controller from client to client: each client's DMA space reports the writes. */
  override attach(context: DeviceContext): void {
    super.attach(context);
    for (const subscription of this.writeObservers.values()) subscription.stop?.();
    for (const [observer, subscription] of this.writeObservers) subscription.stop = context.dma.observeWrites?.(observer) ?? null;
    this.doorbellPage?.poll();
  }

  // ---- roles: what the virtualization layer sets ------------------------------------------------

  /** A secondary's assigned resources (null for a primary or a peer controller). */
  setSecondaryResources(resources: SecondaryResources | null): void {
    this.secondaryResources = resources;
  }

  get isSecondary(): boolean {
    return this.secondaryResources !== null;
  }

  /** An offline secondary shows CSTS.CFS to its host and processes nothing. */
  get online(): boolean {
    return this.secondaryResources?.online ?? true;
  }

  /** What the host sees of itself: a virtual subsystem's identity and namespace naming, or the physical ones. */
  present(identity: ControllerIdentity | null, naming: NamespaceNaming | null): void {
    this.identityOverride = identity;
    this.naming = naming;
  }

  get presentsVirtualIdentity(): boolean {
    return this.identityOverride !== null;
  }

  // ---- namespaces (SubsystemController; NSIDs here are the subsystem's) --------------------------

  isAttached(nsid: number): boolean {
    return this.state.attachedNamespaces.includes(nsid);
  }

  attachNamespace(nsid: number): void {
    if (this.isAttached(nsid)) return;
    this.state.attachedNamespaces.push(nsid);
    this.state.attachedNamespaces.sort((a, b) => a - b);
    this.namespaceChanged(nsid);
    this.subsystem.attachmentChanged();
  }

  detachNamespace(nsid: number): void {
    if (!this.isAttached(nsid)) return;
    this.state.attachedNamespaces = this.state.attachedNamespaces.filter((n) => n !== nsid);
    this.namespaceChanged(nsid);
    this.subsystem.attachmentChanged();
  }

  /** The subsystem's namespace `nsid` changed: tell this host, under the NSID it knows it by. */
  namespaceChanged(nsid: number): void {
    const hostNsid = this.naming ? this.naming.host(nsid) : nsid;
    if (hostNsid !== undefined) this.events.namespaceChanged(hostNsid);
  }

  /** The active namespace the host calls `nsid`. */
  namespace(hostNsid: number): Namespace | undefined {
    return this.namespaces.namespace(hostNsid);
  }

  attachedNamespaces(): Namespace[] {
    return this.namespaces.list().map((a) => a.namespace);
  }

  // ---- PciFunction ------------------------------------------------------------------------------

  protected barRead(bar: number, offset: number, count: number): Uint8Array {
    const out = new Uint8Array(count);
    if (bar !== 0) return out;
    for (let i = 0; i < count; ) {
      const at = offset + i;
      const dword = at & ~3;
      const value = dword < Reg.DOORBELLS ? this.properties.read(dword) : 0; // doorbells are write-only
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
        let value = n === 4 ? 0 : dword < Reg.DOORBELLS ? this.properties.read(dword) : 0;
        for (let b = 0; b < n; b++) {
          const shift = (within + b) * 8;
          value = (value & ~(0xff << shift)) | (data[i + b]! << shift);
        }
        if (dword >= Reg.DOORBELLS) this.trappedDoorbell((dword - Reg.DOORBELLS) >>> 2, value >>> 0);
        else this.properties.write(dword, value >>> 0);
        i += n;
      }
    } catch (err) {
      // Never let a guest write crash the process: the controller goes fatal instead.
      this.fatal(`BAR0 write at 0x${offset.toString(16)} failed: ${(err as Error).stack ?? String(err)}`);
    }
  }

  private trappedDoorbell(index: number, value: number): void {
    this.doorbellPage?.trapped(index, value);
    this.doorbells.write(index, value);
  }

  protected override onDetach(): void {
    const summary = this.doorbellPage?.clientLeft();
    if (summary) this.log.info(summary);
  }

  protected override barMmap(bar: number): RegionInfo['mmap'] | undefined {
    return bar === 0 ? this.doorbellPage?.region() : undefined;
  }

  protected resetDevice(): void {
    this.resetController('function-level reset');
  }

  /** Back to a powered-on, disabled controller (registers included); PCI config space is untouched. */
  resetController(reason: string): void {
    this.controllerReset(reason, 'function');
    this.state.registers = { cc: 0, csts: 0, aqa: 0, asq: 0, acq: 0, intms: 0 };
  }

  // A new client has not mapped guest memory yet when it attaches: completions held while no
  // client was there are posted at the host's next doorbell or bus-master enable, not now.

  protected override onBusMasterChange(enabled: boolean): void {
    if (!enabled) return;
    this.poster.releaseAll();
    this.queues.kickAll();
  }

  irqsChanged(index: number): void {
    if (index === PciIrq.INTX) this.interrupts.intxRearmed();
  }

  // ---- CC/CSTS (Base §3.1.4, §3.5) ---------------------------------------------------------------

  /** CSTS as the host reads it: an offline secondary shows Controller Fatal Status. */
  get visibleCsts(): number {
    return this.online ? this.state.registers.csts : this.state.registers.csts | CSTS.CFS;
  }

  /** Doorbells count while the controller is ready and not fatal (an offline secondary's do not). */
  private acceptsDoorbells(): boolean {
    return (this.state.registers.csts & (CSTS.RDY | CSTS.CFS)) === CSTS.RDY && this.online;
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
    if (!this.online) problems.push('the secondary controller is offline');
    if (problems.length > 0) {
      this.fatal(`enable refused: ${problems.join(', ')}`);
      return;
    }
    this.queues.createAdminQueues(r.asq, r.acq, asqs, acqs);
    r.csts = CSTS.RDY;
    this.doorbellPage?.poll();
    this.log.debug(`enabled: admin SQ ${asqs} @0x${r.asq.toString(16)}, CQ ${acqs} @0x${r.acq.toString(16)}, page ${this.pageSize}`);
  }

  /**
   * Controller Level Reset: every queue, command and feature value is gone; AQA/ASQ/ACQ stay. It
   * also ends a suspension (TP4159: a reset of a migratable controller clears its suspended state).
   */
  controllerReset(reason: string, kind: ResetKind = 'controller'): void {
    const r = this.state.registers;
    const wasEnabled = (r.csts & CSTS.RDY) !== 0;
    if (wasEnabled && ((r.csts & CSTS.SHST_MASK) >>> CSTS.SHST_SHIFT) !== CSTS.SHST_COMPLETE) this.state.smart.unsafeShutdowns++;
    this.generationCount++;
    this.log.debug(`controller reset (${reason})`);
    if (this.suppressedFatals > 0) {
      this.log.warn(`${this.suppressedFatals} further fatal errors before this reset were not logged`);
      this.suppressedFatals = 0;
    }
    const wasSilent = this.lifecycle.state === 'quiescing' || this.lifecycle.state === 'suspended';
    if (wasSilent) this.lifecycle.move('running');
    this.queues.reset();
    this.interrupts.reset();
    this.clocks.reset();
    if (wasSilent) this.clocks.resume();
    const s = this.state;
    s.submissionQueues = [];
    s.completionQueues = [];
    s.heldCompletions = [];
    s.pendingInterrupts = [];
    s.features = defaultFeatures(this.limits.maxIoQueues);
    s.asyncEvents = { outstanding: [], queued: [], masked: [] };
    s.doorbellBuffer = null;
    this.doorbellPage?.clear();
    r.intms = 0;
    for (const set of this.commandSets) {
      set.controllerReset?.(kind);
      if (wasEnabled) set.controllerDisabled?.();
    }
    // Reads land in guest memory straight from the backend: until the commands already running
    // have finished, CSTS.RDY stays set, so the host (which waits for RDY=0) reuses no buffer we
    // may still write. Their completions are dropped either way.
    const running = this.queues.commandsRunning > 0;
    r.csts = running ? CSTS.RDY : 0;
    if (running) {
      const generation = this.generationCount;
      void this.queues.waitIdle().then(() => {
        if (generation === this.generationCount && !(r.cc & CC.EN)) r.csts &= ~CSTS.RDY;
      });
    }
  }

  private async shutdown(): Promise<void> {
    const generation = this.generationCount;
    const r = this.state.registers;
    r.csts = (r.csts & ~CSTS.SHST_MASK) | (CSTS.SHST_OCCURRING << CSTS.SHST_SHIFT);
    try {
      await this.queues.waitIdle();
      for (const ns of this.attachedNamespaces()) await ns.backend.flush();
    } catch (err) {
      this.log.warn(`flush during shutdown failed: ${(err as Error).message}`);
    }
    if (generation !== this.generationCount) return;
    r.csts = (r.csts & ~CSTS.SHST_MASK) | (CSTS.SHST_COMPLETE << CSTS.SHST_SHIFT);
    for (const set of this.commandSets) set.controllerDisabled?.();
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

  // ---- commands ---------------------------------------------------------------------------------

  private canFetch(): boolean {
    const r = this.state.registers;
    return (
      (r.csts & (CSTS.RDY | CSTS.CFS | CSTS.SHST_MASK)) === CSTS.RDY &&
      this.lifecycle.fetches &&
      this.online &&
      this.context !== null &&
      this.busMasterEnabled
    );
  }

  /** Data an I/O command moves (what its handler will allocate), for the in-flight budget. */
  private dataBytes(cmd: Command): number {
    if (!DATA_OPCODES.has(cmd.opcode)) return 0;
    const ns = this.namespace(cmd.nsid);
    return ns ? numberOfBlocks(cmd) * ns.blockSize : 0;
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
    const result = await executeCommand(this, cmd, transfer, true);
    if (result === DEFERRED) return { status: Status.INTERNAL_ERROR, dw0: 0, dw1: 0 };
    return { ...result, ...(transfer.output ? { data: transfer.output } : {}) };
  }

  // ---- run state (TP4159 suspend/resume, vfio-user RUNNING/STOP) --------------------------------

  /** Controller Level Resets so far: an operation that awaited across one must not act on what it saw before. */
  get resets(): number {
    return this.generationCount;
  }

  get runState(): RunState {
    return this.lifecycle.state;
  }

  /**
   * Stops fetching, lets every fetched command finish and post (outstanding Asynchronous Event
   * Requests stay outstanding), waits for message-based writes in flight, then goes silent: no
   * guest memory access and no interrupt until resume(). Idempotent.
   */
  async suspend(): Promise<void> {
    if (this.lifecycle.state === 'suspended' || this.lifecycle.state === 'stopped') return;
    // The guest's last stores to a mapped doorbell page belong to the state about to be saved.
    this.doorbellPage?.scan();
    if (this.lifecycle.state === 'running') {
      this.lifecycle.move('quiescing');
      this.clocks.pause();
    }
    for (;;) {
      await this.queues.waitIdle();
      const writes = this.writes.whenSettled();
      if (!writes) break;
      await writes;
    }
    // A controller reset meanwhile ended the suspension. Interrupts due or gathering go out
    // before the controller falls silent.
    if (this.lifecycle.state !== 'quiescing') return;
    this.interrupts.flush();
    this.lifecycle.move('suspended');
  }

  /** Back to running: what waited while silent (completions, events, interrupts, EventIdx) goes out. */
  resume(): void {
    if (this.lifecycle.state === 'running' || this.lifecycle.state === 'stopped') return;
    this.lifecycle.move('running');
    this.clocks.resume();
    this.doorbells.publishAll();
    this.poster.releaseAll();
    this.events.deliver();
    // Doorbells written while silent were ignored: the CQ heads the host moved meanwhile are only
    // in its shadow doorbells. Read every one back, or the stale head just published as EventIdx
    // tells the host it need not ring again (SQ tails are read back by the fetch loops).
    for (const cq of this.state.completionQueues) if (cq) this.doorbells.refreshShadowHead(cq);
    // Then interrupt for what is still unconsumed, judged by those heads rather than stale ones.
    this.interrupts.raiseUnconsumed();
    this.queues.kickAll();
    this.doorbellPage?.poll();
  }

  /** Same as suspend(): the name the first callers used. */
  quiesce(): Promise<void> {
    return this.suspend();
  }

  get isQuiesced(): boolean {
    return this.lifecycle.state === 'suspended';
  }

  /** Releases timers and leaves the subsystem; the namespaces stay with the subsystem. */
  dispose(): void {
    this.controllerReset('disposed');
    this.lifecycle.move('stopped');
    this.clocks.dispose();
    this.interrupts.dispose();
    this.doorbellPage?.dispose();
    this.subsystem.unregisterController(this);
  }

  // ---- state ------------------------------------------------------------------------------------

  /** Plain-data snapshot; meaningful once suspended (commands in flight are not part of it). */
  saveState(): ControllerState {
    this.clocks.normalize();
    return cloneState(this.state);
  }

  /** Replaces the controller's state and rebuilds everything derived from it. */
  loadState(state: ControllerState): void {
    if (state.version !== 2) throw new Error(`unsupported controller state version ${String(state.version)}`);
    this.generationCount++;
    this.state = cloneState(state);
    this.queues.rebuild();
    this.clocks.rebase();
    this.queues.kickAll();
    this.doorbellPage?.poll();
  }
}

export type UserDataObserver = (nsid: number, slba: bigint, blocks: number, deallocated: boolean) => void;

/** Plain-data snapshot of a controller's state (see NvmeController.saveState). */
export const saveControllerState = (c: NvmeController): ControllerState => c.saveState();
export const loadControllerState = (c: NvmeController, state: ControllerState): void => c.loadState(state);
