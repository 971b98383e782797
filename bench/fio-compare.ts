// fio in a real guest against several block devices, in one run on one machine:
//   ours                 our NVMe controller (`serve`, one file namespace on /dev/shm) over vfio-user-pci
//   ours-poll            the same with `--poll-us 200` (shadow-tail polling)
//   ours-batch           the same with `--batch-ms 0.25` (deep queues' commands collected every 250 µs)
//   ours-mapped          the same with `--doorbells mapped` (doorbell page mapped into the guest, polled)
//   ours-mapped-batch    the same with `--doorbells mapped --batch-ms 0.25`
//   qemu-nvme            QEMU's own `-device nvme` (ioeventfd=off, its default) on a raw image on /dev/shm:
//                        the baseline every ratio is taken against
//   qemu-nvme-ioeventfd  the same with ioeventfd=on
//   virtio-blk           `-device virtio-blk-pci` on the same kind of image
//   virtio-blk-iothread  the same in an iothread
//   qemu-nvme-null       QEMU nvme on a null-co drive: no data movement, the ceiling of the emulation
// Each (device, repetition) boots the guest once and runs every workload in it; devices are
// interleaved. The report gives IOPS, MiB/s, mean and p99 completion latency per run, host CPU per
// I/O, and every device's ratio to QEMU nvme. Absolute numbers only mean something next to each
// other: under TCG the guest's CPU emulation dominates, so devices are compared within one run.
//
// CPU: user+sys time of our server (and of QEMU) from /proc/<pid>/stat, sampled when the guest
// prints a marker before and after each fio job.
//
// --scaling adds the scaling tables of scaling.ts (controllers of one server, I/O queues).
//
// --image-dir puts the images on another file system than /dev/shm (a disk, where reads and writes
// wait for it), and --cache sets our namespaces' cache= (QEMU's drives are always cache=none), e.g.
// `--image-dir /var/tmp --cache none` to compare O_DIRECT with O_DIRECT.
//
// Usage: npx tsx bench/fio-compare.ts [--runtime 10] [--reps 2] [--size 256] [--devices a,b,…]
//          [--jobs randread-4k-qd32,…] [--image-dir /dev/shm] [--cache writeback|none|…]
//          [--out bench/results/latest.md] [--scaling [--scaling-only] [--scaling-runtime S]
//          [--scaling-controllers 1,2,3,4] [--scaling-queues 1,2,4,8] [--queue-vcpus]]
// Raw results go to the .json beside --out. See bench/README.md.

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ensureHarness, runGuest, type GuestRun } from '../test/e2e/guest.js';
import { startServerProcess, type ServerProcess } from '../test/support/server-process.js';
import { ALL_DEVICES, BASELINE, checkQemuSupports, DEVICES, isOurs, ourServeArgs, probeAio, qemuDeviceArgs, usesImage, type DeviceKind } from './bench-devices.js';
import { extractFioResults, fioCommon, fioJobArgs, guestHwQueues, guestPrelude, WORKLOADS, type Workload } from './guest-fio.js';
import { cpuModel, cpuSeconds, findQemuPid, freshImage, loadavg, mainThreadSleeps, qemuVersion, watchForeignQemu } from './host-stats.js';
import { migrationSection, readMigrationJson, summarizeMigration } from './migration-summary.js';
import { runsTable, summarize, summaryTables, workloadTables, type DeviceRun, type JobResult } from './report.js';
import { runScaling, scalingReport, type ScalePoint, type ScalingOptions } from './scaling.js';
import { useBuiltServer } from './server-build.js';
import { FILE_CACHES, isFileCache, type FileCache } from '../src/nvme/backend.js';
import { parseUsage, positiveWhole, runBench } from './cli.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

// ---------------------------------------------------------------- configuration

