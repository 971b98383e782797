// The controlling function against fake guests: Identify CNS 13h/14h/15h, every Virtualization
// Management transition and error status, what a secondary's host sees of its resources and
// state, virtual subsystem identities, and Namespace Attachment events.

import { describe, expect, it } from 'vitest';
import { buildCommand } from '../../../src/nvme/command.js';
import { Namespace } from '../../../src/nvme/namespace.js';
import { RamBackend } from '../../../src/nvme/backend.js';
import { AdminOpcode, Cns, CSTS, NvmOpcode, PrimaryOpcode, Reg, Status, VirtAction, VirtResource } from '../../../src/nvme/spec.js';
import { Subsystem } from '../../../src/nvme/subsystem.js';
import { silentLogger } from '../../../src/log.js';
import { ControllingFunction } from '../../../src/nvme/virt/controlling-function.js';
import { encodeDefinition, encodeNqn, VendorOpcode } from '../../../src/nvme/virt/vendor-commands.js';
import { code, DATA, PAGE, TestHost } from './helpers.js';

function build(options: { secondaries?: number; nqn?: string; ioQueues?: number } = {}): ControllingFunction {
  const subsystem = new Subsystem({ nqn: options.nqn ?? 'nqn.2026-01.test:physical', serial: `SER-${options.nqn ?? 'a'}` });
  subsystem.addNamespace(new Namespace({ nsid: 1, backend: new RamBackend(8 << 20), idSeed: `${subsystem.nqn}#1` }));
  subsystem.addNamespace(new Namespace({ nsid: 2, backend: new RamBackend(4 << 20), idSeed: `${subsystem.nqn}#2` }));
  return new ControllingFunction({ subsystem, secondaries: options.secondaries ?? 3, ioQueues: options.ioQueues ?? 4, logger: silentLogger });
}

const virtMgmt = (cf: ControllingFunction, act: number, rt: number, cntlid: number, nr = 0) =>
  cf.primary.executeAdmin(buildCommand({ opcode: PrimaryOpcode.VIRTUALIZATION_MANAGEMENT, cdw10: act | (rt << 8) | (cntlid << 16), cdw11: nr }));

const identify = async (cf: ControllingFunction, cns: number, cntid = 0): Promise<DataView> => {
  const result = await cf.primary.executeAdmin(buildCommand({ opcode: AdminOpcode.IDENTIFY, cdw10: cns | (cntid << 16) }));
  expect(result.status).toBe(0);
  return new DataView(result.data!.buffer, result.data!.byteOffset);
};

async function provision(cf: ControllingFunction, cntlid: number, vq = 3, vi = 2): Promise<void> {
  expect((await virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, cntlid, vq)).status).toBe(0);
  expect((await virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, VirtResource.INTERRUPT, cntlid, vi)).status).toBe(0);
  expect((await virtMgmt(cf, VirtAction.SECONDARY_ONLINE, 0, cntlid)).status).toBe(0);
}

