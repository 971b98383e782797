// The management verbs of the `nvme-vfio-user` command (vsubsys, ctrl, ns, list): each is a thin
// client of a server's control socket. Provisioning goes through the primary controller's own
// admin commands (Virtualization Management, Namespace Attachment, the vendor virtual-subsystem
// commands), exactly as a management VM would send them; process-level operations (exports,
// namespace back-ends, status) are control-plane requests.

import { readFileSync } from 'node:fs';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { buildCommand, type CommandFields } from '../nvme/command.js';
import { IDENTIFY_SIZE, NamespaceAttachSelect, PrimaryOpcode, VirtAction, VirtResource } from '../nvme/spec.js';
import { encodeDefinition, encodeNqn, MAX_NAMESPACE_MAPPINGS, VendorOpcode, VsubsysLayout, decodeDefinition } from '../nvme/virt/vendor-commands.js';
import { NARROWING_TEXT, type NamespaceMapping } from '../nvme/virt/vsubsys.js';
import { ConfigError, DEFAULT_SOCKET, parsePositive, parseSize } from './config.js';
import { FILE_AIO_MODES, FILE_CACHES, isFileAio, isFileCache } from '../nvme/backend.js';
import { ControlClient, parseControlAddress } from './control/client.js';
import type { AdminResultMessage, ControlRequest, ControlResponse, ServerStatus } from './control/messages.js';
import { receiveState as receive, sendState as send } from '../lm/state-transfer.js';
import { describeState } from '../lm/state-describe.js';
import { migrateVm, recoverSource } from './migrate.js';
import { MigrationSendSelect, SuspendType } from '../lm/spec.js';
import { dirname, join } from 'node:path';
import { vfioUserDeviceOption } from './qemu/attach.js';

/** A mistake in the arguments: one line, exit code 2. */
export class UsageError extends Error {}
/** The server refused or could not do it: one line, exit code 1. */
export class VerbError extends Error {}

export const DEFAULT_CONTROL = join(dirname(DEFAULT_SOCKET), 'control.sock');

export interface VerbOutput {
  out(text: string): void;
  /** Raw bytes to stdout (a controller state). */
  bytes?(data: Uint8Array): void;
  /** All of stdin (a controller state to load). */
  stdin?(): Promise<Uint8Array>;
}

type Options = NonNullable<ParseArgsConfig['options']>;
const COMMON: Options = {
  control: { type: 'string' },
  'control-token': { type: 'string' },
  json: { type: 'boolean', default: false },
};

interface Parsed {
  values: Record<string, string | boolean | string[] | undefined>;
  positionals: string[];
}

function parse(verb: string, args: string[], options: Options, positional = false): Parsed {
  try {
    const { values, positionals } = parseArgs({ args, options: { ...COMMON, ...options }, strict: true, allowPositionals: positional });
    return { values: values as Parsed['values'], positionals };
  } catch (error) {
    throw new UsageError(`${verb}: ${(error as Error).message.split('\n')[0]}`);
  }
}

const str = (p: Parsed, key: string, verb: string): string => {
  const v = p.values[key];
  if (typeof v !== 'string' || v === '') throw new UsageError(`${verb}: --${key} is required`);
  return v;
};

function num(p: Parsed, key: string, verb: string, min = 0, max = 0xffff): number {
  const text = str(p, key, verb);
  const n = Number(text);
  if (!/^(0x[0-9a-f]+|\d+)$/i.test(text) || !Number.isSafeInteger(n) || n < min || n > max) throw new UsageError(`${verb}: --${key} '${text}' must be a whole number from ${min} to ${max}`);
  return n;
}

/** The session a verb runs in: its control connection and how it reports. */
class Session {
  private constructor(
    readonly verb: string,
    readonly client: ControlClient | null,
    readonly json: boolean,
    readonly output: VerbOutput,
  ) {}

