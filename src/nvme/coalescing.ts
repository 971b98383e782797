// Interrupt coalescing (Base §5.27.1.9): completions of an I/O completion queue may wait for
// their vector's interrupt until Aggregation Threshold entries have gathered or Aggregation Time
// (in 100 µs units, hence a µs timer rather than Node's millisecond ones) has passed, whichever
// comes first.

import { InterruptCoalescing } from './spec.js';
import { clearTimeoutUs, setTimeoutUs, type UsTimer } from './us-timer.js';

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

/** Per vector: entries gathered since its last interrupt and the timer that ends the wait. */
export class InterruptAggregator {
  private readonly waiting = new Map<number, { entries: number; expiry: UsTimer }>();

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
    clearTimeoutUs(gathered.expiry);
    this.waiting.delete(vector);
  }

  /** Ends every wait now and returns the vectors that had entries. */
  takeAll(): number[] {
    const vectors = [...this.waiting.keys()];
    this.clear();
    return vectors;
  }

  clear(): void {
    for (const gathered of this.waiting.values()) clearTimeoutUs(gathered.expiry);
    this.waiting.clear();
  }

  private arm(vector: number, delayUs: number): UsTimer {
    // A pending interrupt alone does not keep a stopping process alive (us-timer.ts).
    return setTimeoutUs(() => {
      this.waiting.delete(vector);
      this.due(vector);
    }, delayUs);
  }
}
