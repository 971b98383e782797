// Running one command through its handler and turning how it ended into a completion: success
// with the handler's dwords, a CommandError's status, Command Aborted for a command a reset
// overtook, Internal Error for anything else. Synchronous when the handler is, so the I/O path can
// post a completion in the same turn that fetched the command.

import { executeAdminCommand } from './admin.js';
import { DEFERRED, type Command, type HandlerResult } from './command.js';
import type { ControllerContext } from './context.js';
import { executeIoCommand } from './io.js';
import { attempt, type MaybePromise } from './maybe-async.js';
import { StaleCommandError, type CommandResult } from './queues.js';
import { Status, statusName } from './spec.js';
import { CommandError, type DataTransfer } from './transfer.js';

/** Runs `cmd` through its admin or I/O handler; never throws or rejects. */
export function executeCommand(c: ControllerContext, cmd: Command, transfer: DataTransfer, isAdmin: boolean): MaybePromise<CommandResult | typeof DEFERRED> {
  return attempt<HandlerResult, CommandResult | typeof DEFERRED>(
    () => (isAdmin ? executeAdminCommand(c, cmd, transfer) : executeIoCommand(c, cmd, transfer)),
    (outcome) => (outcome === DEFERRED ? DEFERRED : { status: Status.SUCCESS, dw0: (outcome?.dw0 ?? 0) >>> 0, dw1: (outcome?.dw1 ?? 0) >>> 0 }),
    (err) => failure(c, cmd, isAdmin, err),
  );
}

function failure(c: ControllerContext, cmd: Command, isAdmin: boolean, err: unknown): CommandResult {
  if (err instanceof CommandError) {
    c.log.debug(`${isAdmin ? 'admin' : 'I/O'} opcode 0x${cmd.opcode.toString(16)} cid ${cmd.cid}: ${statusName(err.status)} ${err.message}`);
    c.events.recordError({ sqid: cmd.sqid ?? 0xffff, cid: cmd.cid, status: err.status, nsid: cmd.nsid, lba: 0 });
    return { status: err.status, dw0: err.dw0, dw1: 0, detail: err.message };
  }
  if (err instanceof StaleCommandError) return { status: Status.ABORT_REQUESTED, dw0: 0, dw1: 0 };
  c.log.error(`opcode 0x${cmd.opcode.toString(16)} cid ${cmd.cid} failed unexpectedly: ${(err as Error).stack ?? String(err)}`);
  c.events.recordError({ sqid: cmd.sqid ?? 0xffff, cid: cmd.cid, status: Status.INTERNAL_ERROR, nsid: cmd.nsid, lba: 0 });
  return { status: Status.INTERNAL_ERROR, dw0: 0, dw1: 0 };
}
