// A PCI Express function's 4 KiB configuration space: bytes, which bits the host may write, which
// bits it clears by writing 1, and the capability chain. The values are plain data so the whole
// space can be saved and restored with the function's other state.

import { Bar, CapId, Cfg, CONFIG_SPACE_SIZE, MsiCap, MsixCap, PcieCap, PmCap, Status } from './registers.js';

export type BarKind = 'mem32' | 'mem64' | 'io';

export interface BarSpec {
  index: number;
  /** Bytes; a power of two (QEMU asserts it), at least 16 for memory BARs. */
  size: number;
  kind: BarKind;
  prefetchable?: boolean;
}

export interface Identity {
  vendorId: number;
  deviceId: number;
  subsystemVendorId: number;
  subsystemId: number;
  revision: number;
  /** 24-bit class code: base class, subclass, programming interface. */
  classCode: number;
}

export interface MsixLayout {
  vectors: number;
  tableBar: number;
  tableOffset: number;
  pbaBar: number;
  pbaOffset: number;
}

export interface ConfigLayout {
  identity: Identity;
  bars: readonly BarSpec[];
  /** 0 = no INTx; 1–4 = INTA–INTD. */
  interruptPin: number;
  msiVectors: number;
  msix: MsixLayout | null;
}

export interface CapabilityOffsets {
  pm: number;
  msi: number | null;
  msix: number | null;
  pcie: number;
}

export class ConfigSpace {
  readonly bytes = new Uint8Array(CONFIG_SPACE_SIZE);
  private readonly writable = new Uint8Array(CONFIG_SPACE_SIZE);
  private readonly writeOneToClear = new Uint8Array(CONFIG_SPACE_SIZE);
  readonly caps: CapabilityOffsets;

  constructor(readonly layout: ConfigLayout) {
    validateBars(layout.bars);
    const { identity } = layout;
    this.set16(Cfg.VENDOR_ID, identity.vendorId);
    this.set16(Cfg.DEVICE_ID, identity.deviceId);
    this.set8(Cfg.REVISION, identity.revision);
    this.set8(Cfg.CLASS_PROG, identity.classCode & 0xff);
    this.set16(Cfg.CLASS_PROG + 1, identity.classCode >>> 8);
    this.set16(Cfg.SUBSYSTEM_VENDOR_ID, identity.subsystemVendorId);
    this.set16(Cfg.SUBSYSTEM_ID, identity.subsystemId);
    this.set16(Cfg.STATUS, Status.CAP_LIST);
    this.mask16(Cfg.COMMAND, 0x0547);
    this.maskW1c16(Cfg.STATUS, Status.WRITE_ONE_TO_CLEAR);
    this.mask8(Cfg.CACHE_LINE_SIZE, 0xff);
    this.mask8(Cfg.LATENCY_TIMER, 0xff);
    this.mask8(Cfg.INTERRUPT_LINE, 0xff);
    this.set8(Cfg.INTERRUPT_PIN, layout.interruptPin);
    for (const bar of layout.bars) this.defineBar(bar);

    let next: number = Cfg.FIRST_CAPABILITY;
    let previousLink: number = Cfg.CAPABILITY_LIST;
    const add = (id: number, size: number): number => {
      const at = next;
      this.set8(at, id);
      this.set8(previousLink, at);
      previousLink = at + 1;
      next = align(at + size, 4);
      return at;
    };
    const pm = add(CapId.PM, PmCap.SIZE);
    this.set16(pm + PmCap.PMC, 0x0003); // version 1.2, no PME, no D1/D2
    this.set16(pm + PmCap.PMCSR, PmCap.PMCSR_NO_SOFT_RESET);
    this.mask16(pm + PmCap.PMCSR, PmCap.PMCSR_STATE_MASK);

    let msi: number | null = null;
    if (layout.msiVectors > 0) {
      msi = add(CapId.MSI, MsiCap.SIZE);
      const multiCapable = Math.log2(layout.msiVectors);
      this.set16(msi + MsiCap.CONTROL, MsiCap.CTRL_64BIT | MsiCap.CTRL_PER_VECTOR_MASK | (multiCapable << MsiCap.CTRL_MULTI_CAPABLE_SHIFT));
      this.mask16(msi + MsiCap.CONTROL, MsiCap.CTRL_ENABLE | MsiCap.CTRL_MULTI_ENABLE_MASK);
      this.mask32(msi + MsiCap.ADDRESS_LO, 0xfffffffc);
      this.mask32(msi + MsiCap.ADDRESS_HI, 0xffffffff);
      this.mask16(msi + MsiCap.DATA, 0xffff);
      this.mask32(msi + MsiCap.MASK, layout.msiVectors === 32 ? 0xffffffff : (1 << layout.msiVectors) - 1);
    }

    let msix: number | null = null;
    if (layout.msix) {
      const m = layout.msix;
      msix = add(CapId.MSIX, MsixCap.SIZE);
      this.set16(msix + MsixCap.CONTROL, m.vectors - 1);
      this.mask16(msix + MsixCap.CONTROL, MsixCap.CTRL_ENABLE | MsixCap.CTRL_FUNCTION_MASK);
      this.set32(msix + MsixCap.TABLE, m.tableOffset | m.tableBar);
      this.set32(msix + MsixCap.PBA, m.pbaOffset | m.pbaBar);
    }

    const pcie = add(CapId.PCIE, PcieCap.SIZE);
    this.set16(pcie + PcieCap.FLAGS, PcieCap.FLAGS_VERSION_2 | PcieCap.FLAGS_TYPE_ENDPOINT);
    this.set32(pcie + PcieCap.DEVCAP, PcieCap.DEVCAP_FLR | PcieCap.DEVCAP_RBER);
    this.mask16(pcie + PcieCap.DEVCTL, PcieCap.DEVCTL_WRITABLE);
    this.set16(pcie + PcieCap.DEVCTL, 0x2810); // relaxed ordering, 512 B max read request, no snoop
    this.maskW1c16(pcie + PcieCap.DEVSTA, PcieCap.DEVSTA_W1C);
    this.set32(pcie + PcieCap.LNKCAP, PcieCap.LNKCAP_SPEED_8GT | (4 << PcieCap.LNKCAP_WIDTH_SHIFT));
    this.mask16(pcie + PcieCap.LNKCTL, 0x01c3);
    this.set16(pcie + PcieCap.LNKSTA, PcieCap.LNKCAP_SPEED_8GT | (4 << PcieCap.LNKCAP_WIDTH_SHIFT));
    this.set32(pcie + PcieCap.DEVCAP2, PcieCap.DEVCAP2_COMPLETION_TIMEOUT_RANGES);
    this.mask16(pcie + PcieCap.DEVCTL2, 0x040f);
    this.set32(pcie + PcieCap.LNKCAP2, PcieCap.LNKCAP2_SPEEDS_TO_8GT);
    this.mask16(pcie + PcieCap.LNKCTL2, 0x000f);
    this.set16(pcie + PcieCap.LNKCTL2, PcieCap.LNKCAP_SPEED_8GT);
    if (next > Cfg.EXTENDED_CAPABILITIES) throw new Error('capabilities overflow the legacy config space');
    // Extended space starts with an all-zero header: no extended capabilities.
    this.caps = { pm, msi, msix, pcie };
  }

