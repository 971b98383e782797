// `npx tsx bench/migration.ts`: what a live migration costs, measured here.
//
// 1. The device part: how long a secondary takes to suspend (finish every fetched command, go
//    silent) and how big its state is, with 1, 32 and 128 commands outstanding — in process,
//    through the primary's own Migration Send/Receive, on a /dev/shm file namespace.
// 2. The VM part: total time and VM downtime (the source's STOP event to the destination's RESUME)
//    of the same guest running verified writes, once on our device moved by `nvme-vfio-user
//    migrate`, once on QEMU's virtio-blk over the same kind of shared image moved by QEMU alone,
//    interleaved, in one run.
// Results: stdout and bench/results/migration.md (and .json).

import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { buildCommand } from '../src/nvme/command.js';
import { FileBackend } from '../src/nvme/backend.js';
import { Namespace } from '../src/nvme/namespace.js';
import { NvmOpcode, PrimaryOpcode, VirtAction, VirtResource } from '../src/nvme/spec.js';
import { Subsystem } from '../src/nvme/subsystem.js';
import { silentLogger } from '../src/log.js';
import { ControllingFunction } from '../src/nvme/virt/controlling-function.js';
import { liveMigrationFor } from '../src/lm/primary.js';
import { receiveState } from '../src/lm/state-transfer.js';
import { QmpClient } from '../src/mgmt/qemu/qmp.js';
import { cont, migrate, migrateIncoming, queryMigrate, setMigrationCapabilities, setMigrationParameters, UNLIMITED_BANDWIDTH, waitForMigrationStatus } from '../src/mgmt/qemu/migration.js';
import { TestHost, DATA, PAGE } from '../test/unit/nvme/helpers.js';
import { ensureHarness } from '../test/e2e/guest.js';
import { Vm } from '../test/e2e/vm.js';
import { DISK_MIB, freePort, side, stopWorkload, workload } from '../test/e2e/migration-scenario.js';
import { runCli } from '../test/support/cli.js';
import { refreshCombinedReport } from './migration-summary.js';

const REPO = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const { values } = parseArgs({ options: { reps: { type: 'string', default: '3' }, 'downtime-limit': { type: 'string' }, out: { type: 'string', default: path.join(REPO, 'bench', 'results', 'migration.md') } } });
const REPS = Number(values.reps);
/** QEMU's downtime-limit for both devices' migrations (ms); QEMU's default (300) unless given. */
const DOWNTIME_LIMIT = values['downtime-limit'] !== undefined ? Number(values['downtime-limit']) : undefined;

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

// ---- 1. the device ---------------------------------------------------------------------------------