  /** For verbs that need no server (decoding a file). */
  static local(verb: string, p: Parsed, output: VerbOutput): Session {
    return new Session(verb, null, p.values.json === true, output);
  }

  static async open(verb: string, p: Parsed, output: VerbOutput): Promise<Session> {
    let address;
    try {
      address = parseControlAddress((p.values.control as string | undefined) ?? DEFAULT_CONTROL);
    } catch (error) {
      throw new UsageError(`${verb}: --control ${(error as Error).message}`);
    }
    const token = readToken(p, verb);
    try {
      return new Session(verb, await ControlClient.connect(address, token !== undefined ? { token } : {}), p.values.json === true, output);
    } catch (error) {
      throw new VerbError(`${verb}: ${(error as Error).message}`);
    }
  }

  async request(operation: Omit<ControlRequest, 'version' | 'id' | 'token'>): Promise<ControlResponse> {
    let response: ControlResponse;
    try {
      response = await this.client!.request(operation);
    } catch (error) {
      throw new VerbError(`${this.verb}: ${(error as Error).message}`);
    }
    if (response.error) throw new VerbError(`${this.verb}: ${response.error}`);
    return response;
  }

  /** Submits an admin command to the primary; a failure status is a VerbError naming it. */
  async admin(fields: CommandFields, data?: Uint8Array): Promise<AdminResultMessage> {
    const response = await this.request({ admin: { command: buildCommand(fields), ...(data ? { data } : {}) } });
    const result = response.admin!;
    if (result.status !== 0) {
      const sct = (result.status >> 8) & 7;
      const sc = result.status & 0xff;
      throw new VerbError(`${this.verb}: NVMe status ${result.statusName} (SCT ${sct.toString(16)}h, SC ${sc.toString(16).padStart(2, '0')}h)${result.detail ? `: ${result.detail}` : ''}`);
    }
    return result;
  }

  print(text: string, json: unknown): void {
    this.output.out(this.json ? `${JSON.stringify(json, null, 2)}\n` : `${text}\n`);
  }

  close(): void {
    this.client?.close();
  }
}

function readToken(p: Parsed, verb: string): string | undefined {
  const file = p.values['control-token'] as string | undefined;
  if (file === undefined) return undefined;
  try {
    return readFileSync(file, 'utf8').trim();
  } catch (error) {
    throw new UsageError(`${verb}: --control-token ${(error as Error).message}`);
  }
}

const virtMgmt = (s: Session, action: number, type: number, cntlid: number, count: number): Promise<AdminResultMessage> =>
  s.admin({ opcode: PrimaryOpcode.VIRTUALIZATION_MANAGEMENT, cdw10: action | (type << 8) | (cntlid << 16), cdw11: count });

function parseMapping(text: string, verb: string): NamespaceMapping {
  const match = /^(\d+)=(\d+)$/.exec(text);
  if (!match) throw new UsageError(`${verb}: --namespace '${text}' must be VNSID=NSID`);
  return { vnsid: Number(match[1]), nsid: Number(match[2]) };
}

// ---- the verbs --------------------------------------------------------------------------------------

interface Verb {
  options: Options;
  summary: string;
  /** Runs without a control connection. */
  local?: boolean;
  /** Takes positional arguments. */
  positional?: boolean;
  run(s: Session, p: Parsed): Promise<void>;
}

