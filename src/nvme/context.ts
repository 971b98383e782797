// What command handlers see of a controller: a narrow interface, so admin, I/O, feature, identify
// and log code never reaches into the controller class, and a controller can present a different
// identity (a virtual subsystem) or different limits (a secondary's assigned resources) to them.

import type { Logger } from '../log.js';
import type { InterruptMode } from '../pci/function.js';
import type { Command, HandlerResult } from './command.js';
import type { Namespace, NamespaceIds } from './namespace.js';
import type { AsyncEvent, CompletionQueueState, ControllerState, FeatureValues, SmartCounters, SubmissionQueueState } from './state.js';
import type { ErrorRecord } from './events.js';
import type { DataTransfer } from './transfer.js';
import type { Feature } from './features.js';

/** Limits a host negotiates against; a secondary's follow the resources assigned to it. */
export interface ControllerLimits {
  /** I/O queue pairs the host may have at most. */
  readonly maxIoQueues: number;
  /** Entries per queue at most (CAP.MQES + 1). */
  readonly maxQueueEntries: number;
  /** Maximum Data Transfer Size as a power of two of the minimum page size. */
  readonly mdts: number;
  /** Interrupt vectors a CQ may name. */
  readonly vectors: number;
}

/** Who the controller says it is in Identify data: the physical subsystem, or a virtual one. */
export interface ControllerIdentity {
  readonly cntlid: number;
  readonly nqn: string;
  readonly serial: string;
  readonly model: string;
  readonly firmware: string;
  /** IEEE OUI (Identify Controller bytes 75:73), 0 when none is claimed. */
  readonly ieeeOui: number;
  /** Identify Controller CMIC bit 1 and namespaces' NMIC: the subsystem may hold more than one controller. */
  readonly multiController: boolean;
}

/** A namespace as one controller's host addresses it (a virtual subsystem may renumber and rename it). */
export interface AttachedNamespace {
  /** The NSID the host uses. */
  readonly nsid: number;
  readonly namespace: Namespace;
  readonly ids: NamespaceIds;
}

export interface NamespaceView {
  /** The active namespace the host calls `nsid`. */
  get(nsid: number): AttachedNamespace | undefined;
  /** The same namespace without its host-facing identifiers: what the I/O path needs per command. */
  namespace(nsid: number): Namespace | undefined;
  /** Active namespaces in ascending host NSID order. */
  list(): AttachedNamespace[];
  /** Highest NSID the host may use (Identify Controller NN). */
  readonly maxNsid: number;
}

export interface QueueControl {
  sq(qid: number): SubmissionQueueState | undefined;
  cq(qid: number): CompletionQueueState | undefined;
  createCompletionQueue(cq: Omit<CompletionQueueState, 'head' | 'tail' | 'phase'>): void;
  createSubmissionQueue(sq: Omit<SubmissionQueueState, 'head' | 'tail'>): void;
  /** Stops fetching from the SQ, lets its running commands finish, then removes it. */
  deleteSubmissionQueue(qid: number): Promise<void>;
  deleteCompletionQueue(qid: number): void;
  /** Whether an SQ posts to CQ `cqid`. */
  feedsAnySq(cqid: number): boolean;
  hasIoQueues(): boolean;
}

export interface EventControl {
  /** Holds an Asynchronous Event Request until an event needs it. */
  deferRequest(cid: number): void;
  queue(event: AsyncEvent): void;
  /** The host read `logPage` without Retain Asynchronous Event. */
  logPageRead(logPage: number): void;
  /** The Error Information log, where failed commands are recorded. */
  recordError(entry: ErrorRecord): void;
  readonly errorLog: ControllerState['errorLog'];
  readonly changedNamespaces: readonly number[];
}

export interface ClockControl {
  restartKeepAlive(): void;
  /** Timestamp feature value now (ms) and whether the host set it. */
  timestampNow(): { value: number; hostSet: boolean };
  setTimestamp(value: number): void;
  powerOnMs(): number;
}

export interface ControllerContext {
  readonly log: Logger;
  readonly limits: ControllerLimits;
  readonly identity: ControllerIdentity;
  readonly namespaces: NamespaceView;
  /** CC.MPS in bytes. */
  readonly pageSize: number;
  /** MDTS in bytes. */
  readonly maxTransferBytes: number;
  /** Whether any active namespace sits behind a volatile cache (Identify VWC bit 0). */
  readonly volatileWriteCachePresent: boolean;
  /**
   * Identify Controller last told the host there is no volatile write cache, so it never flushes:
   * a namespace that caches writes must then make each one durable itself (attached later, or
   * after a migration to a server whose namespaces cache writes). Set by Identify, carried by
   * the migration state; kept across resets, after which a host identifies again.
   */
  hostToldNoVolatileWriteCache: boolean;
  /** Current feature values: Set Features changes them here. */
  readonly features: FeatureValues;
  readonly smart: SmartCounters;
  readonly queues: QueueControl;
  readonly events: EventControl;
  readonly clocks: ClockControl;
  /** The extensions this controller carries (a primary's virtualization and migration commands). */
  readonly commandSets: readonly AdminCommandSet[];
  interruptMode(): InterruptMode;
  configureDoorbellBuffer(shadow: number, eventIdx: number): void;
  /**
   * User data changed: the host's namespace `nsid`, `blocks` from `slba`, deallocated or written.
   * (Whoever logs user data changes for migration listens.)
   */
  userDataChanged(nsid: number, slba: number, blocks: number, deallocated: boolean): void;
  /** Tells the subsystem's other controllers that sees `nsid` that its attributes changed. */
  namespaceAttributesChanged(nsid: number): void;
}

export type ResetKind = 'controller' | 'function';

export type AdminHandler = (c: ControllerContext, cmd: Command, data: DataTransfer) => Promise<HandlerResult> | HandlerResult;
/** Builds an Identify data structure for one CNS value (the caller transfers it). */
export type IdentifyBuilder = (c: ControllerContext, cmd: Command) => Uint8Array;

/**
 * Admin commands, Identify CNS values and Identify Controller bits a controller carries beyond the
 * base set: how the primary gets Virtualization Management and the migration commands without the
 * base layer knowing them.
 */
export interface AdminCommandSet {
  readonly name: string;
  readonly handlers?: ReadonlyMap<number, AdminHandler>;
  readonly identify?: ReadonlyMap<number, IdentifyBuilder>;
  /** Features only this controller has (Get/Set Features). */
  readonly features?: ReadonlyMap<number, Feature>;
  /** Commands Supported and Effects bits for the handlers' opcodes (default: supported only). */
  readonly effects?: ReadonlyMap<number, number>;
  /** Adds this set's fields to Identify Controller (OACS bits, limits). */
  decorateIdentifyController?(c: ControllerContext, page: DataView): void;
  /**
   * A Controller Level Reset of the carrying controller: 'controller' for CC.EN 1→0 (a Controller
   * Reset), 'function' for the others (function-level, device reset).
   */
  controllerReset?(kind: ResetKind): void;
  /** The carrying controller stopped being enabled: a reset or shutdown of an enabled controller. */
  controllerDisabled?(): void;
}
