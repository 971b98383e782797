// `npx tsx bench/migration.ts`: what a live migration costs, measured here.
//
// 1. The device part of the downtime, between two `serve` processes as `nvme-vfio-user migrate`
//    does it (test/support/migration-pair.ts): suspend on the source, state out (Migration
//    Receive), state in on the target (Set Controller State), resume on the target, each timed,
//    with 1, 32 and 128 4 KiB WRITEs in flight at the suspend (backing file on a disk file system,
//    so they really are: in tmpfs they would complete inline), and the state size. Through the
//    control socket; with --primary through the exported primary's admin queue as well.
// 2. The VM part: total time and VM downtime (the source's STOP event to the destination's RESUME)
//    of the same guest running verified writes, once on our device moved by `nvme-vfio-user
//    migrate`, once on QEMU's virtio-blk over the same kind of shared image moved by QEMU alone,
//    interleaved, in one run. --device-only skips it and rewrites only the device section.
// --cache MODE sets our namespaces' cache= in both parts (e.g. none, as the virtio-blk drive has).
// The servers and `migrate` run as installed (compiled into dist/ first: bench/server-build.ts).
// Results: stdout and bench/results/migration.md (and .json).

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { CmdBits, NvmOpcode } from '../src/nvme/spec.js';
import { STATE_CHUNK } from '../src/lm/state-transfer.js';
import { QmpClient } from '../src/mgmt/qemu/qmp.js';
import { cont, migrate, migrateIncoming, queryMigrate, setMigrationCapabilities, setMigrationParameters, UNLIMITED_BANDWIDTH, waitForMigrationStatus } from '../src/mgmt/qemu/migration.js';
import { ensureHarness } from '../test/e2e/guest.js';
import { Vm } from '../test/e2e/vm.js';
import { DISK_MIB, side, stopWorkload, workload } from '../test/e2e/migration-scenario.js';
import { freePort } from '../test/support/server-process.js';
import { runCli } from '../test/support/cli.js';
import { RESOURCES, startPair, type Guest, type MigrationServer } from '../test/support/migration-pair.js';
import { seededRandom } from '../test/support/nvme-workload.js';
import { DEPTHS, refreshCombinedReport, type DeviceDepth, type DeviceFigures, type DeviceHop, type DevicePath, type MigrationJson } from './migration-summary.js';
import { useBuiltServer } from './server-build.js';
import { parseOrExit, positiveWhole } from './cli.js';
import { FILE_CACHES, isFileCache, type FileCache } from '../src/nvme/backend.js';

const REPO = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const values = parseOrExit('migration', import.meta.url, () => {
  const { values: v } = parseArgs({
    options: {
      reps: { type: 'string', default: '3' },
      'device-reps': { type: 'string', default: '12' },
      'device-only': { type: 'boolean', default: false },
      primary: { type: 'boolean', default: false },
      'downtime-limit': { type: 'string' },
      out: { type: 'string', default: path.join(REPO, 'bench', 'results', 'migration.md') },
      cache: { type: 'string' },
    },
  });
  if (v.cache !== undefined && !isFileCache(v.cache)) throw new Error(`--cache: expected ${FILE_CACHES.join(', ')}`);
  return {
    ...v,
    reps: positiveWhole('reps', v.reps),
    deviceReps: positiveWhole('device-reps', v['device-reps']),
    downtimeLimit: v['downtime-limit'] !== undefined ? positiveWhole('downtime-limit', v['downtime-limit']) : undefined,
    cache: v.cache as FileCache | undefined,
  };
});
const REPS = values.reps;
/** Hops per depth in the device part (after one not counted). */
const DEVICE_REPS = values.deviceReps;
/** The device part through the control socket, and with --primary through the exported primary too. */
const DEVICE_PATHS: DevicePath[] = values.primary ? ['control', 'primary'] : ['control'];
/** QEMU's downtime-limit for both devices' migrations (ms); QEMU's default (300) unless given. */
const DOWNTIME_LIMIT = values.downtimeLimit;
/** Our namespaces' cache= (undefined: the server's default, writeback). */
const CACHE = values.cache;

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

// ---- 1. the device ---------------------------------------------------------------------------------

