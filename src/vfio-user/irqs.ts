// The eventfds the client handed over with SET_IRQS, per IRQ index and vector. The client replaces
// a vector's fd whenever it moves the route (KVM irqfd vs userspace), so the old one is closed here.

import { invalid, type IrqInfo, type IrqSink } from './device.js';
import { IrqInfoFlags, SetIrqsFlags } from './protocol.js';
import type { NativeEventFds } from './transport.js';

export interface SetIrqsRequest {
  flags: number;
  index: number;
  start: number;
  count: number;
  /** DATA_BOOL payload (one byte per vector). */
  data: Uint8Array;
  fds: number[];
}

export class IrqTable implements IrqSink {
  private readonly vectors: (number | undefined)[][];
  private readonly masked: boolean[][];
  /** Per index: level interrupts the client expects us to mask after each trigger. */
  private readonly automasked: boolean[];

  constructor(
    private readonly native: NativeEventFds,
    private readonly info: (index: number) => IrqInfo,
    indexCount: number,
  ) {
    this.vectors = Array.from({ length: indexCount }, () => []);
    this.masked = Array.from({ length: indexCount }, () => []);
    this.automasked = Array.from({ length: indexCount }, (_, i) => (info(i).flags & IrqInfoFlags.AUTOMASKED) !== 0);
  }

  trigger(index: number, vector: number): boolean {
    const fd = this.vectors[index]?.[vector];
    if (fd === undefined || this.masked[index]?.[vector]) return false;
    this.native.eventfdWrite(fd, 1n);
    // An AUTOMASKED (level) interrupt stays masked until the client's UNMASK, which QEMU sends after
    // the guest's EOI; the device then re-asserts if it still has work pending.
    if (this.automasked[index]) this.masked[index]![vector] = true;
    return true;
  }

  isWired(index: number, vector: number): boolean {
    return this.vectors[index]?.[vector] !== undefined;
  }

  wiredCount(index: number): number {
    return this.vectors[index]?.filter((fd) => fd !== undefined).length ?? 0;
  }

  /**
   * Applies one SET_IRQS. Takes ownership of `request.fds` only on success; on a VfioError the
   * caller still owns (and closes) them.
   */
  apply(request: SetIrqsRequest): void {
    const { flags, index, start, count, fds } = request;
    const data = flags & SetIrqsFlags.DATA_MASK;
    const action = flags & SetIrqsFlags.ACTION_MASK_ALL;
    if (popcount(data) !== 1 || popcount(action) !== 1 || (flags & ~(SetIrqsFlags.DATA_MASK | SetIrqsFlags.ACTION_MASK_ALL)) !== 0) {
      throw invalid(`SET_IRQS flags 0x${flags.toString(16)}: need exactly one DATA and one ACTION bit`);
    }
    if (index >= this.vectors.length) throw invalid(`SET_IRQS index ${index} out of range`);
    if (data !== SetIrqsFlags.DATA_EVENTFD && fds.length > 0) throw invalid('SET_IRQS carries fds without DATA_EVENTFD');
    const available = this.info(index).count;
    if (count === 0) {
      // start=0,count=0 with DATA_NONE|TRIGGER is the protocol's "disable the whole index".
      if (data === SetIrqsFlags.DATA_NONE && action === SetIrqsFlags.ACTION_TRIGGER) {
        if (start !== 0) throw invalid('SET_IRQS disable-all needs start 0');
        this.disable(index);
        return;
      }
      throw invalid('SET_IRQS count 0 is only valid as DATA_NONE|ACTION_TRIGGER');
    }
    if (start + count > available) {
      throw invalid(`SET_IRQS vectors ${start}..${start + count - 1} past index ${index}'s ${available}`);
    }
    if (data === SetIrqsFlags.DATA_BOOL && request.data.length < count) {
      throw invalid(`SET_IRQS DATA_BOOL needs ${count} bytes, got ${request.data.length}`);
    }
    if (data === SetIrqsFlags.DATA_EVENTFD && fds.length !== 0 && fds.length !== count) {
      throw invalid(`SET_IRQS carries ${fds.length} fds for ${count} vectors`);
    }
    const selected = (i: number): boolean => data !== SetIrqsFlags.DATA_BOOL || request.data[i] !== 0;
    switch (action) {
      case SetIrqsFlags.ACTION_TRIGGER:
        if (data === SetIrqsFlags.DATA_EVENTFD) {
          for (let i = 0; i < count; i++) this.replace(index, start + i, fds[i]);
        } else {
          for (let i = 0; i < count; i++) if (selected(i)) this.trigger(index, start + i);
        }
        return;
      case SetIrqsFlags.ACTION_MASK:
      case SetIrqsFlags.ACTION_UNMASK:
        // MASK/UNMASK with an eventfd registers a resample fd (INTx under KVM irqfd). Not supported
        // yet: KVM does not run Linux guests on the machines this is tested on.
        if (data === SetIrqsFlags.DATA_EVENTFD) {
          for (const fd of fds) this.native.closeFd(fd);
          return;
        }
        for (let i = 0; i < count; i++) {
          if (selected(i)) this.masked[index]![start + i] = action === SetIrqsFlags.ACTION_MASK;
        }
        return;
    }
  }

  disable(index: number): void {
    const vectors = this.vectors[index]!;
    for (const fd of vectors) if (fd !== undefined) this.native.closeFd(fd);
    this.vectors[index] = [];
    this.masked[index] = [];
  }

  disableAll(): void {
    for (let index = 0; index < this.vectors.length; index++) this.disable(index);
  }

  private replace(index: number, vector: number, fd: number | undefined): void {
    const old = this.vectors[index]![vector];
    if (old !== undefined && old !== fd) this.native.closeFd(old);
    this.vectors[index]![vector] = fd;
    this.masked[index]![vector] = false;
  }
}

const popcount = (value: number): number => {
  let n = 0;
  for (let v = value; v !== 0; v &= v - 1) n++;
  return n;
};
