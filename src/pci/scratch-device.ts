// A minimal PCI function that proves the plumbing end to end without NVMe: a few BAR0 registers a
// guest can read and write, a doorbell that raises an MSI-X vector, a small DMA engine (write a
// pattern into guest memory, or read and hash it) and vfio-user migration of all of it. Also the
// fixture the protocol tests drive.

import { VfioError, type DeviceContext, type DeviceMigration } from '../vfio-user/device.js';
import { Errno } from '../vfio-user/protocol.js';
import { struct } from '../vfio-user/struct.js';
import { PciFunction } from './function.js';

/** BAR0 register map of the scratch device (byte offsets). */
export const ScratchReg = {
  /** RO: 'NVMU' in little-endian, so a guest read proves it reached us. */
  MAGIC: 0x00,
  /** RW 32-bit. */
  SCRATCH32: 0x04,
  /** RW 64-bit. */
  SCRATCH64: 0x08,
  /** WO: writing N raises interrupt vector N. RO: number of interrupts raised. */
  IRQ_DOORBELL: 0x10,
  /** RO: number of BAR writes served. */
  WRITE_COUNT: 0x18,
  /** RW 64-bit: guest address of the next DMA. */
  DMA_ADDRESS: 0x20,
  /** RW 32-bit: its length in bytes (1 to SCRATCH_DMA_MAX). */
  DMA_LENGTH: 0x28,
  /** RW 32-bit: the value a pattern write repeats (little-endian) over the range. */
  DMA_PATTERN: 0x2c,
  /** WO: a ScratchDmaCommand; refused (EBUSY) while a DMA runs or the device is stopped. */
  DMA_COMMAND: 0x30,
  /** RO: ScratchDmaStatus of the last command. */
  DMA_STATUS: 0x34,
  /** RO: FNV-1a (32-bit) of the bytes the last READ_HASH read. */
  DMA_RESULT: 0x38,
  /** RW bit 0: route the device's writes to guest memory through the client (DMA_WRITE messages). */
  DMA_CONTROL: 0x3c,
} as const;

export const ScratchDmaCommand = { WRITE_PATTERN: 1, READ_HASH: 2 } as const;
export const ScratchDmaStatus = { IDLE: 0, BUSY: 1, DONE: 2, FAILED: 3 } as const;
export const ScratchDmaControl = { WRITE_THROUGH_CLIENT: 0x1 } as const;
export const SCRATCH_DMA_MAX = 1 << 20;

export const SCRATCH_MAGIC = 0x554d564e;
export const SCRATCH_VENDOR_ID = 0x1b36; // Red Hat's QEMU test-device vendor; class "other".
export const SCRATCH_DEVICE_ID = 0x00ff;

const BAR0_SIZE = 0x4000;
const MSIX_TABLE = 0x2000;
const MSIX_PBA = 0x3000;
const REGISTER_FILE_SIZE = 0x40;
/** Byte ranges of the register file a BAR write stores as is. */
const WRITABLE: readonly [start: number, end: number][] = [
  [ScratchReg.SCRATCH32, ScratchReg.SCRATCH64 + 8],
  [ScratchReg.DMA_ADDRESS, ScratchReg.DMA_PATTERN + 4],
  [ScratchReg.DMA_CONTROL, ScratchReg.DMA_CONTROL + 4],
];

/** The migration state: this header, then the register file, config space and MSI-X table. */
const stateHeader = struct([
  ['magic', 'u32'],
  ['version', 'u32'],
  ['registers', 'u32'],
  ['config', 'u32'],
  ['msixTable', 'u32'],
] as const);
const STATE_MAGIC = 0x53524353; // 'SCRS'
const STATE_VERSION = 1;

export class ScratchDevice extends PciFunction {
  /** Everything a guest can observe in BAR0 lives here, counters included, so it migrates as is. */
  private registers = new DataView(new ArrayBuffer(REGISTER_FILE_SIZE));
  private stopped = false;
  private dmaInFlight: Promise<void> | null = null;
  /** Bumped by reset, so a DMA that finishes afterwards does not report into the new registers. */
  private generation = 0;
  private lastPreCopy: Uint8Array | null = null;
  readonly migration: DeviceMigration | undefined;

