// Controller Data Queues (45h) of type User Data Migration Queue, Feature 21h, and Log User Data
// Changes (Track Send SEL 0): while logging, every LBA range a secondary writes or deallocates
// becomes an LBA Migration Queue entry (type 0) in a ring in the primary's host memory, with a
// phase tag; the host moves the head with Set Features 21h and may arm a one-shot tail event.

import type { Command } from '../nvme/command.js';
import type { Feature } from '../nvme/features.js';
import type { NvmeController } from '../nvme/controller.js';
import { PageWriter } from '../nvme/page-writer.js';
import { AsyncEventInfo, AsyncEventType, Status } from '../nvme/spec.js';
import { CommandError } from '../nvme/transfer.js';
import { field64 } from '../nvme/command.js';
import { CDQ_LIST_PRPS, CDQ_RANGES, CDQ_RANGES_IN_SUBSYSTEM, USER_DATA_QUEUES } from './policy.js';
import { CdqType, EntrySequence, LbaChangeRange, LbaMigrationEntry, LogAction, MOS_SHIFT } from './spec.js';

const PAGE = 4096;
const ENTRY_DWORDS = LbaMigrationEntry.SIZE / 4;

interface UserDataQueue {
  id: number;
  /** The migratable controller whose changes go here. */
  cntlid: number;
  /** Guest pages holding the ring, in order (one entry never spans two: 32 divides 4096). */
  pages: number[];
  slots: number;
  head: number;
  tail: number;
  phase: number;
  tailTrigger: number | null;
  logging: boolean;
  /** The next entry is the first since logging started or the controller resumed. */
  first: boolean;
  /** Entries are written in order: each write waits for the one before. */
  writing: Promise<void>;
}

export interface UserDataQueueHost {
  readonly primary: NvmeController;
  controller(cntlid: number): NvmeController | undefined;
}

const fail = (status: number, why: string): CommandError => new CommandError(status, why);

export class UserDataQueues {
  private readonly queues = new Map<number, UserDataQueue>();
  private readonly unsubscribe = new Map<number, () => void>();
  private nextId = 1;

  constructor(private readonly host: UserDataQueueHost) {}

  /** Controller Data Queue SEL 0 (Create). Returns the CDQID. */
  async create(cmd: Command): Promise<number> {
    const type = (cmd.cdw10 >>> MOS_SHIFT) & 0xff;
    if (type !== CdqType.USER_DATA_MIGRATION) throw fail(Status.INVALID_FIELD, `Controller Data Queue type 0x${type.toString(16)}`);
    const contiguous = (cmd.cdw11 & 1) !== 0;
    const cntlid = cmd.cdw11 >>> 16;
    const dwords = cmd.cdw12 >>> 0;
    if (dwords === 0 || dwords % ENTRY_DWORDS !== 0 || dwords / ENTRY_DWORDS < 2) throw fail(Status.INVALID_FIELD, `CDQSIZE ${dwords} dwords`);
    const target = cntlid === this.host.primary.cntlid ? undefined : this.host.controller(cntlid);
    if (!target) throw fail(Status.INVALID_CONTROLLER_IDENTIFIER, `CNTLID ${cntlid} is not a migratable controller`);
    if ([...this.queues.values()].some((q) => q.cntlid === cntlid)) throw fail(Status.INVALID_FIELD, `controller ${cntlid} already has a User Data Migration Queue`);
    if (this.queues.size >= USER_DATA_QUEUES) throw fail(Status.NOT_ENOUGH_RESOURCES, `${USER_DATA_QUEUES} User Data Migration Queues exist`);
    const prp1 = field64(cmd.sqe, 24);
    if (prp1 === 0 || prp1 % PAGE !== 0) throw fail(Status.PRP_OFFSET_INVALID, `PRP1 0x${prp1.toString(16)}`);
    const bytes = dwords * 4;
    const pageCount = Math.ceil(bytes / PAGE);
    let pages: number[];
    if (contiguous) {
      pages = Array.from({ length: pageCount }, (_, i) => prp1 + i * PAGE);
    } else {
      if (pageCount > CDQ_LIST_PRPS) throw fail(Status.INVALID_FIELD, `${pageCount} PRPs (at most ${CDQ_LIST_PRPS})`);
      const memory = this.host.primary.hostMemory();
      if (!memory) throw fail(Status.DATA_TRANSFER_ERROR, 'no host memory to read the PRP list from');
      const list = await memory.read(prp1, pageCount * 8).catch(() => {
        throw fail(Status.DATA_TRANSFER_ERROR, `PRP list at 0x${prp1.toString(16)}`);
      });
      pages = Array.from({ length: pageCount }, (_, i) => field64(list, i * 8));
      if (pages.some((p) => p === 0 || p % PAGE !== 0)) throw fail(Status.PRP_OFFSET_INVALID, 'a PRP list entry with an offset');
    }
    const ranges = countRanges(pages);
    const inUse = [...this.queues.values()].reduce((n, q) => n + countRanges(q.pages), 0);
    if (ranges > CDQ_RANGES || inUse + ranges > CDQ_RANGES_IN_SUBSYSTEM) throw fail(Status.NOT_ENOUGH_RESOURCES, `${ranges} memory ranges`);
    const id = this.allocateId();
    this.queues.set(id, { id, cntlid, pages, slots: dwords / ENTRY_DWORDS, head: 0, tail: 0, phase: 1, tailTrigger: null, logging: false, first: false, writing: Promise.resolve() });
    return id;
  }

