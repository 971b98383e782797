// What a controlling function's primary carries to be a Migration Management Controller: the
// migration commands, bound to that function's secondaries.

import type { AdminCommandSet } from '../nvme/context.js';
import type { ControllingFunction } from '../nvme/virt/controlling-function.js';
import { MigrationCommands, migrationCommandSet } from './migration-commands.js';
import { Tracking, trackingCommandSet } from './tracking-commands.js';
import { prepareStateFormat } from './state-format.js';

export interface LiveMigration {
  readonly commands: MigrationCommands;
  readonly tracking: Tracking;
  readonly commandSets: AdminCommandSet[];
}

export function liveMigrationFor(cf: ControllingFunction): LiveMigration {
  prepareStateFormat();
  const commands = new MigrationCommands(cf);
  const tracking = new Tracking(cf);
  // A suspend ends its controller's user data log with a "suspended" entry (and DUDMQ deletes it).
  commands.onSuspend({ suspended: (cntlid, deleteQueue) => tracking.userData.suspended(cntlid, deleteQueue) });
  return { commands, tracking, commandSets: [migrationCommandSet(commands), trackingCommandSet(tracking)] };
}
