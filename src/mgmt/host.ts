// What one server process runs: one NVM subsystem and its namespaces, either peer controllers (one
// per socket) or a controlling function (a primary and N secondaries, exported once provisioned),
// the vfio-user servers of the exported controllers, and the control socket. Provisioning changes,
// from the control plane or from a management VM's own admin commands, are recorded in --state-dir.

import { createHash } from 'node:crypto';
import { hostname } from 'node:os';
import { dirname, resolve } from 'node:path';
import type { Logger } from '../log.js';
import { FILE_AIO_MODES, FILE_CACHES, FileBackend, isFileAio, isFileCache, RamBackend, type BlockBackend, type FileAio, type FileCache } from '../nvme/backend.js';
import type { AdminCommandSet } from '../nvme/context.js';
import { NvmeController } from '../nvme/controller.js';
import { Namespace } from '../nvme/namespace.js';
import { statusName, VirtAction, VirtResource } from '../nvme/spec.js';
import { Subsystem } from '../nvme/subsystem.js';
import { CommandError } from '../nvme/transfer.js';
import { ControllingFunction, PRIMARY_CNTLID } from '../nvme/virt/controlling-function.js';
import { ScratchDevice } from '../pci/scratch-device.js';
import type { VfioDevice } from '../vfio-user/device.js';
import { VfioUserServer } from '../vfio-user/server.js';
import type { Session } from '../vfio-user/session.js';
import { vfioMigrationFor } from '../lm/vfio-migration.js';
import { bindUnixSocket, createSocketDirectory, DEFAULT_SOCKET_MODE } from '../socket-path.js';
import type { NamespaceConfig, ServerConfig } from './config.js';
import { ConfigError, readControlToken } from './config.js';
import { liveMigrationFor } from '../lm/primary.js';
import { parseControlAddress } from './control/client.js';
import type { ControllerStatus, NamespaceAddRequest, ServerStatus } from './control/messages.js';
import { ControlError, ControlServer, type AdminOutcome, type ControlTarget } from './control/server.js';
import { StateStore, type Provisioning, type SavedState } from './provisioning.js';

const LBA_FORMAT_INDEX = { 512: 0, 4096: 1 } as const;

/**
 * A subsystem's default identity, stable across restarts of the same server (derived from the host
 * and its first socket) and distinct between servers: Linux refuses a second single-controller
 * subsystem with an NQN it already knows.
 */
export function defaultIdentity(anchor: string): { nqn: string; serial: string } {
  const digest = createHash('sha256').update(`${hostname()}:${anchor}`).digest('hex');
  const uuid = `${digest.slice(0, 8)}-${digest.slice(8, 12)}-5${digest.slice(13, 16)}-8${digest.slice(17, 20)}-${digest.slice(20, 32)}`;
  return { nqn: `nqn.2014-08.org.nvmexpress:uuid:${uuid}`, serial: `NVU${digest.slice(32, 49).toUpperCase()}` };
}

/**
 * The state directory's namespaces win over --namespace flags (they hold what `ns add|remove`
 * changed since). A file given by a flag that the state lacks, or with other modes, is named, so a
 * changed cache= or aio= on a restart is not dropped without a word.
 */
function warnIgnoredNamespaceFlags(flags: readonly NamespaceConfig[], saved: readonly NamespaceConfig[], stateFile: string, log: Logger): void {
  const modes = (ns: NamespaceConfig): string => `lbads=${ns.lbads},aio=${ns.aio ?? 'default'},cache=${ns.cache ?? 'writeback'}`;
  for (const flag of flags) {
    if (flag.file === undefined) continue;
    const kept = saved.find((ns) => ns.file === flag.file);
    if (kept && modes(kept) === modes(flag)) continue;
    const why = kept ? `it keeps ${modes(kept)}, not ${modes(flag)}` : 'it does not hold this file';
    log.warn(`--namespace file=${flag.file} is not applied: the namespaces come from ${stateFile}, and ${why} (change them with ns add / ns remove)`);
  }
}

