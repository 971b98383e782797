// fio in the benchmark guest: the workloads, the shell that runs them between markers the host
// watches for, and the parsing of fio's JSON (IOPS, bandwidth, mean and percentile completion latency).

export interface Workload {
  id: string;
  label: string;
  rw: 'randread' | 'randwrite' | 'read';
  bs: string;
  iodepth: number;
  numjobs: number;
}

/**
 * The job set of qemu-11-facts.md §6 (libaio, direct, 1 job, QD32), QD1 random reads whose mean
 * completion latency is the per-I/O round trip through each device, and 2 jobs at QD128 (256
 * commands outstanding over the guest's 2 queues: the most a device is asked to hold here).
 */
export const WORKLOADS: readonly Workload[] = [
  { id: 'randread-4k-qd32', label: '4k randread QD32', rw: 'randread', bs: '4k', iodepth: 32, numjobs: 1 },
  { id: 'randwrite-4k-qd32', label: '4k randwrite QD32', rw: 'randwrite', bs: '4k', iodepth: 32, numjobs: 1 },
  { id: 'read-128k-qd32', label: '128k seq read QD32', rw: 'read', bs: '128k', iodepth: 32, numjobs: 1 },
  { id: 'randread-4k-qd1', label: '4k randread QD1', rw: 'randread', bs: '4k', iodepth: 1, numjobs: 1 },
  { id: 'randread-4k-2j-qd128', label: '4k randread 2 jobs × QD128', rw: 'randread', bs: '4k', iodepth: 128, numjobs: 2 },
];

export const MARK = '@@BENCH';

/** Namespaces of a multipath-capable kernel also show hidden nvmeXcYnZ paths: match heads only. */
export function blockPattern(kind: 'nvme' | 'virtio'): string {
  return kind === 'virtio' ? '^vd[a-z]+$' : '^nvme[0-9]+n[0-9]+$';
}

/** fio options every job shares; `--size` keeps every job inside the preconditioned region. */
export function fioCommon(sizeMiB: number): string {
  return [
    '--ioengine=libaio', '--direct=1', '--group_reporting', `--size=${sizeMiB}M`,
    '--output-format=json', '--clat_percentiles=1', '--percentile_list=50:99:99.9',
  ].join(' ');
}

export function fioJobArgs(w: Workload, runtimeSec: number): string {
  return `--rw=${w.rw} --bs=${w.bs} --iodepth=${w.iodepth} --numjobs=${w.numjobs} --runtime=${runtimeSec} --time_based`;
}

/**
 * Shell for the guest: finds the block device under test ($dev, $name), prints what it found
 * (including the number of blk-mq hardware queues the driver made: `bench-hwqueues=N`), and
 * defines `run JOB FIO-ARGS...`, which prints START/END markers around fio (the host samples CPU
 * times on them) and then the job's JSON between markers. fio writes the JSON to a file because it
 * prints warnings on stdout/stderr that would break parsing.
 */
export function guestPrelude(kind: 'nvme' | 'virtio', sizeMiB: number): string {
  const pattern = blockPattern(kind);
  return `
name=$(ls /sys/block | grep -E '${pattern}' | head -n 1)
if [ -z "$name" ]; then echo "bench: no block device matching ${pattern}"; ls /sys/block; exit 1; fi
dev=/dev/$name
echo "bench-device=$dev sectors=$(cat /sys/block/$name/size) model=$(cat /sys/block/$name/device/model 2>/dev/null)"
# A namespace shared by several controllers of one subsystem gets a native-multipath head (bio-based,
# no mq/): its queues are those of the hidden path device nvmeXcYnZ.
mq=$name
[ -d /sys/block/$name/mq ] || mq=$(ls /sys/block | grep -E '^nvme[0-9]+c[0-9]+n[0-9]+$' | head -n 1)
echo "bench-hwqueues=$(ls /sys/block/$mq/mq 2>/dev/null | wc -l) multipath-head=$([ "$mq" = "$name" ] && echo no || echo yes) vcpus=$(grep -c ^processor /proc/cpuinfo)"
run() {
  job=$1; shift
  echo "${MARK}-START $job@@"
  fio --name=$job --filename=$dev ${fioCommon(sizeMiB)} "$@" --output=/tmp/$job.json
  rc=$?
  echo "${MARK}-END $job@@"
  echo "${MARK}-JSON $job@@"
  cat /tmp/$job.json
  echo "${MARK}-JSON-END $job@@"
  [ $rc -eq 0 ] || { echo "bench: fio $job failed with $rc"; exit $rc; }
}
`;
}

