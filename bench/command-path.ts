// The controller's own cost per command, in-process: no socket, no second process, no kernel
// wake-ups, so a change of a few percent in the command path (doorbell write to interrupt) shows
// above the noise that hides it in device.ts and in a guest. The controller gets the real DMA table
// over a memfd mapping, as a served controller does; the driver is the unit tests' TestHost
// writing the same memory. Trapped doorbells, MSI-X, a RAM or /dev/shm file namespace. Both run as
// tsc compiles them (into build/command-path of each checkout), not through the tsx loader, whose
// naming of every closure would be a cost no user pays (see server-build.ts).
//
// Usage: npx tsx bench/command-path.ts [--commands N] [--reps R] [--qd 1,32] [--ns ram,file]
//          [--rw randread,randwrite] [--baseline DIR]
// With --baseline DIR the same loop also runs against DIR's src/ (another checkout), interleaved
// A B B A, and prints the new/base ratios.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { parseUsage, positiveWhole, runBench, UsageError } from './cli.js';
import { median } from './report.js';

const here = path.dirname(fileURLToPath(import.meta.url));

interface Point {
  ns: 'ram' | 'file';
  rw: 'randread' | 'randwrite';
  qd: number;
}

/**
 * Per command of one point, measured in a child process: the controller's time (its doorbell
 * writes, inside which a RAM or /dev/shm command runs from fetch to completion), and the whole
 * process's CPU time, the driver's included.
 */
interface Measured {
  controllerUs: number;
  cpuUs: number;
}

const BLOCK = 4096;
const NAMESPACE_BYTES = 256 << 20;
const QUEUE_ENTRIES = 256;
const GUEST_BYTES = 64 << 20;
/** Data buffers: one 4 KiB page per queue slot, above the queues TestHost places. */
const DATA_BASE = 32 << 20;

/** Where a checkout's sources and the unit tests' helpers are compiled for this benchmark. */
const compiledDir = (root: string): string => path.join(root, 'build', 'command-path');

/**
 * tsc over `root`'s sources and tests, into compiledDir(root). The .proto files stay behind: they
 * are read only when controller state or control messages are encoded, which this loop never does.
 */
function compile(root: string): void {
  const tsc = path.join(here, '..', 'node_modules', 'typescript', 'bin', 'tsc');
  const args = [tsc, '-p', path.join(root, 'tsconfig.tests.json'), '--noEmit', 'false', '--outDir', compiledDir(root), '--rootDir', root, '--sourceMap', 'false'];
  const r = spawnSync(process.execPath, args, { cwd: root, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`compiling ${root} failed: ${r.error?.message ?? `${r.stdout}${r.stderr}`.trim()}`);
}

/** Runs one point in this process, with the checkout at `root` (compiled). */
async function runPoint(root: string, point: Point, commands: number): Promise<Measured> {
  const load = (rel: string): Promise<Record<string, unknown>> => import(pathToFileURL(path.join(compiledDir(root), rel)).href);
  const helpers = (await load('test/unit/nvme/helpers.js')) as typeof import('../test/unit/nvme/helpers.js');
  const { DmaTable } = (await load('src/vfio-user/dma.js')) as typeof import('../src/vfio-user/dma.js');
  const { native } = (await load('src/native.js')) as typeof import('../src/native.js');
  const backends = (await load('src/nvme/backend.js')) as typeof import('../src/nvme/backend.js');
  const { Namespace } = (await load('src/nvme/namespace.js')) as typeof import('../src/nvme/namespace.js');
  const { buildCommand } = (await load('src/nvme/command.js')) as typeof import('../src/nvme/command.js');
  const { NvmOpcode } = (await load('src/nvme/spec.js')) as typeof import('../src/nvme/spec.js');

  // Guest RAM as a served controller sees it: a memfd the DMA table maps (guarded, pinned views).
  const fd = native.memfdCreate('command-path', GUEST_BYTES);
  const table = new DmaTable(native, 16);
  table.map({ iova: 0n, size: BigInt(GUEST_BYTES), readable: true, writable: true, fd, fileOffset: 0n });
  // The driver's side: TestHost's memory helpers over the same pages.
  const memory = new helpers.GuestMemory(BLOCK);
  Object.defineProperty(memory, 'bytes', { value: new Uint8Array(native.mmap(fd, 0n, GUEST_BYTES, true)) });
  Object.defineProperty(memory, 'size', { value: GUEST_BYTES });

  let dir: string | null = null;
  let backend;
  if (point.ns === 'ram') backend = new backends.RamBackend(NAMESPACE_BYTES);
  else {
    dir = mkdtempSync(path.join('/dev/shm', 'command-path-'));
    backend = await backends.FileBackend.open(path.join(dir, 'ns.img'), { size: NAMESPACE_BYTES });
  }
  const host = new helpers.TestHost({ memory, namespaces: [new Namespace({ nsid: 1, backend })] });
  host.controller.attach({ dma: table, irqs: host.irqs });
  host.start();
  await host.createIoQueuePair(1, QUEUE_ENTRIES);
  // Written once, so reads return data and writes overwrite it.
  await backend.write(0, new Uint8Array(NAMESPACE_BYTES).fill(0x5a));

  const blocks = NAMESPACE_BYTES / BLOCK;
  const opcode = point.rw === 'randread' ? NvmOpcode.READ : NvmOpcode.WRITE;
  let seed = 12345;
  const nextLba = (): number => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return (seed % blocks) * (BLOCK / 512);
  };
  const sqes = Array.from({ length: QUEUE_ENTRIES }, (_, slot) => buildCommand({ opcode, nsid: 1, prp1: DATA_BASE + slot * BLOCK, cdw10: 0, cdw12: BLOCK / 512 - 1 }));

  let slot = 0;
  let inController = 0n;
  const round = async (): Promise<void> => {
    for (let i = 0; i < point.qd; i++) {
      const sqe = sqes[slot]!;
      new DataView(sqe.buffer).setUint32(40, nextLba(), true); // CDW10: starting LBA
      sqe[2] = 0; // TestHost assigns a fresh CID
      sqe[3] = 0;
      host.place(1, sqe);
      slot = (slot + 1) % QUEUE_ENTRIES;
    }
    const rung = process.hrtime.bigint();
    host.ringSq(1);
    inController += process.hrtime.bigint() - rung;
    for (let i = 0; i < point.qd; i++) {
      const cqe = await host.reap(1, false);
      if (cqe.status !== 0) throw new Error(`command failed: status 0x${cqe.status.toString(16)}`);
    }
    const released = process.hrtime.bigint();
    host.ringCq(1);
    inController += process.hrtime.bigint() - released;
  };

  const rounds = Math.max(1, Math.round(commands / point.qd));
  for (let i = 0; i < Math.min(rounds, 2000); i++) await round(); // warm-up: JIT and page faults
  inController = 0n;
  const cpu0 = process.cpuUsage();
  for (let i = 0; i < rounds; i++) await round();
  const cpu = process.cpuUsage(cpu0);
  const done = rounds * point.qd;
  if (dir) rmSync(dir, { recursive: true, force: true });
  return { controllerUs: Number(inController) / 1000 / done, cpuUs: (cpu.user + cpu.system) / done };
}