describe('Identify for the controlling function', () => {
  it('CNS 13h lists every controller from CNTID on; 14h reports the pools; 15h the secondaries', async () => {
    const cf = build({ secondaries: 3, ioQueues: 4 });
    let list = await identify(cf, Cns.CONTROLLER_LIST);
    expect(list.getUint16(0, true)).toBe(4);
    expect([0, 1, 2, 3].map((i) => list.getUint16(2 + 2 * i, true))).toEqual([0, 1, 2, 3]);
    list = await identify(cf, Cns.CONTROLLER_LIST, 2);
    expect(list.getUint16(0, true)).toBe(2);
    expect(list.getUint16(2, true)).toBe(2);

    const caps = await identify(cf, Cns.PRIMARY_CONTROLLER_CAPABILITIES);
    expect(caps.getUint16(0, true)).toBe(0); // CNTLID
    expect(caps.getUint8(4)).toBe(3); // CRT: VQ and VI
    expect(caps.getUint32(32, true)).toBe(15); // VQFRT: 3 secondaries x (4 I/O + admin)
    expect(caps.getUint32(36, true)).toBe(0); // VQRFA
    expect(caps.getUint16(42, true)).toBe(5); // VQPRT
    expect(caps.getUint16(44, true)).toBe(5); // VQFRSM
    expect(caps.getUint32(64, true)).toBe(15); // VIFRT

    await provision(cf, 2, 3, 2);
    const secondaries = await identify(cf, Cns.SECONDARY_CONTROLLER_LIST);
    expect(secondaries.getUint8(0)).toBe(3);
    const entry = (i: number) => ({
      scid: secondaries.getUint16(32 + 32 * i, true),
      pcid: secondaries.getUint16(34 + 32 * i, true),
      scs: secondaries.getUint8(36 + 32 * i),
      vfn: secondaries.getUint16(40 + 32 * i, true),
      nvq: secondaries.getUint16(42 + 32 * i, true),
      nvi: secondaries.getUint16(44 + 32 * i, true),
    });
    expect(entry(0)).toEqual({ scid: 1, pcid: 0, scs: 0, vfn: 1, nvq: 0, nvi: 0 });
    expect(entry(1)).toEqual({ scid: 2, pcid: 0, scs: 1, vfn: 2, nvq: 3, nvi: 2 });
    expect((await identify(cf, Cns.SECONDARY_CONTROLLER_LIST, 3)).getUint8(0)).toBe(1);
    expect((await identify(cf, Cns.PRIMARY_CONTROLLER_CAPABILITIES)).getUint32(36, true)).toBe(3); // VQRFA
  });

  it('the primary advertises Virtualization Management; a secondary neither advertises nor accepts it', async () => {
    const cf = build();
    const primary = await identify(cf, Cns.CONTROLLER);
    expect(primary.getUint16(256, true) & (1 << 7)).not.toBe(0);
    const secondary = cf.secondaries[0]!;
    const id = await secondary.executeAdmin(buildCommand({ opcode: AdminOpcode.IDENTIFY, cdw10: Cns.CONTROLLER }));
    expect(new DataView(id.data!.buffer).getUint16(256, true) & (1 << 7)).toBe(0);
    const refused = await secondary.executeAdmin(buildCommand({ opcode: PrimaryOpcode.VIRTUALIZATION_MANAGEMENT, cdw10: VirtAction.SECONDARY_ONLINE | (1 << 16) }));
    expect(code(refused.status)).toBe(code(Status.INVALID_OPCODE));
    const cns15 = await secondary.executeAdmin(buildCommand({ opcode: AdminOpcode.IDENTIFY, cdw10: Cns.SECONDARY_CONTROLLER_LIST }));
    expect(code(cns15.status)).toBe(code(Status.INVALID_FIELD));
  });
});

