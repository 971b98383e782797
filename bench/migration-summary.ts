// The live-migration part of the combined report (bench/results/latest.md and latest.json): a
// summary of bench/results/migration.json with a link to migration.md. fio-compare writes it from
// whatever migration.json holds (marked with that run's date); bench/migration.ts rewrites it when
// it finishes, so after `npm run bench` both halves come from the same run.

import * as fs from 'node:fs';
import * as path from 'node:path';

export const BEGIN = '<!-- migration:begin -->';
export const END = '<!-- migration:end -->';

export interface MigrationJson {
  when?: string;
  reps?: number;
  downtimeLimitMs?: number | null;
  device: Record<string, { quiesceMs: number[]; stateBytes: number; inFlight: number[] }>;
  vms: Array<{ device: 'ours' | 'virtio-blk'; totalMs: number; downtimeMs: number; qemuDowntimeMs: number | null }>;
}

const median = (xs: number[]): number | undefined => (xs.length ? [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] : undefined);
const f = (x: number | undefined, d = 0): string => (x === undefined ? 'n/a' : x.toFixed(d));

export interface MigrationSummary {
  when?: string;
  device: Array<{ outstanding: number; runningAtSuspend?: number; quiesceMedianMs?: number; quiesceMaxMs?: number; stateBytes: number }>;
  vm: Array<{ device: string; runs: number; totalMedianMs?: number; downtimeMedianMs?: number; downtimeMs: number[] }>;
}

export function summarizeMigration(j: MigrationJson): MigrationSummary {
  return {
    when: j.when,
    device: Object.entries(j.device)
      .map(([n, d]) => ({
        outstanding: Number(n),
        runningAtSuspend: median(d.inFlight),
        quiesceMedianMs: median(d.quiesceMs),
        quiesceMaxMs: d.quiesceMs.length ? Math.max(...d.quiesceMs) : undefined,
        stateBytes: d.stateBytes,
      }))
      .sort((a, b) => a.outstanding - b.outstanding),
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
    'Device (in process, through the primary\'s Migration Send/Receive, /dev/shm file namespace): time for a secondary to suspend (finish every fetched command) and the size of its state.',
    '',
    '| commands outstanding | running at suspend | quiesce median ms | quiesce max ms | state bytes |',
    '|---|---|---|---|---|',
    ...s.device.map((d) => `| ${d.outstanding} | ${f(d.runningAtSuspend)} | ${f(d.quiesceMedianMs, 2)} | ${f(d.quiesceMaxMs, 2)} | ${d.stateBytes} |`),
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