interface Options {
  runtimeSec: number;
  reps: number;
  /** Region (MiB) that is preconditioned and that every job stays inside. */
  sizeMiB: number;
  memMiB: number;
  devices: DeviceKind[];
  /** The fio jobs to run (guest-fio.ts WORKLOADS, all by default), in that order. */
  workloads: Workload[];
  out: string;
  /** Where the images live. */
  imageDir: string;
  /** Our namespaces' cache= (undefined: the server's default). */
  cache: FileCache | undefined;
  scaling: boolean;
  scalingOnly: boolean;
  scalingRuntimeSec: number;
  scalingControllers: number[];
  scalingQueues: number[];
  queueVcpus: boolean;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      runtime: { type: 'string', default: '10' },
      reps: { type: 'string', default: '2' },
      size: { type: 'string', default: '256' },
      mem: { type: 'string', default: '1024' },
      devices: { type: 'string', default: ALL_DEVICES.join(',') },
      jobs: { type: 'string', default: WORKLOADS.map((w) => w.id).join(',') },
      out: { type: 'string', default: path.join(REPO, 'bench', 'results', 'latest.md') },
      'image-dir': { type: 'string', default: '/dev/shm' },
      cache: { type: 'string' },
      scaling: { type: 'boolean', default: false },
      'scaling-only': { type: 'boolean', default: false },
      'scaling-runtime': { type: 'string' },
      'scaling-controllers': { type: 'string', default: '1,2,3,4' },
      'scaling-queues': { type: 'string', default: '1,2,4,8' },
      'queue-vcpus': { type: 'boolean', default: false },
    },
  });
  const list = (name: string, v: string): number[] => v.split(',').map((x) => positiveWhole(name, x.trim()));
  const devices = values.devices.split(',').map((d) => d.trim()) as DeviceKind[];
  for (const d of devices) {
    if (!ALL_DEVICES.includes(d)) throw new Error(`--devices: unknown '${d}' (expected ${ALL_DEVICES.join(', ')})`);
  }
  const workloads = values.jobs.split(',').map((id) => {
    const w = WORKLOADS.find((x) => x.id === id.trim());
    if (!w) throw new Error(`--jobs: unknown '${id}' (expected ${WORKLOADS.map((x) => x.id).join(', ')})`);
    return w;
  });
  const sizeMiB = positiveWhole('size', values.size);
  // The scaling table's GO block sits 1 MiB past the region, inside the 1 GiB namespace.
  if (sizeMiB > 1000) throw new Error('--size must be at most 1000 (MiB of the 1 GiB namespace)');
  const runtimeSec = positiveWhole('runtime', values.runtime);
  if (values.cache !== undefined && !isFileCache(values.cache)) throw new Error(`--cache: expected ${FILE_CACHES.join(', ')}`);
  const imageDir = path.resolve(values['image-dir']);
  if (!fs.statSync(imageDir, { throwIfNoEntry: false })?.isDirectory()) throw new Error(`--image-dir ${imageDir} is not a directory`);
  return {
    runtimeSec,
    reps: positiveWhole('reps', values.reps),
    sizeMiB,
    memMiB: positiveWhole('mem', values.mem),
    devices,
    workloads,
    out: path.resolve(values.out),
    imageDir,
    cache: values.cache as FileCache | undefined,
    scaling: values.scaling || values['scaling-only'],
    scalingOnly: values['scaling-only'],
    scalingRuntimeSec: values['scaling-runtime'] !== undefined ? positiveWhole('scaling-runtime', values['scaling-runtime']) : runtimeSec,
    scalingControllers: list('scaling-controllers', values['scaling-controllers']),
    scalingQueues: list('scaling-queues', values['scaling-queues']).map((n) => {
      if (n > 64) throw new Error('--scaling-queues: at most 64 (the server\'s --io-queues limit)');
      return n;
    }),
    queueVcpus: values['queue-vcpus'],
  };
}

// ---------------------------------------------------------------- the guest script

/**
 * The guest fills the benchmark region with a sequential write (so reads return real data instead
 * of the cheap hole path of a sparse file), then runs each workload between markers.
 */
function guestScript(device: DeviceKind, o: Options): string {
  return `${guestPrelude(DEVICES[device].guest, o.sizeMiB)}
run precondition --rw=write --bs=1M --iodepth=8 --numjobs=1
${o.workloads.map((w) => `run ${w.id} ${fioJobArgs(w, o.runtimeSec)}`).join('\n')}
exit 0
`;
}

// ---------------------------------------------------------------- CPU accounting

type JobCpu = Pick<JobResult, 'serverS' | 'qemuS' | 'serverSleeps'>;