async function deviceFigures(outstanding: number): Promise<{ quiesceMs: number[]; stateBytes: number; inFlight: number[] }> {
  const file = path.join('/dev/shm', `nvu-bench-mig-${process.pid}.img`);
  const backend = await FileBackend.open(file, { size: 64 << 20 });
  const subsystem = new Subsystem({ nqn: 'nqn.2026-11.bench:mig' });
  subsystem.addNamespace(new Namespace({ nsid: 1, backend }));
  const cf = new ControllingFunction({ subsystem, secondaries: 1, ioQueues: 4, queueEntries: 1024, logger: silentLogger, extraCommandSets: (f) => liveMigrationFor(f).commandSets });
  cf.virtualization.manage(VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, 1, 5);
  cf.virtualization.manage(VirtAction.SECONDARY_ASSIGN, VirtResource.INTERRUPT, 1, 5);
  cf.virtualization.manage(VirtAction.SECONDARY_ONLINE, 0, 1, 0);
  const guest = new TestHost({ use: cf.controller(1)! }).start();
  await guest.createIoQueuePair(1, 256);
  const quiesceMs: number[] = [];
  const inFlight: number[] = [];
  let stateBytes = 0;
  const secondary = cf.controller(1)!;
  const admin = async (fields: Parameters<typeof buildCommand>[0], data?: Uint8Array) => {
    const r = await cf.primary.executeAdmin(buildCommand(fields), data);
    if (r.status !== 0) throw new Error(`admin 0x${fields.opcode.toString(16)}: status 0x${r.status.toString(16)}`);
    return { dw0: r.dw0, data: r.data ?? new Uint8Array(0) };
  };
  for (let rep = 0; rep < REPS * 3; rep++) {
    for (let i = 0; i < outstanding; i++) guest.place(1, buildCommand({ opcode: NvmOpcode.READ, nsid: 1, prp1: DATA + (i % 64) * PAGE, cdw10: i * 8, cdw12: 7 }));
    guest.ringSq(1);
    // Suspend once they are fetched and running (their reads are on the threadpool), not before.
    for (let turn = 0; turn < 10_000 && secondary.queues.commandsRunning < outstanding; turn++) await Promise.resolve();
    inFlight.push(secondary.queues.commandsRunning);
    const t0 = performance.now();
    await admin({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: 0, cdw11: (1 << 16) | 1 });
    quiesceMs.push(performance.now() - t0);
    stateBytes = (await receiveState(admin, 1)).bytes.length;
    await admin({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: 1, cdw11: 1 });
    for (let i = 0; i < outstanding; i++) await guest.reap(1);
  }
  cf.dispose();
  await backend.close();
  fs.rmSync(file, { force: true });
  return { quiesceMs, stateBytes, inFlight };
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
  const a = await side(dir, 'a', 1, disk, []);
  const b = await side(dir, 'b', 2, disk, []);
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

ensureHarness();
const dir = fs.mkdtempSync(path.join('/dev/shm', 'nvu-bench-mig-'));
try {
  const device: Record<number, { quiesceMs: number[]; stateBytes: number; inFlight: number[] }> = {};
  for (const n of [1, 32, 128]) {
    device[n] = await deviceFigures(n);
    console.error(`[bench migration] device, ${n} submitted (${median(device[n]!.inFlight)} running at suspend): quiesce median ${median(device[n]!.quiesceMs).toFixed(2)} ms, state ${device[n]!.stateBytes} bytes`);
  }
  const vms: VmMigration[] = [];
  for (let rep = 0; rep < REPS; rep++) {
    vms.push(await oursOnce(dir, rep));
    vms.push(await virtioOnce(dir, rep));
    console.error(`[bench migration] rep ${rep + 1}: ${vms.slice(-2).map((v) => `${v.device} total ${v.totalMs.toFixed(0)} ms downtime ${v.downtimeMs.toFixed(0)} ms`).join('; ')}`);
  }
  const of = (d: VmMigration['device'], key: 'totalMs' | 'downtimeMs'): number[] => vms.filter((v) => v.device === d).map((v) => v[key]);
  const md = [
    `# Live migration figures (${new Date().toISOString()}, ${REPS} repetitions, TCG guests, QEMU downtime-limit ${DOWNTIME_LIMIT ?? '300 (its default)'} ms, bandwidth unthrottled)`,
    '',
    '## Device: suspend (quiesce) time and controller state size, through the primary',
    '',
    '| commands submitted | running at suspend (median) | quiesce median (ms) | quiesce min–max (ms) | state bytes |',
    '|---|---|---|---|---|',
    ...[1, 32, 128].map(
      (n) =>
        `| ${n} | ${median(device[n]!.inFlight)} | ${median(device[n]!.quiesceMs).toFixed(2)} | ${Math.min(...device[n]!.quiesceMs).toFixed(2)}–${Math.max(...device[n]!.quiesceMs).toFixed(2)} | ${device[n]!.stateBytes} |`,
    ),
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
  fs.mkdirSync(path.dirname(values.out!), { recursive: true });
  fs.writeFileSync(values.out!, md);
  fs.writeFileSync(values.out!.replace(/\.md$/, '.json'), JSON.stringify({ when: new Date().toISOString(), reps: REPS, downtimeLimitMs: DOWNTIME_LIMIT ?? null, device, vms }, null, 2));
  // The combined report (latest.md / latest.json from fio-compare) gets these figures and a link.
  refreshCombinedReport(path.dirname(values.out!));
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
