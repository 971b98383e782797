// What a controlling function's primary carries to be a Migration Management Controller: the
// migration commands, bound to that function's secondaries.

import type { AdminCommandSet } from '../nvme/context.js';
import type { ControllingFunction } from '../nvme/virt/controlling-function.js';
import { MigrationCommands, migrationCommandSet } from './migration-commands.js';

export interface LiveMigration {
  readonly commands: MigrationCommands;
  readonly commandSets: AdminCommandSet[];
}

export function liveMigrationFor(cf: ControllingFunction): LiveMigration {
  const commands = new MigrationCommands(cf);
  return { commands, commandSets: [migrationCommandSet(commands)] };
}