async function openBackend(ns: NamespaceConfig): Promise<BlockBackend> {
  if (ns.file === undefined) return new RamBackend(ns.size!);
  return FileBackend.open(ns.file, {
    ...(ns.size === undefined ? {} : { size: ns.size }),
    ...(ns.aio ? { aio: ns.aio } : {}),
    ...(ns.cache ? { cache: ns.cache } : {}),
    blockSize: ns.lbads,
  });
}

interface Export {
  socket: string;
  server: VfioUserServer;
}

export interface HostOptions {
  /** Command sets the primary carries beyond virtualization management (live migration). */
  extraCommandSets?: (cf: ControllingFunction) => AdminCommandSet[];
}

export class ServerHost implements ControlTarget {
  /** Peer controllers or test devices, one per --socket, always exported. */
  readonly devices: VfioDevice[] = [];
  readonly peerServers: VfioUserServer[] = [];
  controllingFunction: ControllingFunction | null = null;
  control: ControlServer | null = null;
  controlPath: string | null = null;
  private readonly exports = new Map<number, Export>();
  private readonly namespaceConfigs = new Map<number, NamespaceConfig>();
  private store: StateStore | null = null;
  /** Set while provisioning is being applied: one record at the end, not one per step. */
  private applying = false;

  private constructor(
    readonly config: ServerConfig,
    readonly subsystem: Subsystem | null,
    private readonly log: Logger,
  ) {}

  static async start(config: ServerConfig, log: Logger, options: HostOptions = {}): Promise<ServerHost> {
    if (config.device === 'scratch') {
      const host = new ServerHost(config, null, log);
      for (const _socket of config.sockets) host.devices.push(new ScratchDevice());
      host.startPeerServers();
      return host;
    }
    const store = config.stateDir ? new StateStore(config.stateDir) : null;
    const saved = store?.load() ?? null;
    const namespaces = saved?.namespaces ?? config.namespaces;
    if (saved) warnIgnoredNamespaceFlags(config.namespaces, saved.namespaces, store!.file, log);
    const identity = defaultIdentity(config.sockets[0] ?? config.control ?? config.primarySocket ?? 'nvme-vfio-user');
    const subsystem = new Subsystem({
      logger: log.child('subsystem'),
      nqn: config.nqn ?? identity.nqn,
      serial: config.serial ?? identity.serial,
      ...(config.model ? { model: config.model } : {}),
    });
    const host = new ServerHost(config, subsystem, log);
    try {
      for (const ns of namespaces) await host.openNamespace(ns, true);
      if (config.secondaries > 0) {
        const cf = new ControllingFunction({
          subsystem,
          secondaries: config.secondaries,
          ioQueues: config.ioQueues,
          queueEntries: config.queueEntries,
          mdts: config.mdts,
          interrupts: config.interrupts,
          tailPollUs: config.pollUs,
          deepQueueBatchMs: config.batchMs,
          mappedDoorbells: config.doorbells === 'mapped',
          logger: log,
          extraCommandSets: options.extraCommandSets ?? ((cf) => liveMigrationFor(cf).commandSets),
        });
        host.controllingFunction = cf;
        // A VMM that speaks vfio-user migration v2 moves a secondary through the primary's commands.
        for (const secondary of cf.secondaries) secondary.migration = vfioMigrationFor(cf, secondary.cntlid);
        cf.primaryHasClient = () => host.exports.get(PRIMARY_CNTLID)?.server.activeSession != null;
        const provisioning: Provisioning = saved ?? config.provisioning;
        if (config.primarySocket && !provisioning.controllers.some((c) => c.cntlid === PRIMARY_CNTLID && c.socket)) {
          provisioning.controllers.push({ cntlid: PRIMARY_CNTLID, socket: config.primarySocket });
        }
        host.apply(provisioning, saved ? `state ${store!.file}` : 'configuration');
        host.store = store;
        const record = (): void => host.record();
        cf.virtualization.onChange(record);
        cf.vsubsystems.onChange(record);
        subsystem.onAttachmentChange(record);
        host.record();
      } else {
        for (const [i] of config.sockets.entries()) {
          host.devices.push(
            new NvmeController({
              subsystem,
              maxIoQueues: config.ioQueues,
              maxQueueEntries: config.queueEntries,
              mdts: config.mdts,
              interrupts: config.interrupts,
              tailPollUs: config.pollUs,
              deepQueueBatchMs: config.batchMs,
              mappedDoorbells: config.doorbells === 'mapped',
              logger: log.child(`ctrl${i}`),
            }),
          );
        }
        host.startPeerServers();
      }
      await host.startControl();
    } catch (error) {
      await host.stop();
      throw error;
    }
    return host;
  }

