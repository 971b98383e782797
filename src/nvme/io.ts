// NVM command set I/O commands (NVM-CS §3). Handlers check the namespace and LBA range, move the
// data through the DataTransfer and the namespace's backend, and count what SMART reports.

import type { Command, HandlerResult } from './command.js';
import type { ControllerContext } from './context.js';
import { andThen, attempt, type MaybePromise } from './maybe-async.js';
import type { Namespace } from './namespace.js';
import { CmdBits, NSID_BROADCAST, NvmOpcode, Sqe, Status } from './spec.js';
import { CommandError, type DataTransfer } from './transfer.js';

type IoHandler = (c: ControllerContext, ns: Namespace, cmd: Command, data: DataTransfer) => MaybePromise<HandlerResult>;

/** Bytes a Verify reads from the backend at a time (it has no data transfer, so no MDTS). */
const VERIFY_CHUNK = 1 << 20;
const UNITS_512 = 512;


interface Range {
  /** Exact: a namespace holds fewer than 2^53 blocks. */
  slba: number;
  nlb: number;
  /** Byte offset and length in the backend. */
  offset: number;
  bytes: number;
}

/** NLB: CDW12 15:0, 0-based. */
export const numberOfBlocks = (cmd: Command): number => (cmd.cdw12 & 0xffff) + 1;

/** SLBA in CDW10-11, NLB in CDW12; LBA Out of Range when it leaves the namespace. */
function lbaRange(ns: Namespace, cmd: Command): Range {
  const nlb = numberOfBlocks(cmd);
  // In numbers, not BigInt: an SLBA at or past 2^53 (CDW11 >= 2^21) is beyond every namespace.
  const slba = cmd.cdw11 * 0x1_0000_0000 + cmd.cdw10;
  if (cmd.cdw11 >= 0x20_0000 || slba + nlb > ns.blockCount) {
    throw new CommandError(Status.LBA_OUT_OF_RANGE, `LBA ${(BigInt(cmd.cdw11) << 32n) | BigInt(cmd.cdw10)}+${nlb} beyond ${ns.blockCount}`);
  }
  return { slba, nlb, offset: slba * ns.blockSize, bytes: nlb * ns.blockSize };
}

function checkTransferSize(c: ControllerContext, bytes: number): void {
  if (bytes > c.maxTransferBytes) throw new CommandError(Status.INVALID_FIELD, `transfer of ${bytes} bytes exceeds MDTS`);
}

/** Backend failures become media errors, counted for SMART. */
function media<T>(c: ControllerContext, status: number, fn: () => MaybePromise<T>): MaybePromise<T> {
  return attempt(fn, (value) => value, (err) => {
    if (err instanceof CommandError) throw err;
    // The kernel could not reach the guest's buffer (its owner truncated the memory): the data
    // pointer's fault, not the medium's.
    if ((err as NodeJS.ErrnoException).code === 'EFAULT') throw new CommandError(Status.DATA_TRANSFER_ERROR, (err as Error).message);
    c.smart.mediaErrors++;
    c.log.warn(`backend error: ${(err as Error).message}`);
    throw new CommandError(status, (err as Error).message);
  });
}

/**
 * Writes must be durable at completion with FUA, or always when the host disabled the write cache
 * or was told there is none (then it never flushes).
 */
function mustFlush(c: ControllerContext, ns: Namespace, cmd: Command): boolean {
  return ns.backend.volatileCache && ((cmd.cdw12 & CmdBits.RW_FUA) !== 0 || !c.features.volatileWriteCache || c.hostToldNoVolatileWriteCache);
}

// Reads and writes complete synchronously when the transfer and the backend do (a RAM namespace
// and mapped guest memory): no promise between the doorbell and the completion.

const read: IoHandler = (c, ns, cmd, data) => {
  const r = lbaRange(ns, cmd);
  checkTransferSize(c, r.bytes);
  const moved = data.direct(r.bytes, true, (buffers) => media(c, Status.UNRECOVERED_READ_ERROR, () => ns.backend.readv(r.offset, buffers)));
  return andThen(moved, () => {
    c.smart.hostReadCommands++;
    c.smart.dataUnitsRead += r.bytes / UNITS_512;
  });
};

const write: IoHandler = (c, ns, cmd, data) => {
  const r = lbaRange(ns, cmd);
  checkTransferSize(c, r.bytes);
  const moved = data.direct(r.bytes, false, (buffers) =>
    media(c, Status.WRITE_FAULT, () =>
      andThen(ns.backend.writev(r.offset, buffers), () => {
        c.userDataChanged(cmd.nsid, r.slba, r.nlb, false);
        if (mustFlush(c, ns, cmd)) return ns.backend.flush();
      }),
    ),
  );
  return andThen(moved, () => {
    c.smart.hostWriteCommands++;
    c.smart.dataUnitsWritten += r.bytes / UNITS_512;
  });
};