  constructor(
    readonly vectors = 4,
    options: { migration?: boolean } = {},
  ) {
    super({
      identity: {
        vendorId: SCRATCH_VENDOR_ID,
        deviceId: SCRATCH_DEVICE_ID,
        subsystemVendorId: SCRATCH_VENDOR_ID,
        subsystemId: 0x0001,
        revision: 1,
        classCode: 0xff0000,
      },
      bars: [{ index: 0, size: BAR0_SIZE, kind: 'mem64' }],
      interruptPin: 0,
      msiVectors: 1,
      msix: { vectors, tableBar: 0, tableOffset: MSIX_TABLE, pbaBar: 0, pbaOffset: MSIX_PBA },
    });
    this.resetDevice();
    this.migration = options.migration === false
      ? undefined
      : {
          stop: () => this.stop(),
          run: async () => {
            this.stopped = false;
          },
          save: async () => this.encodeState(),
          savePreCopy: async (first) => this.preCopyPart(first),
          load: async (state, preCopy) => this.load(state, preCopy),
        };
  }

  override attach(context: DeviceContext): void {
    super.attach(context);
    void this.applyDmaRouting();
  }

  protected barRead(_bar: number, offset: number, count: number): Uint8Array {
    const out = new Uint8Array(count);
    for (let i = 0; i < count; i++) {
      const at = offset + i;
      out[i] = at < REGISTER_FILE_SIZE ? this.registers.getUint8(at) : 0;
    }
    return out;
  }

  protected barWrite(_bar: number, offset: number, data: Uint8Array): void {
    // A stopped device takes no new work; refused writes are not counted.
    if ((offset === ScratchReg.IRQ_DOORBELL || offset === ScratchReg.DMA_COMMAND) && this.stopped) {
      throw new VfioError(Errno.EBUSY, 'the scratch device is stopped');
    }
    if (offset === ScratchReg.DMA_COMMAND && this.dmaInFlight) throw new VfioError(Errno.EBUSY, 'a DMA is still running');
    this.bump(ScratchReg.WRITE_COUNT);
    if (offset === ScratchReg.IRQ_DOORBELL) {
      if (this.raiseInterrupt(data[0]!)) this.bump(ScratchReg.IRQ_DOORBELL);
      return;
    }
    if (offset === ScratchReg.DMA_COMMAND) {
      this.startDma(data[0]!);
      return;
    }
    for (let i = 0; i < data.length; i++) {
      const at = offset + i;
      if (WRITABLE.some(([start, end]) => at >= start && at < end)) this.registers.setUint8(at, data[i]!);
    }
    if (offset <= ScratchReg.DMA_CONTROL && offset + data.length > ScratchReg.DMA_CONTROL) void this.applyDmaRouting();
  }

  protected resetDevice(): void {
    this.generation++;
    this.registers = new DataView(new ArrayBuffer(REGISTER_FILE_SIZE));
    this.registers.setUint32(ScratchReg.MAGIC, SCRATCH_MAGIC, true);
    this.dmaInFlight = null;
    if (this.context) void this.applyDmaRouting();
  }

  // ---- DMA ----------------------------------------------------------------------------------------

  private startDma(command: number): void {
    const addr = Number(this.registers.getBigUint64(ScratchReg.DMA_ADDRESS, true));
    const length = this.registers.getUint32(ScratchReg.DMA_LENGTH, true);
    const dma = this.context?.dma;
    const generation = this.generation;
    const finish = (status: number, result?: number): void => {
      if (generation !== this.generation) return;
      this.registers.setUint32(ScratchReg.DMA_STATUS, status, true);
      if (result !== undefined) this.registers.setUint32(ScratchReg.DMA_RESULT, result, true);
      this.dmaInFlight = null;
    };
    const known = command === ScratchDmaCommand.WRITE_PATTERN || command === ScratchDmaCommand.READ_HASH;
    if (!dma || !known || length === 0 || length > SCRATCH_DMA_MAX) {
      finish(ScratchDmaStatus.FAILED);
      return;
    }
    this.registers.setUint32(ScratchReg.DMA_STATUS, ScratchDmaStatus.BUSY, true);
    const work = command === ScratchDmaCommand.WRITE_PATTERN
      ? dma.write(addr, pattern(this.registers.getUint32(ScratchReg.DMA_PATTERN, true), length)).then(() => finish(ScratchDmaStatus.DONE))
      : dma.read(addr, length).then((bytes) => finish(ScratchDmaStatus.DONE, fnv1a(bytes)));
    this.dmaInFlight = work.catch(() => finish(ScratchDmaStatus.FAILED));
  }

