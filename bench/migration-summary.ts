// The live-migration part of the combined report (bench/results/latest.md and latest.json): a
// summary of bench/results/migration.json with a link to migration.md. fio-compare writes it from
// whatever migration.json holds (marked with that run's date); bench/migration.ts rewrites it when
// it finishes, so after `npm run bench` both halves come from the same run.

import * as fs from 'node:fs';
import * as path from 'node:path';

export const BEGIN = '<!-- migration:begin -->';
export const END = '<!-- migration:end -->';

/** Depths of the device part: commands outstanding when the source is suspended. */
export const DEPTHS = [1, 32, 128] as const;

/** How the device part's admin commands reach a primary. */
export type DevicePath = 'control' | 'primary';

/** One hop of the device part (bench/migration.ts); times in ms. */
export interface DeviceHop {
  /** WRITEs fetched but not completed in the guest's CQs when the suspend was submitted. */
  outstandingAtSuspend: number;
  /** WRITEs still in an SQ after the suspend (never fetched): they run on the target. */
  unfetched: number;
  suspendMs: number;
  stateOutMs: number;
  stateInMs: number;
  resumeMs: number;
  /** suspend + state out + state in + resume: the device part of the downtime. */
  deviceMs: number;
  /** The guest's move to the target socket (QEMU's job in a VM), and the target's suspend (done ahead by `migrate`). */
  moveMs: number;
  targetSuspendMs: number;
  /** Suspend submitted → resume completed, the move and the target's suspend included. */
  wallMs: number;
  stateBytes: number;
  receiveCommands: number;
  setCommands: number;
}

type Numeric = { [K in keyof DeviceHop]: DeviceHop[K] extends number ? K : never }[keyof DeviceHop];
type PerHop = Exclude<Numeric, 'stateBytes' | 'receiveCommands' | 'setCommands'>;

/** Every hop's figures at one depth, column by column; the state's size and commands of the last. */
export type DeviceDepth = { outstanding: number; stateBytes: number; receiveCommands: number; setCommands: number } & { [K in PerHop]: number[] };

export interface DeviceFigures {
  when: string;
  /** Hops per depth. */
  reps: number;
  /** The backing file's directory and file system. */
  backing: string;
  /** Per manager path, plain writes (write-back: page-cache copies) and FUA writes (each an fdatasync). */
  paths: Array<{ via: DevicePath; fua: boolean; depths: DeviceDepth[] }>;
}

export interface MigrationJson {
  /** The VM part's run (the device part has its own date). */
  when?: string;
  reps?: number;
  downtimeLimitMs?: number | null;
  device: DeviceFigures;
  vms: Array<{ device: 'ours' | 'virtio-blk'; totalMs: number; downtimeMs: number; qemuDowntimeMs: number | null }>;
}

const median = (xs: number[]): number | undefined => (xs.length ? [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] : undefined);
const f = (x: number | undefined, d = 0): string => (x === undefined ? 'n/a' : x.toFixed(d));

export interface MigrationSummary {
  when?: string;
  deviceWhen?: string;
  /** Through the control socket, as `nvme-vfio-user migrate`; write-back and FUA writes. */
  device: Array<{ outstanding: number; fua: boolean; outstandingAtSuspend?: number; suspendMedianMs?: number; stateOutMedianMs?: number; stateInMedianMs?: number; resumeMedianMs?: number; deviceMedianMs?: number; deviceMaxMs?: number; stateBytes: number }>;
  vm: Array<{ device: string; runs: number; totalMedianMs?: number; downtimeMedianMs?: number; downtimeMs: number[] }>;
}

export function summarizeMigration(j: MigrationJson): MigrationSummary {
  // A migration.json from before the device part moved between two processes has no `paths`.
  const control = (j.device?.paths ?? []).filter((p) => p.via === 'control').flatMap((p) => p.depths.map((d) => ({ ...d, fua: p.fua })));
  return {
    when: j.when,
    deviceWhen: j.device?.when,
    device: control.sort((a, b) => a.outstanding - b.outstanding || Number(a.fua) - Number(b.fua)).map((d) => ({
      outstanding: d.outstanding,
      fua: d.fua,
      outstandingAtSuspend: median(d.outstandingAtSuspend),
      suspendMedianMs: median(d.suspendMs),
      stateOutMedianMs: median(d.stateOutMs),
      stateInMedianMs: median(d.stateInMs),
      resumeMedianMs: median(d.resumeMs),
      deviceMedianMs: median(d.deviceMs),
      deviceMaxMs: d.deviceMs.length ? Math.max(...d.deviceMs) : undefined,
      stateBytes: d.stateBytes,
    })),
    vm: (['ours', 'virtio-blk'] as const).map((device) => {
      const runs = j.vms.filter((v) => v.device === device);
      return {
        device,
        runs: runs.length,
        totalMedianMs: median(runs.map((v) => v.totalMs)),
        downtimeMedianMs: median(runs.map((v) => v.downtimeMs)),
        downtimeMs: runs.map((v) => Math.round(v.downtimeMs)),
      };
    }),
  };
}

