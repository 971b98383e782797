// The device on its own: our TypeScript NVMe host driver (test/support/nvme-host.ts) drives a real
// `serve` process over its vfio-user socket, with memfd guest RAM and MSI-X eventfds, and no guest
// CPU in the way. What it measures is the server's cost per I/O from doorbell to interrupt: IOPS,
// mean/p50/p99 latency (submission to the host seeing the completion), and the server's CPU per
// I/O (user+sys of the server process over the run, from /proc/PID/stat).
//
// The matrix: 4 KiB randread and randwrite, QD 1/32/128 per queue, 1 and 4 queues, on a RAM and on
// a file (/dev/shm) namespace. With --baseline DIR every point also runs against the server of
// another checkout (e.g. `git archive main`), interleaved A B B A, so before/after share the
// machine's conditions. --poll-us passes `serve --poll-us` (shadow-tail polling); two values compare
// them the same way, interleaved, on this checkout, and so do two --aio values (the file
// namespaces' aio=), two --cache values (their cache=, e.g. writeback,none: the page cache against
// O_DIRECT) and two --batch-ms values (`serve --batch-ms`: a driver that reaps at once, as
// a KVM guest does, shows what batching costs it). The disk namespace is a file on a disk file system (--disk-dir, default the
// temporary directory), where writes cannot be done inline; --evict drops its pages from the page
// cache before every read point, so reads wait for the disk too. --completions poll makes the driver find its
// completions by polling its CQs, created with interrupts off (Linux's poll queues, SPDK's perf), so
// latency no longer includes the driver's own wake-up on an interrupt eventfd. With --cpu-prof the
// server of one extra QD32 run is under `node --cpu-prof`; its profile is summarised in
// device-profile.md (top self time) and kept as folded stacks (a flame graph's input).
//
// Usage: npx tsx bench/device.ts [--runtime 3] [--warmup 0.5] [--reps 1] [--qd 1,32,128]
//          [--queues 1,4] [--ns ram,file,disk] [--rw randread,randwrite] [--region 256]
//          [--doorbells shadow|mmio] [--coalescing CDW11] [--poll-us N[,M]] [--completions irq|poll]
//          [--aio threads|io_uring[,…]] [--cache writeback|none|…[,…]] [--batch-ms N[,M]]
//          [--disk-dir DIR] [--evict]
//          [--baseline DIR] [--cpu-prof]
//          [--profile-qd 32] [--out bench/results/device]
// See bench/README.md.

import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { AdminOpcode, NvmOpcode, Sqe, SQE_SIZE, CQE_SIZE, FeatureId } from '../src/nvme/spec.js';
import { FILE_CACHES, type FileCache } from '../src/nvme/backend.js';
import { HostQueue, NvmeHost, PAGE } from '../test/support/nvme-host.js';
import { startServerProcess, type ServerProcess } from '../test/support/server-process.js';
import { dropFromPageCache } from '../test/support/files.js';
import { cpuModel, cpuSeconds } from './host-stats.js';
import { fmt, markdownTable, median } from './report.js';
import { buildServer, builtServerCommand } from './server-build.js';
import { monotonicUs, summariseProfile, type MonotonicWindow, type ProfileSummary } from './cpu-profile.js';
import { parseUsage, runBench } from './cli.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

// ---------------------------------------------------------------- configuration

type NamespaceKind = 'ram' | 'file' | 'disk';
type Aio = 'threads' | 'io_uring';
type Pattern = 'randread' | 'randwrite';

interface Options {
  runtimeSec: number;
  warmupSec: number;
  reps: number;
  depths: number[];
  queueCounts: number[];
  namespaces: NamespaceKind[];
  patterns: Pattern[];
  /** MiB of the namespace that is preconditioned and that every I/O stays inside. */
  regionMiB: number;
  doorbells: 'shadow' | 'mmio';
  /** Interrupt Coalescing to set (Set Features 08h CDW11), or null to leave the default (off). */
  coalescing: number | null;
  /** `serve --poll-us` values; two of them are compared like a baseline. */
  pollUs: number[];
  /** The file namespaces' aio= values (none: the server's default); two of them are compared like a baseline. */
  aio: Aio[];
  /** The file namespaces' cache= values (none: writeback); two of them are compared like a baseline. */
  cache: FileCache[];
  /** `serve --batch-ms` values; two of them are compared like a baseline. */
  batchMs: number[];
  /** Where the disk namespace's image lives (not a file system in memory). */
  diskDir: string;
  /** Drop the disk image's pages from the page cache before each read point. */
  evict: boolean;
  /** How the driver learns of completions: MSI-X interrupts, or polling CQs created without them. */
  completions: 'irq' | 'poll';
  baseline: string | null;
  cpuProf: boolean;
  /** QD of the profiled run (RAM, randread, 1 queue). */
  profileDepth: number;
  out: string;
}

