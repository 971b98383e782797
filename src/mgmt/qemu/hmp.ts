// Human-monitor commands that reach guest hardware, and the parsing of their text output.
//
// HMP reports its own errors as ordinary output ("invalid char in format: 'l'", "Cannot access
// memory"), never as a QMP error, so every reply here is matched against the exact form QEMU
// 11.1.3 prints and anything else becomes an HmpError carrying the text.
//
//   i /b|/h|/w PORT         -> "portb[0x0cfd] = 0x1b" (the letter after "port" is b, w, l for 1, 2, 4 bytes)
//   o /b|/h|/w PORT VALUE   -> no output
//   xp /COUNT{b,h,w,g}x ADDR -> lines "ADDR: 0x.. 0x.." (8 bytes a line for /b, 16 otherwise);
//                               a line whose read failed is "ADDR: Cannot access memory"
//
// `xp` reads each line with one physical-memory read of the line's size: in MMIO the access widths
// are whatever QEMU's memory core splits that read into, not the unit letter.

import type { QmpClient } from './qmp.js';

export type PortAccessSize = 1 | 2 | 4;
export type MemoryUnitSize = 1 | 2 | 4 | 8;

const SIZE_LETTER: Record<MemoryUnitSize, string> = { 1: 'b', 2: 'h', 4: 'w', 8: 'g' };
/** The longest `xp` asked for at once, so one reply stays a few hundred KB of text. */
const XP_CHUNK_BYTES = 64 * 1024;

export class HmpError extends Error {
  constructor(
    readonly commandLine: string,
    readonly output: string,
    problem: string,
  ) {
    super(`HMP "${commandLine}": ${problem}${output.trim() ? `: ${output.trim().slice(0, 300)}` : ''}`);
    this.name = 'HmpError';
  }
}

const hex = (value: number | bigint): string => `0x${value.toString(16)}`;

function checkPortAccess(port: number, size: PortAccessSize): void {
  if (!Number.isInteger(port) || port < 0 || port > 0xffff) throw new RangeError(`I/O port ${port} is not in 0..0xffff`);
  if (![1, 2, 4].includes(size)) throw new RangeError(`I/O port access size ${size} is not 1, 2 or 4`);
}

/** Reads an x86 I/O port as the guest would (`i`). */
export async function readPort(qmp: QmpClient, port: number, size: PortAccessSize): Promise<number> {
  checkPortAccess(port, size);
  const commandLine = `i /${SIZE_LETTER[size]} ${hex(port)}`;
  const output = await qmp.hmp(commandLine);
  const match = /^port[bwl]\[0x([0-9a-f]+)\] = 0x([0-9a-f]+)\s*$/i.exec(output.trim());
  if (!match || parseInt(match[1]!, 16) !== port) throw new HmpError(commandLine, output, 'unexpected reply');
  return parseInt(match[2]!, 16);
}

/** Writes an x86 I/O port as the guest would (`o`). */
export async function writePort(qmp: QmpClient, port: number, size: PortAccessSize, value: number): Promise<void> {
  checkPortAccess(port, size);
  if (!Number.isInteger(value) || value < 0 || value >= 2 ** (8 * size)) {
    throw new RangeError(`value ${value} does not fit in ${size} byte(s)`);
  }
  const commandLine = `o /${SIZE_LETTER[size]} ${hex(port)} ${hex(value)}`;
  const output = await qmp.hmp(commandLine);
  if (output.trim() !== '') throw new HmpError(commandLine, output, 'unexpected reply');
}

export interface ReadPhysicalOptions {
  /** The `xp` unit: 1 (default), 2, 4 or 8 bytes; address and length must be multiples of it. */
  unitSize?: MemoryUnitSize;
}

/**
 * Reads guest-physical memory (RAM or MMIO) with `xp`, as the bytes the guest would see
 * (little-endian units). Throws HmpError when any part of the range cannot be read.
 */
export async function readPhysical(
  qmp: QmpClient,
  address: number | bigint,
  length: number,
  options: ReadPhysicalOptions = {},
): Promise<Buffer> {
  const unitSize = options.unitSize ?? 1;
  const start = BigInt(address);
  if (!(unitSize in SIZE_LETTER)) throw new RangeError(`xp unit size ${unitSize} is not 1, 2, 4 or 8`);
  if (start < 0n || !Number.isInteger(length) || length < 0) throw new RangeError(`bad physical range ${hex(start)}+${length}`);
  if (start % BigInt(unitSize) !== 0n || length % unitSize !== 0) {
    throw new RangeError(`physical range ${hex(start)}+${length} is not aligned to the ${unitSize}-byte unit`);
  }
  const result = Buffer.alloc(length);
  const chunk = XP_CHUNK_BYTES - (XP_CHUNK_BYTES % unitSize);
  for (let done = 0; done < length; done += chunk) {
    const part = Math.min(chunk, length - done);
    await xpInto(qmp, start + BigInt(done), part, unitSize, result.subarray(done, done + part));
  }
  return result;
}

async function xpInto(qmp: QmpClient, start: bigint, length: number, unitSize: MemoryUnitSize, into: Buffer): Promise<void> {
  const commandLine = `xp /${length / unitSize}${SIZE_LETTER[unitSize]}x ${hex(start)}`;
  const output = await qmp.hmp(commandLine);
  let offset = 0;
  for (const line of output.split(/\r?\n/)) {
    if (line.trim() === '') continue;
    const match = /^([0-9a-f]+):\s*(.*)$/i.exec(line.trim());
    if (!match) throw new HmpError(commandLine, output, 'unexpected reply');
    const lineAddress = BigInt(`0x${match[1]}`);
    if (lineAddress !== start + BigInt(offset)) throw new HmpError(commandLine, output, `line at ${hex(lineAddress)} out of sequence`);
    if (/cannot access memory/i.test(match[2]!)) {
      throw new HmpError(commandLine, output, `cannot read guest-physical memory at ${hex(lineAddress)}`);
    }
    for (const token of match[2]!.trim().split(/\s+/)) {
      if (!/^0x[0-9a-f]+$/i.test(token) || offset + unitSize > length) throw new HmpError(commandLine, output, 'unexpected reply');
      writeUnitLE(into, offset, unitSize, BigInt(token));
      offset += unitSize;
    }
  }
  if (offset !== length) throw new HmpError(commandLine, output, `got ${offset} of ${length} bytes`);
}

function writeUnitLE(into: Buffer, offset: number, unitSize: MemoryUnitSize, value: bigint): void {
  for (let byte = 0; byte < unitSize; byte++) into[offset + byte] = Number((value >> BigInt(8 * byte)) & 0xffn);
}
