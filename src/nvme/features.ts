// Get Features / Set Features (Base §5.15 and §5.27) over the plain FeatureValues in controller
// state. Each feature is one entry: how to read its value (from any FeatureValues, so "default"
// and "current" share the code) and how a Set changes it.

import type { Command, Completion } from './command.js';
import type { ControllerContext } from './context.js';
import { AsyncEventConfig, CmdBits, FeatureId, FeatureSelect, InterruptCoalescing, InterruptVectorConfig, Status } from './spec.js';
import { CHANGEABLE_FEATURES, defaultFeatures, type FeatureValues } from './state.js';
import { CommandError, type DataTransfer } from './transfer.js';

export interface Feature {
  /** Dword 0 of a Get; may also transfer a data structure. */
  get(c: ControllerContext, values: FeatureValues, cmd: Command, data: DataTransfer): Promise<number> | number;
  set(c: ControllerContext, cmd: Command, data: DataTransfer): Promise<number | void> | number | void;
  /** Present only under a condition (e.g. a volatile write cache exists). */
  available?(c: ControllerContext): boolean;
}

const invalid = (why: string): CommandError => new CommandError(Status.INVALID_FIELD, why);

/** Temperature Threshold selectors: only the composite sensor (TMPSEL 0) exists. */
function thresholdSelector(cdw11: number): 'over' | 'under' {
  const tmpsel = (cdw11 >>> 16) & 0xf;
  const thsel = (cdw11 >>> 20) & 0x3;
  if (tmpsel !== 0) throw invalid(`temperature sensor ${tmpsel}`);
  if (thsel > 1) throw invalid(`threshold type ${thsel}`);
  return thsel === 0 ? 'over' : 'under';
}

const TIMESTAMP_SIZE = 8;
const HOST_BEHAVIOR_SIZE = 512;

const FEATURES = new Map<number, Feature>([
  [
    FeatureId.ARBITRATION,
    {
      get: (_c, v) => v.arbitration,
      set: (c, cmd) => void (c.features.arbitration = cmd.cdw11 & 0xffff_ff07),
    },
  ],
  [
    FeatureId.POWER_MANAGEMENT,
    {
      get: (_c, v) => v.powerManagement,
      set: (c, cmd) => {
        if ((cmd.cdw11 & 0x1f) !== 0) throw invalid('only power state 0 exists');
        c.features.powerManagement = cmd.cdw11 & 0xff;
      },
    },
  ],
  [
    FeatureId.TEMPERATURE_THRESHOLD,
    {
      get: (_c, v, cmd) => (thresholdSelector(cmd.cdw11) === 'over' ? v.temperatureOver : v.temperatureUnder),
      set: (c, cmd) => {
        const value = cmd.cdw11 & 0xffff;
        if (thresholdSelector(cmd.cdw11) === 'over') c.features.temperatureOver = value;
        else c.features.temperatureUnder = value;
      },
    },
  ],
  [
    FeatureId.ERROR_RECOVERY,
    {
      get: (_c, v) => v.errorRecovery,
      set: (c, cmd) => {
        // DULBE needs deallocated-block errors (NSFEAT bit 2), which we do not report.
        if (cmd.cdw11 & CmdBits.ERROR_RECOVERY_DULBE) throw invalid('DULBE not supported');
        c.features.errorRecovery = cmd.cdw11 & 0xffff;
      },
    },
  ],
  [
    FeatureId.VOLATILE_WRITE_CACHE,
    {
      available: (c) => c.volatileWriteCachePresent,
      get: (_c, v) => (v.volatileWriteCache ? 1 : 0),
      set: (c, cmd) => void (c.features.volatileWriteCache = (cmd.cdw11 & 1) === 1),
    },
  ],
  [
    FeatureId.NUMBER_OF_QUEUES,
    {
      get: (_c, v) => ((v.ioCompletionQueues - 1) << 16) | (v.ioSubmissionQueues - 1),
      set: (c, cmd) => {
        const nsqr = cmd.cdw11 & 0xffff;
        const ncqr = cmd.cdw11 >>> 16;
        if (nsqr === 0xffff || ncqr === 0xffff) throw invalid('65536 queues requested');
        if (c.queues.hasIoQueues()) throw new CommandError(Status.COMMAND_SEQUENCE_ERROR, 'I/O queues already exist');
        const f = c.features;
        f.ioSubmissionQueues = Math.min(nsqr + 1, c.limits.maxIoQueues);
        f.ioCompletionQueues = Math.min(ncqr + 1, c.limits.maxIoQueues);
        return ((f.ioCompletionQueues - 1) << 16) | (f.ioSubmissionQueues - 1);
      },
    },
  ],
  [
    FeatureId.INTERRUPT_COALESCING,
    {
      get: (_c, v) => v.interruptCoalescing,
      set: (c, cmd) => void (c.features.interruptCoalescing = cmd.cdw11 & InterruptCoalescing.FIELDS_MASK),
    },
  ],
  [
    FeatureId.INTERRUPT_VECTOR_CONFIG,
    {
      get: (c, v, cmd) => {
        const iv = cmd.cdw11 & InterruptVectorConfig.IV_MASK;
        if (iv >= c.limits.vectors) throw invalid(`interrupt vector ${iv}`);
        return iv | (v.coalescingDisabled.includes(iv) ? InterruptVectorConfig.CD : 0);
      },
      set: (c, cmd) => {
        const iv = cmd.cdw11 & InterruptVectorConfig.IV_MASK;
        if (iv >= c.limits.vectors) throw invalid(`interrupt vector ${iv}`);
        const f = c.features;
        f.coalescingDisabled = f.coalescingDisabled.filter((x) => x !== iv);
        if (cmd.cdw11 & InterruptVectorConfig.CD) f.coalescingDisabled.push(iv);
      },
    },
  ],
  [
    FeatureId.WRITE_ATOMICITY,
    {
      get: (_c, v) => v.writeAtomicityNormal,
      set: (c, cmd) => void (c.features.writeAtomicityNormal = cmd.cdw11 & 1),
    },
  ],
  [
    FeatureId.ASYNC_EVENT_CONFIG,
    {
      get: (_c, v) => v.asyncEventConfig,
      set: (c, cmd) => {
        const supported = AsyncEventConfig.SMART_CRITICAL_WARNINGS | AsyncEventConfig.NAMESPACE_ATTRIBUTE_NOTICES;
        c.features.asyncEventConfig = cmd.cdw11 & supported;
      },
    },
  ],
  [
    FeatureId.TIMESTAMP,
    {
      get: async (c, v, _cmd, data) => {
        const now = v === c.features ? c.clocks.timestampNow() : { value: 0, hostSet: false };
        const out = new Uint8Array(TIMESTAMP_SIZE);
        const view = new DataView(out.buffer);
        view.setUint32(0, now.value % 0x1_0000_0000, true);
        view.setUint16(4, Math.floor(now.value / 0x1_0000_0000) & 0xffff, true);
        out[6] = now.hostSet ? 1 << 1 : 0; // Timestamp Origin 001b: set by a Set Features
        await data.toHost(out);
        return 0;
      },
      set: async (c, _cmd, data) => {
        const bytes = await data.fromHost(TIMESTAMP_SIZE);
        const view = new DataView(bytes.buffer, bytes.byteOffset, TIMESTAMP_SIZE);
        const value = view.getUint32(0, true) + view.getUint16(4, true) * 0x1_0000_0000;
        c.clocks.setTimestamp(value);
      },
    },
  ],
  [
    FeatureId.KEEP_ALIVE_TIMER,
    {
      get: (_c, v) => v.keepAliveTimeoutMs,
      set: (c, cmd) => {
        c.features.keepAliveTimeoutMs = cmd.cdw11 >>> 0;
        c.clocks.restartKeepAlive();
      },
    },
  ],
  [
    FeatureId.HOST_BEHAVIOR_SUPPORT,
    {
      get: async (_c, v, _cmd, data) => {
        await data.toHost(Uint8Array.from(v.hostBehavior));
        return 0;
      },
      set: async (c, _cmd, data) => {
        const bytes = await data.fromHost(HOST_BEHAVIOR_SIZE);
        c.features.hostBehavior = Array.from(bytes);
      },
    },
  ],
]);