  /** Every vfio-user socket this process listens on. */
  get sockets(): string[] {
    return [...this.peerServers.map((s) => s.socketPath), ...[...this.exports.values()].map((e) => e.socket)];
  }

  async stop(): Promise<void> {
    this.control?.close();
    this.control = null;
    for (const server of this.peerServers) server.stop();
    for (const { server } of this.exports.values()) server.stop();
    this.exports.clear();
    this.controllingFunction?.dispose();
    await this.subsystem?.close();
  }

  // ---- ControlTarget ------------------------------------------------------------------------------

  async admin(command: Uint8Array, data?: Uint8Array): Promise<AdminOutcome> {
    const cf = this.requireControllingFunction();
    const result = await cf.primary.executeAdmin(command, data);
    return { ...result, statusName: result.status === 0 ? 'SUCCESS' : statusName(result.status) };
  }

  async addNamespace(request: NamespaceAddRequest): Promise<number> {
    const subsystem = this.requireSubsystem();
    let nsid = request.nsid ?? 0;
    if (nsid === 0) for (nsid = 1; subsystem.namespace(nsid); nsid++);
    if (subsystem.namespace(nsid)) throw new ControlError(`NSID ${nsid} already exists`);
    if (nsid > subsystem.maxNamespaces) throw new ControlError(`NSID ${nsid} exceeds the subsystem's ${subsystem.maxNamespaces}`);
    const blockSize = request.blockSize || 512;
    if (blockSize !== 512 && blockSize !== 4096) throw new ControlError(`block size ${blockSize} (512 or 4096)`);
    const size = request.size || undefined;
    if (size !== undefined && size % blockSize !== 0) throw new ControlError(`size ${size} is not a multiple of ${blockSize}`);
    if (!request.file && size === undefined) throw new ControlError('a RAM namespace needs a size');
    const aio = request.aio || undefined;
    if (aio !== undefined && !request.file) throw new ControlError('aio is for file namespaces');
    if (aio !== undefined && !isFileAio(aio)) throw new ControlError(`aio ${aio} (${FILE_AIO_MODES.join(' or ')})`);
    const cache = request.cache || undefined;
    if (cache !== undefined && !request.file) throw new ControlError('cache is for file namespaces');
    if (cache !== undefined && !isFileCache(cache)) throw new ControlError(`cache ${cache} (${FILE_CACHES.join(', ')})`);
    const config: NamespaceConfig = {
      nsid,
      lbads: blockSize,
      ...(request.file ? { file: resolve(request.file) } : {}),
      ...(size !== undefined ? { size } : {}),
      ...(aio !== undefined ? { aio: aio as FileAio } : {}),
      ...(cache !== undefined ? { cache: cache as FileCache } : {}),
    };
    try {
      await this.openNamespace(config, request.attachAll === true);
    } catch (error) {
      throw new ControlError(`namespace ${nsid}: ${(error as Error).message}`);
    }
    this.record();
    return nsid;
  }

  async removeNamespace(nsid: number): Promise<void> {
    const subsystem = this.requireSubsystem();
    const ns = subsystem.removeNamespace(nsid);
    if (!ns) throw new ControlError(`no namespace ${nsid}`);
    this.namespaceConfigs.delete(nsid);
    await ns.backend.close();
    this.log.info(`namespace ${nsid} removed`);
    this.record();
  }

