// The NVMe layer's public surface.

export { FileBackend, RamBackend, type BlockBackend, type FileBackendOptions } from './backend.js';
export { buildCommand, parseCommand, type Command } from './command.js';
export { NvmeController, loadControllerState, saveControllerState, type AdminResult, type ControllerOptions } from './controller.js';
export { Namespace, type NamespaceOptions, type NamespaceIds } from './namespace.js';
export { Subsystem, type SubsystemOptions } from './subsystem.js';
export type { ControllerState } from './state.js';
export { BufferDataTransfer, CommandError, GuestDataTransfer, type DataTransfer } from './transfer.js';
export * from './spec.js';
