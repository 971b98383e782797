// A guest's I/O, scripted: reads, writes and flushes kept at a fixed depth on several queues of an
// NvmeHost, driven only by its MSI-X interrupts (a lost interrupt stalls it, which the bounded
// waits report), and checked as it completes: every command exactly once, successful, read data
// equal to what the namespace must hold. It keeps the namespace's expected content, and per window
// (mark() to the next mark()) what it submitted and which completions it consumed, so a test can
// name exactly which guest pages and LBAs the controller of that window wrote.

import { NvmOpcode, statusName } from '../../src/nvme/spec.js';
import { PAGE, type Completion, type HostQueue, type NvmeHost } from './nvme-host.js';

export type IoKind = 'read' | 'write' | 'flush';

export interface IoCommand {
  kind: IoKind;
  qid: number;
  cid: number;
  lba: number;
  blocks: number;
  /** Guest pages the data buffer touches: what a read makes the controller write. */
  pages: number[];
}

export interface WorkloadOptions {
  nsid: number;
  blockSize: number;
  /** Namespace size in blocks. */
  blocks: number;
  /** Commands outstanding per queue. */
  depth: number;
  /** Most blocks per read or write (the buffer of a command is at most 4 pages past its offset). */
  maxBlocks: number;
  /** Uniform in [0, 1): the only source of choices (a seed replays them). */
  random: () => number;
}

/** Facts a controller state gives about the controller that ran a window. */
export interface ControllerFacts {
  /** Per I/O SQ: the next entry the controller would fetch. */
  sqHeads: Map<number, number>;
  /** Per I/O CQ: the next slot the controller would post to. */
  cqTails: Map<number, number>;
  /** Completions it had finished but not posted (their CQ was full). */
  held: { sqid: number; cid: number }[];
}

/** What the controller of a window did to guest memory and to the namespace. */
export interface WindowRecord {
  /** Guest pages it wrote: read data and the completion queue entries it posted (sorted). */
  pages: number[];
  /** Blocks it wrote (sorted). */
  lbas: number[];
  /** Commands it fetched, reads, writes and flushes. */
  fetched: number;
  /** Completions it posted. */
  posted: number;
  /** Where the host's record and the controller's facts disagree. */
  problems: string[];
}

/** A command's data area: 4 pages and room for an offset into the first, plus its PRP list page. */
interface DataBuffer {
  base: number;
  list: number;
}

interface InFlight extends IoCommand {
  addr: number;
  bytes: number;
  buffer: DataBuffer | null;
  extents: number[];
  /** What a write sent: the namespace holds it once the write completes. */
  written: Uint8Array | null;
}

interface QueueWindow {
  /** Commands in submission order, which is the order the controller fetches them. */
  submitted: IoCommand[];
  /** The SQ tail and CQ head at the mark (the controller had fetched and posted everything). */
  firstSqSlot: number;
  firstCqSlot: number;
  /** CIDs of the completions consumed since the mark. */
  reaped: number[];
}

const DATA_PAGES = 5;
/** Commands never overlap in flight: each locks the 4 KiB extents it touches. */
const EXTENT = 4096;
/** Read buffers are filled with this before the read, so stale bytes never pass as data. */
const POISON = 0xa5;

export class Workload {
  /** The namespace as the host wrote it. */
  readonly image: Uint8Array;
  readonly violations: string[] = [];
  completions = 0;
  private readonly outstanding = new Map<number, Map<number, InFlight>>();
  private readonly busyExtents = new Set<number>();
  private readonly freeBuffers: DataBuffer[] = [];
  private readonly windows = new Map<number, QueueWindow>();
  private frozen = false;
  private submitting = false;
  private readonly stalled = new Set<number>();
  private readonly pendingVectors = new Set<number>();
  private readonly progress = new Set<() => void>();
  private writes = 0;

