// Migration Send (41h) and Migration Receive (42h) on the Migration Management Controller (the
// primary), and Identify CNS 20h: suspend and resume a secondary, read its state out in chunks,
// and load a state into a secondary atomically (a refused state leaves the target as it was).

import type { Command, HandlerResult } from '../nvme/command.js';
import type { AdminCommandSet, AdminHandler, ControllerContext } from '../nvme/context.js';
import type { NvmeController } from '../nvme/controller.js';
import { PageWriter } from '../nvme/page-writer.js';
import { ASYNC_EVENT_LIMIT } from '../nvme/policy.js';
import { Cns, IDENTIFY_SIZE, Oacs, PrimaryOpcode, Status } from '../nvme/spec.js';
import type { CompletionQueueState, ControllerState, SubmissionQueueState } from '../nvme/state.js';
import { CommandError, type DataTransfer } from '../nvme/transfer.js';
import type { ControllingFunction } from '../nvme/virt/controlling-function.js';
import {
  MigrationReceiveSelect,
  MigrationSendSelect,
  MOS_SHIFT,
  NVMECS_VERSIONS,
  SequenceIndicator,
  SuspendType,
  VENDOR_STATE_UUID,
} from './spec.js';
import {
  decodeControllerState,
  decodeNvmecs,
  decodeVendor,
  encodeControllerState,
  encodeNvmecs,
  encodeVendor,
  StateFormatError,
  type MigrationSnapshot,
} from './state-format.js';

/** A Set Controller State sequence longer than this is refused (a state is a few KiB). */
const MAX_STATE_BYTES = 16 << 20;

const fail = (status: number, why: string): CommandError => new CommandError(status, why);

/** Hooks other migration parts add to suspend and reset (the User Data Migration Queue). */
export interface SuspendObserver {
  /** The secondary is now suspended; `deleteQueue` is Migration Send's DUDMQ. */
  suspended(cntlid: number, deleteQueue: boolean): void;
}

interface PendingState {
  chunks: Uint8Array[];
  received: number;
}

/** The state of `c` as its host saw it: the controller state, its PCI state, identity and namespaces. */
export function snapshotOf(c: NvmeController): MigrationSnapshot {
  const identity = c.identity;
  return {
    state: c.saveState(),
    pci: c.saveFunctionState(),
    identity: { nqn: identity.nqn, cntlid: identity.cntlid, serial: identity.serial, noVolatileWriteCache: c.hostToldNoVolatileWriteCache },
    namespaces: c.namespaces.list().map((a) => ({ nsid: a.nsid, lbaFormat: a.namespace.lbaFormat, blocks: a.namespace.blockCount, nguid: a.ids.nguid })),
  };
}

/** The Controller State bytes of `c` with the sections CSVI/CSUUIDI ask for. */
export function encodeStateOf(c: NvmeController, nvmecs: boolean, vendor: boolean): Uint8Array {
  const snapshot = snapshotOf(c);
  return encodeControllerState({
    suspendedThroughout: c.runState === 'suspended',
    nvmecs: nvmecs ? encodeNvmecs(snapshot.state) : null,
    vendor: vendor ? encodeVendor(snapshot, !nvmecs) : null,
  });
}

export class MigrationCommands {
  private readonly pending = new Map<number, PendingState>();
  /** A suspended controller's state, built once for a chunked Get. */
  private readonly cache = new Map<number, { key: string; bytes: Uint8Array }>();
  private readonly observers: SuspendObserver[] = [];

  constructor(private readonly cf: ControllingFunction) {}

  onSuspend(observer: SuspendObserver): void {
    this.observers.push(observer);
  }

  /**
   * Migration Send SEL 0: Suspend Notification or Suspend (stop, finish, go silent, make the
   * namespaces durable). A notification says the controller's storage is about to change hands:
   * while it runs on, its namespaces are written back and this host's page cache of them dropped,
   * in the background. Both then cost little inside the downtime: the source's suspend finds few
   * dirty pages to write, the target's Set Controller State few cached pages to drop (dropping a
   * GiB of cache took 41 ms here).
   */
  async suspend(cntlid: number, type: number, deleteQueue: boolean): Promise<void> {
    const target = this.migratable(cntlid);
    if (type === SuspendType.NOTIFICATION) {
      settleStorage(target, 'dropCache').then(
        (done) => target.log.info(`suspend notified: ${done}`),
        (err: Error) => target.log.warn(`suspend notified: ${err.message}`),
      );
      return;
    }
    if (type !== SuspendType.SUSPEND) throw fail(Status.INVALID_FIELD, `suspend type ${type}`);
    await target.suspend();
    if (target.runState !== 'suspended') throw fail(Status.COMMAND_SEQUENCE_ERROR, `controller ${cntlid} was reset while suspending`);
    for (const o of this.observers) o.suspended(cntlid, deleteQueue);
    target.log.info(`suspended: ${await settleStorage(target, 'flush')}`);
    if (target.runState !== 'suspended') throw fail(Status.COMMAND_SEQUENCE_ERROR, `controller ${cntlid} was reset or resumed while its namespaces were made durable`);
  }

