// Which event-loop iteration we are in, as far as the I/O path needs to know: a command whose
// completion comes back in a later iteration (a file backend's threadpool result) than the one
// that started it completes "in a callback", where batching interrupts per turn would mean one
// interrupt per result (see Interrupts.completionPosted).

let iteration = 0;
let counting = false;

/**
 * A number that changes once the event loop has passed its check phase after this call. Costs one
 * setImmediate per iteration in which it is asked, and nothing in the others.
 */
export function loopIteration(): number {
  if (!counting) {
    counting = true;
    setImmediate(() => {
      iteration++;
      counting = false;
    });
  }
  return iteration;
}
