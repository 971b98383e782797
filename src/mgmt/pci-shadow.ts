// QEMU's own copy of a vfio-user function's PCI configuration, which stock QEMU 11 does not
// migrate (qemu-11-facts §4 steps 5–6): read from the source VM, written into the destination VM.
// The destination gets it twice: in full while it waits for the migration stream (outside the
// VM's downtime), then at switchover only the groups the guest changed in the meantime.

import { CapId, Cfg, MsiCap, MsixCap } from '../pci/registers.js';
import type { ControlClient } from './control/client.js';
import { locateEcam, readConfigSpace, writeConfigSequence, type ConfigWrite, type EcamWindow, type PciAddress } from './qemu/pci-config.js';
import type { QmpClient } from './qemu/qmp.js';

/** What QEMU holds for one function: its config space and, with MSI-X, the vector table. */
export interface PciShadow {
  config: Buffer;
  msixTable: Uint8Array | null;
}

/** The function as each side sees it: its PCI address in the VM and the controller behind its socket. */
export interface PciEndpoint {
  qmp: QmpClient;
  control: ControlClient;
  address: PciAddress;
  cntlid: number;
  /** Where the VM's ECAM window is, once looked up (firmware sets it at boot and guests keep it). */
  ecam?: EcamWindow;
}

export class PciReplayError extends Error {}

/** Capability offsets in a config space copy. */
function capabilities(config: Buffer): Map<number, number> {
  const found = new Map<number, number>();
  for (let at = config[Cfg.CAPABILITY_LIST]! & 0xfc, hops = 0; at !== 0 && hops < 48; at = config[at + 1]! & 0xfc, hops++) found.set(config[at]!, at);
  return found;
}

/** A memory BAR's guest-physical address as the config space holds it (64-bit BARs span two). */
function barAddress(config: Buffer, index: number): number {
  const low = config.readUInt32LE(Cfg.BAR0 + 4 * index);
  const is64 = (low & 0x6) === 0x4;
  const high = is64 && index < 5 ? config.readUInt32LE(Cfg.BAR0 + 4 * (index + 1)) : 0;
  return high * 2 ** 32 + ((low & ~0xf) >>> 0);
}

/** Where the guest put the MSI-X table, from the capability and the BAR it names. */
function msixTableLocation(config: Buffer): { address: number; bytes: number } | null {
  const cap = capabilities(config).get(CapId.MSIX);
  if (cap === undefined) return null;
  const entries = (config.readUInt16LE(cap + MsixCap.CONTROL) & MsixCap.CTRL_TABLE_SIZE_MASK) + 1;
  const table = config.readUInt32LE(cap + MsixCap.TABLE);
  const base = barAddress(config, table & 0x7);
  if (base === 0) return null;
  return { address: base + ((table & ~0x7) >>> 0), bytes: entries * MsixCap.TABLE_ENTRY_SIZE };
}

/**
 * Reads the function's config space (ECAM through `xp`, so the guest's 0xcf8 latch is never
 * touched) and its MSI-X table (the server reads its own BAR through the client, as QEMU emulates
 * the table and no monitor command reads MMIO of a paused or running VM reliably).
 */
export async function readPciShadow(source: PciEndpoint): Promise<PciShadow> {
  source.ecam ??= await locateEcam(source.qmp);
  const config = await readConfigSpace(source.qmp, source.address, undefined, { ecam: source.ecam });
  const table = msixTableLocation(config);
  if (!table) return { config, msixTable: null };
  const response = await source.control.request({ clientMemory: { cntlid: source.cntlid, address: table.address, readLength: table.bytes } });
  if (response.error) throw new PciReplayError(`MSI-X table read: ${response.error}`);
  return { config, msixTable: response.data! };
}

/** A run of config writes that only make sense together (an enable bit goes last). */
interface WriteGroup {
  name: string;
  writes: ConfigWrite[];
}

function field(config: Buffer, offset: number, size: 2 | 4): ConfigWrite {
  return { offset, size, value: size === 4 ? config.readUInt32LE(offset) : config.readUInt16LE(offset) };
}

/** Decoding BARs and the command register, then MSI with its enable bit last. */
function configGroups(config: Buffer): WriteGroup[] {
  const groups: WriteGroup[] = [];
  const decode: ConfigWrite[] = [];
  for (let bar = Cfg.BAR0; bar <= Cfg.BAR0 + 0x14; bar += 4) decode.push(field(config, bar, 4));
  decode.push(field(config, Cfg.COMMAND, 2));
  groups.push({ name: 'BARs and command', writes: decode });
  const msi = capabilities(config).get(CapId.MSI);
  if (msi !== undefined) {
    const control = config.readUInt16LE(msi + MsiCap.CONTROL);
    const writes = [field(config, msi + MsiCap.ADDRESS_LO, 4), field(config, msi + MsiCap.ADDRESS_HI, 4), field(config, msi + MsiCap.DATA, 2)];
    if (control & MsiCap.CTRL_PER_VECTOR_MASK) writes.push(field(config, msi + MsiCap.MASK, 4));
    writes.push(field(config, msi + MsiCap.CONTROL, 2));
    groups.push({ name: 'MSI', writes });
  }
  return groups;
}

const sameGroup = (a: WriteGroup, b: WriteGroup | undefined): boolean =>
  b !== undefined && a.writes.length === b.writes.length && a.writes.every((w, i) => w.offset === b.writes[i]!.offset && w.value === b.writes[i]!.value);

const sameBytes = (a: Uint8Array | null, b: Uint8Array | null): boolean => (a === null ? b === null : b !== null && Buffer.compare(a, b) === 0);

/**
 * Writes `shadow` into the destination VM: BARs first, then the command register, MSI (enable
 * last), the MSI-X table (through the destination server's own DMA_WRITE to its BAR, which QEMU
 * routes to its table emulation) and finally MSI-X control. With `present` (what the destination
 * already holds), only the groups that differ are written. Returns the names of the groups written.
 */
export async function replayPciShadow(target: PciEndpoint, shadow: PciShadow, present?: PciShadow): Promise<string[]> {
  const written: string[] = [];
  const wanted = configGroups(shadow.config);
  const held = present ? configGroups(present.config) : [];
  const writes: ConfigWrite[] = [];
  for (const group of wanted) {
    if (present && sameGroup(group, held.find((g) => g.name === group.name))) continue;
    writes.push(...group.writes);
    written.push(group.name);
  }
  if (writes.length > 0) await writeConfigSequence(target.qmp, target.address, writes);
  const msix = capabilities(shadow.config).get(CapId.MSIX);
  if (msix === undefined || !shadow.msixTable) return written;
  const table = msixTableLocation(shadow.config);
  if (!table) throw new PciReplayError('the MSI-X table BAR is not programmed');
  const tableChanged = !present || !sameBytes(shadow.msixTable, present.msixTable) || written.includes('BARs and command');
  if (tableChanged) {
    const response = await target.control.request({ clientMemory: { cntlid: target.cntlid, address: table.address, writeData: shadow.msixTable } });
    if (response.error) throw new PciReplayError(`MSI-X table replay: ${response.error}`);
    written.push('MSI-X table');
  }
  const control = field(shadow.config, msix + MsixCap.CONTROL, 2);
  if (tableChanged || present!.config.readUInt16LE(msix + MsixCap.CONTROL) !== control.value) {
    await writeConfigSequence(target.qmp, target.address, [control]);
    written.push('MSI-X control');
  }
  return written;
}
