// Track Send (3Dh), Track Receive (3Eh), Controller Data Queue (45h) and Feature 21h on the
// Migration Management Controller, and the Identify Controller fields that announce them.

import type { Command, HandlerResult } from '../nvme/command.js';
import type { AdminCommandSet, AdminHandler, ControllerContext } from '../nvme/context.js';
import type { NvmeController } from '../nvme/controller.js';
import { PrimaryOpcode, Status } from '../nvme/spec.js';
import { CommandError, type DataTransfer } from '../nvme/transfer.js';
import type { ControllingFunction } from '../nvme/virt/controlling-function.js';
import { MemoryTracking } from './memory-tracking.js';
import {
  CDQ_LIST_PRPS,
  CDQ_RANGES,
  CDQ_RANGES_IN_SUBSYSTEM,
  MAX_TRACKING_GRANULARITY,
  MIN_TRACKING_GRANULARITY,
  TRACKING_DESCRIPTORS_IN_SUBSYSTEM,
  TRACKING_DESCRIPTORS_PER_CONTROLLER,
  USER_DATA_QUEUES,
} from './policy.js';
import { CdqSelect, FEATURE_CONTROLLER_DATA_QUEUE, IdentifyLm, MOS_SHIFT, TrackAction, TrackMemoryLayout, TrackReceiveSelect, TrackSendSelect } from './spec.js';
import { UserDataQueues } from './user-data-queues.js';

const fail = (status: number, why: string): CommandError => new CommandError(status, why);

export class Tracking {
  readonly memory = new MemoryTracking();
  readonly userData: UserDataQueues;

  constructor(private readonly cf: ControllingFunction) {
    this.userData = new UserDataQueues({ primary: cf.primary, controller: (cntlid) => cf.virtualization.controller(cntlid) });
  }

  /** A migratable controller of this primary (never the primary itself: Invalid Controller Identifier). */
  target(cntlid: number): NvmeController {
    const target = cntlid === this.cf.primary.cntlid ? undefined : this.cf.virtualization.controller(cntlid);
    if (!target) throw fail(Status.INVALID_CONTROLLER_IDENTIFIER, `CNTLID ${cntlid} is not a migratable controller of this primary`);
    return target;
  }

  reset(): void {
    this.memory.reset();
    this.userData.reset();
  }
}

async function trackSend(t: Tracking, cmd: Command, data: DataTransfer): Promise<HandlerResult> {
  const select = cmd.cdw10 & 0xff;
  const mos = cmd.cdw10 >>> MOS_SHIFT;
  switch (select) {
    case TrackSendSelect.LOG_USER_DATA_CHANGES:
      t.userData.log(cmd.cdw11 & 0xffff, mos & 0xf);
      return;
    case TrackSendSelect.TRACK_MEMORY_CHANGES: {
      const cntlid = cmd.cdw11 & 0xffff;
      const target = t.target(cntlid);
      if ((mos & 1) === TrackAction.STOP) {
        t.memory.stop(cntlid);
        return;
      }
      const header = await data.fromHost(TrackMemoryLayout.HEADER);
      const count = new DataView(header.buffer, header.byteOffset).getUint32(TrackMemoryLayout.RNMRTD, true);
      if (count > TRACKING_DESCRIPTORS_PER_CONTROLLER) throw fail(Status.INVALID_FIELD, `${count} memory range descriptors`);
      t.memory.start(cntlid, target, await data.fromHost(TrackMemoryLayout.HEADER + count * TrackMemoryLayout.DESCRIPTOR_SIZE));
      return;
    }
    default:
      throw fail(Status.INVALID_FIELD, `Track Send SEL ${select}`);
  }
}

async function trackReceive(t: Tracking, cmd: Command, data: DataTransfer): Promise<HandlerResult> {
  const select = cmd.cdw10 & 0xff;
  if (select !== TrackReceiveSelect.TRACKED_MEMORY_CHANGES) throw fail(Status.INVALID_FIELD, `Track Receive SEL ${select}`);
  const cntlid = cmd.cdw11 & 0xffff;
  const bytes = ((cmd.cdw12 >>> 0) + 1) * 4;
  await data.toHost(t.memory.receive(cntlid, t.target(cntlid), bytes));
}

async function controllerDataQueue(t: Tracking, cmd: Command): Promise<HandlerResult> {
  const select = cmd.cdw10 & 0xff;
  switch (select) {
    case CdqSelect.CREATE:
      return { dw0: await t.userData.create(cmd) };
    case CdqSelect.DELETE:
      t.userData.delete(cmd.cdw11 & 0xffff);
      return;
    default:
      throw fail(Status.INVALID_FIELD, `Controller Data Queue SEL ${select}`);
  }
}

export function trackingCommandSet(t: Tracking): AdminCommandSet {
  return {
    name: 'live migration tracking',
    handlers: new Map<number, AdminHandler>([
      [PrimaryOpcode.TRACK_SEND, (_c: ControllerContext, cmd, data) => trackSend(t, cmd, data)],
      [PrimaryOpcode.TRACK_RECEIVE, (_c: ControllerContext, cmd, data) => trackReceive(t, cmd, data)],
      [PrimaryOpcode.CONTROLLER_DATA_QUEUE, (_c: ControllerContext, cmd) => controllerDataQueue(t, cmd)],
    ]),
    features: new Map([[FEATURE_CONTROLLER_DATA_QUEUE, t.userData.feature()]]),
    decorateIdentifyController(_c, page) {
      page.setUint16(IdentifyLm.CMMRTD, TRACKING_DESCRIPTORS_PER_CONTROLLER, true);
      page.setUint16(IdentifyLm.NMMRTD, TRACKING_DESCRIPTORS_IN_SUBSYSTEM, true);
      page.setUint8(IdentifyLm.MINMRTG, MIN_TRACKING_GRANULARITY);
      page.setUint8(IdentifyLm.MAXMRTG, MAX_TRACKING_GRANULARITY);
      page.setUint8(IdentifyLm.TRATTR, IdentifyLm.THMCS | IdentifyLm.TUDCS);
      page.setUint16(IdentifyLm.MCUDMQ, USER_DATA_QUEUES, true);
      page.setUint16(IdentifyLm.MNSUDMQ, USER_DATA_QUEUES, true);
      page.setUint16(IdentifyLm.MCMR, CDQ_RANGES, true);
      page.setUint16(IdentifyLm.NMCMR, CDQ_RANGES_IN_SUBSYSTEM, true);
      page.setUint16(IdentifyLm.MCDQPC, CDQ_LIST_PRPS, true);
    },
    controllerReset() {
      t.reset();
    },
  };
}
