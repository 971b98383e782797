// Little-endian fixed layouts described once as data, so every vfio-user structure is encoded and
// decoded by the same few lines instead of one hand-written DataView dance per command.

export type FieldType = 'u8' | 'u16' | 'u32' | 'u64';
export type Field = readonly [name: string, type: FieldType];
export type Layout = readonly Field[];

type FieldValue<T extends FieldType> = T extends 'u64' ? bigint : number;
export type StructOf<L extends Layout> = { [F in L[number] as F[0]]: FieldValue<F[1]> };

const FIELD_SIZE: Record<FieldType, number> = { u8: 1, u16: 2, u32: 4, u64: 8 };

export class DecodeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DecodeError';
  }
}

export interface StructCodec<L extends Layout> {
  readonly size: number;
  encode(value: StructOf<L>, tail?: Uint8Array): Uint8Array;
  /** Decodes the fixed part; `tail` is whatever follows it. */
  decode(bytes: Uint8Array, what?: string): StructOf<L> & { tail: Uint8Array };
}

export function struct<const L extends Layout>(layout: L): StructCodec<L> {
  const offsets: number[] = [];
  let size = 0;
  for (const [, type] of layout) {
    offsets.push(size);
    size += FIELD_SIZE[type];
  }
  return {
    size,
    encode(value, tail) {
      const out = new Uint8Array(size + (tail?.length ?? 0));
      const view = new DataView(out.buffer);
      const record = value as Record<string, number | bigint>;
      layout.forEach(([name, type], i) => {
        const v = record[name];
        if (v === undefined) throw new TypeError(`missing field ${name}`);
        writeField(view, offsets[i]!, type, v);
      });
      if (tail) out.set(tail, size);
      return out;
    },
    decode(bytes, what = 'structure') {
      if (bytes.length < size) {
        throw new DecodeError(`${what}: ${bytes.length} bytes, need ${size}`);
      }
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const out: Record<string, number | bigint | Uint8Array> = {};
      layout.forEach(([name, type], i) => {
        out[name] = readField(view, offsets[i]!, type);
      });
      out.tail = bytes.subarray(size);
      return out as StructOf<L> & { tail: Uint8Array };
    },
  };
}

function writeField(view: DataView, offset: number, type: FieldType, value: number | bigint): void {
  switch (type) {
    case 'u8':
      view.setUint8(offset, Number(value));
      break;
    case 'u16':
      view.setUint16(offset, Number(value), true);
      break;
    case 'u32':
      view.setUint32(offset, Number(value), true);
      break;
    case 'u64':
      view.setBigUint64(offset, BigInt(value), true);
      break;
  }
}

function readField(view: DataView, offset: number, type: FieldType): number | bigint {
  switch (type) {
    case 'u8':
      return view.getUint8(offset);
    case 'u16':
      return view.getUint16(offset, true);
    case 'u32':
      return view.getUint32(offset, true);
    case 'u64':
      return view.getBigUint64(offset, true);
  }
}
