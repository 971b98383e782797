// PCI configuration space of a (usually paused) VM, reached through HMP — QMP has no command for it.
//
// Two ways in, both verified on QEMU 11.1.3 (q35):
// - The legacy mechanism: write the function's address to the CONFIG_ADDRESS latch at 0xcf8, then
//   access CONFIG_DATA at 0xcfc..0xcff (`o`/`i`). Reads and writes, first 256 bytes only. The latch
//   is guest state (a guest may be between its own 0xcf8 write and 0xcfc access when paused), so
//   each access saves and restores it, and accesses through one QmpClient never interleave.
//   A running guest can still race us between two HMP commands: use this on a paused VM.
// - ECAM (memory-mapped configuration, all 4096 bytes), read with `xp`; it leaves the latch alone.
//   HMP has no physical-memory write, so ECAM is read-only here. On q35 the window is where the
//   MCH's PCIEXBAR register puts it: /machine/q35's `MCFG` property (0xb0000000 once SeaBIOS ran,
//   256 MiB per `mcfg_size`); before firmware enables PCIEXBAR, `MCFG` is 2^64-1, `mcfg_size` 0,
//   and `xp` there says "Cannot access memory".

import { readPhysical, readPort, writePort, type MemoryUnitSize, type PortAccessSize } from './hmp.js';
import { QmpError, type QmpClient } from './qmp.js';

/** A PCI function as the guest addresses it (QEMU's query-pci calls the device number `slot`). */
export interface PciAddress {
  bus: number;
  slot: number;
  function: number;
}

export interface ConfigWrite {
  offset: number;
  size: PortAccessSize;
  value: number;
}

export interface EcamWindow {
  /** Guest-physical address of bus 0, device 0, function 0. */
  base: number;
  size: number;
}

const CONFIG_ADDRESS_PORT = 0xcf8;
const CONFIG_DATA_PORT = 0xcfc;
const CONFIG_ADDRESS_ENABLE = 0x8000_0000;
const LEGACY_CONFIG_SIZE = 256;
const EXTENDED_CONFIG_SIZE = 4096;
const ECAM_BYTES_PER_BUS = 1 << 20;
const Q35_HOST_PATH = '/machine/q35';

/** `bb:ss.f`, as lspci and QEMU print it. */
export function formatPciAddress(address: PciAddress): string {
  const hex2 = (n: number): string => n.toString(16).padStart(2, '0');
  return `${hex2(address.bus)}:${hex2(address.slot)}.${address.function.toString(16)}`;
}

function checkPciAddress(address: PciAddress): void {
  const { bus, slot, function: fn } = address;
  const inRange = (n: number, max: number): boolean => Number.isInteger(n) && n >= 0 && n <= max;
  if (!inRange(bus, 255) || !inRange(slot, 31) || !inRange(fn, 7)) {
    throw new RangeError(`PCI address ${JSON.stringify(address)} is out of range (bus 0-255, slot 0-31, function 0-7)`);
  }
}

function checkPortConfigAccess(offset: number, size: PortAccessSize): void {
  if (![1, 2, 4].includes(size)) throw new RangeError(`config access size ${size} is not 1, 2 or 4`);
  if (!Number.isInteger(offset) || offset < 0 || offset + size > LEGACY_CONFIG_SIZE) {
    throw new RangeError(`config offset ${offset} (+${size}) is outside the ${LEGACY_CONFIG_SIZE} bytes the 0xcf8/0xcfc ports reach`);
  }
  if (offset % size !== 0) throw new RangeError(`config offset ${offset} is not aligned to its ${size}-byte size`);
}

/** The CONFIG_ADDRESS value selecting the dword that holds `offset`. */
function configAddress(address: PciAddress, offset: number): number {
  return (CONFIG_ADDRESS_ENABLE | (address.bus << 16) | (address.slot << 11) | (address.function << 8) | (offset & 0xfc)) >>> 0;
}

const portSequences = new WeakMap<QmpClient, Promise<unknown>>();

/** Runs `body` with the guest's 0xcf8 latch saved before and restored after, one body per client at a time. */
function withGuestLatchSaved<T>(qmp: QmpClient, body: () => Promise<T>): Promise<T> {
  const previous = portSequences.get(qmp) ?? Promise.resolve();
  const run = previous.then(async () => {
    const guestLatch = await readPort(qmp, CONFIG_ADDRESS_PORT, 4);
    let result: T;
    try {
      result = await body();
    } catch (error) {
      await writePort(qmp, CONFIG_ADDRESS_PORT, 4, guestLatch).catch(() => undefined); // the body's error is the news
      throw error;
    }
    await writePort(qmp, CONFIG_ADDRESS_PORT, 4, guestLatch);
    return result;
  });
  portSequences.set(qmp, run.catch(() => undefined)); // the next sequence waits for this one, not for its success
  return run;
}