  /** Migration Send SEL 1. */
  resume(cntlid: number): void {
    const target = this.migratable(cntlid);
    if (target.runState !== 'suspended') throw fail(Status.CONTROLLER_NOT_SUSPENDED, `controller ${cntlid} is ${target.runState}`);
    if (this.pending.has(cntlid)) throw fail(Status.COMMAND_SEQUENCE_ERROR, `a Set Controller State sequence for controller ${cntlid} was not committed`);
    this.cache.delete(cntlid);
    target.resume();
  }

  /** Migration Send SEL 2: one piece of a state; the last piece verifies and commits the whole. */
  async setState(cntlid: number, sequence: number, offset: number, chunk: Uint8Array, csvi: number, csuuidi: number): Promise<void> {
    const target = this.migratable(cntlid);
    if (target.runState !== 'suspended') throw fail(Status.INVALID_CONTROLLER_IDENTIFIER, `controller ${cntlid} is not suspended`);
    if (csvi === 0 && csuuidi === 0) throw fail(Status.INVALID_FIELD, 'neither an NVMe state version nor a vendor format is named');
    if (csvi > NVMECS_VERSIONS.length) throw fail(Status.INVALID_FIELD, `CSVI ${csvi}`);
    // The NVMe state alone (the I/O queues) cannot restore a controller: our vendor section is needed.
    if (csuuidi !== 1) throw fail(Status.INVALID_FIELD, `CSUUIDI ${csuuidi}: this controller loads its state only with its vendor format (CSUUIDI 1)`);
    const starts = sequence === SequenceIndicator.FIRST || sequence === SequenceIndicator.ONLY;
    if (starts) this.pending.delete(cntlid);
    const pending = this.pending.get(cntlid) ?? (starts ? { chunks: [], received: 0 } : null);
    if (!pending) throw fail(Status.COMMAND_SEQUENCE_ERROR, 'no Set Controller State sequence is in progress');
    if (offset !== pending.received) {
      this.pending.delete(cntlid);
      throw fail(Status.INVALID_FIELD, `state offset ${offset}, expected ${pending.received}`);
    }
    if (pending.received + chunk.length > MAX_STATE_BYTES) {
      this.pending.delete(cntlid);
      throw fail(Status.INVALID_FIELD, `a controller state over ${MAX_STATE_BYTES} bytes`);
    }
    pending.chunks.push(chunk);
    pending.received += chunk.length;
    if (sequence === SequenceIndicator.FIRST || sequence === SequenceIndicator.MIDDLE) {
      this.pending.set(cntlid, pending);
      return;
    }
    this.pending.delete(cntlid);
    const bytes = new Uint8Array(pending.received);
    let at = 0;
    for (const c of pending.chunks) {
      bytes.set(c, at);
      at += c.length;
    }
    const resets = target.resets;
    target.log.info(`state arriving: ${await settleStorage(target, 'dropCache')}`);
    if (target.runState !== 'suspended' || target.resets !== resets) throw fail(Status.COMMAND_SEQUENCE_ERROR, `controller ${cntlid} was reset or resumed while its state arrived`);
    loadVerified(target, bytes, csvi !== 0);
    this.cache.delete(cntlid);
  }

  /** Migration Receive SEL 0: `length` bytes of the state from `offset`; whether it stayed suspended. */
  getState(cntlid: number, csvi: number, csuuidi: number, offset: number, length: number): { data: Uint8Array; consistent: boolean } {
    const target = this.migratable(cntlid);
    if (csvi > NVMECS_VERSIONS.length) throw fail(Status.INVALID_FIELD, `CSVI ${csvi}`);
    if (csuuidi > 1) throw fail(Status.INVALID_FIELD, `CSUUIDI ${csuuidi}`);
    const suspended = target.runState === 'suspended';
    const key = `${csvi}/${csuuidi}`;
    let bytes: Uint8Array;
    const cached = this.cache.get(cntlid);
    if (suspended && cached?.key === key && offset > 0) {
      bytes = cached.bytes;
    } else {
      bytes = encodeStateOf(target, csvi === 1, csuuidi === 1);
      if (suspended) this.cache.set(cntlid, { key, bytes });
      else this.cache.delete(cntlid);
    }
    if (offset % 4 !== 0 || offset > bytes.length) throw fail(Status.INVALID_FIELD, `offset ${offset} in a state of ${bytes.length} bytes`);
    return { data: bytes.subarray(offset, offset + length), consistent: suspended && target.runState === 'suspended' };
  }