  read(offset: number, count: number): Uint8Array {
    return this.bytes.slice(offset, offset + count);
  }

  /** Applies a host write through the write masks and write-1-to-clear bits. */
  write(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) {
      const at = offset + i;
      const value = data[i]!;
      const mask = this.writable[at]!;
      const w1c = this.writeOneToClear[at]!;
      this.bytes[at] = ((this.bytes[at]! & ~mask) | (value & mask)) & ~(value & w1c);
    }
  }

  /** Sets bits the host cannot clear by writing (device-side status updates). */
  setStatusBits(offset: number, bits: number): void {
    this.set16(offset, this.get16(offset) | bits);
  }

  get8(offset: number): number {
    return this.bytes[offset]!;
  }

  get16(offset: number): number {
    return this.bytes[offset]! | (this.bytes[offset + 1]! << 8);
  }

  get32(offset: number): number {
    return (this.get16(offset) | (this.get16(offset + 2) << 16)) >>> 0;
  }

  set8(offset: number, value: number): void {
    this.bytes[offset] = value & 0xff;
  }

  set16(offset: number, value: number): void {
    this.set8(offset, value);
    this.set8(offset + 1, value >>> 8);
  }

  set32(offset: number, value: number): void {
    this.set16(offset, value);
    this.set16(offset + 2, value >>> 16);
  }

  private defineBar(bar: BarSpec): void {
    const at = Cfg.BAR0 + bar.index * 4;
    const typeBits =
      bar.kind === 'io' ? Bar.IO_SPACE : (bar.kind === 'mem64' ? Bar.MEM_TYPE_64 : 0) | (bar.prefetchable ? Bar.PREFETCHABLE : 0);
    this.set32(at, typeBits);
    // Sizing: the host writes all ones and reads back which address bits stick.
    const lowBits = bar.kind === 'io' ? 0x3 : 0xf;
    this.mask32(at, (~(bar.size - 1) & ~lowBits) >>> 0);
    if (bar.kind === 'mem64') this.mask32(at + 4, 0xffffffff);
  }

  private mask8(offset: number, mask: number): void {
    this.writable[offset] = mask & 0xff;
  }

  private mask16(offset: number, mask: number): void {
    this.mask8(offset, mask);
    this.mask8(offset + 1, mask >>> 8);
  }

  private mask32(offset: number, mask: number): void {
    this.mask16(offset, mask);
    this.mask16(offset + 2, mask >>> 16);
  }

  private maskW1c16(offset: number, mask: number): void {
    this.writeOneToClear[offset] = mask & 0xff;
    this.writeOneToClear[offset + 1] = (mask >>> 8) & 0xff;
  }
}

function validateBars(bars: readonly BarSpec[]): void {
  const used = new Set<number>();
  for (const bar of bars) {
    const slots = bar.kind === 'mem64' ? [bar.index, bar.index + 1] : [bar.index];
    for (const slot of slots) {
      if (slot < 0 || slot > 5 || used.has(slot)) throw new Error(`BAR${bar.index} overlaps or is out of range`);
      used.add(slot);
    }
    if (bar.size < (bar.kind === 'io' ? 4 : 16) || (bar.size & (bar.size - 1)) !== 0 || bar.size > 0x80000000) {
      throw new Error(`BAR${bar.index} size ${bar.size} is not a power of two in range`);
    }
  }
}

const align = (value: number, to: number): number => Math.ceil(value / to) * to;
