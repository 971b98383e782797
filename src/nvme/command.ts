// A submission queue entry decoded into the fields every handler reads, and what handlers return.

import { Sqe, SQE_SIZE } from './spec.js';

export interface Command {
  /** The raw 64-byte entry (data pointers are read from it by the transfer). */
  sqe: Uint8Array;
  opcode: number;
  flags: number;
  cid: number;
  nsid: number;
  cdw10: number;
  cdw11: number;
  cdw12: number;
  cdw13: number;
  cdw14: number;
  cdw15: number;
  /** Submission queue the command came from; null for in-process callers. */
  sqid: number | null;
}

/** Optional CQE dwords of a successful command. */
export interface Completion {
  dw0?: number;
  dw1?: number;
}

/** Returned by a handler that completes later by itself (Asynchronous Event Request). */
export const DEFERRED = Symbol('deferred completion');
export type HandlerResult = Completion | void | typeof DEFERRED;

/** A little-endian dword of `bytes` at `at` (byte loads: no DataView to allocate per field). */
const u32 = (bytes: Uint8Array, at: number): number => (bytes[at]! | (bytes[at + 1]! << 8) | (bytes[at + 2]! << 16) | (bytes[at + 3]! << 24)) >>> 0;

export function parseCommand(sqe: Uint8Array, sqid: number | null): Command {
  if (sqe.length < SQE_SIZE) throw new RangeError(`a command is ${SQE_SIZE} bytes, got ${sqe.length}`);
  return {
    sqe,
    opcode: sqe[Sqe.OPCODE]!,
    flags: sqe[Sqe.FLAGS]!,
    cid: sqe[Sqe.CID]! | (sqe[Sqe.CID + 1]! << 8),
    nsid: u32(sqe, Sqe.NSID),
    cdw10: u32(sqe, Sqe.CDW10),
    cdw11: u32(sqe, Sqe.CDW11),
    cdw12: u32(sqe, Sqe.CDW12),
    cdw13: u32(sqe, Sqe.CDW13),
    cdw14: u32(sqe, Sqe.CDW14),
    cdw15: u32(sqe, Sqe.CDW15),
    sqid,
  };
}

/** Reads a 64-bit little-endian field as a JS number (guest addresses and offsets fit in 2^53). */
export const field64 = (bytes: Uint8Array, at: number): number => u32(bytes, at) + u32(bytes, at + 4) * 0x1_0000_0000;

export interface CommandFields {
  opcode: number;
  cid?: number;
  nsid?: number;
  flags?: number;
  prp1?: number;
  prp2?: number;
  /** The whole 16-byte data pointer (an SGL descriptor); replaces prp1/prp2. */
  dptr?: Uint8Array;
  cdw10?: number;
  cdw11?: number;
  cdw12?: number;
  cdw13?: number;
  cdw14?: number;
  cdw15?: number;
}

/** Builds a 64-byte SQE: the in-process callers' and tests' way to write a command. */
export function buildCommand(fields: CommandFields): Uint8Array {
  const sqe = new Uint8Array(SQE_SIZE);
  const v = new DataView(sqe.buffer);
  sqe[Sqe.OPCODE] = fields.opcode;
  sqe[Sqe.FLAGS] = fields.flags ?? 0;
  v.setUint16(Sqe.CID, fields.cid ?? 0, true);
  v.setUint32(Sqe.NSID, fields.nsid ?? 0, true);
  const set64 = (at: number, value = 0): void => {
    v.setUint32(at, value % 0x1_0000_0000, true);
    v.setUint32(at + 4, Math.floor(value / 0x1_0000_0000), true);
  };
  if (fields.dptr) sqe.set(fields.dptr.subarray(0, 16), Sqe.PRP1);
  else {
    set64(Sqe.PRP1, fields.prp1);
    set64(Sqe.PRP2, fields.prp2);
  }
  v.setUint32(Sqe.CDW10, (fields.cdw10 ?? 0) >>> 0, true);
  v.setUint32(Sqe.CDW11, (fields.cdw11 ?? 0) >>> 0, true);
  v.setUint32(Sqe.CDW12, (fields.cdw12 ?? 0) >>> 0, true);
  v.setUint32(Sqe.CDW13, (fields.cdw13 ?? 0) >>> 0, true);
  v.setUint32(Sqe.CDW14, (fields.cdw14 ?? 0) >>> 0, true);
  v.setUint32(Sqe.CDW15, (fields.cdw15 ?? 0) >>> 0, true);
  return sqe;
}
