// The controlling function's view of its controlled functions (Base §8.2.6 "Virtualization
// Enhancements"; QEMU hw/nvme's SR-IOV model as the reference behaviour): a pool of flexible
// Virtual Queue (VQ) and Virtual Interrupt (VI) resources, the secondary controllers it assigns
// them to, and each secondary's online state. Virtualization Management (1Ch) acts on this.

import type { NvmeController, SecondaryResources } from '../controller.js';
import { Status, VirtAction, VirtResource } from '../spec.js';
import { CommandError } from '../transfer.js';

export interface ResourcePool {
  /** Flexible resources in the pool (VQFRT / VIFRT). */
  flexibleTotal: number;
  /** Private resources of the primary (VQPRT / VIPRT). */
  primaryPrivate: number;
  /** Most flexible resources one secondary may hold (VQFRSM / VIFRSM). */
  maxPerSecondary: number;
}

export interface PoolLimits {
  queues: ResourcePool;
  interrupts: ResourcePool;
}

/** A secondary controller's entry (Base Figure "Secondary Controller Entry"). */
export interface SecondaryEntry {
  readonly scid: number;
  /** Virtual Function Number: 1-based, as a VF's index under its PF. */
  readonly vfn: number;
  online: boolean;
  /** Assigned VQ resources (the admin queue pair counts as one). */
  nvq: number;
  /** Assigned VI resources. */
  nvi: number;
}

/** What Primary Controller Capabilities (CNS 14h) reports for one resource type. */
export interface ResourceReport {
  flexibleTotal: number;
  /** Assigned to secondaries (VQRFA / VIRFA). */
  assignedToSecondaries: number;
  /** Allocated to the primary (VQRFAP / VIRFAP): what its last reset activated. */
  allocatedToPrimary: number;
  primaryPrivate: number;
  maxPerSecondary: number;
  granularity: number;
}

const RESOURCE_NAME = { [VirtResource.QUEUE]: 'VQ', [VirtResource.INTERRUPT]: 'VI' } as const;
type ResourceType = (typeof VirtResource)[keyof typeof VirtResource];

export interface VirtualizationOptions {
  primary: NvmeController;
  limits: PoolLimits;
  /**
   * Whether the primary counts as enabled for Secondary Online: its own CC.EN, or, while no host is
   * attached to it, the server's own control plane acting as its host.
   */
  primaryEnabled: () => boolean;
}

export class Virtualization {
  readonly primary: NvmeController;
  private readonly entries = new Map<number, { entry: SecondaryEntry; controller: NvmeController }>();
  /** Flexible resources allocated to the primary: what it uses, and what its next reset activates. */
  private readonly primaryAllocation = { active: [0, 0], next: [0, 0] };
  private readonly listeners: Array<() => void> = [];

  constructor(private readonly options: VirtualizationOptions) {
    this.primary = options.primary;
  }

  /** Called on every change of assignments or states (persistence listens). */
  onChange(listener: () => void): void {
    this.listeners.push(listener);
  }

  /** Registers a secondary controller (offline, no resources). */
  addSecondary(controller: NvmeController): SecondaryEntry {
    const entry: SecondaryEntry = { scid: controller.cntlid, vfn: this.entries.size + 1, online: false, nvq: 0, nvi: 0 };
    this.entries.set(controller.cntlid, { entry, controller });
    const resources: SecondaryResources = {
      get online() {
        return entry.online;
      },
      get queues() {
        return entry.nvq;
      },
      get interrupts() {
        return entry.nvi;
      },
    };
    controller.setSecondaryResources(resources);
    return entry;
  }

  secondaries(): SecondaryEntry[] {
    return [...this.entries.values()].map((e) => e.entry).sort((a, b) => a.scid - b.scid);
  }

  secondary(scid: number): SecondaryEntry | undefined {
    return this.entries.get(scid)?.entry;
  }

  controller(scid: number): NvmeController | undefined {
    return this.entries.get(scid)?.controller;
  }

  report(type: ResourceType): ResourceReport {
    const pool = this.pool(type);
    return {
      flexibleTotal: pool.flexibleTotal,
      assignedToSecondaries: this.assignedToSecondaries(type),
      allocatedToPrimary: this.primaryAllocation.active[type]!,
      primaryPrivate: pool.primaryPrivate,
      maxPerSecondary: pool.maxPerSecondary,
      granularity: 1,
    };
  }

  /** Virtualization Management (Base §5.22): returns NRM, the number of resources modified. */
  manage(action: number, type: number, cntlid: number, count: number): number {
    // RT 010b–111b are reserved values: Invalid Field (Base §1.4.1.6). 22h is for resources of a
    // supported type that do not exist or are in use.
    if (type !== VirtResource.QUEUE && type !== VirtResource.INTERRUPT) throw new CommandError(Status.INVALID_FIELD, `resource type ${type}`);
    switch (action) {
      case VirtAction.PRIMARY_FLEXIBLE_ALLOCATION:
        return this.allocateToPrimary(cntlid, type, count);
      case VirtAction.SECONDARY_ASSIGN:
        return this.assign(cntlid, type, count);
      case VirtAction.SECONDARY_ONLINE:
        this.setOnline(cntlid, true);
        return 0;
      case VirtAction.SECONDARY_OFFLINE:
        this.setOnline(cntlid, false);
        return 0;
      default:
        throw new CommandError(Status.INVALID_FIELD, `Virtualization Management action ${action}`);
    }
  }