describe('Virtualization Management', () => {
  it('returns each error status where the spec puts it', async () => {
    const cf = build({ secondaries: 2, ioQueues: 4 });
    const expectStatus = async (p: ReturnType<typeof virtMgmt>, status: number) => expect(code((await p).status)).toBe(code(status));
    // Not a secondary / not the primary.
    await expectStatus(virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, 0, 2), Status.INVALID_CONTROLLER_IDENTIFIER);
    await expectStatus(virtMgmt(cf, VirtAction.SECONDARY_ONLINE, 0, 9), Status.INVALID_CONTROLLER_IDENTIFIER);
    await expectStatus(virtMgmt(cf, VirtAction.PRIMARY_FLEXIBLE_ALLOCATION, VirtResource.QUEUE, 1, 1), Status.INVALID_CONTROLLER_IDENTIFIER);
    // Reserved resource type and action.
    await expectStatus(virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, 2, 1, 2), Status.INVALID_FIELD);
    await expectStatus(virtMgmt(cf, 0x3, VirtResource.QUEUE, 1, 2), Status.INVALID_FIELD);
    // More than one secondary may hold; more than the pool holds.
    await expectStatus(virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, 1, 6), Status.INVALID_NUMBER_OF_CONTROLLER_RESOURCES);
    await expectStatus(virtMgmt(cf, VirtAction.PRIMARY_FLEXIBLE_ALLOCATION, VirtResource.QUEUE, 0, 11), Status.INVALID_NUMBER_OF_CONTROLLER_RESOURCES);
    // Online without a valid configuration.
    await expectStatus(virtMgmt(cf, VirtAction.SECONDARY_ONLINE, 0, 1), Status.INVALID_SECONDARY_CONTROLLER_STATE);
    expect((await virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, 1, 1)).dw0).toBe(1);
    expect((await virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, VirtResource.INTERRUPT, 1, 1)).dw0).toBe(1);
    await expectStatus(virtMgmt(cf, VirtAction.SECONDARY_ONLINE, 0, 1), Status.INVALID_SECONDARY_CONTROLLER_STATE);
    await provision(cf, 1, 5, 5);
    // Assign while online.
    await expectStatus(virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, 1, 2), Status.INVALID_SECONDARY_CONTROLLER_STATE);
    // The pool (10 VQ) holds 5 for secondary 1; the primary may take at most the other 5.
    await expectStatus(virtMgmt(cf, VirtAction.PRIMARY_FLEXIBLE_ALLOCATION, VirtResource.QUEUE, 0, 6), Status.INVALID_RESOURCE_IDENTIFIER);
    expect((await virtMgmt(cf, VirtAction.PRIMARY_FLEXIBLE_ALLOCATION, VirtResource.QUEUE, 0, 3)).dw0).toBe(3);
    // Now only 2 are free for secondary 2.
    await expectStatus(virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, 2, 3), Status.INVALID_RESOURCE_IDENTIFIER);
    expect((await virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, 2, 2)).status).toBe(0);
  });

  it('Primary Flexible Allocation takes effect at the next function-level reset, not at CC.EN 1→0', async () => {
    const cf = build({ secondaries: 2, ioQueues: 4 });
    expect((await virtMgmt(cf, VirtAction.PRIMARY_FLEXIBLE_ALLOCATION, VirtResource.INTERRUPT, 0, 2)).status).toBe(0);
    const vqrfap = async () => (await identify(cf, Cns.PRIMARY_CONTROLLER_CAPABILITIES)).getUint16(72, true);
    expect(await vqrfap()).toBe(0);
    const host = new TestHost({ use: cf.primary }).start();
    host.write32(Reg.CC, 0);
    expect(await vqrfap()).toBe(0);
    cf.primary.reset();
    expect(await vqrfap()).toBe(2);
  });

  it('offline removes the resources; repeating online or offline is not an error', async () => {
    const cf = build();
    await provision(cf, 1);
    expect((await virtMgmt(cf, VirtAction.SECONDARY_ONLINE, 0, 1)).status).toBe(0);
    expect((await virtMgmt(cf, VirtAction.SECONDARY_OFFLINE, 0, 1)).status).toBe(0);
    expect(cf.virtualization.secondary(1)).toMatchObject({ online: false, nvq: 0, nvi: 0 });
    expect((await virtMgmt(cf, VirtAction.SECONDARY_OFFLINE, 0, 1)).status).toBe(0);
  });

  it('disabling the primary takes its secondaries offline; Online needs an enabled primary once it has a host', async () => {
    let hasClient = false;
    const cf = build();
    cf.primaryHasClient = () => hasClient;
    await provision(cf, 1);
    const host = new TestHost({ use: cf.primary }).start();
    hasClient = true;
    await host.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 1 });
    host.write32(Reg.CC, 0); // the primary's host disables it
    expect(cf.virtualization.secondary(1)).toMatchObject({ online: false, nvq: 0 });
    expect((await virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, 1, 2)).status).toBe(0);
    expect((await virtMgmt(cf, VirtAction.SECONDARY_ASSIGN, VirtResource.INTERRUPT, 1, 1)).status).toBe(0);
    expect(code((await virtMgmt(cf, VirtAction.SECONDARY_ONLINE, 0, 1)).status)).toBe(code(Status.INVALID_SECONDARY_CONTROLLER_STATE));
    host.enable();
    expect((await virtMgmt(cf, VirtAction.SECONDARY_ONLINE, 0, 1)).status).toBe(0);
  });
});

