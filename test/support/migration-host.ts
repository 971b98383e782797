// The Migration Management Host of the live-migration tests: whoever submits a primary's admin
// commands, either through the primary's own admin queue (an NvmeHost attached to the exported
// primary: a management VM, data moving by PRP through its guest RAM) or through the server's
// control socket. One typed helper per TP4159 and Virtualization Management step the tests use.

import { buildCommand, type CommandFields } from '../../src/nvme/command.js';
import { PrimaryOpcode, statusName, VirtAction, VirtResource } from '../../src/nvme/spec.js';
import { encodeDefinition, encodeNqn, VendorOpcode } from '../../src/nvme/virt/vendor-commands.js';
import type { VirtualSubsystemDefinition } from '../../src/nvme/virt/vsubsys.js';
import type { ControlClient } from '../../src/mgmt/control/client.js';
import {
  CdqSelect,
  CdqType,
  EntrySequence,
  LbaChangeRange,
  LbaMigrationEntry,
  LogAction,
  MigrationSendSelect,
  MOS_SHIFT,
  SuspendType,
  TrackAction,
  TrackedChangesLayout,
  TrackMemoryLayout,
  TrackReceiveSelect,
  TrackSendSelect,
} from '../../src/lm/spec.js';
import { receiveState, sendState, type AdminSubmitter } from '../../src/lm/state-transfer.js';
import { decodeControllerState, decodeNvmecs, decodeVendor } from '../../src/lm/state-format.js';
import { PAGE, type NvmeHost } from './nvme-host.js';
import type { ControllerFacts } from './nvme-workload.js';

/** An admin command the primary completed with an error status. */
export class AdminCommandError extends Error {
  constructor(
    readonly opcode: number,
    readonly status: number,
    detail: string,
  ) {
    super(`admin opcode 0x${opcode.toString(16)}: ${statusName(status)}${detail ? `: ${detail}` : ''}`);
  }
}

/** One LBA Migration Queue entry (type 0) as the primary posted it. */
export interface LbaMigrationQueueEntry {
  nsid: number;
  slba: number;
  blocks: number;
  sequence: number;
  range: number;
  deallocated: boolean;
}

/** A User Data Migration Queue in the management host's memory. */
export class UserDataMigrationQueue {
  constructor(
    readonly id: number,
    private readonly host: NvmeHost,
    readonly ring: number,
    readonly slots: number,
  ) {}

  /** Entries posted in the first pass of the ring (phase tag 1), in order. */
  entries(): LbaMigrationQueueEntry[] {
    const out: LbaMigrationQueueEntry[] = [];
    for (let slot = 0; slot < this.slots; slot++) {
      const raw = this.host.bytes(this.ring + slot * LbaMigrationEntry.SIZE, LbaMigrationEntry.SIZE);
      const attributes = raw[LbaMigrationEntry.ATTRIBUTES]!;
      if ((attributes & LbaMigrationEntry.CDQP) === 0) break;
      const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
      out.push({
        nsid: view.getUint32(LbaMigrationEntry.NSID, true),
        slba: Number(view.getBigUint64(LbaMigrationEntry.SLBA, true)),
        blocks: view.getUint32(LbaMigrationEntry.NLB, true) + 1,
        sequence: (attributes >> LbaMigrationEntry.ESA_SHIFT) & 0x7,
        range: attributes >> LbaMigrationEntry.LBACIR_SHIFT,
        deallocated: (attributes & LbaMigrationEntry.DLBA) !== 0,
      });
    }
    return out;
  }

  /** Whether the last entry says logging ended because the controller was suspended. */
  endsWithSuspend(): boolean {
    const last = this.entries().at(-1);
    return last?.sequence === EntrySequence.LAST_SUSPENDED && last.range === LbaChangeRange.NO_RANGE;
  }
}

/** What a Controller State (NVMECS v0 and our vendor section) says about its controller. */
export interface StateFacts extends ControllerFacts {
  /** CSATTR: the controller stayed suspended while the state was taken. */
  suspendedThroughout: boolean;
  /** The admin queues: where the controller fetched to and posted to. */
  admin: { sqHead: number; cqTail: number };
  /** CIDs of the Asynchronous Event Requests it holds. */
  asyncEventRequests: number[];
}

export function stateFacts(bytes: Uint8Array): StateFacts {
  const sections = decodeControllerState(bytes);
  if (!sections.nvmecs || !sections.vendor) throw new Error('the state lacks its NVMe or vendor section');
  const { sqs, cqs } = decodeNvmecs(sections.nvmecs);
  const { state } = decodeVendor(sections.vendor);
  const adminSq = state.submissionQueues[0];
  const adminCq = state.completionQueues[0];
  if (!adminSq || !adminCq) throw new Error('the state has no admin queues');
  return {
    suspendedThroughout: sections.suspendedThroughout,
    sqHeads: new Map(sqs.map((sq) => [sq.qid, sq.head])),
    cqTails: new Map(cqs.map((cq) => [cq.qid, cq.tail])),
    held: state.heldCompletions.map((h) => ({ sqid: h.sqid, cid: h.cid })),
    admin: { sqHead: adminSq.head, cqTail: adminCq.tail },
    asyncEventRequests: [...state.asyncEvents.outstanding],
  };
}