const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;
/** Queues the writes go to: not the pair's stalled queue, whose CQ is small. */
const WRITE_QUEUES = 4;
const WRITE_BYTES = 4096;
/** Hops not counted on a fresh pair, then one more at each depth. */
const WARMUP_HOPS = 5;

/**
 * The directory the pair's backing file goes to (os.tmpdir(), as startPair does) must be on a disk
 * file system: in tmpfs a file namespace completes writes inline, so none would be in flight at
 * the suspend.
 */
function requireDiskTmpdir(): string {
  const dir = os.tmpdir();
  const type = fs.statfsSync(dir).type;
  if (type === TMPFS_MAGIC || type === RAMFS_MAGIC) throw new Error(`${dir} is in memory (statfs type 0x${type.toString(16)}): set TMPDIR to a directory on a disk file system, so writes are in flight at the suspend`);
  return `${dir} (statfs type 0x${type.toString(16)})`;
}

/**
 * One hop of the device part of a migration between the pair's two servers, with `outstanding`
 * 4 KiB WRITEs (with FUA: each durable before it completes, an fdatasync) submitted and fetched
 * on the source when its suspend is submitted; the guest then runs on the target. Steps as the
 * orchestrator sees them, in ms.
 */
async function deviceHop(guest: Guest, source: MigrationServer, target: MigrationServer, outstanding: number, fua: boolean, buffer: number, hop: number): Promise<DeviceHop> {
  const { host } = guest;
  const queues = guest.queues.slice(0, WRITE_QUEUES);
  const blocks = WRITE_BYTES / 512;
  for (let i = 0; i < outstanding; i++) {
    const slba = ((hop * 128 + i) * blocks) % (24 << 11); // within the pair's 32 MiB disk
    queues[i % WRITE_QUEUES]!.place(NvmOpcode.WRITE, { nsid: 1, prp1: buffer + (i % 128) * WRITE_BYTES, cdw10: slba, cdw12: (blocks - 1) | (fua ? CmdBits.RW_FUA : 0) });
  }
  for (const q of queues) q.ring();
  // One round trip: the server has handled the doorbells, and fetches in the turn that brings one,
  // so the writes are now on its threadpool (or done). No more waiting, or they would all be done.
  await host.sync();
  const posted = (): number => queues.reduce((n, q) => n + q.posted(), 0);
  const completedBefore = posted();
  const t0 = performance.now();
  await source.mmh.suspend(source.cntlid);
  const t1 = performance.now();
  const state = await source.mmh.getState(source.cntlid, STATE_CHUNK);
  const t2 = performance.now();
  // Whatever the suspend did not complete was never fetched: it stays in the SQ, in the state.
  const completedBySuspend = posted();
  await host.moveTo(target.socket);
  const t3 = performance.now();
  await target.mmh.suspend(target.cntlid);
  const t4 = performance.now();
  const setCommands = (await target.mmh.setState(target.cntlid, state.bytes, STATE_CHUNK)).length;
  const t5 = performance.now();
  await target.mmh.resume(target.cntlid);
  const t6 = performance.now();
  // The guest reaps every write on the target (those still in an SQ run there), then the source is reset to be the next target.
  let reaped = 0;
  const deadline = Date.now() + 10_000;
  while (reaped < outstanding) {
    for (const q of queues) {
      for (const c of q.reap()) {
        if (c.status !== 0) throw new Error(`hop ${hop}: a write completed with status 0x${c.status.toString(16)}`);
        reaped++;
      }
    }
    if (reaped < outstanding) {
      if (Date.now() > deadline) throw new Error(`hop ${hop}: ${reaped} of ${outstanding} writes completed`);
      await host.sync();
    }
  }
  host.takeInterrupts();
  await source.mmh.resetSecondary(source.cntlid, RESOURCES);
  const suspendMs = t1 - t0;
  const stateOutMs = t2 - t1;
  const stateInMs = t5 - t4;
  const resumeMs = t6 - t5;
  return {
    outstandingAtSuspend: outstanding - completedBefore,
    unfetched: outstanding - completedBySuspend,
    suspendMs,
    stateOutMs,
    stateInMs,
    resumeMs,
    deviceMs: suspendMs + stateOutMs + stateInMs + resumeMs,
    moveMs: t3 - t2,
    targetSuspendMs: t4 - t3,
    wallMs: t6 - t0,
    stateBytes: state.bytes.length,
    receiveCommands: state.commands,
    setCommands,
  };
}