  /**
   * The primary was disabled, reset or shut down (Base §8.2.6.3): every secondary goes offline, and
   * as an offline secondary holds no flexible resources, gives them back.
   */
  primaryDisabled(): void {
    let changed = false;
    for (const { entry } of this.entries.values()) changed = this.takeOffline(entry) || changed;
    if (changed) this.changed();
  }

  /**
   * A Controller Level Reset of the primary other than a Controller Reset (CC.EN 1→0): a Primary
   * Flexible Allocation takes effect now.
   */
  primaryFunctionReset(): void {
    this.primaryAllocation.active = [...this.primaryAllocation.next];
  }

  private allocateToPrimary(cntlid: number, type: ResourceType, count: number): number {
    if (cntlid !== this.primary.cntlid) throw new CommandError(Status.INVALID_CONTROLLER_IDENTIFIER, `CNTLID ${cntlid} is not the primary`);
    const pool = this.pool(type);
    if (count > pool.flexibleTotal) throw new CommandError(Status.INVALID_NUMBER_OF_CONTROLLER_RESOURCES, `${count} ${RESOURCE_NAME[type]} exceeds the pool of ${pool.flexibleTotal}`);
    if (count > pool.flexibleTotal - this.assignedToSecondaries(type)) {
      throw new CommandError(Status.INVALID_RESOURCE_IDENTIFIER, `${count} ${RESOURCE_NAME[type]}: only ${pool.flexibleTotal - this.assignedToSecondaries(type)} are not assigned to secondaries`);
    }
    this.primaryAllocation.next[type] = count;
    this.changed();
    return count;
  }

  private assign(cntlid: number, type: ResourceType, count: number): number {
    const entry = this.requireSecondary(cntlid);
    if (entry.online) throw new CommandError(Status.INVALID_SECONDARY_CONTROLLER_STATE, `secondary ${cntlid} is online`);
    const pool = this.pool(type);
    if (count > pool.maxPerSecondary) {
      throw new CommandError(Status.INVALID_NUMBER_OF_CONTROLLER_RESOURCES, `${count} ${RESOURCE_NAME[type]} exceeds ${pool.maxPerSecondary} per secondary`);
    }
    const held = type === VirtResource.QUEUE ? entry.nvq : entry.nvi;
    // What the primary will hold after its next reset is not free either.
    const primary = Math.max(this.primaryAllocation.active[type]!, this.primaryAllocation.next[type]!);
    const free = pool.flexibleTotal - primary - this.assignedToSecondaries(type);
    if (count - held > free) throw new CommandError(Status.INVALID_RESOURCE_IDENTIFIER, `${count} ${RESOURCE_NAME[type]}: only ${free + held} available`);
    if (type === VirtResource.QUEUE) entry.nvq = count;
    else entry.nvi = count;
    this.changed();
    return count;
  }

  private setOnline(cntlid: number, online: boolean): void {
    const entry = this.requireSecondary(cntlid);
    if (!online) {
      if (this.takeOffline(entry)) this.changed();
      return;
    }
    // A valid configuration: an admin queue plus at least one I/O queue, and one interrupt.
    if (entry.nvi < 1 || entry.nvq < 2) {
      throw new CommandError(Status.INVALID_SECONDARY_CONTROLLER_STATE, `secondary ${cntlid} needs VQ >= 2 and VI >= 1 (has ${entry.nvq}/${entry.nvi})`);
    }
    if (!this.options.primaryEnabled()) throw new CommandError(Status.INVALID_SECONDARY_CONTROLLER_STATE, 'the primary controller is not enabled');
    if (entry.online) return;
    entry.online = true;
    // Going online resets the secondary: its host starts from a disabled controller.
    this.controller(cntlid)!.resetController('secondary online');
    this.changed();
  }

  /** Returns whether anything changed. */
  private takeOffline(entry: SecondaryEntry): boolean {
    const changed = entry.online || entry.nvq !== 0 || entry.nvi !== 0;
    const wasOnline = entry.online;
    entry.online = false;
    entry.nvq = 0;
    entry.nvi = 0;
    if (wasOnline) this.controller(entry.scid)!.resetController('secondary offline');
    return changed;
  }

  private requireSecondary(cntlid: number): SecondaryEntry {
    const entry = this.secondary(cntlid);
    if (!entry) throw new CommandError(Status.INVALID_CONTROLLER_IDENTIFIER, `CNTLID ${cntlid} is not a secondary controller`);
    return entry;
  }

  private pool(type: ResourceType): ResourcePool {
    return type === VirtResource.QUEUE ? this.options.limits.queues : this.options.limits.interrupts;
  }

  private assignedToSecondaries(type: ResourceType): number {
    let sum = 0;
    for (const { entry } of this.entries.values()) sum += type === VirtResource.QUEUE ? entry.nvq : entry.nvi;
    return sum;
  }

  private changed(): void {
    for (const listener of this.listeners) listener();
  }
}
