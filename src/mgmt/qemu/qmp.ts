// A QMP client (QEMU Machine Protocol): one JSON object per line over a unix or TCP socket.
//
// Commands carry an `id` that QEMU echoes, so a reply finds its request even if a caller stops
// waiting; QEMU answers in order anyway. Events are numbered as they arrive and the last few
// hundred are kept, so a caller can take a cursor *before* issuing a command and then wait for an
// event the command caused, even if QEMU sent it before the command's own reply (it does: the
// `setup` MIGRATION event precedes `migrate`'s return, RESUME precedes `cont`'s).

import * as net from 'node:net';
import { parseControlAddress, type ControlAddress } from '../control/client.js';

export type QmpAddress = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

/**
 * Parses `unix:PATH` or `tcp:HOST:PORT` (IPv6 hosts in brackets: `tcp:[::1]:4444`) with the control
 * plane's parser; unlike a control address, the scheme is required.
 */
export function parseQmpAddress(address: string): QmpAddress {
  const tcp = address.startsWith('tcp:');
  if (!tcp && !address.startsWith('unix:')) throw new Error(`QMP address "${address}" must start with unix: or tcp:`);
  let parsed: ControlAddress | undefined;
  try {
    parsed = parseControlAddress(address);
  } catch {
    parsed = undefined;
  }
  if (parsed && 'path' in parsed) return { kind: 'unix', path: parsed.path };
  if (parsed && parsed.host !== '') return { kind: 'tcp', host: parsed.host, port: parsed.port };
  throw new Error(tcp ? `QMP address "${address}" is not tcp:HOST:PORT` : `QMP address "${address}" has an empty socket path`);
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
  /** Arrival number on this connection, starting at 0: compare with an EventCursor. */
  seq: number;
}

/** The arrival number the next event will get; `waitForEvent(..., { since })` looks back to it. */
export type EventCursor = number;

/** QEMU refused a command: `errorClass` and `desc` are QMP's `error.class` and `error.desc`. */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

/** The connection is gone (or never came up); `command` is the request that was waiting, if any. */
export class QmpConnectionError extends Error {
  constructor(
    message: string,
    readonly command?: string,
  ) {
    super(message);
    this.name = 'QmpConnectionError';
  }
}

export class QmpEventTimeoutError extends Error {
  constructor(
    readonly eventName: string,
    readonly timeoutMs: number,
  ) {
    super(`no QMP event ${eventName} matched within ${timeoutMs} ms`);
    this.name = 'QmpEventTimeoutError';
  }
}

export interface QmpConnectOptions {
  /**
   * Bound for the whole handshake. A socket that does not exist yet or refuses is retried until
   * then, because QEMU creates its QMP socket a moment after it is spawned.
   */
  timeoutMs?: number;
  /** How many recent events to keep for cursors (default 256). */
  eventBufferSize?: number;
}

export type EventPredicate = (event: QmpEvent) => boolean;

interface PendingCommand {
  command: string;
  resolve(value: unknown): void;
  reject(error: Error): void;
}

interface EventWaiter {
  matches(event: QmpEvent): boolean;
  resolve(event: QmpEvent): void;
  reject(error: Error): void;
}

const CONNECT_RETRY_MS = 50;
const RETRYABLE_CONNECT_ERRORS = new Set(['ENOENT', 'ECONNREFUSED']);

export class QmpClient {
  private readonly pending = new Map<number, PendingCommand>();
  private readonly listeners = new Set<(event: QmpEvent) => void>();
  private readonly waiters = new Set<EventWaiter>();
  private readonly recentEvents: QmpEvent[] = [];
  private nextId = 1;
  private nextEventSeq = 0;
  private lineBuffer = '';
  private closedBy: QmpConnectionError | null = null;
  private readonly socketClosed: Promise<void>;
  private greetingReceived!: (greeting: QmpGreeting) => void;
  private greetingLost!: (error: Error) => void;
  private readonly greetingPromise: Promise<QmpGreeting>;
  private receivedGreeting: QmpGreeting | null = null;