function lookup(c: ControllerContext, fid: number): Feature {
  const feature = FEATURES.get(fid) ?? c.commandSets.map((set) => set.features?.get(fid)).find((f) => f !== undefined);
  if (!feature || (feature.available && !feature.available(c))) throw invalid(`feature 0x${fid.toString(16)}`);
  return feature;
}

export async function getFeatures(c: ControllerContext, cmd: Command, data: DataTransfer): Promise<Completion> {
  const fid = cmd.cdw10 & 0xff;
  const select = (cmd.cdw10 >>> 8) & 0x7;
  const feature = lookup(c, fid);
  switch (select) {
    case FeatureSelect.CURRENT:
      return { dw0: await feature.get(c, c.features, cmd, data) };
    case FeatureSelect.DEFAULT:
    case FeatureSelect.SAVED: // nothing is ever saved, so saved = default
      return { dw0: await feature.get(c, defaultFeatures(c.limits.maxIoQueues), cmd, data) };
    case FeatureSelect.SUPPORTED_CAPABILITIES:
      // bit 2: changeable; not saveable (bit 0), not namespace specific (bit 1).
      return { dw0: CHANGEABLE_FEATURES.includes(fid) || !FEATURES.has(fid) ? 1 << 2 : 0 };
    default:
      throw invalid(`select ${select}`);
  }
}

export async function setFeatures(c: ControllerContext, cmd: Command, data: DataTransfer): Promise<Completion> {
  const fid = cmd.cdw10 & 0xff;
  const save = (cmd.cdw10 >>> 31) !== 0;
  const feature = lookup(c, fid);
  if (save) throw new CommandError(Status.FEATURE_NOT_SAVEABLE, `feature 0x${fid.toString(16)}`);
  const dw0 = await feature.set(c, cmd, data);
  return { dw0: dw0 ?? 0 };
}
