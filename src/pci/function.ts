// A PCI Express function behind the vfio-user Device seam: config space, BAR dispatch, MSI-X
// table/PBA storage, interrupt delivery in whichever mode the host enabled, and function-level
// reset. Concrete devices (the NVMe controller, test devices) supply the BAR behaviour.

import {
  invalid,
  VfioError,
  type DeviceContext,
  type DeviceInfo,
  type IrqInfo,
  type RegionInfo,
  type VfioDevice,
} from '../vfio-user/device.js';
import { DeviceFlags, Errno, IrqInfoFlags, PciIrq, PciRegion, RegionFlags } from '../vfio-user/protocol.js';
import { ConfigSpace, type BarSpec, type ConfigLayout } from './config-space.js';
import { Cfg, Command, CONFIG_SPACE_SIZE, MsiCap, MsixCap, PcieCap } from './registers.js';

export type InterruptMode = 'msix' | 'msi' | 'intx' | 'none';

/** What the function itself holds of its PCI state (QEMU shadows BARs and MSI-X, but not all of it). */
export interface FunctionState {
  config: Uint8Array;
  msixTable: Uint8Array;
}

export abstract class PciFunction implements VfioDevice {
  config: ConfigSpace;
  protected context: DeviceContext | null = null;
  /** MSI-X table entries and PBA as the host last wrote them (QEMU normally emulates the table). */
  private msixTable: Uint8Array;

  constructor(protected readonly layout: ConfigLayout) {
    this.config = new ConfigSpace(layout);
    this.msixTable = new Uint8Array((layout.msix?.vectors ?? 0) * MsixCap.TABLE_ENTRY_SIZE);
  }

  // ---- what a concrete device provides -----------------------------------------------------------

  protected abstract barRead(bar: number, offset: number, count: number): Uint8Array;
  protected abstract barWrite(bar: number, offset: number, data: Uint8Array): void;
  /** Device-specific part of a function-level reset (config space is handled here). */
  protected abstract resetDevice(): void;
  /** Shared memory behind a BAR, if the device offers one. */
  protected barMmap(_bar: number): RegionInfo['mmap'] | undefined {
    return undefined;
  }
  protected onAttach(): void {}
  protected onDetach(): void {}
  protected onBusMasterChange(_enabled: boolean): void {}

  // ---- VfioDevice -------------------------------------------------------------------------------

  deviceInfo(): DeviceInfo {
    return { flags: DeviceFlags.RESET | DeviceFlags.PCI, numRegions: PciRegion.COUNT, numIrqs: PciIrq.COUNT };
  }

  regionInfo(index: number): RegionInfo {
    if (index === PciRegion.CONFIG) return { size: CONFIG_SPACE_SIZE, flags: RegionFlags.READ | RegionFlags.WRITE };
    const bar = this.bar(index);
    if (!bar) return { size: 0, flags: 0 };
    const mmap = this.barMmap(index);
    return { size: bar.size, flags: RegionFlags.READ | RegionFlags.WRITE, ...(mmap ? { mmap } : {}) };
  }

  irqInfo(index: number): IrqInfo {
    const eventfd = IrqInfoFlags.EVENTFD;
    switch (index) {
      case PciIrq.INTX:
        return { count: this.layout.interruptPin ? 1 : 0, flags: eventfd | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED };
      case PciIrq.MSI:
        return { count: this.layout.msiVectors, flags: eventfd };
      case PciIrq.MSIX:
        return { count: this.layout.msix?.vectors ?? 0, flags: eventfd };
      case PciIrq.ERR:
        return { count: 1, flags: eventfd };
      default:
        return { count: 0, flags: eventfd };
    }
  }

  regionRead(index: number, offset: number, count: number): Uint8Array {
    if (index === PciRegion.CONFIG) return this.config.read(offset, count);
    const msix = this.msixWindow(index, offset, count);
    if (msix === 'table') return this.msixTable.slice(offset - this.layout.msix!.tableOffset, offset - this.layout.msix!.tableOffset + count);
    if (msix === 'pba') return new Uint8Array(count); // QEMU owns masking, so nothing is ever pending here.
    if (!this.bar(index)) throw invalid(`region ${index} is not implemented`);
    checkAccessSize(count);
    return this.barRead(index, offset, count);
  }

  regionWrite(index: number, offset: number, data: Uint8Array): void {
    if (index === PciRegion.CONFIG) {
      this.configWrite(offset, data);
      return;
    }
    const msix = this.msixWindow(index, offset, data.length);
    if (msix === 'table') {
      this.msixTable.set(data, offset - this.layout.msix!.tableOffset);
      return;
    }
    if (msix === 'pba') return;
    if (!this.bar(index)) throw invalid(`region ${index} is not implemented`);
    checkAccessSize(data.length);
    this.barWrite(index, offset, data);
  }

  reset(): void {
    this.functionLevelReset();
  }

  attach(context: DeviceContext): void {
    this.context = context;
    this.onAttach();
  }