/** One pair of `serve` processes managed through `via`; `reps` hops (after one not counted) per depth, alternating A→B→A. */
async function deviceFigures(via: DevicePath, fua: boolean, reps: number): Promise<DeviceDepth[]> {
  const pair = await startPair({ managementHost: via === 'primary', ...(CACHE ? { cache: CACHE } : {}) });
  try {
    const guest = await pair.startGuest(seededRandom(1));
    // The pair's Workload stays frozen (it would reap on interrupts): the hops submit and reap their own WRITEs.
    guest.workload.freeze();
    const buffer = guest.host.alloc(128 * WRITE_BYTES);
    const servers = [pair.a, pair.b] as const;
    let hop = 0;
    // First-run costs (code paths not yet optimized, first connections) out of the figures: `migrate` too reads a state once ahead.
    for (; hop < WARMUP_HOPS; hop++) await deviceHop(guest, servers[hop % 2]!, servers[(hop + 1) % 2]!, 1, fua, buffer, hop);
    const depths: DeviceDepth[] = [];
    for (const outstanding of DEPTHS) {
      const hops: DeviceHop[] = [];
      for (let rep = -1; rep < reps; rep++, hop++) {
        const result = await deviceHop(guest, servers[hop % 2]!, servers[(hop + 1) % 2]!, outstanding, fua, buffer, hop);
        if (rep >= 0) hops.push(result);
      }
      const column = <K extends keyof DeviceHop>(k: K): DeviceHop[K][] => hops.map((h) => h[k]);
      depths.push({
        outstanding,
        outstandingAtSuspend: column('outstandingAtSuspend'),
        unfetched: column('unfetched'),
        suspendMs: column('suspendMs'),
        stateOutMs: column('stateOutMs'),
        stateInMs: column('stateInMs'),
        resumeMs: column('resumeMs'),
        deviceMs: column('deviceMs'),
        moveMs: column('moveMs'),
        targetSuspendMs: column('targetSuspendMs'),
        wallMs: column('wallMs'),
        stateBytes: hops.at(-1)!.stateBytes,
        receiveCommands: hops.at(-1)!.receiveCommands,
        setCommands: hops.at(-1)!.setCommands,
      });
      const d = depths.at(-1)!;
      console.error(
        `[bench migration] device via ${via}, ${outstanding} ${fua ? 'FUA ' : ''}writes submitted (${median(d.outstandingAtSuspend)} outstanding at suspend): ` +
          `suspend ${median(d.suspendMs).toFixed(2)} + out ${median(d.stateOutMs).toFixed(2)} + in ${median(d.stateInMs).toFixed(2)} + resume ${median(d.resumeMs).toFixed(2)} = ${median(d.deviceMs).toFixed(2)} ms (median), state ${d.stateBytes} bytes`,
      );
    }
    return depths;
  } finally {
    await pair.close();
  }
}

const range = (xs: number[], digits = 2): string => `${median(xs).toFixed(digits)} (${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)})`;