const VERBS: Record<string, Verb> = {
  'vsubsys create': {
    summary: '--virtual-nqn NQN [--serial S] [--model M] [--firmware F] [--ieee-oui HEX] [--namespace VNSID=NSID ...] [--multi-controller]',
    options: {
      'virtual-nqn': { type: 'string' },
      serial: { type: 'string' },
      model: { type: 'string' },
      firmware: { type: 'string' },
      'ieee-oui': { type: 'string' },
      namespace: { type: 'string', multiple: true },
      'multi-controller': { type: 'boolean' },
    },
    async run(s, p) {
      const nqn = str(p, 'virtual-nqn', s.verb);
      const namespaces = ((p.values.namespace as string[] | undefined) ?? []).map((m) => parseMapping(m, s.verb));
      if (namespaces.length > MAX_NAMESPACE_MAPPINGS) throw new UsageError(`${s.verb}: at most ${MAX_NAMESPACE_MAPPINGS} --namespace mappings`);
      const oui = p.values['ieee-oui'] === undefined ? 0 : Number.parseInt(String(p.values['ieee-oui']).replace(/^0x/i, ''), 16);
      if (!Number.isInteger(oui) || oui < 0 || oui > 0xff_ffff) throw new UsageError(`${s.verb}: --ieee-oui must be up to 6 hex digits`);
      const def = {
        nqn,
        ...(p.values.serial ? { serial: p.values.serial as string } : {}),
        ...(p.values.model ? { model: p.values.model as string } : {}),
        ...(p.values.firmware ? { firmware: p.values.firmware as string } : {}),
        ieeeOui: oui,
        namespaces,
        multiController: p.values['multi-controller'] === true,
      };
      await s.admin({ opcode: VendorOpcode.VSUBSYS_CREATE }, encodeDefinition(def));
      s.print(`created virtual subsystem ${nqn}`, { nqn, namespaces });
    },
  },
  'vsubsys add': {
    summary: '--virtual-nqn NQN --ctrl CNTLID --vcid N',
    options: { 'virtual-nqn': { type: 'string' }, ctrl: { type: 'string' }, vcid: { type: 'string' } },
    async run(s, p) {
      const nqn = str(p, 'virtual-nqn', s.verb);
      const cntlid = num(p, 'ctrl', s.verb, 1, 0xffef);
      const vcid = num(p, 'vcid', s.verb, 1, 0xffef);
      const result = await s.admin({ opcode: VendorOpcode.VSUBSYS_ADD_CONTROLLER, cdw10: cntlid, cdw11: vcid }, encodeNqn(nqn));
      const narrowed = Object.entries(NARROWING_TEXT)
        .filter(([bit]) => result.dw0 & Number(bit))
        .map(([, text]) => text);
      s.print(
        [`secondary ${cntlid} joined ${nqn} as virtual controller ${vcid}; narrowed:`, ...narrowed.map((t) => `  - ${t}`)].join('\n'),
        { nqn, cntlid, vcid, narrowed },
      );
    },
  },
  'vsubsys remove': {
    summary: '--virtual-nqn NQN --ctrl CNTLID',
    options: { 'virtual-nqn': { type: 'string' }, ctrl: { type: 'string' } },
    async run(s, p) {
      const nqn = str(p, 'virtual-nqn', s.verb);
      const cntlid = num(p, 'ctrl', s.verb, 1, 0xffef);
      await s.admin({ opcode: VendorOpcode.VSUBSYS_REMOVE_CONTROLLER, cdw10: cntlid }, encodeNqn(nqn));
      s.print(`secondary ${cntlid} left ${nqn}`, { nqn, cntlid });
    },
  },
  'vsubsys delete': {
    summary: '--virtual-nqn NQN',
    options: { 'virtual-nqn': { type: 'string' } },
    async run(s, p) {
      const nqn = str(p, 'virtual-nqn', s.verb);
      await s.admin({ opcode: VendorOpcode.VSUBSYS_DELETE }, encodeNqn(nqn));
      s.print(`deleted virtual subsystem ${nqn}`, { nqn });
    },
  },
  'vsubsys list': {
    summary: '',
    options: {},
    async run(s) {
      const all: { nqn: string; serial: string; model: string; firmware: string; namespaces: NamespaceMapping[]; controllers: { cntlid: number; vcid: number }[] }[] = [];
      // Index 0 always answers: its DW0 says how many there are (0: an empty page).
      for (let index = 0, count = 1; index < count; index++) {
        const result = await s.admin({ opcode: VendorOpcode.VSUBSYS_LIST, cdw10: index });
        count = result.dw0;
        if (count === 0) break;
        const def = decodeDefinition(result.data.subarray(0, VsubsysLayout.DEFINITION_SIZE));
        const view = new DataView(result.data.buffer, result.data.byteOffset, result.data.byteLength);
        const controllers = Array.from({ length: view.getUint32(VsubsysLayout.LIST_CONTROLLER_COUNT, true) }, (_, i) => ({
          cntlid: view.getUint16(VsubsysLayout.LIST_CONTROLLERS + 4 * i, true),
          vcid: view.getUint16(VsubsysLayout.LIST_CONTROLLERS + 4 * i + 2, true),
        }));
        all.push({ nqn: def.nqn, serial: def.serial ?? '', model: def.model ?? '', firmware: def.firmware ?? '', namespaces: def.namespaces ?? [], controllers });
      }
      const rows = all.map((v) => [v.nqn, v.serial, v.controllers.map((c) => `${c.cntlid}->${c.vcid}`).join(' ') || '-', v.namespaces.map((m) => `${m.vnsid}->${m.nsid}`).join(' ') || 'all']);
      s.print(all.length === 0 ? 'no virtual subsystems' : table(['VIRTUAL NQN', 'SERIAL', 'CONTROLLERS (cntlid->vcid)', 'NAMESPACES (vnsid->nsid)'], rows), all);
    },
  },
  'ctrl assign': {
    summary: '--ctrl CNTLID --vq N --vi N',
    options: { ctrl: { type: 'string' }, vq: { type: 'string' }, vi: { type: 'string' } },
    async run(s, p) {
      const cntlid = num(p, 'ctrl', s.verb, 1, 0xffef);
      const vq = num(p, 'vq', s.verb);
      const vi = num(p, 'vi', s.verb);
      const q = await virtMgmt(s, VirtAction.SECONDARY_ASSIGN, VirtResource.QUEUE, cntlid, vq);
      const i = await virtMgmt(s, VirtAction.SECONDARY_ASSIGN, VirtResource.INTERRUPT, cntlid, vi);
      s.print(`secondary ${cntlid}: ${q.dw0 & 0xffff} VQ and ${i.dw0 & 0xffff} VI resources assigned`, { cntlid, vq: q.dw0 & 0xffff, vi: i.dw0 & 0xffff });
    },
  },
  'ctrl online': {
    summary: '--ctrl CNTLID',
    options: { ctrl: { type: 'string' } },
    async run(s, p) {
      const cntlid = num(p, 'ctrl', s.verb, 1, 0xffef);
      await virtMgmt(s, VirtAction.SECONDARY_ONLINE, 0, cntlid, 0);
      s.print(`secondary ${cntlid} is online`, { cntlid, online: true });
    },
  },
  'ctrl offline': {
    summary: '--ctrl CNTLID',
    options: { ctrl: { type: 'string' } },
    async run(s, p) {
      const cntlid = num(p, 'ctrl', s.verb, 1, 0xffef);
      await virtMgmt(s, VirtAction.SECONDARY_OFFLINE, 0, cntlid, 0);
      s.print(`secondary ${cntlid} is offline (its resources were removed)`, { cntlid, online: false });
    },
  },
  'ctrl export': {
    summary: '--ctrl CNTLID --socket PATH',
    options: { ctrl: { type: 'string' }, socket: { type: 'string' } },
    async run(s, p) {
      const cntlid = num(p, 'ctrl', s.verb, 0, 0xffef);
      const socket = str(p, 'socket', s.verb);
      await s.request({ export: { cntlid, socket } });
      s.print(`controller ${cntlid} exported on ${socket}; attach it to a VM (fd-backed shared RAM) with\n  ${vfioUserDeviceOption(socket)}`, { cntlid, socket });
    },
  },
  'ctrl unexport': {
    summary: '--ctrl CNTLID',
    options: { ctrl: { type: 'string' } },
    async run(s, p) {
      const cntlid = num(p, 'ctrl', s.verb, 0, 0xffef);
      await s.request({ unexport: { cntlid } });
      s.print(`controller ${cntlid} unexported`, { cntlid });
    },
  },
  'ns add': {
    summary: '(--file PATH [--size SIZE] [--aio io_uring|threads] [--cache writeback|none|writethrough|directsync] | --ram --size SIZE) [--block-size 512|4096] [--nsid N] [--attach-all]',
    options: { file: { type: 'string' }, ram: { type: 'boolean' }, size: { type: 'string' }, 'block-size': { type: 'string' }, nsid: { type: 'string' }, 'attach-all': { type: 'boolean' }, aio: { type: 'string' }, cache: { type: 'string' } },
    async run(s, p) {
      const file = p.values.file as string | undefined;
      if ((file === undefined) === (p.values.ram !== true)) throw new UsageError(`${s.verb}: give either --file PATH or --ram`);
      let size: number | undefined;
      try {
        size = p.values.size === undefined ? undefined : parseSize(String(p.values.size), '--size');
        if (p.values.nsid !== undefined) parsePositive(String(p.values.nsid), '--nsid');
      } catch (error) {
        if (error instanceof ConfigError) throw new UsageError(`${s.verb}: ${error.message}`);
        throw error;
      }
      const blockSize = p.values['block-size'] === undefined ? 512 : num(p, 'block-size', s.verb, 512, 4096);
      if (blockSize !== 512 && blockSize !== 4096) throw new UsageError(`${s.verb}: --block-size must be 512 or 4096`);
      const aio = p.values.aio as string | undefined;
      if (aio !== undefined && file === undefined) throw new UsageError(`${s.verb}: --aio is for --file namespaces`);
      if (aio !== undefined && !isFileAio(aio)) throw new UsageError(`${s.verb}: --aio must be ${FILE_AIO_MODES.join(' or ')}`);
      const cache = p.values.cache as string | undefined;
      if (cache !== undefined && file === undefined) throw new UsageError(`${s.verb}: --cache is for --file namespaces`);
      if (cache !== undefined && !isFileCache(cache)) throw new UsageError(`${s.verb}: --cache must be ${FILE_CACHES.join(', ')}`);
      const response = await s.request({
        namespaceAdd: {
          ...(p.values.nsid !== undefined ? { nsid: Number(p.values.nsid) } : {}),
          ...(file !== undefined ? { file } : {}),
          ...(size !== undefined ? { size } : {}),
          blockSize,
          attachAll: p.values['attach-all'] === true,
          ...(aio !== undefined ? { aio } : {}),
          ...(cache !== undefined ? { cache } : {}),
        },
      });
      s.print(`namespace ${response.nsid} added${p.values['attach-all'] ? ' and attached to every controller' : ' (attach it with `ns attach`)'}`, { nsid: response.nsid });
    },
  },
  'ns remove': {
    summary: '--nsid N',
    options: { nsid: { type: 'string' } },
    async run(s, p) {
      const nsid = num(p, 'nsid', s.verb, 1, 0xffff_fffe);
      await s.request({ namespaceRemove: { nsid } });
      s.print(`namespace ${nsid} removed`, { nsid });
    },
  },
  'ns attach': {
    summary: '--nsid N --ctrl CNTLID[,CNTLID...]',
    options: { nsid: { type: 'string' }, ctrl: { type: 'string', multiple: true } },
    async run(s, p) {
      await namespaceAttachment(s, p, NamespaceAttachSelect.ATTACH);
    },
  },
  'ns detach': {
    summary: '--nsid N --ctrl CNTLID[,CNTLID...]',
    options: { nsid: { type: 'string' }, ctrl: { type: 'string', multiple: true } },
    async run(s, p) {
      await namespaceAttachment(s, p, NamespaceAttachSelect.DETACH);
    },
  },
  'ctrl suspend': {
    summary: '--ctrl CNTLID [--notify]  (Migration Send: Suspend, or only a Suspend Notification)',
    options: { ctrl: { type: 'string' }, notify: { type: 'boolean' } },
    async run(s, p) {
      const cntlid = num(p, 'ctrl', s.verb, 1, 0xffef);
      const type = p.values.notify ? SuspendType.NOTIFICATION : SuspendType.SUSPEND;
      const started = performance.now();
      await s.admin({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: MigrationSendSelect.SUSPEND, cdw11: (type << 16) | cntlid });
      const ms = performance.now() - started;
      s.print(`controller ${cntlid} ${p.values.notify ? 'notified of a coming suspend' : `suspended (${ms.toFixed(1)} ms)`}`, { cntlid, suspended: !p.values.notify, ms });
    },
  },
  'ctrl resume': {
    summary: '--ctrl CNTLID',
    options: { ctrl: { type: 'string' } },
    async run(s, p) {
      const cntlid = num(p, 'ctrl', s.verb, 1, 0xffef);
      await s.admin({ opcode: PrimaryOpcode.MIGRATION_SEND, cdw10: MigrationSendSelect.RESUME, cdw11: cntlid });
      s.print(`controller ${cntlid} resumed`, { cntlid, resumed: true });
    },
  },
  'ctrl state get': {
    summary: '--ctrl CNTLID > FILE  (Migration Receive: the whole state, in chunks)',
    options: { ctrl: { type: 'string' } },
    async run(s, p) {
      const cntlid = num(p, 'ctrl', s.verb, 1, 0xffef);
      const { bytes, consistent } = await receiveState(s, cntlid);
      if (!consistent) process.stderr.write(`nvme-vfio-user: ${s.verb}: controller ${cntlid} was not suspended throughout: the state may be inconsistent\n`);
      if (!s.output.bytes) throw new VerbError(`${s.verb}: no binary output here`);
      s.output.bytes(bytes);
    },
  },
  'ctrl state set': {
    summary: '--ctrl CNTLID < FILE  (Migration Send: Set Controller State; the controller must be suspended)',
    options: { ctrl: { type: 'string' } },
    async run(s, p) {
      const cntlid = num(p, 'ctrl', s.verb, 1, 0xffef);
      if (!s.output.stdin) throw new VerbError(`${s.verb}: no input here`);
      const bytes = await s.output.stdin();
      if (bytes.length === 0 || bytes.length % 4 !== 0) throw new UsageError(`${s.verb}: stdin holds ${bytes.length} bytes, not a controller state`);
      await sendState(s, cntlid, bytes);
      s.print(`controller ${cntlid}: state of ${bytes.length} bytes loaded`, { cntlid, bytes: bytes.length });
    },
  },
  'state show': {
    summary: 'FILE  (decode a controller state for a human)',
    options: {},
    local: true,
    positional: true,
    async run(s, p) {
      const file = p.positionals[0];
      if (!file || p.positionals.length > 1) throw new UsageError(`${s.verb}: give one FILE`);
      let bytes: Uint8Array;
      try {
        bytes = readFileSync(file);
      } catch (error) {
        throw new UsageError(`${s.verb}: ${(error as Error).message}`);
      }
      let shown;
      try {
        shown = describeState(bytes);
      } catch (error) {
        throw new VerbError(`${s.verb}: ${file}: ${(error as Error).message}`);
      }
      s.print(shown.text, shown.json);
    },
  },
  migrate: {
    summary: '--source-qmp ADDR --source-control ADDR --target-qmp ADDR --target-control ADDR --uri tcp:HOST:PORT [--max-bandwidth MIB_S] [--downtime-limit MS] [--timeout-ms MS]  (ADDR: unix:PATH or tcp:HOST:PORT; bandwidth unlimited unless given, downtime limit QEMU\'s own)',
    options: {
      'source-qmp': { type: 'string' },
      'source-control': { type: 'string' },
      'target-qmp': { type: 'string' },
      'target-control': { type: 'string' },
      uri: { type: 'string' },
      'timeout-ms': { type: 'string' },
      'max-bandwidth': { type: 'string' },
      'downtime-limit': { type: 'string' },
    },
    local: true,
    async run(s, p) {
      const token = readToken(p, s.verb);
      const options = {
        sourceQmp: str(p, 'source-qmp', s.verb),
        sourceControl: str(p, 'source-control', s.verb),
        targetQmp: str(p, 'target-qmp', s.verb),
        targetControl: str(p, 'target-control', s.verb),
        uri: str(p, 'uri', s.verb),
        ...(p.values['timeout-ms'] !== undefined ? { timeoutMs: num(p, 'timeout-ms', s.verb, 1000, 3_600_000) } : {}),
        ...(p.values['max-bandwidth'] !== undefined ? { maxBandwidth: num(p, 'max-bandwidth', s.verb, 1, 1_000_000) * 2 ** 20 } : {}),
        ...(p.values['downtime-limit'] !== undefined ? { downtimeLimitMs: num(p, 'downtime-limit', s.verb, 1, 2000) } : {}),
        ...(token !== undefined ? { controlToken: token } : {}),
        progress: (line: string) => process.stderr.write(`[migrate] ${line}\n`),
      };
      let figures;
      try {
        figures = await migrateVm(options);
      } catch (error) {
        throw new VerbError(`${s.verb}: ${(error as Error).message}`);
      }
      const text = [
        `migrated in ${figures.totalMs.toFixed(0)} ms; VM downtime ${figures.vmDowntimeMs.toFixed(0)} ms (QEMU's RAM switchover ${figures.qemuDowntimeMs ?? '?'} ms); ${(figures.ramBytes / 2 ** 20).toFixed(1)} MiB of RAM`,
        ...figures.devices.map(
          (d) => `  ${d.virtualNqn} #${d.virtualCntlid}: suspended in ${d.quiesceMs.toFixed(1)} ms, state ${d.stateBytes} bytes, ${d.dmaWriteBytes} bytes through DMA_WRITE`,
        ),
        `  switchover (ms after the source stopped): ${Object.entries(figures.switchover).map(([step, ms]) => `${step} ${ms}`).join('; ')}`,
      ].join('\n');
      s.print(text, figures);
    },
  },
  'migrate recover': {
    summary: '--source-qmp ADDR --source-control ADDR  (put a source a dead migration left paused back into service)',
    options: { 'source-qmp': { type: 'string' }, 'source-control': { type: 'string' } },
    local: true,
    async run(s, p) {
      const token = readToken(p, s.verb);
      let result;
      try {
        result = await recoverSource({
          sourceQmp: str(p, 'source-qmp', s.verb),
          sourceControl: str(p, 'source-control', s.verb),
          ...(token !== undefined ? { controlToken: token } : {}),
          progress: (line: string) => process.stderr.write(`[migrate recover] ${line}\n`),
        });
      } catch (error) {
        throw new VerbError(`${s.verb}: ${(error as Error).message}`);
      }
      s.print(`source back in service; resumed controllers: ${result.resumed.join(', ') || 'none were suspended'}`, result);
    },
  },
  list: {
    summary: '',
    options: {},
    async run(s) {
      const status = (await s.request({ status: {} })).status!;
      s.print(describeStatus(status), status);
    },
  },
};