  private constructor(
    private readonly socket: net.Socket,
    readonly address: string,
    private readonly eventBufferSize: number,
  ) {
    this.greetingPromise = new Promise((resolve, reject) => {
      this.greetingReceived = resolve;
      this.greetingLost = reject;
    });
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.receive(chunk));
    // QEMU exiting shows up as a clean EOF or as ECONNRESET depending on timing; 'close' follows either.
    let socketError: Error | undefined;
    socket.on('error', (error) => (socketError = error));
    this.socketClosed = new Promise((resolve) =>
      socket.on('close', () => {
        const detail = socketError ? ` (${socketError.message})` : '';
        this.fail(new QmpConnectionError(`QMP connection to ${address} closed by QEMU${detail}`));
        resolve();
      }),
    );
  }

  /** Connects, reads the greeting and leaves capabilities negotiation mode (`qmp_capabilities`). */
  static async connect(address: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const target = parseQmpAddress(address);
    const timeoutMs = options.timeoutMs ?? 10_000;
    const deadline = Date.now() + timeoutMs;
    const socket = await connectWithRetry(target, address, deadline);
    const client = new QmpClient(socket, address, options.eventBufferSize ?? 256);
    let timer: NodeJS.Timeout | undefined;
    const handshakeTimeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new QmpConnectionError(`QMP handshake with ${address} did not finish within ${timeoutMs} ms`)),
        Math.max(0, deadline - Date.now()),
      );
    });
    try {
      client.receivedGreeting = await Promise.race([client.greetingPromise, handshakeTimeout]);
      await Promise.race([client.execute('qmp_capabilities'), handshakeTimeout]);
      return client;
    } catch (error) {
      client.socket.destroy();
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  /** What QEMU announced: its version and the optional capabilities it offers. */
  get greeting(): QmpGreeting {
    if (!this.receivedGreeting) throw new Error('QMP greeting not received yet');
    return this.receivedGreeting;
  }

  get closed(): boolean {
    return this.closedBy !== null;
  }

  /** Runs a command; resolves with its `return`, rejects with QmpError or QmpConnectionError. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedBy) {
      return Promise.reject(new QmpConnectionError(`${this.closedBy.message}; cannot run ${command}`, command));
    }
    const id = this.nextId++;
    const message: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) message.arguments = args;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { command, resolve: resolve as (value: unknown) => void, reject });
      this.socket.write(`${JSON.stringify(message)}\n`);
    });
  }

  /** A human monitor (HMP) command through `human-monitor-command`; HMP reports its own errors as text. */
  hmp(commandLine: string): Promise<string> {
    return this.execute<string>('human-monitor-command', { 'command-line': commandLine });
  }

  /** Calls `listener` for every event from now on; returns the unsubscribe function. */
  onEvent(listener: (event: QmpEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Take this before issuing a command whose events you will wait for, then pass it as `since`. */
  eventCursor(): EventCursor {
    return this.nextEventSeq;
  }

  /**
   * Resolves with the first event called `name` (and accepted by `predicate`) that arrives after
   * the call, or, with `since`, the first one from that cursor on, buffered ones included.
   * Rejects after `timeoutMs`, when the connection closes, or when the buffer no longer reaches
   * back to `since` (an event might have been lost, and silence would be a lie).
   */
  waitForEvent(name: string, predicate?: EventPredicate, timeoutMs = 10_000, options: { since?: EventCursor } = {}): Promise<QmpEvent> {
    const matches = (event: QmpEvent): boolean => event.event === name && (predicate === undefined || predicate(event));
    const since = options.since;
    if (since !== undefined) {
      const oldestKept = this.recentEvents[0]?.seq ?? this.nextEventSeq;
      if (since < oldestKept) {
        return Promise.reject(
          new Error(`cannot wait for ${name} since event ${since}: only events from ${oldestKept} on are still buffered`),
        );
      }
      const buffered = this.recentEvents.find((event) => event.seq >= since && matches(event));
      if (buffered) return Promise.resolve(buffered);
    }
    if (this.closedBy) return Promise.reject(this.closedBy);
    return new Promise<QmpEvent>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        reject(new QmpEventTimeoutError(name, timeoutMs));
      }, timeoutMs);
      const settle = (action: () => void): void => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
        action();
      };
      const waiter: EventWaiter = {
        matches,
        resolve: (event) => settle(() => resolve(event)),
        reject: (error) => settle(() => reject(error)),
      };
      this.waiters.add(waiter);
    });
  }

  /** Closes the connection; pending commands and event waits reject. */
  async close(): Promise<void> {
    if (!this.closedBy) this.fail(new QmpConnectionError(`QMP connection to ${this.address} closed by the client`));
    this.socket.end();
    const forced = setTimeout(() => this.socket.destroy(), 1000);
    await this.socketClosed;
    clearTimeout(forced);
  }

  private receive(chunk: string): void {
    this.lineBuffer += chunk;
    let newline: number;
    while ((newline = this.lineBuffer.indexOf('\n')) >= 0) {
      const line = this.lineBuffer.slice(0, newline).trim();
      this.lineBuffer = this.lineBuffer.slice(newline + 1);
      if (line === '') continue;
      let message: Record<string, unknown>;
      try {
        message = JSON.parse(line) as Record<string, unknown>;
      } catch {
        this.fail(new QmpConnectionError(`QMP peer ${this.address} sent a line that is not JSON: ${line.slice(0, 200)}`));
        this.socket.destroy();
        return;
      }
      this.dispatch(message);
    }
  }

  private dispatch(message: Record<string, unknown>): void {
    if ('QMP' in message) {
      this.greetingReceived(message.QMP as QmpGreeting);
    } else if ('event' in message) {
      this.deliverEvent(message);
    } else if ('return' in message || 'error' in message) {
      this.settleCommand(message);
    }
  }

  private settleCommand(message: Record<string, unknown>): void {
    // A reply without an id (QEMU could not parse the request) belongs to the oldest request.
    const id = typeof message.id === 'number' ? message.id : this.pending.keys().next().value;
    const request = id === undefined ? undefined : this.pending.get(id);
    if (!request || id === undefined) return; // a late reply to nobody we still know
    this.pending.delete(id);
    if ('error' in message) {
      const error = message.error as { class?: string; desc?: string };
      request.reject(new QmpError(request.command, error.class ?? 'GenericError', error.desc ?? JSON.stringify(error)));
    } else {
      request.resolve(message.return);
    }
  }

  private deliverEvent(message: Record<string, unknown>): void {
    const event: QmpEvent = {
      event: String(message.event),
      data: (message.data as Record<string, unknown> | undefined) ?? {},
      timestamp: (message.timestamp as QmpEvent['timestamp'] | undefined) ?? { seconds: 0, microseconds: 0 },
      seq: this.nextEventSeq++,
    };
    this.recentEvents.push(event);
    if (this.recentEvents.length > this.eventBufferSize) this.recentEvents.shift();
    for (const listener of [...this.listeners]) {
      try {
        listener(event);
      } catch (error) {
        // A listener's bug must not desynchronize this connection; it still surfaces, uncaught.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
    for (const waiter of [...this.waiters]) {
      let matched: boolean;
      try {
        matched = waiter.matches(event);
      } catch (error) {
        waiter.reject(error as Error); // a throwing predicate ends its own wait, nobody else's
        continue;
      }
      if (matched) waiter.resolve(event);
    }
  }

  private fail(reason: QmpConnectionError): void {
    if (this.closedBy) return;
    this.closedBy = reason;
    this.greetingLost(reason);
    for (const [id, request] of this.pending) {
      this.pending.delete(id);
      request.reject(new QmpConnectionError(`${reason.message} while ${request.command} was pending`, request.command));
    }
    for (const waiter of [...this.waiters]) waiter.reject(reason);
  }
}

async function connectWithRetry(target: QmpAddress, address: string, deadline: number): Promise<net.Socket> {
  for (;;) {
    try {
      return await connectOnce(target);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code ?? '';
      if (!RETRYABLE_CONNECT_ERRORS.has(code) || Date.now() + CONNECT_RETRY_MS > deadline) {
        throw new QmpConnectionError(`cannot connect to QMP at ${address}: ${(error as Error).message}`);
      }
      await new Promise((resolve) => setTimeout(resolve, CONNECT_RETRY_MS));
    }
  }
}

function connectOnce(target: QmpAddress): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket =
      target.kind === 'unix' ? net.connect({ path: target.path }) : net.connect({ host: target.host, port: target.port });
    socket.once('connect', () => {
      socket.off('error', reject);
      resolve(socket);
    });
    socket.once('error', reject);
  });
}
