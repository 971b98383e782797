import { native } from '../../src/native.js';
import { PciFunction } from '../../src/pci/function.js';
import type { RegionInfo } from '../../src/vfio-user/device.js';

/** BAR0 of 8 KiB whose second page (doorbells) lives in a memfd the client may map. */
export class MmapProbeDevice extends PciFunction {
  private readonly fd = native.memfdCreate('bar0', 0x2000);
  private readonly shared = new DataView(native.mmap(this.fd, 0n, 0x2000, true));

  constructor() {
    super({
      identity: { vendorId: 0x1b36, deviceId: 0x00fe, subsystemVendorId: 0x1b36, subsystemId: 1, revision: 0, classCode: 0xff0000 },
      bars: [{ index: 0, size: 0x2000, kind: 'mem64' }],
      interruptPin: 0,
      msiVectors: 0,
      msix: null,
    });
  }

  doorbell(offset: number): number {
    return this.shared.getUint32(0x1000 + offset, true);
  }

  protected override barMmap(bar: number): RegionInfo['mmap'] {
    return bar === 0 ? { fd: this.fd, fileOffset: 0, areas: [{ offset: 0x1000, size: 0x1000 }] } : undefined;
  }

  protected barRead(_bar: number, offset: number, count: number): Uint8Array {
    return new Uint8Array(this.shared.buffer.slice(offset, offset + count));
  }

  protected barWrite(_bar: number, offset: number, data: Uint8Array): void {
    new Uint8Array(this.shared.buffer).set(data, offset);
  }

  protected resetDevice(): void {}
}
