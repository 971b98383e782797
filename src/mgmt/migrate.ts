// Live migration of a running VM between two stock QEMU 11 processes, with its NVMe controllers
// (qemu-11-facts §4): QEMU carries guest RAM but drops every vfio-user device, so this driver
// carries the rest. From migration start the source servers route device writes through QEMU
// (DMA_WRITE), so QEMU's dirty tracking sees them; at pre-switchover each secondary is suspended
// and its state taken through its primary's Migration Send/Receive, which the suspended
// destination controller loads during QEMU's last RAM pass. The PCI configuration QEMU does not
// carry (BARs, command, MSI, the MSI-X table; src/mgmt/pci-shadow.ts) goes to the destination VM
// before the migration starts, and at switchover only what the guest changed since; then the
// destination resumes. Anything failing before the destination runs puts the source back into
// service with nothing lost.

import { buildCommand, type CommandFields } from '../nvme/command.js';
import { statusName } from '../nvme/spec.js';
import { AdminCommandFailed, notifySuspend, receiveState, resumeController, resumeIfSuspended, sendState, suspendController, type AdminSubmitter } from '../lm/state-transfer.js';
import { ControlClient, parseControlAddress } from './control/client.js';
import type { ControllerStatus } from './control/messages.js';
import { findVfioUserDevices, type VfioUserDeviceInfo } from './qemu/devices.js';
import { cont, migrate, migrateCancel, migrateContinue, migrateIncoming, queryMigrate, queryStatus, setMigrationCapabilities, setMigrationParameters, UNLIMITED_BANDWIDTH, waitForMigrationStatus } from './qemu/migration.js';
import type { PciAddress } from './qemu/pci-config.js';
import { readPciShadow, replayPciShadow, type PciEndpoint, type PciShadow } from './pci-shadow.js';
import { QmpClient, type QmpEvent } from './qemu/qmp.js';

export interface MigrateOptions {
  sourceQmp: string;
  sourceControl: string;
  targetQmp: string;
  targetControl: string;
  /** Where the destination QEMU listens for the migration stream (tcp:HOST:PORT, unix:PATH). */
  uri: string;
  /** Bytes per second for the RAM copy; default: as fast as the link goes (as libvirt does). */
  maxBandwidth?: number;
  /** QEMU's downtime limit for its RAM switchover, in ms; default: the source QEMU's own setting. */
  downtimeLimitMs?: number;
  /** Token for control sockets on TCP. */
  controlToken?: string;
  /** One line per step. */
  progress?: (line: string) => void;
  timeoutMs?: number;
}

export interface DeviceFigures {
  socket: string;
  virtualNqn: string;
  virtualCntlid: number;
  sourceCntlid: number;
  targetCntlid: number;
  quiesceMs: number;
  stateBytes: number;
  dmaWriteBytes: number;
}

export interface MigrationFigures {
  totalMs: number;
  /** From the source's STOP event to the destination's RESUME event. */
  vmDowntimeMs: number;
  /** QEMU's own downtime figure (its view: RAM switchover only). */
  qemuDowntimeMs: number | null;
  ramBytes: number;
  devices: DeviceFigures[];
  /** When each step of the switchover ended, in ms after the source stopped. */
  switchover: Record<string, number>;
}

/** One vfio-user device of the VM: where it is on each side and which controller serves it. */
interface Pairing {
  socket: string;
  source: VfioUserDeviceInfo & { address: PciAddress };
  target: VfioUserDeviceInfo & { address: PciAddress };
  sourceController: ControllerStatus;
  targetController: ControllerStatus;
  /** What the destination VM was given before the migration started. */
  preloaded?: PciShadow;
  /** Taken at pre-switchover. */
  pci?: PciShadow;
  state?: Uint8Array;
  quiesceMs?: number;
  dmaWriteBytes?: number;
}

export class MigrationError extends Error {}

const stamp = (e: QmpEvent): number => e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;

function adminSubmitter(control: ControlClient): AdminSubmitter {
  return async (fields: CommandFields, data?: Uint8Array) => {
    const response = await control.request({ admin: { command: buildCommand(fields), ...(data ? { data } : {}) } });
    if (response.error) throw new MigrationError(response.error);
    const result = response.admin!;
    if (result.status !== 0) throw new AdminCommandFailed(result.status, `${result.statusName || statusName(result.status)}${result.detail ? `: ${result.detail}` : ''}`);
    return { dw0: result.dw0, data: result.data };
  };
}

