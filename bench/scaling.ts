// `fio-compare --scaling`: how ours scales against QEMU nvme, interleaved, one repetition per point.
//
// 1. Controllers: 1 → 4 controllers of ONE server process (`serve --socket a --socket b …`, one
//    shared file namespace), one guest per controller, every guest running the same fio job at the
//    same moment. QEMU nvme's point is the same number of guests, each a QEMU with its own image.
// 2. I/O queues: the server's `--io-queues` (QEMU nvme's `max_ioqpairs`) 1 → 8 with fio numjobs =
//    that number, one guest. Linux makes one I/O queue per vCPU at most, so a 2-vCPU guest uses
//    min(N, 2) queues whatever the controller offers: the table shows the count the guest really
//    made (blk-mq hardware queues). `--queue-vcpus` gives the guest N vCPUs instead (N TCG vCPU
//    threads on the host's 2 cores) so that N queues really carry I/O.
//
// Guests start together: each boots, prints READY and polls a block just past the benchmark region
// with O_DIRECT reads; once every guest is ready the host writes "BENCHGO!" into the backing file(s)
// and all of them start fio within ~0.2 s. CPU times are sampled at GO and at each guest's END.

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Vm } from '../test/e2e/vm.js';
import { spawnServe, type Served } from '../test/support/server-process.js';
import { BASELINE, DEVICES, qemuDeviceArgs, type DeviceKind } from './bench-devices.js';
import { extractFioResults, guestHwQueues, guestMultipathHead, guestPrelude, MARK, type FioResult } from './guest-fio.js';
import { cpuSeconds, fillImage, freshImage, watchForeignQemu } from './host-stats.js';
import { fmt, markdownTable, ratio } from './report.js';

export interface ScalingOptions {
  runtimeSec: number;
  sizeMiB: number;
  memMiB: number;
  controllers: number[];
  queues: number[];
  queueVcpus: boolean;
  iodepth: number;
  devices: DeviceKind[];
  aio: 'io_uring' | 'threads';
  workDir: string;
}

export interface ScalePoint {
  table: 'controllers' | 'queues';
  /** Controllers (guests) or I/O queues offered. */
  n: number;
  device: DeviceKind;
  guests: number;
  vcpus: number;
  numjobs: number;
  iodepth: number;
  /** blk-mq hardware queues each guest's driver made. */
  hwQueues: Array<number | undefined>;
  /** Whether any guest saw a native-multipath head device (namespace shared by the controllers). */
  multipathHead: boolean;
  accel?: string;
  perGuest: Array<FioResult | undefined>;
  totalIops?: number;
  meanClatUs?: number;
  worstP99Us?: number;
  ios: number;
  /** Seconds from GO to the last guest's END. */
  windowS?: number;
  serverS?: number;
  /** Sum over the guests' QEMUs. */
  qemuS?: number;
  foreignQemu: number;
  loadEnd: number;
  error?: string;
}

const GO = 'BENCHGO!';

