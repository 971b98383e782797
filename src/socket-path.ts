// Where and how a server puts its unix sockets: the one policy every listening socket of the
// process follows (vfio-user sockets and the control socket). Whoever can connect to one of
// them can read and write a guest's memory or reconfigure the server, so:
// - the socket is created with `mode` (0600 unless asked otherwise) and never exists with a wider
//   one, not even between bind() and a chmod();
// - its directory must not be world-writable, or any local user could replace the socket with
//   their own between our bind() and the client's connect();
// - an existing path is replaced only when it is a socket no server answers on (a crashed server's
//   leftover); a live socket, or anything that is not a socket, is left alone.

import { lstatSync, mkdirSync, statSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';
import { native } from './native.js';

export const DEFAULT_SOCKET_MODE = 0o600;

/** The path cannot host a socket under the policy; the message is one sentence for the user. */
export class SocketPathError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SocketPathError';
  }
}

/** Some other server answers on the path. */
export class SocketInUseError extends Error {
  constructor(path: string) {
    super(`${path} is in use by another server`);
    this.name = 'SocketInUseError';
  }
}

/**
 * Checks `path` against the policy, clears a stale socket there, and runs `bind(path)` (which must
 * create the socket synchronously) so that the socket file is born with exactly `mode`.
 */
export function bindUnixSocket<T>(path: string, mode: number, bind: (path: string) => T): T {
  if (checkSocketPath(path) === 'stale') unlinkSync(path);
  // bind() creates the file with 0777 & ~umask. The umask is process-wide, but nothing else runs
  // while this synchronous call does, and every server of the process binds through here.
  const previous = process.umask(0o777 & ~mode);
  try {
    return bind(path);
  } finally {
    process.umask(previous);
  }
}

/** Creates a missing socket directory 0755: mkdir's own default follows the umask, 0777 at worst. */
export function createSocketDirectory(dir: string): void {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o755 });
  } catch (error) {
    throw new SocketPathError(`cannot create socket directory ${dir}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
}

/**
 * Throws SocketPathError (or SocketInUseError) unless a server may bind `path` now: its directory
 * exists and is not world-writable, and the path is free or a stale socket. Binding checks again.
 */
export function checkSocketPath(path: string): 'free' | 'stale' {
  checkSocketDirectory(dirname(path));
  let stat;
  try {
    stat = lstatSync(path);
  } catch {
    return 'free';
  }
  if (!stat.isSocket()) throw new SocketPathError(`${path} exists and is not a socket; refusing to replace it`);
  // A socket file left by a crashed server blocks bind(); a live one must not be stolen.
  try {
    native.connect(path).close();
  } catch {
    return 'stale';
  }
  throw new SocketInUseError(path);
}

function checkSocketDirectory(dir: string): void {
  let stat;
  try {
    stat = statSync(dir);
  } catch (error) {
    throw new SocketPathError(`socket directory ${dir}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
  if (!stat.isDirectory()) throw new SocketPathError(`socket directory ${dir} is not a directory`);
  if (stat.mode & 0o002) {
    throw new SocketPathError(`socket directory ${dir} is world-writable (any user could replace the socket); use a private directory, e.g. ${dir}/nvme-vfio-user`);
  }
}
