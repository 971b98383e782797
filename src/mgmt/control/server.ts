// The control socket: length-prefixed protobuf requests (control.proto) answered in order, one
// connection at a time each. A request of another protocol version, a malformed body or an
// operation that fails gets an error response; the connection and the server go on. Only a frame
// whose length cannot be trusted ends that one connection.

import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from '../../log.js';
import {
  CONTROL_PROTOCOL_VERSION,
  decodeRequest,
  encodeResponse,
  FrameReader,
  operationOf,
  type ControlRequest,
  type ControlResponse,
  type NamespaceAddRequest,
  type ServerStatus,
} from './messages.js';

export interface AdminOutcome {
  status: number;
  statusName: string;
  dw0: number;
  dw1: number;
  data?: Uint8Array;
  detail?: string;
}

/** What the control plane operates on (the server host implements it). */
export interface ControlTarget {
  /** Submits an admin command to the primary controller, as its admin queue would. */
  admin(command: Uint8Array, data?: Uint8Array): Promise<AdminOutcome>;
  addNamespace(request: NamespaceAddRequest): Promise<number>;
  removeNamespace(nsid: number): Promise<void>;
  exportController(cntlid: number, socket: string): void;
  unexportController(cntlid: number): void;
  status(): ServerStatus;
  setWriteThrough(cntlid: number, on: boolean): Promise<void>;
  clientRead(cntlid: number, address: number, length: number): Promise<Uint8Array>;
  clientWrite(cntlid: number, address: number, data: Uint8Array): Promise<void>;
}

/** A request the target refuses, with the one line the client prints. */
export class ControlError extends Error {}

export interface ControlServerOptions {
  target: ControlTarget;
  log: Logger;
  /** Required in every request when set (TCP listeners). */
  token?: string;
}

export class ControlServer {
  private server: Server | null = null;
  private readonly sockets = new Set<Socket>();

  constructor(private readonly options: ControlServerOptions) {}

  /** Starts listening on a unix socket path or a {host, port}; resolves once bound. */
  listen(where: string | { host: string; port: number }): Promise<void> {
    const server = createServer((socket) => this.serve(socket));
    this.server = server;
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      const done = (): void => {
        server.off('error', reject);
        server.on('error', (error) => this.options.log.error(`control socket: ${error.message}`));
        resolve();
      };
      if (typeof where === 'string') server.listen(where, done);
      else server.listen(where.port, where.host, done);
    });
  }

  /** The TCP port actually bound (for port 0). */
  get port(): number | null {
    const address = this.server?.address();
    return address && typeof address === 'object' ? address.port : null;
  }

  close(): void {
    this.server?.close();
    this.server = null;
    for (const socket of this.sockets) socket.destroy();
    this.sockets.clear();
  }

  private serve(socket: Socket): void {
    this.sockets.add(socket);
    const reader = new FrameReader();
    let queue = Promise.resolve();
    socket.on('data', (chunk: Buffer) => {
      let bodies: Uint8Array[];
      try {
        bodies = reader.push(chunk);
      } catch (error) {
        this.options.log.warn(`control client sent an untrustworthy frame (${(error as Error).message}); disconnecting it`);
        socket.destroy();
        return;
      }
      for (const body of bodies) {
        queue = queue.then(async () => {
          const response = await this.handle(body);
          if (!socket.destroyed) socket.write(encodeResponse(response));
        });
      }
    });
    socket.on('error', () => socket.destroy());
    socket.on('close', () => this.sockets.delete(socket));
  }

  private async handle(body: Uint8Array): Promise<ControlResponse> {
    let request: ControlRequest;
    try {
      request = decodeRequest(body);
    } catch (error) {
      return { version: CONTROL_PROTOCOL_VERSION, id: 0, error: `malformed request: ${(error as Error).message}` };
    }
    const reply = { version: CONTROL_PROTOCOL_VERSION, id: request.id };
    if (request.version !== CONTROL_PROTOCOL_VERSION) {
      return { ...reply, error: `control protocol version ${request.version} is not supported (this server speaks ${CONTROL_PROTOCOL_VERSION})` };
    }
    if (this.options.token !== undefined && request.token !== this.options.token) return { ...reply, error: 'missing or wrong control token' };
    const operation = operationOf(request);
    if (!operation) return { ...reply, error: 'a request names exactly one operation' };
    const target = this.options.target;
    try {
      switch (operation) {
        case 'admin': {
          const admin = request.admin!;
          if (!admin.command || admin.command.length !== 64) throw new ControlError(`an admin command is 64 bytes, got ${admin.command?.length ?? 0}`);
          const outcome = await target.admin(admin.command, admin.data && admin.data.length > 0 ? admin.data : undefined);
          return { ...reply, admin: { ...outcome, data: outcome.data ?? new Uint8Array(0), detail: outcome.detail ?? '' } };
        }
        case 'namespaceAdd':
          return { ...reply, nsid: await target.addNamespace(request.namespaceAdd!) };
        case 'namespaceRemove':
          await target.removeNamespace(request.namespaceRemove!.nsid);
          return reply;
        case 'export':
          target.exportController(request.export!.cntlid, request.export!.socket);
          return reply;
        case 'unexport':
          target.unexportController(request.unexport!.cntlid);
          return reply;
        case 'status':
          return { ...reply, status: target.status() };
        case 'writeThrough':
          await target.setWriteThrough(request.writeThrough!.cntlid, request.writeThrough!.on === true);
          return reply;
        case 'clientMemory': {
          const { cntlid, address, readLength, writeData } = request.clientMemory!;
          if (writeData && writeData.length > 0) {
            await target.clientWrite(cntlid, address ?? 0, writeData);
            return reply;
          }
          if (!readLength || readLength > 1 << 20) throw new ControlError(`read length ${readLength ?? 0} (1 byte to 1 MiB)`);
          return { ...reply, data: await target.clientRead(cntlid, address ?? 0, readLength) };
        }
      }
    } catch (error) {
      if (!(error instanceof ControlError)) this.options.log.error(`control ${operation} failed: ${(error as Error).stack ?? String(error)}`);
      return { ...reply, error: (error as Error).message };
    }
  }
}