  detach(): void {
    this.onDetach();
    this.context = null;
  }

  // ---- for concrete devices ----------------------------------------------------------------------

  get busMasterEnabled(): boolean {
    return (this.config.get16(Cfg.COMMAND) & Command.BUS_MASTER) !== 0;
  }

  interruptMode(): InterruptMode {
    const { msix, msi } = this.config.caps;
    if (msix !== null && this.config.get16(msix + MsixCap.CONTROL) & MsixCap.CTRL_ENABLE) return 'msix';
    if (msi !== null && this.config.get16(msi + MsiCap.CONTROL) & MsiCap.CTRL_ENABLE) return 'msi';
    if (this.layout.interruptPin && !(this.config.get16(Cfg.COMMAND) & Command.INTX_DISABLE)) return 'intx';
    return 'none';
  }

  /**
   * Raises interrupt `vector` in the mode the host enabled. Under MSI/INTx the vector folds onto
   * what that mode offers. Returns false when nothing is wired to carry it.
   */
  raiseInterrupt(vector: number): boolean {
    const irqs = this.context?.irqs;
    if (!irqs) return false;
    switch (this.interruptMode()) {
      case 'msix':
        return irqs.trigger(PciIrq.MSIX, vector);
      case 'msi':
        return irqs.trigger(PciIrq.MSI, vector % Math.max(1, this.enabledMsiVectors()));
      case 'intx':
        return irqs.trigger(PciIrq.INTX, 0);
      case 'none':
        return false;
    }
  }

  saveFunctionState(): FunctionState {
    return { config: this.config.bytes.slice(), msixTable: this.msixTable.slice() };
  }

  /** Lengths are checked by the caller (checkFunctionState) before anything changes. */
  loadFunctionState(state: FunctionState): void {
    const busMasterBefore = this.busMasterEnabled;
    this.config.bytes.set(state.config);
    this.msixTable.set(state.msixTable);
    if (this.busMasterEnabled !== busMasterBefore) this.onBusMasterChange(this.busMasterEnabled);
  }

  /** Why `state` cannot be loaded into this function, or null. */
  checkFunctionState(state: FunctionState): string | null {
    if (state.config.length !== this.config.bytes.length) return `config space of ${state.config.length} bytes (this function has ${this.config.bytes.length})`;
    if (state.msixTable.length !== this.msixTable.length) return `MSI-X table of ${state.msixTable.length} bytes (this function has ${this.msixTable.length})`;
    // The capability layout must be this function's: same IDs, class and capability chain.
    for (const at of [0, 2, 9, 10, 11, 0x34]) if (state.config[at] !== this.config.bytes[at]) return `config space of another kind of function (byte 0x${at.toString(16)})`;
    return null;
  }

  protected functionLevelReset(): void {
    this.config = new ConfigSpace(this.layout);
    this.msixTable.fill(0);
    this.resetDevice();
  }

  // ---- internals ----------------------------------------------------------------------------------

  private enabledMsiVectors(): number {
    const msi = this.config.caps.msi;
    if (msi === null) return 0;
    return 1 << ((this.config.get16(msi + MsiCap.CONTROL) & MsiCap.CTRL_MULTI_ENABLE_MASK) >> 4);
  }

  private configWrite(offset: number, data: Uint8Array): void {
    if (data.length === 0 || data.length > 4) throw invalid(`config write of ${data.length} bytes`);
    const busMasterBefore = this.busMasterEnabled;
    const devctl = this.config.caps.pcie + PcieCap.DEVCTL;
    const initiatesFlr =
      offset <= devctl + 1 && offset + data.length > devctl + 1 && (data[devctl + 1 - offset]! & (PcieCap.DEVCTL_INITIATE_FLR >> 8)) !== 0;
    this.config.write(offset, data);
    if (initiatesFlr) {
      this.functionLevelReset();
      return;
    }
    if (this.busMasterEnabled !== busMasterBefore) this.onBusMasterChange(this.busMasterEnabled);
  }

  private bar(index: number): BarSpec | undefined {
    return this.layout.bars.find((b) => b.index === index);
  }

  private msixWindow(index: number, offset: number, count: number): 'table' | 'pba' | null {
    const m = this.layout.msix;
    if (!m) return null;
    const tableEnd = m.tableOffset + m.vectors * MsixCap.TABLE_ENTRY_SIZE;
    const pbaEnd = m.pbaOffset + Math.ceil(m.vectors / 64) * 8;
    if (index === m.tableBar && offset >= m.tableOffset && offset + count <= tableEnd) return 'table';
    if (index === m.pbaBar && offset >= m.pbaOffset && offset + count <= pbaEnd) return 'pba';
    return null;
  }
}

function checkAccessSize(count: number): void {
  if (count !== 1 && count !== 2 && count !== 4 && count !== 8) {
    throw new VfioError(Errno.EINVAL, `BAR access of ${count} bytes (1, 2, 4 or 8 expected)`);
  }
}
