// Asynchronous events (Base §5.2), the Error Information log and the Changed Namespace List: what
// a controller tells its host without being asked. Outstanding Asynchronous Event Requests are
// plain CIDs in the state, so they survive a migration and complete on the target.

import type { EventControl } from './context.js';
import { ASYNC_EVENT_LIMIT, CHANGED_NAMESPACE_LIMIT, ERROR_LOG_ENTRIES } from './policy.js';
import { AsyncEventConfig, AsyncEventInfo, AsyncEventType, LogId, Status } from './spec.js';
import type { AsyncEvent, ControllerState } from './state.js';
import { CommandError } from './transfer.js';

export interface EventHost {
  readonly state: ControllerState;
  /** Whether completions may be posted now (not while the controller is suspended). */
  touchesHost(): boolean;
  /** Completes the Asynchronous Event Request `cid` on the admin queue with `dw0` and `dw1`. */
  completeRequest(cid: number, dw0: number, dw1: number): void;
}

export interface ErrorRecord {
  sqid: number;
  cid: number;
  status: number;
  nsid: number;
  lba: number;
}

export class AsyncEvents implements EventControl {
  constructor(private readonly host: EventHost) {}

  get errorLog(): ControllerState['errorLog'] {
    return this.host.state.errorLog;
  }

  get changedNamespaces(): readonly number[] {
    return this.host.state.changedNamespaces;
  }

  deferRequest(cid: number): void {
    const aer = this.host.state.asyncEvents;
    if (aer.outstanding.length >= ASYNC_EVENT_LIMIT) throw new CommandError(Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED);
    aer.outstanding.push(cid);
    queueMicrotask(() => this.deliver());
  }

  queue(event: AsyncEvent): void {
    const aer = this.host.state.asyncEvents;
    if (!aer.queued.some((e) => e.type === event.type && e.info === event.info && e.logPage === event.logPage && e.dw1 === event.dw1)) aer.queued.push(event);
    this.deliver();
  }

  logPageRead(logPage: number): void {
    const state = this.host.state;
    state.asyncEvents.masked = state.asyncEvents.masked.filter((l) => l !== logPage);
    if (logPage === LogId.CHANGED_NAMESPACES) state.changedNamespaces = [];
    this.deliver();
  }

  /** Pairs queued events with outstanding requests; nothing moves while the controller is silent. */
  deliver(): void {
    const aer = this.host.state.asyncEvents;
    while (aer.outstanding.length > 0 && this.host.touchesHost()) {
      const index = aer.queued.findIndex((e) => e.type === AsyncEventType.ONE_SHOT || !aer.masked.includes(e.logPage));
      if (index < 0) return;
      const [event] = aer.queued.splice(index, 1);
      const cid = aer.outstanding.shift()!;
      // A One-Shot event is cleared as it is reported: no log page to read first (Base §5.2.2).
      if (event!.type !== AsyncEventType.ONE_SHOT) aer.masked.push(event!.logPage);
      this.host.completeRequest(cid, event!.type | (event!.info << 8) | (event!.logPage << 16), event!.dw1 ?? 0);
    }
  }

  recordError(entry: ErrorRecord): void {
    const log = this.host.state.errorLog;
    log.count++;
    log.entries.unshift({ errorCount: log.count, parameterLocation: 0xffff, ...entry });
    if (log.entries.length > ERROR_LOG_ENTRIES) log.entries.length = ERROR_LOG_ENTRIES;
  }

  /** An invalid doorbell write (Base §3.1.4): reported as an error event only while a request waits. */
  invalidDoorbell(info: number, qid: number): void {
    if (this.host.state.asyncEvents.outstanding.length === 0) return;
    this.recordError({ sqid: qid, cid: 0xffff, status: Status.INVALID_FIELD, nsid: 0, lba: 0 });
    this.queue({ type: AsyncEventType.ERROR, info, logPage: LogId.ERROR_INFORMATION });
  }

  /** Adds `nsid` to the Changed Namespace List and raises the notice if the host enabled it. */
  namespaceChanged(nsid: number): void {
    const state = this.host.state;
    const list = state.changedNamespaces;
    if (list[0] !== 0xffff_ffff && !list.includes(nsid)) {
      if (list.length >= CHANGED_NAMESPACE_LIMIT) state.changedNamespaces = [0xffff_ffff];
      else list.push(nsid);
    }
    if (state.features.asyncEventConfig & AsyncEventConfig.NAMESPACE_ATTRIBUTE_NOTICES) {
      this.queue({ type: AsyncEventType.NOTICE, info: AsyncEventInfo.NAMESPACE_ATTRIBUTE_CHANGED, logPage: LogId.CHANGED_NAMESPACES });
    }
  }
}
