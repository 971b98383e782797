// fio in a real guest against three block devices, in one run on one machine:
//   ours        our NVMe controller (`serve`, one file namespace on /dev/shm) over vfio-user-pci
//   qemu-nvme   QEMU's own `-device nvme` on a raw image on /dev/shm
//   virtio-blk  QEMU's `-device virtio-blk-pci` on the same kind of image
// Each (device, repetition) boots the guest once and runs every workload in it. The table gives
// IOPS, MiB/s and mean completion latency per run, and the ratios ours/QEMU-nvme and
// ours/virtio-blk. Absolute numbers only mean something next to each other: under TCG the guest's
// CPU emulation dominates, so devices are compared within one run, never across machines.
//
// It also samples user+sys CPU time of our server (and of each QEMU) from /proc/<pid>/stat when the
// guest prints a marker before and after each fio job, giving CPU-seconds per 1000 I/Os.
//
// Usage: npx tsx bench/fio-compare.ts [--runtime 10] [--reps 2] [--size 256]
//          [--devices ours,qemu-nvme,virtio-blk] [--out bench/results/latest.md]
// See bench/README.md.

import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ensureHarness, qemuBinary, runGuest, type Accel, type GuestRun } from '../test/e2e/guest.js';
import { startServerProcess, type ServerProcess } from '../test/support/server-process.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

// ---------------------------------------------------------------- configuration

type DeviceKind = 'ours' | 'qemu-nvme' | 'virtio-blk';
const ALL_DEVICES: readonly DeviceKind[] = ['ours', 'qemu-nvme', 'virtio-blk'];
const DEVICE_LABEL: Record<DeviceKind, string> = {
  ours: 'ours (vfio-user)',
  'qemu-nvme': 'QEMU nvme',
  'virtio-blk': 'virtio-blk',
};

interface Workload {
  id: string;
  label: string;
  rw: 'randread' | 'randwrite' | 'read';
  bs: string;
  iodepth: number;
}

// The job set of qemu-11-facts.md §6 (libaio, direct, 1 job, QD32), plus QD1 random reads whose
// mean completion latency is the per-I/O round trip through each device.
const WORKLOADS: readonly Workload[] = [
  { id: 'randread-4k-qd32', label: '4k randread QD32', rw: 'randread', bs: '4k', iodepth: 32 },
  { id: 'randwrite-4k-qd32', label: '4k randwrite QD32', rw: 'randwrite', bs: '4k', iodepth: 32 },
  { id: 'read-128k-qd32', label: '128k seq read QD32', rw: 'read', bs: '128k', iodepth: 32 },
  { id: 'randread-4k-qd1', label: '4k randread QD1', rw: 'randread', bs: '4k', iodepth: 1 },
];

interface Options {
  runtimeSec: number;
  reps: number;
  /** Region (MiB) that is preconditioned and that every job stays inside. */
  sizeMiB: number;
  memMiB: number;
  devices: DeviceKind[];
  out: string;
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
      out: { type: 'string', default: path.join(REPO, 'bench', 'results', 'latest.md') },
    },
  });
  const positive = (name: string, v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) throw new Error(`--${name} must be a positive integer (got '${v}')`);
    return n;
  };
  const devices = values.devices.split(',').map((d) => d.trim()) as DeviceKind[];
  for (const d of devices) {
    if (!ALL_DEVICES.includes(d)) throw new Error(`--devices: unknown '${d}' (expected ${ALL_DEVICES.join(', ')})`);
  }
  return {
    runtimeSec: positive('runtime', values.runtime),
    reps: positive('reps', values.reps),
    sizeMiB: positive('size', values.size),
    memMiB: positive('mem', values.mem),
    devices,
    out: path.resolve(values.out),
  };
}

// ---------------------------------------------------------------- the guest script

const MARK = '@@BENCH';

/**
 * The shell script the guest runs. It finds the one block device under test, fills the benchmark
 * region with a sequential write (so reads return real data instead of the cheap hole path of a
 * sparse file), then runs each workload. Around each fio it prints START/END markers (the host
 * samples CPU times on them) and then the job's JSON between markers: fio writes JSON to a file
 * because it prints warnings on stdout/stderr that would break parsing.
 */