  exportController(cntlid: number, socket: string): void {
    const cf = this.requireControllingFunction();
    const controller = cf.controller(cntlid);
    if (!controller) throw new ControlError(`no controller ${cntlid}`);
    const current = this.exports.get(cntlid);
    if (current) throw new ControlError(`controller ${cntlid} is already exported on ${current.socket}`);
    if (cntlid !== PRIMARY_CNTLID) {
      // Provision before visible: nothing is exported that its host could not use as it stays.
      const entry = cf.virtualization.secondary(cntlid)!;
      const missing: string[] = [];
      if (entry.nvq < 2 || entry.nvi < 1) missing.push('assigned resources (ctrl assign)');
      if (!cf.vsubsystems.of(cntlid)) missing.push('a virtual subsystem (vsubsys add)');
      if (!entry.online) missing.push('online (ctrl online)');
      if (missing.length > 0) throw new ControlError(`secondary ${cntlid} is not provisioned: it needs ${missing.join(', ')}`);
    }
    const path = resolve(socket);
    if ([...this.exports.values()].some((e) => e.socket === path) || this.peerServers.some((s) => s.socketPath === path)) {
      throw new ControlError(`${path} is already a socket of this server`);
    }
    const server = new VfioUserServer({
      socketPath: path,
      device: controller,
      log: this.log.child(cntlid === PRIMARY_CNTLID ? 'primary' : `secondary${cntlid}`),
      writeMultiple: this.config.writeMultiple,
      socketMode: this.config.socketMode,
    });
    try {
      createSocketDirectory(dirname(path));
      server.start();
    } catch (error) {
      throw new ControlError(`cannot export controller ${cntlid} on ${path}: ${(error as Error).message}`);
    }
    this.exports.set(cntlid, { socket: path, server });
    this.log.info(`controller ${cntlid} exported on ${path}`);
    this.record();
  }

  unexportController(cntlid: number): void {
    const current = this.exports.get(cntlid);
    if (!current) throw new ControlError(`controller ${cntlid} is not exported`);
    current.server.stop();
    this.exports.delete(cntlid);
    this.log.info(`controller ${cntlid} unexported from ${current.socket}`);
    this.record();
  }

  async setWriteThrough(cntlid: number, on: boolean): Promise<void> {
    const session = this.sessionOf(cntlid);
    await session.dma.routeWritesThroughClient(on);
  }

  async clientRead(cntlid: number, address: number, length: number): Promise<Uint8Array> {
    try {
      return await this.sessionOf(cntlid).clientRead(address, length);
    } catch (error) {
      throw new ControlError(`controller ${cntlid}: ${(error as Error).message}`);
    }
  }

  async clientWrite(cntlid: number, address: number, data: Uint8Array): Promise<void> {
    try {
      await this.sessionOf(cntlid).clientWrite(address, data);
    } catch (error) {
      throw new ControlError(`controller ${cntlid}: ${(error as Error).message}`);
    }
  }

  /** The vfio-user session of an exported controller's attached client. */
  private sessionOf(cntlid: number): Session {
    const exported = this.exports.get(cntlid);
    if (!exported) throw new ControlError(`controller ${cntlid} is not exported`);
    const session = exported.server.activeSession;
    if (!session) throw new ControlError(`controller ${cntlid} has no client attached`);
    return session;
  }

