// Virtual subsystems: a definition (a virtual NQN, identity strings, a namespace numbering) that a
// secondary controller presents to its host instead of the physical subsystem, under a virtual
// controller ID. The same definition on another server, whatever its physical controller IDs and
// host name, gives that host byte-identical Identify data: what lets a controller move.

import { createHash } from 'node:crypto';
import type { NamespaceNaming, NvmeController } from '../controller.js';
import type { ControllerIdentity } from '../context.js';
import { deriveIds, type NamespaceIds } from '../namespace.js';
import { Status } from '../spec.js';
import { CommandError } from '../transfer.js';
import type { Virtualization } from './virtualization.js';

export interface NamespaceMapping {
  /** The NSID the virtual subsystem's hosts use. */
  vnsid: number;
  /** The physical subsystem's NSID behind it. */
  nsid: number;
}

export interface VirtualSubsystemDefinition {
  nqn: string;
  /** Identify Controller SN (20 ASCII); derived from the NQN when absent. */
  serial?: string;
  /** Identify Controller MN (40 ASCII). */
  model?: string;
  /** Identify Controller FR (8 ASCII). */
  firmware?: string;
  /** IEEE OUI (24 bits); 0 when absent. */
  ieeeOui?: number;
  /** Namespace numbering; empty: every namespace under its own NSID. */
  namespaces?: NamespaceMapping[];
  /**
   * CMIC bit 1 / NMIC: the virtual subsystem may hold more than one controller (and hosts then
   * use multipath). Without it, it holds at most one. Fixed by the definition, never by this host.
   */
  multiController?: boolean;
}

export interface VirtualSubsystem {
  readonly definition: Required<VirtualSubsystemDefinition>;
  /** Secondary CNTLID → virtual controller ID. */
  readonly controllers: Map<number, number>;
}

/** What joining a virtual subsystem changes about a controller, as the add command reports it (DW0 bits). */
export const Narrowing = {
  IDENTITY: 1 << 0,
  NAMESPACE_IDS: 1 << 1,
  MULTI_CONTROLLER_BITS: 1 << 2,
  NO_HOST_MEMORY_BUFFER: 1 << 3,
} as const;

export const NARROWING_TEXT: Record<number, string> = {
  [Narrowing.IDENTITY]: 'NQN, CNTLID, serial, model, firmware and IEEE OUI come from the virtual subsystem',
  [Narrowing.NAMESPACE_IDS]: 'namespace IDs, NGUID, EUI-64 and UUID are derived from the virtual subsystem',
  [Narrowing.MULTI_CONTROLLER_BITS]: 'CMIC and NMIC come from the virtual subsystem definition, whatever this host holds',
  [Narrowing.NO_HOST_MEMORY_BUFFER]: 'no Host Memory Buffer is offered (HMPRE = 0)',
};

/** Every narrowing applies to every controller that joins. */
export const ALL_NARROWINGS = Object.values(Narrowing).reduce((a, b) => a | b, 0);

const DEFAULT_MODEL = 'nvme-vfio-user virtual controller';
/** Fixed, not this server's version: a controller must not change firmware revision by moving. */
const DEFAULT_FIRMWARE = '1.0';
/** Identify Controller NN for a virtual subsystem. */
const VIRTUAL_MAX_NSID = 1024;
const NQN_MAX = 223;

const fail = (status: number, why: string): CommandError => new CommandError(status, why);

export function normalizeDefinition(def: VirtualSubsystemDefinition): Required<VirtualSubsystemDefinition> {
  const nqn = def.nqn;
  if (nqn.length === 0 || nqn.length > NQN_MAX || !nqn.startsWith('nqn.') || /[^\x20-\x7e]/.test(nqn)) {
    throw fail(Status.INVALID_FIELD, `'${nqn}' is not an NQN (nqn.yyyy-mm.reverse-domain:..., printable ASCII, at most ${NQN_MAX} bytes)`);
  }
  const text = (value: string | undefined, max: number, what: string, fallback: string): string => {
    const v = value === undefined || value === '' ? fallback : value;
    if (v.length > max || /[^\x20-\x7e]/.test(v)) throw fail(Status.INVALID_FIELD, `${what} '${v}' is not printable ASCII of at most ${max} characters`);
    return v;
  };
  const digest = createHash('sha256').update(nqn).digest('hex');
  const namespaces = def.namespaces ?? [];
  const seen = new Set<number>();
  const seenPhysical = new Set<number>();
  for (const m of namespaces) {
    if (!Number.isInteger(m.vnsid) || m.vnsid < 1 || m.vnsid > VIRTUAL_MAX_NSID || seen.has(m.vnsid)) throw fail(Status.INVALID_FIELD, `virtual NSID ${m.vnsid}`);
    if (!Number.isInteger(m.nsid) || m.nsid < 1 || seenPhysical.has(m.nsid)) throw fail(Status.INVALID_FIELD, `NSID ${m.nsid} mapped twice or invalid`);
    seen.add(m.vnsid);
    seenPhysical.add(m.nsid);
  }
  const oui = def.ieeeOui ?? 0;
  if (!Number.isInteger(oui) || oui < 0 || oui > 0xff_ffff) throw fail(Status.INVALID_FIELD, `IEEE OUI ${oui}`);
  return {
    nqn,
    serial: text(def.serial, 20, 'serial', `VS${digest.slice(0, 18).toUpperCase()}`),
    model: text(def.model, 40, 'model', DEFAULT_MODEL),
    firmware: text(def.firmware, 8, 'firmware', DEFAULT_FIRMWARE),
    ieeeOui: oui,
    namespaces: [...namespaces].sort((a, b) => a.vnsid - b.vnsid),
    multiController: def.multiController ?? false,
  };
}