async function connectControl(address: string, token: string | undefined): Promise<ControlClient> {
  return ControlClient.connect(parseControlAddress(address), token !== undefined ? { token } : {});
}

async function status(control: ControlClient): Promise<ControllerStatus[]> {
  const response = await control.request({ status: {} });
  if (response.error) throw new MigrationError(response.error);
  return response.status!.controllers;
}

/** Matches the VM's vfio-user devices with their controllers on both sides by socket and virtual identity. */
async function pairDevices(sourceQmp: QmpClient, targetQmp: QmpClient, sourceControl: ControlClient, targetControl: ControlClient): Promise<Pairing[]> {
  const [sourceDevices, targetDevices, sourceControllers, targetControllers] = await Promise.all([
    findVfioUserDevices(sourceQmp),
    findVfioUserDevices(targetQmp),
    status(sourceControl),
    status(targetControl),
  ]);
  const pairings: Pairing[] = [];
  for (const device of sourceDevices) {
    const sourceController = sourceControllers.find((c) => c.socket !== '' && c.socket === device.socketPath);
    if (!sourceController) continue; // another server's device: not ours to move
    if (!device.address) throw new MigrationError(`${device.qomPath} has no PCI address yet`);
    if (sourceController.role !== 'secondary' || !sourceController.virtualNqn) {
      throw new MigrationError(`${device.socketPath} is controller ${sourceController.cntlid}, not a secondary in a virtual subsystem: it cannot move`);
    }
    const targetController = targetControllers.find((c) => c.virtualNqn === sourceController.virtualNqn && c.virtualCntlid === sourceController.virtualCntlid);
    if (!targetController) throw new MigrationError(`the destination server has no controller ${sourceController.virtualCntlid} of ${sourceController.virtualNqn}`);
    if (!targetController.online || !targetController.socket) throw new MigrationError(`destination controller ${targetController.cntlid} is not online and exported`);
    const target = targetDevices.find((d) => d.socketPath === targetController.socket);
    if (!target?.address) throw new MigrationError(`the destination VM has no device on ${targetController.socket}`);
    if (target.devfn !== device.devfn || target.parentBus !== device.parentBus) {
      throw new MigrationError(`${device.socketPath} sits at ${device.parentBus}/${device.devfn} on the source but ${target.parentBus}/${target.devfn} on the destination`);
    }
    pairings.push({ socket: device.socketPath!, source: device as Pairing['source'], target: target as Pairing['target'], sourceController, targetController });
  }
  if (pairings.length === 0) throw new MigrationError('the source VM has no vfio-user device served by the source control socket');
  return pairings;
}