  status(): ServerStatus {
    const subsystem = this.requireSubsystem();
    const cf = this.controllingFunction;
    const describe = (c: NvmeController, role: ControllerStatus['role'], socket: string, session: Session | null): ControllerStatus => {
      const entry = cf?.virtualization.secondary(c.cntlid);
      const membership = cf?.vsubsystems.of(c.cntlid);
      return {
        cntlid: c.cntlid,
        role,
        online: entry?.online ?? true,
        vq: entry?.nvq ?? 0,
        vi: entry?.nvi ?? 0,
        socket,
        clientConnected: session !== null,
        dmaWriteBytes: session?.counters.dmaWriteBytes ?? 0,
        writeThrough: session?.dma.routesWritesThroughClient ?? false,
        virtualNqn: membership?.vsubsys.definition.nqn ?? '',
        virtualCntlid: membership?.vcid ?? 0,
        runState: c.runState,
        enabled: c.enabled,
        namespaces: [...c.state.attachedNamespaces],
      };
    };
    const controllers: ControllerStatus[] = [];
    if (cf) {
      for (const c of [cf.primary, ...cf.secondaries]) {
        const e = this.exports.get(c.cntlid);
        controllers.push(describe(c, c === cf.primary ? 'primary' : 'secondary', e?.socket ?? '', e?.server.activeSession ?? null));
      }
    } else {
      this.devices.forEach((d, i) => {
        if (d instanceof NvmeController) controllers.push(describe(d, 'peer', this.peerServers[i]!.socketPath, this.peerServers[i]!.activeSession));
      });
    }
    return {
      nqn: subsystem.nqn,
      control: this.controlPath ?? '',
      controllers,
      namespaces: [...subsystem.namespaces.values()].map((ns) => ({
        nsid: ns.nsid,
        backend: ns.backend.describe(),
        size: ns.backend.size,
        blockSize: ns.blockSize,
        aio: ns.backend instanceof FileBackend ? ns.backend.aio : '',
        cache: ns.backend instanceof FileBackend ? ns.backend.cache : '',
      })),
      virtualSubsystems: (cf?.vsubsystems.list() ?? []).map((v) => ({
        nqn: v.definition.nqn,
        serial: v.definition.serial,
        model: v.definition.model,
        firmware: v.definition.firmware,
        controllers: [...v.controllers].map(([cntlid, virtualCntlid]) => ({ cntlid, virtualCntlid })),
      })),
    };
  }

  // ---- provisioning -------------------------------------------------------------------------------

  /** What --state-dir records: the namespaces and everything the control plane provisioned. */
  snapshot(): SavedState {
    const cf = this.requireControllingFunction();
    return {
      version: 1,
      namespaces: [...this.namespaceConfigs.values()].sort((a, b) => a.nsid! - b.nsid!),
      virtualSubsystems: cf.vsubsystems.list().map((v) => ({
        ...v.definition,
        controllers: [...v.controllers].map(([cntlid, vcid]) => ({ cntlid, vcid })),
      })),
      controllers: [cf.primary, ...cf.secondaries].map((c) => {
        const entry = cf.virtualization.secondary(c.cntlid);
        const socket = this.exports.get(c.cntlid)?.socket;
        return {
          cntlid: c.cntlid,
          ...(entry ? { vq: entry.nvq, vi: entry.nvi, online: entry.online } : {}),
          ...(socket ? { socket } : {}),
          namespaces: [...c.state.attachedNamespaces],
        };
      }),
    };
  }

  /**
   * Sets up virtual subsystems, resources, attachments, states and exports, in the order the
   * commands allow, through the operations the admin commands use. Any refusal is one line.
   */
  private apply(provisioning: Provisioning, source: string): void {
    const cf = this.requireControllingFunction();
    const step = (what: string, run: () => void): void => {
      try {
        run();
      } catch (error) {
        const status = error instanceof CommandError ? ` (${statusName(error.status)})` : '';
        throw new ConfigError(`${source}: ${what}: ${(error as Error).message}${status}`);
      }
    };
    this.applying = true;
    try {
      for (const vs of provisioning.virtualSubsystems) {
        const { controllers, ...definition } = vs;
        step(`virtual subsystem ${vs.nqn}`, () => cf.vsubsystems.create(definition));
        for (const c of controllers) step(`virtual subsystem ${vs.nqn} controller ${c.cntlid}`, () => cf.vsubsystems.add(vs.nqn, c.cntlid, c.vcid));
      }
      for (const c of provisioning.controllers) {
        const what = `controller ${c.cntlid}`;
        if (!cf.controller(c.cntlid)) throw new ConfigError(`${source}: ${what}: no such controller (the primary is 0, secondaries 1..${cf.secondaries.length})`);
        if (c.cntlid !== PRIMARY_CNTLID) {
          if (c.vq !== undefined) step(what, () => cf.virtualization.manage(VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, c.cntlid, c.vq!));
          if (c.vi !== undefined) step(what, () => cf.virtualization.manage(VirtAction.SECONDARY_ASSIGN, VirtResource.INTERRUPT, c.cntlid, c.vi!));
        }
        if (c.namespaces) {
          const controller = cf.controller(c.cntlid)!;
          for (const nsid of c.namespaces) if (!this.subsystem!.namespace(nsid)) throw new ConfigError(`${source}: ${what}: no namespace ${nsid}`);
          for (const nsid of [...controller.state.attachedNamespaces]) if (!c.namespaces.includes(nsid)) controller.detachNamespace(nsid);
          for (const nsid of c.namespaces) controller.attachNamespace(nsid);
        }
      }
      for (const c of provisioning.controllers) {
        const online = c.online ?? (c.vq !== undefined && c.vi !== undefined);
        if (c.cntlid !== PRIMARY_CNTLID && online) step(`controller ${c.cntlid} online`, () => cf.virtualization.manage(VirtAction.SECONDARY_ONLINE, 0, c.cntlid, 0));
      }
      for (const c of provisioning.controllers) {
        if (c.socket) step(`controller ${c.cntlid} export`, () => this.exportController(c.cntlid, c.socket!));
      }
    } finally {
      this.applying = false;
    }
  }

