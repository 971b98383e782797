// The primary controller's management commands: Virtualization Management (Base §5.22), Namespace
// Attachment (§5.19), and the Identify structures that describe the controllers (CNS 12h, 13h,
// 14h, 15h; §5.17.2). Only the controlling function carries them.

import type { Command, HandlerResult } from '../command.js';
import type { AdminCommandSet, AdminHandler, ControllerContext } from '../context.js';
import { PageWriter } from '../page-writer.js';
import { CommandEffect, Cns, IDENTIFY_SIZE, NamespaceAttachSelect, NSID_BROADCAST, Oacs, PrimaryOpcode, Status, VirtResource } from '../spec.js';
import type { Subsystem } from '../subsystem.js';
import { CommandError, type DataTransfer } from '../transfer.js';
import type { Virtualization } from './virtualization.js';

/** A Controller List (Base Figure "Controller List Format"): a count, then up to 2047 CNTLIDs. */
const CONTROLLER_LIST_MAX = 2047;
/** Secondary Controller List: at most 127 entries of 32 bytes after a 32-byte header. */
const SECONDARY_LIST_MAX = 127;
const SECONDARY_ENTRY_SIZE = 32;

export interface ManagementTarget {
  readonly subsystem: Subsystem;
  readonly virtualization: Virtualization;
}

function controllerList(ids: number[], from: number): Uint8Array {
  const w = new PageWriter(IDENTIFY_SIZE);
  const selected = ids.filter((id) => id >= from).sort((a, b) => a - b).slice(0, CONTROLLER_LIST_MAX);
  w.u16(0, selected.length);
  selected.forEach((id, i) => w.u16(2 + i * 2, id));
  return w.bytes;
}

/** CNS 14h: Primary Controller Capabilities. */
function primaryCapabilities(target: ManagementTarget): Uint8Array {
  const w = new PageWriter(IDENTIFY_SIZE);
  const v = target.virtualization;
  w.u16(0, v.primary.cntlid);
  w.u16(2, 0); // PORTID: one PCIe port
  w.u8(4, 0x3); // CRT: VQ and VI resources are supported
  const put = (at: number, type: (typeof VirtResource)[keyof typeof VirtResource]): void => {
    const r = v.report(type);
    w.u32(at, r.flexibleTotal);
    w.u32(at + 4, r.assignedToSecondaries);
    w.u16(at + 8, r.allocatedToPrimary);
    w.u16(at + 10, r.primaryPrivate);
    w.u16(at + 12, r.maxPerSecondary);
    w.u16(at + 14, r.granularity);
  };
  put(32, VirtResource.QUEUE);
  put(64, VirtResource.INTERRUPT);
  return w.bytes;
}

/** CNS 15h: Secondary Controller List, entries with SCID >= CDW10.CNTID. */
function secondaryList(target: ManagementTarget, from: number): Uint8Array {
  const w = new PageWriter(IDENTIFY_SIZE);
  const entries = target.virtualization.secondaries().filter((e) => e.scid >= from).slice(0, SECONDARY_LIST_MAX);
  w.u8(0, entries.length);
  entries.forEach((e, i) => {
    const at = 32 + i * SECONDARY_ENTRY_SIZE;
    w.u16(at, e.scid);
    w.u16(at + 2, target.virtualization.primary.cntlid);
    w.u8(at + 4, e.online ? 1 : 0);
    w.u16(at + 8, e.vfn);
    w.u16(at + 10, e.nvq);
    w.u16(at + 12, e.nvi);
  });
  return w.bytes;
}

/** CDW10 bits 31:16 of Identify: the CNTID a list starts from. */
const cntid = (cmd: Command): number => cmd.cdw10 >>> 16;

function virtualizationManagement(target: ManagementTarget, cmd: Command): HandlerResult {
  const action = cmd.cdw10 & 0xf;
  const type = (cmd.cdw10 >>> 8) & 0x7;
  const cntlid = cmd.cdw10 >>> 16;
  const count = cmd.cdw11 & 0xffff;
  return { dw0: target.virtualization.manage(action, type, cntlid, count) };
}