/** Records CPU times (and our server's sleeps) on the guest's START/END markers (the serial line arrives within ms). */
function cpuRecorder(serverPid: number | undefined): { onLine(line: string): void; byJob: Map<string, JobCpu> } {
  const byJob = new Map<string, JobCpu>();
  const started = new Map<string, { server?: number; qemu?: number; sleeps?: number }>();
  let qemuPid: number | undefined;
  const sample = (): { server?: number; qemu?: number; sleeps?: number } => {
    qemuPid ??= findQemuPid();
    return {
      server: serverPid !== undefined ? cpuSeconds(serverPid) : undefined,
      qemu: qemuPid !== undefined ? cpuSeconds(qemuPid) : undefined,
      sleeps: serverPid !== undefined ? mainThreadSleeps(serverPid) : undefined,
    };
  };
  const delta = (a?: number, b?: number): number | undefined => (a !== undefined && b !== undefined ? b - a : undefined);
  return {
    byJob,
    onLine(line: string): void {
      const m = /@@BENCH-(START|END) (\S+)@@/.exec(line);
      if (!m) return;
      const job = m[2]!;
      if (m[1] === 'START') {
        started.set(job, sample());
        return;
      }
      const begin = started.get(job);
      if (!begin) return;
      const end = sample();
      byJob.set(job, { serverS: delta(begin.server, end.server), qemuS: delta(begin.qemu, end.qemu), serverSleeps: delta(begin.sleeps, end.sleeps) });
    },
  };
}

// ---------------------------------------------------------------- one guest boot per device

interface BenchContext {
  opts: Options;
  workDir: string;
  aio: 'io_uring' | 'threads';
}

async function runDevice(device: DeviceKind, rep: number, ctx: BenchContext): Promise<DeviceRun> {
  const { opts } = ctx;
  const label = DEVICES[device].label;
  const image = path.join(opts.imageDir, `nvu-bench-${process.pid}-${device}.img`);
  fs.rmSync(image, { force: true });
  let server: ServerProcess | undefined;
  const vfioUserSockets: string[] = [];
  if (isOurs(device)) {
    const sock = path.join(ctx.workDir, `${device}-${rep}.sock`);
    server = await startServerProcess(sock, ourServeArgs(device, image, opts.cache));
    vfioUserSockets.push(sock);
  } else if (usesImage(device)) {
    freshImage(image);
  }

  const cpu = cpuRecorder(server?.child.pid);
  // Boot (~15 s under TCG) + precondition + each job's runtime and fio's own start-up, doubled.
  const timeoutMs = (60 + opts.workloads.length * (opts.runtimeSec + 10)) * 2 * 1000;
  console.error(`[bench] ${label} run ${rep}: booting the guest`);
  // Another engineer's guests on the same 2 CPUs explain outliers: note them per run.
  const watch = watchForeignQemu();
  let run: GuestRun;
  let foreignQemu = 0;
  try {
    run = await runGuest({
      script: guestScript(device, opts),
      vfioUserSockets,
      extraQemuArgs: qemuDeviceArgs(device, { image, aio: ctx.aio }),
      memMiB: opts.memMiB,
      cpus: 2,
      timeoutMs,
      onSerialLine: (line) => cpu.onLine(line),
    });
  } finally {
    foreignQemu = watch.stop();
    const serverAlive = server?.alive() ?? true;
    await server?.stop();
    fs.rmSync(image, { force: true });
    if (!serverAlive) console.error(`[bench] our server died during the run:\n${server?.log()}`);
  }

  const fio = extractFioResults(run.scriptOutput);
  const jobs: Record<string, JobResult> = {};
  for (const w of opts.workloads) {
    const r = fio.get(w.id);
    if (r) jobs[w.id] = { ...r, ...cpu.byJob.get(w.id) };
  }
  const pre = fio.get('precondition');
  const missing = opts.workloads.filter((w) => !jobs[w.id]).map((w) => w.id);
  const result: DeviceRun = {
    device, rep, accel: run.accel, bootMs: run.bootMs, durationMs: run.durationMs, hwQueues: guestHwQueues(run.scriptOutput),
    jobs, foreignQemu, loadEnd: os.loadavg()[0]!,
  };
  if (run.exitCode !== 0 || missing.length) {
    result.error = `exit ${run.exitCode}${missing.length ? `, missing ${missing.join(', ')}` : ''}`;
    // The tail of the console usually names the reason (fio error, driver timeout, QEMU error).
    console.error(`[bench] ${label} run ${rep} failed (${result.error}); console tail:\n` +
      run.output.split('\n').slice(-40).join('\n') + (server ? `\n--- server log ---\n${server.log().slice(-4000)}` : ''));
  }
  console.error(
    `[bench] ${label} run ${rep}: accel=${run.accel} boot=${run.bootMs} ms total=${run.durationMs} ms` +
      (pre ? ` precondition=${pre.mibps.toFixed(0)} MiB/s` : '') +
      opts.workloads.map((w) => {
        const j = jobs[w.id];
        return j ? ` | ${w.id} ${j.iops.toFixed(0)} IOPS ${j.clatUs.toFixed(0)} µs p99 ${j.p99Us.toFixed(0)} µs` : ` | ${w.id} n/a`;
      }).join(''),
  );
  return result;
}