/** One point in a fresh child process (no JIT state or heap carried over from another point). */
function measure(root: string, point: Point, commands: number): Measured {
  const child = spawnSync(process.execPath, ['--import', 'tsx', fileURLToPath(import.meta.url), '--child', JSON.stringify({ root, point, commands })], {
    cwd: root,
    encoding: 'utf8',
    maxBuffer: 1 << 20,
  });
  if (child.status !== 0) throw new Error(`child for ${JSON.stringify(point)} failed: ${child.stderr.trim()}`);
  return JSON.parse(child.stdout.trim().split('\n').pop()!) as Measured;
}

/** Runs on this shared machine spread by ±10-20 %; noise only ever adds time, so the median and the minimum are the figures to compare. */
const summary = (xs: number[]): string => `${median(xs).toFixed(2)} (min ${Math.min(...xs).toFixed(2)})`;

async function main(): Promise<void> {
  const { values } = parseUsage(() => parseArgs({
    options: {
      child: { type: 'string' },
      commands: { type: 'string', default: '200000' },
      reps: { type: 'string', default: '10' },
      qd: { type: 'string', default: '1,32' },
      ns: { type: 'string', default: 'ram,file' },
      rw: { type: 'string', default: 'randread,randwrite' },
      baseline: { type: 'string' },
    },
  }));
  if (values.child) {
    const { root, point, commands } = JSON.parse(values.child) as { root: string; point: Point; commands: number };
    console.log(JSON.stringify(await runPoint(root, point, commands)));
    return;
  }
  const commands = positiveWhole('commands', values.commands);
  const reps = positiveWhole('reps', values.reps);
  const oneOf = <T extends string>(name: string, text: string, allowed: readonly T[]): T[] =>
    text.split(',').map((v) => {
      if (!(allowed as readonly string[]).includes(v)) throw new UsageError(`--${name}: '${v}' is not one of ${allowed.join(', ')}`);
      return v as T;
    });
  const points: Point[] = [];
  for (const ns of oneOf('ns', values.ns, ['ram', 'file'] as const)) {
    for (const rw of oneOf('rw', values.rw, ['randread', 'randwrite'] as const)) {
      for (const qd of values.qd.split(',').map((q) => positiveWhole('qd', q))) points.push({ ns, rw, qd });
    }
  }
  const ours = path.resolve(here, '..');
  const base = values.baseline ? path.resolve(values.baseline) : null;
  if (base && !existsSync(path.join(base, 'tsconfig.tests.json'))) throw new UsageError(`--baseline: ${base} is not a checkout of this project (no tsconfig.tests.json)`);
  for (const root of base ? [ours, base] : [ours]) compile(root);
  console.log(`# Command path, in-process (${os.cpus().length} CPUs, load ${os.loadavg()[0]!.toFixed(2)}): µs per command, median (and minimum) of ${reps} runs of ${commands} commands${base ? `, interleaved with ${base}` : ''}\n`);
  console.log(
    base
      ? '| ns | rw | QD | base controller µs | new controller µs | new/base | base process CPU µs | new process CPU µs | new/base |'
      : '| ns | rw | QD | controller µs | process CPU µs |',
  );
  console.log(`|${' --- |'.repeat(base ? 9 : 5)}`);
  for (const point of points) {
    const mine: Measured[] = [];
    const theirs: Measured[] = [];
    for (let r = 0; r < reps; r++) {
      // A B B A: drift of the machine during the run falls on both sides alike.
      if (base && r % 2 === 0) theirs.push(measure(base, point, commands));
      mine.push(measure(ours, point, commands));
      if (base && r % 2 === 1) theirs.push(measure(base, point, commands));
    }
    const columns = (pick: (m: Measured) => number): string => {
      const now = mine.map(pick);
      if (!base) return summary(now);
      const before = theirs.map(pick);
      return `${summary(before)} | ${summary(now)} | ×${(median(now) / median(before)).toFixed(3)}`;
    };
    console.log(`| ${point.ns} | ${point.rw} | ${point.qd} | ${columns((m) => m.controllerUs)} | ${columns((m) => m.cpuUs)} |`);
  }
}

runBench('command-path', import.meta.url, main);
