// Interrupt Coalescing (Feature 08h) and Interrupt Vector Configuration's Coalescing Disable
// (Feature 09h): an I/O CQ's completions wait for their interrupt until the aggregation threshold
// is reached or the aggregation time has passed; the Admin CQ and vectors with coalescing
// disabled interrupt at once; and no interrupt that was due is lost when the controller suspends
// or is reset.

import { describe, expect, it } from 'vitest';
import { buildCommand } from '../../../src/nvme/command.js';
import { AdminOpcode, FeatureId, InterruptCoalescing, InterruptVectorConfig, NvmOpcode, Status } from '../../../src/nvme/spec.js';
import { TestHost, tick, until } from './helpers.js';

const QID = 1;
const VECTOR = 1;

/** CDW11 of Set Features Interrupt Coalescing: threshold in entries (1-based here), time in 100 µs units. */
const coalescing = (entries: number, time100us: number): number => ((time100us & InterruptCoalescing.TIME_MASK) << InterruptCoalescing.TIME_SHIFT) | ((entries - 1) & InterruptCoalescing.THR_MASK);

async function coalescingHost(cdw11: number): Promise<TestHost> {
  const h = new TestHost().start();
  await h.createIoQueuePair(QID, 64, VECTOR);
  const c = await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.INTERRUPT_COALESCING, cdw11 });
  expect(c.status).toBe(Status.SUCCESS);
  return h;
}

/** Submits one Flush and waits until its completion is in the CQ (without waiting for an interrupt). */
async function completeOne(h: TestHost): Promise<void> {
  h.place(QID, buildCommand({ opcode: NvmOpcode.FLUSH, nsid: 1 }));
  h.ringSq(QID);
  const cqe = await h.reap(QID);
  expect(cqe.status).toBe(Status.SUCCESS);
}

/** Lets every microtask and immediate that is due run (a completion's interrupt is raised at the end of its turn). */
const settle = async (): Promise<void> => {
  for (let i = 0; i < 3; i++) await tick();
};

describe('interrupt coalescing', () => {
  it('without coalescing every completion interrupts', async () => {
    const h = await coalescingHost(0);
    for (let i = 1; i <= 3; i++) {
      await completeOne(h);
      await settle();
      expect(h.msixCount(VECTOR)).toBe(i);
    }
  });

  it('holds the interrupt until the aggregation threshold is reached', async () => {
    // Threshold 4 entries, aggregation time 25.5 ms: the threshold comes first.
    const h = await coalescingHost(coalescing(4, 255));
    for (let i = 1; i <= 3; i++) {
      await completeOne(h);
      await settle();
      expect(h.msixCount(VECTOR)).toBe(0);
    }
    await completeOne(h);
    await settle();
    expect(h.msixCount(VECTOR)).toBe(1);
    // The count starts over after an interrupt.
    await completeOne(h);
    await settle();
    expect(h.msixCount(VECTOR)).toBe(1);
  });

  it('raises the interrupt once the aggregation time has passed', async () => {
    // Threshold 255 entries, aggregation time 25 ms: the time comes first.
    const h = await coalescingHost(coalescing(255, 250));
    const posted = Date.now();
    await completeOne(h);
    await settle();
    // (A machine that stalled this test for the whole aggregation time proves nothing here.)
    if (Date.now() - posted < 20) expect(h.msixCount(VECTOR)).toBe(0);
    await until(() => h.msixCount(VECTOR) === 1, 'the interrupt after the aggregation time', 1000);
    // Timers fire on the event loop's cached clock: allow it a little slack.
    expect(Date.now() - posted).toBeGreaterThanOrEqual(20);
    await settle();
    expect(h.msixCount(VECTOR)).toBe(1);
  });

  it('an aggregation time below a millisecond is kept to the 100 µs (a µs timer, not Node\'s)', async () => {
    // 500 µs: Node's timers would round it to 0 or 1 ms.
    const h = await coalescingHost(coalescing(255, 5));
    const submitted = performance.now();
    await completeOne(h);
    await until(() => h.msixCount(VECTOR) === 1, 'the interrupt', 1000);
    // A timer never fires early; that it is not much later is for the benchmarks to show.
    expect(performance.now() - submitted).toBeGreaterThanOrEqual(0.5);
  });

  it('a vector with Coalescing Disable interrupts at once', async () => {
    const h = await coalescingHost(coalescing(8, 255));
    const c = await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.INTERRUPT_VECTOR_CONFIG, cdw11: VECTOR | InterruptVectorConfig.CD });
    expect(c.status).toBe(Status.SUCCESS);
    for (let i = 1; i <= 3; i++) {
      await completeOne(h);
      await settle();
      expect(h.msixCount(VECTOR)).toBe(i);
    }
    // Clearing CD brings coalescing back.
    await h.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.INTERRUPT_VECTOR_CONFIG, cdw11: VECTOR });
    await completeOne(h);
    await settle();
    expect(h.msixCount(VECTOR)).toBe(3);
  });

  it('never delays the Admin Completion Queue', async () => {
    const h = await coalescingHost(coalescing(8, 255));
    const before = h.msixCount(0);
    await h.admin({ opcode: AdminOpcode.KEEP_ALIVE });
    await settle();
    expect(h.msixCount(0)).toBe(before + 1);
  });

  it('an interrupt gathering when the controller suspends goes out before it falls silent', async () => {
    const h = await coalescingHost(coalescing(8, 255));
    await completeOne(h);
    await settle();
    expect(h.msixCount(VECTOR)).toBe(0);
    await h.controller.suspend();
    expect(h.msixCount(VECTOR)).toBe(1);
    // Silent: nothing more, not even when the aggregation time would have ended.
    await new Promise((resolve) => setTimeout(resolve, 30));
    expect(h.msixCount(VECTOR)).toBe(1);
    h.controller.resume();
    await completeOne(h);
    await settle();
    expect(h.msixCount(VECTOR)).toBe(1);
  });

  it('a completion posted while the suspend waits for its command raises its interrupt before the silence', async () => {
    const h = await coalescingHost(0);
    h.place(QID, buildCommand({ opcode: NvmOpcode.FLUSH, nsid: 1 }));
    h.ringSq(QID);
    await h.controller.suspend();
    expect(h.peek(QID)?.status).toBe(Status.SUCCESS);
    expect(h.msixCount(VECTOR)).toBe(1);
  });

  it('a controller reset drops the aggregation with the queues: no late interrupt, and the next controller starts afresh', async () => {
    const h = await coalescingHost(coalescing(8, 255));
    await completeOne(h);
    await settle();
    expect(h.msixCount(VECTOR)).toBe(0);
    h.controller.controllerReset('test');
    await new Promise((resolve) => setTimeout(resolve, 40));
    expect(h.msixCount(VECTOR)).toBe(0);
    // The reset also restored the default (no coalescing).
    expect(h.controller.state.features.interruptCoalescing).toBe(0);
  });
});
