// Log pages (Base §5.16.1). Each builder returns the whole page; Get Log Page cuts the host's
// window out of it.

import type { ControllerContext } from './context.js';
import { COMPOSITE_TEMPERATURE, ERROR_LOG_ENTRIES } from './policy.js';
import { AdminOpcode, CommandEffect, Cqe, LogId, NSID_BROADCAST, NvmOpcode, Status } from './spec.js';
import { CommandError } from './transfer.js';
import { PageWriter } from './page-writer.js';

const ERROR_ENTRY_SIZE = 64;

/** Error Information (Figure 205): newest first. */
function errorInformation(c: ControllerContext): Uint8Array {
  const w = new PageWriter(ERROR_LOG_ENTRIES * ERROR_ENTRY_SIZE);
  c.events.errorLog.entries.forEach((e, i) => {
    const at = i * ERROR_ENTRY_SIZE;
    w.u128(at, e.errorCount);
    w.u16(at + 8, e.sqid);
    w.u16(at + 10, e.cid);
    w.u16(at + 12, (e.status << Cqe.STATUS_SHIFT) & 0xffff);
    w.u16(at + 14, e.parameterLocation);
    w.u128(at + 16, e.lba);
    w.u32(at + 24, e.nsid);
  });
  return w.bytes;
}

/** SMART / Health Information (Figure 207), controller-wide. */
function smartHealth(c: ControllerContext): Uint8Array {
  const w = new PageWriter(512);
  const s = c.smart;
  w.u8(0, 0); // critical warning: none
  w.u16(1, COMPOSITE_TEMPERATURE);
  w.u8(3, 100); // available spare
  w.u8(4, 10); // available spare threshold
  w.u8(5, 0); // percentage used
  // Data units are thousands of 512-byte units, rounded up.
  w.u128(32, Math.ceil(s.dataUnitsRead / 1000));
  w.u128(48, Math.ceil(s.dataUnitsWritten / 1000));
  w.u128(64, s.hostReadCommands);
  w.u128(80, s.hostWriteCommands);
  w.u128(96, Math.floor(s.busyTimeMs / 60_000));
  w.u128(112, s.powerCycles);
  w.u128(128, Math.floor(c.clocks.powerOnMs() / 3_600_000));
  w.u128(144, s.unsafeShutdowns);
  w.u128(160, s.mediaErrors);
  w.u128(176, c.events.errorLog.count);
  return w.bytes;
}

/** Firmware Slot Information (Figure 208): slot 1 active, holding our version. */
function firmwareSlot(c: ControllerContext): Uint8Array {
  const w = new PageWriter(512);
  w.u8(0, 1);
  const fw = c.identity.firmware;
  for (let i = 0; i < 8; i++) w.u8(8 + i, i < fw.length ? fw.charCodeAt(i) & 0x7f : 0x20);
  return w.bytes;
}

function changedNamespaces(c: ControllerContext): Uint8Array {
  const w = new PageWriter(4096);
  c.events.changedNamespaces.slice(0, 1024).forEach((nsid, i) => w.u32(i * 4, nsid));
  return w.bytes;
}

/** Commands Supported and Effects (Figure 210): what the base set and the controller's command sets handle. */
const FORMAT_EFFECTS = CommandEffect.LBA_CONTENT_CHANGE | CommandEffect.NAMESPACE_CAPABILITY_CHANGE | CommandEffect.EXCLUSIVE_PER_NAMESPACE;
const BASE_ADMIN_EFFECTS = new Map<number, number>(
  Object.values(AdminOpcode).map((op) => [op, CommandEffect.SUPPORTED | (op === AdminOpcode.FORMAT_NVM ? FORMAT_EFFECTS : 0)]),
);
const LBA_CHANGING: readonly number[] = [NvmOpcode.WRITE, NvmOpcode.WRITE_ZEROES, NvmOpcode.DATASET_MANAGEMENT];
const IO_EFFECTS = new Map<number, number>(
  Object.values(NvmOpcode).map((op) => [op, CommandEffect.SUPPORTED | (LBA_CHANGING.includes(op) ? CommandEffect.LBA_CONTENT_CHANGE : 0)]),
);

function commandEffects(c: ControllerContext): Uint8Array {
  const w = new PageWriter(4096);
  for (const [op, effects] of BASE_ADMIN_EFFECTS) w.u32(op * 4, effects);
  for (const set of c.commandSets) {
    for (const op of set.handlers?.keys() ?? []) w.u32(op * 4, CommandEffect.SUPPORTED | (set.effects?.get(op) ?? 0));
  }
  for (const [op, effects] of IO_EFFECTS) w.u32(1024 + op * 4, effects);
  return w.bytes;
}

const BUILDERS = new Map<number, (c: ControllerContext) => Uint8Array>([
  [LogId.ERROR_INFORMATION, errorInformation],
  [LogId.SMART_HEALTH, smartHealth],
  [LogId.FIRMWARE_SLOT, firmwareSlot],
  [LogId.CHANGED_NAMESPACES, changedNamespaces],
  [LogId.COMMANDS_SUPPORTED_AND_EFFECTS, commandEffects],
]);

export function buildLogPage(c: ControllerContext, lid: number, nsid: number): Uint8Array {
  const build = BUILDERS.get(lid);
  if (!build) throw new CommandError(Status.INVALID_LOG_PAGE, `log page 0x${lid.toString(16)}`);
  // No per-namespace SMART data (LPA bit 0 clear): the page is controller-wide.
  if (lid === LogId.SMART_HEALTH && nsid !== 0 && nsid !== NSID_BROADCAST) throw new CommandError(Status.INVALID_FIELD, 'per-namespace SMART');
  return build(c);
}