function guestScript(device: DeviceKind, o: Options): string {
  // Namespaces of a multipath-capable kernel also show hidden nvmeXcYnZ paths: match heads only.
  const pattern = device === 'virtio-blk' ? '^vd[a-z]+$' : '^nvme[0-9]+n[0-9]+$';
  const common = [
    '--ioengine=libaio', '--direct=1', '--numjobs=1', '--group_reporting',
    `--size=${o.sizeMiB}M`, '--output-format=json', '--clat_percentiles=0',
  ].join(' ');
  const jobs = WORKLOADS.map(
    (w) => `run ${w.id} --rw=${w.rw} --bs=${w.bs} --iodepth=${w.iodepth} --runtime=${o.runtimeSec} --time_based`,
  );
  return `
name=$(ls /sys/block | grep -E '${pattern}' | head -n 1)
if [ -z "$name" ]; then echo "bench: no block device matching ${pattern}"; ls /sys/block; exit 1; fi
dev=/dev/$name
echo "bench-device=$dev sectors=$(cat /sys/block/$name/size) model=$(cat /sys/block/$name/device/model 2>/dev/null)"
run() {
  job=$1; shift
  echo "${MARK}-START $job@@"
  fio --name=$job --filename=$dev ${common} "$@" --output=/tmp/$job.json
  rc=$?
  echo "${MARK}-END $job@@"
  echo "${MARK}-JSON $job@@"
  cat /tmp/$job.json
  echo "${MARK}-JSON-END $job@@"
  [ $rc -eq 0 ] || { echo "bench: fio $job failed with $rc"; exit $rc; }
}
run precondition --rw=write --bs=1M --iodepth=8
${jobs.join('\n')}
exit 0
`;
}

// ---------------------------------------------------------------- fio output

interface FioResult {
  iops: number;
  mibps: number;
  /** Mean completion latency (submission to completion) in µs. */
  clatUs: number;
  /** I/Os completed (read + write). */
  ios: number;
}

interface FioDirStats {
  iops: number;
  bw_bytes: number;
  total_ios: number;
  clat_ns: { mean: number };
}

/** One direction of a job is summed with the other (a job here only does one of them). */
function parseFioJson(text: string): FioResult {
  const doc = JSON.parse(text) as { jobs: Array<{ error: number; read: FioDirStats; write: FioDirStats }> };
  const job = doc.jobs[0];
  if (!job) throw new Error('fio JSON has no jobs');
  if (job.error) throw new Error(`fio job error ${job.error}`);
  const dirs = [job.read, job.write].filter((d) => d.total_ios > 0);
  const ios = dirs.reduce((s, d) => s + d.total_ios, 0);
  return {
    iops: dirs.reduce((s, d) => s + d.iops, 0),
    mibps: dirs.reduce((s, d) => s + d.bw_bytes, 0) / 2 ** 20,
    // Weighted by I/O count so a mixed job would still get a true mean.
    clatUs: ios ? dirs.reduce((s, d) => s + d.clat_ns.mean * d.total_ios, 0) / ios / 1000 : NaN,
    ios,
  };
}

/** The JSON blocks of the guest's output, by job name. */
function extractFioResults(scriptOutput: string): Map<string, FioResult> {
  const results = new Map<string, FioResult>();
  const re = /@@BENCH-JSON (\S+)@@\n([\s\S]*?)\n?@@BENCH-JSON-END \1@@/g;
  for (const m of scriptOutput.matchAll(re)) {
    try {
      results.set(m[1]!, parseFioJson(m[2]!));
    } catch (e) {
      console.error(`[bench] could not parse fio output of ${m[1]}: ${(e as Error).message}`);
    }
  }
  return results;
}

// ---------------------------------------------------------------- CPU accounting

const CLK_TCK = ((): number => {
  const r = spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' });
  const n = Number(r.stdout?.trim());
  return Number.isFinite(n) && n > 0 ? n : 100;
})();

/** user+sys CPU seconds of a process (all its threads), or undefined once it is gone. */
function cpuSeconds(pid: number): number | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // comm (field 2) may contain spaces: count fields after its closing parenthesis.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(rest[11]) + Number(rest[12])) / CLK_TCK; // fields 14 (utime) and 15 (stime)
  } catch {
    return undefined;
  }
}

/**
 * runGuest() does not expose QEMU's pid: it is the one child of this process that is not our
 * server (the QEMU wrapper script execs the dynamic loader, so the pid stays the same).
 */
