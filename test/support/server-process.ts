// Runs the real `nvme-vfio-user serve` command in a child process, as users and QEMU see it.

import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The command from this checkout's sources, the way the installed bin runs it. */
export const SOURCE_COMMAND: readonly string[] = [process.execPath, '--import', 'tsx', join(repoRoot, 'src', 'bin', 'nvme-vfio-user.ts')];

/** What spawnServe and runCli start unless told otherwise: the sources, or (benchmarks) the build. */
let defaultCommand: readonly string[] = SOURCE_COMMAND;

/** Makes every later `serve` and CLI run of this process use `command` (bench/server-build.ts). */
export function setDefaultCommand(command: readonly string[]): void {
  defaultCommand = command;
}

export const defaultServerCommand = (): readonly string[] => defaultCommand;

/** A running `serve`. */
export interface Served {
  child: ChildProcess;
  /** Everything the server wrote to stdout / stderr so far. */
  log(): string;
  alive(): boolean;
  openFds(): number;
  /** Resident set size in KiB (VmRSS of /proc/PID/status). */
  rssKiB(): number;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export interface ServerProcess extends Served {
  socketPath: string;
}

export interface ServerProcessOptions {
  timeoutMs?: number;
  /** The command and its leading arguments (default: defaultServerCommand()). */
  command?: readonly string[];
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Run inside this network namespace (ip netns exec), as a server on another host would. */
  netns?: string;
}

/** Runs `serve ARGS` and resolves once its stdout contains `ready`; rejects if it exits first. */
export async function spawnServe(args: readonly string[], ready: string, options: ServerProcessOptions = {}): Promise<Served> {
  const timeoutMs = options.timeoutMs ?? 15_000;
  const command = [...(options.command ?? defaultCommand), 'serve', ...args];
  const [program, ...rest] = options.netns ? ['ip', 'netns', 'exec', options.netns, ...command] : command;
  const child = spawn(program!, rest, { cwd: options.cwd ?? repoRoot, env: options.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  let stdout = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  let exitCode: number | null | undefined;
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve((exitCode = code))));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`serve ${args.join(' ')} did not print '${ready.trim()}' within ${timeoutMs} ms: ${stderr}`));
    }, timeoutMs);
    child.stdout!.on('data', (d: Buffer) => {
      stdout += d.toString();
      if (stdout.includes(ready)) {
        clearTimeout(timer);
        resolve();
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`serve exited with ${code}: ${stderr}`));
    });
  });
  return {
    child,
    log: () => stderr,
    alive: () => exitCode === undefined && child.exitCode === null && child.signalCode === null,
    openFds: () => readdirSync(`/proc/${child.pid}/fd`).length,
    rssKiB: () => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))?.[1] ?? NaN),
    async stop(signal = 'SIGTERM') {
      if (exitCode === undefined) child.kill(signal);
      return exited;
    },
  };
}

/** Starts `serve --socket socketPath ...extraArgs` and resolves once it prints that it listens. */
export async function startServerProcess(socketPath: string, extraArgs: string[] = [], options: ServerProcessOptions = {}): Promise<ServerProcess> {
  const served = await spawnServe(['--socket', socketPath, ...extraArgs], `listening on ${socketPath}\n`, options);
  return { ...served, socketPath };
}

/** A free TCP port on loopback (for a migration stream or a TCP control socket). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}
