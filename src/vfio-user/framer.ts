// Turns the byte stream of a unix socket back into whole vfio-user messages. fds ride on the first
// byte of the sendmsg that carried them, but one recvmsg may also return bytes of earlier messages
// in front of it; the kernel ends that read at or inside the fd-carrying message. So a chunk's fds
// belong to the message in which the chunk ends.

import { decodeHeader, type Message } from './codec.js';
import { HEADER_SIZE } from './protocol.js';

export class FramingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FramingError';
  }
}

export class MessageFramer {
  private chunks: Uint8Array[] = [];
  private buffered = 0;
  /** Stream offset of the first buffered byte. */
  private consumed = 0;
  /** fds not yet given to a message, keyed by the stream offset where their chunk ended. */
  private pendingFds: { chunkEnd: number; fds: number[] }[] = [];

  constructor(
    private readonly maxMessageSize: number,
    /** fds one message may carry; more waiting for an incomplete message is an fd-exhaustion attack. */
    private readonly maxMessageFds = Number.MAX_SAFE_INTEGER,
  ) {}

  /**
   * Adds one received chunk and returns every message it completes. `error` is set when a header
   * announces an impossible size: the messages before it are still good (and own their fds), but
   * past that point the stream cannot be trusted.
   */
  push(chunk: Uint8Array, fds: readonly number[]): { messages: Message[]; error?: FramingError } {
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    if (fds.length > 0) this.pendingFds.push({ chunkEnd: this.consumed + this.buffered, fds: [...fds] });
    const out: Message[] = [];
    const waiting = this.pendingFds.reduce((n, e) => n + e.fds.length, 0);
    if (waiting > 2 * this.maxMessageFds) {
      // Allow the fds of two messages in flight; more means a peer is hoarding our fd table.
      return { messages: out, error: new FramingError(`${waiting} fds wait for incomplete messages (at most ${this.maxMessageFds} per message)`) };
    }
    for (;;) {
      if (this.buffered < HEADER_SIZE) break;
      const header = decodeHeader(this.peek(HEADER_SIZE));
      if (header.size < HEADER_SIZE || header.size > this.maxMessageSize) {
        const error = new FramingError(
          `message size ${header.size} outside [${HEADER_SIZE}, ${this.maxMessageSize}] (command ${header.command})`,
        );
        return { messages: out, error };
      }
      if (this.buffered < header.size) break;
      const start = this.consumed;
      const whole = this.take(header.size);
      this.consumed += header.size;
      out.push({ header, payload: whole.subarray(HEADER_SIZE), fds: this.takeFds(start, this.consumed) });
    }
    return { messages: out };
  }

  /** fds received but not yet attached to a complete message (the caller closes them on teardown). */
  drainFds(): number[] {
    const fds = this.pendingFds.flatMap((entry) => entry.fds);
    this.pendingFds = [];
    return fds;
  }

  private takeFds(messageStart: number, messageEnd: number): number[] {
    const mine = this.pendingFds.filter((e) => e.chunkEnd > messageStart && e.chunkEnd <= messageEnd);
    if (mine.length === 0) return [];
    this.pendingFds = this.pendingFds.filter((e) => !mine.includes(e));
    return mine.flatMap((e) => e.fds);
  }

  get bufferedBytes(): number {
    return this.buffered;
  }

  private peek(length: number): Uint8Array {
    const first = this.chunks[0]!;
    if (first.length >= length) return first.subarray(0, length);
    return this.concat(length, false);
  }

  private take(length: number): Uint8Array {
    const first = this.chunks[0]!;
    if (first.length === length) {
      this.chunks.shift();
      this.buffered -= length;
      return first;
    }
    if (first.length > length) {
      this.chunks[0] = first.subarray(length);
      this.buffered -= length;
      return first.subarray(0, length);
    }
    return this.concat(length, true);
  }

  private concat(length: number, consume: boolean): Uint8Array {
    const out = new Uint8Array(length);
    let filled = 0;
    let index = 0;
    while (filled < length) {
      const chunk = this.chunks[index]!;
      const part = Math.min(chunk.length, length - filled);
      out.set(chunk.subarray(0, part), filled);
      filled += part;
      if (consume) {
        if (part === chunk.length) this.chunks.shift();
        else this.chunks[0] = chunk.subarray(part);
      } else {
        index++;
      }
    }
    if (consume) this.buffered -= length;
    return out;
  }
}
