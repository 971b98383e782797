// A client of a server's control socket: one connection, requests answered in order.

import { connect, type Socket } from 'node:net';
import {
  CONTROL_PROTOCOL_VERSION,
  decodeResponse,
  encodeRequest,
  FrameReader,
  type ControlRequest,
  type ControlResponse,
} from './messages.js';

/** Where a control socket listens: `unix:PATH`, `tcp:HOST:PORT`, or a bare path. */
export type ControlAddress = { path: string } | { host: string; port: number };

export function parseControlAddress(text: string): ControlAddress {
  if (text.startsWith('tcp:')) {
    const rest = text.slice(4);
    const colon = rest.lastIndexOf(':');
    const port = Number(rest.slice(colon + 1));
    const host = rest.slice(0, colon).replace(/^\[(.*)\]$/, '$1');
    if (colon <= 0 || !Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`'${text}' is not tcp:HOST:PORT`);
    return { host, port };
  }
  const path = text.startsWith('unix:') ? text.slice(5) : text;
  if (path === '') throw new Error('an empty control socket path');
  return { path };
}

export const formatControlAddress = (a: ControlAddress): string => ('path' in a ? a.path : `tcp:${a.host}:${a.port}`);

export class ControlClient {
  private readonly reader = new FrameReader();
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve(r: ControlResponse): void; reject(e: Error): void }>();
  private closedWith: Error | null = null;

  private constructor(
    private readonly socket: Socket,
    private readonly token: string | undefined,
  ) {
    socket.on('data', (chunk: Buffer) => {
      try {
        for (const body of this.reader.push(chunk)) {
          const response = decodeResponse(body);
          // A request the server could not decode is answered with id 0: it was the oldest one.
          const key = this.waiting.has(response.id) || response.id !== 0 ? response.id : this.waiting.keys().next().value;
          const waiter = key === undefined ? undefined : this.waiting.get(key);
          if (!waiter) continue;
          this.waiting.delete(key!);
          waiter.resolve(response);
        }
      } catch (error) {
        this.fail(error as Error);
      }
    });
    socket.on('error', (error) => this.fail(error));
    socket.on('close', () => this.fail(new Error('the server closed the control connection')));
  }

  static connect(address: ControlAddress, options: { token?: string; timeoutMs?: number } = {}): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const socket = 'path' in address ? connect(address.path) : connect(address.port, address.host);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`no answer from the control socket ${formatControlAddress(address)}`));
      }, options.timeoutMs ?? 5000);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new ControlClient(socket, options.token));
      });
      socket.once('error', (error: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        const why = error.code === 'ENOENT' || error.code === 'ECONNREFUSED' ? 'no server is listening there' : error.message;
        reject(new Error(`cannot reach the control socket ${formatControlAddress(address)}: ${why}`));
      });
    });
  }

  /** Sends one operation (version, id and token are filled in) and waits for its response. */
  request(operation: Omit<ControlRequest, 'version' | 'id' | 'token'>, version = CONTROL_PROTOCOL_VERSION): Promise<ControlResponse> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.socket.write(encodeRequest({ ...operation, version, id, ...(this.token !== undefined ? { token: this.token } : {}) }));
    });
  }

  /** Writes raw bytes (tests of malformed input). */
  sendRaw(bytes: Uint8Array): void {
    this.socket.write(bytes);
  }

  /** Waits for the next response to nothing in particular (after sendRaw). */
  nextResponse(): Promise<ControlResponse> {
    return new Promise((resolve, reject) => this.waiting.set(0, { resolve, reject }));
  }

  close(): void {
    this.socket.destroy();
  }

  private fail(error: Error): void {
    if (this.closedWith) return;
    this.closedWith = error;
    for (const waiter of this.waiting.values()) waiter.reject(error);
    this.waiting.clear();
    this.socket.destroy();
  }
}
