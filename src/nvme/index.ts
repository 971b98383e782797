// The NVMe layer's public surface, and a helper that builds the common setup in one call.

import type { Logger } from '../log.js';
import { FileBackend, RamBackend, type BlockBackend } from './backend.js';
import { NvmeController, type ControllerOptions } from './controller.js';
import { Namespace } from './namespace.js';
import { Subsystem, type SubsystemOptions } from './subsystem.js';

export { FileBackend, RamBackend, type BlockBackend, type FileBackendOptions } from './backend.js';
export { buildCommand, parseCommand, type Command } from './command.js';
export { NvmeController, loadControllerState, saveControllerState, type AdminResult, type ControllerOptions } from './controller.js';
export { Namespace, type NamespaceOptions, type NamespaceIds } from './namespace.js';
export { Subsystem, type SubsystemOptions } from './subsystem.js';
export type { ControllerState } from './state.js';
export { BufferDataTransfer, CommandError, GuestDataTransfer, type DataTransfer } from './transfer.js';
export * from './spec.js';

export type NamespaceSpec =
  | { kind: 'ram'; size: number; nsid?: number; lbaFormat?: number }
  | { kind: 'file'; path: string; size?: number; nsid?: number; lbaFormat?: number };

/**
 * A subsystem with the given namespaces (NSIDs 1, 2, … unless given) and one controller.
 * Example: createSubsystem({ namespaces: [{ kind: 'ram', size: 64 << 20 }, { kind: 'file', path: '/tmp/disk.img', size: 1 << 30 }] }).
 */
export async function createSubsystem(options: {
  subsystem?: SubsystemOptions;
  controller?: Omit<ControllerOptions, 'subsystem'>;
  namespaces: NamespaceSpec[];
  logger?: Logger;
}): Promise<{ subsystem: Subsystem; controller: NvmeController }> {
  const subsystem = new Subsystem({ ...options.subsystem, ...(options.logger ? { logger: options.logger } : {}) });
  let nsid = 1;
  for (const spec of options.namespaces) {
    const backend: BlockBackend = spec.kind === 'ram' ? new RamBackend(spec.size) : await FileBackend.open(spec.path, spec.size === undefined ? {} : { size: spec.size });
    const id = spec.nsid ?? nsid;
    subsystem.addNamespace(new Namespace({ nsid: id, backend, lbaFormat: spec.lbaFormat ?? 0, idSeed: `${subsystem.nqn}#${id}` }));
    nsid = id + 1;
  }
  const controller = new NvmeController({ ...options.controller, subsystem });
  return { subsystem, controller };
}
