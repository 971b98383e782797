// Admin command handlers (Base §5). One implementation each, whether the command came from the
// guest's admin queue or from an in-process caller through executeAdmin().

import { DEFERRED, field64, type Command, type HandlerResult } from './command.js';
import type { AdminHandler, AttachedNamespace, ControllerContext } from './context.js';
import { getFeatures, setFeatures } from './features.js';
import {
  activeNamespaceList,
  csiIndependentNamespace,
  identifyController,
  identifyNamespace,
  ioCommandSetCombinations,
  namespaceDescriptors,
  nvmSpecificController,
  nvmSpecificNamespace,
} from './identify.js';
import { buildLogPage } from './logs.js';
import { AdminOpcode, CmdBits, Cns, Csi, IDENTIFY_SIZE, LBA_FORMATS, NSID_BROADCAST, Sqe, Status } from './spec.js';
import { CommandError, type DataTransfer } from './transfer.js';

const fail = (status: number, why: string): CommandError => new CommandError(status, why);

// ---- queues (Base §5.4, §5.5, §5.6, §5.7) --------------------------------------------------------

/** What Create I/O CQ and Create I/O SQ share: QID and QSIZE (CDW10), PC (CDW11 bit 0), PRP1. */
function parseQueue(cmd: Command): { qid: number; size: number; contiguous: boolean; base: number } {
  return { qid: cmd.cdw10 & 0xffff, size: (cmd.cdw10 >>> 16) + 1, contiguous: (cmd.cdw11 & 1) !== 0, base: field64(cmd.sqe, Sqe.PRP1) };
}

function checkQueueShape(c: ControllerContext, kind: 'CQ' | 'SQ', q: ReturnType<typeof parseQueue>): void {
  if (q.size < 2 || q.size > c.limits.maxQueueEntries) throw fail(Status.INVALID_QUEUE_SIZE, `${kind} size ${q.size}`);
  // CAP.CQR = 1: queues must be physically contiguous.
  if (!q.contiguous) throw fail(Status.INVALID_FIELD, `${kind} not physically contiguous`);
  if (q.base === 0 || q.base % c.pageSize !== 0) throw fail(Status.PRP_OFFSET_INVALID, `${kind} base 0x${q.base.toString(16)}`);
}

function createIoCompletionQueue(c: ControllerContext, cmd: Command): void {
  const q = parseQueue(cmd);
  const interruptsEnabled = (cmd.cdw11 & 2) !== 0;
  const vector = cmd.cdw11 >>> 16;
  if (q.qid === 0 || q.qid > c.features.ioCompletionQueues || c.queues.cq(q.qid)) {
    throw fail(Status.INVALID_QUEUE_IDENTIFIER, `CQ ${q.qid}`);
  }
  if (interruptsEnabled && vector >= c.limits.vectors) throw fail(Status.INVALID_INTERRUPT_VECTOR, `vector ${vector}`);
  checkQueueShape(c, 'CQ', q);
  c.queues.createCompletionQueue({ qid: q.qid, base: q.base, size: q.size, interruptsEnabled, vector: interruptsEnabled ? vector : 0 });
}

function createIoSubmissionQueue(c: ControllerContext, cmd: Command): void {
  const q = parseQueue(cmd);
  const priority = (cmd.cdw11 >>> 1) & 0x3;
  const cqid = cmd.cdw11 >>> 16;
  if (q.qid === 0 || q.qid > c.features.ioSubmissionQueues || c.queues.sq(q.qid)) {
    throw fail(Status.INVALID_QUEUE_IDENTIFIER, `SQ ${q.qid}`);
  }
  if (cqid === 0 || !c.queues.cq(cqid)) throw fail(Status.COMPLETION_QUEUE_INVALID, `CQ ${cqid}`);
  checkQueueShape(c, 'SQ', q);
  c.queues.createSubmissionQueue({ qid: q.qid, base: q.base, size: q.size, cqid, priority });
}

async function deleteIoSubmissionQueue(c: ControllerContext, cmd: Command): Promise<void> {
  const qid = cmd.cdw10 & 0xffff;
  if (qid === 0 || !c.queues.sq(qid)) throw fail(Status.INVALID_QUEUE_IDENTIFIER, `SQ ${qid}`);
  await c.queues.deleteSubmissionQueue(qid);
}

function deleteIoCompletionQueue(c: ControllerContext, cmd: Command): void {
  const qid = cmd.cdw10 & 0xffff;
  if (qid === 0 || !c.queues.cq(qid)) throw fail(Status.INVALID_QUEUE_IDENTIFIER, `CQ ${qid}`);
  if (c.queues.feedsAnySq(qid)) throw fail(Status.INVALID_QUEUE_DELETION, `CQ ${qid} still has SQs`);
  c.queues.deleteCompletionQueue(qid);
}