// ---------------------------------------------------------------- report

interface Meta {
  startedAt: Date;
  finishedAt: Date;
  accels: string;
  aio: string;
  loadBefore: string;
  loadAfter: string;
  foreignQemuMax: number;
}

/** How a device was attached in this run: our namespace's image directory and cache= as given. */
function attachText(device: DeviceKind, o: Options): string {
  return DEVICES[device].attach.replace('file=/dev/shm/…,size=1G', `file=${o.imageDir}/…,size=1G${o.cache ? `,cache=${o.cache}` : ''}`);
}

function header(o: Options, meta: Meta): string[] {
  const busy = meta.foreignQemuMax > 0 || Number(meta.loadBefore.split(' ')[0]) >= 1;
  return [
    `- when: ${meta.startedAt.toISOString()} – ${meta.finishedAt.toISOString()} (${((meta.finishedAt.getTime() - meta.startedAt.getTime()) / 60000).toFixed(1)} min)`,
    `- host: ${os.cpus().length} CPUs (${cpuModel()}), kernel ${os.release()}; ${qemuVersion()}`,
    `- accelerator: **${meta.accels}**${meta.accels.includes('tcg') ? ' (no working KVM: the guest CPU is emulated and dominates every number)' : ''}`,
    `- guest: 2 vCPUs, ${o.memMiB} MiB, guest RAM a shared memfd for all devices`,
    `- backing: 1 GiB sparse files on ${o.imageDir}; QEMU drives \`format=raw,cache=none,aio=${meta.aio}\`; ours \`cache=${o.cache ?? 'writeback'}\``,
    // The benchmark itself keeps ~2-3 threads busy; load already there before it started is someone else's.
    `- load average before / after: ${meta.loadBefore} / ${meta.loadAfter}; other QEMU processes seen (max): ${meta.foreignQemuMax}` +
      (busy ? ' — **other work shared the CPUs: numbers are noisy**' : ' — the 2-core host is shared: expect noise of 5-15 % between runs'),
  ];
}

