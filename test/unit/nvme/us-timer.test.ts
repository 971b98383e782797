import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { clearTimeoutUs, setTimeoutUs } from '../../../src/nvme/us-timer.js';

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
