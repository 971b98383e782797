// The device comparison's results: what one guest boot measured, the means and ratios against QEMU
// nvme (the summary that also goes to latest.json), and the Markdown tables.

import { BASELINE, DEVICES, isOurs, type DeviceKind } from './bench-devices.js';
import { type FioResult, type Workload } from './guest-fio.js';

/** One fio job of one boot, with the CPU time spent between its START and END markers. */
export interface JobResult extends FioResult {
  /** user+sys CPU seconds of our server (ours only). */
  serverS?: number;
  /** user+sys CPU seconds of the guest's QEMU. */
  qemuS?: number;
  /** Times our server's event loop slept (ours only): each sleep costs a wake-up (bench/wake-floor.ts). */
  serverSleeps?: number;
}

export interface DeviceRun {
  device: DeviceKind;
  rep: number;
  accel?: string;
  bootMs: number | null;
  durationMs: number;
  /** blk-mq hardware queues the guest's driver created. */
  hwQueues?: number;
  jobs: Record<string, JobResult>;
  /** Most QEMU processes not started by us seen while this run's guest was up (sampled every 2 s). */
  foreignQemu: number;
  /** 1-minute load average when the run ended. */
  loadEnd: number;
  /** Set when the run did not produce every workload; the table then shows n/a. */
  error?: string;
}

/** Mean of the defined values, or undefined when there are none. */
export function mean(xs: Array<number | undefined>): number | undefined {
  const ok = xs.filter((x): x is number => x !== undefined && Number.isFinite(x));
  return ok.length ? ok.reduce((a, b) => a + b, 0) / ok.length : undefined;
}

/** Median of the finite values (the mean of the middle two for an even count), NaN when there are none. */
export function median(xs: number[]): number {
  const s = xs.filter(Number.isFinite).sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length === 0 ? NaN : s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

export function fmt(x: number | undefined, digits = 0): string {
  return x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(digits);
}

export function ratio(a: number | undefined, b: number | undefined): number | undefined {
  return a !== undefined && b !== undefined && b > 0 ? a / b : undefined;
}

export function markdownTable(header: string[], rows: string[][]): string {
  const line = (cells: string[]): string => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...rows.map(line)].join('\n');
}

/** Host CPU µs per I/O of a job: our server's and QEMU's (CPU-µs per I/O = CPU-ms per 1000 I/Os). */
export function cpuPerIo(r: JobResult): { server?: number; qemu?: number; total?: number } {
  const per = (s: number | undefined): number | undefined => (s !== undefined && r.ios > 0 ? (s / r.ios) * 1e6 : undefined);
  const server = per(r.serverS);
  const qemu = per(r.qemuS);
  return { server, qemu, total: qemu !== undefined ? qemu + (server ?? 0) : undefined };
}

type Getter = (r: JobResult) => number | undefined;

function valuesOf(runs: DeviceRun[], device: DeviceKind, job: string, get: Getter): Array<number | undefined> {
  return runs.filter((r) => r.device === device).map((r) => {
    const j = r.jobs[job];
    return j ? get(j) : undefined;
  });
}

const GET = {
  iops: (r: JobResult) => r.iops,
  mibps: (r: JobResult) => r.mibps,
  clatUs: (r: JobResult) => r.clatUs,
  // Results from before latUs was recorded have none.
  latUs: (r: JobResult) => (Number.isFinite(r.latUs) ? r.latUs : undefined),
  p99Us: (r: JobResult) => r.p99Us,
  serverCpuUs: (r: JobResult) => cpuPerIo(r).server,
  serverSleepsPerIo: (r: JobResult) => (r.serverSleeps !== undefined && r.ios > 0 ? r.serverSleeps / r.ios : undefined),
  qemuCpuUs: (r: JobResult) => cpuPerIo(r).qemu,
  hostCpuUs: (r: JobResult) => cpuPerIo(r).total,
} satisfies Record<string, Getter>;
type Key = keyof typeof GET;
const RATIO_KEYS = ['iops', 'clatUs', 'latUs', 'p99Us', 'hostCpuUs'] as const;
type RatioKey = (typeof RATIO_KEYS)[number];

export interface DeviceSummary {
  /** Means over the runs. */
  mean: Partial<Record<Key, number>>;
  /** This device's mean / QEMU nvme's mean, same run (absent without a QEMU nvme run). */
  vsQemuNvme: Partial<Record<RatioKey, number>>;
}

/** summary[workload][device]: the figures the tables show, for latest.json. */
export function summarize(runs: DeviceRun[], devices: DeviceKind[], workloads: readonly Workload[]): Record<string, Partial<Record<DeviceKind, DeviceSummary>>> {
  const out: Record<string, Partial<Record<DeviceKind, DeviceSummary>>> = {};
  for (const w of workloads) {
    out[w.id] = {};
    for (const d of devices) {
      const m: Partial<Record<Key, number>> = {};
      for (const k of Object.keys(GET) as Key[]) {
        const v = mean(valuesOf(runs, d, w.id, GET[k]));
        if (v !== undefined) m[k] = v;
      }
      const vs: DeviceSummary['vsQemuNvme'] = {};
      if (devices.includes(BASELINE)) {
        for (const k of RATIO_KEYS) {
          const r = ratio(m[k], mean(valuesOf(runs, BASELINE, w.id, GET[k])));
          if (r !== undefined) vs[k] = r;
        }
      }
      out[w.id]![d] = { mean: m, vsQemuNvme: vs };
    }
  }
  return out;
}

