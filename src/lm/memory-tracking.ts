// Track Memory Changes (Track Send SEL 1) and Track Receive (3Eh): the primary records every page
// of its host's memory a secondary writes — read data, completion entries, EventIdx and shadow
// doorbell updates — at the granularity the host asked for, and reports (and forgets) them.

import type { NvmeController } from '../nvme/controller.js';
import { PageWriter } from '../nvme/page-writer.js';
import { Status } from '../nvme/spec.js';
import { CommandError } from '../nvme/transfer.js';
import { MAX_TRACKING_GRANULARITY, MIN_TRACKING_GRANULARITY, TRACKING_DESCRIPTORS_IN_SUBSYSTEM, TRACKING_DESCRIPTORS_PER_CONTROLLER } from './policy.js';
import { TrackedChangesLayout, TrackMemoryLayout } from './spec.js';

const GRANULE_SHIFT = 12;

export interface TrackedRange {
  start: number;
  /** In granules. */
  granules: number;
}

/** One controller's tracking: ranges, their dirty granules, and the observer feeding them. */
class Tracker {
  readonly bitmaps: Uint8Array[];

  constructor(
    readonly granuleBytes: number,
    readonly ranges: TrackedRange[],
    readonly stop: () => void,
  ) {
    this.bitmaps = ranges.map((r) => new Uint8Array(Math.ceil(r.granules / 8)));
  }

  record(addr: number, length: number): void {
    const end = addr + length;
    this.ranges.forEach((r, i) => {
      const rangeEnd = r.start + r.granules * this.granuleBytes;
      const from = Math.max(addr, r.start);
      const to = Math.min(end, rangeEnd);
      if (from >= to) return;
      const bitmap = this.bitmaps[i]!;
      const last = Math.floor((to - 1 - r.start) / this.granuleBytes);
      for (let g = Math.floor((from - r.start) / this.granuleBytes); g <= last; g++) bitmap[g >> 3]! |= 1 << (g & 7);
    });
  }

  /** Runs of dirty granules, at most `max` of them, cleared as they are taken; and whether more remain. */
  drain(max: number): { runs: { addr: number; granules: number }[]; more: boolean } {
    const runs: { addr: number; granules: number }[] = [];
    for (const [i, r] of this.ranges.entries()) {
      const bitmap = this.bitmaps[i]!;
      for (let g = 0; g < r.granules; ) {
        if (!(bitmap[g >> 3]! & (1 << (g & 7)))) {
          g++;
          continue;
        }
        if (runs.length === max) return { runs, more: true };
        const first = g;
        while (g < r.granules && bitmap[g >> 3]! & (1 << (g & 7))) {
          bitmap[g >> 3]! &= ~(1 << (g & 7));
          g++;
        }
        runs.push({ addr: r.start + first * this.granuleBytes, granules: g - first });
      }
    }
    return { runs, more: false };
  }
}

export class MemoryTracking {
  private readonly trackers = new Map<number, Tracker>();

  /** Track Send SEL 1, TACT 1: `data` is the Track Memory Changes structure. */
  start(cntlid: number, target: NvmeController, data: Uint8Array): void {
    if (this.trackers.has(cntlid)) throw new CommandError(Status.INVALID_CONTROLLER_IDENTIFIER, `controller ${cntlid} is already tracked`);
    if (target.runState === 'suspended') throw new CommandError(Status.CONTROLLER_SUSPENDED, `controller ${cntlid} is suspended`);
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    if (view.getUint8(TrackMemoryLayout.VER) !== 0) throw new CommandError(Status.INVALID_FIELD, `Track Memory Changes version ${view.getUint8(0)}`);
    const granularity = view.getUint8(TrackMemoryLayout.RMRTG);
    if (granularity < MIN_TRACKING_GRANULARITY || granularity > MAX_TRACKING_GRANULARITY) throw new CommandError(Status.INVALID_FIELD, `RMRTG ${granularity}`);
    const count = view.getUint32(TrackMemoryLayout.RNMRTD, true);
    const inUse = [...this.trackers.values()].reduce((n, t) => n + t.ranges.length, 0);
    if (count === 0 || count > TRACKING_DESCRIPTORS_PER_CONTROLLER || inUse + count > TRACKING_DESCRIPTORS_IN_SUBSYSTEM) {
      throw new CommandError(Status.INVALID_FIELD, `${count} memory range descriptors`);
    }
    if (data.length < TrackMemoryLayout.HEADER + count * TrackMemoryLayout.DESCRIPTOR_SIZE) throw new CommandError(Status.INVALID_FIELD, 'descriptors missing');
    const granuleBytes = 2 ** (GRANULE_SHIFT + granularity);
    const ranges: TrackedRange[] = [];
    for (let i = 0; i < count; i++) {
      const at = TrackMemoryLayout.HEADER + i * TrackMemoryLayout.DESCRIPTOR_SIZE;
      const start = Number(view.getBigUint64(at, true));
      const granules = view.getUint32(at + 8, true);
      if (start % granuleBytes !== 0 || granules === 0 || !Number.isSafeInteger(start + granules * granuleBytes)) {
        throw new CommandError(Status.INVALID_FIELD, `range ${i}: 0x${start.toString(16)} x ${granules}`);
      }
      ranges.push({ start, granules });
    }
    let tracker: Tracker | undefined;
    const unsubscribe = target.observeWrites((addr, length) => tracker!.record(addr, length));
    tracker = new Tracker(granuleBytes, ranges, unsubscribe);
    this.trackers.set(cntlid, tracker);
  }

  /** Track Send SEL 1, TACT 0. */
  stop(cntlid: number): void {
    this.trackers.get(cntlid)?.stop();
    this.trackers.delete(cntlid);
  }

  /** Track Receive SEL 0: the Tracked Memory Changes structure for a buffer of `bytes`. */
  receive(cntlid: number, target: NvmeController, bytes: number): Uint8Array {
    const tracker = this.trackers.get(cntlid);
    if (!tracker) throw new CommandError(Status.INVALID_CONTROLLER_IDENTIFIER, `controller ${cntlid} is not tracked`);
    const max = Math.max(0, Math.floor((bytes - TrackedChangesLayout.HEADER) / TrackedChangesLayout.DESCRIPTOR_SIZE));
    const { runs, more } = tracker.drain(max);
    const w = new PageWriter(TrackedChangesLayout.HEADER + runs.length * TrackedChangesLayout.DESCRIPTOR_SIZE);
    const suspended = target.runState === 'suspended';
    w.u8(TrackedChangesLayout.ATTRIBUTES, (more ? TrackedChangesLayout.MTR : 0) | (suspended ? TrackedChangesLayout.SUSP : 0));
    w.u16(TrackedChangesLayout.CNTLID, cntlid);
    w.u32(TrackedChangesLayout.NTMCD, runs.length);
    w.u16(TrackedChangesLayout.RPMPG, Math.log2(tracker.granuleBytes) - GRANULE_SHIFT);
    runs.forEach((run, i) => {
      const at = TrackedChangesLayout.HEADER + i * TrackedChangesLayout.DESCRIPTOR_SIZE;
      w.u64(at, run.addr);
      w.u32(at + 8, run.granules);
    });
    return w.bytes;
  }

  /** A Controller Level Reset of the primary stops all tracking. */
  reset(): void {
    for (const tracker of this.trackers.values()) tracker.stop();
    this.trackers.clear();
  }
}