const receiveState = (s: Session, cntlid: number) => receive((fields, data) => s.admin(fields, data), cntlid);
const sendState = (s: Session, cntlid: number, bytes: Uint8Array) => send((fields, data) => s.admin(fields, data), cntlid, bytes);

async function namespaceAttachment(s: Session, p: Parsed, select: number): Promise<void> {
  const nsid = num(p, 'nsid', s.verb, 1, 0xffff_fffe);
  const ids = ((p.values.ctrl as string[] | undefined) ?? []).flatMap((v) => v.split(',')).map((v) => {
    const n = Number(v);
    if (!/^\d+$/.test(v) || n > 0xffef) throw new UsageError(`${s.verb}: --ctrl '${v}' is not a controller ID`);
    return n;
  });
  if (ids.length === 0) throw new UsageError(`${s.verb}: --ctrl is required`);
  const list = new Uint8Array(IDENTIFY_SIZE);
  const view = new DataView(list.buffer);
  view.setUint16(0, ids.length, true);
  ids.forEach((id, i) => view.setUint16(2 + 2 * i, id, true));
  await s.admin({ opcode: PrimaryOpcode.NAMESPACE_ATTACHMENT, nsid, cdw10: select }, list);
  const did = select === NamespaceAttachSelect.ATTACH ? 'attached to' : 'detached from';
  s.print(`namespace ${nsid} ${did} controller${ids.length > 1 ? 's' : ''} ${ids.join(', ')}`, { nsid, controllers: ids, attached: select === NamespaceAttachSelect.ATTACH });
}

