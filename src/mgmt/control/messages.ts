// The control protocol's messages (control.proto) as TypeScript types, their protobuf encoding,
// and the length-prefixed framing both ends use.

import type protobuf from 'protobufjs';
import { PLAIN, protoTypes } from '../../protobuf.js';

export const CONTROL_PROTOCOL_VERSION = 1;
/** A frame longer than this is a broken or hostile peer: the connection is dropped. */
export const MAX_FRAME_BYTES = 16 << 20;
const LENGTH_PREFIX = 4;

export interface AdminCommandRequest {
  command: Uint8Array;
  data?: Uint8Array;
}

export interface NamespaceAddRequest {
  nsid?: number;
  file?: string;
  size?: number;
  blockSize?: number;
  attachAll?: boolean;
  /** 'io_uring' or 'threads'; absent: the server's default. */
  aio?: string;
  /** 'writeback', 'none', 'writethrough' or 'directsync'; absent: 'writeback'. */
  cache?: string;
}

export interface ControlRequest {
  version: number;
  id: number;
  token?: string;
  admin?: AdminCommandRequest;
  namespaceAdd?: NamespaceAddRequest;
  namespaceRemove?: { nsid: number };
  export?: { cntlid: number; socket: string };
  unexport?: { cntlid: number };
  status?: Record<string, never>;
  writeThrough?: { cntlid: number; on: boolean };
  clientMemory?: { cntlid: number; address: number; readLength?: number; writeData?: Uint8Array };
}

export type Operation = 'admin' | 'namespaceAdd' | 'namespaceRemove' | 'export' | 'unexport' | 'status' | 'writeThrough' | 'clientMemory';
export const OPERATIONS: readonly Operation[] = ['admin', 'namespaceAdd', 'namespaceRemove', 'export', 'unexport', 'status', 'writeThrough', 'clientMemory'];

export interface AdminResultMessage {
  status: number;
  statusName: string;
  dw0: number;
  dw1: number;
  data: Uint8Array;
  detail: string;
}

export interface ControllerStatus {
  cntlid: number;
  role: 'primary' | 'secondary' | 'peer';
  online: boolean;
  vq: number;
  vi: number;
  socket: string;
  clientConnected: boolean;
  virtualNqn: string;
  virtualCntlid: number;
  runState: string;
  enabled: boolean;
  namespaces: number[];
  dmaWriteBytes: number;
  writeThrough: boolean;
}

export interface NamespaceStatus {
  nsid: number;
  backend: string;
  size: number;
  blockSize: number;
  /** A file namespace's aio; empty for RAM. */
  aio: string;
  /** A file namespace's cache mode; empty for RAM. */
  cache: string;
}

export interface VirtualSubsystemStatus {
  nqn: string;
  serial: string;
  model: string;
  firmware: string;
  controllers: { cntlid: number; virtualCntlid: number }[];
}

export interface ServerStatus {
  nqn: string;
  control: string;
  controllers: ControllerStatus[];
  namespaces: NamespaceStatus[];
  virtualSubsystems: VirtualSubsystemStatus[];
}

export interface ControlResponse {
  version: number;
  id: number;
  error?: string;
  admin?: AdminResultMessage;
  status?: ServerStatus;
  nsid?: number;
  data?: Uint8Array;
}

const messageTypes = (): { request: protobuf.Type; response: protobuf.Type } => {
  const types = protoTypes(import.meta.url, './control.proto', ['nvme_vfio_user.control.v1.Request', 'nvme_vfio_user.control.v1.Response'] as const);
  return { request: types['nvme_vfio_user.control.v1.Request'], response: types['nvme_vfio_user.control.v1.Response'] };
};

export function encodeRequest(request: ControlRequest): Uint8Array {
  const { request: type } = messageTypes();
  return frame(type.encode(type.fromObject(request)).finish());
}

export function encodeResponse(response: ControlResponse): Uint8Array {
  const { response: type } = messageTypes();
  return frame(type.encode(type.fromObject(response)).finish());
}

/** Decodes one Request body; throws on bytes that are not one. */
export function decodeRequest(body: Uint8Array): ControlRequest {
  const { request: type } = messageTypes();
  const object = type.toObject(type.decode(body), PLAIN) as ControlRequest;
  return { ...object, version: object.version ?? 0, id: object.id ?? 0 };
}

export function decodeResponse(body: Uint8Array): ControlResponse {
  const { response: type } = messageTypes();
  // Defaults on: an admin result of status 0 and no data still has every field.
  return type.toObject(type.decode(body), { ...PLAIN, defaults: true }) as ControlResponse;
}

/** Which operation a request asks for (exactly one), or null. */
export function operationOf(request: ControlRequest): Operation | null {
  const present = OPERATIONS.filter((op) => request[op] !== undefined && request[op] !== null);
  return present.length === 1 ? present[0]! : null;
}

function frame(body: Uint8Array): Uint8Array {
  const out = new Uint8Array(LENGTH_PREFIX + body.length);
  new DataView(out.buffer).setUint32(0, body.length, true);
  out.set(body, LENGTH_PREFIX);
  return out;
}

/** Splits a byte stream into frame bodies. */
export class FrameReader {
  private buffer = new Uint8Array(0);

  /** Returns the complete bodies; throws when a length cannot be trusted. */
  push(chunk: Uint8Array): Uint8Array[] {
    const merged = new Uint8Array(this.buffer.length + chunk.length);
    merged.set(this.buffer);
    merged.set(chunk, this.buffer.length);
    const bodies: Uint8Array[] = [];
    let at = 0;
    while (merged.length - at >= LENGTH_PREFIX) {
      const length = new DataView(merged.buffer, at).getUint32(0, true);
      if (length > MAX_FRAME_BYTES) throw new Error(`frame of ${length} bytes exceeds ${MAX_FRAME_BYTES}`);
      if (merged.length - at - LENGTH_PREFIX < length) break;
      bodies.push(merged.slice(at + LENGTH_PREFIX, at + LENGTH_PREFIX + length));
      at += LENGTH_PREFIX + length;
    }
    this.buffer = merged.slice(at);
    return bodies;
  }
}
