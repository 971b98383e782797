// Identify data structures (Base §5.17.2; NVM-CS §4.1.5). Each builder returns the 4096-byte
// structure for one CNS value.

import type { AttachedNamespace, ControllerContext } from './context.js';
import type { NamespaceIds } from './namespace.js';
import { ABORT_LIMIT, ASYNC_EVENT_LIMIT, CRITICAL_TEMPERATURE, ERROR_LOG_ENTRIES, KEEP_ALIVE_GRANULARITY, WARNING_TEMPERATURE } from './policy.js';
import {
  Csi,
  CQE_SIZE_LOG2,
  IDENTIFY_SIZE,
  LBA_FORMATS,
  Lpa,
  NsIdType,
  NVME_VERSION_1_4,
  Oacs,
  Oaes,
  Oncs,
  PciIdentity,
  SQE_SIZE_LOG2,
  Sgls,
} from './spec.js';
import { PageWriter } from './page-writer.js';

const ONCS =
  Oncs.COMPARE | Oncs.DATASET_MANAGEMENT | Oncs.WRITE_ZEROES | Oncs.SAVE_SELECT | Oncs.TIMESTAMP | Oncs.VERIFY;

/** CNS 01h: Identify Controller (Base Figure 275). */
export function identifyController(c: ControllerContext): Uint8Array {
  const w = new PageWriter(IDENTIFY_SIZE);
  const id = c.identity;
  w.u16(0, PciIdentity.VENDOR_ID);
  w.u16(2, PciIdentity.SUBSYSTEM_VENDOR_ID);
  w.ascii(4, 20, id.serial);
  w.ascii(24, 40, id.model);
  w.ascii(64, 8, id.firmware);
  w.u8(72, 6); // RAB: 64 commands
  // IEEE OUI Identifier, least significant byte first.
  w.u8(73, id.ieeeOui & 0xff);
  w.u8(74, (id.ieeeOui >>> 8) & 0xff);
  w.u8(75, (id.ieeeOui >>> 16) & 0xff);
  w.u8(76, id.multiController ? 0x2 : 0); // CMIC: may hold more than one controller
  w.u8(77, c.limits.mdts);
  w.u16(78, id.cntlid);
  w.u32(80, NVME_VERSION_1_4);
  w.u32(92, Oaes.NAMESPACE_ATTRIBUTE_NOTICES);
  w.u8(111, 1); // CNTRLTYPE: I/O controller
  w.u16(256, Oacs.FORMAT_NVM | Oacs.DOORBELL_BUFFER_CONFIG);
  w.u8(258, ABORT_LIMIT - 1);
  w.u8(259, ASYNC_EVENT_LIMIT - 1);
  w.u8(260, 0x3); // FRMW: one slot, slot 1 read-only
  w.u8(261, Lpa.COMMANDS_EFFECTS | Lpa.EXTENDED_DATA);
  w.u8(262, ERROR_LOG_ENTRIES - 1);
  w.u8(263, 0); // NPSS: one power state
  w.u16(266, WARNING_TEMPERATURE);
  w.u16(268, CRITICAL_TEMPERATURE);
  const capacity = c.namespaces.list().reduce((sum, a) => sum + a.namespace.blockCount * a.namespace.blockSize, 0);
  w.u64(280, capacity); // TNVMCAP
  w.u16(320, KEEP_ALIVE_GRANULARITY);
  w.u8(512, (SQE_SIZE_LOG2 << 4) | SQE_SIZE_LOG2);
  w.u8(513, (CQE_SIZE_LOG2 << 4) | CQE_SIZE_LOG2);
  w.u32(516, c.namespaces.maxNsid);
  w.u16(520, ONCS);
  // VWC: bit 0 present; bits 2:1 = 11b, Flush with NSID FFFFFFFFh flushes every namespace.
  const volatileWriteCache = c.volatileWriteCachePresent;
  c.hostToldNoVolatileWriteCache = !volatileWriteCache;
  w.u8(525, volatileWriteCache ? 0x7 : 0x6);
  w.u32(536, Sgls.SUPPORTED | Sgls.LONGER_THAN_DATA);
  w.cstring(768, 256, id.nqn);
  // Power state 0: 25 W max, entry/exit latency not reported.
  w.u16(2048, 2500);
  const view = new DataView(w.bytes.buffer);
  for (const set of c.commandSets) set.decorateIdentifyController?.(c, view);
  return w.bytes;
}

