// A namespace: an NSID, a block backend, the active LBA format, and stable identifiers. Shared by
// every controller of the subsystem it belongs to, so it also counts the I/O in flight on it (a
// format waits for that to drain).

import { createHash } from 'node:crypto';
import type { BlockBackend } from './backend.js';
import { always, type MaybePromise } from './maybe-async.js';
import { LBA_FORMATS } from './spec.js';

export interface NamespaceIds {
  eui64: Uint8Array;
  nguid: Uint8Array;
  uuid: Uint8Array;
}

export interface NamespaceOptions {
  nsid: number;
  backend: BlockBackend;
  /** Index into LBA_FORMATS (0 = 512 B, 1 = 4 KiB). */
  lbaFormat?: number;
  /** Identifiers; derived from `idSeed` (or the backend description) when absent, so they are stable across restarts. */
  ids?: Partial<NamespaceIds>;
  idSeed?: string;
}

export class Namespace {
  readonly nsid: number;
  readonly backend: BlockBackend;
  readonly ids: NamespaceIds;
  private format: number;
  /** Commands touching this namespace right now, across all controllers. */
  private inflight = 0;
  private drained: Array<() => void> = [];
  /** True while a Format NVM runs: new I/O gets Format In Progress. */
  formatting = false;

  constructor(options: NamespaceOptions) {
    if (!Number.isInteger(options.nsid) || options.nsid < 1 || options.nsid >= 0xffff_fffe) throw new RangeError(`invalid NSID ${options.nsid}`);
    this.nsid = options.nsid;
    this.backend = options.backend;
    this.format = options.lbaFormat ?? 0;
    if (LBA_FORMATS[this.format] === undefined) throw new RangeError(`invalid LBA format ${this.format}`);
    const derived = deriveIds(options.idSeed ?? `${options.backend.describe()}#${options.nsid}`);
    this.ids = { ...derived, ...options.ids };
  }

  get lbaFormat(): number {
    return this.format;
  }

  get blockShift(): number {
    return LBA_FORMATS[this.format]!;
  }

  get blockSize(): number {
    return 1 << this.blockShift;
  }

  /** NSZE = NCAP = NUSE: the namespace is fully provisioned. */
  get blockCount(): number {
    return Math.floor(this.backend.size / this.blockSize);
  }

  /** Whether [slba, slba+nlb) lies inside the namespace. */
  inRange(slba: bigint, nlb: number): boolean {
    return slba + BigInt(nlb) <= BigInt(this.blockCount);
  }

  /** Runs `fn` counted as I/O in flight on this namespace (synchronously when `fn` is). */
  track<T>(fn: () => MaybePromise<T>): MaybePromise<T> {
    this.inflight++;
    return always(fn, () => {
      this.inflight--;
      if (this.inflight === 0 && this.drained.length > 0) this.drained.splice(0).forEach((wake) => wake());
    });
  }

  /** Switches the LBA format (and optionally erases) once no I/O is in flight. */
  async formatNvm(lbaFormat: number, eraseUserData: boolean): Promise<void> {
    this.formatting = true;
    try {
      while (this.inflight > 0) await new Promise<void>((resolve) => this.drained.push(resolve));
      if (eraseUserData) await this.backend.discard(0, this.backend.size);
      this.format = lbaFormat;
    } finally {
      this.formatting = false;
    }
  }
}

/** EUI-64, NGUID and UUID from a seed: the same seed always names a namespace the same way. */
export function deriveIds(seed: string): NamespaceIds {
  const digest = createHash('sha256').update(seed).digest();
  const eui64 = new Uint8Array(digest.subarray(0, 8));
  eui64[0] = (eui64[0]! & 0xfc) | 0x02; // locally administered, unicast: not a real OUI
  const nguid = new Uint8Array(digest.subarray(8, 24));
  const uuid = new Uint8Array(digest.subarray(16, 32));
  uuid[6] = (uuid[6]! & 0x0f) | 0x50; // RFC 4122 version 5 (name-based, SHA)
  uuid[8] = (uuid[8]! & 0x3f) | 0x80;
  return { eui64, nguid, uuid };
}