function describeStatus(status: ServerStatus): string {
  const rows = status.controllers.map((c) => [
    String(c.cntlid),
    c.role,
    c.role === 'secondary' ? (c.online ? 'online' : 'offline') : '-',
    c.role === 'secondary' ? `${c.vq}/${c.vi}` : '-',
    c.virtualNqn ? `${c.virtualNqn} #${c.virtualCntlid}` : '-',
    c.runState + (c.enabled ? '' : ' (disabled)'),
    c.namespaces.join(',') || '-',
    c.socket ? `${c.socket}${c.clientConnected ? ' (client)' : ''}` : '-',
  ]);
  const namespaces = status.namespaces.map((n) => `  ${n.nsid}: ${n.backend}${n.aio ? `, aio=${n.aio}` : ''}${n.cache ? `, cache=${n.cache}` : ''}, ${n.blockSize}-byte blocks`);
  return [
    `subsystem ${status.nqn}   control ${status.control}`,
    table(['CNTLID', 'ROLE', 'STATE', 'VQ/VI', 'VIRTUAL IDENTITY', 'RUN', 'NS', 'SOCKET'], rows),
    'namespaces:',
    ...(namespaces.length > 0 ? namespaces : ['  none']),
  ].join('\n');
}

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]): string => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(header), ...rows.map(line)].join('\n');
}