const compare: IoHandler = async (c, ns, cmd, data) => {
  const r = lbaRange(ns, cmd);
  checkTransferSize(c, r.bytes);
  const host = await data.fromHost(r.bytes);
  const stored = await media(c, Status.UNRECOVERED_READ_ERROR, () => ns.backend.read(r.offset, r.bytes));
  c.smart.hostReadCommands++;
  for (let i = 0; i < r.bytes; i++) if (host[i] !== stored[i]) throw new CommandError(Status.COMPARE_FAILURE, `differs at byte ${i}`);
};

const writeZeroes: IoHandler = async (c, ns, cmd) => {
  const r = lbaRange(ns, cmd);
  await media(c, Status.WRITE_FAULT, async () => {
    const deallocate = (cmd.cdw12 & CmdBits.WRITE_ZEROES_DEAC) !== 0;
    if (deallocate) await ns.backend.discard(r.offset, r.bytes);
    else await ns.backend.writeZeroes(r.offset, r.bytes);
    c.userDataChanged(cmd.nsid, r.slba, r.nlb, deallocate);
    if (mustFlush(c, ns, cmd)) await ns.backend.flush();
  });
  c.smart.hostWriteCommands++;
};

/** Dataset Management: Attribute - Deallocate discards the ranges; the hints are accepted and ignored. */
const datasetManagement: IoHandler = async (c, ns, cmd, data) => {
  const count = (cmd.cdw10 & 0xff) + 1;
  const deallocate = (cmd.cdw11 & CmdBits.DSM_ATTRIBUTE_DEALLOCATE) !== 0;
  const list = await data.fromHost(count * CmdBits.DSM_RANGE_SIZE);
  if (!deallocate) return;
  const view = new DataView(list.buffer, list.byteOffset, list.byteLength);
  const ranges: Range[] = [];
  for (let i = 0; i < count; i++) {
    const at = i * CmdBits.DSM_RANGE_SIZE;
    const nlb = view.getUint32(at + 4, true);
    const slba = view.getBigUint64(at + 8, true);
    if (nlb === 0) continue;
    if (!ns.inRange(slba, nlb)) throw new CommandError(Status.LBA_OUT_OF_RANGE, `DSM range ${i}: LBA ${slba}+${nlb}`);
    ranges.push({ slba: Number(slba), nlb, offset: Number(slba) * ns.blockSize, bytes: nlb * ns.blockSize });
  }
  await media(c, Status.WRITE_FAULT, async () => {
    for (const r of ranges) {
      await ns.backend.discard(r.offset, r.bytes);
      c.userDataChanged(cmd.nsid, r.slba, r.nlb, true);
    }
  });
};

/** Verify: the blocks must be readable; no data moves to the host. */
const verify: IoHandler = async (c, ns, cmd) => {
  const r = lbaRange(ns, cmd);
  await media(c, Status.UNRECOVERED_READ_ERROR, async () => {
    for (let done = 0; done < r.bytes; done += VERIFY_CHUNK) await ns.backend.read(r.offset + done, Math.min(VERIFY_CHUNK, r.bytes - done));
  });
  c.smart.hostReadCommands++;
};

const flush: IoHandler = async (c, ns) => {
  await media(c, Status.WRITE_FAULT, () => ns.backend.flush());
};

async function flushAll(c: ControllerContext): Promise<void> {
  for (const { namespace } of c.namespaces.list()) await media(c, Status.WRITE_FAULT, () => namespace.backend.flush());
}

const HANDLERS = new Map<number, IoHandler>([
  [NvmOpcode.FLUSH, flush],
  [NvmOpcode.WRITE, write],
  [NvmOpcode.READ, read],
  [NvmOpcode.COMPARE, compare],
  [NvmOpcode.WRITE_ZEROES, writeZeroes],
  [NvmOpcode.DATASET_MANAGEMENT, datasetManagement],
  [NvmOpcode.VERIFY, verify],
]);

export function executeIoCommand(c: ControllerContext, cmd: Command, data: DataTransfer): MaybePromise<HandlerResult> {
  const handler = HANDLERS.get(cmd.opcode);
  if (!handler) throw new CommandError(Status.INVALID_OPCODE, `I/O opcode 0x${cmd.opcode.toString(16)}`);
  if (cmd.flags & Sqe.FUSE_MASK) throw new CommandError(Status.INVALID_FIELD, 'fused operation');
  // Flush to FFFFFFFFh flushes every attached namespace (Identify VWC bits 2:1 = 11b).
  if (cmd.opcode === NvmOpcode.FLUSH && cmd.nsid === NSID_BROADCAST) return flushAll(c);
  const ns = c.namespaces.namespace(cmd.nsid);
  if (!ns) throw new CommandError(Status.INVALID_NAMESPACE, `NSID ${cmd.nsid}`);
  if (ns.formatting) throw new CommandError(Status.FORMAT_IN_PROGRESS, `NSID ${cmd.nsid}`);
  return ns.track(() => handler(c, ns, cmd, data));
}
