// Fills a little-endian data structure the controller returns to the host (Identify data, log
// pages), field by field at the offsets the spec figures give.

export class PageWriter {
  readonly bytes: Uint8Array;
  private readonly view: DataView;

  constructor(size: number) {
    this.bytes = new Uint8Array(size);
    this.view = new DataView(this.bytes.buffer);
  }

  u8(at: number, v: number): void {
    this.view.setUint8(at, v);
  }

  u16(at: number, v: number): void {
    this.view.setUint16(at, v, true);
  }

  u32(at: number, v: number): void {
    this.view.setUint32(at, v >>> 0, true);
  }

  /** A JS number (≤ 2^53) as a 64-bit field. */
  u64(at: number, v: number): void {
    const n = Math.max(0, Math.floor(v));
    this.view.setUint32(at, n % 0x1_0000_0000, true);
    this.view.setUint32(at + 4, Math.floor(n / 0x1_0000_0000), true);
  }

  /** A 128-bit counter (SMART, error count) from a JS number: the low 64 bits carry it. */
  u128(at: number, v: number): void {
    this.u64(at, v);
  }

  /** Space-padded ASCII, as the spec wants for SN/MN/FR. */
  ascii(at: number, length: number, text: string): void {
    for (let i = 0; i < length; i++) this.bytes[at + i] = i < text.length ? text.charCodeAt(i) & 0x7f : 0x20;
  }

  /** NUL-terminated UTF-8 (NQN). */
  cstring(at: number, length: number, text: string): void {
    this.bytes.set(new TextEncoder().encode(text).subarray(0, length - 1), at);
  }
}