  private record(): void {
    if (!this.store || this.applying || !this.controllingFunction) return;
    try {
      this.store.save(this.snapshot());
    } catch (error) {
      this.log.error(`cannot record provisioning in ${this.store.dir}: ${(error as Error).message}`);
    }
  }

  // ---- internals ----------------------------------------------------------------------------------

  private async openNamespace(config: NamespaceConfig, attach: boolean): Promise<void> {
    const subsystem = this.subsystem!;
    const backend = await openBackend(config);
    try {
      // Identifiers follow the subsystem's NQN, so the same configuration keeps its EUI-64/NGUID/UUID.
      subsystem.addNamespace(new Namespace({ nsid: config.nsid!, backend, lbaFormat: LBA_FORMAT_INDEX[config.lbads], idSeed: `${subsystem.nqn}#${config.nsid}` }), attach);
    } catch (error) {
      await backend.close();
      throw error;
    }
    this.namespaceConfigs.set(config.nsid!, { ...config, size: backend.size });
    const fileModes = backend instanceof FileBackend ? `, aio=${backend.aio}, cache=${backend.cache}` : '';
    this.log.info(`namespace ${config.nsid}: ${backend.describe()}${fileModes}, ${config.lbads}-byte blocks`);
  }

  private startPeerServers(): void {
    this.config.sockets.forEach((socketPath, i) => {
      const server = new VfioUserServer({
        socketPath,
        device: this.devices[i]!,
        log: this.log.child(`ctrl${i}`),
        writeMultiple: this.config.writeMultiple,
        socketMode: this.config.socketMode,
      });
      server.start();
      this.peerServers.push(server);
    });
  }

  private async startControl(): Promise<void> {
    const where = this.config.control;
    if (!where) return;
    const address = parseControlAddress(where);
    const token = this.config.controlToken !== undefined ? readControlToken(this.config.controlToken) : undefined;
    const control = new ControlServer({ target: this, log: this.log.child('control'), ...(token !== undefined ? { token } : {}) });
    if ('path' in address) {
      createSocketDirectory(dirname(address.path));
      // Always 0600 (--socket-mode is for QEMU's access to vfio-user sockets): it manages the server.
      await bindUnixSocket(address.path, DEFAULT_SOCKET_MODE, (path) => control.listen(path));
      this.controlPath = address.path;
    } else {
      await control.listen(address);
      this.controlPath = `tcp:${address.host}:${control.port}`;
    }
    this.control = control;
  }

  private requireSubsystem(): Subsystem {
    if (!this.subsystem) throw new ControlError('this server serves a test device, not an NVM subsystem');
    return this.subsystem;
  }

  private requireControllingFunction(): ControllingFunction {
    if (!this.controllingFunction) throw new ControlError('this server has peer controllers and no controlling function (start it with --secondaries N)');
    return this.controllingFunction;
  }
}
