import { describe, it, expect } from 'vitest';
import { PciIrq, PciRegion } from '../../../src/vfio-user/protocol.js';
import { Cfg } from '../../../src/pci/registers.js';
import { AdminOpcode, CC, CSTS, PciIdentity, Reg, Status } from '../../../src/nvme/spec.js';
import { ADMIN_CQ, ADMIN_SQ, TestHost, code, tick, until } from './helpers.js';
import { buildCommand } from '../../../src/nvme/command.js';

describe('NVMe controller: PCI function', () => {
  it('identifies as an NVMe class device with our IDs, MSI-X in BAR4', () => {
    const h = new TestHost();
    const c = h.controller;
    expect(c.config.get16(Cfg.VENDOR_ID)).toBe(PciIdentity.VENDOR_ID);
    expect(c.config.get16(Cfg.DEVICE_ID)).toBe(PciIdentity.DEVICE_ID);
    expect(c.config.get32(Cfg.REVISION) >>> 8).toBe(0x010802);
    expect(c.regionInfo(PciRegion.BAR0).size).toBe(0x4000);
    expect(c.regionInfo(PciRegion.BAR4).size).toBe(0x4000);
    expect(c.irqInfo(PciIrq.MSIX).count).toBe(9);
    expect(c.config.caps.msi).not.toBeNull();
    expect(c.config.caps.msix).not.toBeNull();
    const msix = c.config.caps.msix!;
    expect(c.config.get32(msix + 4)).toBe(0x0000 | 4); // table at BAR4+0
    expect(c.config.get32(msix + 8)).toBe(0x2000 | 4); // PBA at BAR4+0x2000
  });
});

