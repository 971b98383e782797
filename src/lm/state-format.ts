// The Controller State that Migration Receive returns and Set Controller State loads: the 48-byte
// header, the standard NVMe Controller State version 0 (every I/O queue) and our vendor section
// (controller-state.proto, behind a length prefix so dword padding never reaches the decoder).
// Pure functions from a snapshot to bytes and back; checks against a target live with the commands.

import type protobuf from 'protobufjs';
import type { FunctionState } from '../pci/function.js';
import type { CompletionQueueState, ControllerState, SubmissionQueueState } from '../nvme/state.js';
import { PLAIN, protoTypes } from '../protobuf.js';
import { Nvmecs, StateHeader } from './spec.js';

/** Who the state belongs to, as its host saw it. */
export interface StateIdentity {
  nqn: string;
  cntlid: number;
  serial: string;
  /** Identify VWC last said there is none: the host never flushes, so every write must be durable on completion. */
  noVolatileWriteCache: boolean;
}

/** A namespace attached to the controller, under the NSID its host uses. */
export interface StateNamespace {
  nsid: number;
  lbaFormat: number;
  blocks: number;
  nguid: Uint8Array;
}

/**
 * Everything a migration carries. `state.attachedNamespaces` is not used here: `namespaces` says
 * what the host saw, in its own numbering.
 */
export interface MigrationSnapshot {
  state: ControllerState;
  pci: FunctionState;
  identity: StateIdentity;
  namespaces: StateNamespace[];
}

/** A state that cannot be decoded, with the reason. */
export class StateFormatError extends Error {}

const VENDOR_FORMAT_VERSION = 1;
const LENGTH_PREFIX = 4;

const vendorType = (): protobuf.Type => protoTypes(import.meta.url, './controller-state.proto', ['nvme_vfio_user.state.v1.VendorState'] as const)['nvme_vfio_user.state.v1.VendorState'];

/**
 * Loads the .proto and lets protobufjs generate its codecs now: done lazily, both cost
 * milliseconds inside a migration's downtime, the first time a server takes or loads a state.
 */
export function prepareStateFormat(): void {
  const type = vendorType();
  type.toObject(type.decode(type.encode(type.fromObject({ formatVersion: VENDOR_FORMAT_VERSION })).finish()), { ...PLAIN, defaults: true });
}

// ---- NVMECS version 0 ---------------------------------------------------------------------------

export function encodeNvmecs(state: ControllerState): Uint8Array {
  const sqs = state.submissionQueues.filter((q): q is SubmissionQueueState => q !== null && q.qid > 0);
  const cqs = state.completionQueues.filter((q): q is CompletionQueueState => q !== null && q.qid > 0);
  const out = new Uint8Array(Nvmecs.HEADER_SIZE + (sqs.length + cqs.length) * Nvmecs.ENTRY_SIZE);
  const v = new DataView(out.buffer);
  v.setUint16(Nvmecs.VER, 0, true);
  v.setUint16(Nvmecs.NIOSQ, sqs.length, true);
  v.setUint16(Nvmecs.NIOCQ, cqs.length, true);
  let at = Nvmecs.HEADER_SIZE;
  for (const sq of sqs) {
    v.setBigUint64(at + Nvmecs.SQ.PRP1, BigInt(sq.base), true);
    v.setUint16(at + Nvmecs.SQ.QSIZE, sq.size - 1, true);
    v.setUint16(at + Nvmecs.SQ.SQID, sq.qid, true);
    v.setUint16(at + Nvmecs.SQ.CQID, sq.cqid, true);
    v.setUint16(at + Nvmecs.SQ.ATTRIBUTES, Nvmecs.SQ_PC | (sq.priority << Nvmecs.SQ_QPRIO_SHIFT), true);
    v.setUint16(at + Nvmecs.SQ.HEAD, sq.head, true);
    v.setUint16(at + Nvmecs.SQ.TAIL, sq.tail, true);
    at += Nvmecs.ENTRY_SIZE;
  }
  for (const cq of cqs) {
    v.setBigUint64(at + Nvmecs.CQ.PRP1, BigInt(cq.base), true);
    v.setUint16(at + Nvmecs.CQ.QSIZE, cq.size - 1, true);
    v.setUint16(at + Nvmecs.CQ.CQID, cq.qid, true);
    v.setUint16(at + Nvmecs.CQ.HEAD, cq.head, true);
    v.setUint16(at + Nvmecs.CQ.TAIL, cq.tail, true);
    // Slots before the tail were written in this pass, with the phase the next entry carries.
    const attributes = Nvmecs.CQ_PC | (cq.interruptsEnabled ? Nvmecs.CQ_IEN : 0) | (cq.phase ? Nvmecs.CQ_S0PT : 0) | (cq.vector << Nvmecs.CQ_IV_SHIFT);
    v.setUint32(at + Nvmecs.CQ.ATTRIBUTES, attributes >>> 0, true);
    at += Nvmecs.ENTRY_SIZE;
  }
  return out;
}