  /** Controller Data Queue SEL 1 (Delete). */
  delete(id: number): void {
    if (!this.queues.has(id)) throw fail(Status.INVALID_CONTROLLER_DATA_QUEUE, `CDQID ${id}`);
    this.remove(id);
  }

  /** Track Send SEL 0: start or stop logging a controller's user data changes into queue `id`. */
  log(id: number, action: number): void {
    const queue = this.queues.get(id);
    if (!queue) throw fail(Status.INVALID_CONTROLLER_DATA_QUEUE, `CDQID ${id}`);
    const target = this.host.controller(queue.cntlid)!;
    if (action === LogAction.START) {
      if (queue.logging) throw fail(Status.INVALID_CONTROLLER_DATA_QUEUE, `controller ${queue.cntlid} is already logged`);
      if (target.runState === 'suspended') throw fail(Status.CONTROLLER_SUSPENDED, `controller ${queue.cntlid} is suspended`);
      queue.logging = true;
      queue.first = true;
      this.unsubscribe.set(id, target.observeUserData((nsid, slba, blocks, deallocated) => this.changed(queue, nsid, slba, blocks, deallocated)));
      return;
    }
    if (action !== LogAction.STOP) throw fail(Status.INVALID_FIELD, `LACT ${action}`);
    if (!queue.logging) return;
    this.stopLogging(queue);
    this.post(queue, { sequence: EntrySequence.LAST_HOST_STOPPED, range: LbaChangeRange.NO_RANGE });
  }

  /** The secondary finished its suspend: its queue says so, and goes away if DUDMQ asked. */
  suspended(cntlid: number, deleteQueue: boolean): void {
    for (const queue of this.queues.values()) {
      if (queue.cntlid !== cntlid) continue;
      if (queue.logging) {
        this.post(queue, { sequence: EntrySequence.LAST_SUSPENDED, range: LbaChangeRange.NO_RANGE });
        queue.first = true;
      }
      if (deleteQueue) this.remove(queue.id);
    }
  }

  /** A Controller Level Reset of the primary deletes every Controller Data Queue it created. */
  reset(): void {
    for (const id of [...this.queues.keys()]) this.remove(id);
  }

  /** Feature 21h: Controller Data Queue. */
  feature(): Feature {
    return {
      get: async (_c, _v, cmd, data) => {
        const queue = this.require(cmd.cdw11 & 0xffff);
        const w = new PageWriter(512);
        w.u32(0, queue.head);
        w.u32(4, queue.tailTrigger ?? 0);
        await data.toHost(w.bytes);
        return ((queue.tailTrigger !== null ? 1 : 0) << 31) | queue.id;
      },
      set: (_c, cmd) => {
        const queue = this.require(cmd.cdw11 & 0xffff);
        const head = cmd.cdw12 >>> 0;
        const armed = cmd.cdw11 >>> 31 === 1;
        // The head may only move over slots the controller posted (or stay where it is).
        const posted = (queue.tail - queue.head + queue.slots) % queue.slots;
        if (head >= queue.slots || (head - queue.head + queue.slots) % queue.slots > posted) throw fail(Status.INVALID_FIELD, `head ${head}`);
        if (armed && (cmd.cdw13 >>> 0) >= queue.slots) throw fail(Status.INVALID_FIELD, `tail pointer trigger ${cmd.cdw13 >>> 0}`);
        queue.head = head;
        queue.tailTrigger = armed ? cmd.cdw13 >>> 0 : null;
      },
    };
  }

