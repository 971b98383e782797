// One NVM subsystem with a controlling function: the primary controller (CNTLID 0) and N secondary
// controllers (CNTLIDs 1..N), as QEMU's SR-IOV model numbers them. The primary carries the
// management commands (and whatever command sets the caller adds, such as live migration); the
// secondaries start offline, with no resources and the physical identity.

import type { Logger } from '../../log.js';
import type { AdminCommandSet } from '../context.js';
import { NvmeController, type InterruptOffer } from '../controller.js';
import type { Subsystem } from '../subsystem.js';
import { managementCommands } from './management-commands.js';
import { vendorCommands } from './vendor-commands.js';
import { Virtualization } from './virtualization.js';
import { VirtualSubsystems } from './vsubsys.js';

export const PRIMARY_CNTLID = 0;

export interface ControllingFunctionOptions {
  subsystem: Subsystem;
  secondaries: number;
  /** I/O queue pairs a secondary (and the primary) can use at most. */
  ioQueues: number;
  queueEntries?: number;
  mdts?: number;
  interrupts?: InterruptOffer;
  /** See ControllerOptions.tailPollUs. */
  tailPollUs?: number;
  /** See ControllerOptions.deepQueueBatchMs. */
  deepQueueBatchMs?: number;
  /** See ControllerOptions.mappedDoorbells. */
  mappedDoorbells?: boolean;
  logger: Logger;
  /** More command sets for the primary, built once the function exists (live migration). */
  extraCommandSets?: (cf: ControllingFunction) => AdminCommandSet[];
}

export class ControllingFunction {
  readonly subsystem: Subsystem;
  readonly primary: NvmeController;
  readonly virtualization: Virtualization;
  readonly vsubsystems: VirtualSubsystems;
  private readonly secondaryControllers: NvmeController[] = [];
  /** Whether a host other than this process is attached to the primary (whoever exports it sets this). */
  primaryHasClient: () => boolean = () => false;

  constructor(options: ControllingFunctionOptions) {
    const { subsystem, ioQueues } = options;
    if (!Number.isInteger(options.secondaries) || options.secondaries < 1 || options.secondaries > 127) {
      throw new RangeError(`secondaries ${options.secondaries} (1..127: one Secondary Controller List page)`);
    }
    this.subsystem = subsystem;
    const common = {
      subsystem,
      maxIoQueues: ioQueues,
      ...(options.queueEntries !== undefined ? { maxQueueEntries: options.queueEntries } : {}),
      ...(options.mdts !== undefined ? { mdts: options.mdts } : {}),
      ...(options.interrupts !== undefined ? { interrupts: options.interrupts } : {}),
      ...(options.tailPollUs !== undefined ? { tailPollUs: options.tailPollUs } : {}),
      ...(options.deepQueueBatchMs !== undefined ? { deepQueueBatchMs: options.deepQueueBatchMs } : {}),
      ...(options.mappedDoorbells !== undefined ? { mappedDoorbells: options.mappedDoorbells } : {}),
    };
    this.primary = new NvmeController({ ...common, cntlid: PRIMARY_CNTLID, logger: options.logger.child('primary') });
    // Each secondary can hold up to a full controller's worth of queues and vectors; the pool
    // lets every secondary have that much at once.
    const perSecondary = ioQueues + 1;
    this.virtualization = new Virtualization({
      primary: this.primary,
      limits: {
        queues: { flexibleTotal: perSecondary * options.secondaries, primaryPrivate: ioQueues + 1, maxPerSecondary: perSecondary },
        interrupts: { flexibleTotal: perSecondary * options.secondaries, primaryPrivate: ioQueues + 1, maxPerSecondary: perSecondary },
      },
      // With no client of its own the primary's host is this process (the control plane), which
      // keeps it enabled; a client (a management VM) enables and disables it itself.
      primaryEnabled: () => !this.primaryHasClient() || this.primary.enabled,
    });
    this.vsubsystems = new VirtualSubsystems(this.virtualization);
    for (let i = 1; i <= options.secondaries; i++) {
      const controller = new NvmeController({ ...common, cntlid: PRIMARY_CNTLID + i, logger: options.logger.child(`secondary${i}`) });
      this.secondaryControllers.push(controller);
      this.virtualization.addSecondary(controller);
    }
    this.primary.addCommandSet(managementCommands(this));
    this.primary.addCommandSet(vendorCommands(this.vsubsystems));
    for (const set of options.extraCommandSets?.(this) ?? []) this.primary.addCommandSet(set);
  }

  get secondaries(): readonly NvmeController[] {
    return this.secondaryControllers;
  }

  controller(cntlid: number): NvmeController | undefined {
    if (cntlid === this.primary.cntlid) return this.primary;
    return this.virtualization.controller(cntlid);
  }

  dispose(): void {
    for (const c of [this.primary, ...this.secondaryControllers]) c.dispose();
  }
}
