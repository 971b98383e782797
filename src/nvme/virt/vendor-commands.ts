// Virtual subsystems as vendor-specific admin commands of the primary (opcodes C0h–FFh are vendor
// specific, Base §5 Figure 28; bits 1:0 of each opcode give its data direction as the spec
// requires). The layouts below are the one table of them; docs/vendor-commands.md describes them
// for users of `nvme admin-passthru`.

import type { AdminCommandSet, AdminHandler } from '../context.js';
import { PageWriter } from '../page-writer.js';
import { Status } from '../spec.js';
import { CommandError, type DataTransfer } from '../transfer.js';
import type { NamespaceMapping, VirtualSubsystemDefinition, VirtualSubsystems } from './vsubsys.js';

export const VendorOpcode = {
  /** Data host→controller: a definition. DW0: 0. */
  VSUBSYS_CREATE: 0xc1,
  /** Data host→controller: the NQN. CDW10[15:0] secondary CNTLID, CDW11[15:0] virtual CNTLID. DW0: narrowing bits. */
  VSUBSYS_ADD_CONTROLLER: 0xc5,
  /** Data host→controller: the NQN. CDW10[15:0] secondary CNTLID. */
  VSUBSYS_REMOVE_CONTROLLER: 0xc9,
  /** Data host→controller: the NQN. The virtual subsystem must have no controllers. */
  VSUBSYS_DELETE: 0xcd,
  /**
   * Data controller→host (LIST_SIZE bytes): virtual subsystem CDW10 (0-based). DW0: how many exist.
   * Index 0 always succeeds (an empty page when there are none).
   */
  VSUBSYS_LIST: 0xc2,
} as const;

/** Byte layout of a definition (the data of CREATE, the first DEFINITION_SIZE bytes of LIST). */
export const VsubsysLayout = {
  DEFINITION_SIZE: 1024,
  /** NUL-terminated, the only field ADD/REMOVE/DELETE read. */
  NQN: { at: 0, length: 256 },
  /** ASCII; empty (all NUL or spaces) = derived. */
  SERIAL: { at: 256, length: 20 },
  MODEL: { at: 276, length: 40 },
  FIRMWARE: { at: 316, length: 8 },
  /** u32, bits 23:0. */
  IEEE_OUI: 324,
  /** u32: namespace mappings that follow. */
  NAMESPACE_COUNT: 328,
  /** u32 flags: bit 0, the virtual subsystem may hold more than one controller. */
  FLAGS: 332,
  MULTI_CONTROLLER: 1 << 0,
  /** {virtual NSID u32, subsystem NSID u32} per mapping. */
  NAMESPACES: 336,
  NAMESPACE_ENTRY_SIZE: 8,
  LIST_SIZE: 4096,
  /** LIST: u32 count of controllers, then {secondary CNTLID u16, virtual CNTLID u16} per controller. */
  LIST_CONTROLLER_COUNT: 1024,
  LIST_CONTROLLERS: 1028,
} as const;

export const MAX_NAMESPACE_MAPPINGS = (VsubsysLayout.DEFINITION_SIZE - VsubsysLayout.NAMESPACES) / VsubsysLayout.NAMESPACE_ENTRY_SIZE;
const MAX_LISTED_CONTROLLERS = (VsubsysLayout.LIST_SIZE - VsubsysLayout.LIST_CONTROLLERS) / 4;

const decoder = new TextDecoder();

function text(bytes: Uint8Array, field: { at: number; length: number }): string {
  const raw = bytes.subarray(field.at, field.at + field.length);
  const end = raw.indexOf(0);
  return decoder.decode(end < 0 ? raw : raw.subarray(0, end)).trimEnd();
}

/** Reads a definition from CREATE's data. */
export function decodeDefinition(bytes: Uint8Array): VirtualSubsystemDefinition {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const count = view.getUint32(VsubsysLayout.NAMESPACE_COUNT, true);
  if (count > MAX_NAMESPACE_MAPPINGS) throw new CommandError(Status.INVALID_FIELD, `${count} namespace mappings (at most ${MAX_NAMESPACE_MAPPINGS})`);
  const namespaces: NamespaceMapping[] = [];
  for (let i = 0; i < count; i++) {
    const at = VsubsysLayout.NAMESPACES + i * VsubsysLayout.NAMESPACE_ENTRY_SIZE;
    namespaces.push({ vnsid: view.getUint32(at, true), nsid: view.getUint32(at + 4, true) });
  }
  return {
    nqn: text(bytes, VsubsysLayout.NQN),
    serial: text(bytes, VsubsysLayout.SERIAL),
    model: text(bytes, VsubsysLayout.MODEL),
    firmware: text(bytes, VsubsysLayout.FIRMWARE),
    ieeeOui: view.getUint32(VsubsysLayout.IEEE_OUI, true),
    namespaces,
    multiController: (view.getUint32(VsubsysLayout.FLAGS, true) & VsubsysLayout.MULTI_CONTROLLER) !== 0,
  };
}