function deviceSection(runs: DeviceRun[], o: Options): string {
  const failed = runs.filter((r) => r.error);
  const summary = summarize(runs, o.devices, o.workloads);
  return [
    `${o.reps} boot(s) per device, devices interleaved (${o.devices.map((d) => DEVICES[d].label).join(', ')}, then again). Devices:`,
    '',
    ...o.devices.map((d) => `- **${DEVICES[d].label}**: ${attachText(d, o)}`),
    '',
    `fio 3.39 in the guest: \`${fioCommon(o.sizeMiB)} --runtime=${o.runtimeSec} --time_based\`; the ${o.sizeMiB} MiB region is first filled with a 1 MiB sequential write in the same boot.`,
    '',
    `## Summary: ratios against ${DEVICES[BASELINE].label}, measured in the same run`,
    '',
    'Means over the runs. Host CPU per I/O is user+sys CPU time (from /proc/<pid>/stat) between markers the guest prints around each fio job, so it includes fio\'s start-up in the guest (about a second); for ours it is our server plus the QEMU that runs the guest.' +
      (o.devices.includes('qemu-nvme-null') ? ' QEMU nvme null-co moves no data at all: it is the ceiling of the emulation, not a disk.' : ''),
    '',
    summaryTables(summary, o.devices, o.workloads),
    '',
    '## Per workload',
    '',
    'IOPS, mean and p99 completion latency (fio `clat`) per run ("run 1 / run 2"); ratios are of the means against QEMU nvme. CPU µs per I/O = CPU-ms per 1000 I/Os.',
    '',
    workloadTables(runs, o.devices, o.workloads),
    '',
    '## Runs',
    '',
    runsTable(runs),
    '',
    failed.length ? `Failed runs: ${failed.map((r) => `${r.device} #${r.rep} (${r.error})`).join('; ')}` : 'All runs completed.',
  ].join('\n');
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const opts = parseUsage(() => parseOptions(process.argv.slice(2)));
  ensureHarness();
  useBuiltServer();
  checkQemuSupports(opts.scalingOnly ? [BASELINE] : opts.devices);
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvu-bench-'));
  const startedAt = new Date();
  const loadBefore = loadavg();
  console.error(`[bench] load average before: ${loadBefore} (2 cores, shared: figures are noisy)`);
  try {
    const ctx: BenchContext = { opts, workDir, aio: await probeAio(workDir) };
    const runs: DeviceRun[] = [];
    if (!opts.scalingOnly) {
      // Interleaved (A B C A B C) so slow drift in the machine's load spreads over all devices.
      for (let rep = 1; rep <= opts.reps; rep++) {
        for (const device of opts.devices) {
          try {
            runs.push(await runDevice(device, rep, ctx));
          } catch (e) {
            console.error(`[bench] ${DEVICES[device].label} run ${rep}: ${(e as Error).message}`);
            runs.push({ device, rep, bootMs: null, durationMs: 0, jobs: {}, foreignQemu: 0, loadEnd: os.loadavg()[0]!, error: (e as Error).message });
          }
        }
      }
    }
    let scaling: ScalePoint[] = [];
    const scalingOpts: ScalingOptions = {
      runtimeSec: opts.scalingRuntimeSec, sizeMiB: opts.sizeMiB, memMiB: opts.memMiB, controllers: opts.scalingControllers,
      queues: opts.scalingQueues, queueVcpus: opts.queueVcpus, iodepth: 32, devices: ['ours', BASELINE], aio: ctx.aio, workDir,
    };
    if (opts.scaling) scaling = await runScaling(scalingOpts);

    const meta: Meta = {
      startedAt,
      finishedAt: new Date(),
      accels: [...new Set([...runs, ...scaling].map((r) => r.accel).filter((a) => a !== undefined))].join(', ') || 'unknown',
      aio: ctx.aio,
      loadBefore,
      loadAfter: loadavg(),
      foreignQemuMax: Math.max(0, ...runs.map((r) => r.foreignQemu), ...scaling.map((p) => p.foreignQemu)),
    };
    const resultsDir = path.dirname(opts.out);
    const migration = readMigrationJson(resultsDir);
    const md = [
      `# Guest benchmark: ${opts.scalingOnly ? 'scaling of ' : ''}our vfio-user NVMe vs QEMU's devices`,
      '',
      ...header(opts, meta),
      '',
      ...(opts.scalingOnly ? [] : [deviceSection(runs, opts), '']),
      opts.scaling
        ? scalingReport(scaling, scalingOpts)
        : 'Scaling tables (controllers of one server, I/O queues): `--scaling`, not in this run.' +
          (fs.existsSync(path.join(resultsDir, 'scaling.md')) ? ' The last `--scaling-only --out …/scaling.md` run: [scaling.md](scaling.md).' : ''),
      '',
      migrationSection(migration, false),
      '',
      `Raw results: [${path.basename(opts.out).replace(/\.md$/, '.json')}](${path.basename(opts.out).replace(/\.md$/, '.json')}).`,
      '',
    ].join('\n');
    process.stdout.write(md);
    fs.mkdirSync(resultsDir, { recursive: true });
    fs.writeFileSync(opts.out, md);
    const json = {
      meta: { ...meta, startedAt: startedAt.toISOString(), finishedAt: meta.finishedAt.toISOString(), qemu: qemuVersion(), cpus: os.cpus().length, cpuModel: cpuModel(), kernel: os.release() },
      options: opts,
      devices: Object.fromEntries(opts.devices.map((d) => [d, { label: DEVICES[d].label, attach: attachText(d, opts) }])),
      workloads: opts.workloads,
      baseline: BASELINE,
      summary: opts.scalingOnly ? undefined : summarize(runs, opts.devices, opts.workloads),
      runs,
      scaling: opts.scaling ? scaling : undefined,
      // Rewritten by bench/migration.ts when it finishes; until then the figures of its last run.
      migration: migration ? summarizeMigration(migration) : undefined,
    };
    const jsonPath = opts.out.replace(/\.md$/, '') + '.json';
    fs.writeFileSync(jsonPath, JSON.stringify(json, null, 2) + '\n');
    console.error(`[bench] wrote ${path.relative(process.cwd(), opts.out) || opts.out} and ${path.relative(process.cwd(), jsonPath)}`);
    if (runs.some((r) => r.error) || scaling.some((p) => p.error)) process.exitCode = 1;
  } finally {
    fs.rmSync(workDir, { recursive: true, force: true });
  }
}

runBench('fio-compare', import.meta.url, main);