/** CNS 00h: Identify Namespace, NVM command set (NVM-CS Figure 97). Zeros for an inactive NSID. */
export function identifyNamespace(c: ControllerContext, attached: AttachedNamespace | undefined): Uint8Array {
  const w = new PageWriter(IDENTIFY_SIZE);
  if (!attached) return w.bytes;
  const ns = attached.namespace;
  const blocks = ns.blockCount;
  w.u64(0, blocks); // NSZE
  w.u64(8, blocks); // NCAP
  w.u64(16, blocks); // NUSE
  w.u8(24, 0); // NSFEAT: fully provisioned, no per-namespace atomicity
  w.u8(25, LBA_FORMATS.length - 1); // NLBAF (0-based)
  w.u8(26, ns.lbaFormat); // FLBAS
  w.u8(30, c.identity.multiController ? 1 : 0); // NMIC: shared
  w.u8(33, 0x1 | 0x8); // DLFEAT: deallocated blocks read as zeros; Write Zeroes may deallocate
  w.u64(48, blocks * ns.blockSize); // NVMCAP (low 8 of 16 bytes)
  w.bytes.set(attached.ids.nguid, 104);
  w.bytes.set(attached.ids.eui64, 120);
  LBA_FORMATS.forEach((shift, i) => {
    w.u16(128 + i * 4, 0); // MS: no metadata
    w.u8(128 + i * 4 + 2, shift);
    w.u8(128 + i * 4 + 3, shift === 12 ? 0 : 1); // RP: 4 KiB best, 512 B better
  });
  return w.bytes;
}

/** CNS 02h / 07h: active NSIDs above `after`, ascending, up to 1024. */
export function activeNamespaceList(c: ControllerContext, after: number): Uint8Array {
  const w = new PageWriter(IDENTIFY_SIZE);
  const ids = c.namespaces.list().map((a) => a.nsid).filter((n) => n > after).slice(0, IDENTIFY_SIZE / 4);
  ids.forEach((nsid, i) => w.u32(i * 4, nsid));
  return w.bytes;
}

/** CNS 03h: Namespace Identification Descriptor list (Base Figure 291). */
export function namespaceDescriptors(ids: NamespaceIds): Uint8Array {
  const w = new PageWriter(IDENTIFY_SIZE);
  let at = 0;
  const add = (type: number, value: Uint8Array): void => {
    w.u8(at, type);
    w.u8(at + 1, value.length);
    w.bytes.set(value, at + 4);
    at += 4 + value.length;
  };
  add(NsIdType.EUI64, ids.eui64);
  add(NsIdType.NGUID, ids.nguid);
  add(NsIdType.UUID, ids.uuid);
  add(NsIdType.CSI, Uint8Array.of(Csi.NVM));
  return w.bytes;
}

/** CNS 05h, CSI 00h: I/O Command Set specific Identify Namespace for NVM: nothing beyond CNS 00h. */
export function nvmSpecificNamespace(): Uint8Array {
  return new PageWriter(IDENTIFY_SIZE).bytes;
}

/**
 * CNS 06h, CSI 00h: NVM command set Identify Controller (NVM-CS Figure 101). All limits zero:
 * no verify/write-zeroes/write-uncorrectable size limit beyond MDTS semantics, no DSM limits.
 */
export function nvmSpecificController(): Uint8Array {
  return new PageWriter(IDENTIFY_SIZE).bytes;
}

/** CNS 08h: I/O Command Set Independent Identify Namespace (Base Figure 280). */
export function csiIndependentNamespace(c: ControllerContext, attached: AttachedNamespace | undefined): Uint8Array {
  const w = new PageWriter(IDENTIFY_SIZE);
  if (!attached) return w.bytes;
  w.u8(1, c.identity.multiController ? 1 : 0); // NMIC
  w.u8(14, 1); // NSTAT: namespace ready
  return w.bytes;
}

/** CNS 1Ch: I/O Command Set data structure: one combination, the NVM command set alone. */
export function ioCommandSetCombinations(): Uint8Array {
  const w = new PageWriter(IDENTIFY_SIZE);
  w.u64(0, 1 << Csi.NVM);
  return w.bytes;
}
