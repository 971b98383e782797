// What a server process serves, as plain data: from command-line flags, from a JSON file, or both
// (flags win). Validation happens here so every mistake is one clear sentence before anything runs.

import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { INTERRUPT_OFFERS, type InterruptOffer } from '../nvme/controller.js';
import { FILE_AIO_MODES, FILE_CACHES, isFileAio, isFileCache, type FileAio, type FileCache } from '../nvme/backend.js';
import { emptyProvisioning, parseProvisioning, type Provisioning } from './provisioning.js';

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

export type DeviceKind = 'nvme' | 'scratch';
export const DEVICE_KINDS: readonly DeviceKind[] = ['nvme', 'scratch'];

export interface NamespaceConfig {
  /** Backing file (created sparse when missing); absent for a RAM namespace. */
  file?: string;
  /** Bytes. Required for RAM and for files that do not exist yet. */
  size?: number;
  /** Logical block size: 512 or 4096. */
  lbads: 512 | 4096;
  nsid?: number;
  /** A file's transfers that may wait for a disk: an io_uring (the default where the kernel allows) or libuv's threadpool. */
  aio?: FileAio;
  /** QEMU's cache= modes: 'none' and 'directsync' bypass the host's page cache (O_DIRECT). Default 'writeback'. */
  cache?: FileCache;
}

export interface ServerConfig {
  device: DeviceKind;
  /** One controller per socket; all share the subsystem's namespaces. */
  sockets: string[];
  namespaces: NamespaceConfig[];
  nqn?: string;
  serial?: string;
  model?: string;
  ioQueues: number;
  queueEntries: number;
  /** Max data transfer: 2^mdts minimum-size pages. */
  mdts: number;
  writeMultiple: boolean;
  /** Best interrupt mode the controllers offer (MSI-X by default). */
  interrupts: InterruptOffer;
  /** How long (µs) a busy SQ's shadow tail is polled after it last took commands; 0 = never. */
  pollUs: number;
  /** How often (ms) a deep SQ's commands are collected, its doorbells held back meanwhile; 0 = never. */
  batchMs: number;
  /** Doorbells as trapped registers, or as a page the guest maps and the controller polls. */
  doorbells: DoorbellMode;
  /**
   * Secondary controllers of a controlling function (primary = CNTLID 0, secondaries 1..N); 0 =
   * peer controllers, one per socket.
   */
  secondaries: number;
  /** Export the primary controller here (a management VM uses it). */
  primarySocket?: string;
  /** Control socket: a unix path, or tcp:HOST:PORT. Default: control.sock beside the first socket. */
  control?: string;
  /** Record provisioning here and come back from it after a restart. */
  stateDir?: string;
  /** File holding the token every control request must carry (required on TCP). */
  controlToken?: string;
  /** Virtual subsystems, resources, states and exports to set up at start. */
  provisioning: Provisioning;
  /** Permission bits of the vfio-user sockets; absent: the socket policy's default (0600). The control socket stays 0600. */
  socketMode?: number;
}

export const DEFAULT_SOCKET = join(tmpdir(), 'nvme-vfio-user', 'ctrl0.sock');
export const DEFAULT_RAM_NAMESPACE_BYTES = 1 << 30;

export const defaults = (): ServerConfig => ({
  device: 'nvme',
  sockets: [],
  namespaces: [],
  ioQueues: 8,
  queueEntries: 1024,
  mdts: 8,
  writeMultiple: false,
  interrupts: 'msix',
  pollUs: 0,
  batchMs: 0,
  doorbells: 'trapped',
  secondaries: 0,
  provisioning: emptyProvisioning(),
});