async function namespaceAttachment(target: ManagementTarget, cmd: Command, data: DataTransfer): Promise<HandlerResult> {
  const select = cmd.cdw10 & 0xf;
  if (select !== NamespaceAttachSelect.ATTACH && select !== NamespaceAttachSelect.DETACH) throw new CommandError(Status.INVALID_FIELD, `SEL ${select}`);
  const subsystem = target.subsystem;
  if (cmd.nsid === 0 || cmd.nsid === NSID_BROADCAST || !subsystem.namespace(cmd.nsid)) throw new CommandError(Status.INVALID_NAMESPACE, `NSID ${cmd.nsid}`);
  const list = await data.fromHost(IDENTIFY_SIZE);
  const view = new DataView(list.buffer, list.byteOffset, list.byteLength);
  const count = view.getUint16(0, true);
  if (count === 0 || count > CONTROLLER_LIST_MAX) throw new CommandError(Status.CONTROLLER_LIST_INVALID, `${count} controllers listed`);
  const ids = Array.from({ length: count }, (_, i) => view.getUint16(2 + i * 2, true));
  if (new Set(ids).size !== ids.length) throw new CommandError(Status.CONTROLLER_LIST_INVALID, 'a controller is listed twice');
  const controllers = ids.map((id) => subsystem.controllers.get(id));
  if (controllers.some((c) => c === undefined)) throw new CommandError(Status.CONTROLLER_LIST_INVALID, `unknown CNTLID in ${ids.join(',')}`);
  const attach = select === NamespaceAttachSelect.ATTACH;
  // All or nothing: check every controller before changing any.
  for (const [i, c] of controllers.entries()) {
    if (attach && c!.isAttached(cmd.nsid)) throw new CommandError(Status.NAMESPACE_ALREADY_ATTACHED, `NSID ${cmd.nsid} on CNTLID ${ids[i]}`);
    if (!attach && !c!.isAttached(cmd.nsid)) throw new CommandError(Status.NAMESPACE_NOT_ATTACHED, `NSID ${cmd.nsid} on CNTLID ${ids[i]}`);
  }
  // Each affected controller reports the change to its own host (Changed Namespace List, notice).
  for (const c of controllers) {
    if (attach) c!.attachNamespace(cmd.nsid);
    else c!.detachNamespace(cmd.nsid);
  }
}

export function managementCommands(target: ManagementTarget): AdminCommandSet {
  return {
    name: 'virtualization management',
    handlers: new Map<number, AdminHandler>([
      [PrimaryOpcode.VIRTUALIZATION_MANAGEMENT, (_c: ControllerContext, cmd: Command) => virtualizationManagement(target, cmd)],
      [PrimaryOpcode.NAMESPACE_ATTACHMENT, (_c: ControllerContext, cmd: Command, data: DataTransfer) => namespaceAttachment(target, cmd, data)],
    ]),
    effects: new Map([[PrimaryOpcode.NAMESPACE_ATTACHMENT, CommandEffect.NAMESPACE_INVENTORY_CHANGE]]),
    identify: new Map([
      [
        Cns.ATTACHED_CONTROLLERS,
        (_c: ControllerContext, cmd: Command) => {
          if (cmd.nsid === 0 || cmd.nsid === NSID_BROADCAST || !target.subsystem.namespace(cmd.nsid)) throw new CommandError(Status.INVALID_NAMESPACE, `NSID ${cmd.nsid}`);
          const ids = [...target.subsystem.controllers.values()].filter((c) => c.isAttached(cmd.nsid)).map((c) => c.cntlid);
          return controllerList(ids, cntid(cmd));
        },
      ],
      [Cns.CONTROLLER_LIST, (_c: ControllerContext, cmd: Command) => controllerList([...target.subsystem.controllers.keys()], cntid(cmd))],
      [Cns.PRIMARY_CONTROLLER_CAPABILITIES, () => primaryCapabilities(target)],
      [Cns.SECONDARY_CONTROLLER_LIST, (_c: ControllerContext, cmd: Command) => secondaryList(target, cntid(cmd))],
    ]),
    decorateIdentifyController(_c, page) {
      page.setUint16(256, page.getUint16(256, true) | Oacs.VIRTUALIZATION_MANAGEMENT, true);
    },
    controllerReset(kind) {
      if (kind === 'function') target.virtualization.primaryFunctionReset();
    },
    controllerDisabled() {
      target.virtualization.primaryDisabled();
    },
  };
}
