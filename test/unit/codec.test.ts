import { describe, expect, it } from 'vitest';
import * as codec from '../../src/vfio-user/codec.js';
import { MessageFramer, FramingError } from '../../src/vfio-user/framer.js';
import { Command, HEADER_SIZE, HeaderFlags, PayloadSize } from '../../src/vfio-user/protocol.js';

const bytes = (...values: number[]): Uint8Array => new Uint8Array(values);

describe('header', () => {
  it('round-trips and sizes the message from its payload', () => {
    const message = codec.encodeMessage({ id: 0xbeef, command: Command.REGION_READ, flags: HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR, error: 22 }, bytes(1, 2, 3));
    expect(message.length).toBe(HEADER_SIZE + 3);
    expect(codec.decodeHeader(message)).toEqual({ id: 0xbeef, command: 9, size: 19, flags: 0x21, error: 22 });
    expect(codec.isReply(0x21)).toBe(true);
    expect(codec.isReply(0x10)).toBe(false);
  });

  it('refuses a truncated header', () => {
    expect(() => codec.decodeHeader(new Uint8Array(15))).toThrow(codec.DecodeError);
  });
});

// Every command's payload structure, with values that exercise every field (u64s above 2^32).
const structCases: [string, { encode(v: never, tail?: Uint8Array): Uint8Array; decode(b: Uint8Array): Record<string, unknown>; size: number }, Record<string, number | bigint>][] = [
  ['DMA_MAP (2)', codec.dmaMap, { argsz: 32, flags: 3, offset: 0x1_0000_0000n, iova: 0xfeed_0000_1000n, size: 0x4000_0000n }],
  ['DMA_UNMAP (3)', codec.dmaUnmap, { argsz: 24, flags: 2, iova: 0x1234_5678_9000n, size: 0x1000n }],
  ['DEVICE_GET_INFO (4)', codec.deviceInfo, { argsz: 16, flags: 3, numRegions: 9, numIrqs: 5 }],
  ['DEVICE_GET_REGION_INFO (5)', codec.regionInfo, { argsz: 64, flags: 0xf, index: 7, capOffset: 32, size: 0x2000n, offset: 0x10_0000_0000n }],
  ['DEVICE_GET_REGION_IO_FDS (6)', codec.regionIoFds, { argsz: 16, flags: 0, index: 0, count: 2 }],
  ['DEVICE_GET_IRQ_INFO (7)', codec.irqInfo, { argsz: 16, flags: 1, index: 2, count: 33 }],
  ['DEVICE_SET_IRQS (8)', codec.setIrqs, { argsz: 20, flags: 0x24, index: 2, start: 1, count: 4 }],
  ['REGION_READ/WRITE (9/10)', codec.regionAccess, { offset: 0x1_0000_1000n, region: 0, count: 8 }],
  ['DMA_READ/WRITE (11/12)', codec.dmaAccess, { address: 0x7fff_ffff_f000n, count: 0x10_0000n }],
  ['DEVICE_FEATURE (16)', codec.deviceFeature, { argsz: 16, flags: 0x10002 }],
  ['MIG_DATA_READ/WRITE (17/18)', codec.migData, { argsz: 4104, size: 4096 }],
  ['feature MIGRATION data', codec.featureMigration, { flags: 0x8000_0000_0000_0005n }],
  ['feature MIG_DEVICE_STATE data', codec.featureMigState, { deviceState: 6, dataFd: 0xffff_ffff }],
  ['feature DMA_LOGGING_START/STOP control', codec.dmaLoggingControl, { pageSize: 0x1_0000_0000n, numRanges: 2, reserved: 0 }],
  ['feature DMA_LOGGING range', codec.dmaLoggingRange, { iova: 0xfeed_0000_0000n, length: 0x2_0000_0000n }],
  ['feature DMA_LOGGING_REPORT request', codec.dmaLoggingReport, { iova: 0x1_0000_0000n, length: 0x4000_0000n, pageSize: 0x1000n }],
];

