// Submission and completion queues (Base §3.3): creating and deleting them, fetching entries from
// each SQ, running each fetched command through its handler and handing the result to the
// completion poster. Per-SQ fetch loops and counts are derived state, rebuilt after a load.

import type { Logger } from '../log.js';
import { DmaError, type DmaSpace } from '../vfio-user/device.js';
import { DEFERRED, parseCommand, type Command } from './command.js';
import type { CompletionPoster } from './completions.js';
import type { QueueControl } from './context.js';
import type { Doorbells } from './doorbells.js';
import { loopIteration } from './loop-turn.js';
import { andThen, isPromise, runRounds, type MaybePromise } from './maybe-async.js';
import { IN_FLIGHT_DATA_BYTES } from './policy.js';
import { SQE_SIZE } from './spec.js';
import type { CompletionQueueState, ControllerState, HeldCompletion, SubmissionQueueState } from './state.js';
import { GuestDataTransfer, type DataTransfer } from './transfer.js';

export interface CommandResult {
  status: number;
  dw0: number;
  dw1: number;
  /** Why the command failed, for in-process callers (never reaches a completion queue). */
  detail?: string;
}

export interface QueueHost {
  readonly state: ControllerState;
  readonly log: Logger;
  readonly doorbells: Doorbells;
  readonly poster: CompletionPoster;
  readonly pageSize: number;
  /** Bumped by every Controller Level Reset: commands of an older generation never touch the guest again. */
  generation(): number;
  /** Guest memory, when new commands may be fetched now. */
  fetchDma(): DmaSpace | null;
  /** Bytes of data `cmd` will buffer (for the in-flight budget). */
  dataBytes(cmd: Command): number;
  /** Runs one command through its handler; never throws. */
  execute(cmd: Command, transfer: DataTransfer, isAdmin: boolean): MaybePromise<CommandResult | typeof DEFERRED>;
  fatal(reason: string): void;
}

/** Per-SQ bookkeeping that is not state: fetch loop status and command counts. */
interface SqRuntime {
  fetching: boolean;
  again: boolean;
  /** Fetched and not yet posted (held completions included): bounded by the queue depth. */
  outstanding: number;
  /** Handlers running right now. */
  executing: number;
  deleting: boolean;
  idle: Array<() => void>;
}

const newRuntime = (): SqRuntime => ({ fetching: false, again: false, outstanding: 0, executing: 0, deleting: false, idle: [] });

/** Thrown into a command's data transfer when the controller was reset under it. */
export class StaleCommandError extends Error {}

/** A byte budget shared by running commands; waiters are served in arrival order. */
class ByteBudget {
  private used = 0;
  private readonly waiters: { bytes: number; wake: () => void }[] = [];

  constructor(private readonly limit: number) {}

  /** The bytes granted: now when the budget has room and nobody waits, else once it has. */
  acquire(bytes: number): MaybePromise<number> {
    const granted = Math.min(bytes, this.limit);
    if (this.waiters.length > 0 || this.used + granted > this.limit) {
      return new Promise<number>((wake) => this.waiters.push({ bytes: granted, wake: () => wake(granted) }));
    }
    this.used += granted;
    return granted;
  }

  release(bytes: number): void {
    this.used -= bytes;
    while (this.waiters.length > 0 && this.used + this.waiters[0]!.bytes <= this.limit) {
      const next = this.waiters.shift()!;
      this.used += next.bytes;
      next.wake();
    }
  }
}

export class QueueEngine implements QueueControl {
  private runtime = new Map<number, SqRuntime>();
  /** Handlers running (not counting held Asynchronous Event Requests or in-process calls). */
  private running = 0;
  private idleWaiters: Array<() => void> = [];
  private busySince = 0;
  private readonly dataBudget = new ByteBudget(IN_FLIGHT_DATA_BYTES);

  constructor(private readonly host: QueueHost) {}

  get commandsRunning(): number {
    return this.running;
  }

  sq(qid: number): SubmissionQueueState | undefined {
    return this.host.state.submissionQueues[qid] ?? undefined;
  }

  cq(qid: number): CompletionQueueState | undefined {
    return this.host.state.completionQueues[qid] ?? undefined;
  }