  constructor(
    readonly host: NvmeHost,
    readonly queues: readonly HostQueue[],
    private readonly options: WorkloadOptions,
  ) {
    this.image = new Uint8Array(options.blocks * options.blockSize);
    if (options.maxBlocks * options.blockSize > (DATA_PAGES - 1) * PAGE) throw new RangeError('commands larger than a data buffer');
    for (let i = 0; i < queues.length * options.depth; i++) this.freeBuffers.push({ base: host.alloc(DATA_PAGES * PAGE), list: host.alloc(PAGE) });
    for (const q of queues) this.outstanding.set(q.id, new Map());
    host.watchInterrupts((vector) => this.interrupted(vector));
  }

  // ---- running --------------------------------------------------------------------------------------

  /** Keeps every queue at its depth from now on. */
  start(): void {
    this.submitting = true;
    this.fillAll();
  }

  /** Submits nothing more; what is outstanding still completes. */
  stop(): void {
    this.submitting = false;
  }

  /** The guest's vCPUs stop: interrupts wait, nothing is consumed or submitted. */
  freeze(): void {
    this.frozen = true;
  }

  /** The vCPUs run again: the interrupts that arrived meanwhile are taken. */
  thaw(): void {
    this.frozen = false;
    for (const vector of [...this.pendingVectors]) {
      this.pendingVectors.delete(vector);
      this.service(vector);
    }
    this.fillAll();
    this.notify();
  }

  /** The host stops consuming `qid`'s completions: its CQ fills up and the controller holds the rest. */
  stall(qid: number): void {
    this.stalled.add(qid);
  }

  /** The host consumes `qid` again, starting with what it left there. */
  unstall(qid: number): void {
    this.stalled.delete(qid);
    if (this.frozen) return;
    this.reap(this.queue(qid));
    this.fillAll();
    this.notify();
  }

  get outstandingCount(): number {
    let n = 0;
    for (const m of this.outstanding.values()) n += m.size;
    return n;
  }

  outstandingOn(qid: number): number {
    return this.outstanding.get(qid)!.size;
  }