/** The device section of migration.md: from `## Device` to the line before `## VM`. */
function deviceSection(figures: DeviceFigures): string {
  const row = (fua: boolean, d: DeviceDepth): string => {
    const at = d.outstandingAtSuspend;
    const unfetched = Math.max(...d.unfetched) > 0 ? `; up to ${Math.max(...d.unfetched)} not yet fetched` : '';
    return (
      `| ${d.outstanding} | ${fua ? 'FUA' : 'write-back'} | ${median(at)} (${Math.min(...at)}–${Math.max(...at)})${unfetched} | ${range(d.suspendMs)} | ${range(d.stateOutMs)} | ${range(d.stateInMs)} | ${range(d.resumeMs)} | ` +
      `**${range(d.deviceMs)}** | ${range(d.targetSuspendMs)} | ${range(d.moveMs)} | ${range(d.wallMs)} | ${d.stateBytes} (${d.receiveCommands} / ${d.setCommands}) |`
    );
  };
  const table = (via: DevicePath): string[] => {
    const series = figures.paths.filter((p) => p.via === via);
    return [
      via === 'control' ? 'Through the control socket (what `nvme-vfio-user migrate` uses):' : "Through the exported primary's admin queue (a management host on the primary's socket):",
      '',
      '| 4 KiB WRITEs submitted | writes | outstanding at suspend, median (min–max) | suspend | state out | state in | resume | **device total** | target suspend (ahead) | guest move (QEMU\'s) | suspend → resume, wall | state bytes (Receive / Set commands) |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|',
      ...DEPTHS.flatMap((n) => series.map((p) => row(p.fua, p.depths.find((d) => d.outstanding === n)!))),
      '',
    ];
  };
  return [
    '## Device: suspend → state out → state in → resume, between two server processes',
    '',
    `Measured ${figures.when}, ${figures.reps} hops per depth (after ${WARMUP_HOPS} not counted on each fresh pair and one at each depth), alternating A→B→A between two \`serve --secondaries 2\` processes ` +
      `(test/support/migration-pair.ts); backing file in ${figures.backing}. The guest (an NvmeHost with shadow doorbells) submits that many 4 KiB WRITEs on ` +
      `${WRITE_QUEUES} queues, waits one round trip (the server fetches in the turn that brings a doorbell, so they are fetched and on its threadpool) and submits the suspend. ` +
      '"Outstanding at suspend" counts the writes not completed in its CQs at that moment: the suspend waits for all of them. Write-back writes are page-cache copies ' +
      '(tens of µs each on the threadpool: how many are still running when the suspend arrives varies from hop to hop); FUA writes are each made durable (an fdatasync) before they complete, so they are all still running.',
    '',
    'Times in ms, median (min–max), as the orchestrator sees them: suspend (Migration Send) on the source, state out ' +
      `(Migration Receive in ${STATE_CHUNK >> 10} KiB chunks, as \`migrate\` does), state in (Set Controller State on the target), resume on the target. ` +
      '**Device total** is their sum: the device part of the downtime. Not in it: the target\'s suspend (`migrate` does it ahead of the switchover, while the target is idle) ' +
      'and the guest\'s move to the target socket (QEMU\'s job in a real VM); "wall" is suspend submitted → resume completed with both.',
    '',
    ...[...new Set(figures.paths.map((p) => p.via))].flatMap(table),
  ].join('\n');
}

// ---- 2. the VM ---------------------------------------------------------------------------------------

interface VmMigration {
  device: 'ours' | 'virtio-blk';
  totalMs: number;
  downtimeMs: number;
  /** QEMU's own figure: its RAM switchover alone. */
  qemuDowntimeMs: number | null;
  /** Ours: when each switchover step ended, ms after the source stopped. */
  switchover?: Record<string, number>;
}

const stamp = (e: { timestamp: { seconds: number; microseconds: number } }): number => e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;

async function oursOnce(dir: string, rep: number): Promise<VmMigration> {
  const disk = path.join(dir, `ours-${rep}.img`);
  const a = await side(dir, 'a', 1, disk, [], undefined, CACHE);
  const b = await side(dir, 'b', 2, disk, [], undefined, CACHE);
  const marker = `NVU-BENCH-${rep}`;
  const script = workload(marker);
  const vm = await Vm.start({ name: 'bench-ours-a', script, vfioUserSockets: [a.socket], memMiB: 384 });
  let target: Vm | undefined;
  try {
    await vm.waitForLine(/^round\.0=/, 300_000);
    await new Promise((r) => setTimeout(r, 2000));
    target = await Vm.start({ name: 'bench-ours-b', script, vfioUserSockets: [b.socket], memMiB: 384, incoming: true });
    const port = await freePort();
    const run = await runCli(
      ['migrate', '--source-qmp', `unix:${vm.qmpPath}`, '--source-control', a.control, '--target-qmp', `unix:${target.qmpPath}`, '--target-control', b.control, '--uri', `tcp:127.0.0.1:${port}`, '--json', ...(DOWNTIME_LIMIT !== undefined ? ['--downtime-limit', String(DOWNTIME_LIMIT)] : [])],
      { timeoutMs: 300_000 },
    );
    if (run.code !== 0) throw new Error(`migrate failed: ${run.stderr}`);
    const figures = JSON.parse(run.stdout) as { totalMs: number; vmDowntimeMs: number; qemuDowntimeMs: number | null; switchover: Record<string, number> };
    await target.waitForLine(/^round\.\d+=0,/, 300_000, target.lines.length);
    return { device: 'ours', totalMs: figures.totalMs, downtimeMs: figures.vmDowntimeMs, qemuDowntimeMs: figures.qemuDowntimeMs, switchover: figures.switchover };
  } finally {
    stopWorkload(disk, marker);
    await vm.kill();
    await target?.kill();
    await a.server.stop();
    await b.server.stop();
  }
}

