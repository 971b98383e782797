// The narrow slices of the native addon the protocol layer uses, as interfaces, so the session can
// be driven by a fake transport in unit tests and by the real socket everywhere else.

export interface Transport {
  send(data: Uint8Array, fds?: readonly number[]): void;
  close(): void;
  /** Bytes accepted by send() but not yet written to the socket. */
  pendingWriteBytes(): number;
}

export interface NativeMemory {
  mmap(fd: number, offset: bigint, length: number, writable: boolean): ArrayBuffer;
  munmap(buffer: ArrayBuffer): void;
  fdStat(fd: number): { size: number; blockSize: number; shrinkSealed: boolean };
  /** A mapping's slot in `poisonCounts`, or -1 when it is not guarded. */
  guardSlot(buffer: ArrayBuffer): number;
  /** How often the SIGBUS guard replaced the mapping of each slot with zero pages. */
  readonly poisonCounts: Uint32Array;
}

export interface NativeEventFds {
  eventfdWrite(fd: number, value?: bigint): void;
  closeFd(fd: number): void;
}