describe('payload structures', () => {
  for (const [name, struct, value] of structCases) {
    it(`${name} round-trips with and without trailing data`, () => {
      const encoded = struct.encode(value as never);
      expect(encoded.length).toBe(struct.size);
      const { tail, ...decoded } = struct.decode(encoded) as Record<string, unknown> & { tail: Uint8Array };
      expect(decoded).toEqual(value);
      expect(tail.length).toBe(0);
      const withTail = struct.decode(struct.encode(value as never, bytes(7, 8, 9))) as { tail: Uint8Array };
      expect(Array.from(withTail.tail)).toEqual([7, 8, 9]);
      expect(() => struct.decode(encoded.subarray(0, struct.size - 1))).toThrow(codec.DecodeError);
    });
  }

  it('lays out DMA_MAP and REGION_READ at the offsets QEMU uses', () => {
    const map = codec.dmaMap.encode({ argsz: 32, flags: 3, offset: 1n, iova: 2n, size: 3n });
    expect(map.length).toBe(PayloadSize.DMA_MAP);
    expect([map[8], map[16], map[24]]).toEqual([1, 2, 3]);
    const read = codec.regionAccess.encode({ offset: 0x10n, region: 7, count: 4 });
    expect([read[0], read[8], read[12]]).toEqual([0x10, 7, 4]);
  });
});

describe('DEVICE_FEATURE (16) data', () => {
  it('lays the feature structures out as vfio-user.rst does (data at P+8)', () => {
    expect(codec.featureMigration.size).toBe(PayloadSize.FEATURE_MIGRATION);
    expect(codec.featureMigState.size).toBe(PayloadSize.FEATURE_MIG_STATE);
    expect(codec.dmaLoggingControl.size).toBe(PayloadSize.DMA_LOGGING_CONTROL);
    expect(codec.dmaLoggingReport.size).toBe(PayloadSize.DMA_LOGGING_REPORT);
    const report = codec.dmaLoggingReport.encode({ iova: 1n, length: 2n, pageSize: 3n });
    expect([report[0], report[8], report[16]]).toEqual([1, 2, 3]);
    const state = codec.featureMigState.encode({ deviceState: 4, dataFd: 5 });
    expect([state[0], state[4]]).toEqual([4, 5]);
  });

  it('round-trips DMA logging control with its ranges inline, and refuses ranges that do not fit', () => {
    const value = { pageSize: 0x2000n, ranges: [{ iova: 0x1_0000_0000n, length: 0x10_0000n }, { iova: 0n, length: 0xa_0000n }] };
    const encoded = codec.dmaLogging.encode(value);
    expect(encoded.length).toBe(PayloadSize.DMA_LOGGING_CONTROL + 2 * PayloadSize.DMA_LOGGING_RANGE);
    expect(codec.dmaLogging.decode(encoded)).toEqual(value);
    expect(codec.dmaLogging.decode(codec.dmaLogging.encode({ pageSize: 4096n, ranges: [] }))).toEqual({ pageSize: 4096n, ranges: [] });
    expect(() => codec.dmaLogging.decode(encoded.subarray(0, encoded.length - 1))).toThrow(codec.DecodeError);
  });
});

describe('VERSION (1)', () => {
  it('round-trips NUL-terminated JSON', () => {
    const json = '{"capabilities":{"max_msg_fds":16}}';
    const encoded = codec.version.encode({ major: 0, minor: 0, json });
    expect(encoded[encoded.length - 1]).toBe(0);
    expect(codec.version.decode(encoded)).toEqual({ major: 0, minor: 0, json });
    expect(codec.version.decode(bytes(0, 0, 1, 0))).toEqual({ major: 0, minor: 1, json: '' });
  });

  it('refuses JSON without its NUL', () => {
    expect(() => codec.version.decode(bytes(0, 0, 0, 0, 0x7b, 0x7d))).toThrow(/NUL/);
  });
});

describe('sparse mmap capability', () => {
  it('round-trips areas', () => {
    const areas = [{ offset: 0x1000n, size: 0x1000n }, { offset: 0x3000n, size: 0x2000n }];
    const cap = codec.encodeSparseMmapCap(areas);
    expect(cap.length).toBe(16 + 32);
    expect(codec.decodeSparseMmapCap(cap)).toEqual(areas);
    expect(() => codec.decodeSparseMmapCap(cap.subarray(0, 40))).toThrow(codec.DecodeError);
  });
});

describe('REGION_WRITE_MULTI (15)', () => {
  it('round-trips entries and refuses counts above 8 or a wrong total', () => {
    const entries = [
      { offset: 0x1000n, region: 0, count: 4, data: bytes(1, 2, 3, 4) },
      { offset: 0x2000n, region: 2, count: 8, data: bytes(1, 2, 3, 4, 5, 6, 7, 8) },
    ];
    const encoded = codec.writeMulti.encode(entries);
    expect(encoded.length).toBe(8 + 2 * 24);
    expect(codec.writeMulti.decode(encoded)).toEqual(entries);
    expect(() => codec.writeMulti.decode(encoded.subarray(0, 40))).toThrow(/entries/);
    const bad = codec.writeMulti.encode([{ offset: 0n, region: 0, count: 4, data: bytes(1) }]);
    bad[8 + 12] = 9;
    expect(() => codec.writeMulti.decode(bad)).toThrow(/exceeds 8/);
  });
});