const SIZE_UNITS: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/** "4096", "64M", "1G", "1.5T" (binary units; an optional trailing B or iB). */
export function parseSize(text: string, what = 'size'): number {
  const match = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?$/i.exec(text.trim());
  if (!match) throw new ConfigError(`${what} '${text}' is not a size (e.g. 512M, 1G)`);
  const bytes = Number(match[1]) * SIZE_UNITS[match[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new ConfigError(`${what} '${text}' is not a positive whole number of bytes`);
  return bytes;
}

function parseAio(value: string, what: string): FileAio {
  if (!isFileAio(value)) throw new ConfigError(`${what}: aio must be ${FILE_AIO_MODES.join(' or ')}, got '${value}'`);
  return value;
}

function parseCache(value: string, what: string): FileCache {
  if (!isFileCache(value)) throw new ConfigError(`${what}: cache must be ${FILE_CACHES.join(', ')}, got '${value}'`);
  return value;
}

/** `file=PATH,size=1G,lbads=4096,nsid=2,aio=io_uring,cache=none` or `ram,size=256M`. */
export function parseNamespaceSpec(spec: string, baseDir = process.cwd()): NamespaceConfig {
  const ns: Partial<NamespaceConfig> & { ram?: boolean } = {};
  for (const part of spec.split(',')) {
    const eq = part.indexOf('=');
    const key = (eq < 0 ? part : part.slice(0, eq)).trim();
    const value = eq < 0 ? undefined : part.slice(eq + 1);
    switch (key) {
      case 'file':
        if (!value) throw new ConfigError(`namespace '${spec}': file= needs a path`);
        ns.file = isAbsolute(value) ? value : resolve(baseDir, value);
        break;
      case 'ram':
        if (value !== undefined) ns.size = parseSize(value, `namespace '${spec}' ram`);
        ns.ram = true;
        break;
      case 'size':
        ns.size = parseSize(value ?? '', `namespace '${spec}' size`);
        break;
      case 'lbads':
        ns.lbads = parseBlockSize(value ?? '', spec);
        break;
      case 'nsid':
        ns.nsid = parsePositive(value ?? '', `namespace '${spec}' nsid`);
        break;
      case 'aio':
        ns.aio = parseAio(value ?? '', `namespace '${spec}'`);
        break;
      case 'cache':
        ns.cache = parseCache(value ?? '', `namespace '${spec}'`);
        break;
      default:
        throw new ConfigError(`namespace '${spec}': unknown key '${key}' (expected file, ram, size, lbads, nsid, aio, cache)`);
    }
  }
  const { ram, ...rest } = ns;
  return checkNamespace({ ...rest, lbads: rest.lbads ?? 512 }, ram === true, spec);
}

function checkNamespace(ns: NamespaceConfig, ram: boolean, what: string): NamespaceConfig {
  if (ram && ns.file) throw new ConfigError(`namespace '${what}': give either file= or ram, not both`);
  if (!ram && !ns.file) throw new ConfigError(`namespace '${what}': needs file=PATH or ram`);
  if (ram && ns.size === undefined) throw new ConfigError(`namespace '${what}': a RAM namespace needs size=`);
  if (ram && ns.aio !== undefined) throw new ConfigError(`namespace '${what}': aio= is for file namespaces`);
  if (ram && ns.cache !== undefined) throw new ConfigError(`namespace '${what}': cache= is for file namespaces`);
  if (ns.size !== undefined && ns.size % ns.lbads !== 0) {
    throw new ConfigError(`namespace '${what}': size ${ns.size} is not a multiple of the ${ns.lbads}-byte block`);
  }
  return ns;
}

function parseBlockSize(value: string, what: string): 512 | 4096 {
  if (value === '512' || value === '4096') return Number(value) as 512 | 4096;
  throw new ConfigError(`namespace '${what}': lbads must be 512 or 4096`);
}

export function parsePositive(value: string, what: string, max = 0xffff_ffff): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n < 1 || n > max) {
    throw new ConfigError(`${what} '${value}' must be a whole number from 1 to ${max}`);
  }
  return n;
}

/** The longest poll window `--poll-us` takes: a second of a core per burst is already absurd. */
export const MAX_POLL_US = 1_000_000;

export const parsePollUs = (value: string, what: string): number => parseWholeUpTo(value, what, 'microseconds', MAX_POLL_US);

/** The longest batch period `--batch-ms` takes: beyond it a batched queue is merely stalled. */
export const MAX_BATCH_MS = 100;

/** The shortest: below it the period is a poll loop, which `--poll-us` and `--doorbells mapped` already are. */
export const MIN_BATCH_MS = 0.05;

/** Milliseconds to the µs (0.25 is 250 µs); 0 is off. */
export function parseBatchMs(value: string, what: string): number {
  const ms = Number(value);
  if (!/^\d+(\.\d{1,3})?$/.test(value) || (ms !== 0 && (ms < MIN_BATCH_MS || ms > MAX_BATCH_MS))) {
    throw new ConfigError(`${what} '${value}' must be 0 (off) or from ${MIN_BATCH_MS} to ${MAX_BATCH_MS} milliseconds, to the microsecond`);
  }
  return ms;
}

function parseWholeUpTo(value: string, what: string, unit: string, max: number): number {
  if (!/^\d+$/.test(value) || Number(value) > max) {
    throw new ConfigError(`${what} '${value}' must be a whole number of ${unit} from 0 to ${max}`);
  }
  return Number(value);
}