export class VirtualSubsystems {
  private readonly byNqn = new Map<string, VirtualSubsystem>();
  private readonly listeners: Array<() => void> = [];

  constructor(private readonly virtualization: Virtualization) {}

  onChange(listener: () => void): void {
    this.listeners.push(listener);
  }

  list(): VirtualSubsystem[] {
    return [...this.byNqn.values()];
  }

  get(nqn: string): VirtualSubsystem | undefined {
    return this.byNqn.get(nqn);
  }

  /** The virtual subsystem secondary `scid` belongs to, with its virtual controller ID. */
  of(scid: number): { vsubsys: VirtualSubsystem; vcid: number } | undefined {
    for (const vsubsys of this.byNqn.values()) {
      const vcid = vsubsys.controllers.get(scid);
      if (vcid !== undefined) return { vsubsys, vcid };
    }
    return undefined;
  }

  create(def: VirtualSubsystemDefinition): VirtualSubsystem {
    const definition = normalizeDefinition(def);
    if (this.byNqn.has(definition.nqn)) throw fail(Status.INVALID_FIELD, `virtual subsystem ${definition.nqn} already exists`);
    const vsubsys: VirtualSubsystem = { definition, controllers: new Map() };
    this.byNqn.set(definition.nqn, vsubsys);
    this.changed();
    return vsubsys;
  }

  delete(nqn: string): void {
    const vsubsys = this.require(nqn);
    if (vsubsys.controllers.size > 0) throw fail(Status.COMMAND_SEQUENCE_ERROR, `virtual subsystem ${nqn} still has controllers`);
    this.byNqn.delete(nqn);
    this.changed();
  }

  /** Puts offline secondary `scid` into virtual subsystem `nqn` as virtual controller `vcid`. */
  add(nqn: string, scid: number, vcid: number): number {
    const vsubsys = this.require(nqn);
    const entry = this.virtualization.secondary(scid);
    if (!entry) throw fail(Status.INVALID_CONTROLLER_IDENTIFIER, `CNTLID ${scid} is not a secondary controller`);
    // A host must never see its controller's identity change under it.
    if (entry.online) throw fail(Status.INVALID_SECONDARY_CONTROLLER_STATE, `secondary ${scid} is online: take it offline first`);
    if (!Number.isInteger(vcid) || vcid < 1 || vcid > 0xffef) throw fail(Status.INVALID_FIELD, `virtual controller ID ${vcid} (1..65519)`);
    const current = this.of(scid);
    if (current) throw fail(Status.INVALID_FIELD, `secondary ${scid} is already in ${current.vsubsys.definition.nqn} as ${current.vcid}`);
    if (!vsubsys.definition.multiController && vsubsys.controllers.size > 0) {
      throw fail(Status.INVALID_FIELD, `${nqn} holds one controller (it was created without multi-controller)`);
    }
    for (const [other, id] of vsubsys.controllers) {
      if (id === vcid) throw fail(Status.INVALID_FIELD, `virtual controller ID ${vcid} is taken by secondary ${other}`);
    }
    vsubsys.controllers.set(scid, vcid);
    this.present(this.virtualization.controller(scid)!, vsubsys, vcid);
    this.changed();
    return ALL_NARROWINGS;
  }

  remove(nqn: string, scid: number): void {
    const vsubsys = this.require(nqn);
    if (!vsubsys.controllers.has(scid)) throw fail(Status.INVALID_CONTROLLER_IDENTIFIER, `secondary ${scid} is not in ${nqn}`);
    if (this.virtualization.secondary(scid)?.online) throw fail(Status.INVALID_SECONDARY_CONTROLLER_STATE, `secondary ${scid} is online: take it offline first`);
    vsubsys.controllers.delete(scid);
    this.virtualization.controller(scid)!.present(null, null);
    this.changed();
  }

  private present(controller: NvmeController, vsubsys: VirtualSubsystem, vcid: number): void {
    const def = vsubsys.definition;
    const identity: ControllerIdentity = {
      cntlid: vcid,
      nqn: def.nqn,
      serial: def.serial,
      model: def.model,
      firmware: def.firmware,
      ieeeOui: def.ieeeOui,
      multiController: def.multiController,
    };
    controller.present(identity, namingOf(def));
  }

  private require(nqn: string): VirtualSubsystem {
    const vsubsys = this.byNqn.get(nqn);
    if (!vsubsys) throw fail(Status.INVALID_FIELD, `no virtual subsystem ${nqn}`);
    return vsubsys;
  }

  private changed(): void {
    for (const listener of this.listeners) listener();
  }
}

/** The namespace numbering and identifiers a virtual subsystem's hosts see. */
function namingOf(def: Required<VirtualSubsystemDefinition>): NamespaceNaming {
  const mapped = def.namespaces.length > 0;
  const toPhysical = new Map(def.namespaces.map((m) => [m.vnsid, m.nsid]));
  const toHost = new Map(def.namespaces.map((m) => [m.nsid, m.vnsid]));
  const ids = new Map<number, NamespaceIds>();
  return {
    physical: (hostNsid) => (mapped ? toPhysical.get(hostNsid) : hostNsid),
    host: (nsid) => (mapped ? toHost.get(nsid) : nsid),
    ids: (hostNsid) => {
      let found = ids.get(hostNsid);
      if (!found) ids.set(hostNsid, (found = deriveIds(`${def.nqn}#${hostNsid}`)));
      return found;
    },
    maxNsid: VIRTUAL_MAX_NSID,
  };
}