describe('a secondary as its host sees it', () => {
  it('shows CSTS.CFS while offline and cannot be enabled; once online its queues and vectors follow its resources', async () => {
    const cf = build({ ioQueues: 4 });
    const guest = new TestHost({ use: cf.secondaries[0]! });
    guest.enableBusMaster();
    guest.enableMsix();
    expect(guest.read32(Reg.CSTS) & CSTS.CFS).toBe(CSTS.CFS);
    guest.enable();
    expect(guest.read32(Reg.CSTS) & CSTS.RDY).toBe(0);
    await provision(cf, 1, 3, 2);
    expect(guest.read32(Reg.CSTS)).toBe(0); // online: a fresh, disabled controller
    guest.enable();
    expect(guest.read32(Reg.CSTS) & CSTS.RDY).toBe(CSTS.RDY);
    // VQ 3 = admin + 2 I/O queue pairs; VI 2 = vectors 0 and 1.
    const queues = await guest.admin({ opcode: AdminOpcode.GET_FEATURES, cdw10: 0x07 });
    expect(queues.dw0).toBe((1 << 16) | 1);
    const bad = await guest.admin({ opcode: AdminOpcode.CREATE_IO_CQ, prp1: 0x100000, cdw10: (15 << 16) | 1, cdw11: (2 << 16) | 3 });
    expect(code(bad.status)).toBe(code(Status.INVALID_INTERRUPT_VECTOR));
    await guest.createIoQueuePair(1, 16, 1);
    await guest.createIoQueuePair(2, 16, 1);
    const third = await guest.admin({ opcode: AdminOpcode.CREATE_IO_CQ, prp1: 0x500000, cdw10: (15 << 16) | 3, cdw11: (1 << 16) | 3 });
    expect(code(third.status)).toBe(code(Status.INVALID_QUEUE_IDENTIFIER));
    expect((await guest.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA })).status).toBe(0);
    // Taken offline under its host: CFS, and nothing more is processed.
    expect((await virtMgmt(cf, VirtAction.SECONDARY_OFFLINE, 0, 1)).status).toBe(0);
    expect(guest.read32(Reg.CSTS) & CSTS.CFS).toBe(CSTS.CFS);
  });
});

