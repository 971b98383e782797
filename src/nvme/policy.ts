// Our controller's own choices where the spec leaves a range: limits, sizes and fixed readings.
// Spec facts live in spec.ts; these are decisions, in one place so Identify and the code agree.

/** Abort Command Limit and Asynchronous Event Request Limit (Identify reports them 0-based). */
export const ABORT_LIMIT = 4;
export const ASYNC_EVENT_LIMIT = 4;
/** Error Information log entries kept (ELPE + 1). */
export const ERROR_LOG_ENTRIES = 64;
/** Changed Namespace List capacity before it overflows to the single entry FFFFFFFFh. */
export const CHANGED_NAMESPACE_LIMIT = 1024;
/** Keep Alive Support granularity in 100 ms units: we time keep-alives to the second. */
export const KEEP_ALIVE_GRANULARITY = 10;
/** Composite temperature we report (kelvin): a constant, as there is no sensor. */
export const COMPOSITE_TEMPERATURE = 313;
export const WARNING_TEMPERATURE = 343;
export const CRITICAL_TEMPERATURE = 353;
/**
 * Data bytes all of a controller's running commands may hold at once. Fetching goes on, but a
 * command waits for budget before its handler allocates buffers, so a deep queue of large
 * transfers cannot grow the process without bound (what a real device's DMA engine limits too).
 */
export const IN_FLIGHT_DATA_BYTES = 64 << 20;
/** Node's timers hold at most 2^31-1 ms; longer Keep Alive timeouts are re-armed in steps. */
export const MAX_TIMER_MS = 0x7fff_ffff;
/** How long after a completion, or QEMU's re-arm of INTx, the line is looked at (interrupts.ts intxRearmed). */
export const INTX_REASSERT_GRACE_MS = 1;
/** How long a triggered INTx line waits for QEMU's re-arm before a new completion triggers it anyway. */
export const INTX_REARM_DEADLINE_MS = 100;