  /** A Controller Level Reset of the primary ends every sequence in progress. */
  reset(): void {
    this.pending.clear();
    this.cache.clear();
  }

  /** The target of a migration command: a secondary of this primary, never the primary itself. */
  private migratable(cntlid: number): NvmeController {
    const target = cntlid === this.cf.primary.cntlid ? undefined : this.cf.virtualization.controller(cntlid);
    if (!target) throw fail(Status.INVALID_CONTROLLER_IDENTIFIER, `CNTLID ${cntlid} is not a migratable controller of this primary`);
    return target;
  }
}

/**
 * The storage side of a move, as QEMU does for its own drives. Two hosts sharing storage each keep
 * a page cache in front of it, so the source makes what its guest wrote durable once suspended
 * (QEMU flushes its drives when it stops a VM), and the target drops what it cached before it takes
 * the state (QEMU's file driver does when the VM is activated there): it may hold blocks the source
 * has rewritten since, on its first visit of an A → B → A round trip for one.
 */
async function settleStorage(target: NvmeController, step: 'flush' | 'dropCache'): Promise<string> {
  const started = performance.now();
  const attached = target.namespaces.list();
  const what = step === 'flush' ? `${attached.length} namespace(s) made durable` : `${attached.length} namespace(s) to be re-read from storage (page cache dropped)`;
  for (const { nsid, namespace } of attached) {
    try {
      await (step === 'flush' ? namespace.backend.flush() : namespace.backend.dropCache());
    } catch (err) {
      // Detached meanwhile (its backend may be closed): nothing of it is this controller's to settle.
      if (!target.namespaces.list().some((a) => a.namespace === namespace)) continue;
      const doing = step === 'flush' ? `making namespace ${nsid} durable` : `dropping namespace ${nsid}'s page cache`;
      throw fail(Status.INTERNAL_ERROR, `controller ${target.cntlid}: ${doing} failed: ${(err as Error).message}`);
    }
  }
  return `${what} in ${(performance.now() - started).toFixed(2)} ms`;
}

/**
 * Decodes `bytes`, checks every part against `target` and its limits, and only then loads it: a
 * refused state changes nothing.
 */
function loadVerified(target: NvmeController, bytes: Uint8Array, named: boolean): void {
  let snapshot: MigrationSnapshot;
  let queues: { sqs: SubmissionQueueState[]; cqs: CompletionQueueState[] };
  let standard: boolean;
  try {
    const sections = decodeControllerState(bytes);
    // CSVI 0 with an NVMe section, or a CSVI naming one that is absent (Base §5.1.17).
    if (named !== (sections.nvmecs !== null)) throw new StateFormatError(named ? 'CSVI names an NVMe controller state the data lacks' : 'CSVI is 0 but the data holds an NVMe controller state');
    if (!sections.vendor) throw new StateFormatError('the state lacks its vendor section');
    const vendor = decodeVendor(sections.vendor);
    if (sections.nvmecs && vendor.ioQueues) throw new StateFormatError('the I/O queues appear in both sections');
    standard = sections.nvmecs !== null;
    queues = sections.nvmecs ? decodeNvmecs(sections.nvmecs) : (vendor.ioQueues ?? { sqs: [], cqs: [] });
    snapshot = vendor;
  } catch (error) {
    if (error instanceof StateFormatError) throw fail(Status.INVALID_FIELD, error.message);
    throw error;
  }
  const identity = target.identity;
  const claimed = snapshot.identity;
  if (claimed.nqn !== identity.nqn || claimed.cntlid !== identity.cntlid || claimed.serial !== identity.serial) {
    throw fail(Status.INVALID_CONTROLLER_IDENTIFIER, `state of ${claimed.nqn} controller ${claimed.cntlid}, this is ${identity.nqn} controller ${identity.cntlid}`);
  }
  const here = target.namespaces.list();
  const same =
    here.length === snapshot.namespaces.length &&
    here.every((a, i) => {
      const n = snapshot.namespaces[i]!;
      return n.nsid === a.nsid && n.lbaFormat === a.namespace.lbaFormat && n.blocks === a.namespace.blockCount && Buffer.from(n.nguid).equals(Buffer.from(a.ids.nguid));
    });
  if (!same) {
    const describe = (list: { nsid: number }[]): string => list.map((n) => n.nsid).join(',') || 'none';
    throw fail(Status.INVALID_FIELD, `the state's namespaces (${describe(snapshot.namespaces)}) differ from this controller's (${describe(here)}) in number, LBA format, size or identifiers`);
  }
  // Base §5.1.17: an NVMe controller state may not land on a controller that has I/O queues. A
  // vendor-only state replaces the suspended controller's whole state, queues included.
  if (standard && target.queues.hasIoQueues()) throw fail(Status.INVALID_FIELD, 'the target already has I/O queues');
  const pciProblem = target.checkFunctionState(snapshot.pci);
  if (pciProblem) throw fail(Status.INVALID_FIELD, pciProblem);
  const state = snapshot.state;
  for (const sq of queues.sqs) state.submissionQueues[sq.qid] = sq;
  for (const cq of queues.cqs) state.completionQueues[cq.qid] = cq;
  checkQueues(target, state);
  state.attachedNamespaces = [...target.state.attachedNamespaces];
  target.loadState(state);
  target.loadFunctionState(snapshot.pci);
  // A host told there is no volatile write cache never flushes: this controller's namespaces that
  // cache writes make each one durable until the host identifies it again.
  target.hostToldNoVolatileWriteCache = claimed.noVolatileWriteCache;
}