export function readMigrationJson(resultsDir: string): MigrationJson | undefined {
  try {
    return JSON.parse(fs.readFileSync(path.join(resultsDir, 'migration.json'), 'utf8')) as MigrationJson;
  } catch {
    return undefined;
  }
}

/** The section, between its markers. `fresh`: measured in the same `npm run bench` as the fio tables. */
export function migrationSection(j: MigrationJson | undefined, fresh: boolean): string {
  const head = ['## Live migration', ''];
  if (!j) {
    return [BEGIN, ...head, 'No migration figures yet: `npx tsx bench/migration.ts` (run by `npm run bench` after this) writes [migration.md](migration.md) and fills this in.', END].join('\n');
  }
  const s = summarizeMigration(j);
  const ours = s.vm.find((v) => v.device === 'ours');
  const virtio = s.vm.find((v) => v.device === 'virtio-blk');
  const when = s.when ? `run of ${s.when}` : 'an earlier run (date not recorded)';
  return [
    BEGIN,
    ...head,
    `From \`bench/migration.ts\`, ${when}${fresh ? '' : ' — **not measured with the fio tables above**; `npm run bench` runs both'}. ` +
      'Full tables, every run and our switchover step by step: [migration.md](migration.md) (raw: [migration.json](migration.json)).',
    '',
    `Device part of the downtime (${s.deviceWhen ? `run of ${s.deviceWhen}` : 'date not recorded'}; two \`serve\` processes, through the control socket as \`nvme-vfio-user migrate\`; 4 KiB WRITEs on a disk-backed file namespace, FUA ones still running at the suspend): medians in ms.`,
    '',
    '| 4 KiB writes submitted | writes | outstanding at suspend | suspend | state out | state in | resume | device total | device total max | state bytes |',
    '|---|---|---|---|---|---|---|---|---|---|',
    ...s.device.map((d) => `| ${d.outstanding} | ${d.fua ? 'FUA' : 'write-back'} | ${f(d.outstandingAtSuspend)} | ${f(d.suspendMedianMs, 2)} | ${f(d.stateOutMedianMs, 2)} | ${f(d.stateInMedianMs, 2)} | ${f(d.resumeMedianMs, 2)} | ${f(d.deviceMedianMs, 2)} | ${f(d.deviceMaxMs, 2)} | ${d.stateBytes} |`),
    '',
    'VM (TCG guest running verified random writes, migrated mid-I/O; downtime = source STOP → destination RESUME):',
    '',
    '| device | runs | total median ms | VM downtime median ms | downtime per run ms |',
    '|---|---|---|---|---|',
    ...s.vm.map((v) => `| ${v.device === 'ours' ? 'ours (`nvme-vfio-user migrate`)' : 'virtio-blk (QEMU alone)'} | ${v.runs} | ${f(v.totalMedianMs)} | ${f(v.downtimeMedianMs)} | ${v.downtimeMs.join(' / ')} |`),
    '',
    `Downtime ours / virtio-blk: ${ours?.downtimeMedianMs && virtio?.downtimeMedianMs ? (ours.downtimeMedianMs / virtio.downtimeMedianMs).toFixed(2) : 'n/a'} (QEMU's own nvme cannot migrate at all: "unmigratable").`,
    END,
  ].join('\n');
}

/**
 * Rewrites the migration section of latest.md and the `migration` key of latest.json beside it,
 * when they exist (bench/migration.ts calls this after writing migration.json).
 */
export function refreshCombinedReport(resultsDir: string): void {
  const j = readMigrationJson(resultsDir);
  const md = path.join(resultsDir, 'latest.md');
  if (fs.existsSync(md)) {
    const text = fs.readFileSync(md, 'utf8');
    const a = text.indexOf(BEGIN);
    const b = text.indexOf(END);
    const section = migrationSection(j, true);
    fs.writeFileSync(md, a >= 0 && b > a ? text.slice(0, a) + section + text.slice(b + END.length) : `${text.trimEnd()}\n\n${section}\n`);
  }
  const json = path.join(resultsDir, 'latest.json');
  if (fs.existsSync(json) && j) {
    const doc = JSON.parse(fs.readFileSync(json, 'utf8')) as Record<string, unknown>;
    doc.migration = summarizeMigration(j);
    fs.writeFileSync(json, JSON.stringify(doc, null, 2) + '\n');
  }
}
