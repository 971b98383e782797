// Moving a controller state through a primary's admin commands, in chunks, as any Migration
// Management Host would: Migration Receive (header first, then the rest) and Migration Send
// (Set Controller State, FIRST/MIDDLE/LAST pieces), and the suspend and resume around them. Used
// by the CLI, the migration driver and the migration orchestrator.

import type { CommandFields } from '../nvme/command.js';
import { PrimaryOpcode, Status, statusCode } from '../nvme/spec.js';
import { MigrationReceiveSelect, MigrationSendSelect, MOS_SHIFT, SequenceIndicator, StateHeader, SuspendType } from './spec.js';

/** Submits one admin command to a primary; throws when it does not succeed. */
export type AdminSubmitter = (fields: CommandFields, data?: Uint8Array) => Promise<{ dw0: number; data: Uint8Array }>;

/** What an AdminSubmitter throws when the command completes with an error status. */
export class AdminCommandFailed extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

/** Migration Send Suspend (suspending a suspended controller is no error). */
export function suspendController(admin: AdminSubmitter, cntlid: number): Promise<unknown> {
  return admin({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: MigrationSendSelect.SUSPEND, cdw11: (SuspendType.SUSPEND << 16) | cntlid });
}

/**
 * Migration Send Suspend Notification: a suspend will follow. The controller keeps running; ours
 * writes its namespaces back and drops its host's page cache of them, so the suspend's flush and
 * the target's cache drop (inside the downtime) have little left.
 */
export function notifySuspend(admin: AdminSubmitter, cntlid: number): Promise<unknown> {
  return admin({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: MigrationSendSelect.SUSPEND, cdw11: (SuspendType.NOTIFICATION << 16) | cntlid });
}

/** Migration Send Resume. */
export function resumeController(admin: AdminSubmitter, cntlid: number): Promise<unknown> {
  return admin({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: MigrationSendSelect.RESUME, cdw11: cntlid });
}

/** Resume, where a controller that already runs is no error (a VMM may ask twice; a recovery may find it resumed). */
export async function resumeIfSuspended(admin: AdminSubmitter, cntlid: number): Promise<void> {
  try {
    await resumeController(admin, cntlid);
  } catch (error) {
    if (!(error instanceof AdminCommandFailed && statusCode(error.status) === statusCode(Status.CONTROLLER_NOT_SUSPENDED))) throw error;
  }
}

/** Bytes per Migration Receive / Migration Send command. */
export const STATE_CHUNK = 64 << 10;

/** CSVI 1 (NVMECS version 0) and CSUUIDI 1 (our vendor format), as Identify CNS 20h lists them. */
const CSVI = 1;
const CSUUIDI = 1;

export async function receiveState(admin: AdminSubmitter, cntlid: number, chunk = STATE_CHUNK): Promise<{ bytes: Uint8Array; consistent: boolean }> {
  const receive = (offset: number, length: number) =>
    admin({
      opcode: PrimaryOpcode.MIGRATION_RECEIVE,
      cdw10: MigrationReceiveSelect.GET_CONTROLLER_STATE | (CSVI << MOS_SHIFT),
      cdw11: (CSUUIDI << 16) | cntlid,
      cdw12: offset % 0x1_0000_0000,
      cdw13: Math.floor(offset / 0x1_0000_0000),
      cdw15: length / 4 - 1,
    });
  const head = await receive(0, StateHeader.SIZE);
  const view = new DataView(head.data.buffer, head.data.byteOffset, head.data.byteLength);
  const total = StateHeader.SIZE + Number(view.getBigUint64(StateHeader.NVMECSS, true) + view.getBigUint64(StateHeader.VSS, true)) * 4;
  const bytes = new Uint8Array(total);
  bytes.set(head.data.subarray(0, StateHeader.SIZE));
  let consistent = (head.dw0 & 1) === 1;
  for (let at = StateHeader.SIZE; at < total; at += chunk) {
    const length = Math.min(chunk, total - at);
    const part = await receive(at, length);
    consistent &&= (part.dw0 & 1) === 1;
    bytes.set(part.data.subarray(0, length), at);
  }
  return { bytes, consistent };
}

export async function sendState(admin: AdminSubmitter, cntlid: number, bytes: Uint8Array, chunk = STATE_CHUNK): Promise<void> {
  for (let at = 0; at < bytes.length; at += chunk) {
    const part = bytes.subarray(at, at + chunk);
    const first = at === 0;
    const last = at + chunk >= bytes.length;
    const sequence = first && last ? SequenceIndicator.ONLY : first ? SequenceIndicator.FIRST : last ? SequenceIndicator.LAST : SequenceIndicator.MIDDLE;
    await admin(
      {
        opcode: PrimaryOpcode.MIGRATION_SEND,
        cdw10: MigrationSendSelect.SET_CONTROLLER_STATE | (sequence << MOS_SHIFT),
        cdw11: (CSUUIDI << 24) | (CSVI << 16) | cntlid,
        cdw12: at % 0x1_0000_0000,
        cdw13: Math.floor(at / 0x1_0000_0000),
        cdw15: part.length / 4,
      },
      part,
    );
  }
}
