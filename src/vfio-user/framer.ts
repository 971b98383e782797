// Turns the byte stream of a unix socket back into whole vfio-user messages. fds arrive with the
// first byte of the sendmsg that carried them (the kernel never merges them into an earlier
// read), so they belong to the message being assembled when their chunk arrives.

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
  private pendingFds: number[] = [];

  constructor(private readonly maxMessageSize: number) {}

  /**
   * Adds one received chunk and returns every message it completes. Throws FramingError when a
   * header announces an impossible size: past that point the stream cannot be trusted.
   */
  push(chunk: Uint8Array, fds: readonly number[]): Message[] {
    this.pendingFds.push(...fds);
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    const out: Message[] = [];
    for (;;) {
      if (this.buffered < HEADER_SIZE) break;
      const header = decodeHeader(this.peek(HEADER_SIZE));
      if (header.size < HEADER_SIZE || header.size > this.maxMessageSize) {
        throw new FramingError(
          `message size ${header.size} outside [${HEADER_SIZE}, ${this.maxMessageSize}] (command ${header.command})`,
        );
      }
      if (this.buffered < header.size) break;
      const whole = this.take(header.size);
      out.push({ header, payload: whole.subarray(HEADER_SIZE), fds: this.pendingFds });
      this.pendingFds = [];
    }
    return out;
  }

  /** fds received but not yet attached to a complete message (the caller closes them on teardown). */
  drainFds(): number[] {
    const fds = this.pendingFds;
    this.pendingFds = [];
    return fds;
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