export class MigrationHost {
  /** Every command submitted, in order (tests look at the Set Controller State sequence). */
  readonly sent: CommandFields[] = [];
  /** One ring for every User Data Migration Queue this host creates, one at a time. */
  private userDataRing: { addr: number; slots: number } | null = null;

  private constructor(
    private readonly submitter: AdminSubmitter,
    /** The management host's memory, when it has one (a Controller Data Queue lives there). */
    readonly memory: NvmeHost | null,
  ) {}

  /** Commands through the primary's admin queue; data through two pages of the host's RAM. */
  static overAdminQueue(host: NvmeHost): MigrationHost {
    const buffer = host.alloc(2 * PAGE);
    return new MigrationHost(async ({ opcode, ...fields }, data) => {
      const bytes = host.bytes(buffer, 2 * PAGE);
      if (data && data.length > bytes.length) throw new Error(`${data.length} bytes of command data: at most ${bytes.length} here`);
      bytes.fill(0);
      if (data) bytes.set(data);
      const completion = await host.admin.run(opcode, { prp1: buffer, prp2: buffer + PAGE, ...fields });
      if (completion.status !== 0) throw new AdminCommandError(opcode, completion.status, '');
      return { dw0: completion.dw0, data: bytes.slice() };
    }, host);
  }

  /** Commands as control-socket `admin` requests (what the CLI does). */
  static overControlSocket(client: ControlClient): MigrationHost {
    return new MigrationHost(async (fields, data) => {
      const response = await client.request({ admin: { command: buildCommand(fields), ...(data ? { data } : {}) } });
      if (response.error) throw new Error(response.error);
      const result = response.admin!;
      if (result.status !== 0) throw new AdminCommandError(fields.opcode, result.status, result.detail ?? '');
      return { dw0: result.dw0, data: result.data ?? new Uint8Array(0) };
    }, null);
  }

  /** Submits one admin command; throws AdminCommandError on an error status. */
  readonly submit: AdminSubmitter = (fields, data) => {
    this.sent.push(fields);
    return this.submitter(fields, data);
  };

  // ---- provisioning (Virtualization Management and the virtual-subsystem vendor commands) ---------

  async createVirtualSubsystem(definition: VirtualSubsystemDefinition): Promise<void> {
    await this.submit({ opcode: VendorOpcode.VSUBSYS_CREATE }, encodeDefinition(definition));
  }

  async addToVirtualSubsystem(nqn: string, cntlid: number, vcid: number): Promise<void> {
    await this.submit({ opcode: VendorOpcode.VSUBSYS_ADD_CONTROLLER, cdw10: cntlid, cdw11: vcid }, encodeNqn(nqn));
  }

  /** Assigns queue and interrupt resources and brings the secondary online (which resets it). */
  async bringOnline(cntlid: number, resources: { queues: number; interrupts: number }): Promise<void> {
    await this.virtualizationManagement(VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, cntlid, resources.queues);
    await this.virtualizationManagement(VirtAction.SECONDARY_ASSIGN, VirtResource.INTERRUPT, cntlid, resources.interrupts);
    await this.virtualizationManagement(VirtAction.SECONDARY_ONLINE, 0, cntlid, 0);
  }

  /**
   * Offline, then online again: the secondary comes back reset, with no I/O queues, which is what
   * a Set Controller State with an NVMe controller state needs of its target.
   */
  async resetSecondary(cntlid: number, resources: { queues: number; interrupts: number }): Promise<void> {
    await this.virtualizationManagement(VirtAction.SECONDARY_OFFLINE, 0, cntlid, 0);
    await this.bringOnline(cntlid, resources);
  }

  private async virtualizationManagement(action: number, type: number, cntlid: number, count: number): Promise<void> {
    await this.submit({ opcode: PrimaryOpcode.VIRTUALIZATION_MANAGEMENT, cdw10: action | (type << 8) | (cntlid << 16), cdw11: count });
  }

  // ---- Migration Send / Receive ---------------------------------------------------------------------

  /** Migration Send, Suspend; `deleteUserDataQueue` is DUDMQ. */
  async suspend(cntlid: number, deleteUserDataQueue = false): Promise<void> {
    const dudmq = deleteUserDataQueue ? 1 << 31 : 0;
    await this.submit({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: MigrationSendSelect.SUSPEND, cdw11: dudmq | (SuspendType.SUSPEND << 16) | cntlid });
  }

  async resume(cntlid: number): Promise<void> {
    await this.submit({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: MigrationSendSelect.RESUME, cdw11: cntlid });
  }

  /** Migration Receive in `chunk`-byte pieces; how many commands it took. */
  async getState(cntlid: number, chunk: number): Promise<{ bytes: Uint8Array; consistent: boolean; commands: number }> {
    const before = this.sent.length;
    const { bytes, consistent } = await receiveState(this.submit, cntlid, chunk);
    return { bytes, consistent, commands: this.sent.length - before };
  }