/** Every queue, vector and address against the target's limits and the state's own consistency. */
function checkQueues(target: NvmeController, state: ControllerState): void {
  const limits = target.limits;
  const pageSize = 1 << (12 + ((state.registers.cc >>> 7) & 0xf));
  const problem = (status: number, why: string): never => {
    throw fail(status, why);
  };
  const sqs = state.submissionQueues;
  const cqs = state.completionQueues;
  for (const [kind, list] of [['SQ', sqs], ['CQ', cqs]] as const) {
    list.forEach((q, index) => {
      if (!q) return;
      if (q.qid !== index) problem(Status.INVALID_FIELD, `${kind} ${q.qid} listed twice or out of place`);
      if (q.qid > limits.maxIoQueues) problem(Status.NOT_ENOUGH_RESOURCES, `${kind} ${q.qid}: this controller has ${limits.maxIoQueues} I/O queue pairs`);
      if (q.size < 2 || q.size > limits.maxQueueEntries) problem(Status.NOT_ENOUGH_RESOURCES, `${kind} ${q.qid} of ${q.size} entries (at most ${limits.maxQueueEntries})`);
      if (q.head >= q.size || q.tail >= q.size) problem(Status.INVALID_FIELD, `${kind} ${q.qid} head ${q.head} / tail ${q.tail} outside ${q.size} entries`);
      if (q.base <= 0 || !Number.isSafeInteger(q.base) || q.base % pageSize !== 0) problem(Status.INVALID_FIELD, `${kind} ${q.qid} base 0x${q.base.toString(16)}`);
    });
  }
  for (const cq of cqs) {
    if (!cq) continue;
    if (cq.phase !== 0 && cq.phase !== 1) problem(Status.INVALID_FIELD, `CQ ${cq.qid} phase ${cq.phase}`);
    if (cq.interruptsEnabled && cq.vector >= limits.vectors) problem(Status.NOT_ENOUGH_RESOURCES, `CQ ${cq.qid} vector ${cq.vector}: this controller has ${limits.vectors}`);
  }
  for (const sq of sqs) if (sq && !cqs[sq.cqid]) problem(Status.INVALID_FIELD, `SQ ${sq.qid} posts to CQ ${sq.cqid}, which is not in the state`);
  if (sqs[0]?.cqid !== undefined && sqs[0].cqid !== 0) problem(Status.INVALID_FIELD, 'admin SQ not paired with the admin CQ');
  if (state.registers.csts & 1 && (!sqs[0] || !cqs[0])) problem(Status.INVALID_FIELD, 'an enabled controller without its admin queues');
  const f = state.features;
  if (f.ioSubmissionQueues > limits.maxIoQueues || f.ioCompletionQueues > limits.maxIoQueues) {
    problem(Status.NOT_ENOUGH_RESOURCES, `${f.ioSubmissionQueues}/${f.ioCompletionQueues} I/O queues granted: this controller has ${limits.maxIoQueues}`);
  }
  for (const h of state.heldCompletions) if (!cqs[h.cqid] || !sqs[h.sqid]) problem(Status.INVALID_FIELD, `a held completion for CQ ${h.cqid} / SQ ${h.sqid}`);
  if (state.asyncEvents.outstanding.length > ASYNC_EVENT_LIMIT) problem(Status.INVALID_FIELD, `${state.asyncEvents.outstanding.length} outstanding Asynchronous Event Requests`);
  if (state.doorbellBuffer && (state.doorbellBuffer.shadow % pageSize !== 0 || state.doorbellBuffer.eventIdx % pageSize !== 0)) {
    problem(Status.INVALID_FIELD, 'doorbell buffer not page aligned');
  }
}

