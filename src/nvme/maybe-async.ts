// Values that are ready now or later. The I/O path from doorbell to completion runs synchronously
// whenever nothing in it has to wait (guest memory mapped, a RAM namespace): a promise and a
// microtask hop per step would cost more than the work itself. Each step that may wait returns a
// MaybePromise, and these helpers chain the next step without creating a promise when the value
// is already there. Errors keep one shape: a step that fails synchronously throws, a step that
// fails later rejects, and `attempt` folds both into the same handler.

export type MaybePromise<T> = T | Promise<T>;

export const isPromise = <T>(value: MaybePromise<T>): value is Promise<T> => value instanceof Promise;

/** `next(value)` now when `value` is ready, else once it resolves. */
export function andThen<T, U>(value: MaybePromise<T>, next: (value: T) => MaybePromise<U>): MaybePromise<U> {
  return isPromise(value) ? value.then(next) : next(value);
}

/**
 * Runs `step`, then `onValue` with its result or `onError` with what it threw or rejected with.
 * Synchronous all the way when `step` and the handler are.
 */
export function attempt<T, U>(step: () => MaybePromise<T>, onValue: (value: T) => MaybePromise<U>, onError: (error: unknown) => MaybePromise<U>): MaybePromise<U> {
  let value: MaybePromise<T>;
  try {
    value = step();
  } catch (error) {
    return onError(error);
  }
  if (!isPromise(value)) return onValue(value);
  return value.then(onValue, onError);
}

/** Runs `step`, then `cleanup` however it ended (try/finally for a MaybePromise). */
export function always<T>(step: () => MaybePromise<T>, cleanup: () => void): MaybePromise<T> {
  let value: MaybePromise<T>;
  try {
    value = step();
  } catch (error) {
    cleanup();
    throw error;
  }
  if (!isPromise(value)) {
    cleanup();
    return value;
  }
  return value.finally(cleanup);
}

/**
 * Rounds one loop runs synchronously in one event-loop turn before it yields: a guest that keeps
 * moving a shadow doorbell must not keep every other socket, timer and file I/O of the process waiting.
 */
const MAX_SYNC_ROUNDS = 8;

/**
 * Runs `round` while `state.again` is set (a caller sets it to ask for another look) or the last
 * round found work. Rounds run synchronously while they complete synchronously; a round that has to
 * wait continues the loop when it is back; after MAX_SYNC_ROUNDS rounds that found work in one turn
 * the loop yields (setImmediate). `done` gets the rounds that found work in the last turn.
 */
export function runRounds(state: { again: boolean }, round: () => MaybePromise<boolean>, done: (rounds: number) => void, failed: (error: unknown) => void): void {
  const run = (): void => {
    let rounds = 0;
    try {
      while (state.again) {
        state.again = false;
        const more = round();
        if (isPromise(more)) {
          more.then((again) => {
            if (again) state.again = true;
            run();
          }, failed);
          return;
        }
        if (!more) continue;
        state.again = true;
        if (++rounds >= MAX_SYNC_ROUNDS) {
          setImmediate(run);
          return;
        }
      }
    } catch (error) {
      failed(error);
      return;
    }
    done(rounds);
  };
  run();
}