function findQemuPid(excludePid: number | undefined): number | undefined {
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pid === excludePid) continue;
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === process.pid && fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('qemu-system')) return pid;
    } catch {
      /* the process went away while we looked */
    }
  }
  return undefined;
}

/** CPU seconds spent between a job's START and END markers. */
interface JobCpu {
  serverS?: number;
  qemuS?: number;
}

/** Records CPU times on the guest's START/END markers (the serial line arrives within ms). */
function cpuRecorder(serverPid: number | undefined): { onLine(line: string): void; byJob: Map<string, JobCpu> } {
  const byJob = new Map<string, JobCpu>();
  const started = new Map<string, { server?: number; qemu?: number }>();
  let qemuPid: number | undefined;
  const sample = (): { server?: number; qemu?: number } => {
    qemuPid ??= findQemuPid(serverPid);
    return {
      server: serverPid !== undefined ? cpuSeconds(serverPid) : undefined,
      qemu: qemuPid !== undefined ? cpuSeconds(qemuPid) : undefined,
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
      byJob.set(job, { serverS: delta(begin.server, end.server), qemuS: delta(begin.qemu, end.qemu) });
    },
  };
}

// ---------------------------------------------------------------- one guest boot per device

interface JobResult extends FioResult, JobCpu {}

interface DeviceRun {
  device: DeviceKind;
  rep: number;
  accel?: Accel;
  bootMs: number | null;
  durationMs: number;
  jobs: Map<string, JobResult>;
  /** Most QEMU processes not started by us seen while this run's guest was up (sampled every 2 s). */
  foreignQemu: number;
  /** 1-minute load average when the run ended. */
  loadEnd: number;
  /** Set when the run did not produce every workload; the table then shows n/a. */
  error?: string;
}

interface BenchContext {
  opts: Options;
  workDir: string;
  aio: 'io_uring' | 'threads';
}

/** A fresh sparse 1 GiB image on /dev/shm (tmpfs: RAM-backed like our server's namespace file). */
function freshImage(file: string): void {
  fs.rmSync(file, { force: true });
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 2 ** 30);
}

async function runDevice(device: DeviceKind, rep: number, ctx: BenchContext): Promise<DeviceRun> {
  const { opts } = ctx;
  const image = `/dev/shm/nvu-bench-${process.pid}-${device}.img`;
  fs.rmSync(image, { force: true });
  let server: ServerProcess | undefined;
  const extraQemuArgs: string[] = [];
  const vfioUserSockets: string[] = [];
  const drive = (id: string): string => `file=${image},if=none,id=${id},format=raw,cache=none,aio=${ctx.aio}`;
  switch (device) {
    case 'ours': {
      const sock = path.join(ctx.workDir, `ours-${rep}.sock`);
      // warn: per-command info logging would be measured as device overhead.
      server = await startServerProcess(sock, ['--namespace', `file=${image},size=1G`, '--log-level', 'warn']);
      vfioUserSockets.push(sock);
      break;
    }
    case 'qemu-nvme':
      freshImage(image);
      extraQemuArgs.push('-drive', drive('d0'), '-device', 'nvme,drive=d0,serial=bench');
      break;
    case 'virtio-blk':
      freshImage(image);
      extraQemuArgs.push('-drive', drive('d1'), '-device', 'virtio-blk-pci,drive=d1');
      break;
  }

  const cpu = cpuRecorder(server?.child.pid);
  // Boot (~15 s under TCG) + precondition + each job's runtime and fio's own start-up, doubled.
  const timeoutMs = (60 + WORKLOADS.length * (opts.runtimeSec + 10)) * 2 * 1000;
  console.error(`[bench] ${DEVICE_LABEL[device]} run ${rep}: booting the guest`);
  // Another engineer's guests on the same 2 CPUs explain outliers: note them per run.
  let foreignQemu = foreignQemuCount();
  const watch = setInterval(() => (foreignQemu = Math.max(foreignQemu, foreignQemuCount())), 2000);
  let run: GuestRun;
  try {
    run = await runGuest({
      script: guestScript(device, opts),
      vfioUserSockets,
      extraQemuArgs,
      memMiB: opts.memMiB,
      cpus: 2,
      timeoutMs,
      onSerialLine: (line) => cpu.onLine(line),
    });
  } finally {
    clearInterval(watch);
    const serverAlive = server?.alive() ?? true;
    await server?.stop();
    fs.rmSync(image, { force: true });
    if (!serverAlive) console.error(`[bench] our server died during the run:\n${server?.log()}`);
  }

  const fio = extractFioResults(run.scriptOutput);
  const jobs = new Map<string, JobResult>();
  for (const w of WORKLOADS) {
    const r = fio.get(w.id);
    if (r) jobs.set(w.id, { ...r, ...cpu.byJob.get(w.id) });
  }
  const pre = fio.get('precondition');
  const missing = WORKLOADS.filter((w) => !jobs.has(w.id)).map((w) => w.id);
  const result: DeviceRun = {
    device, rep, accel: run.accel, bootMs: run.bootMs, durationMs: run.durationMs, jobs, foreignQemu, loadEnd: os.loadavg()[0]!,
  };
  if (run.exitCode !== 0 || missing.length) {
    result.error = `exit ${run.exitCode}${missing.length ? `, missing ${missing.join(', ')}` : ''}`;
    // The tail of the console usually names the reason (fio error, driver timeout, QEMU error).
    console.error(`[bench] ${DEVICE_LABEL[device]} run ${rep} failed (${result.error}); console tail:\n` +
      run.output.split('\n').slice(-40).join('\n') + (server ? `\n--- server log ---\n${server.log().slice(-4000)}` : ''));
  }
  console.error(
    `[bench] ${DEVICE_LABEL[device]} run ${rep}: accel=${run.accel} boot=${run.bootMs} ms total=${run.durationMs} ms` +
      (pre ? ` precondition=${pre.mibps.toFixed(0)} MiB/s` : '') +
      WORKLOADS.map((w) => {
        const j = jobs.get(w.id);
        return j ? ` | ${w.id} ${j.iops.toFixed(0)} IOPS ${j.clatUs.toFixed(0)} µs` : ` | ${w.id} n/a`;
      }).join(''),
  );
  return result;
}