  /** Set Controller State in `chunk`-byte pieces; the SEQIND of each piece, in order. */
  async setState(cntlid: number, bytes: Uint8Array, chunk: number): Promise<number[]> {
    const before = this.sent.length;
    await sendState(this.submit, cntlid, bytes, chunk);
    return this.sent.slice(before).map((c) => ((c.cdw10 ?? 0) >>> MOS_SHIFT) & 0x3);
  }

  // ---- Track Send / Receive, Controller Data Queues -------------------------------------------------

  /** Track Memory Changes over `ranges` at 4 KiB granularity. */
  async startMemoryTracking(cntlid: number, ranges: { addr: number; bytes: number }[]): Promise<void> {
    const data = new Uint8Array(TrackMemoryLayout.HEADER + ranges.length * TrackMemoryLayout.DESCRIPTOR_SIZE);
    const view = new DataView(data.buffer);
    view.setUint32(TrackMemoryLayout.RNMRTD, ranges.length, true);
    ranges.forEach((r, i) => {
      const at = TrackMemoryLayout.HEADER + i * TrackMemoryLayout.DESCRIPTOR_SIZE;
      view.setBigUint64(at, BigInt(r.addr), true);
      view.setUint32(at + 8, Math.ceil(r.bytes / PAGE), true);
    });
    await this.submit({ opcode: PrimaryOpcode.TRACK_SEND, cdw10: TrackSendSelect.TRACK_MEMORY_CHANGES | (TrackAction.START << MOS_SHIFT), cdw11: cntlid }, data);
  }

  async stopMemoryTracking(cntlid: number): Promise<void> {
    await this.submit({ opcode: PrimaryOpcode.TRACK_SEND, cdw10: TrackSendSelect.TRACK_MEMORY_CHANGES | (TrackAction.STOP << MOS_SHIFT), cdw11: cntlid });
  }

  /** Track Receive until MTR clears: the changed pages (sorted), and whether SUSP was set throughout. */
  async trackedPages(cntlid: number, bufferBytes = PAGE): Promise<{ pages: number[]; suspended: boolean; receives: number }> {
    const pages: number[] = [];
    let suspended = true;
    for (let receives = 1; ; receives++) {
      const { data } = await this.submit({ opcode: PrimaryOpcode.TRACK_RECEIVE, cdw10: TrackReceiveSelect.TRACKED_MEMORY_CHANGES, cdw11: cntlid, cdw12: bufferBytes / 4 - 1 });
      const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
      const attributes = view.getUint8(TrackedChangesLayout.ATTRIBUTES);
      const granule = PAGE << view.getUint16(TrackedChangesLayout.RPMPG, true);
      suspended &&= (attributes & TrackedChangesLayout.SUSP) !== 0;
      for (let i = 0; i < view.getUint32(TrackedChangesLayout.NTMCD, true); i++) {
        const at = TrackedChangesLayout.HEADER + i * TrackedChangesLayout.DESCRIPTOR_SIZE;
        const start = Number(view.getBigUint64(at, true));
        const bytes = view.getUint32(at + 8, true) * granule;
        for (let page = start; page < start + bytes; page += PAGE) pages.push(page);
      }
      if ((attributes & TrackedChangesLayout.MTR) === 0) return { pages: pages.sort((a, b) => a - b), suspended, receives };
    }
  }

  /**
   * A User Data Migration Queue of `slots` entries in this host's memory (physically contiguous),
   * logging. The queue is expected to end with the suspend that deletes it (DUDMQ).
   */
  async startUserDataLog(cntlid: number, slots: number): Promise<UserDataMigrationQueue> {
    const host = this.memory;
    if (!host) throw new Error('a Controller Data Queue needs the management host memory');
    if (!this.userDataRing || this.userDataRing.slots < slots) this.userDataRing = { addr: host.alloc(slots * LbaMigrationEntry.SIZE), slots };
    const ring = this.userDataRing.addr;
    // Every phase tag starts at 0: the first pass of the controller writes 1.
    host.bytes(ring, slots * LbaMigrationEntry.SIZE).fill(0);
    const dwords = (slots * LbaMigrationEntry.SIZE) / 4;
    const physicallyContiguous = 1;
    const created = await this.submit({
      opcode: PrimaryOpcode.CONTROLLER_DATA_QUEUE,
      prp1: ring,
      cdw10: CdqSelect.CREATE | (CdqType.USER_DATA_MIGRATION << MOS_SHIFT),
      cdw11: (cntlid << 16) | physicallyContiguous,
      cdw12: dwords,
    });
    const id = created.dw0 & 0xffff;
    await this.submit({ opcode: PrimaryOpcode.TRACK_SEND, cdw10: TrackSendSelect.LOG_USER_DATA_CHANGES | (LogAction.START << MOS_SHIFT), cdw11: id });
    return new UserDataMigrationQueue(id, host, ring, slots);
  }
}