// ---- Identify (Base §5.17) ----------------------------------------------------------------------

/** NSID checks shared by the per-namespace CNS values: valid range, then active or not. */
function identifyTarget(c: ControllerContext, nsid: number): AttachedNamespace | undefined {
  if (nsid === 0 || nsid === NSID_BROADCAST || nsid > c.namespaces.maxNsid) throw fail(Status.INVALID_NAMESPACE, `NSID ${nsid}`);
  return c.namespaces.get(nsid);
}

async function identify(c: ControllerContext, cmd: Command, data: DataTransfer): Promise<void> {
  const cns = cmd.cdw10 & 0xff;
  const csi = cmd.cdw11 >>> 24;
  let page: Uint8Array;
  switch (cns) {
    case Cns.NAMESPACE:
      page = identifyNamespace(c, identifyTarget(c, cmd.nsid));
      break;
    case Cns.CONTROLLER:
      page = identifyController(c);
      break;
    case Cns.ACTIVE_NAMESPACES:
      if (cmd.nsid >= 0xffff_fffe) throw fail(Status.INVALID_NAMESPACE, `NSID ${cmd.nsid}`);
      page = activeNamespaceList(c, cmd.nsid);
      break;
    case Cns.NAMESPACE_DESCRIPTORS: {
      const ns = identifyTarget(c, cmd.nsid);
      if (!ns) throw fail(Status.INVALID_NAMESPACE, `NSID ${cmd.nsid} is not active`);
      page = namespaceDescriptors(ns.ids);
      break;
    }
    case Cns.CSI_NAMESPACE:
      if (csi !== Csi.NVM) throw fail(Status.INVALID_FIELD, `CSI ${csi}`);
      identifyTarget(c, cmd.nsid);
      page = nvmSpecificNamespace();
      break;
    case Cns.CSI_CONTROLLER:
      if (csi !== Csi.NVM) throw fail(Status.INVALID_FIELD, `CSI ${csi}`);
      page = nvmSpecificController();
      break;
    case Cns.CSI_ACTIVE_NAMESPACES:
      if (csi !== Csi.NVM) throw fail(Status.INVALID_FIELD, `CSI ${csi}`);
      if (cmd.nsid >= 0xffff_fffe) throw fail(Status.INVALID_NAMESPACE, `NSID ${cmd.nsid}`);
      page = activeNamespaceList(c, cmd.nsid);
      break;
    case Cns.CSI_INDEPENDENT_NAMESPACE:
      page = csiIndependentNamespace(c, identifyTarget(c, cmd.nsid));
      break;
    case Cns.IO_COMMAND_SET:
      page = ioCommandSetCombinations();
      break;
    default: {
      const build = c.commandSets.map((set) => set.identify?.get(cns)).find((b) => b !== undefined);
      if (!build) throw fail(Status.INVALID_FIELD, `CNS 0x${cns.toString(16)}`);
      page = build(c, cmd);
    }
  }
  await data.toHost(page.length === IDENTIFY_SIZE ? page : page.subarray(0, IDENTIFY_SIZE));
}

// ---- Get Log Page (Base §5.16) -----------------------------------------------------------------

async function getLogPage(c: ControllerContext, cmd: Command, data: DataTransfer): Promise<void> {
  const lid = cmd.cdw10 & 0xff;
  const retainEvent = (cmd.cdw10 & CmdBits.LOG_RETAIN_ASYNC_EVENT) !== 0;
  const dwords = (cmd.cdw10 >>> 16) + (cmd.cdw11 & 0xffff) * 0x10000 + 1;
  const offset = cmd.cdw12 + cmd.cdw13 * 0x1_0000_0000;
  const length = dwords * 4;
  if (offset % 4 !== 0) throw fail(Status.INVALID_FIELD, 'log page offset not dword aligned');
  if (length > c.maxTransferBytes) throw fail(Status.INVALID_FIELD, `log page length ${length} exceeds MDTS`);
  const page = buildLogPage(c, lid, cmd.nsid);
  if (offset > page.length) throw fail(Status.INVALID_FIELD, `log page offset ${offset} beyond ${page.length}`);
  const out = new Uint8Array(length);
  out.set(page.subarray(offset, offset + length));
  await data.toHost(out);
  if (!retainEvent) c.events.logPageRead(lid);
}

// ---- the rest -------------------------------------------------------------------------------------

