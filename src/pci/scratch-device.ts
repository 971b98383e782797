// A minimal PCI function that proves the plumbing end to end without NVMe: a few BAR0 registers a
// guest can read and write, and a doorbell that raises an MSI-X vector. Also the fixture the
// protocol tests drive.

import { PciFunction } from './function.js';

/** BAR0 register map of the scratch device (byte offsets). */
export const ScratchReg = {
  /** RO: 'NVMU' in little-endian, so a guest read proves it reached us. */
  MAGIC: 0x00,
  /** RW 32-bit. */
  SCRATCH32: 0x04,
  /** RW 64-bit. */
  SCRATCH64: 0x08,
  /** WO: writing N raises interrupt vector N. RO: number of interrupts raised. */
  IRQ_DOORBELL: 0x10,
  /** RO: number of BAR writes served. */
  WRITE_COUNT: 0x18,
} as const;

export const SCRATCH_MAGIC = 0x554d564e;
export const SCRATCH_VENDOR_ID = 0x1b36; // Red Hat's QEMU test-device vendor; class "other".
export const SCRATCH_DEVICE_ID = 0x00ff;

const BAR0_SIZE = 0x4000;
const MSIX_TABLE = 0x2000;
const MSIX_PBA = 0x3000;

export class ScratchDevice extends PciFunction {
  private registers = new DataView(new ArrayBuffer(0x20));
  private raised = 0;
  private writes = 0;

  constructor(readonly vectors = 4) {
    super({
      identity: {
        vendorId: SCRATCH_VENDOR_ID,
        deviceId: SCRATCH_DEVICE_ID,
        subsystemVendorId: SCRATCH_VENDOR_ID,
        subsystemId: 0x0001,
        revision: 1,
        classCode: 0xff0000,
      },
      bars: [{ index: 0, size: BAR0_SIZE, kind: 'mem64' }],
      interruptPin: 0,
      msiVectors: 1,
      msix: { vectors, tableBar: 0, tableOffset: MSIX_TABLE, pbaBar: 0, pbaOffset: MSIX_PBA },
    });
    this.resetDevice();
  }

  protected barRead(_bar: number, offset: number, count: number): Uint8Array {
    this.registers.setUint32(ScratchReg.IRQ_DOORBELL, this.raised, true);
    this.registers.setUint32(ScratchReg.WRITE_COUNT, this.writes, true);
    const out = new Uint8Array(count);
    for (let i = 0; i < count; i++) {
      const at = offset + i;
      out[i] = at < this.registers.byteLength ? this.registers.getUint8(at) : 0;
    }
    return out;
  }

  protected barWrite(_bar: number, offset: number, data: Uint8Array): void {
    this.writes++;
    if (offset === ScratchReg.IRQ_DOORBELL) {
      const vector = data[0]!;
      if (this.raiseInterrupt(vector)) this.raised++;
      return;
    }
    const writableEnd = ScratchReg.SCRATCH64 + 8;
    for (let i = 0; i < data.length; i++) {
      const at = offset + i;
      if (at >= ScratchReg.SCRATCH32 && at < writableEnd) this.registers.setUint8(at, data[i]!);
    }
  }

  protected resetDevice(): void {
    this.registers = new DataView(new ArrayBuffer(0x20));
    this.registers.setUint32(ScratchReg.MAGIC, SCRATCH_MAGIC, true);
    this.raised = 0;
    this.writes = 0;
  }
}
