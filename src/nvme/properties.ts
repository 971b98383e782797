// The controller properties below the doorbells (Base §3.1.4): CAP, VS, INTMS/INTMC, CC, CSTS,
// AQA, ASQ, ACQ, as 32-bit reads and writes, and what a CC write does, as a transition table.

import type { Interrupts } from './interrupts.js';
import { AQA, CC, NVME_VERSION_1_4, Reg } from './spec.js';
import type { ControllerState } from './state.js';

export interface PropertyHost {
  readonly state: ControllerState;
  readonly interrupts: Interrupts;
  /** CAP as the host reads it (derived from the controller's limits). */
  readonly cap: bigint;
  /** CSTS as the host reads it (an offline secondary shows CFS whatever its state). */
  readonly visibleCsts: number;
  /** CC.EN 0→1. */
  enable(): void;
  /** CC.EN 1→0: a Controller Level Reset. */
  controllerReset(reason: string): void;
  /** CC.SHN went from 0 to a shutdown notification. */
  shutdown(): void;
}

type CcArc = 'store' | 'enable' | 'reset' | 'shutdownNotice';

/** What a CC write does, by CC.EN before and after it. */
const CC_ARCS: Record<'off' | 'on', Record<'off' | 'on', CcArc>> = {
  off: { off: 'store', on: 'enable' },
  on: { off: 'reset', on: 'shutdownNotice' },
};

const SHN_BITS = CC.SHN_MASK << CC.SHN_SHIFT;
const FOUR_GIB = 0x1_0000_0000;

export class ControllerProperties {
  constructor(private readonly host: PropertyHost) {}

  read(offset: number): number {
    const r = this.host.state.registers;
    switch (offset) {
      case Reg.CAP:
        return Number(this.host.cap & 0xffff_ffffn);
      case Reg.CAP + 4:
        return Number(this.host.cap >> 32n);
      case Reg.VS:
        return NVME_VERSION_1_4;
      case Reg.INTMS:
      case Reg.INTMC:
        return r.intms;
      case Reg.CC:
        return r.cc;
      case Reg.CSTS:
        return this.host.visibleCsts;
      case Reg.AQA:
        return r.aqa;
      case Reg.ASQ:
        return r.asq % FOUR_GIB;
      case Reg.ASQ + 4:
        return Math.floor(r.asq / FOUR_GIB);
      case Reg.ACQ:
        return r.acq % FOUR_GIB;
      case Reg.ACQ + 4:
        return Math.floor(r.acq / FOUR_GIB);
      default:
        return 0; // reserved, NSSR (no subsystem reset)
    }
  }

  write(offset: number, value: number): void {
    const r = this.host.state.registers;
    // AQA, ASQ and ACQ may change only while the controller is disabled.
    const adminQueueWritable = (r.cc & CC.EN) === 0;
    const setLow = (old: number, low: number): number => Math.floor(old / FOUR_GIB) * FOUR_GIB + ((low & ~0xfff) >>> 0);
    switch (offset) {
      case Reg.INTMS:
        this.host.interrupts.mask(value);
        return;
      case Reg.INTMC:
        this.host.interrupts.unmask(value);
        return;
      case Reg.CC:
        this.writeCc(value);
        return;
      case Reg.AQA:
        if (adminQueueWritable) r.aqa = value & ((AQA.ACQS_MASK << AQA.ACQS_SHIFT) | AQA.ASQS_MASK);
        return;
      case Reg.ASQ:
        if (adminQueueWritable) r.asq = setLow(r.asq, value);
        return;
      case Reg.ASQ + 4:
        if (adminQueueWritable) r.asq = value * FOUR_GIB + (r.asq % FOUR_GIB);
        return;
      case Reg.ACQ:
        if (adminQueueWritable) r.acq = setLow(r.acq, value);
        return;
      case Reg.ACQ + 4:
        if (adminQueueWritable) r.acq = value * FOUR_GIB + (r.acq % FOUR_GIB);
        return;
      default:
        return; // CAP, VS, CSTS, NSSR and reserved space are read-only here
    }
  }

  private writeCc(value: number): void {
    const r = this.host.state.registers;
    const next = value & CC.WRITABLE;
    const arc = CC_ARCS[r.cc & CC.EN ? 'on' : 'off'][next & CC.EN ? 'on' : 'off'];
    switch (arc) {
      case 'store':
        r.cc = next;
        return;
      case 'enable':
        r.cc = next;
        this.host.enable();
        return;
      case 'reset':
        this.host.controllerReset('CC.EN cleared');
        r.cc = next;
        return;
      case 'shutdownNotice': {
        // While enabled only the shutdown notification may change.
        const before = r.cc & SHN_BITS;
        r.cc = (r.cc & ~SHN_BITS) | (next & SHN_BITS);
        if (before === 0 && (next & SHN_BITS) !== 0) this.host.shutdown();
        return;
      }
    }
  }
}
