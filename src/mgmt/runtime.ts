// Builds what a ServerConfig describes: one subsystem, its namespaces, one controller per socket,
// each controller behind its own vfio-user server. Also tears it all down again.

import { createHash } from 'node:crypto';
import { hostname } from 'node:os';
import type { Logger } from '../log.js';
import { FileBackend, RamBackend, type BlockBackend } from '../nvme/backend.js';
import { NvmeController } from '../nvme/controller.js';
import { Namespace } from '../nvme/namespace.js';
import { Subsystem } from '../nvme/subsystem.js';
import { ScratchDevice } from '../pci/scratch-device.js';
import type { VfioDevice } from '../vfio-user/device.js';
import { VfioUserServer } from '../vfio-user/server.js';
import type { NamespaceConfig, ServerConfig } from './config.js';

export interface Runtime {
  subsystem: Subsystem | null;
  servers: VfioUserServer[];
  devices: VfioDevice[];
  stop(): Promise<void>;
}

const LBA_FORMAT_INDEX = { 512: 0, 4096: 1 } as const;

/**
 * A subsystem's default identity, stable across restarts of the same server (derived from the host
 * and its first socket) and distinct between servers: Linux refuses a second single-controller
 * subsystem with an NQN it already knows.
 */
export function defaultIdentity(firstSocket: string): { nqn: string; serial: string } {
  const digest = createHash('sha256').update(`${hostname()}:${firstSocket}`).digest('hex');
  const uuid = `${digest.slice(0, 8)}-${digest.slice(8, 12)}-5${digest.slice(13, 16)}-8${digest.slice(17, 20)}-${digest.slice(20, 32)}`;
  return { nqn: `nqn.2014-08.org.nvmexpress:uuid:${uuid}`, serial: `NVU${digest.slice(32, 49).toUpperCase()}` };
}

async function openBackend(ns: NamespaceConfig): Promise<BlockBackend> {
  if (ns.file === undefined) return new RamBackend(ns.size!);
  return FileBackend.open(ns.file, ns.size === undefined ? {} : { size: ns.size });
}

export async function startRuntime(config: ServerConfig, log: Logger): Promise<Runtime> {
  let subsystem: Subsystem | null = null;
  const devices: VfioDevice[] = [];
  if (config.device === 'scratch') {
    for (const _socket of config.sockets) devices.push(new ScratchDevice());
  } else {
    const identity = defaultIdentity(config.sockets[0]!);
    subsystem = new Subsystem({
      logger: log.child('subsystem'),
      nqn: config.nqn ?? identity.nqn,
      serial: config.serial ?? identity.serial,
      ...(config.model ? { model: config.model } : {}),
    });
    try {
      for (const ns of config.namespaces) {
        const backend = await openBackend(ns);
        // Identifiers follow the subsystem's NQN, so the same configuration keeps its EUI-64/NGUID/UUID.
        subsystem.addNamespace(new Namespace({ nsid: ns.nsid!, backend, lbaFormat: LBA_FORMAT_INDEX[ns.lbads], idSeed: `${subsystem.nqn}#${ns.nsid}` }));
        log.info(`namespace ${ns.nsid}: ${backend.describe()}, ${ns.lbads}-byte blocks`);
      }
    } catch (error) {
      await subsystem.close();
      throw error;
    }
    for (const [i] of config.sockets.entries()) {
      devices.push(
        new NvmeController({
          subsystem,
          maxIoQueues: config.ioQueues,
          maxQueueEntries: config.queueEntries,
          mdts: config.mdts,
          interrupts: config.interrupts,
          logger: log.child(`ctrl${i}`),
        }),
      );
    }
  }
  const servers: VfioUserServer[] = [];
  try {
    config.sockets.forEach((socketPath, i) => {
      const server = new VfioUserServer({ socketPath, device: devices[i]!, log: log.child(`ctrl${i}`), writeMultiple: config.writeMultiple });
      server.start();
      servers.push(server);
    });
  } catch (error) {
    for (const server of servers) server.stop();
    await subsystem?.close();
    throw error;
  }
  return {
    subsystem,
    servers,
    devices,
    async stop() {
      for (const server of servers) server.stop();
      await subsystem?.close();
    },
  };
}
