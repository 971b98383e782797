// Two `serve --secondaries 2` processes made into a migration pair: a file namespace on the same
// backing file, the same virtual subsystem, and a secondary on each that presents itself as the
// same virtual controller (under different physical CNTLIDs). A guest (an NvmeHost with shadow
// doorbells, outstanding Asynchronous Event Requests and a Workload on five I/O queues) runs on
// one of them; the steps of a hop that do not depend on how the state moves live here too. No
// vitest here (bench/migration.ts drives a pair outside a test run): the assertions about an
// arrival are in migration-expect.ts.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ControlClient } from '../../src/mgmt/control/client.js';
import { MigrationHost } from './migration-host.js';
import { NvmeHost, type HostQueue } from './nvme-host.js';
import { pageOf, Workload, type WindowRecord } from './nvme-workload.js';
import { startServe, type Served } from './serve.js';
import type { FileCache } from '../../src/nvme/backend.js';

export const GUEST_RAM = { base: 0x10_0000, bytes: 16 << 20 };
const DISK_BYTES = 32 << 20;
const BLOCK_SIZE = 512;
export const IO_QUEUES = 5;
const QUEUE_ENTRIES = 64;
export const DEPTH = 32;
/** The queue whose completions the host leaves alone in a window: its small CQ fills, the controller holds the rest. */
export const STALLED_QUEUE = 5;
export const STALLED_CQ_ENTRIES = 16;
/** Vector 0 for the admin queue, one per I/O queue. */
const VECTORS = IO_QUEUES + 1;
export const RESOURCES = { queues: IO_QUEUES + 1, interrupts: VECTORS };
const VIRTUAL_NQN = 'nqn.2026-11.io.example:lm-integration';
const VIRTUAL_CNTLID = 1;
const NSID = 1;

export interface MigrationServer {
  name: string;
  served: Served;
  control: ControlClient;
  /** Whoever manages migration on this server: the primary's own host, or the control socket. */
  mmh: MigrationHost;
  /** The host attached to the exported primary, when there is one (its memory holds Controller Data Queues). */
  management: NvmeHost | null;
  /** The physical CNTLID of the secondary that migrates. */
  cntlid: number;
  /** Where that secondary is exported. */
  socket: string;
  stop(): Promise<void>;
}

interface ServerOptions {
  dir: string;
  name: string;
  cntlid: number;
  disk: string;
  /** Export the primary and manage migration through its admin queue (else through the control socket). */
  managementHost: boolean;
  /** The namespace's cache= (absent: the server's default, writeback). */
  cache?: FileCache;
}

export interface MigrationPair {
  /** The secondary is virtual controller 1 on both: CNTLID 1 on A, CNTLID 2 on B. */
  a: MigrationServer;
  b: MigrationServer;
  /** The backing file both servers' namespace uses. */
  disk: string;
  /** A guest on A's secondary (the pair closes it). */
  startGuest(random: () => number): Promise<Guest>;
  close(): Promise<void>;
}