/** Whether `p` settled within `ms` (the timer is cleared either way, so it keeps nothing alive). */
async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  try {
    return await Promise.race([p.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function guestScript(o: ScalingOptions, numjobs: number): string {
  const goBlock = (o.sizeMiB + 1) * 256; // 4 KiB blocks: 1 MiB past the region fio uses
  return `${guestPrelude('nvme', o.sizeMiB)}
echo "${MARK}-READY@@"
while [ "$(dd if=$dev bs=4096 skip=${goBlock} count=1 iflag=direct 2>/dev/null | head -c 8)" != "${GO}" ]; do sleep 0.2; done
run scale --rw=randread --bs=4k --iodepth=${o.iodepth} --numjobs=${numjobs} --runtime=${o.runtimeSec} --time_based
exit 0
`;
}

function writeGo(file: string, sizeMiB: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, Buffer.from(GO), 0, GO.length, (sizeMiB + 1) * 2 ** 20);
  } finally {
    fs.closeSync(fd);
  }
}

async function runPoint(o: ScalingOptions, p: { table: ScalePoint['table']; n: number; device: DeviceKind; guests: number; vcpus: number; ioQueues?: number; numjobs: number }): Promise<ScalePoint> {
  const tag = `${p.table}-${p.n}-${p.device}`;
  const images = p.device === 'ours' ? [`/dev/shm/nvu-scale-${process.pid}-ours.img`] : Array.from({ length: p.guests }, (_, i) => `/dev/shm/nvu-scale-${process.pid}-${i}.img`);
  const point: ScalePoint = {
    table: p.table, n: p.n, device: p.device, guests: p.guests, vcpus: p.vcpus, numjobs: p.numjobs, iodepth: o.iodepth,
    hwQueues: [], multipathHead: false, perGuest: [], ios: 0, foreignQemu: 0, loadEnd: 0,
  };
  let server: Served | undefined;
  const vms: Vm[] = [];
  const watch = watchForeignQemu();
  try {
    for (const img of images) {
      freshImage(img);
      fillImage(img, o.sizeMiB);
    }
    const sockets = Array.from({ length: p.device === 'ours' ? p.guests : 0 }, (_, i) => path.join(o.workDir, `scale-${i}.sock`));
    if (p.device === 'ours') {
      const args = [...sockets.flatMap((s) => ['--socket', s]), '--namespace', `file=${images[0]},size=1G`, '--log-level', 'warn',
        ...(p.ioQueues !== undefined ? ['--io-queues', String(p.ioQueues)] : [])];
      server = await spawnServe(args, `listening on ${sockets.at(-1)}\n`);
    }
    const script = guestScript(o, p.numjobs);
    const qemuAtGo: Array<number | undefined> = [];
    const qemuAtEnd: Array<number | undefined> = [];
    let serverAtGo: number | undefined;
    let goAt = 0;
    let ended = 0;
    let allEnded!: () => void;
    const endedAll = new Promise<void>((resolve) => (allEnded = resolve));
    for (let i = 0; i < p.guests; i++) {
      const vm = await Vm.start({
        name: `${tag}-${i}`, script, memMiB: o.memMiB, cpus: p.vcpus,
        vfioUserSockets: p.device === 'ours' ? [sockets[i]!] : [],
        extraQemuArgs: p.device === 'ours' ? [] : qemuDeviceArgs(p.device, { image: images[i]!, aio: o.aio, maxIoQpairs: p.ioQueues }),
      });
      vm.onLine((line) => {
        if (!line.includes(`${MARK}-END scale@@`)) return;
        qemuAtEnd[i] = cpuSeconds(vm.child.pid!);
        if (++ended === p.guests) {
          point.windowS = (performance.now() - goAt) / 1000;
          const s = server ? cpuSeconds(server.child.pid!) : undefined;
          if (s !== undefined && serverAtGo !== undefined) point.serverS = s - serverAtGo;
          allEnded();
        }
      });
      vms.push(vm);
    }
    // Four TCG guests booting on two cores take a while.
    await Promise.all(vms.map((vm) => vm.waitForLine(new RegExp(`${MARK}-READY@@`), 600_000)));
    for (let i = 0; i < vms.length; i++) qemuAtGo[i] = cpuSeconds(vms[i]!.child.pid!);
    serverAtGo = server ? cpuSeconds(server.child.pid!) : undefined;
    goAt = performance.now();
    for (const img of images) writeGo(img, o.sizeMiB);
    const deadline = (o.runtimeSec + 120) * 1000;
    if (!(await within(endedAll, deadline))) throw new Error(`not every guest finished fio within ${deadline / 1000} s of GO`);
    await within(Promise.all(vms.map((vm) => vm.exited)), 60_000);
    const deltas = qemuAtGo.map((a, i) => (a !== undefined && qemuAtEnd[i] !== undefined ? qemuAtEnd[i]! - a : undefined));
    if (deltas.every((d) => d !== undefined)) point.qemuS = deltas.reduce((s, d) => s + d!, 0);
    for (const vm of vms) {
      const out = vm.markers().scriptOutput;
      point.hwQueues.push(guestHwQueues(out));
      point.multipathHead ||= guestMultipathHead(out);
      point.accel = vm.accel;
      point.perGuest.push(extractFioResults(out).get('scale'));
    }
    const ok = point.perGuest.filter((r): r is FioResult => r !== undefined);
    if (ok.length !== p.guests) throw new Error(`${p.guests - ok.length} guest(s) gave no fio result`);
    point.ios = ok.reduce((s, r) => s + r.ios, 0);
    point.totalIops = ok.reduce((s, r) => s + r.iops, 0);
    point.meanClatUs = ok.reduce((s, r) => s + r.clatUs * r.ios, 0) / point.ios;
    point.worstP99Us = Math.max(...ok.map((r) => r.p99Us));
  } catch (e) {
    point.error = (e as Error).message;
    console.error(`[bench scaling] ${tag} failed: ${point.error}\n${vms.map((vm) => `--- ${vm.name}\n${vm.lines.slice(-20).join('\n')}\n${vm.qemuStderr}`).join('\n')}` +
      (server ? `\n--- server log ---\n${server.log().slice(-3000)}` : ''));
  } finally {
    point.foreignQemu = watch.stop();
    await Promise.all(vms.map((vm) => vm.kill()));
    await server?.stop();
    for (const img of images) fs.rmSync(img, { force: true });
    point.loadEnd = os.loadavg()[0]!;
  }
  console.error(`[bench scaling] ${DEVICES[p.device].label}, ${p.table} ${p.n}: ${fmt(point.totalIops)} IOPS total, ` +
    `hw queues ${point.hwQueues.join(',')}, server ${fmt(point.serverS, 2)} CPU-s, window ${fmt(point.windowS, 1)} s${point.error ? ` (${point.error})` : ''}`);
  return point;
}

/** Runs both scaling tables, ours and QEMU nvme interleaved at each point. */
export async function runScaling(o: ScalingOptions): Promise<ScalePoint[]> {
  const points: ScalePoint[] = [];
  for (const n of o.controllers) {
    for (const device of o.devices) points.push(await runPoint(o, { table: 'controllers', n, device, guests: n, vcpus: 2, numjobs: 1 }));
  }
  for (const n of o.queues) {
    for (const device of o.devices) points.push(await runPoint(o, { table: 'queues', n, device, guests: 1, vcpus: o.queueVcpus ? n : 2, ioQueues: n, numjobs: n }));
  }
  return points;
}

const perIo = (s: number | undefined, ios: number): number | undefined => (s !== undefined && ios > 0 ? (s / ios) * 1e6 : undefined);

export function scalingReport(points: ScalePoint[], o: ScalingOptions): string {
  const base = (p: ScalePoint): ScalePoint | undefined => points.find((q) => q.table === p.table && q.n === p.n && q.device === BASELINE);
  const common = (p: ScalePoint): string[] => [
    DEVICES[p.device].label,
    fmt(p.totalIops),
    p.device === BASELINE ? '—' : fmt(ratio(p.totalIops, base(p)?.totalIops), 2),
    fmt(p.meanClatUs),
    fmt(p.worstP99Us),
    p.device === 'ours' ? fmt(p.serverS, 2) : '—',
    p.device === 'ours' ? fmt(p.serverS !== undefined && p.windowS ? (100 * p.serverS) / p.windowS : undefined, 0) : '—',
    p.device === 'ours' ? fmt(perIo(p.serverS, p.ios), 1) : '—',
    fmt(perIo(p.qemuS, p.ios), 1),
    fmt(perIo(p.qemuS !== undefined ? p.qemuS + (p.serverS ?? 0) : undefined, p.ios), 1),
    p.error ? `failed: ${p.error}` : 'ok',
  ];
  const tail = ['total IOPS', 'IOPS × QEMU nvme', 'mean clat µs', 'worst guest p99 µs', 'server CPU-s', 'server CPU % of a core', 'server CPU µs/IO', 'QEMU CPU µs/IO (all)', 'host CPU µs/IO', 'result'];
  const ctl = points.filter((p) => p.table === 'controllers');
  const q = points.filter((p) => p.table === 'queues');
  return [
    '## Scaling (`--scaling`)',
    '',
    `4k randread, QD${o.iodepth} per fio job, ${o.runtimeSec} s, one run per point, ours and QEMU nvme interleaved; guests start fio together (the host releases them once all have booted). ` +
      'Under TCG every guest\'s vCPUs and every device compete for the host\'s 2 cores, so total IOPS shows how the device\'s cost grows with load, not what the device could do on a bigger host.',
    '',
    `### Controllers of one server process, one guest (2 vCPUs, ${o.memMiB} MiB) per controller`,
    '',
    'Ours: `serve --socket s0 … --socket sN-1` with one shared file namespace (filled from the host), each guest on its own controller. QEMU nvme: N QEMUs, each with its own filled image.',
    '',
    markdownTable(['controllers (guests)', 'device', 'guest block device', 'IOPS per guest', ...tail],
      ctl.map((p) => {
        const c = common(p);
        return [String(p.n), c[0]!, p.multipathHead ? 'multipath head' : 'plain', p.perGuest.map((r) => fmt(r?.iops)).join(' / '), ...c.slice(1)];
      })),
    '',
    'With 2 or more controllers our namespace is shared by the controllers of one subsystem, so the guest\'s Linux puts a native-multipath head (bio-based `nvmeXnY` over the hidden `nvmeXcYnZ` path) in front of it ("guest block device"): a little more guest CPU per I/O that QEMU nvme\'s private namespaces do not pay.',
    '',
    `### I/O queues, one guest (${o.queueVcpus ? 'vCPUs = queues' : '2 vCPUs'})`,
    '',
    o.queueVcpus
      ? 'The guest has as many vCPUs as the controller offers queues, so Linux makes one I/O queue per vCPU and every fio job can sit on its own queue. N TCG vCPU threads share the host\'s 2 cores.'
      : 'What varies: the queues the controller offers (`serve --io-queues N`, QEMU nvme `max_ioqpairs=N`) and fio\'s numjobs = N (so N×QD32 commands outstanding). ' +
        'What the guest uses: Linux makes at most one I/O queue per vCPU, so with 2 vCPUs it is min(N, 2) queues (column "guest hw queues"): beyond 2, more jobs share the same 2 queues. `--queue-vcpus` gives the guest N vCPUs instead.',
    '',
    markdownTable(['queues offered', 'fio jobs × QD', 'guest vCPUs', 'guest hw queues', ...['device', ...tail]],
      q.map((p) => [String(p.n), `${p.numjobs} × ${p.iodepth}`, String(p.vcpus), p.hwQueues.map((h) => fmt(h)).join(','), ...common(p)])),
    '',
    `Load (1 min) after each point: ${points.map((p) => p.loadEnd.toFixed(2)).join(', ')}; other QEMU processes seen (max): ${Math.max(0, ...points.map((p) => p.foreignQemu))}.`,
    '',
  ].join('\n');
}