/** The verb `argv` starts with (the longest name that matches) and how many words it took. */
function lookup(argv: string[]): { name: string; verb: Verb; words: number } | null {
  for (let words = 3; words >= 1; words--) {
    const name = argv.slice(0, words).join(' ');
    const verb = VERBS[name];
    if (verb && argv.length >= words) return { name, verb, words };
  }
  return null;
}

/** Whether `argv` starts with a management verb this module runs. */
export function isManagementVerb(argv: string[]): boolean {
  return lookup(argv) !== null || Object.keys(VERBS).some((k) => k.split(' ')[0] === argv[0]);
}

export const VERB_HELP = Object.entries(VERBS)
  .map(([name, v]) => `  ${name} ${v.summary}`.trimEnd())
  .join('\n');

/** Runs a management verb; resolves once its output is written. Throws UsageError or VerbError. */
export async function runVerb(argv: string[], output: VerbOutput): Promise<void> {
  const found = lookup(argv);
  if (!found) {
    const group = [...new Set(Object.keys(VERBS).filter((k) => k.startsWith(`${argv[0]} `)).map((k) => k.split(' ').slice(1).join(' ')))];
    throw new UsageError(`unknown command '${argv.slice(0, 2).join(' ')}'${group.length > 0 ? ` (${argv[0]} takes: ${group.join(', ')})` : ''}`);
  }
  const { name, verb, words } = found;
  const parsed = parse(name, argv.slice(words), verb.options, verb.positional);
  const session = verb.local ? Session.local(name, parsed, output) : await Session.open(name, parsed, output);
  try {
    await verb.run(session, parsed);
  } finally {
    session.close();
  }
}