/** statfs f_type of the file systems that keep files in memory. */
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;
const BLOCK_BYTES = 4096;
const IO_BYTES = 4096;
const NAMESPACE_BYTES = 1 << 30;
const NSID = 1;
/** Entries per I/O queue: room for QD128 with slack. */
const QUEUE_ENTRIES = 256;
/** Preconditioning writes this much per command (a PRP list of 32 pages). */
const PRECONDITION_BYTES = 128 * 1024;
const GUEST_RAM_BYTES = 32 << 20;
/** What the --cpu-prof run measures: the issue's flame graph point (--profile-qd sets the depth). */
const PROFILE_POINT = { ns: 'ram', pattern: 'randread', queues: 1 } as const;

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      runtime: { type: 'string', default: '3' },
      warmup: { type: 'string', default: '0.5' },
      reps: { type: 'string', default: '1' },
      qd: { type: 'string', default: '1,32,128' },
      queues: { type: 'string', default: '1,4' },
      ns: { type: 'string', default: 'ram,file' },
      rw: { type: 'string', default: 'randread,randwrite' },
      region: { type: 'string', default: '256' },
      doorbells: { type: 'string', default: 'shadow' },
      coalescing: { type: 'string' },
      'poll-us': { type: 'string', default: '0' },
      aio: { type: 'string' },
      cache: { type: 'string' },
      'batch-ms': { type: 'string', default: '0' },
      'disk-dir': { type: 'string', default: os.tmpdir() },
      evict: { type: 'boolean', default: false },
      completions: { type: 'string', default: 'irq' },
      baseline: { type: 'string' },
      'cpu-prof': { type: 'boolean', default: false },
      'profile-qd': { type: 'string', default: '32' },
      out: { type: 'string', default: path.join(REPO, 'bench', 'results', 'device') },
    },
  });
  const positive = (name: string, v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} must be a positive number, got ${v}`);
    return n;
  };
  const list = <T extends string>(name: string, v: string, allowed: readonly T[]): T[] => {
    const items = v.split(',').map((s) => s.trim()) as T[];
    for (const item of items) if (!allowed.includes(item)) throw new Error(`--${name}: ${item} is not one of ${allowed.join(', ')}`);
    return items;
  };
  const depths = values.qd.split(',').map((v) => positive('qd', v));
  if (depths.some((d) => d >= QUEUE_ENTRIES || !Number.isInteger(d))) throw new Error(`--qd values must be integers below ${QUEUE_ENTRIES}`);
  const queueCounts = values.queues.split(',').map((v) => positive('queues', v));
  if (queueCounts.some((q) => q > 8 || !Number.isInteger(q))) throw new Error('--queues values must be integers of at most 8');
  const doorbells = list('doorbells', values.doorbells, ['shadow', 'mmio'] as const)[0]!;
  const pollUs = values['poll-us'].split(',').map(Number);
  if (pollUs.length > 2 || pollUs.some((v) => !Number.isInteger(v) || v < 0)) throw new Error('--poll-us takes one or two whole numbers of µs');
  const aio = values.aio === undefined ? [] : list('aio', values.aio, ['threads', 'io_uring'] as const);
  if (aio.length > 2) throw new Error('--aio takes one or two values');
  const cache = values.cache === undefined ? [] : list('cache', values.cache, FILE_CACHES);
  if (cache.length > 2) throw new Error('--cache takes one or two values');
  const batchMs = values['batch-ms'].split(',').map(Number);
  if (batchMs.length > 2 || batchMs.some((v) => !Number.isFinite(v) || v < 0)) throw new Error('--batch-ms takes one or two numbers of milliseconds');
  if ([pollUs, aio, cache, batchMs].filter((given) => given.length === 2).length + (values.baseline ? 1 : 0) > 1) throw new Error('compare one thing at a time: two values of one of --poll-us, --aio, --cache, --batch-ms, or --baseline');
  const diskDir = path.resolve(values['disk-dir']);
  const diskDirType = fs.statfsSync(diskDir).type;
  if (diskDirType === TMPFS_MAGIC || diskDirType === RAMFS_MAGIC) throw new Error(`--disk-dir ${diskDir} is a file system in memory: give a directory on a disk`);
  return {
    runtimeSec: positive('runtime', values.runtime),
    warmupSec: Number(values.warmup),
    reps: positive('reps', values.reps),
    depths,
    queueCounts,
    namespaces: list('ns', values.ns, ['ram', 'file', 'disk'] as const),
    patterns: list('rw', values.rw, ['randread', 'randwrite'] as const),
    regionMiB: positive('region', values.region),
    doorbells,
    coalescing: values.coalescing === undefined ? null : Number(values.coalescing),
    pollUs,
    aio,
    cache,
    batchMs,
    diskDir,
    evict: values.evict,
    completions: list('completions', values.completions, ['irq', 'poll'] as const)[0]!,
    baseline: values.baseline ? path.resolve(values.baseline) : null,
    cpuProf: values['cpu-prof'],
    profileDepth: positive('profile-qd', values['profile-qd']),
    out: path.resolve(values.out),
  };
}

// ---------------------------------------------------------------- the driver

/** xorshift32: cheap, deterministic random LBAs (Math.random would work too, at a higher cost). */
function xorshift(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

/** Latencies in µs, appended without reallocating on every sample. */
class Samples {
  private data = new Float64Array(1 << 16);
  length = 0;

  push(value: number): void {
    if (this.length === this.data.length) {
      const bigger = new Float64Array(this.data.length * 2);
      bigger.set(this.data);
      this.data = bigger;
    }
    this.data[this.length++] = value;
  }

  values(): Float64Array {
    return this.data.subarray(0, this.length);
  }

  summary(): { mean: number; p50: number; p99: number; p999: number; max: number } {
    const sorted = this.data.slice(0, this.length).sort();
    const at = (q: number): number => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN;
    let sum = 0;
    for (const v of sorted) sum += v;
    return { mean: sum / sorted.length, p50: at(0.5), p99: at(0.99), p999: at(0.999), max: sorted[sorted.length - 1] ?? NaN };
  }
}

/**
 * One I/O queue pair kept at a fixed depth: command slot i always carries CID i and its own data
 * page, and is resubmitted as soon as its completion is seen. Completions are taken when the queue's
 * MSI-X vector fires (or the poller looks), all of them at once, then the CQ head and the SQ tail are
 * rung once each, as Linux's interrupt handler and a batching submitter do.
 */
class DepthKeeper {
  private readonly sq: DataView;
  private readonly cq: DataView;
  private readonly started: Float64Array;
  private readonly random: () => number;
  private readonly lbaSlots: number;
  private readonly opcode: number;
  private running = false;
  /** Counting only between mark() calls (warm-up I/Os are not counted). */
  counting = false;
  completed = 0;
  errors = 0;
  /** CQ head doorbells that went through MMIO (the rest of the host's MMIO doorbells are SQ tails). */
  cqMmio = 0;
  readonly latencies = new Samples();
  private inFlight = 0;
  private drained: (() => void) | null = null;

  constructor(
    private readonly host: NvmeHost,
    private readonly queue: HostQueue,
    private readonly depth: number,
    /** One data page per slot. */
    private readonly buffers: readonly number[],
    pattern: Pattern,
    regionBytes: number,
    seed: number,
  ) {
    const sq = host.bytes(queue.sqAddr, queue.size * SQE_SIZE);
    const cq = host.bytes(queue.cqAddr, queue.cqSize * CQE_SIZE);
    this.sq = new DataView(sq.buffer, sq.byteOffset, sq.byteLength);
    this.cq = new DataView(cq.buffer, cq.byteOffset, cq.byteLength);
    this.started = new Float64Array(depth);
    this.random = xorshift(seed);
    this.lbaSlots = Math.floor(regionBytes / IO_BYTES);
    this.opcode = pattern === 'randread' ? NvmOpcode.READ : NvmOpcode.WRITE;
  }

  start(): void {
    this.running = true;
    for (let slot = 0; slot < this.depth; slot++) this.place(slot);
    this.queue.ring();
  }

  /** Stops resubmitting; resolves once every command in flight has completed. */
  stop(): Promise<void> {
    this.running = false;
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => (this.drained = resolve));
  }

  /** The queue's vector fired, or the poller looks: take every posted completion. */
  reap(): void {
    const q = this.queue;
    const now = performance.now();
    let taken = 0;
    for (;;) {
      const at = q.cqHead * CQE_SIZE;
      const dw3 = this.cq.getUint32(at + 12, true);
      if (((dw3 >>> 16) & 1) !== q.phase) break;
      const slot = dw3 & 0xffff;
      if (dw3 >>> 17 !== 0) this.errors++;
      if (this.counting) {
        this.completed++;
        this.latencies.push((now - this.started[slot]!) * 1000);
      }
      this.inFlight--;
      q.cqHead = (q.cqHead + 1) % q.cqSize;
      if (q.cqHead === 0) q.phase ^= 1;
      if (this.running) this.place(slot);
      taken++;
    }
    if (taken === 0) return;
    const mmio = this.host.doorbellCounts.mmio;
    this.host.ringCqDoorbell(q.id, q.cqHead);
    if (this.counting) this.cqMmio += this.host.doorbellCounts.mmio - mmio;
    if (this.running) q.ring();
    if (this.inFlight === 0 && this.drained) {
      this.drained();
      this.drained = null;
    }
  }

  /** Writes slot `slot`'s command at the SQ tail (no doorbell). */
  private place(slot: number): void {
    const q = this.queue;
    const v = this.sq;
    const at = q.tail * SQE_SIZE;
    const lba = (this.random() % this.lbaSlots) * (IO_BYTES / BLOCK_BYTES);
    for (let i = 0; i < SQE_SIZE; i += 4) v.setUint32(at + i, 0, true);
    v.setUint8(at + Sqe.OPCODE, this.opcode);
    v.setUint16(at + Sqe.CID, slot, true);
    v.setUint32(at + Sqe.NSID, NSID, true);
    v.setUint32(at + Sqe.PRP1, this.buffers[slot]!, true);
    v.setUint32(at + Sqe.CDW10, lba, true);
    v.setUint32(at + Sqe.CDW12, IO_BYTES / BLOCK_BYTES - 1, true);
    q.tail = (q.tail + 1) % q.size;
    this.inFlight++;
    this.started[slot] = performance.now();
  }
}

/** A host attached to one server: admin queue, shadow doorbells, the I/O queue pairs, interrupts. */
interface Rig {
  host: NvmeHost;
  queues: HostQueue[];
  /** Per queue, one data page per command slot at the deepest QD (reused by every point). */
  buffers: number[][];
  /** By MSI-X vector: the queue a fired interrupt is for. */
  keepers: Map<number, DepthKeeper>;
}

async function attachRig(server: ServerProcess, o: Options, queueCount: number): Promise<Rig> {
  const maxDepth = Math.max(...o.depths, o.cpuProf ? o.profileDepth : 1);
  // Queues, data pages, doorbell buffer and the preconditioning buffer fit in a few MiB.
  const host = await NvmeHost.attachWhenFree(server.socketPath, { ramBytes: GUEST_RAM_BYTES, vectors: queueCount + 1 });
  await host.enable(32);
  if (o.doorbells === 'shadow') {
    const c = await host.configureDoorbellBuffer();
    if (c.status !== 0) throw new Error(`Doorbell Buffer Config failed: status 0x${c.status.toString(16)}`);
  }
  if (o.coalescing !== null) {
    const c = await host.admin.run(AdminOpcode.SET_FEATURES, { cdw10: FeatureId.INTERRUPT_COALESCING, cdw11: o.coalescing });
    if (c.status !== 0) throw new Error(`Set Features Interrupt Coalescing failed: status 0x${c.status.toString(16)}`);
  }
  const queues: HostQueue[] = [];
  const interrupts = o.completions === 'irq';
  for (let qid = 1; qid <= queueCount; qid++) queues.push(await host.createIoQueuePair(qid, QUEUE_ENTRIES, QUEUE_ENTRIES, { interrupts }));
  const buffers = queues.map(() => Array.from({ length: maxDepth }, () => host.alloc(IO_BYTES)));
  const rig: Rig = { host, queues, buffers, keepers: new Map() };
  host.watchInterrupts((vector) => rig.keepers.get(vector)?.reap());
  return rig;
}

/** Writes the whole region once, so reads return written data rather than a sparse hole's zeros. */
async function precondition(rig: Rig, regionBytes: number): Promise<void> {
  const { host } = rig;
  const queue = rig.queues[0]!;
  const pages = PRECONDITION_BYTES / PAGE;
  const data = host.alloc(PRECONDITION_BYTES);
  const list = host.alloc(PAGE);
  const entries = new DataView(host.bytes(list, PAGE).buffer, host.bytes(list, PAGE).byteOffset, PAGE);
  for (let i = 1; i < pages; i++) entries.setBigUint64((i - 1) * 8, BigInt(data + i * PAGE), true);
  host.bytes(data, PRECONDITION_BYTES).fill(0x5a);
  const vector = queue.id;
  rig.keepers.delete(vector);
  for (let offset = 0; offset < regionBytes; offset += PRECONDITION_BYTES) {
    const c = await queue.run(NvmOpcode.WRITE, { nsid: NSID, prp1: data, prp2: list, cdw10: offset / BLOCK_BYTES, cdw12: PRECONDITION_BYTES / BLOCK_BYTES - 1 });
    if (c.status !== 0) throw new Error(`precondition write at ${offset}: status 0x${c.status.toString(16)}`);
  }
}

// ---------------------------------------------------------------- one point of the matrix

interface Point {
  ns: NamespaceKind;
  pattern: Pattern;
  queues: number;
  depth: number;
}

interface PointResult extends Point {
  server: string;
  rep: number;
  iops: number;
  latencyUs: { mean: number; p50: number; p99: number; p999: number; max: number };
  /** Server user+sys CPU over the measured window, per I/O (µs) and as a share of one core. */
  serverCpuUsPerIo: number;
  serverCpuShare: number;
  /** The driver's (this process's) CPU over the window, as a share of one core. */
  driverCpuShare: number;
  /** MSI-X interrupts the driver took, and SQ tail / CQ head doorbells it rang through MMIO (not only in the shadow), per I/O. */
  interruptsPerIo: number;
  sqMmioPerIo: number;
  cqMmioPerIo: number;
  errors: number;
  seconds: number;
  loadAverage: number;
  /** The measured window on CLOCK_MONOTONIC (to cut a server profile to it). */
  window: MonotonicWindow;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * --completions poll: looks at every queue's CQ on each event-loop turn (setImmediate, so timers
 * still run), as a polling driver does. Returns the function that stops it.
 */
function pollCompletions(keepers: readonly DepthKeeper[]): () => void {
  let polling = true;
  const turn = (): void => {
    if (!polling) return;
    for (const keeper of keepers) keeper.reap();
    setImmediate(turn);
  };
  setImmediate(turn);
  return () => {
    polling = false;
  };
}

async function runPoint(server: ServerProcess, rig: Rig, point: Point, o: Options, serverLabel: string, rep: number): Promise<PointResult> {
  const regionBytes = o.regionMiB << 20;
  const queues = rig.queues.slice(0, point.queues);
  const keepers = queues.map((q, i) => new DepthKeeper(rig.host, q, point.depth, rig.buffers[i]!, point.pattern, regionBytes, 0x9e3779b9 ^ (rep * 131 + i * 7 + point.depth)));
  rig.keepers.clear();
  queues.forEach((q, i) => rig.keepers.set(q.id % rig.host.vectors, keepers[i]!));
  const stopPolling = o.completions === 'poll' ? pollCompletions(keepers) : () => {};
  for (const k of keepers) k.start();
  await sleep(o.warmupSec * 1000);
  const cpu0 = cpuSeconds(server.child.pid!);
  const driver0 = process.cpuUsage();
  const interrupts0 = totalInterrupts(rig.host);
  const mmio0 = rig.host.doorbellCounts.mmio;
  const t0 = performance.now();
  const fromUs = monotonicUs();
  for (const k of keepers) k.counting = true;
  await sleep(o.runtimeSec * 1000);
  for (const k of keepers) k.counting = false;
  const t1 = performance.now();
  const toUs = monotonicUs();
  const cpu1 = cpuSeconds(server.child.pid!);
  const driver = process.cpuUsage(driver0);
  const interrupts = totalInterrupts(rig.host) - interrupts0;
  const mmio = rig.host.doorbellCounts.mmio - mmio0;
  const cqMmio = keepers.reduce((n, k) => n + k.cqMmio, 0);
  try {
    await Promise.race([Promise.all(keepers.map((k) => k.stop())), sleep(10_000).then(() => Promise.reject(new Error(`${describePoint(point)}: commands did not drain`)))]);
  } finally {
    stopPolling();
  }
  const seconds = (t1 - t0) / 1000;
  const completed = keepers.reduce((n, k) => n + k.completed, 0);
  const all = new Samples();
  for (const k of keepers) for (const v of k.latencies.values()) all.push(v);
  const cpu = cpu0 !== undefined && cpu1 !== undefined ? cpu1 - cpu0 : NaN;
  return {
    ...point,
    server: serverLabel,
    rep,
    iops: completed / seconds,
    latencyUs: all.summary(),
    serverCpuUsPerIo: (cpu / completed) * 1e6,
    serverCpuShare: cpu / seconds,
    driverCpuShare: (driver.user + driver.system) / 1e6 / seconds,
    interruptsPerIo: interrupts / completed,
    sqMmioPerIo: (mmio - cqMmio) / completed,
    cqMmioPerIo: cqMmio / completed,
    errors: keepers.reduce((n, k) => n + k.errors, 0),
    seconds,
    loadAverage: os.loadavg()[0]!,
    window: { fromUs, toUs },
  };
}

const totalInterrupts = (host: NvmeHost): number => host.interruptCounts.reduce((n, c) => n + c, 0);

const describePoint = (p: Point): string => `${p.ns} ${p.pattern} ${p.queues}q QD${p.depth}`;

// ---------------------------------------------------------------- servers

interface ServerUnderTest {
  label: string;
  /** The checkout whose src/bin/nvme-vfio-user.ts runs. */
  root: string;
  pollUs: number;
  /** null: the server's default. */
  aio: Aio | null;
  /** null: the server's default (writeback). */
  cache: FileCache | null;
  batchMs: number;
}

interface Running {
  server: ServerProcess;
  rig: Rig;
  imagePath: string | null;
}

async function startServer(sut: ServerUnderTest, ns: NamespaceKind, o: Options, workDir: string, nodeFlags: string[] = []): Promise<Running> {
  const tag = `${sut.label}-${ns}-${process.pid}`;
  // Each server gets a directory of its own: its control socket sits beside its vfio-user socket.
  const dir = fs.mkdtempSync(path.join(workDir, `${tag}-`));
  const socket = path.join(dir, 'nvme.sock');
  const imageDir = ns === 'file' ? '/dev/shm' : ns === 'disk' ? o.diskDir : null;
  const imagePath = imageDir ? path.join(imageDir, `nvu-device-bench-${tag}.img`) : null;
  if (imagePath) fs.rmSync(imagePath, { force: true });
  const spec = imagePath ? `file=${imagePath},size=${NAMESPACE_BYTES},lbads=${BLOCK_BYTES}${sut.aio ? `,aio=${sut.aio}` : ''}${sut.cache ? `,cache=${sut.cache}` : ''}` : `ram,size=${NAMESPACE_BYTES},lbads=${BLOCK_BYTES}`;
  const maxQueues = Math.max(...o.queueCounts);
  const command = builtServerCommand(sut.root, nodeFlags);
  const polling = [...(sut.pollUs > 0 ? ['--poll-us', String(sut.pollUs)] : []), ...(sut.batchMs > 0 ? ['--batch-ms', String(sut.batchMs)] : [])];
  const server = await startServerProcess(socket, ['--namespace', spec, '--io-queues', String(Math.max(4, maxQueues)), ...polling, '--log-level', 'warn'], { command, cwd: REPO });
  const rig = await attachRig(server, o, maxQueues);
  await precondition(rig, o.regionMiB << 20);
  return { server, rig, imagePath };
}

/** The type of the file system holding `dir`, as df names it. */
function fileSystemName(dir: string): string {
  const r = spawnSync('df', ['--output=fstype', dir], { encoding: 'utf8' });
  return r.status === 0 ? (r.stdout.trim().split('\n')[1] ?? 'unknown').trim() : 'unknown';
}

async function stopServer(r: Running): Promise<void> {
  r.rig.host.close();
  await r.server.stop();
  if (r.imagePath) fs.rmSync(r.imagePath, { force: true });
}

// ---------------------------------------------------------------- report

/** "a" for one value, "a–b" for the range of several. */
function range(xs: number[], digits = 0): string {
  const finite = xs.filter(Number.isFinite);
  if (finite.length === 0) return 'n/a';
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  return fmt(lo, digits) === fmt(hi, digits) ? fmt(lo, digits) : `${fmt(lo, digits)}–${fmt(hi, digits)}`;
}

function resultTable(results: PointResult[], points: Point[], servers: ServerUnderTest[]): string {
  const cols: { name: string; get: (r: PointResult) => number; digits: number }[] = [
    { name: 'IOPS', get: (r) => r.iops, digits: 0 },
    { name: 'mean µs', get: (r) => r.latencyUs.mean, digits: 1 },
    { name: 'p50 µs', get: (r) => r.latencyUs.p50, digits: 1 },
    { name: 'p99 µs', get: (r) => r.latencyUs.p99, digits: 1 },
    { name: 'server CPU µs/IO', get: (r) => r.serverCpuUsPerIo, digits: 1 },
    { name: 'server CPU %', get: (r) => r.serverCpuShare * 100, digits: 0 },
    { name: 'driver CPU %', get: (r) => r.driverCpuShare * 100, digits: 0 },
    { name: 'IRQs/IO', get: (r) => r.interruptsPerIo, digits: 2 },
    { name: 'SQ MMIO/IO', get: (r) => r.sqMmioPerIo, digits: 2 },
    { name: 'CQ MMIO/IO', get: (r) => r.cqMmioPerIo, digits: 2 },
  ];
  const header = ['namespace', 'workload', 'queues', 'QD', ...(servers.length > 1 ? ['server'] : []), ...cols.map((c) => c.name)];
  const rows: string[][] = [];
  for (const p of points) {
    for (const s of servers) {
      const mine = results.filter((r) => r.server === s.label && r.ns === p.ns && r.pattern === p.pattern && r.queues === p.queues && r.depth === p.depth);
      rows.push([p.ns, `4k ${p.pattern}`, String(p.queues), String(p.depth), ...(servers.length > 1 ? [s.label] : []), ...cols.map((c) => range(mine.map(c.get), c.digits))]);
    }
    if (servers.length === 2) {
      const ratio = (get: (r: PointResult) => number): string => {
        const of = (label: string): number => median(results.filter((r) => r.server === label && r.ns === p.ns && r.pattern === p.pattern && r.queues === p.queues && r.depth === p.depth).map(get));
        return fmt(of(servers[1]!.label) / of(servers[0]!.label), 2);
      };
      rows.push([p.ns, `4k ${p.pattern}`, String(p.queues), String(p.depth), `${servers[1]!.label}/${servers[0]!.label}`, ...cols.map((c) => `×${ratio(c.get)}`)]);
    }
  }
  return markdownTable(header, rows);
}

function report(results: PointResult[], points: Point[], servers: ServerUnderTest[], o: Options, meta: Record<string, string>, profile: ProfileSummary | null): string {
  const lines = [
    '# Device-only benchmark',
    '',
    `${meta.date} · ${meta.cpu} · ${os.cpus().length} CPUs · node ${process.version} · load average ${meta.loadBefore} before, ${meta.loadAfter} after`,
    '',
    `Our TypeScript host driver against \`serve\` over its socket (memfd guest RAM, ${o.completions === 'irq' ? 'MSI-X eventfds' : 'I/O CQs polled, created without interrupts'}, ${o.doorbells === 'shadow' ? 'shadow doorbells as Linux uses them' : 'trapped MMIO doorbells only'}${o.coalescing !== null ? `, Interrupt Coalescing 0x${o.coalescing.toString(16)}` : ''}). ` +
      `4 KiB I/O at random 4 KiB-aligned offsets inside the first ${o.regionMiB} MiB (written once before), ${o.runtimeSec} s per point after ${o.warmupSec} s of warm-up, ${o.reps} repetition(s)${servers.length > 1 ? ', servers interleaved A B B A' : ''}. ` +
      `QD is per queue. Latency is from placing the command to the driver seeing its completion ${o.completions === 'irq' ? 'after the interrupt' : 'by polling its CQ (I/O CQs created with interrupts off, as Linux\'s poll queues)'}. A range is min–max over repetitions.` +
      (o.namespaces.includes('disk') ? ` The disk namespace is an image in ${o.diskDir} (${fileSystemName(o.diskDir)})${o.evict ? ', its pages dropped from the page cache before every read point (sync, then dd iflag=nocache), so reads wait for the disk' : ''}.` : ''),
    '',
    `Servers: ${servers.map((s) => `${s.label} = ${path.relative(REPO, s.root) || '.'}${meta[`rev:${s.label}`] ? ` (${meta[`rev:${s.label}`]})` : ''}${s.pollUs > 0 ? ` with --poll-us ${s.pollUs}` : ''}${s.aio ? ` with aio=${s.aio}` : ''}${s.cache ? ` with cache=${s.cache}` : ''}${s.batchMs > 0 ? ` with --batch-ms ${s.batchMs}` : ''}`).join('; ')}.`,
    '',
    resultTable(results, points, servers),
    '',
  ];
  const errors = results.reduce((n, r) => n + r.errors, 0);
  if (errors > 0) lines.push(`**${errors} commands completed with an error status.**`, '');
  if (profile) lines.push(`CPU profile of the server: ${profile.label}, see \`device-profile.md\`.`, '');
  return lines.join('\n');
}

