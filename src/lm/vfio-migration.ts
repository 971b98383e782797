// The live-migration driver of a secondary controller's vfio-user function: the VMM's migration
// states (RUNNING, STOP, STOP_COPY, RESUMING) become the controlling function's own TP4159 admin
// commands on the primary — Migration Send (suspend, set state, resume) and Migration Receive —
// exactly as a host managing migration would send them. One implementation of each command, no
// side door into the secondary ("the VFIO driver is the live-migration driver").

import { buildCommand, type CommandFields } from '../nvme/command.js';
import { statusName } from '../nvme/spec.js';
import type { ControllingFunction } from '../nvme/virt/controlling-function.js';
import { VfioError, type DeviceMigration } from '../vfio-user/device.js';
import { Errno } from '../vfio-user/protocol.js';
import { AdminCommandFailed, receiveState, resumeIfSuspended, sendState, suspendController, type AdminSubmitter } from './state-transfer.js';

export function vfioMigrationFor(cf: ControllingFunction, cntlid: number): DeviceMigration {
  const admin: AdminSubmitter = async (fields: CommandFields, data?: Uint8Array) => {
    const result = await cf.primary.executeAdmin(buildCommand(fields), data);
    if (result.status !== 0) throw new AdminCommandFailed(result.status, `${statusName(result.status)}${result.detail ? `: ${result.detail}` : ''}`);
    return { dw0: result.dw0, data: result.data ?? new Uint8Array(0) };
  };
  return {
    async stop() {
      await suspendController(admin, cntlid);
    },
    async run() {
      // Already running (the VMM may ask twice, or after a reset): nothing to do.
      await resumeIfSuspended(admin, cntlid);
    },
    async save() {
      const { bytes, consistent } = await receiveState(admin, cntlid);
      if (!consistent) throw new VfioError(Errno.EINVAL, `controller ${cntlid} was not suspended while its state was taken`);
      return bytes;
    },
    async load(state: Uint8Array) {
      try {
        await suspendController(admin, cntlid);
        await sendState(admin, cntlid, state);
      } catch (error) {
        if (error instanceof AdminCommandFailed) throw new VfioError(Errno.EINVAL, `the primary refused the state: ${error.message}`);
        throw error;
      }
    },
  };
}