  /** CC.EN 0→1: the admin queue pair from AQA/ASQ/ACQ. */
  createAdminQueues(asq: number, acq: number, sqEntries: number, cqEntries: number): void {
    const state = this.host.state;
    state.completionQueues[0] = { qid: 0, base: acq, size: cqEntries, head: 0, tail: 0, phase: 1, interruptsEnabled: true, vector: 0 };
    state.submissionQueues[0] = { qid: 0, base: asq, size: sqEntries, head: 0, tail: 0, cqid: 0, priority: 0 };
    this.runtime.set(0, newRuntime());
    this.host.doorbells.started(0, false, 0);
    this.host.doorbells.started(0, true, 0);
  }

  createCompletionQueue(cq: Omit<CompletionQueueState, 'head' | 'tail' | 'phase'>): void {
    this.host.state.completionQueues[cq.qid] = { ...cq, head: 0, tail: 0, phase: 1 };
    this.host.doorbells.started(cq.qid, true, 0);
    void this.host.doorbells.publishEventIdx(cq.qid, true, 0);
  }

  createSubmissionQueue(sq: Omit<SubmissionQueueState, 'head' | 'tail'>): void {
    this.host.state.submissionQueues[sq.qid] = { ...sq, head: 0, tail: 0 };
    this.runtime.set(sq.qid, newRuntime());
    this.host.doorbells.started(sq.qid, false, 0);
    void this.host.doorbells.publishEventIdx(sq.qid, false, 0);
  }

  async deleteSubmissionQueue(qid: number): Promise<void> {
    const state = this.host.state;
    const rt = this.runtime.get(qid);
    const sq = state.submissionQueues[qid];
    if (!sq) return;
    if (rt) {
      rt.deleting = true;
      while (rt.executing > 0) await new Promise<void>((resolve) => rt.idle.push(resolve));
    }
    if (state.submissionQueues[qid] !== sq) return;
    state.heldCompletions = state.heldCompletions.filter((h) => h.sqid !== qid);
    state.submissionQueues[qid] = null;
    this.runtime.delete(qid);
  }

  deleteCompletionQueue(qid: number): void {
    const state = this.host.state;
    state.completionQueues[qid] = null;
    state.heldCompletions = state.heldCompletions.filter((h) => h.cqid !== qid);
  }

  feedsAnySq(cqid: number): boolean {
    return this.host.state.submissionQueues.some((sq) => sq && sq.cqid === cqid);
  }

  hasIoQueues(): boolean {
    const state = this.host.state;
    return state.submissionQueues.some((q, i) => q && i > 0) || state.completionQueues.some((q, i) => q && i > 0);
  }

  /** Controller Level Reset: every loop stops (commands of the old generation finish unseen). */
  reset(): void {
    this.runtime = new Map();
  }

  /** After a load: one runtime per SQ; held AERs and held completions occupy their SQ slots. */
  rebuild(): void {
    const state = this.host.state;
    this.runtime = new Map();
    for (const sq of state.submissionQueues) {
      if (!sq) continue;
      this.runtime.set(sq.qid, newRuntime());
      this.host.doorbells.started(sq.qid, false, sq.tail);
    }
    for (const cq of state.completionQueues) if (cq) this.host.doorbells.started(cq.qid, true, cq.head);
    const admin = this.runtime.get(0);
    if (admin) admin.outstanding += state.asyncEvents.outstanding.length;
    for (const h of state.heldCompletions) {
      const rt = this.runtime.get(h.sqid);
      if (rt) rt.outstanding++;
    }
  }