  private async applyDmaRouting(): Promise<void> {
    const on = (this.registers.getUint32(ScratchReg.DMA_CONTROL, true) & ScratchDmaControl.WRITE_THROUGH_CLIENT) !== 0;
    await this.context?.dma.routeWritesThroughClient?.(on);
  }

  private bump(register: number): void {
    this.registers.setUint32(register, (this.registers.getUint32(register, true) + 1) >>> 0, true);
  }

  // ---- migration ----------------------------------------------------------------------------------

  private async stop(): Promise<void> {
    this.stopped = true;
    await this.dmaInFlight;
  }

  private encodeState(): Uint8Array {
    const { config, msixTable } = this.saveFunctionState();
    const registers = new Uint8Array(this.registers.buffer.slice(0));
    const header = stateHeader.encode({ magic: STATE_MAGIC, version: STATE_VERSION, registers: registers.length, config: config.length, msixTable: msixTable.length });
    return Buffer.concat([header, registers, config, msixTable]);
  }

  private preCopyPart(first: boolean): Uint8Array {
    const state = this.encodeState();
    if (!first && this.lastPreCopy && Buffer.compare(state, this.lastPreCopy) === 0) return new Uint8Array(0);
    this.lastPreCopy = state;
    return state;
  }

  /** Decodes and checks everything before changing anything: a refusal leaves the device as it was. */
  private load(state: Uint8Array, preCopy: readonly Uint8Array[]): void {
    for (const part of preCopy) this.decodeState(part);
    const decoded = this.decodeState(state);
    this.registers = new DataView(decoded.registers.slice().buffer);
    this.loadFunctionState({ config: decoded.config, msixTable: decoded.msixTable });
    void this.applyDmaRouting();
  }

  private decodeState(bytes: Uint8Array): { registers: Uint8Array; config: Uint8Array; msixTable: Uint8Array } {
    const refuse = (why: string): VfioError => new VfioError(Errno.EINVAL, `scratch device state: ${why}`);
    if (bytes.length < stateHeader.size) throw refuse(`${bytes.length} bytes`);
    const header = stateHeader.decode(bytes);
    if (header.magic !== STATE_MAGIC) throw refuse(`magic 0x${header.magic.toString(16)}`);
    if (header.version !== STATE_VERSION) throw refuse(`version ${header.version}`);
    if (header.registers !== REGISTER_FILE_SIZE) throw refuse(`a register file of ${header.registers} bytes`);
    if (header.tail.length !== header.registers + header.config + header.msixTable) throw refuse(`${header.tail.length} bytes after the header`);
    const registers = header.tail.subarray(0, header.registers);
    const config = header.tail.subarray(header.registers, header.registers + header.config);
    const msixTable = header.tail.subarray(header.registers + header.config);
    const view = new DataView(registers.buffer, registers.byteOffset, registers.byteLength);
    if (view.getUint32(ScratchReg.MAGIC, true) !== SCRATCH_MAGIC) throw refuse('MAGIC register');
    if (view.getUint32(ScratchReg.DMA_STATUS, true) === ScratchDmaStatus.BUSY) throw refuse('a DMA in flight (a stopped device has none)');
    if (view.getUint32(ScratchReg.DMA_STATUS, true) > ScratchDmaStatus.FAILED) throw refuse('DMA_STATUS');
    const mismatch = this.checkFunctionState({ config, msixTable });
    if (mismatch) throw refuse(mismatch);
    return { registers, config, msixTable };
  }
}

/** `length` bytes of `value` repeated in little-endian order. */
export function pattern(value: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = (value >>> (8 * (i & 3))) & 0xff;
  return out;
}

/** 32-bit FNV-1a: what READ_HASH leaves in DMA_RESULT. */
export function fnv1a(bytes: Uint8Array): number {
  let hash = 0x811c9dc5;
  for (const byte of bytes) hash = Math.imul(hash ^ byte, 0x01000193) >>> 0;
  return hash;
}
