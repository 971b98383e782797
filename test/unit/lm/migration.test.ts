// Migration Send/Receive between two controlling functions (two "servers" sharing a namespace's
// storage and the guest's memory, as a migrated VM does): suspend mid-I/O, state out in chunks,
// state in, resume, every command completed exactly once; and every way a state is refused.

import { describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { NativeAddon } from '../../../src/native.js';
import { buildCommand, type CommandFields } from '../../../src/nvme/command.js';
import { FileBackend, RamBackend, type BlockBackend } from '../../../src/nvme/backend.js';
import { Namespace } from '../../../src/nvme/namespace.js';
import { AdminOpcode, Cns, CSTS, NvmOpcode, PrimaryOpcode, Reg, Status, VirtAction, VirtResource } from '../../../src/nvme/spec.js';
import { Subsystem } from '../../../src/nvme/subsystem.js';
import { silentLogger } from '../../../src/log.js';
import { ControllingFunction } from '../../../src/nvme/virt/controlling-function.js';
import { liveMigrationFor } from '../../../src/lm/primary.js';
import { encodeStateOf } from '../../../src/lm/migration-commands.js';
import { decodeControllerState, decodeVendor } from '../../../src/lm/state-format.js';
import { StateHeader, VENDOR_STATE_UUID } from '../../../src/lm/spec.js';
import { code, DATA, GuestMemory, PAGE, pattern, TestHost } from '../nvme/helpers.js';
import { diskScratchParent, residentPages } from '../../support/files.js';

const VNQN = 'nqn.2026-11.io.example:migrating';

/** A backing file's path in a fresh directory on a disk file system, removed with it when `body` ends. */
async function withSharedFile(body: (path: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(diskScratchParent(), 'nvme-lm-'));
  try {
    await body(join(dir, 'shared.img'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function server(name: string, backend: BlockBackend, scid: number, vcid = 3, vq = 5, ioQueues = 4): ControllingFunction {
  const subsystem = new Subsystem({ nqn: `nqn.2026-11.host:${name}`, serial: `SER-${name}` });
  subsystem.addNamespace(new Namespace({ nsid: 1, backend, idSeed: `${subsystem.nqn}#1` }));
  const cf = new ControllingFunction({ subsystem, secondaries: 3, ioQueues, logger: silentLogger, extraCommandSets: (f) => liveMigrationFor(f).commandSets });
  cf.vsubsystems.create({ nqn: VNQN });
  cf.vsubsystems.add(VNQN, scid, vcid);
  cf.virtualization.manage(VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, scid, vq);
  cf.virtualization.manage(VirtAction.SECONDARY_ASSIGN, VirtResource.INTERRUPT, scid, 5);
  cf.virtualization.manage(VirtAction.SECONDARY_ONLINE, 0, scid, 0);
  return cf;
}

const send = (cf: ControllingFunction, fields: Omit<CommandFields, 'opcode'>, data?: Uint8Array) =>
  cf.primary.executeAdmin(buildCommand({ opcode: PrimaryOpcode.MIGRATION_SEND, ...fields }), data);
const suspend = (cf: ControllingFunction, cntlid: number) => send(cf, { cdw10: 0, cdw11: (1 << 16) | cntlid });
const resume = (cf: ControllingFunction, cntlid: number) => send(cf, { cdw10: 1, cdw11: cntlid });

/** Reads the whole state the way nvme-cli and the Linux RFC do: the header first, then the rest. */
async function getState(cf: ControllingFunction, cntlid: number, chunk = 256): Promise<{ bytes: Uint8Array; csup: number }> {
  const receive = (offset: number, length: number) =>
    cf.primary.executeAdmin(
      buildCommand({ opcode: PrimaryOpcode.MIGRATION_RECEIVE, cdw10: 0 | (1 << 16), cdw11: (1 << 16) | cntlid, cdw12: offset, cdw15: length / 4 - 1 }),
    );
  const head = await receive(0, StateHeader.SIZE);
  expect(head.status).toBe(0);
  const view = new DataView(head.data!.buffer, head.data!.byteOffset);
  const total = StateHeader.SIZE + Number(view.getBigUint64(StateHeader.NVMECSS, true) + view.getBigUint64(StateHeader.VSS, true)) * 4;
  const out = new Uint8Array(total);
  let csup = head.dw0 & 1;
  for (let at = 0; at < total; at += chunk) {
    const part = await receive(at, chunk);
    expect(part.status).toBe(0);
    csup &= part.dw0 & 1;
    out.set(part.data!.subarray(0, Math.min(chunk, total - at)), at);
  }
  return { bytes: out, csup };
}

async function setState(cf: ControllingFunction, cntlid: number, bytes: Uint8Array, pieces = 2): Promise<number> {
  const size = Math.ceil(bytes.length / 4 / pieces) * 4;
  let status = 0;
  for (let i = 0, at = 0; at < bytes.length; i++, at += size) {
    const part = bytes.subarray(at, at + size);
    const last = at + size >= bytes.length;
    const seq = pieces === 1 ? 3 : i === 0 ? 1 : last ? 2 : 0;
    const result = await send(cf, { cdw10: 2 | (seq << 16), cdw11: (1 << 24) | (1 << 16) | cntlid, cdw12: at, cdw15: part.length / 4 }, part);
    status = result.status;
    if (status !== 0) return status;
  }
  return status;
}

describe('Migration Send and Receive', () => {
  it('moves a secondary mid-I/O: every command completes exactly once, on the target', async () => {
    const backend = new RamBackend(16 << 20);
    const a = server('a', backend, 1);
    const b = server('b', backend, 2);
    const memory = new GuestMemory();
    const guest = new TestHost({ use: a.controller(1)!, memory }).start();
    await guest.createIoQueuePair(1, 8);
    await guest.createIoQueuePair(2, 8);
    const data = pattern(PAGE, 7);
    memory.fill(DATA, data);
    expect((await guest.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw12: 7 })).status).toBe(0);
    // An Asynchronous Event Request outstanding, and commands in flight on both queues.
    guest.place(0, buildCommand({ opcode: AdminOpcode.ASYNC_EVENT_REQUEST }));
    guest.ringSq(0);
    const cids: number[] = [];
    for (let i = 0; i < 5; i++) cids.push(guest.place(1, buildCommand({ opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + (i + 1) * PAGE, cdw12: 7 })));
    for (let i = 0; i < 3; i++) cids.push(guest.place(2, buildCommand({ opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw10: 64 + i * 8, cdw12: 7 })));
    guest.ringSq(1);
    guest.ringSq(2);
    expect((await suspend(a, 1)).status).toBe(0);
    // Silent once suspended: a doorbell moves nothing.
    const before = memory.slice(0x100000, 0x40000);
    guest.ringCq(1);
    await new Promise((r) => setImmediate(r));
    expect(memory.slice(0x100000, 0x40000)).toEqual(before);

    const { bytes, csup } = await getState(a, 1, 200);
    expect(csup).toBe(1);
    expect(Buffer.from(encodeStateOf(a.controller(1)!, true, true)).equals(Buffer.from(bytes))).toBe(true);
    // The target's client (the destination VMM) is attached before the controller resumes there.
    const target = new TestHost({ use: b.controller(2)!, memory });
    for (const [qid, q] of guest.queues) target.queues.set(qid, { ...q });
    expect((await suspend(b, 2)).status).toBe(0);
    expect(await setState(b, 2, bytes, 3)).toBe(0);
    expect((await resume(b, 2)).status).toBe(0);

    // No PCI setup by hand: bus mastering and MSI-X came with the state.
    const seen: number[] = [];
    for (let i = 0; i < 5; i++) seen.push((await target.reap(1)).cid);
    for (let i = 0; i < 3; i++) seen.push((await target.reap(2)).cid);
    expect(seen.sort()).toEqual([...cids].sort());
    for (let i = 0; i < 5; i++) expect(memory.slice(DATA + (i + 1) * PAGE, PAGE)).toEqual(data);
    expect(target.peek(1)).toBeNull();
    // The AER travelled too: a namespace notice completes it on the target.
    b.subsystem.notifyNamespaceChanged(1);
    expect((await target.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: 0x0b, cdw11: 0x100 })).status).toBe(0);
    b.subsystem.notifyNamespaceChanged(1);
    expect((await target.reap(0)).dw0 & 7).toBe(2);
    expect(target.msixCount()).toBeGreaterThan(0);
    // And the target keeps serving I/O.
    expect((await target.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + 8 * PAGE, cdw12: 7 })).status).toBe(0);
    expect(memory.slice(DATA + 8 * PAGE, PAGE)).toEqual(data);
  });

  it('on shared storage: the source writes back when notified and makes its writes durable when suspended, the target drops its page cache before it loads the state', async () => {
    await withSharedFile(async (path) => {
      const backend = await FileBackend.open(path, { size: 16 << 20 });
      const steps: string[] = [];
      const flush = backend.flush.bind(backend);
      const dropCache = backend.dropCache.bind(backend);
      backend.flush = () => (steps.push('flush'), flush());
      backend.dropCache = () => (steps.push('dropCache'), dropCache());
      const a = server('a', backend, 1);
      const b = server('b', backend, 2);
      const memory = new GuestMemory();
      const guest = new TestHost({ use: a.controller(1)!, memory }).start();
      await guest.createIoQueuePair(1, 8);
      const data = pattern(2 * PAGE, 11);
      memory.fill(DATA, data);
      // Write-back (the volatile write cache is on): the 8 KiB sit dirty in the page cache.
      expect((await guest.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, prp2: DATA + PAGE, cdw10: 64, cdw12: 15 })).status).toBe(0);
      expect(steps).toEqual([]);
      // Suspend Notification: the write-back and the cache drop start ahead of the suspend, and the
      // controller runs on.
      expect((await send(a, { cdw10: 0, cdw11: 1 })).status).toBe(0);
      expect(steps).toEqual(['dropCache']);
      expect(a.controller(1)!.runState).toBe('running');
      expect((await guest.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + 2 * PAGE, cdw10: 64, cdw12: 7 })).status).toBe(0);
      expect((await suspend(a, 1)).status).toBe(0);
      expect(steps).toEqual(['dropCache', 'flush']);
      const { bytes } = await getState(a, 1);

      const target = new TestHost({ use: b.controller(2)!, memory });
      for (const [qid, q] of guest.queues) target.queues.set(qid, { ...q });
      expect((await suspend(b, 2)).status).toBe(0);
      await backend.read(0, 1 << 20); // what the target's host had cached (stale, on another host)
      expect(residentPages(path)).toBeGreaterThan(0);
      expect(await setState(b, 2, bytes, 2)).toBe(0);
      expect(steps).toEqual(['dropCache', 'flush', 'flush', 'dropCache']);
      expect(residentPages(path)).toBe(0);
      expect((await resume(b, 2)).status).toBe(0);
      memory.fill(DATA, new Uint8Array(2 * PAGE));
      expect((await target.io(1, { opcode: NvmOpcode.READ, nsid: 1, prp1: DATA, prp2: DATA + PAGE, cdw10: 64, cdw12: 15 })).status).toBe(0);
      expect(memory.slice(DATA, 2 * PAGE)).toEqual(data);

      // A storage failure fails the step, and nothing is lost: the source stays suspended (and can
      // resume), the target keeps the state it had.
      backend.flush = () => Promise.reject(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' }));
      expect((await suspend(b, 2)).status).toBe(Status.INTERNAL_ERROR);
      expect(b.controller(2)!.runState).toBe('suspended');
      const before = encodeStateOf(a.controller(1)!, true, true);
      backend.dropCache = () => Promise.reject(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' }));
      expect(await setState(a, 1, (await getState(b, 2)).bytes, 1)).toBe(Status.INTERNAL_ERROR);
      expect(Buffer.from(encodeStateOf(a.controller(1)!, true, true)).equals(Buffer.from(before))).toBe(true);
      expect((await resume(b, 2)).status).toBe(0);
      await backend.close();
    });
  });

  it('a host told there is no volatile write cache never flushes: after a move to write-back namespaces, each write is flushed until it identifies again', async () => {
    await withSharedFile(async (path) => {
      const source = await FileBackend.open(path, { size: 16 << 20, cache: 'directsync' });
      const a = server('a', source, 1);
      const memory = new GuestMemory();
      const guest = new TestHost({ use: a.controller(1)!, memory }).start();
      expect((await guest.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA, cdw10: 1 })).status).toBe(0);
      expect(memory.slice(DATA, 4096)[525]! & 1).toBe(0);
      await guest.createIoQueuePair(1, 8);
      expect((await suspend(a, 1)).status).toBe(0);
      const { bytes } = await getState(a, 1);
      expect(decodeVendor(decodeControllerState(bytes).vendor!).identity.noVolatileWriteCache).toBe(true);

      const cached = await FileBackend.open(path, { cache: 'writeback' });
      let flushes = 0;
      const flush = cached.flush.bind(cached);
      cached.flush = () => (flushes++, flush());
      const b = server('b', cached, 2);
      expect((await suspend(b, 2)).status).toBe(0);
      expect(await setState(b, 2, bytes)).toBe(0);
      expect((await resume(b, 2)).status).toBe(0);
      flushes = 0; // the suspend's own
      const target = new TestHost({ use: b.controller(2)!, memory });
      for (const [qid, q] of guest.queues) target.queues.set(qid, { ...q });
      memory.fill(DATA, pattern(PAGE, 5));
      const write = () => target.io(1, { opcode: NvmOpcode.WRITE, nsid: 1, prp1: DATA, cdw10: 8, cdw12: 7 });
      expect((await write()).status).toBe(0);
      expect(flushes).toBe(1);
      // Identified again, the host learns of the write cache and flushes it itself.
      expect((await target.admin({ opcode: AdminOpcode.IDENTIFY, prp1: DATA + PAGE, cdw10: 1 })).status).toBe(0);
      expect(memory.slice(DATA + PAGE, 4096)[525]! & 1).toBe(1);
      expect((await write()).status).toBe(0);
      expect(flushes).toBe(1);
      await cached.close();
      await source.close();
    });
  });

  it('a write-back that failed in the background after a Suspend Notification fails the suspend that follows', async () => {
    await withSharedFile(async (path) => {
      const backend = await FileBackend.open(path, { size: 16 << 20 });
      const internals = backend as unknown as { addon: NativeAddon };
      const addon = internals.addon;
      let failed!: () => void;
      const failedOnce = new Promise<void>((resolve) => (failed = resolve));
      // The notification's fdatasync takes the error; the kernel reports it to that one call only.
      internals.addon = Object.assign(Object.create(addon) as NativeAddon, {
        dropPageCache: () => {
          internals.addon = addon;
          failed();
          return Promise.reject(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO', syscall: 'fdatasync' }));
        },
      });
      const a = server('a', backend, 1);
      expect((await send(a, { cdw10: 0, cdw11: 1 })).status).toBe(0);
      await failedOnce;
      const suspended = await suspend(a, 1);
      expect(suspended.status).toBe(Status.INTERNAL_ERROR);
      expect(a.controller(1)!.runState).toBe('suspended');
      await backend.close();
    });
  });

  it('loading a state and taking it again gives the same bytes', async () => {
    const backend = new RamBackend(8 << 20);
    const a = server('a', backend, 1);
    const b = server('b', backend, 2);
    const guest = new TestHost({ use: a.controller(1)! }).start();
    await guest.createIoQueuePair(1, 16);
    await guest.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: 0x0e }); // fails (no data): logged in the error log
    await suspend(a, 1);
    const { bytes } = await getState(a, 1);
    await suspend(b, 2);
    expect(await setState(b, 2, bytes, 1)).toBe(0);
    expect(Buffer.from((await getState(b, 2)).bytes).equals(Buffer.from(bytes))).toBe(true);
  });

  it('a vendor-only state (CSVI 0, as nvme-cli 2.13 sends) carries the I/O queues and reloads onto the same suspended controller', async () => {
    const backend = new RamBackend(8 << 20);
    const a = server('a', backend, 1);
    const guest = new TestHost({ use: a.controller(1)! }).start();
    await guest.createIoQueuePair(1, 16);
    expect((await suspend(a, 1)).status).toBe(0);
    const get = await a.primary.executeAdmin(
      buildCommand({ opcode: PrimaryOpcode.MIGRATION_RECEIVE, cdw10: 0, cdw11: (1 << 16) | 1, cdw15: 16383 }),
    );
    const total = StateHeader.SIZE + Number(new DataView(get.data!.buffer, get.data!.byteOffset).getBigUint64(StateHeader.VSS, true)) * 4;
    const bytes = get.data!.slice(0, total);
    expect(decodeControllerState(bytes).nvmecs).toBeNull();
    // With CSVI 1 the data would need an NVMe section: refused.
    const named = await send(a, { cdw10: 2 | (3 << 16), cdw11: (1 << 24) | (1 << 16) | 1, cdw15: bytes.length / 4 }, bytes);
    expect(code(named.status)).toBe(code(Status.INVALID_FIELD));
    const vendorOnly = await send(a, { cdw10: 2 | (3 << 16), cdw11: (1 << 24) | 1, cdw15: bytes.length / 4 }, bytes);
    expect(vendorOnly.status).toBe(0);
    expect((await resume(a, 1)).status).toBe(0);
    expect((await guest.io(1, { opcode: NvmOpcode.FLUSH, nsid: 1 })).status).toBe(0);
  });

  it('refuses corrupt, truncated, foreign, wrong-version and oversized states with precise statuses, and the target stays as it was', async () => {
    const backend = new RamBackend(8 << 20);
    const a = server('a', backend, 1);
    const guest = new TestHost({ use: a.controller(1)! }).start();
    await guest.createIoQueuePair(1, 16);
    await guest.createIoQueuePair(4, 16);
    await suspend(a, 1);
    const { bytes } = await getState(a, 1);
    const b = server('b', backend, 2, 3, 3); // only 2 I/O queue pairs assigned
    const other = server('c', backend, 1, 4); // another virtual controller ID
    await suspend(b, 2);
    await suspend(other, 1);
    const sections = decodeControllerState(bytes);
    const cases: Array<[string, Uint8Array, number, ControllingFunction, number]> = [];
    const corrupt = bytes.slice();
    corrupt.fill(0xff, bytes.length - sections.vendor!.length + 8, bytes.length - sections.vendor!.length + 24);
    cases.push(['corrupt vendor section', corrupt, Status.INVALID_FIELD, other, 1]);
    cases.push(['truncated', bytes.slice(0, bytes.length - 8), Status.INVALID_FIELD, other, 1]);
    const version = bytes.slice();
    version[StateHeader.SIZE] = 1; // NVMECS version 1
    cases.push(['unknown NVMECS version', version, Status.INVALID_FIELD, other, 1]);
    cases.push(['another virtual controller ID', bytes, Status.INVALID_CONTROLLER_IDENTIFIER, other, 1]);
    cases.push(['more queues than the target has', bytes, Status.NOT_ENOUGH_RESOURCES, b, 2]);
    for (const [what, state, status, cf, cntlid] of cases) {
      const before = encodeStateOf(cf.controller(cntlid)!, true, true);
      const result = await setState(cf, cntlid, state, 2);
      expect(code(result), what).toBe(code(status));
      expect(Buffer.from(encodeStateOf(cf.controller(cntlid)!, true, true)).equals(Buffer.from(before)), what).toBe(true);
    }
    // The vendor section really names the identity it came from.
    expect(decodeVendor(sections.vendor!).identity).toEqual({ nqn: VNQN, cntlid: 3, serial: expect.any(String), noVolatileWriteCache: false }); // its host never read Identify
  });

  it('follows the command rules: targets, suspension, sequences, CSVI/CSUUIDI, CNS 20h', async () => {
    const backend = new RamBackend(8 << 20);
    const a = server('a', backend, 1);
    expect(code((await suspend(a, 0)).status)).toBe(code(Status.INVALID_CONTROLLER_IDENTIFIER));
    expect(code((await suspend(a, 9)).status)).toBe(code(Status.INVALID_CONTROLLER_IDENTIFIER));
    expect(code((await resume(a, 1)).status)).toBe(code(Status.CONTROLLER_NOT_SUSPENDED));
    expect((await send(a, { cdw10: 0, cdw11: 1 })).status).toBe(0); // Suspend Notification
    expect(a.controller(1)!.runState).toBe('running');
    expect((await suspend(a, 1)).status).toBe(0);
    expect((await suspend(a, 1)).status).toBe(0); // suspending again is no error
    const { bytes } = await getState(a, 1);
    const half = bytes.subarray(0, 48);
    // A middle piece with no sequence; CSVI/CSUUIDI 0/0.
    expect(code((await send(a, { cdw10: 2, cdw11: (1 << 24) | (1 << 16) | 1, cdw15: 12 }, half)).status)).toBe(code(Status.COMMAND_SEQUENCE_ERROR));
    expect(code((await send(a, { cdw10: 2 | (3 << 16), cdw11: 1, cdw15: 12 }, half)).status)).toBe(code(Status.INVALID_FIELD));
    // A first piece, then Resume before the last: Command Sequence Error.
    expect((await send(a, { cdw10: 2 | (1 << 16), cdw11: (1 << 24) | (1 << 16) | 1, cdw15: 12 }, half)).status).toBe(0);
    expect(code((await resume(a, 1)).status)).toBe(code(Status.COMMAND_SEQUENCE_ERROR));
    expect(await setState(a, 1, bytes, 1)).toBe(0);
    expect((await resume(a, 1)).status).toBe(0);
    // Get on a running controller works, without CSUP.
    const running = await a.primary.executeAdmin(buildCommand({ opcode: PrimaryOpcode.MIGRATION_RECEIVE, cdw10: 1 << 16, cdw11: (1 << 16) | 1, cdw15: 11 }));
    expect(running.status).toBe(0);
    expect(running.dw0 & 1).toBe(0);
    const formats = await a.primary.executeAdmin(buildCommand({ opcode: AdminOpcode.IDENTIFY, cdw10: Cns.SUPPORTED_CONTROLLER_STATE_FORMATS }));
    expect([formats.data![0], formats.data![1], formats.data![2], formats.data![3]]).toEqual([1, 1, 0, 0]);
    expect(Buffer.from(formats.data!.subarray(4, 20)).toString('hex')).toBe(VENDOR_STATE_UUID.replace(/-/g, ''));
    // The primary is the Migration Management Controller; a secondary is not one.
    const primaryId = await a.primary.executeAdmin(buildCommand({ opcode: AdminOpcode.IDENTIFY, cdw10: 1 }));
    expect(new DataView(primaryId.data!.buffer).getUint16(256, true) & (1 << 11)).not.toBe(0);
    const secondary = a.controller(1)!;
    const refused = await secondary.executeAdmin(buildCommand({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: 0, cdw11: (1 << 16) | 2 }));
    expect(code(refused.status)).toBe(code(Status.INVALID_OPCODE));
    const cns20 = await secondary.executeAdmin(buildCommand({ opcode: AdminOpcode.IDENTIFY, cdw10: Cns.SUPPORTED_CONTROLLER_STATE_FORMATS }));
    expect(code(cns20.status)).toBe(code(Status.INVALID_FIELD));
  });

  it('a suspended controller holds its completions, events and interrupts until it resumes, and its keep-alive does not expire', async () => {
    const backend = new RamBackend(8 << 20);
    const a = server('a', backend, 1);
    const guest = new TestHost({ use: a.controller(1)! }).start();
    await guest.createIoQueuePair(1, 4);
    // A second SQ posting to CQ 1, so four commands can be in flight for its three usable slots.
    const sq2 = 0x700000;
    expect((await guest.admin({ opcode: AdminOpcode.CREATE_IO_SQ, prp1: sq2, cdw10: (3 << 16) | 2, cdw11: (1 << 16) | 1 })).status).toBe(0);
    guest.queues.set(2, { ...guest.queues.get(1)!, sqBase: sq2 });
    expect((await guest.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: 0x0f, cdw11: 1000 })).status).toBe(0); // KATO 1 s
    for (let i = 0; i < 3; i++) guest.place(1, buildCommand({ opcode: NvmOpcode.FLUSH, nsid: 1 }));
    guest.place(2, buildCommand({ opcode: NvmOpcode.FLUSH, nsid: 1 }));
    guest.ringSq(1);
    guest.ringSq(2);
    await new Promise((r) => setTimeout(r, 20));
    expect(a.controller(1)!.state.heldCompletions).toHaveLength(1);
    expect((await suspend(a, 1)).status).toBe(0);
    const interrupts = guest.msixCount();
    // The host consumes the CQ; suspended, the controller posts nothing.
    for (let i = 0; i < 3; i++) await guest.reap(1);
    await new Promise((r) => setTimeout(r, 1200)); // past the keep-alive timeout
    expect(guest.peek(1)).toBeNull();
    expect(guest.msixCount()).toBe(interrupts);
    expect(guest.read32(Reg.CSTS) & CSTS.CFS).toBe(0);
    expect((await resume(a, 1)).status).toBe(0);
    expect((await guest.reap(1)).status).toBe(0);
  });
});
