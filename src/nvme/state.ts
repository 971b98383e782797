// A controller's state as plain data: registers, queues, features, asynchronous events, logs and
// counters. Everything the guest could observe lives here, so saving and loading it is a deep copy;
// timers, fetch loops and caches are derived and rebuilt after a load.

import { WARNING_TEMPERATURE } from './policy.js';
import { FeatureId } from './spec.js';

export interface SubmissionQueueState {
  qid: number;
  /** Guest-physical base address (physically contiguous: CAP.CQR = 1). */
  base: number;
  /** Entries (1-based). */
  size: number;
  /** Next entry the controller fetches. */
  head: number;
  /** Last value the host wrote to the tail doorbell. */
  tail: number;
  cqid: number;
  priority: number;
}

export interface CompletionQueueState {
  qid: number;
  base: number;
  size: number;
  /** Last value the host wrote to the head doorbell. */
  head: number;
  /** Next slot the controller posts to. */
  tail: number;
  /** Phase tag the controller writes into the next entry (starts at 1, flips on wrap). */
  phase: number;
  interruptsEnabled: boolean;
  vector: number;
}

/** A completion that waits for room in a full completion queue. */
export interface HeldCompletion {
  cqid: number;
  sqid: number;
  cid: number;
  status: number;
  dw0: number;
  dw1: number;
}

export interface AsyncEvent {
  type: number;
  info: number;
  logPage: number;
  /** Completion DW1 (a One-Shot event names its Controller Data Queue here). */
  dw1?: number;
}

export interface ErrorLogEntry {
  errorCount: number;
  sqid: number;
  cid: number;
  status: number;
  /** Byte (bits 7:0) and bit (10:8) in the command that caused the error; 0xffff when not applicable. */
  parameterLocation: number;
  lba: number;
  nsid: number;
}

export interface FeatureValues {
  arbitration: number;
  powerManagement: number;
  /** Composite temperature thresholds in kelvin. */
  temperatureOver: number;
  temperatureUnder: number;
  errorRecovery: number;
  volatileWriteCache: boolean;
  /** Number of I/O queues granted (1-based), fixed once the host has set them or created an I/O queue. */
  ioSubmissionQueues: number;
  ioCompletionQueues: number;
  interruptCoalescing: number;
  /** Vectors with coalescing disabled (Interrupt Vector Configuration CD bit). */
  coalescingDisabled: number[];
  writeAtomicityNormal: number;
  asyncEventConfig: number;
  keepAliveTimeoutMs: number;
  /** Host Behavior Support data structure (512 bytes). */
  hostBehavior: number[];
}

export interface SmartCounters {
  /** In 512-byte units (the log reports thousands of them, rounded up). */
  dataUnitsRead: number;
  dataUnitsWritten: number;
  hostReadCommands: number;
  hostWriteCommands: number;
  busyTimeMs: number;
  powerCycles: number;
  powerOnMs: number;
  unsafeShutdowns: number;
  mediaErrors: number;
}

/**
 * Clocks as relative values, true as of the instant the Clocks component anchors them (a saved
 * state: the instant it was saved). Nothing here is a host's wall-clock time.
 */
export interface ClockValues {
  /** Since the last Controller Level Reset (the Timestamp counts from here until the host sets it). */
  sinceResetMs: number;
  /** The Timestamp feature's value (ms since the epoch, as the host set it and it ran on), or null if never set. */
  timestampMs: number | null;
  /** What is left of the Keep Alive timeout; null when no timer runs. */
  keepAliveRemainingMs: number | null;
}

export interface ControllerState {
  version: 2;
  registers: { cc: number; csts: number; aqa: number; asq: number; acq: number; intms: number };
  /** Indexed by queue id; null where no queue exists. */
  submissionQueues: (SubmissionQueueState | null)[];
  completionQueues: (CompletionQueueState | null)[];
  heldCompletions: HeldCompletion[];
  /** Vectors (INTMS bit numbers) that fired while masked, raised on INTMC. */
  pendingInterrupts: number[];
  features: FeatureValues;
  asyncEvents: {
    /** CIDs of Asynchronous Event Request commands the controller holds. */
    outstanding: number[];
    queued: AsyncEvent[];
    /** Log pages whose event was reported and not yet read: further events for them wait. */
    masked: number[];
  };
  errorLog: { count: number; entries: ErrorLogEntry[] };
  smart: SmartCounters;
  changedNamespaces: number[];
  /** Doorbell Buffer Config addresses (shadow doorbells and EventIdx), null when not configured. */
  doorbellBuffer: { shadow: number; eventIdx: number } | null;
  attachedNamespaces: number[];
  clocks: ClockValues;
}


export function defaultFeatures(maxIoQueues: number): FeatureValues {
  return {
    arbitration: 0,
    powerManagement: 0,
    temperatureOver: WARNING_TEMPERATURE,
    temperatureUnder: 0,
    errorRecovery: 0,
    volatileWriteCache: true,
    ioSubmissionQueues: maxIoQueues,
    ioCompletionQueues: maxIoQueues,
    interruptCoalescing: 0,
    coalescingDisabled: [],
    writeAtomicityNormal: 0,
    asyncEventConfig: 0,
    keepAliveTimeoutMs: 0,
    hostBehavior: new Array<number>(512).fill(0),
  };
}

export function initialState(maxIoQueues: number, attachedNamespaces: number[]): ControllerState {
  return {
    version: 2,
    registers: { cc: 0, csts: 0, aqa: 0, asq: 0, acq: 0, intms: 0 },
    submissionQueues: [],
    completionQueues: [],
    heldCompletions: [],
    pendingInterrupts: [],
    features: defaultFeatures(maxIoQueues),
    asyncEvents: { outstanding: [], queued: [], masked: [] },
    errorLog: { count: 0, entries: [] },
    smart: {
      dataUnitsRead: 0,
      dataUnitsWritten: 0,
      hostReadCommands: 0,
      hostWriteCommands: 0,
      busyTimeMs: 0,
      powerCycles: 1,
      powerOnMs: 0,
      unsafeShutdowns: 0,
      mediaErrors: 0,
    },
    changedNamespaces: [],
    doorbellBuffer: null,
    attachedNamespaces: [...attachedNamespaces],
    clocks: { sinceResetMs: 0, timestampMs: null, keepAliveRemainingMs: null },
  };
}

/** Feature IDs whose values a Set Features can change (for Get Features select 3 and the effects log). */
export const CHANGEABLE_FEATURES: readonly number[] = [
  FeatureId.ARBITRATION,
  FeatureId.POWER_MANAGEMENT,
  FeatureId.TEMPERATURE_THRESHOLD,
  FeatureId.ERROR_RECOVERY,
  FeatureId.VOLATILE_WRITE_CACHE,
  FeatureId.NUMBER_OF_QUEUES,
  FeatureId.INTERRUPT_COALESCING,
  FeatureId.INTERRUPT_VECTOR_CONFIG,
  FeatureId.WRITE_ATOMICITY,
  FeatureId.ASYNC_EVENT_CONFIG,
  FeatureId.TIMESTAMP,
  FeatureId.KEEP_ALIVE_TIMER,
  FeatureId.HOST_BEHAVIOR_SUPPORT,
];

export const cloneState = (state: ControllerState): ControllerState => structuredClone(state);
