// A guest that keeps moving its shadow SQ tail must not keep the controller's fetch loop from
// yielding: every socket, timer and file I/O of the process shares this event loop.

import { describe, expect, it } from 'vitest';
import { DATA, GuestMemory, TestHost } from './helpers.js';
import { buildCommand } from '../../../src/nvme/command.js';
import { AdminOpcode, Reg, Status } from '../../../src/nvme/spec.js';

const SHADOW = DATA + 0x10000;
const EVENT_IDX = DATA + 0x20000;

/** Guest memory with a vCPU "running in parallel": each look at the shadow tail finds one more command. */
class BusyGuest extends GuestMemory {
  host!: TestHost;
  active = false;
  shadowReads = 0;

  override view(addr: number, length: number, forWrite?: boolean): Uint8Array | null {
    if (this.active && !forWrite && addr === SHADOW + 8 && length === 4) {
      // A starved process cannot run a test timeout either: stop feeding after a while, so a
      // regression fails the assertion (the timer ran only after this) instead of hanging the suite.
      if (++this.shadowReads > 100_000) this.active = false;
      const q = this.host.queues.get(1)!;
      while (this.host.peek(1)) {
        q.cqHead = (q.cqHead + 1) % q.size;
        if (q.cqHead === 0) q.phase ^= 1;
      }
      this.set32(SHADOW + 12, q.cqHead);
      if ((q.sqTail + 1) % q.size !== q.cqHead) {
        this.host.place(1, buildCommand({ opcode: 0x7f, nsid: 1 }));
        this.set32(SHADOW + 8, q.sqTail);
      }
    }
    return super.view(addr, length, forWrite);
  }
}

describe('shadow doorbells and the event loop', () => {
  it('lets a timer run while a guest floods the shadow tail', async () => {
    const memory = new BusyGuest();
    const host = new TestHost({ memory });
    memory.host = host;
    host.start();
    await host.createIoQueuePair(1, 64);
    expect((await host.admin({ opcode: AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1: SHADOW, prp2: EVENT_IDX })).status).toBe(Status.SUCCESS);
    // What the timer sees when it runs: a starved loop runs it only after the guest gave up.
    const timerFired = new Promise<{ guestStillFlooding: boolean; shadowReads: number }>((resolve) =>
      setTimeout(() => resolve({ guestStillFlooding: memory.active, shadowReads: memory.shadowReads }), 0),
    );
    memory.active = true;
    host.write32(Reg.DOORBELLS + 8, 0); // one MMIO ring starts the fetch loop
    const seen = await timerFired;
    memory.active = false;
    expect(seen.shadowReads).toBeGreaterThan(0); // the guest really was feeding commands
    expect(seen.guestStillFlooding).toBe(true);
  });
});