async function virtioOnce(dir: string, rep: number): Promise<VmMigration> {
  const disk = path.join(dir, `virtio-${rep}.img`);
  fs.writeFileSync(disk, '');
  fs.truncateSync(disk, DISK_MIB << 20);
  const drive = ['-drive', `file=${disk},if=none,id=d0,format=raw,cache=none`, '-device', 'virtio-blk-pci,drive=d0'];
  const marker = `NVU-BENCH-V${rep}`;
  const script = workload(marker, 'virtio');
  const vm = await Vm.start({ name: 'bench-virtio-a', script, memMiB: 384, extraQemuArgs: drive });
  let target: Vm | undefined;
  let source: QmpClient | undefined;
  let dest: QmpClient | undefined;
  try {
    await vm.waitForLine(/^round\.0=/, 300_000);
    await new Promise((r) => setTimeout(r, 2000));
    target = await Vm.start({ name: 'bench-virtio-b', script, memMiB: 384, incoming: true, extraQemuArgs: drive });
    source = await QmpClient.connect(`unix:${vm.qmpPath}`);
    dest = await QmpClient.connect(`unix:${target.qmpPath}`);
    const uri = `tcp:127.0.0.1:${await freePort()}`;
    const started = performance.now();
    await setMigrationCapabilities(source, { events: true });
    await setMigrationCapabilities(dest, { events: true });
    // As `migrate` does for ours.
    await setMigrationParameters(source, { 'max-bandwidth': UNLIMITED_BANDWIDTH, ...(DOWNTIME_LIMIT !== undefined ? { 'downtime-limit': DOWNTIME_LIMIT } : {}) });
    await migrateIncoming(dest, uri);
    const stopped = source.waitForEvent('STOP', undefined, 120_000);
    const cursor = await migrate(source, uri);
    await waitForMigrationStatus(source, 'completed', { since: cursor, timeoutMs: 120_000 });
    const resumed = dest.waitForEvent('RESUME', undefined, 120_000);
    await cont(dest);
    const downtimeMs = stamp(await resumed) - stamp(await stopped);
    const totalMs = performance.now() - started;
    const qemuDowntimeMs = (await queryMigrate(source)).downtimeMs ?? null;
    await target.waitForLine(/^round\.\d+=0,/, 300_000, target.lines.length);
    return { device: 'virtio-blk', totalMs, downtimeMs, qemuDowntimeMs };
  } finally {
    source?.close();
    dest?.close();
    stopWorkload(disk, marker);
    await vm.kill();
    await target?.kill();
  }
}

// ---- report ------------------------------------------------------------------------------------------

const out = values.out!;
// The VM part needs the QEMU harness: fail before the device part if it is missing.
if (!values['device-only']) ensureHarness();
useBuiltServer();
const deviceRun: DeviceFigures = { when: new Date().toISOString(), reps: DEVICE_REPS, backing: `${requireDiskTmpdir()}${CACHE ? `, namespaces cache=${CACHE}` : ''}`, paths: [] };
for (const via of DEVICE_PATHS) for (const fua of [false, true]) deviceRun.paths.push({ via, fua, depths: await deviceFigures(via, fua, DEVICE_REPS) });
fs.mkdirSync(path.dirname(out), { recursive: true });