/** Reads a JSON config file; paths inside it are relative to the file. */
export function loadConfigFile(path: string): Partial<ServerConfig> {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(path, 'utf8'));
  } catch (error) {
    throw new ConfigError(`config ${path}: ${(error as Error).message}`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new ConfigError(`config ${path}: not a JSON object`);
  const baseDir = resolve(path, '..');
  const input = raw as Record<string, unknown>;
  const known = [
    'device',
    'sockets',
    'socketMode',
    'namespaces',
    'nqn',
    'serial',
    'model',
    'ioQueues',
    'queueEntries',
    'mdts',
    'writeMultiple',
    'interrupts',
    'pollUs',
    'batchMs',
    'doorbells',
    'secondaries',
    'primarySocket',
    'control',
    'stateDir',
    'controlToken',
    'virtualSubsystems',
    'controllers',
  ];
  for (const key of Object.keys(input)) {
    if (!known.includes(key)) throw new ConfigError(`config ${path}: unknown key '${key}' (known: ${known.join(', ')})`);
  }
  const out: Partial<ServerConfig> = {};
  if (input.device !== undefined) out.device = checkDevice(String(input.device));
  if (input.sockets !== undefined) {
    if (!Array.isArray(input.sockets) || !input.sockets.every((s) => typeof s === 'string' && s !== '')) {
      throw new ConfigError(`config ${path}: sockets must be an array of paths`);
    }
    out.sockets = input.sockets.map((s: string) => resolve(baseDir, s));
  }
  if (input.namespaces !== undefined) {
    if (!Array.isArray(input.namespaces)) throw new ConfigError(`config ${path}: namespaces must be an array`);
    out.namespaces = input.namespaces.map((entry, i) => namespaceFromJson(entry, `${path} namespaces[${i}]`, baseDir));
  }
  for (const key of ['nqn', 'serial', 'model'] as const) {
    if (input[key] !== undefined) {
      if (typeof input[key] !== 'string') throw new ConfigError(`config ${path}: ${key} must be a string`);
      out[key] = input[key] as string;
    }
  }
  for (const key of ['ioQueues', 'queueEntries', 'mdts'] as const) {
    if (input[key] !== undefined) out[key] = parsePositive(String(input[key]), `config ${path}: ${key}`);
  }
  if (input.writeMultiple !== undefined) out.writeMultiple = input.writeMultiple === true;
  if (input.interrupts !== undefined) out.interrupts = checkInterrupts(String(input.interrupts));
  if (input.pollUs !== undefined) out.pollUs = parsePollUs(String(input.pollUs), `config ${path}: pollUs`);
  if (input.batchMs !== undefined) out.batchMs = parseBatchMs(String(input.batchMs), `config ${path}: batchMs`);
  if (input.doorbells !== undefined) out.doorbells = checkDoorbells(String(input.doorbells), `config ${path}: doorbells`);
  if (input.secondaries !== undefined) out.secondaries = parsePositive(String(input.secondaries), `config ${path}: secondaries`, 127);
  for (const key of ['primarySocket', 'stateDir', 'controlToken'] as const) {
    if (input[key] === undefined) continue;
    if (typeof input[key] !== 'string' || input[key] === '') throw new ConfigError(`config ${path}: ${key} must be a path`);
    out[key] = resolve(baseDir, input[key] as string);
  }
  if (input.control !== undefined) {
    if (typeof input.control !== 'string' || input.control === '') throw new ConfigError(`config ${path}: control must be a path or tcp:HOST:PORT`);
    out.control = input.control.startsWith('tcp:') ? input.control : resolve(baseDir, input.control.replace(/^unix:/, ''));
  }
  out.provisioning = parseProvisioning(input, `config ${path}`, baseDir);
  if (input.socketMode !== undefined) out.socketMode = parseSocketMode(String(input.socketMode), `config ${path}: socketMode`);
  return out;
}

function namespaceFromJson(entry: unknown, what: string, baseDir: string): NamespaceConfig {
  if (typeof entry === 'string') return parseNamespaceSpec(entry, baseDir);
  if (typeof entry !== 'object' || entry === null) throw new ConfigError(`${what}: expected an object or a spec string`);
  const e = entry as Record<string, unknown>;
  for (const key of Object.keys(e)) {
    if (!['file', 'ram', 'size', 'lbads', 'nsid', 'aio', 'cache'].includes(key)) throw new ConfigError(`${what}: unknown key '${key}'`);
  }
  const ns: NamespaceConfig = { lbads: e.lbads === undefined ? 512 : parseBlockSize(String(e.lbads), what) };
  if (e.file !== undefined) ns.file = resolve(baseDir, String(e.file));
  if (e.size !== undefined) ns.size = typeof e.size === 'number' ? parsePositive(String(e.size), `${what} size`, Number.MAX_SAFE_INTEGER) : parseSize(String(e.size), `${what} size`);
  if (e.nsid !== undefined) ns.nsid = parsePositive(String(e.nsid), `${what} nsid`);
  if (e.aio !== undefined) ns.aio = parseAio(String(e.aio), what);
  if (e.cache !== undefined) ns.cache = parseCache(String(e.cache), what);
  return checkNamespace(ns, e.ram === true, what);
}

/**
 * Octal permission bits for the sockets, e.g. 0660 to let a group (QEMU's user) connect. The owner
 * keeps read and write (connect() needs write permission); execute bits mean nothing on a socket.
 */
export function parseSocketMode(value: string, what = '--socket-mode'): number {
  const match = /^(?:0o?)?([0-7]{3})$/.exec(value);
  const mode = match ? parseInt(match[1]!, 8) : NaN;
  if (!match || (mode & 0o600) !== 0o600 || (mode & 0o111) !== 0) {
    throw new ConfigError(`${what} '${value}' must be octal permission bits with owner read/write and no execute bits (e.g. 0600, 0660)`);
  }
  return mode;
}

export const DOORBELL_MODES = ['trapped', 'mapped'] as const;
export type DoorbellMode = (typeof DOORBELL_MODES)[number];

export function checkDoorbells(value: string, what: string): DoorbellMode {
  if (!(DOORBELL_MODES as readonly string[]).includes(value)) throw new ConfigError(`${what} '${value}' must be one of: ${DOORBELL_MODES.join(', ')}`);
  return value as DoorbellMode;
}

export function checkInterrupts(value: string): InterruptOffer {
  if (!(INTERRUPT_OFFERS as readonly string[]).includes(value)) {
    throw new ConfigError(`unknown interrupt mode '${value}' (expected one of: ${INTERRUPT_OFFERS.join(', ')})`);
  }
  return value as InterruptOffer;
}

export function checkDevice(value: string): DeviceKind {
  if (!(DEVICE_KINDS as readonly string[]).includes(value)) {
    throw new ConfigError(`unknown device '${value}' (expected one of: ${DEVICE_KINDS.join(', ')})`);
  }
  return value as DeviceKind;
}

/** Fills in what neither flags nor file said, and checks the whole. */
export function finalize(config: ServerConfig): ServerConfig {
  const virtualized = config.secondaries > 0;
  const provisioned = config.provisioning.virtualSubsystems.length > 0 || config.provisioning.controllers.length > 0;
  if (virtualized && config.sockets.length > 0) {
    throw new ConfigError('--socket makes peer controllers; with --secondaries export controllers with --primary-socket, `ctrl export` or the config file');
  }
  if (!virtualized && (config.primarySocket !== undefined || provisioned)) throw new ConfigError('a primary socket and provisioning need --secondaries N');
  const sockets = config.sockets.length > 0 || virtualized ? config.sockets : [DEFAULT_SOCKET];
  const out = { ...config, sockets };
  if (new Set(out.sockets).size !== out.sockets.length) throw new ConfigError('the same socket is given twice');
  if (out.device === 'scratch') {
    if (out.namespaces.length > 0) throw new ConfigError('the scratch device has no namespaces');
    if (virtualized) throw new ConfigError('the scratch device has no controlling function');
    return out;
  }
  out.control ??= join(dirname(out.sockets[0] ?? out.primarySocket ?? DEFAULT_SOCKET), 'control.sock');
  if (out.control.startsWith('tcp:') && out.controlToken === undefined) {
    throw new ConfigError('a control socket on TCP needs --control-token FILE (anyone who reaches the port could otherwise drive the primary)');
  }
  if (out.controlToken !== undefined) readControlToken(out.controlToken); // refused before anything starts
  if (out.namespaces.length === 0) out.namespaces = [{ size: DEFAULT_RAM_NAMESPACE_BYTES, lbads: 512 }];
  const nsids = new Set<number>();
  let next = 1;
  out.namespaces = out.namespaces.map((ns) => {
    let nsid = ns.nsid;
    if (nsid === undefined) {
      while (nsids.has(next) || out.namespaces.some((other) => other.nsid === next)) next++;
      nsid = next;
    }
    if (nsids.has(nsid)) throw new ConfigError(`NSID ${nsid} is given twice`);
    nsids.add(nsid);
    return { ...ns, nsid };
  });
  if (out.ioQueues > 64) throw new ConfigError(`ioQueues ${out.ioQueues} exceeds 64`);
  if (out.queueEntries < 2 || out.queueEntries > 65536) throw new ConfigError(`queueEntries ${out.queueEntries} must be 2..65536`);
  if (out.mdts > 12) throw new ConfigError(`mdts ${out.mdts} exceeds 12 (16 MiB)`);
  return out;
}

/** The shared secret of a control socket: the file's content, trimmed, at least 16 characters. */
export function readControlToken(path: string): string {
  let token: string;
  try {
    token = readFileSync(path, 'utf8').trim();
  } catch (error) {
    throw new ConfigError(`--control-token ${(error as Error).message}`);
  }
  if (token.length < 16) throw new ConfigError(`--control-token ${path}: the token must be at least 16 characters`);
  return token;
}
