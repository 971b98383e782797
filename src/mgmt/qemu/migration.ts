// Thin typed wrappers for the QMP commands a live-migration orchestrator sends to the source and
// target QEMU. Policy (what to do at pre-switchover, when to cancel) belongs to the caller.
//
// Commands whose events a caller will wait for return the event cursor taken just before they
// were sent: QEMU emits some events before the command's reply (MIGRATION "setup" before
// `migrate` returns, RESUME before `cont` returns), and waiting "from now" would miss them.
//
// Sequence seen on QEMU 11.1.3 (TCG, q35) with `events` and `pause-before-switchover` on, for a
// running source: setup, active, MIGRATION_PASS…, STOP, pre-switchover; after
// migrate-continue: device, completed (source status postmigrate). The target (started with
// `-incoming defer -S`) sees setup (on migrate-incoming), active, completed, and ends `paused` —
// or `prelaunch` when the source had never run. migrate_cancel at pre-switchover: cancelling,
// RESUME (when the source ran before), cancelled, and query-migrate's error-desc is "Switchover is
// interrupted"; the target reports failed ("load of migration failed: …") and, unless
// migrate-incoming had exit-on-error false, exits.

import { QmpEventTimeoutError, type EventCursor, type QmpClient, type QmpEvent } from './qmp.js';

export type MigrationStatus =
  | 'none'
  | 'setup'
  | 'cancelling'
  | 'cancelled'
  | 'active'
  | 'postcopy-device'
  | 'postcopy-active'
  | 'postcopy-paused'
  | 'postcopy-recover-setup'
  | 'postcopy-recover'
  | 'completed'
  | 'failed'
  | 'colo'
  | 'pre-switchover'
  | 'device'
  | 'wait-unplug';

/** Statuses a migration never leaves. */
const FINAL_STATUSES: ReadonlySet<MigrationStatus> = new Set(['completed', 'failed', 'cancelled']);

export type RunState =
  | 'debug'
  | 'inmigrate'
  | 'internal-error'
  | 'io-error'
  | 'paused'
  | 'postmigrate'
  | 'prelaunch'
  | 'finish-migrate'
  | 'restore-vm'
  | 'running'
  | 'save-vm'
  | 'shutdown'
  | 'suspended'
  | 'watchdog'
  | 'guest-panicked'
  | 'colo';

export interface VmStatus {
  status: RunState;
  running: boolean;
}

export interface MigrationRamStats {
  totalBytes: number;
  transferredBytes: number;
  remainingBytes: number;
  /** Pages sent as "all one byte value" (mostly zero pages). */
  duplicatePages: number;
  normalPages: number;
  normalBytes: number;
  dirtySyncCount: number;
  pageSize: number;
  mbps: number;
  dirtyPagesRate: number;
}

export interface MigrationInfo {
  status: MigrationStatus;
  totalTimeMs?: number;
  /** Only once completed. */
  downtimeMs?: number;
  expectedDowntimeMs?: number;
  setupTimeMs?: number;
  /** Why a migration failed or was cancelled, in QEMU's words. */
  errorDesc?: string;
  ram?: MigrationRamStats;
  /** query-migrate's whole answer, for fields not typed here. */
  raw: Record<string, unknown>;
}

/** Capabilities this project uses; any other QEMU capability name is accepted too. */
export type MigrationCapabilityName = 'events' | 'pause-before-switchover' | (string & {});

export class MigrationFailedError extends Error {
  constructor(
    readonly status: MigrationStatus,
    readonly awaited: readonly MigrationStatus[],
    readonly errorDesc: string | undefined,
  ) {
    super(`migration ended ${status} while waiting for ${awaited.join(' or ')}${errorDesc ? `: ${errorDesc}` : ''}`);
    this.name = 'MigrationFailedError';
  }
}

async function executeFromCursor(qmp: QmpClient, command: string, args?: Record<string, unknown>): Promise<EventCursor> {
  const cursor = qmp.eventCursor();
  await qmp.execute(command, args);
  return cursor;
}

export async function setMigrationCapabilities(
  qmp: QmpClient,
  capabilities: Partial<Record<MigrationCapabilityName, boolean>>,
): Promise<void> {
  await qmp.execute('migrate-set-capabilities', {
    capabilities: Object.entries(capabilities).map(([capability, state]) => ({ capability, state })),
  });
}

/** The migration parameters this project sets (QMP `MigrationParameters`, QEMU's units). */
export interface MigrationParameters {
  /** Bytes per second the RAM copy may use before switchover. */
  'max-bandwidth'?: number;
  /** The RAM switchover QEMU aims for, in ms: it iterates until the rest fits in it. */
  'downtime-limit'?: number;
}

/** QEMU's default max-bandwidth (128 MiB/s) throttles even a local copy; libvirt lifts it alike. */
export const UNLIMITED_BANDWIDTH = 2 ** 40;

