import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import * as fs from 'node:fs';
import { clearTimeoutUs, setTimeoutUs, usTimersAwake, type UsTimer } from '../../../src/nvme/us-timer.js';

const after = (us: number): Promise<number> => new Promise((resolve) => {
  const start = performance.now();
  setTimeoutUs(() => resolve(performance.now() - start), us);
});

describe('µs timers', () => {
  it('fire no earlier than asked, below a millisecond too, in deadline order', async () => {
    const order: number[] = [];
    const done = new Promise<void>((resolve) => {
      setTimeoutUs(() => order.push(3), 900);
      setTimeoutUs(() => order.push(1), 200);
      setTimeoutUs(() => {
        order.push(4);
        resolve();
      }, 1500);
      setTimeoutUs(() => order.push(2), 400);
    });
    const elapsed = await Promise.all([after(250), after(700)]);
    await done;
    expect(order).toEqual([1, 2, 3, 4]);
    expect(elapsed[0]).toBeGreaterThanOrEqual(0.25);
    expect(elapsed[1]).toBeGreaterThanOrEqual(0.7);
  });

  it('a cleared timer stays silent, also when cleared by a timer that fires with it', async () => {
    const fired: string[] = [];
    const a = setTimeoutUs(() => fired.push('a'), 300);
    clearTimeoutUs(a);
    let b: ReturnType<typeof setTimeoutUs> | null = null;
    setTimeoutUs(() => {
      fired.push('first');
      if (b) clearTimeoutUs(b);
    }, 500);
    b = setTimeoutUs(() => fired.push('b'), 500.001);
    await after(3000);
    expect(fired).toEqual(['first']);
    // Clearing the timer the timerfd waits for disarms it: no wake-up for nothing.
    const c = setTimeoutUs(() => fired.push('c'), 100_000);
    expect(timerfdArmed()).toEqual([true]);
    clearTimeoutUs(c);
    expect(timerfdArmed()).toEqual([false]);
  });

  it('with slack, a timer runs when the process is awake anyway within it, and no wake-up is left armed for it', async () => {
    const ran: Array<{ which: string; at: number }> = [];
    const start = performance.now();
    // Margins of 80 ms either side: a loaded 2-core machine may run the test's own timer late.
    const slack = setTimeoutUs(() => ran.push({ which: 'slack', at: performance.now() - start }), 200_000, 100_000);
    // Awake before the slack begins: nothing runs.
    usTimersAwake();
    await Promise.resolve();
    expect(ran).toEqual([]);
    await new Promise((resolve) => setTimeout(resolve, 120));
    usTimersAwake();
    // It runs once the callback that was awake returns (a microtask), not inside usTimersAwake().
    expect(ran).toEqual([]);
    await Promise.resolve();
    expect(ran.map((r) => r.which)).toEqual(['slack']);
    expect(ran[0]!.at).toBeGreaterThanOrEqual(100);
    expect(ran[0]!.at).toBeLessThan(200);
    // Run early, it must not still wake the process at its due: the module's timerfd is disarmed.
    expect(timerfdArmed()).toEqual([false]);
    clearTimeoutUs(slack);
  });

  it('a timer without slack is not run by a wake-up of another kind, even when overdue: its own fires it', async () => {
    let ran = false;
    setTimeoutUs(() => (ran = true), 1000);
    const start = performance.now();
    while (performance.now() - start < 2) {
      // Busy past its due, so that its timerfd cannot have been read yet.
    }
    usTimersAwake();
    await Promise.resolve();
    expect(ran).toBe(false);
    await new Promise((resolve) => setTimeout(resolve, 5));
    expect(ran).toBe(true);
  });

  it('a callback that re-adds its timer with all its time as slack and says it is awake does not chain microtasks', async () => {
    let runs = 0;
    let last: UsTimer | null = null;
    const again = (): void => {
      // Capped, so that the failure is a count and not a hung test.
      if (++runs >= 1000) return;
      last = setTimeoutUs(again, 1000, 1000);
      usTimersAwake();
    };
    last = setTimeoutUs(again, 1000, 1000);
    usTimersAwake();
    await new Promise((resolve) => setTimeout(resolve, 5));
    // Once per wake-up of the timer's own (every millisecond or so), not a thousand times at once.
    expect(runs).toBeGreaterThan(0);
    expect(runs).toBeLessThan(50);
    // A timer left pending would run other tests' slack timers early when it fires.
    clearTimeoutUs(last);
  });

  it('with slack and nothing awake, a timer still fires at its due', async () => {
    const start = performance.now();
    const at = await new Promise<number>((resolve) => setTimeoutUs(() => resolve(performance.now() - start), 3000, 2000));
    expect(at).toBeGreaterThanOrEqual(3);
  });

  it('a pending timer does not keep the process alive', () => {
    const module = fileURLToPath(new URL('../../../src/nvme/us-timer.ts', import.meta.url));
    const script = `import { setTimeoutUs } from ${JSON.stringify(module)}; setTimeoutUs(() => console.log('fired'), 10_000_000); console.log('armed');`;
    const started = performance.now();
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { encoding: 'utf8', timeout: 8000 });
    expect(r.stdout.trim()).toBe('armed');
    expect(r.status).toBe(0);
    expect(performance.now() - started).toBeLessThan(8000);
  });
});

/** For each timerfd this process holds: whether it is armed (/proc/self/fdinfo's it_value). */
function timerfdArmed(): boolean[] {
  const armed: boolean[] = [];
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    let target = '';
    try {
      target = fs.readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      continue;
    }
    if (target !== 'anon_inode:[timerfd]') continue;
    const info = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
    armed.push(!/it_value: \(0, 0\)/.test(info));
  }
  return armed;
}
