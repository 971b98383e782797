// The sequences real guests run: SeaBIOS's polled driver leaving the controller enabled, then the
// Linux driver's reset and bring-up; and one smoke run over a real vfio-user socket.

import { describe, it, expect } from 'vitest';
import { GuestMemory as ClientMemory } from '../../../src/vfio-user/client.js';
import { PciRegion } from '../../../src/vfio-user/protocol.js';
import { Cfg, Command } from '../../../src/pci/registers.js';
import { AdminOpcode, CC, CSTS, FeatureId, NvmOpcode, Reg } from '../../../src/nvme/spec.js';
import { buildCommand } from '../../../src/nvme/command.js';
import { NvmeController, Namespace, RamBackend, Subsystem } from '../../../src/nvme/index.js';
import { startServer, waitUntil } from '../../integration/helpers.js';
import { ADMIN_CQ, DATA, PAGE, TestHost, pattern, until } from './helpers.js';

describe('guest boot sequences', () => {
  it('SeaBIOS-style polled use, then a Linux-style reset and bring-up', async () => {
    const h = new TestHost();
    h.enableBusMaster();
    // SeaBIOS: no interrupts, small admin queue, a polled I/O queue pair without IEN, a read.
    h.enable({ adminSize: 4 });
    expect((await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 1 })).status).toBe(0);
    expect((await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 1, cdw10: 0 })).status).toBe(0);
    await h.admin({ opcode: AdminOpcode.CREATE_IO_CQ, prp1: 0x200000, cdw10: (3 << 16) | 1, cdw11: 1 });
    await h.admin({ opcode: AdminOpcode.CREATE_IO_SQ, prp1: 0x210000, cdw10: (3 << 16) | 1, cdw11: (1 << 16) | 1 });
    h.queues.set(1, { sqBase: 0x210000, cqBase: 0x200000, size: 4, sqTail: 0, cqHead: 0, phase: 1 } as never);
    expect((await h.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA, cdw12: 0 })).status).toBe(0);
    // Only the admin CQ (always interrupt-enabled) may assert INTx; the polled I/O CQ raised nothing.
    // INTx is triggered only for completions still unconsumed a moment later, and not again before
    // QEMU re-arms the line (which this host never does): at most once for a host that polls.
    expect(h.irqs.fired.every((f) => f.index === 0 && f.vector === 0)).toBe(true);
    expect(h.irqs.fired.length).toBeLessThanOrEqual(1);
    // Linux: finds the controller enabled, disables it, waits for RDY=0, sets up from scratch.
    expect(h.read32(Reg.CSTS) & CSTS.RDY).toBe(1);
    h.write32(Reg.CC, 0);
    expect(h.read32(Reg.CSTS) & CSTS.RDY).toBe(0);
    h.memory.fill(ADMIN_CQ, new Uint8Array(PAGE));
    h.enableMsix();
    // lo_hi_writeq: ASQ/ACQ as two 4-byte writes.
    h.write32(Reg.AQA, (31 << 16) | 31);
    h.write32(Reg.ASQ, 0x10000);
    h.write32(Reg.ASQ + 4, 0);
    h.write32(Reg.ACQ, 0x20000);
    h.write32(Reg.ACQ + 4, 0);
    h.write32(Reg.CC, CC.EN | (6 << CC.IOSQES_SHIFT) | (4 << CC.IOCQES_SHIFT));
    h.queues.set(0, { sqBase: 0x10000, cqBase: 0x20000, size: 32, sqTail: 0, cqHead: 0, phase: 1 });
    h.queues.delete(1);
    expect(h.read32(Reg.CSTS) & CSTS.RDY).toBe(1);
    expect((await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 1 })).status).toBe(0);
    expect((await h.admin({ opcode: AdminOpcode.GET_LOG_PAGE, prp1: DATA, cdw10: 0x05 | (1023 << 16) })).status).toBe(0);
    expect((await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 6 })).status).toBe(0);
    const ts = new Uint8Array(8);
    h.memory.fill(DATA, ts);
    expect((await h.admin({ opcode: AdminOpcode.SET_FEATURES, prp1: DATA, cdw10: FeatureId.TIMESTAMP })).status).toBe(0);
    const nq = await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.NUMBER_OF_QUEUES, cdw11: (1 << 16) | 1 });
    expect(nq.dw0).toBe((1 << 16) | 1);
    expect((await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.ASYNC_EVENT_CONFIG, cdw11: 0x100 })).status).toBe(0);
    h.place(0, buildCommand({ opcode: AdminOpcode.ASYNC_EVENT_REQUEST }));
    h.ringSq(0);
    await h.createIoQueuePair(1, 1024, 1);
    await h.createIoQueuePair(2, 1024, 2);
    expect((await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 2 })).status).toBe(0);
    expect((await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 1, cdw10: 3 })).status).toBe(0);
    expect((await h.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, nsid: 1, cdw10: 0 })).status).toBe(0);
    // Concurrent I/O on both queues.
    const data = pattern(PAGE, 77);
    h.memory.fill(DATA + 0x10000, data);
    const writes = [];
    for (let i = 0; i < 20; i++) h.place(1 + (i % 2), buildCommand({ opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA + 0x10000, cdw10: i * 8, cdw12: 7 }));
    h.ringSq(1);
    h.ringSq(2);
    for (let i = 0; i < 10; i++) writes.push(await h.reap(1), await h.reap(2));
    expect(writes.every((c) => c.status === 0)).toBe(true);
    expect(await h.subsystem.namespace(1)!.backend.read(19 * 8 * 512, PAGE)).toEqual(data);
    expect(h.msixCount(1)).toBeGreaterThan(0);
    expect(h.msixCount(2)).toBeGreaterThan(0);
  });
});