/** CNS 20h: Supported Controller State Formats. */
function supportedFormats(): Uint8Array {
  const w = new PageWriter(IDENTIFY_SIZE);
  w.u8(0, NVMECS_VERSIONS.length);
  w.u8(1, 1);
  NVMECS_VERSIONS.forEach((v, i) => w.u16(2 + 2 * i, v));
  const uuid = Buffer.from(VENDOR_STATE_UUID.replace(/-/g, ''), 'hex');
  w.bytes.set(uuid, 2 + 2 * NVMECS_VERSIONS.length);
  return w.bytes;
}

const cdw11Cntlid = (cmd: Command): number => cmd.cdw11 & 0xffff;
const mos = (cmd: Command): number => cmd.cdw10 >>> MOS_SHIFT;
const byteOffset = (cmd: Command): number => cmd.cdw12 + cmd.cdw13 * 0x1_0000_0000;

async function migrationSend(m: MigrationCommands, cmd: Command, data: DataTransfer): Promise<HandlerResult> {
  const select = cmd.cdw10 & 0xff;
  switch (select) {
    case MigrationSendSelect.SUSPEND:
      await m.suspend(cdw11Cntlid(cmd), (cmd.cdw11 >>> 16) & 0xff, (cmd.cdw11 >>> 31) !== 0);
      return;
    case MigrationSendSelect.RESUME:
      m.resume(cdw11Cntlid(cmd));
      return;
    case MigrationSendSelect.SET_CONTROLLER_STATE: {
      const sequence = mos(cmd) & 0x3;
      const dwords = cmd.cdw15 >>> 0;
      if (dwords === 0 && sequence !== SequenceIndicator.LAST) throw fail(Status.INVALID_FIELD, 'NUMD 0 outside a last piece');
      const offset = byteOffset(cmd);
      if (offset % 4 !== 0) throw fail(Status.INVALID_FIELD, 'state offset not dword aligned');
      if (dwords * 4 > MAX_STATE_BYTES) throw fail(Status.INVALID_FIELD, `NUMD ${dwords}`);
      const chunk = dwords > 0 ? await data.fromHost(dwords * 4) : new Uint8Array(0);
      await m.setState(cdw11Cntlid(cmd), sequence, offset, chunk, (cmd.cdw11 >>> 16) & 0xff, cmd.cdw11 >>> 24);
      return;
    }
    default:
      throw fail(Status.INVALID_FIELD, `Migration Send SEL ${select}`);
  }
}

async function migrationReceive(m: MigrationCommands, cmd: Command, data: DataTransfer): Promise<HandlerResult> {
  const select = cmd.cdw10 & 0xff;
  if (select !== MigrationReceiveSelect.GET_CONTROLLER_STATE) throw fail(Status.INVALID_FIELD, `Migration Receive SEL ${select}`);
  const length = ((cmd.cdw15 >>> 0) + 1) * 4;
  const { data: bytes, consistent } = m.getState(cdw11Cntlid(cmd), mos(cmd) & 0xff, (cmd.cdw11 >>> 16) & 0xff, byteOffset(cmd), length);
  await data.toHost(bytes);
  return { dw0: consistent ? 1 : 0 };
}

export function migrationCommandSet(m: MigrationCommands): AdminCommandSet {
  return {
    name: 'host managed live migration',
    handlers: new Map<number, AdminHandler>([
      [PrimaryOpcode.MIGRATION_SEND, (_c: ControllerContext, cmd, data) => migrationSend(m, cmd, data)],
      [PrimaryOpcode.MIGRATION_RECEIVE, (_c: ControllerContext, cmd, data) => migrationReceive(m, cmd, data)],
    ]),
    identify: new Map([[Cns.SUPPORTED_CONTROLLER_STATE_FORMATS, () => supportedFormats()]]),
    decorateIdentifyController(_c, page) {
      page.setUint16(256, page.getUint16(256, true) | Oacs.HOST_MANAGED_LIVE_MIGRATION, true);
    },
    controllerReset() {
      m.reset();
    },
  };
}