/**
 * QEMU's io_uring AIO needs io_uring_setup, which some hosts forbid (sysctl, seccomp): QEMU then
 * fails when it opens the drive, i.e. at start-up. Start a machine-less QEMU with the drive, paused,
 * and see whether it is still running after a moment.
 */
async function probeAio(workDir: string): Promise<'io_uring' | 'threads'> {
  const img = path.join('/dev/shm', `nvu-bench-${process.pid}-probe.img`);
  freshImage(img);
  try {
    const child = spawn(qemuBinary(), [
      '-machine', 'none', '-nodefaults', '-display', 'none', '-monitor', 'none', '-S',
      '-drive', `file=${img},if=none,id=p,format=raw,cache=none,aio=io_uring`,
    ], { stdio: ['ignore', 'ignore', 'pipe'], cwd: workDir });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), 2000);
      child.once('exit', () => {
        clearTimeout(timer);
        resolve(true);
      });
    });
    if (!exited) {
      child.kill('SIGKILL');
      return 'io_uring';
    }
    console.error(`[bench] aio=io_uring does not work here, using aio=threads: ${stderr.trim()}`);
    return 'threads';
  } finally {
    fs.rmSync(img, { force: true });
  }
}

// ---------------------------------------------------------------- report

/** Mean of the defined values, or undefined when there are none. */
function mean(xs: Array<number | undefined>): number | undefined {
  const ok = xs.filter((x): x is number => x !== undefined && Number.isFinite(x));
  return ok.length ? ok.reduce((a, b) => a + b, 0) / ok.length : undefined;
}

function fmt(x: number | undefined, digits = 0): string {
  return x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(digits);
}

type Metric = { name: string; get(r: JobResult): number | undefined; digits: number };
const METRICS: readonly Metric[] = [
  { name: 'IOPS', get: (r) => r.iops, digits: 0 },
  { name: 'MiB/s', get: (r) => r.mibps, digits: 1 },
  { name: 'mean clat µs', get: (r) => r.clatUs, digits: 0 },
];

function markdownTable(header: string[], rows: string[][]): string {
  const line = (cells: string[]): string => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...rows.map(line)].join('\n');
}

function valuesOf(runs: DeviceRun[], device: DeviceKind, job: string, get: (r: JobResult) => number | undefined): Array<number | undefined> {
  return runs.filter((r) => r.device === device).map((r) => {
    const j = r.jobs.get(job);
    return j ? get(j) : undefined;
  });
}