describe('over a real vfio-user socket', () => {
  it('serves Identify and a write/read through region writes and mmapped guest memory', async () => {
    const subsystem = new Subsystem();
    subsystem.addNamespace(new Namespace({ nsid: 1, backend: new RamBackend(4 << 20) }));
    const controller = new NvmeController({ subsystem });
    const harness = startServer(controller);
    const memory = new ClientMemory(0, 16 << 20);
    try {
      const client = await harness.connect();
      await client.dmaMap(memory);
      expect((await client.regionInfo(PciRegion.BAR0)).size).toBe(0x4000);
      await client.configWrite(Cfg.COMMAND, Uint8Array.of(Command.MEMORY | Command.BUS_MASTER, 0));
      await client.write32(PciRegion.BAR0, Reg.AQA, (7 << 16) | 7);
      await client.write64(PciRegion.BAR0, Reg.ASQ, 0x10000n);
      await client.write64(PciRegion.BAR0, Reg.ACQ, 0x20000n);
      await client.write32(PciRegion.BAR0, Reg.CC, CC.EN | (6 << CC.IOSQES_SHIFT) | (4 << CC.IOCQES_SHIFT));
      expect((await client.read32(PciRegion.BAR0, Reg.CSTS)) & CSTS.RDY).toBe(1);
      let tail = 0;
      let head = 0;
      const submitAdmin = async (sqe: Uint8Array): Promise<number> => {
        memory.slice(0x10000 + tail * 64, 64).set(sqe);
        tail = (tail + 1) % 8;
        await client.write32(PciRegion.BAR0, 0x1000, tail);
        const at = 0x20000 + head * 16;
        await waitUntil(() => (memory.slice(at + 14, 1)[0]! & 1) === 1, 2000, 'admin completion');
        const status = (memory.slice(at + 14, 2)[0]! | (memory.slice(at + 14, 2)[1]! << 8)) >> 1;
        head++;
        await client.write32(PciRegion.BAR0, 0x1004, head);
        return status;
      };
      expect(await submitAdmin(buildCommand({ opcode: AdminOpcode.IDENTIFY, cid: 1, prp1: DATA, cdw10: 1 }))).toBe(0);
      expect(new TextDecoder().decode(memory.slice(DATA + 24, 40)).trim()).toBe(subsystem.model);
      expect(await submitAdmin(buildCommand({ opcode: AdminOpcode.CREATE_IO_CQ, cid: 2, prp1: 0x30000, cdw10: (7 << 16) | 1, cdw11: 1 }))).toBe(0);
      expect(await submitAdmin(buildCommand({ opcode: AdminOpcode.CREATE_IO_SQ, cid: 3, prp1: 0x40000, cdw10: (7 << 16) | 1, cdw11: (1 << 16) | 1 }))).toBe(0);
      const data = pattern(PAGE, 5);
      memory.slice(DATA + PAGE, PAGE).set(data);
      memory.slice(0x40000, 64).set(buildCommand({ opcode: NvmOpcode.WRITE, cid: 9, nsid: 1, prp1: DATA + PAGE, cdw10: 16, cdw12: 7 }));
      memory.slice(0x40040, 64).set(buildCommand({ opcode: NvmOpcode.READ, cid: 10, nsid: 1, prp1: DATA + 2 * PAGE, cdw10: 16, cdw12: 7 }));
      await client.write32(PciRegion.BAR0, 0x1008, 1);
      await until(() => (memory.slice(0x30000 + 14, 1)[0]! & 1) === 1, 'write completion');
      await client.write32(PciRegion.BAR0, 0x1008, 2);
      await until(() => (memory.slice(0x30010 + 14, 1)[0]! & 1) === 1, 'read completion');
      expect(memory.slice(DATA + 2 * PAGE, PAGE)).toEqual(data);
    } finally {
      harness.cleanup();
      memory.close();
    }
  });
});
