// A host's provisioning as plain data: virtual subsystems, secondary controllers' resources and
// states, namespace attachments, and exported sockets. One shape serves the declarative
// `serve --config` file and the `--state-dir` record a restarted server comes back from; both
// are applied through the same operations the admin commands use.

import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, writeSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { VirtualSubsystemDefinition } from '../nvme/virt/vsubsys.js';
import { ConfigError, type NamespaceConfig } from './config.js';

export interface ControllerProvisioning {
  cntlid: number;
  /** VQ and VI resources (secondaries). */
  vq?: number;
  vi?: number;
  online?: boolean;
  /** Export on this vfio-user socket. */
  socket?: string;
  /** Subsystem NSIDs attached to the controller (default: all). */
  namespaces?: number[];
}

export interface VirtualSubsystemProvisioning extends VirtualSubsystemDefinition {
  controllers: { cntlid: number; vcid: number }[];
}

export interface Provisioning {
  virtualSubsystems: VirtualSubsystemProvisioning[];
  controllers: ControllerProvisioning[];
}

/** What --state-dir keeps: the namespaces too, so a restart needs no flags to find them. */
export interface SavedState extends Provisioning {
  version: 1;
  namespaces: NamespaceConfig[];
}

export const emptyProvisioning = (): Provisioning => ({ virtualSubsystems: [], controllers: [] });

const STATE_FILE = 'provisioning.json';

/** Checks the provisioning part of a config file; paths are relative to `baseDir`. */
export function parseProvisioning(input: Record<string, unknown>, what: string, baseDir: string): Provisioning {
  const out = emptyProvisioning();
  const array = (key: string): unknown[] => {
    const value = input[key];
    if (value === undefined) return [];
    if (!Array.isArray(value)) throw new ConfigError(`${what}: ${key} must be an array`);
    return value;
  };
  const object = (value: unknown, where: string): Record<string, unknown> => {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new ConfigError(`${where}: expected an object`);
    return value as Record<string, unknown>;
  };
  const integer = (value: unknown, where: string, min = 0, max = 0xffff): number => {
    if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) throw new ConfigError(`${where} must be a whole number from ${min} to ${max}`);
    return value;
  };
  const known = (o: Record<string, unknown>, keys: string[], where: string): void => {
    for (const key of Object.keys(o)) if (!keys.includes(key)) throw new ConfigError(`${where}: unknown key '${key}' (known: ${keys.join(', ')})`);
  };
  array('virtualSubsystems').forEach((entry, i) => {
    const where = `${what} virtualSubsystems[${i}]`;
    const o = object(entry, where);
    known(o, ['nqn', 'serial', 'model', 'firmware', 'ieeeOui', 'namespaces', 'controllers', 'multiController'], where);
    if (typeof o.nqn !== 'string') throw new ConfigError(`${where}: nqn must be a string`);
    const strings: Partial<Record<'serial' | 'model' | 'firmware', string>> = {};
    for (const key of ['serial', 'model', 'firmware'] as const) {
      if (o[key] === undefined) continue;
      if (typeof o[key] !== 'string') throw new ConfigError(`${where}: ${key} must be a string`);
      strings[key] = o[key] as string;
    }
    const namespaces = (Array.isArray(o.namespaces) ? o.namespaces : o.namespaces === undefined ? [] : null)?.map((m, j) => {
      const mo = object(m, `${where} namespaces[${j}]`);
      return { vnsid: integer(mo.vnsid, `${where} namespaces[${j}].vnsid`, 1, 0xffff_fffe), nsid: integer(mo.nsid, `${where} namespaces[${j}].nsid`, 1, 0xffff_fffe) };
    });
    if (!namespaces) throw new ConfigError(`${where}: namespaces must be an array`);
    const controllers = (Array.isArray(o.controllers) ? o.controllers : o.controllers === undefined ? [] : null)?.map((c, j) => {
      const co = object(c, `${where} controllers[${j}]`);
      return { cntlid: integer(co.cntlid, `${where} controllers[${j}].cntlid`, 1), vcid: integer(co.vcid, `${where} controllers[${j}].vcid`, 1, 0xffef) };
    });
    if (!controllers) throw new ConfigError(`${where}: controllers must be an array`);
    out.virtualSubsystems.push({
      nqn: o.nqn,
      ...strings,
      ...(o.ieeeOui !== undefined ? { ieeeOui: integer(o.ieeeOui, `${where} ieeeOui`, 0, 0xff_ffff) } : {}),
      ...(o.multiController !== undefined ? { multiController: o.multiController === true } : {}),
      namespaces,
      controllers,
    });
  });
  array('controllers').forEach((entry, i) => {
    const where = `${what} controllers[${i}]`;
    const o = object(entry, where);
    known(o, ['cntlid', 'vq', 'vi', 'online', 'socket', 'namespaces'], where);
    const c: ControllerProvisioning = { cntlid: integer(o.cntlid, `${where} cntlid`) };
    if (o.vq !== undefined) c.vq = integer(o.vq, `${where} vq`);
    if (o.vi !== undefined) c.vi = integer(o.vi, `${where} vi`);
    if (o.online !== undefined) {
      if (typeof o.online !== 'boolean') throw new ConfigError(`${where} online must be true or false`);
      c.online = o.online;
    }
    if (o.socket !== undefined) {
      if (typeof o.socket !== 'string' || o.socket === '') throw new ConfigError(`${where} socket must be a path`);
      c.socket = resolve(baseDir, o.socket);
    }
    if (o.namespaces !== undefined) {
      if (!Array.isArray(o.namespaces)) throw new ConfigError(`${where} namespaces must be an array of NSIDs`);
      c.namespaces = o.namespaces.map((n, j) => integer(n, `${where} namespaces[${j}]`, 1, 0xffff_fffe));
    }
    out.controllers.push(c);
  });
  return out;
}

/** Where --state-dir keeps the provisioning, written atomically (write, fsync, rename, fsync dir). */
export class StateStore {
  constructor(readonly dir: string) {}

  get file(): string {
    return join(this.dir, STATE_FILE);
  }

  load(): SavedState | null {
    let text: string;
    try {
      text = readFileSync(this.file, 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw new ConfigError(`state ${this.file}: ${(error as Error).message}`);
    }
    let raw: unknown;
    try {
      raw = JSON.parse(text);
    } catch (error) {
      throw new ConfigError(`state ${this.file}: ${(error as Error).message}`);
    }
    const o = raw as Partial<SavedState>;
    if (typeof raw !== 'object' || raw === null || o.version !== 1 || !Array.isArray(o.namespaces)) {
      throw new ConfigError(`state ${this.file}: not a version 1 provisioning record`);
    }
    const { namespaces, version: _version, ...rest } = o;
    return { version: 1, namespaces: namespaces as NamespaceConfig[], ...parseProvisioning(rest as Record<string, unknown>, `state ${this.file}`, this.dir) };
  }

  save(state: SavedState): void {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const temporary = `${this.file}.tmp`;
    const fd = openSync(temporary, 'w', 0o600);
    try {
      writeSync(fd, `${JSON.stringify(state, null, 2)}\n`);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(temporary, this.file);
    const dirFd = openSync(this.dir, 'r');
    try {
      fsyncSync(dirFd);
    } finally {
      closeSync(dirFd);
    }
  }
}