/** Summary tables: one figure per device and workload, with its ratio to QEMU nvme. */
export function summaryTables(summary: ReturnType<typeof summarize>, devices: DeviceKind[], workloads: readonly Workload[]): string {
  const haveBase = devices.includes(BASELINE);
  const table = (title: string, key: Key, ratioKey: keyof DeviceSummary['vsQemuNvme'], digits: number): string => {
    const rows = devices.map((d) => [
      DEVICES[d].label,
      ...workloads.map((w) => {
        const s = summary[w.id]?.[d];
        const v = fmt(s?.mean[key], digits);
        return haveBase && d !== BASELINE ? `${v} (${fmt(s?.vsQemuNvme[ratioKey], 2)}×)` : v;
      }),
    ]);
    return `**${title}**\n\n${markdownTable(['device', ...workloads.map((w) => w.label)], rows)}`;
  };
  return [
    table('IOPS (× QEMU nvme; >1 = faster)', 'iops', 'iops', 0),
    table('Mean completion latency µs, fio clat: submission done to completion (× QEMU nvme; >1 = slower)', 'clatUs', 'clatUs', 0),
    table('Mean total latency µs, fio lat: submission start to completion, a doorbell exit included (× QEMU nvme; >1 = slower)', 'latUs', 'latUs', 0),
    table('p99 completion latency µs (× QEMU nvme; >1 = slower)', 'p99Us', 'p99Us', 0),
    table('Host CPU µs per I/O: our server + its QEMU, or QEMU alone (× QEMU nvme; >1 = costlier)', 'hostCpuUs', 'hostCpuUs', 1),
  ].join('\n\n');
}

/** Per workload: each run's values ("run 1 / run 2") and the ratios of the means to QEMU nvme. */
export function workloadTables(runs: DeviceRun[], devices: DeviceKind[], workloads: readonly Workload[]): string {
  const haveBase = devices.includes(BASELINE);
  const perRun = (d: DeviceKind, job: string, get: Getter, digits: number): string =>
    valuesOf(runs, d, job, get).map((v) => fmt(v, digits)).join(' / ');
  const parts: string[] = [];
  for (const w of workloads) {
    const base = (get: Getter): number | undefined => (haveBase ? mean(valuesOf(runs, BASELINE, w.id, get)) : undefined);
    const rows = devices.map((d) => {
      const r = (get: Getter): string => fmt(ratio(mean(valuesOf(runs, d, w.id, get)), base(get)), 2);
      return [
        DEVICES[d].label,
        perRun(d, w.id, GET.iops, 0),
        fmt(mean(valuesOf(runs, d, w.id, GET.mibps)), 1),
        perRun(d, w.id, GET.clatUs, 0),
        perRun(d, w.id, GET.latUs, 0),
        perRun(d, w.id, GET.p99Us, 0),
        r(GET.iops), r(GET.clatUs), r(GET.latUs), r(GET.p99Us),
        isOurs(d) ? perRun(d, w.id, GET.serverCpuUs, 1) : '—',
        isOurs(d) ? perRun(d, w.id, GET.serverSleepsPerIo, 2) : '—',
        perRun(d, w.id, GET.qemuCpuUs, 1),
        fmt(mean(valuesOf(runs, d, w.id, GET.hostCpuUs)), 1),
        r(GET.hostCpuUs),
      ];
    });
    parts.push(`### ${w.label} (\`--rw=${w.rw} --bs=${w.bs} --iodepth=${w.iodepth} --numjobs=${w.numjobs}\`)\n\n` + markdownTable(
      ['device', 'IOPS', 'MiB/s (mean)', 'mean clat µs', 'mean total lat µs', 'p99 clat µs', 'IOPS ×', 'mean clat ×', 'mean total lat ×', 'p99 ×',
        'server CPU µs/IO', 'server sleeps/IO', 'QEMU CPU µs/IO', 'host CPU µs/IO (mean)', 'CPU ×'],
      rows,
    ));
  }
  return parts.join('\n\n');
}

/** One line per guest boot: where the noise came from. */
export function runsTable(runs: DeviceRun[]): string {
  const rows = runs.map((r) => [
    DEVICES[r.device].label, String(r.rep), r.bootMs === null ? 'n/a' : (r.bootMs / 1000).toFixed(1),
    (r.durationMs / 1000).toFixed(1), r.hwQueues === undefined ? 'n/a' : String(r.hwQueues), String(r.foreignQemu),
    r.loadEnd.toFixed(2), r.error ?? 'ok',
  ]);
  return markdownTable(['device', 'run', 'boot s', 'wall s', 'guest hw queues', 'other QEMUs on the host', 'load (1 min) at end', 'result'], rows);
}