/** Per workload and metric: each run's value ("a / b") and the ratio of the means. */
function resultsTable(runs: DeviceRun[], devices: DeviceKind[]): string {
  const others = devices.filter((d) => d !== 'ours');
  const header = ['workload', 'metric', ...devices.map((d) => DEVICE_LABEL[d])];
  if (devices.includes('ours')) header.push(...others.map((d) => `ours / ${DEVICE_LABEL[d]}`));
  const rows: string[][] = [];
  for (const w of WORKLOADS) {
    for (const m of METRICS) {
      const row = [w.label, m.name];
      for (const d of devices) row.push(valuesOf(runs, d, w.id, m.get).map((v) => fmt(v, m.digits)).join(' / '));
      if (devices.includes('ours')) {
        const ours = mean(valuesOf(runs, 'ours', w.id, m.get));
        for (const d of others) {
          const base = mean(valuesOf(runs, d, w.id, m.get));
          row.push(ours !== undefined && base ? fmt(ours / base, 2) : 'n/a');
        }
      }
      rows.push(row);
    }
  }
  return markdownTable(header, rows);
}

/** CPU-seconds per 1000 I/Os, from the START/END samples and fio's I/O count. */
function cpuTable(runs: DeviceRun[], devices: DeviceKind[]): string {
  const per1k = (cpuS: number | undefined, ios: number): number | undefined => (cpuS !== undefined && ios > 0 ? (cpuS / ios) * 1000 : undefined);
  const header = ['workload', 'our server CPU-s', 'our server CPU-ms / 1k IOs',
    ...devices.map((d) => `QEMU CPU-ms / 1k IOs, ${DEVICE_LABEL[d]}`)];
  const rows = WORKLOADS.map((w) => {
    const row = [w.label];
    if (devices.includes('ours')) {
      row.push(valuesOf(runs, 'ours', w.id, (r) => r.serverS).map((v) => fmt(v, 2)).join(' / '));
      row.push(valuesOf(runs, 'ours', w.id, (r) => per1k(r.serverS, r.ios)).map((v) => fmt(v !== undefined ? v * 1000 : v, 1)).join(' / '));
    } else {
      row.push('n/a', 'n/a');
    }
    for (const d of devices) {
      row.push(valuesOf(runs, d, w.id, (r) => per1k(r.qemuS, r.ios)).map((v) => fmt(v !== undefined ? v * 1000 : v, 1)).join(' / '));
    }
    return row;
  });
  return markdownTable(header, rows);
}

/** One line per guest boot: where the noise came from. */
function runsTable(runs: DeviceRun[]): string {
  const rows = runs.map((r) => [
    DEVICE_LABEL[r.device], String(r.rep), r.bootMs === null ? 'n/a' : (r.bootMs / 1000).toFixed(1),
    (r.durationMs / 1000).toFixed(1), String(r.foreignQemu), r.loadEnd.toFixed(2), r.error ?? 'ok',
  ]);
  return markdownTable(['device', 'run', 'boot s', 'wall s', 'other QEMUs on the host', 'load (1 min) at end', 'result'], rows);
}

function qemuVersion(): string {
  const r = spawnSync(qemuBinary(), ['--version'], { encoding: 'utf8' });
  return r.stdout?.split('\n')[0]?.trim() || 'unknown';
}

function cpuModel(): string {
  const m = /^model name\s*:\s*(.*)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'));
  return m?.[1] ?? 'unknown';
}

/** QEMU processes on the machine that this benchmark did not start: their load skews the numbers. */
function foreignQemuCount(): number {
  let n = 0;
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const argv = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      // The harness's wrapper execs the dynamic loader with QEMU as its argument; a system QEMU runs directly.
      const exe = path.basename(argv[0] ?? '');
      const isQemu = exe.startsWith('qemu-system') || (exe.startsWith('ld-linux') && argv.some((a) => a.includes('qemu-system')));
      if (isQemu && ppid !== process.pid) n++;
    } catch {
      /* gone */
    }
  }
  return n;
}

interface Meta {
  startedAt: Date;
  finishedAt: Date;
  accels: string;
  aio: string;
  loadBefore: string;
  loadAfter: string;
  foreignQemuMax: number;
}