  private require(id: number): UserDataQueue {
    const queue = this.queues.get(id);
    if (!queue) throw fail(Status.INVALID_CONTROLLER_DATA_QUEUE, `CDQID ${id}`);
    return queue;
  }

  private changed(queue: UserDataQueue, nsid: number, slba: bigint, blocks: number, deallocated: boolean): void {
    if (!queue.logging) return;
    // Stop logging with the last free slot: the host must see that it lost the rest.
    const free = (queue.head - queue.tail - 1 + queue.slots) % queue.slots;
    if (free <= 1) {
      this.stopLogging(queue);
      this.post(queue, { sequence: EntrySequence.LAST_QUEUE_FULL, range: LbaChangeRange.NO_RANGE });
      this.host.primary.events.queue({ type: AsyncEventType.ONE_SHOT, info: AsyncEventInfo.CDQ_FULL, logPage: 0, dw1: queue.id });
      return;
    }
    const sequence = queue.first ? EntrySequence.FIRST_AFTER_START : EntrySequence.ORDINARY;
    queue.first = false;
    this.post(queue, { sequence, range: LbaChangeRange.RANGE, nsid, slba, blocks, deallocated });
  }

  private post(
    queue: UserDataQueue,
    entry: { sequence: number; range: number; nsid?: number; slba?: bigint; blocks?: number; deallocated?: boolean },
  ): void {
    const bytes = new Uint8Array(LbaMigrationEntry.SIZE);
    const v = new DataView(bytes.buffer);
    if (entry.range === LbaChangeRange.RANGE) {
      v.setUint32(LbaMigrationEntry.NSID, entry.nsid!, true);
      v.setUint32(LbaMigrationEntry.NLB, entry.blocks! - 1, true);
      v.setBigUint64(LbaMigrationEntry.SLBA, entry.slba!, true);
    }
    const slot = queue.tail;
    // The phase tag is in the last byte: the host polls it.
    bytes[LbaMigrationEntry.ATTRIBUTES] =
      queue.phase | (entry.sequence << LbaMigrationEntry.ESA_SHIFT) | (entry.deallocated ? LbaMigrationEntry.DLBA : 0) | (entry.range << LbaMigrationEntry.LBACIR_SHIFT);
    queue.tail = (queue.tail + 1) % queue.slots;
    if (queue.tail === 0) queue.phase ^= 1;
    const at = queue.pages[Math.floor((slot * LbaMigrationEntry.SIZE) / PAGE)]! + ((slot * LbaMigrationEntry.SIZE) % PAGE);
    const triggered = queue.tailTrigger === slot;
    if (triggered) queue.tailTrigger = null;
    const primary = this.host.primary;
    queue.writing = queue.writing.then(async () => {
      const memory = primary.hostMemory();
      if (!memory) return;
      try {
        await memory.write(at, bytes);
      } catch (error) {
        primary.log.warn(`User Data Migration Queue ${queue.id}: entry write failed (${(error as Error).message}); logging stops`);
        this.stopLogging(queue);
        return;
      }
      if (triggered) primary.events.queue({ type: AsyncEventType.ONE_SHOT, info: AsyncEventInfo.CDQ_TAIL_POINTER, logPage: 0, dw1: queue.id });
    });
  }

  private stopLogging(queue: UserDataQueue): void {
    queue.logging = false;
    this.unsubscribe.get(queue.id)?.();
    this.unsubscribe.delete(queue.id);
  }

  private remove(id: number): void {
    const queue = this.queues.get(id);
    if (queue) this.stopLogging(queue);
    this.queues.delete(id);
  }

  private allocateId(): number {
    while (this.queues.has(this.nextId) || this.nextId === 0) this.nextId = (this.nextId + 1) & 0xffff;
    return this.nextId;
  }
}

/** Contiguous runs among the ring's pages. */
function countRanges(pages: number[]): number {
  return pages.filter((p, i) => i === 0 || p !== pages[i - 1]! + PAGE).length;
}