if (values['device-only']) {
  // Only the device section of migration.md and the `device` key of migration.json: the VM part stays as its last run left it.
  const md = fs.existsSync(out) ? fs.readFileSync(out, 'utf8') : '';
  const a = md.indexOf('## Device');
  const b = md.indexOf('\n## VM', a);
  if (a < 0 || b < 0) throw new Error(`${out}: no "## Device" section followed by "## VM" to replace; run without --device-only`);
  const section = deviceSection(deviceRun);
  console.log(section);
  fs.writeFileSync(out, md.slice(0, a) + section.trimEnd() + '\n\n' + md.slice(b + 1));
  const jsonPath = out.replace(/\.md$/, '.json');
  const json = JSON.parse(fs.readFileSync(jsonPath, 'utf8')) as MigrationJson;
  fs.writeFileSync(jsonPath, JSON.stringify({ ...json, device: deviceRun }, null, 2));
  refreshCombinedReport(path.dirname(out));
  process.exit(0);
}

const dir = fs.mkdtempSync(path.join('/dev/shm', 'nvu-bench-mig-'));
try {
  const vms: VmMigration[] = [];
  for (let rep = 0; rep < REPS; rep++) {
    vms.push(await oursOnce(dir, rep));
    vms.push(await virtioOnce(dir, rep));
    console.error(`[bench migration] rep ${rep + 1}: ${vms.slice(-2).map((v) => `${v.device} total ${v.totalMs.toFixed(0)} ms downtime ${v.downtimeMs.toFixed(0)} ms`).join('; ')}`);
  }
  const of = (d: VmMigration['device'], key: 'totalMs' | 'downtimeMs'): number[] => vms.filter((v) => v.device === d).map((v) => v[key]);
  const md = [
    `# Live migration figures (${new Date().toISOString()}, ${REPS} repetitions, TCG guests, QEMU downtime-limit ${DOWNTIME_LIMIT ?? '300 (its default)'} ms, bandwidth unthrottled, our namespaces cache=${CACHE ?? 'writeback'})`,
    '',
    deviceSection(deviceRun).trimEnd(),
    '',
    '## VM: the same guest (384 MiB, 2 vCPUs, fio random writes with verification) migrated mid-I/O',
    '',
    'VM downtime: from the source\'s STOP event to the destination\'s RESUME. QEMU\'s own figure counts its RAM switchover alone.',
    '',
    '| device | total median (ms) | VM downtime median (ms) | VM downtime per run (ms) | QEMU RAM downtime per run (ms) |',
    '|---|---|---|---|---|',
    ...(['ours', 'virtio-blk'] as const).map(
      (d) =>
        `| ${d === 'ours' ? 'ours (nvme-vfio-user migrate)' : 'virtio-blk (QEMU alone)'} | ${median(of(d, 'totalMs')).toFixed(0)} | ${median(of(d, 'downtimeMs')).toFixed(0)} | ${of(d, 'downtimeMs').map((x) => x.toFixed(0)).join(' / ')} | ${vms.filter((v) => v.device === d).map((v) => v.qemuDowntimeMs ?? '?').join(' / ')} |`,
    ),
    '',
    'Our switchover, step by step (ms after the source stopped):',
    '',
    ...vms.filter((v) => v.switchover).map((v, i) => `- run ${i + 1}: ${Object.entries(v.switchover!).map(([step, ms]) => `${step} ${ms}`).join('; ')}`),
    '',
    `Downtime ratio ours / virtio-blk: ${(median(of('ours', 'downtimeMs')) / median(of('virtio-blk', 'downtimeMs'))).toFixed(2)}; total time ratio: ${(median(of('ours', 'totalMs')) / median(of('virtio-blk', 'totalMs'))).toFixed(2)}.`,
    '',
  ].join('\n');
  console.log(md);
  fs.writeFileSync(out, md);
  fs.writeFileSync(out.replace(/\.md$/, '.json'), JSON.stringify({ when: new Date().toISOString(), reps: REPS, downtimeLimitMs: DOWNTIME_LIMIT ?? null, device: deviceRun, vms } satisfies MigrationJson, null, 2));
  // The combined report (latest.md / latest.json from fio-compare) gets these figures and a link.
  refreshCombinedReport(path.dirname(out));
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