export function decodeNvmecs(bytes: Uint8Array): { sqs: SubmissionQueueState[]; cqs: CompletionQueueState[] } {
  if (bytes.length < Nvmecs.HEADER_SIZE) throw new StateFormatError(`NVMe controller state of ${bytes.length} bytes`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const version = v.getUint16(Nvmecs.VER, true);
  if (version !== 0) throw new StateFormatError(`NVMe controller state version ${version} (this controller knows version 0)`);
  const nsq = v.getUint16(Nvmecs.NIOSQ, true);
  const ncq = v.getUint16(Nvmecs.NIOCQ, true);
  if (bytes.length !== Nvmecs.HEADER_SIZE + (nsq + ncq) * Nvmecs.ENTRY_SIZE) {
    throw new StateFormatError(`NVMe controller state of ${bytes.length} bytes for ${nsq} SQs and ${ncq} CQs`);
  }
  const sqs: SubmissionQueueState[] = [];
  const cqs: CompletionQueueState[] = [];
  let at = Nvmecs.HEADER_SIZE;
  for (let i = 0; i < nsq; i++, at += Nvmecs.ENTRY_SIZE) {
    const attributes = v.getUint16(at + Nvmecs.SQ.ATTRIBUTES, true);
    if (!(attributes & Nvmecs.SQ_PC)) throw new StateFormatError(`SQ ${v.getUint16(at + Nvmecs.SQ.SQID, true)} is not physically contiguous`);
    sqs.push({
      qid: v.getUint16(at + Nvmecs.SQ.SQID, true),
      base: Number(v.getBigUint64(at + Nvmecs.SQ.PRP1, true)),
      size: v.getUint16(at + Nvmecs.SQ.QSIZE, true) + 1,
      head: v.getUint16(at + Nvmecs.SQ.HEAD, true),
      tail: v.getUint16(at + Nvmecs.SQ.TAIL, true),
      cqid: v.getUint16(at + Nvmecs.SQ.CQID, true),
      priority: (attributes >> Nvmecs.SQ_QPRIO_SHIFT) & 0x3,
    });
  }
  for (let i = 0; i < ncq; i++, at += Nvmecs.ENTRY_SIZE) {
    const attributes = v.getUint32(at + Nvmecs.CQ.ATTRIBUTES, true);
    if (!(attributes & Nvmecs.CQ_PC)) throw new StateFormatError(`CQ ${v.getUint16(at + Nvmecs.CQ.CQID, true)} is not physically contiguous`);
    cqs.push({
      qid: v.getUint16(at + Nvmecs.CQ.CQID, true),
      base: Number(v.getBigUint64(at + Nvmecs.CQ.PRP1, true)),
      size: v.getUint16(at + Nvmecs.CQ.QSIZE, true) + 1,
      head: v.getUint16(at + Nvmecs.CQ.HEAD, true),
      tail: v.getUint16(at + Nvmecs.CQ.TAIL, true),
      phase: attributes & Nvmecs.CQ_S0PT ? 1 : 0,
      interruptsEnabled: (attributes & Nvmecs.CQ_IEN) !== 0,
      vector: attributes >>> Nvmecs.CQ_IV_SHIFT,
    });
  }
  return { sqs, cqs };
}

// ---- the vendor section -------------------------------------------------------------------------

interface VendorMessage {
  formatVersion: number;
  identity: StateIdentity;
  registers: ControllerState['registers'];
  adminSq: { base: number; size: number; head: number; tail: number; phase: number } | null;
  adminCq: { base: number; size: number; head: number; tail: number; phase: number } | null;
  heldCompletions: ControllerState['heldCompletions'];
  pendingInterrupts: number[];
  features: Omit<ControllerState['features'], 'hostBehavior'> & { hostBehavior: Uint8Array; ioSubmissionQueues: number; ioCompletionQueues: number };
  asyncEvents: ControllerState['asyncEvents'];
  errorLog: ControllerState['errorLog'];
  smart: ControllerState['smart'];
  changedNamespaces: number[];
  doorbellBuffer?: { shadow: number; eventIdx: number } | null;
  namespaces: StateNamespace[];
  clocks: { sinceResetMs: number; timestampMs?: number | null; keepAliveRemainingMs?: number | null };
  pci: { config: Uint8Array; msixTable: Uint8Array };
  ioQueues: Uint8Array;
}

/**
 * The vendor section; `withIoQueues` when the state has no NVMe section (CSVI 0), so this one
 * carries the I/O queues too and is complete by itself.
 */
export function encodeVendor(snapshot: MigrationSnapshot, withIoQueues = false): Uint8Array {
  const { state } = snapshot;
  const sq0 = state.submissionQueues[0];
  const cq0 = state.completionQueues[0];
  const message: VendorMessage = {
    formatVersion: VENDOR_FORMAT_VERSION,
    identity: snapshot.identity,
    registers: state.registers,
    adminSq: sq0 ? { base: sq0.base, size: sq0.size, head: sq0.head, tail: sq0.tail, phase: 0 } : null,
    adminCq: cq0 ? { base: cq0.base, size: cq0.size, head: cq0.head, tail: cq0.tail, phase: cq0.phase } : null,
    heldCompletions: state.heldCompletions,
    pendingInterrupts: state.pendingInterrupts,
    features: { ...state.features, hostBehavior: Uint8Array.from(state.features.hostBehavior) },
    asyncEvents: state.asyncEvents,
    errorLog: state.errorLog,
    smart: state.smart,
    changedNamespaces: state.changedNamespaces,
    doorbellBuffer: state.doorbellBuffer,
    namespaces: snapshot.namespaces,
    clocks: {
      sinceResetMs: Math.floor(state.clocks.sinceResetMs),
      ...(state.clocks.timestampMs !== null ? { timestampMs: Math.floor(state.clocks.timestampMs) } : {}),
      ...(state.clocks.keepAliveRemainingMs !== null ? { keepAliveRemainingMs: Math.ceil(state.clocks.keepAliveRemainingMs) } : {}),
    },
    pci: snapshot.pci,
    ioQueues: withIoQueues ? encodeNvmecs(state) : new Uint8Array(0),
  };
  const type = vendorType();
  const body = type.encode(type.fromObject({ ...message, doorbellBuffer: message.doorbellBuffer ?? undefined, smart: roundCounters(state.smart) })).finish();
  const padded = new Uint8Array(LENGTH_PREFIX + roundUp(body.length, 4));
  new DataView(padded.buffer).setUint32(0, body.length, true);
  padded.set(body, LENGTH_PREFIX);
  return padded;
}

/** Decodes the vendor section: everything but the I/O queues, unless it carries them too. */
export function decodeVendor(bytes: Uint8Array): MigrationSnapshot & { ioQueues: ReturnType<typeof decodeNvmecs> | null } {
  if (bytes.length < LENGTH_PREFIX) throw new StateFormatError('vendor state section missing its length');
  const length = new DataView(bytes.buffer, bytes.byteOffset).getUint32(0, true);
  if (length > bytes.length - LENGTH_PREFIX) throw new StateFormatError(`vendor state of ${length} bytes in a section of ${bytes.length - LENGTH_PREFIX}`);
  let m: VendorMessage;
  try {
    const type = vendorType();
    m = type.toObject(type.decode(bytes.subarray(LENGTH_PREFIX, LENGTH_PREFIX + length)), { ...PLAIN, defaults: true }) as VendorMessage;
  } catch (error) {
    throw new StateFormatError(`vendor state is corrupt: ${(error as Error).message}`);
  }
  if (m.formatVersion !== VENDOR_FORMAT_VERSION) throw new StateFormatError(`vendor state format ${m.formatVersion} (this controller knows ${VENDOR_FORMAT_VERSION})`);
  if (!m.identity || !m.registers || !m.features || !m.asyncEvents || !m.errorLog || !m.smart || !m.clocks || !m.pci) {
    throw new StateFormatError('vendor state is missing a section');
  }
  const submissionQueues: ControllerState['submissionQueues'] = [];
  const completionQueues: ControllerState['completionQueues'] = [];
  if (m.adminSq) submissionQueues[0] = { qid: 0, base: m.adminSq.base, size: m.adminSq.size, head: m.adminSq.head, tail: m.adminSq.tail, cqid: 0, priority: 0 };
  if (m.adminCq) completionQueues[0] = { qid: 0, base: m.adminCq.base, size: m.adminCq.size, head: m.adminCq.head, tail: m.adminCq.tail, phase: m.adminCq.phase, interruptsEnabled: true, vector: 0 };
  const { hostBehavior, ...features } = m.features;
  if (hostBehavior.length !== 512) throw new StateFormatError(`Host Behavior Support of ${hostBehavior.length} bytes`);
  const state: ControllerState = {
    version: 2,
    registers: m.registers,
    submissionQueues,
    completionQueues,
    heldCompletions: m.heldCompletions,
    pendingInterrupts: m.pendingInterrupts,
    features: { ...features, hostBehavior: Array.from(hostBehavior) },
    asyncEvents: m.asyncEvents,
    errorLog: m.errorLog,
    smart: m.smart,
    changedNamespaces: m.changedNamespaces,
    doorbellBuffer: m.doorbellBuffer ?? null,
    attachedNamespaces: [],
    clocks: { sinceResetMs: m.clocks.sinceResetMs, timestampMs: m.clocks.timestampMs ?? null, keepAliveRemainingMs: m.clocks.keepAliveRemainingMs ?? null },
  };
  let ioQueues: ReturnType<typeof decodeNvmecs> | null = null;
  if (m.ioQueues.length > 0) ioQueues = decodeNvmecs(m.ioQueues);
  return {
    state,
    pci: { config: Uint8Array.from(m.pci.config), msixTable: Uint8Array.from(m.pci.msixTable) },
    identity: m.identity,
    namespaces: m.namespaces.map((n) => ({ ...n, nguid: Uint8Array.from(n.nguid) })),
    ioQueues,
  };
}

// ---- the whole structure ------------------------------------------------------------------------

export interface StateSections {
  /** CSATTR bit 0: the controller stayed suspended while the state was taken. */
  suspendedThroughout: boolean;
  nvmecs: Uint8Array | null;
  vendor: Uint8Array | null;
}

export function encodeControllerState(sections: StateSections): Uint8Array {
  const nvmecs = sections.nvmecs ?? new Uint8Array(0);
  const vendor = sections.vendor ?? new Uint8Array(0);
  if (nvmecs.length % 4 !== 0 || vendor.length % 4 !== 0) throw new Error('controller state sections must be whole dwords');
  const out = new Uint8Array(StateHeader.SIZE + nvmecs.length + vendor.length);
  const v = new DataView(out.buffer);
  v.setUint16(StateHeader.VER, 0, true);
  v.setUint8(StateHeader.CSATTR, sections.suspendedThroughout ? 1 : 0);
  v.setBigUint64(StateHeader.NVMECSS, BigInt(nvmecs.length / 4), true);
  v.setBigUint64(StateHeader.VSS, BigInt(vendor.length / 4), true);
  out.set(nvmecs, StateHeader.SIZE);
  out.set(vendor, StateHeader.SIZE + nvmecs.length);
  return out;
}

export function decodeControllerState(bytes: Uint8Array): StateSections {
  if (bytes.length < StateHeader.SIZE) throw new StateFormatError(`controller state of ${bytes.length} bytes is shorter than its header`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const version = v.getUint16(StateHeader.VER, true);
  if (version !== 0) throw new StateFormatError(`controller state version ${version}`);
  const high = v.getBigUint64(StateHeader.NVMECSS + 8, true) | v.getBigUint64(StateHeader.VSS + 8, true);
  const nvmecss = Number(v.getBigUint64(StateHeader.NVMECSS, true)) * 4;
  const vss = Number(v.getBigUint64(StateHeader.VSS, true)) * 4;
  if (high !== 0n || StateHeader.SIZE + nvmecss + vss !== bytes.length) {
    throw new StateFormatError(`controller state of ${bytes.length} bytes announces ${nvmecss} + ${vss} bytes of sections`);
  }
  return {
    suspendedThroughout: (v.getUint8(StateHeader.CSATTR) & 1) !== 0,
    nvmecs: nvmecss > 0 ? bytes.subarray(StateHeader.SIZE, StateHeader.SIZE + nvmecss) : null,
    vendor: vss > 0 ? bytes.subarray(StateHeader.SIZE + nvmecss) : null,
  };
}

/** Whole-number counters for the wire (busy time and power-on time accumulate fractions). */
function roundCounters(smart: ControllerState['smart']): ControllerState['smart'] {
  return Object.fromEntries(Object.entries(smart).map(([k, v]) => [k, Math.floor(v)])) as unknown as ControllerState["smart"];
}

const roundUp = (n: number, to: number): number => Math.ceil(n / to) * to;