/** Reads `size` bytes of config space at `offset` (< 256) through the 0xcf8/0xcfc ports. */
export async function readConfig(qmp: QmpClient, address: PciAddress, offset: number, size: PortAccessSize): Promise<number> {
  checkPciAddress(address);
  checkPortConfigAccess(offset, size);
  return withGuestLatchSaved(qmp, async () => {
    await writePort(qmp, CONFIG_ADDRESS_PORT, 4, configAddress(address, offset));
    return readPort(qmp, CONFIG_DATA_PORT + (offset & 3), size);
  });
}

/** Writes `size` bytes of config space at `offset` (< 256) through the 0xcf8/0xcfc ports. */
export async function writeConfig(qmp: QmpClient, address: PciAddress, offset: number, size: PortAccessSize, value: number): Promise<void> {
  return writeConfigSequence(qmp, address, [{ offset, size, value }]);
}

/**
 * Several writes in order with the guest's latch saved once (a config replay: BARs, then the
 * command register, then interrupt enables). Everything is validated before the first write.
 */
export async function writeConfigSequence(qmp: QmpClient, address: PciAddress, writes: readonly ConfigWrite[]): Promise<void> {
  checkPciAddress(address);
  for (const { offset, size, value } of writes) {
    checkPortConfigAccess(offset, size);
    if (!Number.isInteger(value) || value < 0 || value >= 2 ** (8 * size)) {
      throw new RangeError(`config value ${value} does not fit in ${size} byte(s)`);
    }
  }
  return withGuestLatchSaved(qmp, async () => {
    for (const { offset, size, value } of writes) {
      await writePort(qmp, CONFIG_ADDRESS_PORT, 4, configAddress(address, offset));
      await writePort(qmp, CONFIG_DATA_PORT + (offset & 3), size, value);
    }
  });
}

/** Where q35 maps ECAM now; throws when the machine is not q35 or firmware has not enabled it yet. */
export async function locateEcam(qmp: QmpClient): Promise<EcamWindow> {
  let base: number;
  let size: number;
  try {
    [base, size] = await Promise.all([
      qmp.execute<number>('qom-get', { path: Q35_HOST_PATH, property: 'MCFG' }),
      qmp.execute<number>('qom-get', { path: Q35_HOST_PATH, property: 'mcfg_size' }),
    ]);
  } catch (error) {
    if (error instanceof QmpError) throw new Error(`no q35 host bridge to find ECAM with (${error.message})`);
    throw error;
  }
  // Disabled reads as MCFG = 2^64-1 (not even a safe integer in JSON) and size 0.
  if (size === 0 || !Number.isSafeInteger(base)) {
    throw new Error('the ECAM window is not enabled: firmware has not programmed PCIEXBAR yet');
  }
  return { base, size };
}

export interface ReadConfigSpaceOptions {
  /** First byte to read (default 0). */
  offset?: number;
  /** Skip the lookup when the caller knows the window already. */
  ecam?: EcamWindow;
}

/** Reads config space (up to all 4096 bytes) through ECAM with `xp`, without touching 0xcf8. */
export async function readConfigSpace(
  qmp: QmpClient,
  address: PciAddress,
  length = LEGACY_CONFIG_SIZE,
  options: ReadConfigSpaceOptions = {},
): Promise<Buffer> {
  checkPciAddress(address);
  const offset = options.offset ?? 0;
  if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > EXTENDED_CONFIG_SIZE) {
    throw new RangeError(`config range ${offset}+${length} is outside the ${EXTENDED_CONFIG_SIZE}-byte config space`);
  }
  const ecam = options.ecam ?? (await locateEcam(qmp));
  if ((address.bus + 1) * ECAM_BYTES_PER_BUS > ecam.size) {
    throw new RangeError(`bus ${address.bus} is beyond the ${ecam.size / ECAM_BYTES_PER_BUS} buses the ECAM window covers`);
  }
  const functionBase = ecam.base + address.bus * ECAM_BYTES_PER_BUS + ((address.slot << 15) | (address.function << 12));
  // The unit only shapes xp's text (16-byte lines instead of 8): QEMU splits each line into the
  // widest accesses the window allows either way.
  const unitSize: MemoryUnitSize = offset % 4 === 0 && length % 4 === 0 ? 4 : offset % 2 === 0 && length % 2 === 0 ? 2 : 1;
  return readPhysical(qmp, functionBase + offset, length, { unitSize });
}