describe('virtual subsystems', () => {
  const vendor = (cf: ControllingFunction, opcode: number, data: Uint8Array, cdw10 = 0, cdw11 = 0) =>
    cf.primary.executeAdmin(buildCommand({ opcode, cdw10, cdw11 }), data);

  it('two servers with different physical IDs give a virtual controller byte-identical Identify data', async () => {
    const pages: Uint8Array[][] = [];
    for (const [nqn, scid] of [['nqn.2026-01.host:a', 1], ['nqn.2026-01.host:b', 3]] as const) {
      const cf = build({ nqn, secondaries: 3 });
      const def = encodeDefinition({ nqn: 'nqn.2026-01.io.example:vm7', namespaces: [{ vnsid: 5, nsid: 1 }] });
      expect((await vendor(cf, VendorOpcode.VSUBSYS_CREATE, def)).status).toBe(0);
      const added = await vendor(cf, VendorOpcode.VSUBSYS_ADD_CONTROLLER, encodeNqn('nqn.2026-01.io.example:vm7'), scid, 7);
      expect(added.status).toBe(0);
      expect(added.dw0).not.toBe(0);
      await provision(cf, scid);
      const guest = new TestHost({ use: cf.controller(scid)! }).start();
      const ctrl = await guest.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: Cns.CONTROLLER });
      expect(ctrl.status).toBe(0);
      const controllerPage = guest.memory.slice(DATA, PAGE);
      const list = await guest.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA + PAGE, cdw10: Cns.ACTIVE_NAMESPACES });
      expect(list.status).toBe(0);
      const ns = await guest.admin({ opcode: AdminOpcode.IDENTIFY, nsid: 5, prp1: DATA + 2 * PAGE, cdw10: Cns.NAMESPACE });
      const descriptors = await guest.admin({ opcode: AdminOpcode.IDENTIFY, nsid: 5, prp1: DATA + 3 * PAGE, cdw10: Cns.NAMESPACE_DESCRIPTORS });
      expect(ns.status + descriptors.status).toBe(0);
      pages.push([controllerPage, guest.memory.slice(DATA + PAGE, PAGE), guest.memory.slice(DATA + 2 * PAGE, PAGE), guest.memory.slice(DATA + 3 * PAGE, PAGE)]);
      const text = new TextDecoder().decode(controllerPage.subarray(768, 768 + 26));
      expect(text).toBe('nqn.2026-01.io.example:vm7');
      expect(new DataView(controllerPage.buffer).getUint16(78, true)).toBe(7); // CNTLID = the virtual controller ID
      expect(new DataView(guest.memory.slice(DATA + PAGE, 8).buffer).getUint32(0, true)).toBe(5); // only NSID 5
    }
    const [a, b] = pages;
    for (let i = 0; i < a!.length; i++) expect(Buffer.from(a![i]!).equals(Buffer.from(b![i]!))).toBe(true);
  });

  it('refuses what would change an online controller, duplicates and unknown names; lists what exists', async () => {
    const cf = build();
    const nqn = 'nqn.2026-01.io.example:x';
    expect(code((await vendor(cf, VendorOpcode.VSUBSYS_CREATE, encodeDefinition({ nqn: 'not-an-nqn' }))).status)).toBe(code(Status.INVALID_FIELD));
    expect((await vendor(cf, VendorOpcode.VSUBSYS_CREATE, encodeDefinition({ nqn, multiController: true }))).status).toBe(0);
    expect(code((await vendor(cf, VendorOpcode.VSUBSYS_CREATE, encodeDefinition({ nqn }))).status)).toBe(code(Status.INVALID_FIELD));
    // A single-controller virtual subsystem takes one controller.
    const single = 'nqn.2026-01.io.example:single';
    expect((await vendor(cf, VendorOpcode.VSUBSYS_CREATE, encodeDefinition({ nqn: single }))).status).toBe(0);
    expect((await vendor(cf, VendorOpcode.VSUBSYS_ADD_CONTROLLER, encodeNqn(single), 3, 1)).status).toBe(0);
    expect(cf.virtualization.controller(3)!.identity.multiController).toBe(false);
    expect((await vendor(cf, VendorOpcode.VSUBSYS_REMOVE_CONTROLLER, encodeNqn(single), 3)).status).toBe(0);
    expect((await vendor(cf, VendorOpcode.VSUBSYS_DELETE, encodeNqn(single))).status).toBe(0);
    await provision(cf, 1);
    expect(code((await vendor(cf, VendorOpcode.VSUBSYS_ADD_CONTROLLER, encodeNqn(nqn), 1, 1)).status)).toBe(code(Status.INVALID_SECONDARY_CONTROLLER_STATE));
    expect(code((await vendor(cf, VendorOpcode.VSUBSYS_ADD_CONTROLLER, encodeNqn(nqn), 0, 1)).status)).toBe(code(Status.INVALID_CONTROLLER_IDENTIFIER));
    expect((await vendor(cf, VendorOpcode.VSUBSYS_ADD_CONTROLLER, encodeNqn(nqn), 2, 4)).status).toBe(0);
    expect(code((await vendor(cf, VendorOpcode.VSUBSYS_ADD_CONTROLLER, encodeNqn(nqn), 3, 4)).status)).toBe(code(Status.INVALID_FIELD)); // vcid taken
    expect(cf.virtualization.controller(2)!.identity.multiController).toBe(true);
    expect(code((await vendor(cf, VendorOpcode.VSUBSYS_DELETE, encodeNqn(nqn))).status)).toBe(code(Status.COMMAND_SEQUENCE_ERROR));
    const listed = await cf.primary.executeAdmin(buildCommand({ opcode: VendorOpcode.VSUBSYS_LIST, cdw10: 0 }));
    expect(listed.dw0).toBe(1);
    const view = new DataView(listed.data!.buffer, listed.data!.byteOffset);
    expect(view.getUint32(1024, true)).toBe(1);
    expect([view.getUint16(1028, true), view.getUint16(1030, true)]).toEqual([2, 4]);
    expect((await vendor(cf, VendorOpcode.VSUBSYS_REMOVE_CONTROLLER, encodeNqn(nqn), 2)).status).toBe(0);
    expect(cf.secondaries[1]!.presentsVirtualIdentity).toBe(false);
    expect((await vendor(cf, VendorOpcode.VSUBSYS_DELETE, encodeNqn(nqn))).status).toBe(0);
  });
});