describe('NVMe controller: registers', () => {
  it('reports CAP fields, VS 1.4', () => {
    const h = new TestHost();
    const cap = h.read64(Reg.CAP);
    expect(Number(cap & 0xffffn)).toBe(1023); // MQES
    expect(Number((cap >> 16n) & 1n)).toBe(1); // CQR
    expect(Number((cap >> 24n) & 0xffn)).toBeGreaterThan(0); // TO
    expect(Number((cap >> 32n) & 0xfn)).toBe(0); // DSTRD
    expect(Number((cap >> 37n) & 0xffn)).toBe(1); // CSS: NVM
    expect(Number((cap >> 48n) & 0xfn)).toBe(0); // MPSMIN 4 KiB
    expect(Number((cap >> 52n) & 0xfn)).toBe(4); // MPSMAX 64 KiB
    // The two halves read as 4-byte accesses agree with the 8-byte read.
    expect((BigInt(h.read32(Reg.CAP + 4)) << 32n) | BigInt(h.read32(Reg.CAP))).toBe(cap);
    expect(h.read32(Reg.VS)).toBe(0x00010400);
    // CAP is read-only.
    h.write32(Reg.CAP, 0);
    expect(h.read64(Reg.CAP)).toBe(cap);
  });

  it('takes ASQ/ACQ as one 8-byte write or two 4-byte halves', () => {
    const h = new TestHost();
    h.write64(Reg.ASQ, 0x1_2345_6000n);
    expect(h.read64(Reg.ASQ)).toBe(0x1_2345_6000n);
    h.write32(Reg.ACQ, 0x7000);
    h.write32(Reg.ACQ + 4, 0x2);
    expect(h.read64(Reg.ACQ)).toBe(0x2_0000_7000n);
    // High half first, then a low half with bit 31 set.
    h.write32(Reg.ASQ + 4, 0x3);
    h.write32(Reg.ASQ, 0x8000_1000);
    expect(h.read64(Reg.ASQ)).toBe(0x3_8000_1000n);
    // Low 12 bits are reserved.
    h.write32(Reg.ASQ, 0xabc);
    expect(h.read32(Reg.ASQ)).toBe(0);
  });

  it('sets CSTS.RDY on CC.EN and clears it, with all queues, on disable', async () => {
    const h = new TestHost().start();
    expect(h.read32(Reg.CSTS) & CSTS.RDY).toBe(1);
    await h.createIoQueuePair(1);
    expect(h.controller.state.submissionQueues[1]).toBeTruthy();
    h.write32(Reg.CC, 0);
    expect(h.read32(Reg.CSTS) & CSTS.RDY).toBe(0);
    expect(h.controller.state.submissionQueues.filter(Boolean)).toHaveLength(0);
    expect(h.controller.state.completionQueues.filter(Boolean)).toHaveLength(0);
    // Admin queue registers survive a controller reset.
    expect(h.read64(Reg.ASQ)).toBe(BigInt(ADMIN_SQ));
    expect(h.read64(Reg.ACQ)).toBe(BigInt(ADMIN_CQ));
    // Re-enable works from a clean state (a driver zeroes its CQ memory first).
    h.memory.fill(ADMIN_CQ, new Uint8Array(4096));
    h.enable();
    const cqe = await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: 0x400000, cdw10: 1 });
    expect(cqe.status).toBe(0);
  });

  it('completes a shutdown notification with SHST = complete', async () => {
    const h = new TestHost().start();
    h.write32(Reg.CC, h.read32(Reg.CC) | (1 << CC.SHN_SHIFT));
    await until(() => ((h.read32(Reg.CSTS) >> 2) & 3) === CSTS.SHST_COMPLETE, 'shutdown');
    expect(h.read32(Reg.CSTS) & CSTS.RDY).toBe(1);
  });

  it('refuses a bad enable with CSTS.CFS instead of RDY', () => {
    const h = new TestHost();
    h.enableBusMaster();
    h.write32(Reg.AQA, 0); // one-entry queues are not allowed
    h.write64(Reg.ASQ, BigInt(ADMIN_SQ));
    h.write64(Reg.ACQ, BigInt(ADMIN_CQ));
    h.write32(Reg.CC, CC.EN);
    expect(h.read32(Reg.CSTS) & (CSTS.RDY | CSTS.CFS)).toBe(CSTS.CFS);
    h.write32(Reg.CC, 0);
    expect(h.read32(Reg.CSTS)).toBe(0);
  });

  it('ignores AQA/ASQ writes while enabled', () => {
    const h = new TestHost().start();
    h.write32(Reg.AQA, 0x00030003);
    h.write64(Reg.ASQ, 0x999000n);
    expect(h.read32(Reg.AQA)).toBe((31 << 16) | 31);
    expect(h.read64(Reg.ASQ)).toBe(BigInt(ADMIN_SQ));
  });

  it('does not fetch while bus mastering is off, and catches up when it is enabled', async () => {
    const h = new TestHost();
    h.enableMsix();
    h.enable();
    h.place(0, new Uint8Array(64).fill(0).map((_, i) => (i === 0 ? AdminOpcode.KEEP_ALIVE : 0)));
    h.ringSq(0);
    for (let i = 0; i < 5; i++) await tick();
    expect(h.peek(0)).toBeNull();
    h.enableBusMaster();
    const cqe = await h.reap(0);
    expect(cqe.status).toBe(0);
  });

  it('function-level reset returns to power-on state', async () => {
    const h = new TestHost().start();
    await h.createIoQueuePair(1);
    h.controller.reset();
    expect(h.read32(Reg.CSTS)).toBe(0);
    expect(h.read32(Reg.CC)).toBe(0);
    expect(h.read64(Reg.ASQ)).toBe(0n);
    expect(h.controller.busMasterEnabled).toBe(false);
    expect(h.controller.state.submissionQueues.filter(Boolean)).toHaveLength(0);
  });

  it('never throws on odd BAR accesses', () => {
    const h = new TestHost().start();
    expect(() => h.controller.regionWrite(PciRegion.BAR0, 0x1003, Uint8Array.of(1))).not.toThrow();
    expect(() => h.controller.regionWrite(PciRegion.BAR0, 0x3ffc, Uint8Array.of(1, 2, 3, 4))).not.toThrow();
    expect(() => h.controller.regionRead(PciRegion.BAR0, 0x1000, 4)).not.toThrow();
    expect(() => h.controller.regionWrite(PciRegion.BAR4, 0x3000, Uint8Array.of(1, 2, 3, 4))).not.toThrow();
    expect(code(Status.SUCCESS)).toBe(0);
  });

  it('masks MSI/INTx interrupts with INTMS and releases them on INTMC', async () => {
    const h = new TestHost();
    h.enableBusMaster(); // no MSI-X: INTx mode
    h.enable();
    expect(h.controller.interruptMode()).toBe('intx');
    h.write32(Reg.INTMS, 1);
    expect(h.read32(Reg.INTMS)).toBe(1);
    h.place(0, buildCommand({ opcode: AdminOpcode.KEEP_ALIVE }));
    h.ringSq(0);
    await until(() => h.peek(0) !== null, 'the completion');
    await new Promise((resolve) => setTimeout(resolve, 5));
    expect(h.irqs.count(PciIrq.INTX)).toBe(0);
    h.write32(Reg.INTMC, 1);
    expect(h.read32(Reg.INTMC)).toBe(0);
    // INTx is looked at a moment later (interrupts.ts intxRearmed), the completion still unconsumed.
    await until(() => h.irqs.count(PciIrq.INTX) === 1, 'INTx after INTMC');
  });

  it('INTx is triggered for unconsumed completions only, and not again before QEMU re-arms it', async () => {
    const h = new TestHost();
    h.enableBusMaster(); // no MSI-X: INTx mode
    h.enable();
    const intx = (): number => h.irqs.count(PciIrq.INTX);
    const keepAlive = (): void => {
      h.place(0, buildCommand({ opcode: AdminOpcode.KEEP_ALIVE }));
      h.ringSq(0);
    };
    const settle = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
    await settle(5);
    const before = intx();
    keepAlive();
    await h.reap(0, false);
    await until(() => intx() === before + 1, 'INTx for the first completion');
    // A second completion while the line is up: the handler may consume it with the first, and a
    // trigger arriving after that would leave the line up with nothing pending.
    keepAlive();
    await h.reap(0, false);
    await settle(5);
    expect(intx()).toBe(before + 1);
    // QEMU's EOI re-arms the line, then the handler's CQ head arrives: both consumed, no trigger.
    h.controller.irqsChanged(PciIrq.INTX);
    h.ringCq(0);
    await settle(5);
    expect(intx()).toBe(before + 1);
    // Re-armed: a completion left unconsumed triggers.
    keepAlive();
    await h.reap(0, false);
    await until(() => intx() === before + 2, 'INTx for the third completion');
  });

  it('INTx: a completion held back waits no longer than the re-arm deadline when no re-arm comes', async () => {
    const h = new TestHost();
    h.enableBusMaster();
    h.enable();
    await new Promise((resolve) => setTimeout(resolve, 5));
    const before = h.irqs.count(PciIrq.INTX);
    h.place(0, buildCommand({ opcode: AdminOpcode.KEEP_ALIVE }));
    h.ringSq(0);
    await h.reap(0, false);
    await until(() => h.irqs.count(PciIrq.INTX) === before + 1, 'INTx for the first completion');
    h.place(0, buildCommand({ opcode: AdminOpcode.KEEP_ALIVE }));
    h.ringSq(0);
    await until(() => h.peek(0) !== null, 'the second completion');
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(h.irqs.count(PciIrq.INTX)).toBe(before + 1);
    await until(() => h.irqs.count(PciIrq.INTX) === before + 2, 'the deadline raising the unconsumed completion', 1000);
  });
});