export interface FioResult {
  iops: number;
  mibps: number;
  /**
   * Mean completion latency in µs: fio's clat, from the end of the submission (io_submit's return)
   * to the completion. A doorbell that makes the guest exit is paid inside io_submit, so it is not
   * in clat: compare latUs too.
   */
  clatUs: number;
  /** Mean total latency in µs: fio's lat, from the start of the submission to the completion (slat + clat). */
  latUs: number;
  /** Completion latency percentiles in µs (fio's histogram buckets: within about 1-3 %). */
  p50Us: number;
  p99Us: number;
  p999Us: number;
  /** I/Os completed (read + write). */
  ios: number;
}

interface FioDirStats {
  iops: number;
  bw_bytes: number;
  total_ios: number;
  clat_ns: { mean: number; percentile?: Record<string, number> };
  lat_ns: { mean: number };
}

/** The `p` percentile of one direction in µs, or NaN when fio did not report it. */
function percentileUs(d: FioDirStats, p: number): number {
  for (const [k, v] of Object.entries(d.clat_ns.percentile ?? {})) {
    if (Math.abs(Number(k) - p) < 1e-6) return v / 1000;
  }
  return NaN;
}

/** A mean over both directions weighted by I/O count, so a mixed job would still get a true mean. */
function weightedMeanUs(dirs: FioDirStats[], ios: number, meanNs: (d: FioDirStats) => number): number {
  return ios ? dirs.reduce((s, d) => s + meanNs(d) * d.total_ios, 0) / ios / 1000 : NaN;
}

/** One direction of a job is summed with the other (a job here only does one of them). */
export function parseFioJson(text: string): FioResult {
  const doc = JSON.parse(text) as { jobs: Array<{ error: number; read: FioDirStats; write: FioDirStats }> };
  const job = doc.jobs[0];
  if (!job) throw new Error('fio JSON has no jobs');
  if (job.error) throw new Error(`fio job error ${job.error}`);
  const dirs = [job.read, job.write].filter((d) => d.total_ios > 0);
  const ios = dirs.reduce((s, d) => s + d.total_ios, 0);
  // Percentiles of the direction that did the I/O (a mixed job would need fio's merged histogram).
  const main = dirs.reduce<FioDirStats | undefined>((a, d) => (!a || d.total_ios > a.total_ios ? d : a), undefined);
  return {
    iops: dirs.reduce((s, d) => s + d.iops, 0),
    mibps: dirs.reduce((s, d) => s + d.bw_bytes, 0) / 2 ** 20,
    clatUs: weightedMeanUs(dirs, ios, (d) => d.clat_ns.mean),
    latUs: weightedMeanUs(dirs, ios, (d) => d.lat_ns.mean),
    p50Us: main ? percentileUs(main, 50) : NaN,
    p99Us: main ? percentileUs(main, 99) : NaN,
    p999Us: main ? percentileUs(main, 99.9) : NaN,
    ios,
  };
}

/** The JSON blocks of the guest's output, by job name. */
export function extractFioResults(scriptOutput: string): Map<string, FioResult> {
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

/** Whether the guest's block device was a native-multipath head (a namespace shared by controllers). */
export function guestMultipathHead(scriptOutput: string): boolean {
  return /multipath-head=yes/.test(scriptOutput);
}

/** `bench-hwqueues=N` as the guest printed it. */
export function guestHwQueues(scriptOutput: string): number | undefined {
  const m = /bench-hwqueues=(\d+)/.exec(scriptOutput);
  return m ? Number(m[1]) : undefined;
}
