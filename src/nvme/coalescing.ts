// Interrupt coalescing (Base §5.27.1.9): completions of an I/O completion queue may wait for
// their vector's interrupt until Aggregation Threshold entries have gathered or Aggregation Time
// has passed, whichever comes first. Node's timers count whole milliseconds, so a time below 1 ms
// is kept as "until the event loop has handled what is ready now" (setImmediate): the
// completions that arrive together (a file backend's threadpool results of one poll) share one
// interrupt, and none waits for a timer longer than the host asked.

import { InterruptCoalescing } from './spec.js';

export interface CoalescingSettings {
  /** Entries that make the interrupt due (THR + 1). */
  threshold: number;
  /** The longest an entry should wait for its interrupt, in µs (0: not at all). */
  delayUs: number;
}

/** The Interrupt Coalescing feature value as settings; null when it asks for no delay. */
export function coalescingSettings(feature: number): CoalescingSettings | null {
  const delayUs = ((feature >>> InterruptCoalescing.TIME_SHIFT) & InterruptCoalescing.TIME_MASK) * InterruptCoalescing.TIME_UNIT_US;
  const threshold = (feature & InterruptCoalescing.THR_MASK) + 1;
  return delayUs === 0 || threshold === 1 ? null : { threshold, delayUs };
}

type Expiry = { kind: 'timeout'; handle: NodeJS.Timeout } | { kind: 'immediate'; handle: NodeJS.Immediate };

/** Per vector: entries gathered since its last interrupt and the timer that ends the wait. */
export class InterruptAggregator {
  private readonly waiting = new Map<number, { entries: number; expiry: Expiry }>();

  /** `due(vector)` is called when a vector's aggregation time is over. */
  constructor(private readonly due: (vector: number) => void) {}

  /** One more entry for `vector`; true when that makes its interrupt due now. */
  add(vector: number, settings: CoalescingSettings): boolean {
    let gathered = this.waiting.get(vector);
    if (!gathered) {
      gathered = { entries: 0, expiry: this.arm(vector, settings.delayUs) };
      this.waiting.set(vector, gathered);
    }
    if (++gathered.entries < settings.threshold) return false;
    this.covered(vector);
    return true;
  }

  /** An interrupt for `vector` went out: it covers every entry gathered so far. */
  covered(vector: number): void {
    const gathered = this.waiting.get(vector);
    if (!gathered) return;
    cancel(gathered.expiry);
    this.waiting.delete(vector);
  }

  /** Ends every wait now and returns the vectors that had entries. */
  takeAll(): number[] {
    const vectors = [...this.waiting.keys()];
    this.clear();
    return vectors;
  }

  clear(): void {
    for (const gathered of this.waiting.values()) cancel(gathered.expiry);
    this.waiting.clear();
  }

  private arm(vector: number, delayUs: number): Expiry {
    const expire = (): void => {
      this.waiting.delete(vector);
      this.due(vector);
    };
    if (delayUs < 1000) return { kind: 'immediate', handle: setImmediate(expire) };
    const handle = setTimeout(expire, Math.floor(delayUs / 1000));
    // A pending interrupt alone must not keep a stopping process alive.
    handle.unref();
    return { kind: 'timeout', handle };
  }
}

function cancel(expiry: Expiry): void {
  if (expiry.kind === 'timeout') clearTimeout(expiry.handle);
  else clearImmediate(expiry.handle);
}