/** Writes a definition in the layout CREATE reads and LIST returns. */
export function encodeDefinition(def: VirtualSubsystemDefinition, size: number = VsubsysLayout.DEFINITION_SIZE): Uint8Array {
  const w = new PageWriter(size);
  if (def.namespaces && def.namespaces.length > MAX_NAMESPACE_MAPPINGS) throw new RangeError(`at most ${MAX_NAMESPACE_MAPPINGS} namespace mappings`);
  w.cstring(VsubsysLayout.NQN.at, VsubsysLayout.NQN.length, def.nqn);
  w.cstring(VsubsysLayout.SERIAL.at, VsubsysLayout.SERIAL.length + 1, def.serial ?? '');
  w.cstring(VsubsysLayout.MODEL.at, VsubsysLayout.MODEL.length + 1, def.model ?? '');
  w.cstring(VsubsysLayout.FIRMWARE.at, VsubsysLayout.FIRMWARE.length + 1, def.firmware ?? '');
  w.u32(VsubsysLayout.IEEE_OUI, def.ieeeOui ?? 0);
  const namespaces = def.namespaces ?? [];
  w.u32(VsubsysLayout.NAMESPACE_COUNT, namespaces.length);
  w.u32(VsubsysLayout.FLAGS, def.multiController ? VsubsysLayout.MULTI_CONTROLLER : 0);
  namespaces.forEach((m, i) => {
    w.u32(VsubsysLayout.NAMESPACES + i * VsubsysLayout.NAMESPACE_ENTRY_SIZE, m.vnsid);
    w.u32(VsubsysLayout.NAMESPACES + i * VsubsysLayout.NAMESPACE_ENTRY_SIZE + 4, m.nsid);
  });
  return w.bytes;
}

/** The NQN-only data of ADD, REMOVE and DELETE. */
export function encodeNqn(nqn: string): Uint8Array {
  return encodeDefinition({ nqn });
}

async function readNqn(data: DataTransfer): Promise<string> {
  return text(await data.fromHost(VsubsysLayout.DEFINITION_SIZE), VsubsysLayout.NQN);
}

export function vendorCommands(vsubsystems: VirtualSubsystems): AdminCommandSet {
  const handlers = new Map<number, AdminHandler>([
    [
      VendorOpcode.VSUBSYS_CREATE,
      async (_c, _cmd, data) => {
        vsubsystems.create(decodeDefinition(await data.fromHost(VsubsysLayout.DEFINITION_SIZE)));
      },
    ],
    [
      VendorOpcode.VSUBSYS_ADD_CONTROLLER,
      async (_c, cmd, data) => ({ dw0: vsubsystems.add(await readNqn(data), cmd.cdw10 & 0xffff, cmd.cdw11 & 0xffff) }),
    ],
    [
      VendorOpcode.VSUBSYS_REMOVE_CONTROLLER,
      async (_c, cmd, data) => {
        vsubsystems.remove(await readNqn(data), cmd.cdw10 & 0xffff);
      },
    ],
    [
      VendorOpcode.VSUBSYS_DELETE,
      async (_c, _cmd, data) => {
        vsubsystems.delete(await readNqn(data));
      },
    ],
    [
      VendorOpcode.VSUBSYS_LIST,
      async (_c, cmd, data) => {
        const all = vsubsystems.list();
        if (all.length === 0 && cmd.cdw10 === 0) {
          await data.toHost(new Uint8Array(VsubsysLayout.LIST_SIZE));
          return { dw0: 0 };
        }
        const vsubsys = all[cmd.cdw10];
        if (!vsubsys) throw new CommandError(Status.INVALID_FIELD, `virtual subsystem index ${cmd.cdw10} (there are ${all.length})`);
        const page = encodeDefinition(vsubsys.definition, VsubsysLayout.LIST_SIZE);
        const view = new DataView(page.buffer);
        const controllers = [...vsubsys.controllers].sort((a, b) => a[0] - b[0]).slice(0, MAX_LISTED_CONTROLLERS);
        view.setUint32(VsubsysLayout.LIST_CONTROLLER_COUNT, controllers.length, true);
        controllers.forEach(([scid, vcid], i) => {
          view.setUint16(VsubsysLayout.LIST_CONTROLLERS + i * 4, scid, true);
          view.setUint16(VsubsysLayout.LIST_CONTROLLERS + i * 4 + 2, vcid, true);
        });
        await data.toHost(page);
        return { dw0: all.length };
      },
    ],
  ]);
  return { name: 'virtual subsystems', handlers };
}