/** Migrates the VM; resolves with the figures once the destination runs. */
export async function migrateVm(o: MigrateOptions): Promise<MigrationFigures> {
  const started = performance.now();
  const say = o.progress ?? (() => undefined);
  const timeoutMs = o.timeoutMs ?? 120_000;
  const sourceQmp = await QmpClient.connect(o.sourceQmp);
  const targetQmp = await QmpClient.connect(o.targetQmp);
  const sourceControl = await connectControl(o.sourceControl, o.controlToken);
  const targetControl = await connectControl(o.targetControl, o.controlToken);
  const sourceAdmin = adminSubmitter(sourceControl);
  const targetAdmin = adminSubmitter(targetControl);
  let pairings: Pairing[] = [];
  let destinationRuns = false;
  try {
    const targetState = (await queryStatus(targetQmp)).status;
    if (targetState !== 'inmigrate') throw new MigrationError(`the destination QEMU is '${targetState}': start it with -incoming defer and -S`);
    pairings = await pairDevices(sourceQmp, targetQmp, sourceControl, targetControl);
    say(`${pairings.length} NVMe controller(s): ${pairings.map((p) => `${p.sourceController.virtualNqn}#${p.sourceController.virtualCntlid} (source ${p.sourceController.cntlid} -> destination ${p.targetController.cntlid})`).join(', ')}`);
    // The destination takes the PCI configuration now, outside the downtime; at switchover it
    // only gets what the guest changed since.
    const endpoints = new Map(
      pairings.map((p) => [
        p,
        {
          source: { qmp: sourceQmp, control: sourceControl, address: p.source.address, cntlid: p.sourceController.cntlid } as PciEndpoint,
          target: { qmp: targetQmp, control: targetControl, address: p.target.address, cntlid: p.targetController.cntlid } as PciEndpoint,
        },
      ]),
    );
    const ends = (p: Pairing): { source: PciEndpoint; target: PciEndpoint } => endpoints.get(p)!;
    for (const p of pairings) {
      p.preloaded = await readPciShadow(ends(p).source);
      await replayPciShadow(ends(p).target, p.preloaded);
      // Its host's page cache of the namespaces goes now, outside the downtime: Set Controller State
      // then drops only what was cached since.
      await notifySuspend(targetAdmin, p.targetController.cntlid);
      // Idle and about to be overwritten: suspended now, it only has to load the state at switchover.
      await suspendController(targetAdmin, p.targetController.cntlid);
      // A first Get of the running source's state (allowed, marked not suspended throughout)
      // proves its primary answers and takes the first-run costs out of the downtime.
      await receiveState(sourceAdmin, p.sourceController.cntlid);
    }
    await setMigrationCapabilities(sourceQmp, { events: true, 'pause-before-switchover': true });
    await setMigrationParameters(sourceQmp, {
      'max-bandwidth': o.maxBandwidth ?? UNLIMITED_BANDWIDTH,
      ...(o.downtimeLimitMs !== undefined ? { 'downtime-limit': o.downtimeLimitMs } : {}),
    });
    await setMigrationCapabilities(targetQmp, { events: true });
    await migrateIncoming(targetQmp, o.uri);
    // From here on QEMU tracks dirty RAM: device writes must pass through it.
    for (const p of pairings) {
      await request(sourceControl, { writeThrough: { cntlid: p.sourceController.cntlid, on: true } });
      // The source's write-back of its namespaces runs while QEMU copies RAM, not in the downtime.
      // (Its page cache of them is dropped too: the guest's next read of each page goes to the disk.)
      await notifySuspend(sourceAdmin, p.sourceController.cntlid);
    }
    const before = new Map((await status(sourceControl)).map((c) => [c.cntlid, c.dmaWriteBytes]));
    const stopSeen = sourceQmp.waitForEvent('STOP', undefined, timeoutMs);
    const cursor = await migrate(sourceQmp, o.uri);
    say(`migrating RAM to ${o.uri}`);
    await waitForMigrationStatus(sourceQmp, 'pre-switchover', { since: cursor, timeoutMs });
    const stopEvent = await stopSeen;
    const stopAt = stamp(stopEvent);
    // Steps are timed from the moment this process saw the STOP (QEMU's clock may be another host's).
    const stoppedHere = performance.now();
    const switchover: Record<string, number> = {};
    const mark = (step: string): void => void (switchover[step] = Math.round((performance.now() - stoppedHere) * 10) / 10);
    say('pre-switchover: vCPUs stopped; suspending the controllers');
    await Promise.all(
      pairings.map(async (p) => {
        // QEMU's copy of the config space and the MSI-X table: final now that the vCPUs stopped.
        const pci = readPciShadow(ends(p).source);
        pci.catch(() => undefined); // awaited below, after the suspend, which may fail first
        const t0 = performance.now();
        await suspendController(sourceAdmin, p.sourceController.cntlid);
        p.quiesceMs = performance.now() - t0;
        p.state = (await receiveState(sourceAdmin, p.sourceController.cntlid)).bytes;
        p.pci = await pci;
        say(`controller ${p.sourceController.cntlid}: suspended in ${p.quiesceMs.toFixed(1)} ms, state ${p.state.length} bytes`);
      }),
    );
    mark('source controllers suspended, state out');
    const targetCursor = targetQmp.eventCursor();
    const continued = await migrateContinue(sourceQmp);
    // The destination controllers take their state while the last RAM pass runs: they are
    // suspended, so nothing of theirs touches the guest until they resume.
    const loaded = Promise.all(pairings.map((p) => sendState(targetAdmin, p.targetController.cntlid, p.state!))).then(() => mark('destination controllers loaded'));
    loaded.catch(() => undefined); // awaited below; a refusal must not go unhandled meanwhile
    const after = await status(sourceControl);
    for (const p of pairings) p.dmaWriteBytes = (after.find((c) => c.cntlid === p.sourceController.cntlid)?.dmaWriteBytes ?? 0) - (before.get(p.sourceController.cntlid) ?? 0);
    await waitForMigrationStatus(sourceQmp, 'completed', { since: continued, timeoutMs });
    mark('RAM switched over (source)');
    await waitForMigrationStatus(targetQmp, 'completed', { since: targetCursor, timeoutMs });
    mark('destination loaded RAM');
    await loaded;
    for (const p of pairings) {
      const changed = await replayPciShadow(ends(p).target, p.pci!, p.preloaded);
      if (changed.length > 0) say(`RAM switched over; the guest changed ${changed.join(', ')} during the migration: replayed`);
    }
    mark('PCI configuration up to date');
    for (const p of pairings) await resumeController(targetAdmin, p.targetController.cntlid);
    mark('destination controllers resumed');
    const resumed = targetQmp.waitForEvent('RESUME', undefined, timeoutMs);
    await cont(targetQmp);
    destinationRuns = true;
    const resumeAt = stamp(await resumed);
    mark('destination VM runs');
    const info = await queryMigrate(sourceQmp);
    const figures: MigrationFigures = {
      totalMs: performance.now() - started,
      vmDowntimeMs: resumeAt - stopAt,
      qemuDowntimeMs: info.downtimeMs ?? null,
      ramBytes: info.ram?.transferredBytes ?? 0,
      devices: pairings.map((p) => ({
        socket: p.socket,
        virtualNqn: p.sourceController.virtualNqn,
        virtualCntlid: p.sourceController.virtualCntlid,
        sourceCntlid: p.sourceController.cntlid,
        targetCntlid: p.targetController.cntlid,
        quiesceMs: p.quiesceMs!,
        stateBytes: p.state!.length,
        dmaWriteBytes: p.dmaWriteBytes!,
      })),
      switchover,
    };
    say(`destination runs: downtime ${figures.vmDowntimeMs.toFixed(0)} ms, total ${figures.totalMs.toFixed(0)} ms`);
    return figures;
  } catch (error) {
    if (!destinationRuns) {
      say(`failed: ${(error as Error).message}; putting the source back into service`);
      await restoreSource(sourceQmp, sourceControl, sourceAdmin, pairings.map((p) => p.sourceController.cntlid), say).catch((restoreError: unknown) => {
        say(`could not restore the source: ${(restoreError as Error).message}`);
      });
    }
    throw error;
  } finally {
    for (const c of [sourceQmp, targetQmp]) c.close();
    for (const c of [sourceControl, targetControl]) c.close();
  }
}

async function request(control: ControlClient, operation: Parameters<ControlClient['request']>[0]): Promise<void> {
  const response = await control.request(operation);
  if (response.error) throw new MigrationError(response.error);
}

/**
 * Back into service: no migration in flight, the controllers resumed with their state (never
 * sent anywhere that runs), writes no longer routed through QEMU, and the VM running.
 */
async function restoreSource(qmp: QmpClient, control: ControlClient, admin: AdminSubmitter, cntlids: number[], say: (line: string) => void): Promise<void> {
  const info = await queryMigrate(qmp);
  if (['setup', 'active', 'pre-switchover', 'device', 'postcopy-active'].includes(info.status)) {
    const cursor = await migrateCancel(qmp);
    await waitForMigrationStatus(qmp, ['cancelled', 'failed'], { since: cursor, timeoutMs: 30_000 }).catch(() => undefined);
    say('migration cancelled');
  }
  for (const cntlid of cntlids) {
    await resumeIfSuspended(admin, cntlid);
    const response = await control.request({ writeThrough: { cntlid, on: false } });
    if (response.error) say(`controller ${cntlid}: ${response.error}`);
  }
  const run = (await queryStatus(qmp)).status;
  if (run !== 'running') {
    await cont(qmp);
    say(`source VM continued (it was ${run})`);
  }
}

/**
 * `migrate recover`: a source left paused by an orchestrator that died is put back into service.
 * Controllers of this VM that are suspended resume (they were never loaded anywhere that runs).
 */
export async function recoverSource(o: { sourceQmp: string; sourceControl: string; controlToken?: string; progress?: (line: string) => void }): Promise<{ resumed: number[] }> {
  const say = o.progress ?? (() => undefined);
  const qmp = await QmpClient.connect(o.sourceQmp);
  const control = await connectControl(o.sourceControl, o.controlToken);
  try {
    const [devices, controllers] = await Promise.all([findVfioUserDevices(qmp), status(control)]);
    const ours = controllers.filter((c) => c.socket !== '' && devices.some((d) => d.socketPath === c.socket));
    if (ours.length === 0) throw new MigrationError('the VM has no vfio-user device served by this control socket');
    await restoreSource(qmp, control, adminSubmitter(control), ours.map((c) => c.cntlid), say);
    return { resumed: ours.filter((c) => c.runState !== 'running').map((c) => c.cntlid) };
  } finally {
    qmp.close();
    control.close();
  }
}