export async function setMigrationParameters(qmp: QmpClient, parameters: MigrationParameters): Promise<void> {
  if (Object.keys(parameters).length > 0) await qmp.execute('migrate-set-parameters', { ...parameters });
}

/** Starts listening on a target QEMU started with `-incoming defer`. */
export function migrateIncoming(qmp: QmpClient, uri: string, options: { exitOnError?: boolean } = {}): Promise<EventCursor> {
  return executeFromCursor(qmp, 'migrate-incoming', {
    uri,
    ...(options.exitOnError !== undefined ? { 'exit-on-error': options.exitOnError } : {}),
  });
}

export function migrate(qmp: QmpClient, uri: string): Promise<EventCursor> {
  return executeFromCursor(qmp, 'migrate', { uri });
}

/** Lets a migration paused at `state` (pause-before-switchover) go on. */
export function migrateContinue(qmp: QmpClient, state: MigrationStatus = 'pre-switchover'): Promise<EventCursor> {
  return executeFromCursor(qmp, 'migrate-continue', { state });
}

export function migrateCancel(qmp: QmpClient): Promise<EventCursor> {
  return executeFromCursor(qmp, 'migrate_cancel');
}

export function cont(qmp: QmpClient): Promise<EventCursor> {
  return executeFromCursor(qmp, 'cont');
}

export function stop(qmp: QmpClient): Promise<EventCursor> {
  return executeFromCursor(qmp, 'stop');
}

export function queryStatus(qmp: QmpClient): Promise<VmStatus> {
  return qmp.execute<VmStatus>('query-status');
}

export async function queryMigrate(qmp: QmpClient): Promise<MigrationInfo> {
  const raw = await qmp.execute<Record<string, unknown>>('query-migrate');
  const number = (source: Record<string, unknown> | undefined, key: string): number | undefined =>
    typeof source?.[key] === 'number' ? source[key] : undefined;
  const ramRaw = raw.ram as Record<string, unknown> | undefined;
  const info: MigrationInfo = {
    status: (raw.status as MigrationStatus | undefined) ?? 'none',
    totalTimeMs: number(raw, 'total-time'),
    downtimeMs: number(raw, 'downtime'),
    expectedDowntimeMs: number(raw, 'expected-downtime'),
    setupTimeMs: number(raw, 'setup-time'),
    errorDesc: typeof raw['error-desc'] === 'string' ? raw['error-desc'] : undefined,
    raw,
  };
  if (ramRaw) {
    info.ram = {
      totalBytes: number(ramRaw, 'total') ?? 0,
      transferredBytes: number(ramRaw, 'transferred') ?? 0,
      remainingBytes: number(ramRaw, 'remaining') ?? 0,
      duplicatePages: number(ramRaw, 'duplicate') ?? 0,
      normalPages: number(ramRaw, 'normal') ?? 0,
      normalBytes: number(ramRaw, 'normal-bytes') ?? 0,
      dirtySyncCount: number(ramRaw, 'dirty-sync-count') ?? 0,
      pageSize: number(ramRaw, 'page-size') ?? 0,
      mbps: number(ramRaw, 'mbps') ?? 0,
      dirtyPagesRate: number(ramRaw, 'dirty-pages-rate') ?? 0,
    };
  }
  return info;
}

export interface WaitForMigrationOptions {
  /** Look back to this cursor (what migrate()/migrateContinue()/… returned); default: from now. */
  since?: EventCursor;
  timeoutMs?: number;
}

/**
 * Resolves with the status of the first MIGRATION event in `awaited`; rejects with
 * MigrationFailedError (with QEMU's error-desc) if the migration ends in another final status
 * first. Needs the `events` capability on.
 */
export async function waitForMigrationStatus(
  qmp: QmpClient,
  awaited: MigrationStatus | readonly MigrationStatus[],
  options: WaitForMigrationOptions = {},
): Promise<MigrationStatus> {
  const wanted: readonly MigrationStatus[] = typeof awaited === 'string' ? [awaited] : awaited;
  const timeoutMs = options.timeoutMs ?? 30_000;
  const statusOf = (data: Record<string, unknown>): MigrationStatus => data.status as MigrationStatus;
  let event: QmpEvent;
  try {
    event = await qmp.waitForEvent(
      'MIGRATION',
      (e) => wanted.includes(statusOf(e.data)) || FINAL_STATUSES.has(statusOf(e.data)),
      timeoutMs,
      options.since !== undefined ? { since: options.since } : {},
    );
  } catch (error) {
    if (!(error instanceof QmpEventTimeoutError)) throw error;
    const now = await queryMigrate(qmp);
    throw new Error(`migration did not reach ${wanted.join(' or ')} within ${timeoutMs} ms (query-migrate says ${now.status}; is the events capability on?)`);
  }
  const status = statusOf(event.data);
  if (wanted.includes(status)) return status;
  throw new MigrationFailedError(status, wanted, (await queryMigrate(qmp)).errorDesc);
}