  /** Resolves once no handler runs. */
  waitIdle(): Promise<void> {
    if (this.running === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  kickAll(): void {
    for (const sq of this.host.state.submissionQueues) if (sq) this.kick(sq.qid);
  }

  kick(qid: number): void {
    const rt = this.runtime.get(qid);
    if (!rt) return;
    rt.again = true;
    if (rt.fetching) return;
    rt.fetching = true;
    this.fetchRounds(qid, rt);
  }

  /**
   * Fetches round after round until the SQ is empty (runRounds). Rounds run synchronously while
   * guest memory is mapped, so a doorbell's commands (and, on a RAM namespace, their completions)
   * are handled in the turn that brought it.
   */
  private fetchRounds(qid: number, rt: SqRuntime): void {
    runRounds(
      rt,
      () => this.fetchRound(qid, rt),
      (rounds) => {
        rt.fetching = false;
        // With shadow doorbells, look at the tail once more a little later (see watchTail).
        if (rounds > 0) this.host.doorbells.watchTail(qid);
      },
      (err) => this.fetchFailed(qid, rt, err),
    );
  }

  private fetchFailed(qid: number, rt: SqRuntime, err: unknown): void {
    rt.fetching = false;
    this.host.fatal(`fetch loop for SQ ${qid}: ${(err as Error).stack ?? String(err)}`);
  }

  /** A fetched command is fully finished: its SQ slot is free again. */
  completionGone(entry: HeldCompletion): void {
    const rt = this.runtime.get(entry.sqid);
    if (!rt) return;
    rt.outstanding = Math.max(0, rt.outstanding - 1);
    const sq = this.host.state.submissionQueues[entry.sqid];
    if (sq && sq.head !== sq.tail) this.kick(entry.sqid);
  }

  /** The SQ if commands may be fetched from it now (not deleted or reset since `generation`). */
  private fetchable(qid: number, rt: SqRuntime, generation: number): SubmissionQueueState | null {
    const sq = this.host.state.submissionQueues[qid];
    if (!sq || rt.deleting || generation !== this.host.generation() || !this.host.fetchDma()) return null;
    return sq;
  }

  /**
   * One round: with shadow doorbells, publish EventIdx and read the shadow tail; then take what
   * lies between head and tail (as far as there are free slots). True when it took commands.
   */
  private fetchRound(qid: number, rt: SqRuntime): MaybePromise<boolean> {
    const host = this.host;
    const generation = host.generation();
    const sq = this.fetchable(qid, rt, generation);
    if (!sq) return false;
    // With shadow doorbells the host moves the tail in memory and rings only when EventIdx asks.
    const refreshed = host.doorbells.usesShadow(qid) ? host.doorbells.refreshShadowTail(sq) : false;
    return andThen(refreshed, () => {
      // The world may have changed while a message was in flight.
      if (this.fetchable(qid, rt, generation) !== sq || sq.head === sq.tail) return false;
      const room = sq.size - 1 - rt.outstanding;
      if (room <= 0) return false; // a completion kicks us again
      const available = (sq.tail - sq.head + sq.size) % sq.size;
      const count = Math.min(available, room, sq.size - sq.head);
      // Commands keep the DMA space they were fetched through: if the client leaves, that space is
      // emptied and their data transfers fail cleanly instead of reaching a detached controller.
      const dma = host.fetchDma()!;
      const addr = sq.base + sq.head * SQE_SIZE;
      const fetchFailed = (err: unknown): false => {
        if (!(err instanceof DmaError)) throw err;
        if (generation === host.generation()) host.fatal(`SQ ${qid} fetch: ${err.message}`);
        return false;
      };
      // Mapped: copy the entries out in place. Each command keeps its own copy, since the host may
      // refill a slot as soon as a completion reports the head past it.
      let entries: MaybePromise<Uint8Array | false> | undefined;
      try {
        // A mapping truncated under the copy read zeros: direct() throws rather than pass them on.
        entries = dma.direct(addr, count * SQE_SIZE, false, (view) => view.slice());
      } catch (err) {
        entries = fetchFailed(err);
      }
      entries ??= dma.read(addr, count * SQE_SIZE).then(undefined, fetchFailed);
      return andThen(entries, (bytes) => {
        if (!bytes) return false;
        if (this.fetchable(qid, rt, generation) !== sq) return false;
        for (let i = 0; i < count; i++) {
          const sqe = bytes.subarray(i * SQE_SIZE, (i + 1) * SQE_SIZE);
          sq.head = (sq.head + 1) % sq.size;
          rt.outstanding++;
          this.dispatch(sq, rt, sqe, dma, generation);
        }
        return true;
      });
    });
  }

  /**
   * Runs one fetched command and posts its completion. Synchronous from fetch to post when the
   * handler is (a RAM namespace with mapped guest memory); never throws. Written out as methods
   * rather than per-command closures: this runs for every command, and their allocations showed
   * in bench/command-path.ts at QD32.
   */
  private dispatch(sq: SubmissionQueueState, rt: SqRuntime, sqe: Uint8Array, dma: DmaSpace, generation: number): void {
    rt.executing++;
    this.commandStarted();
    let cmd: Command;
    try {
      cmd = parseCommand(sqe, sq.qid);
    } catch (err) {
      this.dispatchFailed(sq, rt, 0, err);
      return;
    }
    let budget = 0;
    let outcome: MaybePromise<CommandResult | typeof DEFERRED>;
    try {
      const granted = sq.qid === 0 ? 0 : this.dataBudget.acquire(this.host.dataBytes(cmd));
      if (isPromise(granted)) {
        outcome = granted.then((bytes) => {
          budget = bytes;
          return this.run(sq, sqe, dma, generation, cmd);
        });
      } else {
        budget = granted;
        outcome = this.run(sq, sqe, dma, generation, cmd);
      }
    } catch (err) {
      try {
        this.dispatchFailed(sq, rt, budget, err);
      } catch (failure) {
        this.postFailed(sq, failure);
      }
      return;
    }
    if (!isPromise(outcome)) {
      try {
        this.complete(sq, rt, budget, generation, cmd.cid, outcome, null);
      } catch (err) {
        this.postFailed(sq, err);
      }
      return;
    }
    // Set once the command turned out to wait: the event-loop iteration it started in.
    const startedIn = loopIteration();
    outcome
      .then(
        (result) => this.complete(sq, rt, budget, generation, cmd.cid, result, startedIn),
        (err: unknown) => this.dispatchFailed(sq, rt, budget, err),
      )
      .catch((err: unknown) => this.postFailed(sq, err));
  }

  private run(sq: SubmissionQueueState, sqe: Uint8Array, dma: DmaSpace, generation: number, cmd: Command): MaybePromise<CommandResult | typeof DEFERRED> {
    const host = this.host;
    const isAdmin = sq.qid === 0;
    const transfer = new GuestDataTransfer({
      dma,
      sqe,
      pageSize: host.pageSize,
      allowSgl: !isAdmin,
      guard: () => {
        if (generation !== host.generation()) throw new StaleCommandError('controller was reset');
      },
    });
    return host.execute(cmd, transfer, isAdmin);
  }

  /** The command ran: its slot and budget are free, and its completion goes out unless it was deferred or reset. */
  private complete(
    sq: SubmissionQueueState,
    rt: SqRuntime,
    budget: number,
    generation: number,
    cid: number,
    result: CommandResult | typeof DEFERRED,
    startedIn: number | null,
  ): void {
    this.finished(rt, budget);
    if (result === DEFERRED || generation !== this.host.generation()) return;
    // Completed in a later iteration (a file backend's threadpool result): in an I/O callback.
    const fromCallback = startedIn !== null && startedIn !== loopIteration();
    this.host.poster.post({ cqid: sq.cqid, sqid: sq.qid, cid, status: result.status, dw0: result.dw0, dw1: result.dw1 }, fromCallback);
  }

  /** A handler threw what is not a command's status: a bug of ours, and the controller goes fatal. */
  private dispatchFailed(sq: SubmissionQueueState, rt: SqRuntime, budget: number, err: unknown): void {
    this.finished(rt, budget);
    this.host.fatal(`dispatch on SQ ${sq.qid}: ${(err as Error).stack ?? String(err)}`);
  }

  private finished(rt: SqRuntime, budget: number): void {
    if (budget > 0) this.dataBudget.release(budget);
    rt.executing--;
    this.commandFinished();
    if (rt.executing === 0 && rt.idle.length > 0) rt.idle.splice(0).forEach((wake) => wake());
  }

  /** Posting (or failing) itself throwing would be a bug of ours: the controller goes fatal rather than the process. */
  private postFailed(sq: SubmissionQueueState, err: unknown): void {
    this.host.fatal(`posting on SQ ${sq.qid}: ${(err as Error).stack ?? String(err)}`);
  }

  private commandStarted(): void {
    if (this.running++ === 0) this.busySince = Date.now();
  }

  private commandFinished(): void {
    if (--this.running === 0) {
      this.host.state.smart.busyTimeMs += Date.now() - this.busySince;
      if (this.idleWaiters.length > 0) this.idleWaiters.splice(0).forEach((wake) => wake());
    }
  }
}
