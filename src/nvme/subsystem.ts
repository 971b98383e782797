// An NVM subsystem: its NQN and identity strings, the namespaces it owns (shared by all of its
// controllers) and the controllers themselves. Namespace changes reach every controller the
// namespace is (or was) attached to, as a Changed Namespace List entry and a notice event.

import { silentLogger, type Logger } from '../log.js';
import type { Namespace } from './namespace.js';

export interface SubsystemOptions {
  nqn?: string;
  serial?: string;
  model?: string;
  firmware?: string;
  /** Highest NSID the subsystem can hold (Identify Controller NN). */
  maxNamespaces?: number;
  logger?: Logger;
}

/** What the subsystem needs from a controller (the controller class implements it). */
export interface SubsystemController {
  readonly cntlid: number;
  isAttached(nsid: number): boolean;
  attachNamespace(nsid: number): void;
  detachNamespace(nsid: number): void;
  /** Records a changed namespace and raises the notice if the host enabled it. */
  namespaceChanged(nsid: number): void;
}

export const DEFAULT_NQN = 'nqn.2024-01.io.nvme-vfio-user:subsystem';

export class Subsystem {
  readonly nqn: string;
  readonly serial: string;
  readonly model: string;
  readonly firmware: string;
  readonly maxNamespaces: number;
  readonly log: Logger;
  private readonly namespaceMap = new Map<number, Namespace>();
  private readonly controllerMap = new Map<number, SubsystemController>();
  private readonly attachmentListeners: Array<() => void> = [];
  private nextCntlid = 1;

  constructor(options: SubsystemOptions = {}) {
    this.nqn = options.nqn ?? DEFAULT_NQN;
    this.serial = options.serial ?? 'NVU0000000001';
    this.model = options.model ?? 'nvme-vfio-user controller';
    this.firmware = options.firmware ?? '0.1.0';
    this.maxNamespaces = options.maxNamespaces ?? 256;
    this.log = options.logger ?? silentLogger;
  }

  get namespaces(): ReadonlyMap<number, Namespace> {
    return this.namespaceMap;
  }

  get controllers(): ReadonlyMap<number, SubsystemController> {
    return this.controllerMap;
  }

  namespace(nsid: number): Namespace | undefined {
    return this.namespaceMap.get(nsid);
  }

  /** Adds a namespace, attached to every controller unless `attach` is false. */
  addNamespace(ns: Namespace, attach = true): void {
    if (ns.nsid > this.maxNamespaces) throw new RangeError(`NSID ${ns.nsid} exceeds the subsystem's ${this.maxNamespaces}`);
    if (this.namespaceMap.has(ns.nsid)) throw new Error(`NSID ${ns.nsid} already exists`);
    this.namespaceMap.set(ns.nsid, ns);
    if (attach) for (const c of this.controllerMap.values()) c.attachNamespace(ns.nsid);
  }

  /** Removes a namespace (detaching it everywhere) and returns it; the caller closes its backend. */
  removeNamespace(nsid: number): Namespace | undefined {
    const ns = this.namespaceMap.get(nsid);
    if (!ns) return undefined;
    for (const c of this.controllerMap.values()) if (c.isAttached(nsid)) c.detachNamespace(nsid);
    this.namespaceMap.delete(nsid);
    return ns;
  }

  /** Tells every controller that sees `nsid` (except `except`) that its attributes changed. */
  notifyNamespaceChanged(nsid: number, except?: SubsystemController): void {
    for (const c of this.controllerMap.values()) if (c !== except && c.isAttached(nsid)) c.namespaceChanged(nsid);
  }

  /** Called after any controller attached or detached a namespace (provisioning records listen). */
  onAttachmentChange(listener: () => void): void {
    this.attachmentListeners.push(listener);
  }

  attachmentChanged(): void {
    for (const listener of this.attachmentListeners) listener();
  }

  /** Picks the next free controller ID (1..0xFFEF). */
  allocateCntlid(): number {
    while (this.controllerMap.has(this.nextCntlid)) this.nextCntlid++;
    if (this.nextCntlid > 0xffef) throw new Error('no controller IDs left');
    return this.nextCntlid;
  }

  registerController(controller: SubsystemController): void {
    if (this.controllerMap.has(controller.cntlid)) throw new Error(`CNTLID ${controller.cntlid} already in use`);
    this.controllerMap.set(controller.cntlid, controller);
  }

  unregisterController(controller: SubsystemController): void {
    if (this.controllerMap.get(controller.cntlid) === controller) this.controllerMap.delete(controller.cntlid);
  }

  async close(): Promise<void> {
    for (const ns of this.namespaceMap.values()) await ns.backend.close();
    this.namespaceMap.clear();
  }
}