// ---------------------------------------------------------------- main

/** The checkout's commit, or '' for a tree without git (an exported baseline). */
function gitRevision(root: string): string {
  const r = spawnSync('git', ['-C', root, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' });
  return r.status === 0 && fs.existsSync(path.join(root, '.git')) ? r.stdout.trim() : '';
}

async function profileRun(o: Options, workDir: string, me: ServerUnderTest): Promise<ProfileSummary> {
  const profileDir = fs.mkdtempSync(path.join(workDir, 'prof-'));
  const running = await startServer(me, 'ram', o, workDir, ['--cpu-prof', `--cpu-prof-dir=${profileDir}`]);
  const point: Point = { ...PROFILE_POINT, depth: o.profileDepth };
  let result: PointResult;
  try {
    result = await runPoint(running.server, running.rig, point, { ...o, runtimeSec: Math.max(o.runtimeSec, 5) }, me.label, 0);
  } finally {
    await stopServer(running);
  }
  const file = fs.readdirSync(profileDir).find((f) => f.endsWith('.cpuprofile'));
  if (!file) throw new Error(`the server wrote no profile into ${profileDir}`);
  if (result.errors > 0) throw new Error(`the profiled run had ${result.errors} failed commands`);
  const label = `RAM namespace, 4k randread, 1 queue, QD${o.profileDepth}, ${fmt(result.iops)} IOPS under the profiler (${fmt(result.serverCpuUsPerIo, 1)} CPU-µs per I/O)`;
  return summariseProfile(JSON.parse(fs.readFileSync(path.join(profileDir, file), 'utf8')), label, path.join(profileDir, file), result.window);
}

async function main(): Promise<void> {
  const o = parseUsage(() => parseOptions(process.argv.slice(2)));
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvu-device-bench-'));
  const me: ServerUnderTest = { label: o.baseline ? 'new' : 'ours', root: REPO, pollUs: o.pollUs[0]!, aio: o.aio[0] ?? null, cache: o.cache[0] ?? null, batchMs: o.batchMs[0]! };
  const servers: ServerUnderTest[] = o.baseline
    ? [{ ...me, label: 'base', root: o.baseline }, me]
    : o.pollUs.length === 2
      ? o.pollUs.map((pollUs) => ({ ...me, label: `poll${pollUs}`, pollUs }))
      : o.aio.length === 2
        ? o.aio.map((aio) => ({ ...me, label: aio, aio }))
        : o.cache.length === 2
          ? o.cache.map((cache) => ({ ...me, label: `cache-${cache}`, cache }))
        : o.batchMs.length === 2
          ? o.batchMs.map((batchMs) => ({ ...me, label: `batch${batchMs}`, batchMs }))
        : [me];
  const points: Point[] = [];
  for (const ns of o.namespaces) for (const pattern of o.patterns) for (const queues of o.queueCounts) for (const depth of o.depths) points.push({ ns, pattern, queues, depth });
  const meta: Record<string, string> = { date: new Date().toISOString(), cpu: cpuModel(), loadBefore: fmt(os.loadavg()[0]!, 2), loadAfter: '' };
  for (const s of servers) meta[`rev:${s.label}`] = gitRevision(s.root);
  const results: PointResult[] = [];
  for (const s of servers) buildServer(s.root);
  try {
    for (const ns of o.namespaces) {
      const running = new Map<string, Running>();
      try {
        for (const s of servers) running.set(s.label, await startServer(s, ns, o, workDir));
        for (let rep = 0; rep < o.reps; rep++) {
          for (const point of points.filter((p) => p.ns === ns)) {
            // A B, then B A: slow drift of the machine's load falls on both servers alike.
            const order = (rep + points.indexOf(point)) % 2 === 0 ? servers : [...servers].reverse();
            for (const s of order) {
              const r = running.get(s.label)!;
              if (o.evict && point.pattern === 'randread' && ns === 'disk') await dropFromPageCache(r.imagePath!);
              const result = await runPoint(r.server, r.rig, point, o, s.label, rep);
              results.push(result);
              process.stderr.write(
                `${describePoint(point).padEnd(26)} ${s.label.padEnd(5)} rep ${rep}: ${fmt(result.iops).padStart(7)} IOPS, p50 ${fmt(result.latencyUs.p50, 1)} µs, p99 ${fmt(result.latencyUs.p99, 1)} µs, ` +
                  `server ${fmt(result.serverCpuUsPerIo, 1)} µs/IO (${fmt(result.serverCpuShare * 100)} %), driver ${fmt(result.driverCpuShare * 100)} %, ${fmt(result.interruptsPerIo, 2)} IRQ/IO${result.errors ? `, ${result.errors} errors` : ''}\n`,
              );
            }
          }
        }
      } finally {
        for (const r of running.values()) await stopServer(r);
      }
    }
    const profile = o.cpuProf ? await profileRun(o, workDir, me) : null;
    meta.loadAfter = fmt(os.loadavg()[0]!, 2);
    const markdown = report(results, points, servers, o, meta, profile);
    fs.mkdirSync(path.dirname(o.out), { recursive: true });
    fs.writeFileSync(`${o.out}.md`, markdown);
    const samples = results.map(({ window: _window, ...rest }) => rest);
    fs.writeFileSync(`${o.out}.json`, JSON.stringify({ meta, options: { ...o, out: path.relative(REPO, o.out) }, results: samples }, null, 1) + '\n');
    if (profile) writeProfile(profile, `${o.out}-profile`);
    process.stdout.write(markdown + '\n');
  } finally {
    fs.rmSync(workDir, { recursive: true, force: true });
  }
}

/** Keeps the profile next to the results: the summary as Markdown, the stacks as folded text. */
function writeProfile(profile: ProfileSummary, base: string): void {
  fs.writeFileSync(`${base}.md`, profile.markdown);
  fs.writeFileSync(`${base}.folded`, profile.folded);
  // The raw .cpuprofile (for Chrome DevTools or speedscope) is large: kept beside, out of git.
  fs.copyFileSync(profile.rawPath, `${base}.cpuprofile`);
}

runBench('device', import.meta.url, main);