/** Both servers of a pair, provisioned, in a fresh directory. */
export async function startPair(options: { managementHost: boolean; cache?: FileCache }): Promise<MigrationPair> {
  const dir = mkdtempSync(join(tmpdir(), 'nvu-lm-'));
  const disk = join(dir, 'disk.img');
  const servers: MigrationServer[] = [];
  const guests: Guest[] = [];
  const close = async (): Promise<void> => {
    for (const guest of guests.splice(0)) guest.host.close();
    const stopping = servers.splice(0).map((s) => s.stop());
    try {
      await Promise.all(stopping);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };
  try {
    for (const [name, cntlid] of [['A', 1], ['B', 2]] as const) servers.push(await startMigrationServer({ dir, name, cntlid, disk, managementHost: options.managementHost, ...(options.cache ? { cache: options.cache } : {}) }));
  } catch (error) {
    await close();
    throw error;
  }
  const [a, b] = servers as [MigrationServer, MigrationServer];
  return {
    a,
    b,
    disk,
    async startGuest(random) {
      const guest = await startGuest(a, random);
      guests.push(guest);
      return guest;
    },
    close,
  };
}

async function startMigrationServer(options: ServerOptions): Promise<MigrationServer> {
  const { dir, name, cntlid } = options;
  const controlPath = join(dir, `${name}-control.sock`);
  const primarySocket = join(dir, `${name}-primary.sock`);
  const socket = join(dir, `${name}-secondary${cntlid}.sock`);
  const args = ['--secondaries', '2', '--io-queues', String(IO_QUEUES), '--control', controlPath, '--namespace', `file=${options.disk},size=${DISK_BYTES}${options.cache ? `,cache=${options.cache}` : ''}`];
  if (options.managementHost) args.push('--primary-socket', primarySocket);
  args.push('--log-level', process.env.TEST_LOG ? 'debug' : 'warn');
  const served = await startServe(args, `control on ${controlPath}`);
  let control: ControlClient | null = null;
  let management: NvmeHost | null = null;
  try {
    control = await ControlClient.connect({ path: controlPath });
    if (options.managementHost) {
      // The primary's host enables it first: secondaries go online only under an enabled primary.
      management = await NvmeHost.attach(primarySocket, { ramBytes: 4 << 20 });
      await management.enable();
    }
    const mmh = management ? MigrationHost.overAdminQueue(management) : MigrationHost.overControlSocket(control);
    await mmh.createVirtualSubsystem({ nqn: VIRTUAL_NQN });
    await mmh.addToVirtualSubsystem(VIRTUAL_NQN, cntlid, VIRTUAL_CNTLID);
    await mmh.bringOnline(cntlid, RESOURCES);
    const exported = await control.request({ export: { cntlid, socket } });
    if (exported.error) throw new Error(`export of controller ${cntlid}: ${exported.error}`);
    const client = control;
    return {
      name,
      served,
      control: client,
      mmh,
      management,
      cntlid,
      socket,
      async stop() {
        management?.close();
        client.close();
        const code = await served.stop();
        if (code !== 0) throw new Error(`server ${name} exited with ${code}: ${served.log()}`);
        // Nothing in these runs deserves a warning (a fatal controller, a failed log entry write...).
        const complaints = served.log().split('\n').filter((line) => / (warn |error) /.test(line));
        if (complaints.length > 0) throw new Error(`server ${name} complained:\n${complaints.slice(0, 10).join('\n')}`);
      },
    };
  } catch (error) {
    management?.close();
    control?.close();
    await served.stop('SIGKILL');
    throw error;
  }
}

export interface Guest {
  host: NvmeHost;
  queues: HostQueue[];
  workload: Workload;
  /** CIDs of the Asynchronous Event Requests left outstanding on the admin queue. */
  asyncEventRequests: number[];
}

/** A guest on `server`'s secondary: admin queue, shadow doorbells, five I/O queues, two outstanding AERs. */
async function startGuest(server: MigrationServer, random: () => number): Promise<Guest> {
  const host = await NvmeHost.attach(server.socket, { ramBase: GUEST_RAM.base, ramBytes: GUEST_RAM.bytes, vectors: VECTORS });
  await host.enable(32);
  const shadow = await host.configureDoorbellBuffer();
  if (shadow.status !== 0) throw new Error(`Doorbell Buffer Config: status 0x${shadow.status.toString(16)}`);
  const queues: HostQueue[] = [];
  for (let qid = 1; qid <= IO_QUEUES; qid++) queues.push(await host.createIoQueuePair(qid, QUEUE_ENTRIES, qid === STALLED_QUEUE ? STALLED_CQ_ENTRIES : QUEUE_ENTRIES));
  const asyncEventRequests = [host.aer(), host.aer()];
  await host.sync();
  const workload = new Workload(host, queues, {
    nsid: NSID,
    blockSize: BLOCK_SIZE,
    blocks: DISK_BYTES / BLOCK_SIZE,
    depth: DEPTH,
    maxBlocks: 32,
    random,
  });
  return { host, queues, workload, asyncEventRequests };
}

/** Where a hop cuts the guest's I/O, and what the guest does around it. */
export interface Cut {
  /** Completions consumed in the window before the suspend (at least one: the controller has then surely fetched). */
  afterCompletions: number;
  /** Also wait until the stalled queue's CQ is full, so the controller holds completions at the suspend. */
  withFullCq: boolean;
  /** The guest goes on taking interrupts and submitting while its controller is suspended and moved. */
  guestKeepsRunning: boolean;
  /** Completions on the new controller before the guest drains. */
  thenCompletions: number;
}

/** Mostly mid-stream with the stalled CQ full; sometimes early, while the window's first commands still run. */
export function randomCut(random: () => number): Cut {
  const withFullCq = random() < 0.8;
  return {
    afterCompletions: 1 + Math.floor(random() * (withFullCq ? 600 : 30)),
    withFullCq,
    guestKeepsRunning: random() < 0.5,
    thenCompletions: Math.floor(random() * 300),
  };
}

/**
 * From a quiet guest: a new window (mark), full depth on every queue with the stalled queue's CQ
 * filling up, until the cut: then (unless the guest keeps running) its vCPUs stop.
 */
export async function runToCut(guest: Guest, cut: Cut, label: string): Promise<void> {
  const { workload } = guest;
  const stalled = guest.queues.find((q) => q.id === STALLED_QUEUE)!;
  workload.mark();
  workload.stall(STALLED_QUEUE);
  const start = workload.completions;
  workload.start();
  const full = (): boolean => !cut.withFullCq || stalled.posted() === stalled.cqSize - 1;
  await workload.until(() => workload.completions - start >= cut.afterCompletions && full(), 30_000, `${label}: the cut`);
  if (!cut.guestKeepsRunning) workload.freeze();
}

/**
 * On the new controller: the guest runs again, takes back the stalled queue, goes on for a while
 * and drains; then waits until the controller has seen every doorbell the guest wrote (each
 * EventIdx equals its shadow doorbell), so nothing is left for it to do.
 */
export async function finishOnTarget(guest: Guest, cut: Cut, label: string): Promise<void> {
  const { workload, host } = guest;
  workload.thaw();
  workload.unstall(STALLED_QUEUE);
  const start = workload.completions;
  await workload.until(() => workload.completions - start >= cut.thenCompletions, 30_000, `${label}: completions on the new controller`);
  await workload.drain(30_000, label);
  const deadline = Date.now() + 5000;
  for (;;) {
    await host.sync();
    const behind = guest.queues.filter(
      (q) =>
        host.doorbellBufferValue('eventIdx', q.id, false) !== host.doorbellBufferValue('shadow', q.id, false) ||
        host.doorbellBufferValue('eventIdx', q.id, true) !== host.doorbellBufferValue('shadow', q.id, true),
    );
    if (behind.length === 0) return;
    if (Date.now() > deadline) {
      const show = (q: HostQueue, cq: boolean): string => `${host.doorbellBufferValue('shadow', q.id, cq)}/${host.doorbellBufferValue('eventIdx', q.id, cq)}`;
      throw new Error(`${label}: EventIdx never caught up with the shadow doorbells (shadow/EventIdx): ${behind.map((q) => `q${q.id} SQ ${show(q, false)} CQ ${show(q, true)}`).join('; ')}`);
    }
  }
}

/**
 * The guest pages the window's controller must have written: its read data and completion entries
 * (the record) and the EventIdx page, sorted. Never the shadow doorbell page: only the host writes it.
 */
export function expectedDeviceWrites(guest: Guest, record: WindowRecord): number[] {
  return [...new Set([...record.pages, pageOf(guest.host.doorbellBuffer!.eventIdx)])].sort((a, b) => a - b);
}