describe('DMA_READ (11) and DMA_WRITE (12) framing', () => {
  it('puts a u64 count at payload+8 and data at payload+16, as QEMU 11.1.3 requires', () => {
    const data = bytes(0xaa, 0xbb);
    const request = codec.encodeMessage(
      { id: 1, command: Command.DMA_WRITE, flags: 0, error: 0 },
      codec.dmaAccess.encode({ address: 0x1000n, count: 2n }, data),
    );
    expect(request.length).toBe(32 + 2);
    expect(new DataView(request.buffer).getBigUint64(24, true)).toBe(2n);
    expect(Array.from(request.subarray(32))).toEqual([0xaa, 0xbb]);
  });
});

describe('message framer', () => {
  const msg = (id: number, payload: number[]): Uint8Array =>
    codec.encodeMessage({ id, command: Command.REGION_WRITE, flags: 0, error: 0 }, new Uint8Array(payload));

  it('reassembles messages split at every byte and attaches fds to the message their chunk ends in', () => {
    const stream = new Uint8Array([...msg(1, [1, 2, 3]), ...msg(2, []), ...msg(3, [9])]);
    const framer = new MessageFramer(1024);
    const out: codec.Message[] = [];
    for (let i = 0; i < stream.length; i++) out.push(...framer.push(stream.subarray(i, i + 1), i === 19 ? [42] : []).messages);
    expect(out.map((m) => m.header.id)).toEqual([1, 2, 3]);
    expect(out.map((m) => m.fds)).toEqual([[], [42], []]);
    expect(Array.from(out[0]!.payload)).toEqual([1, 2, 3]);
    expect(framer.bufferedBytes).toBe(0);
  });

  it('gives a chunk\'s fds to the last message starting in it (earlier bytes may precede them)', () => {
    const framer = new MessageFramer(1024);
    const first = msg(1, [1, 2, 3, 4]);
    const out = framer.push(first.subarray(0, 10), []).messages;
    // The tail of message 1 and the whole of message 2 arrive together with message 2's fd.
    out.push(...framer.push(new Uint8Array([...first.subarray(10), ...msg(2, [2])]), [5]).messages);
    expect(out.map((m) => m.header.id)).toEqual([1, 2]);
    expect(out.map((m) => m.fds)).toEqual([[], [5]]);
    // A chunk that ends inside a message: the fds wait for that message.
    const partial = msg(3, [7, 7, 7]);
    expect(framer.push(partial.subarray(0, 12), [6]).messages).toEqual([]);
    expect(framer.push(partial.subarray(12), []).messages[0]!.fds).toEqual([6]);
  });

  it('declares the stream unusable for sizes below the header or above the limit', () => {
    const tooSmall = msg(1, []);
    tooSmall[4] = 8;
    expect(new MessageFramer(1024).push(tooSmall, []).error).toBeInstanceOf(FramingError);
    expect(new MessageFramer(20).push(msg(1, new Array(10).fill(0)), []).error?.message).toMatch(/outside/);
  });

  it('declares the stream unusable when a peer hoards fds on an incomplete message', () => {
    const framer = new MessageFramer(1 << 20, 16);
    const big = msg(1, new Array(1000).fill(0));
    expect(framer.push(big.subarray(0, 20), Array.from({ length: 16 }, (_, i) => i)).error).toBeUndefined();
    const { error } = framer.push(big.subarray(20, 30), Array.from({ length: 17 }, (_, i) => 100 + i));
    expect(error?.message).toMatch(/33 fds wait/);
    expect(framer.drainFds()).toHaveLength(33);
  });

  it('still hands over the good messages (and their fds) that precede a bad header', () => {
    const bad = msg(2, []);
    bad[4] = 3;
    const { messages, error } = new MessageFramer(1024).push(new Uint8Array([...msg(1, [1]), ...bad]), [9]);
    expect(error).toBeInstanceOf(FramingError);
    expect(messages.map((m) => m.header.id)).toEqual([1]);
  });
});