/** Abort (Base §5.1): commands run to completion here, so the answer is always "not aborted". */
function abort(): HandlerResult {
  return { dw0: 1 };
}

function asyncEventRequest(c: ControllerContext, cmd: Command): HandlerResult {
  c.events.deferRequest(cmd.cid);
  return DEFERRED;
}

function keepAlive(c: ControllerContext): void {
  c.clocks.restartKeepAlive();
}

/** Doorbell Buffer Config (Base §5.8): both buffers must be page aligned. */
function doorbellBufferConfig(c: ControllerContext, cmd: Command): void {
  const shadow = field64(cmd.sqe, Sqe.PRP1);
  const eventIdx = field64(cmd.sqe, Sqe.PRP2);
  if (shadow === 0 || eventIdx === 0 || shadow % c.pageSize !== 0 || eventIdx % c.pageSize !== 0) {
    throw fail(Status.INVALID_FIELD, 'doorbell buffers must be page aligned');
  }
  // QEMU lowers a vfio-user device's INTx line only when the guest next touches a BAR (its emulated
  // EOI). With shadow doorbells the host skips those writes whenever our EventIdx lags, and the
  // line storms. Hosts treat a refusal as "no doorbell buffer" (Linux warns and goes on).
  if (c.interruptMode() === 'intx') throw fail(Status.COMMAND_SEQUENCE_ERROR, 'no doorbell buffer while interrupts are INTx');
  c.configureDoorbellBuffer(shadow, eventIdx);
}

/** Format NVM (NVM-CS §4.2 / Base §5.14): LBA format switch, optional user-data erase. */
async function formatNvm(c: ControllerContext, cmd: Command): Promise<void> {
  const lbaf = (cmd.cdw10 & 0xf) | (((cmd.cdw10 >>> 12) & 0x3) << 4);
  const metadataSettings = (cmd.cdw10 >>> 4) & 1;
  const protection = (cmd.cdw10 >>> 5) & 0x7;
  const secureErase = (cmd.cdw10 >>> 9) & 0x7;
  const targets = cmd.nsid === NSID_BROADCAST ? c.namespaces.list() : [c.namespaces.get(cmd.nsid)];
  if (targets.some((ns) => ns === undefined) || targets.length === 0) throw fail(Status.INVALID_NAMESPACE, `NSID ${cmd.nsid}`);
  if (lbaf >= LBA_FORMATS.length || protection !== 0 || metadataSettings !== 0) throw fail(Status.INVALID_FORMAT, `LBAF ${lbaf} PI ${protection}`);
  // 0: no secure erase; 1: user data erase. Cryptographic erase (2) is not offered.
  if (secureErase > 1) throw fail(Status.INVALID_FIELD, `secure erase setting ${secureErase}`);
  for (const target of targets) {
    await target!.namespace.formatNvm(lbaf, secureErase === 1);
    c.namespaceAttributesChanged(target!.namespace.nsid);
  }
}

const HANDLERS = new Map<number, AdminHandler>([
  [AdminOpcode.DELETE_IO_SQ, deleteIoSubmissionQueue],
  [AdminOpcode.CREATE_IO_SQ, createIoSubmissionQueue],
  [AdminOpcode.GET_LOG_PAGE, getLogPage],
  [AdminOpcode.DELETE_IO_CQ, deleteIoCompletionQueue],
  [AdminOpcode.CREATE_IO_CQ, createIoCompletionQueue],
  [AdminOpcode.IDENTIFY, identify],
  [AdminOpcode.ABORT, abort],
  [AdminOpcode.SET_FEATURES, setFeatures],
  [AdminOpcode.GET_FEATURES, getFeatures],
  [AdminOpcode.ASYNC_EVENT_REQUEST, asyncEventRequest],
  [AdminOpcode.KEEP_ALIVE, keepAlive],
  [AdminOpcode.DOORBELL_BUFFER_CONFIG, doorbellBufferConfig],
  [AdminOpcode.FORMAT_NVM, formatNvm],
]);

export async function executeAdminCommand(c: ControllerContext, cmd: Command, data: DataTransfer): Promise<HandlerResult> {
  const handler = HANDLERS.get(cmd.opcode) ?? c.commandSets.map((set) => set.handlers?.get(cmd.opcode)).find((h) => h !== undefined);
  if (!handler) throw fail(Status.INVALID_OPCODE, `admin opcode 0x${cmd.opcode.toString(16)}`);
  // Fused operations are not supported (Identify Controller FUSES = 0).
  if (cmd.flags & Sqe.FUSE_MASK) throw fail(Status.INVALID_FIELD, 'fused operation');
  return handler(c, cmd, data);
}