function report(runs: DeviceRun[], o: Options, meta: Meta): string {
  const failed = runs.filter((r) => r.error);
  const fioLine = `fio 3.39 in the guest: \`--ioengine=libaio --direct=1 --numjobs=1 --runtime=${o.runtimeSec} --time_based --size=${o.sizeMiB}M\`, ` +
    `QD32 for 4k randread, 4k randwrite, 128k sequential read; QD1 for 4k randread. ` +
    `The ${o.sizeMiB} MiB region is first filled with a 1 MiB sequential write in the same boot.`;
  return [
    '# fio: our vfio-user NVMe vs QEMU nvme vs virtio-blk',
    '',
    `- when: ${meta.startedAt.toISOString()} – ${meta.finishedAt.toISOString()}`,
    `- host: ${os.cpus().length} CPUs (${cpuModel()}), kernel ${os.release()}; ${qemuVersion()}`,
    `- accelerator: **${meta.accels}**${meta.accels.includes('tcg') ? ' (no working KVM: the guest CPU is emulated and dominates every number)' : ''}`,
    `- guest: 2 vCPUs, ${o.memMiB} MiB, guest RAM a shared memfd for all devices; ${o.reps} boot(s) per device, devices interleaved`,
    `- backing: 1 GiB sparse files on /dev/shm; QEMU drives \`format=raw,cache=none,aio=${meta.aio}\`; ours \`serve --namespace file=…,size=1G --log-level warn\``,
    `- ${fioLine}`,
    `- load average before / after: ${meta.loadBefore} / ${meta.loadAfter}; other QEMU processes seen (max): ${meta.foreignQemuMax}` +
      // The benchmark itself keeps ~2-3 threads busy; load already there before it started is someone else's.
      (meta.foreignQemuMax > 0 || Number(meta.loadBefore.split(' ')[0]) >= 1
        ? ' — **other work shared the CPUs: numbers are noisy**'
        : ''),
    '',
    'Values are per run ("run 1 / run 2"); ratios compare the means (IOPS, MiB/s: >1 = ours faster; latency: >1 = ours slower).',
    '',
    resultsTable(runs, o.devices),
    '',
    'CPU time (user+sys from /proc/<pid>/stat) between the START/END markers around each fio job, which include fio start-up ' +
      'in the guest (a second or so). CPU-ms per 1000 I/Os equals CPU-µs per I/O. Our server runs beside QEMU, so the cost ' +
      'of our device to the host is the server column plus the QEMU column of "ours".',
    '',
    cpuTable(runs, o.devices),
    '',
    runsTable(runs),
    '',
    failed.length ? `Failed runs: ${failed.map((r) => `${r.device} #${r.rep} (${r.error})`).join('; ')}` : 'All runs completed.',
    '',
  ].join('\n');
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const opts = parseOptions(process.argv.slice(2));
  ensureHarness();
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvu-bench-'));
  const startedAt = new Date();
  const loadBefore = os.loadavg().map((l) => l.toFixed(2)).join(' ');
  try {
    const ctx: BenchContext = { opts, workDir, aio: await probeAio(workDir) };
    const runs: DeviceRun[] = [];
    // Interleaved (A B C A B C) so slow drift in the machine's load spreads over all devices.
    for (let rep = 1; rep <= opts.reps; rep++) {
      for (const device of opts.devices) {
        try {
          runs.push(await runDevice(device, rep, ctx));
        } catch (e) {
          console.error(`[bench] ${DEVICE_LABEL[device]} run ${rep}: ${(e as Error).message}`);
          runs.push({ device, rep, bootMs: null, durationMs: 0, jobs: new Map(), foreignQemu: 0, loadEnd: os.loadavg()[0]!, error: (e as Error).message });
        }
      }
    }
    const accels = [...new Set(runs.map((r) => r.accel).filter((a) => a !== undefined))].join(', ') || 'unknown';
    const md = report(runs, opts, {
      startedAt,
      finishedAt: new Date(),
      accels,
      aio: ctx.aio,
      loadBefore,
      loadAfter: os.loadavg().map((l) => l.toFixed(2)).join(' '),
      foreignQemuMax: Math.max(0, ...runs.map((r) => r.foreignQemu)),
    });
    process.stdout.write(md);
    fs.mkdirSync(path.dirname(opts.out), { recursive: true });
    fs.writeFileSync(opts.out, md);
    console.error(`[bench] wrote ${path.relative(process.cwd(), opts.out) || opts.out}`);
    if (runs.some((r) => r.error)) process.exitCode = 1;
  } finally {
    fs.rmSync(workDir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(`[bench] ${(e as Error).stack ?? String(e)}`);
  process.exit(1);
});