describe('Namespace Attachment', () => {
  it('attaches and detaches per controller; only the affected controllers get the Changed Namespace List event', async () => {
    const cf = build();
    await provision(cf, 1);
    await provision(cf, 2);
    const hosts = [1, 2].map((id) => new TestHost({ use: cf.controller(id)! }).start());
    for (const h of hosts) {
      // Namespace Attribute Notices on, an AER outstanding.
      expect((await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: 0x0b, cdw11: 0x100 })).status).toBe(0);
      h.place(0, buildCommand({ opcode: AdminOpcode.ASYNC_EVENT_REQUEST }));
      h.ringSq(0);
    }
    const list = new Uint8Array(4096);
    new DataView(list.buffer).setUint16(0, 1, true);
    new DataView(list.buffer).setUint16(2, 1, true); // CNTLID 1 only
    const attach = (sel: number, nsid: number) => cf.primary.executeAdmin(buildCommand({ opcode: PrimaryOpcode.NAMESPACE_ATTACHMENT, nsid, cdw10: sel }), list);
    expect(code((await attach(0, 1)).status)).toBe(code(Status.NAMESPACE_ALREADY_ATTACHED));
    expect((await attach(1, 2)).status).toBe(0);
    expect(code((await attach(1, 2)).status)).toBe(code(Status.NAMESPACE_NOT_ATTACHED));
    expect(code((await attach(0, 9)).status)).toBe(code(Status.INVALID_NAMESPACE));
    const event = await hosts[0]!.reap(0);
    expect(event.dw0 & 0xff_ff07).toBe(0x04_0002); // notice, log page 04h
    expect(hosts[1]!.peek(0)).toBeNull();
    const log = await hosts[0]!.admin({ opcode: AdminOpcode.GET_LOG_PAGE, prp1: DATA, cdw10: 0x04 | (1023 << 16) });
    expect(log.status).toBe(0);
    expect(new DataView(hosts[0]!.memory.slice(DATA, 8).buffer).getUint32(0, true)).toBe(2);
    expect(cf.controller(1)!.isAttached(2)).toBe(false);
    expect(cf.controller(2)!.isAttached(2)).toBe(true);
    const bad = new Uint8Array(4096);
    new DataView(bad.buffer).setUint16(0, 1, true);
    new DataView(bad.buffer).setUint16(2, 77, true);
    const refused = await cf.primary.executeAdmin(buildCommand({ opcode: PrimaryOpcode.NAMESPACE_ATTACHMENT, nsid: 2, cdw10: 0 }), bad);
    expect(code(refused.status)).toBe(code(Status.CONTROLLER_LIST_INVALID));
  });
});