  /** Resolves once `predicate` holds (checked whenever completions were consumed); bounded. */
  until(predicate: () => boolean, timeoutMs: number, what: string): Promise<void> {
    if (predicate()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (!predicate()) return;
        clearTimeout(timer);
        this.progress.delete(check);
        resolve();
      };
      const timer = setTimeout(() => {
        this.progress.delete(check);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}: ${this.describe()}`));
      }, timeoutMs);
      this.progress.add(check);
    });
  }

  /** Stops submitting and waits until every command completed. */
  async drain(timeoutMs: number, label: string): Promise<void> {
    this.stop();
    await this.until(() => this.outstandingCount === 0, timeoutMs, `${label}: every command to complete`);
  }

  describe(): string {
    return this.queues
      .map((q) => `q${q.id}: ${this.outstandingOn(q.id)} outstanding, ${q.posted()} posted unconsumed${this.stalled.has(q.id) ? ' (stalled)' : ''}`)
      .join('; ');
  }

  // ---- windows --------------------------------------------------------------------------------------

  /** Starts a window; the host must be quiet (nothing outstanding): the controller fetched and posted everything. */
  mark(): void {
    if (this.outstandingCount !== 0) throw new Error(`mark() with ${this.outstandingCount} commands outstanding`);
    for (const q of this.queues) this.windows.set(q.id, { submitted: [], firstSqSlot: q.tail, firstCqSlot: q.cqHead, reaped: [] });
  }

  /**
   * What the controller of this window wrote, from the host's record and `facts` (its state):
   * it fetched, in order, the commands it posted completions for (consumed, or still in the CQ)
   * and those it held. Call it while that controller is silent and before another one runs.
   */
  windowRecord(facts: ControllerFacts): WindowRecord {
    const pages = new Set<number>();
    const lbas = new Set<number>();
    const problems: string[] = [];
    let fetched = 0;
    let postedCount = 0;
    for (const q of this.queues) {
      const w = this.windows.get(q.id);
      if (!w) throw new Error('windowRecord() without mark()');
      const posted = [...w.reaped];
      for (let ahead = 0, c = q.peek(); c; c = q.peek(++ahead)) posted.push(c.cid);
      const held = facts.held.filter((h) => h.sqid === q.id).map((h) => h.cid);
      const count = posted.length + held.length;
      const first = w.submitted.slice(0, count);
      fetched += count;
      postedCount += posted.length;
      if (count > w.submitted.length) problems.push(`q${q.id}: ${count} completions posted or held, ${w.submitted.length} commands submitted`);
      if (!sameSet(first.map((c) => c.cid), [...posted, ...held])) {
        problems.push(`q${q.id}: the first ${count} commands are not the ones posted (${posted.length}) and held (${held.length})`);
      }
      const sqHead = facts.sqHeads.get(q.id);
      if (sqHead !== (w.firstSqSlot + count) % q.size) problems.push(`q${q.id}: SQ head ${sqHead}, the host expects ${(w.firstSqSlot + count) % q.size}`);
      const cqTail = facts.cqTails.get(q.id);
      if (cqTail !== (w.firstCqSlot + posted.length) % q.cqSize) problems.push(`q${q.id}: CQ tail ${cqTail}, the host expects ${(w.firstCqSlot + posted.length) % q.cqSize}`);
      for (let i = 0; i < posted.length; i++) pages.add(pageOf(q.cqAddr + ((w.firstCqSlot + i) % q.cqSize) * 16));
      for (const command of first) {
        if (command.kind === 'read') for (const page of command.pages) pages.add(page);
        if (command.kind === 'write') for (let b = 0; b < command.blocks; b++) lbas.add(command.lba + b);
      }
    }
    const ascending = (set: Set<number>): number[] => [...set].sort((a, b) => a - b);
    return { pages: ascending(pages), lbas: ascending(lbas), fetched, posted: postedCount, problems };
  }

  // ---- internals ------------------------------------------------------------------------------------

  private queue(qid: number): HostQueue {
    return this.queues.find((q) => q.id === qid)!;
  }

  private interrupted(vector: number): void {
    if (this.frozen) {
      this.pendingVectors.add(vector);
      return;
    }
    this.service(vector);
    this.fillAll();
    this.notify();
  }

  private service(vector: number): void {
    for (const q of this.queues) if (q.id % this.host.vectors === vector && !this.stalled.has(q.id)) this.reap(q);
  }

  private notify(): void {
    for (const check of [...this.progress]) check();
  }

  private reap(q: HostQueue): void {
    const window = this.windows.get(q.id);
    for (const c of q.reap()) {
      window?.reaped.push(c.cid);
      this.retire(q, c);
    }
  }

  private retire(q: HostQueue, c: Completion): void {
    const command = this.outstanding.get(q.id)!.get(c.cid);
    const where = `q${q.id} cid ${c.cid}`;
    if (!command) {
      this.violations.push(`${where}: a completion for a command that is not outstanding (a duplicate or a stray entry)`);
      return;
    }
    this.outstanding.get(q.id)!.delete(c.cid);
    this.completions++;
    if (c.sqId !== q.id) this.violations.push(`${where}: completion names SQ ${c.sqId}`);
    if (c.sqHead >= q.size) this.violations.push(`${where}: SQ head ${c.sqHead} outside the queue`);
    if (c.status !== 0) this.violations.push(`${where} (${command.kind}): ${statusName(c.status)}`);
    const { blockSize } = this.options;
    const at = command.lba * blockSize;
    if (c.status === 0 && command.kind === 'read') {
      const got = this.host.bytes(command.addr, command.bytes);
      const want = this.image.subarray(at, at + command.bytes);
      if (!Buffer.from(got.buffer, got.byteOffset, got.length).equals(want)) {
        this.violations.push(`${where}: read of LBA ${command.lba}+${command.blocks} returned other data than the namespace holds`);
      }
    }
    if (c.status === 0 && command.written) this.image.set(command.written, at);
    for (const extent of command.extents) this.busyExtents.delete(extent);
    if (command.buffer) this.freeBuffers.push(command.buffer);
  }

  private fillAll(): void {
    if (!this.submitting || this.frozen) return;
    for (const q of this.queues) this.fill(q);
  }

  private fill(q: HostQueue): void {
    const inFlight = this.outstanding.get(q.id)!;
    let placed = 0;
    while (inFlight.size < this.options.depth) {
      const command = this.place(q);
      if (!command) break;
      inFlight.set(command.cid, command);
      this.windows.get(q.id)?.submitted.push({ kind: command.kind, qid: q.id, cid: command.cid, lba: command.lba, blocks: command.blocks, pages: command.pages });
      placed++;
      // Sometimes a doorbell per command, sometimes one for a batch, as blk-mq does.
      if (this.options.random() < 0.5) {
        q.ring();
        placed = 0;
      }
    }
    if (placed > 0) q.ring();
  }

  /** Writes the next command into `q`'s SQ (without the doorbell); null when its blocks are busy. */
  private place(q: HostQueue): InFlight | null {
    const { random, nsid, blockSize } = this.options;
    const roll = random();
    if (roll < 0.1) {
      const cid = q.place(NvmOpcode.FLUSH, { nsid });
      return { kind: 'flush', qid: q.id, cid, lba: 0, blocks: 0, pages: [], addr: 0, bytes: 0, buffer: null, extents: [], written: null };
    }
    const kind: IoKind = roll < 0.55 ? 'read' : 'write';
    const blocks = 1 + Math.floor(random() * this.options.maxBlocks);
    const lba = Math.floor(random() * (this.options.blocks - blocks + 1));
    const bytes = blocks * blockSize;
    const extents: number[] = [];
    for (let e = Math.floor((lba * blockSize) / EXTENT); e * EXTENT < lba * blockSize + bytes; e++) extents.push(e);
    if (extents.some((e) => this.busyExtents.has(e))) return null;
    const buffer = this.freeBuffers.pop();
    if (!buffer) throw new Error('no free data buffer: depth and buffers disagree');
    // A page offset now and then: a transfer then spans one more page than its length suggests.
    const addr = buffer.base + (random() < 0.5 ? 0 : Math.floor(random() * (PAGE / 512)) * 512);
    const pages: number[] = [];
    for (let page = pageOf(addr); page < addr + bytes; page += PAGE) pages.push(page);
    let prp2 = 0;
    if (pages.length === 2) prp2 = pages[1]!;
    if (pages.length > 2) {
      const list = new DataView(this.host.ram.bytes.buffer, this.host.ram.bytes.byteOffset + buffer.list - this.host.ram.iova, PAGE);
      pages.slice(1).forEach((page, i) => list.setBigUint64(i * 8, BigInt(page), true));
      prp2 = buffer.list;
    }
    let written: Uint8Array | null = null;
    const data = this.host.bytes(addr, bytes);
    if (kind === 'write') {
      fillPattern(data, ++this.writes);
      written = data.slice();
    } else {
      data.fill(POISON);
    }
    for (const e of extents) this.busyExtents.add(e);
    const opcode = kind === 'read' ? NvmOpcode.READ : NvmOpcode.WRITE;
    const cid = q.place(opcode, { nsid, prp1: addr, prp2, cdw10: lba % 0x1_0000_0000, cdw11: Math.floor(lba / 0x1_0000_0000), cdw12: blocks - 1 });
    return { kind, qid: q.id, cid, lba, blocks, pages, addr, bytes, buffer, extents, written };
  }
}

export const pageOf = (addr: number): number => Math.floor(addr / PAGE) * PAGE;

const sameSet = (a: number[], b: number[]): boolean => {
  const ascending = (list: number[]): string => [...list].sort((x, y) => x - y).join(',');
  return ascending(a) === ascending(b);
};

/** Bytes no other write produces: the write's serial number and the word's position in it. */
function fillPattern(data: Uint8Array, serial: number): void {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  for (let at = 0; at + 4 <= data.length; at += 4) view.setUint32(at, (Math.imul(serial, 0x9e3779b1) ^ at) >>> 0, true);
}

/** A small seeded generator (mulberry32): a seed replays the choices of a run (its timing is its own). */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** LM_SEED replays a run's choices; otherwise a fresh seed, which the tests print. */
export function seedFromEnvironment(): number {
  return Number(process.env.LM_SEED ?? Math.floor(Math.random() * 2 ** 31));
}
