// Runs `nvme-vfio-user serve ARGS` from this checkout's sources and waits until it prints `ready`
// on stdout (e.g. `control on PATH`): for servers that export nothing at start.

import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { repoRoot, SOURCE_COMMAND } from './server-process.js';

export interface Served {
  child: ChildProcess;
  stdout(): string;
  log(): string;
  alive(): boolean;
  openFds(): number;
  rssKiB(): number;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** `netns`: run inside that network namespace (ip netns exec), as a server on another host would. */
export async function startServe(args: string[], ready: string, timeoutMs = 15_000, netns?: string): Promise<Served> {
  const command = [...SOURCE_COMMAND, 'serve', ...args];
  const [program, ...rest] = netns ? ['ip', 'netns', 'exec', netns, ...command] : command;
  const child = spawn(program!, rest, { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`serve ${args.join(' ')} did not print '${ready}' within ${timeoutMs} ms: ${stderr}`));
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
    stdout: () => stdout,
    log: () => stderr,
    alive: () => child.exitCode === null && child.signalCode === null,
    openFds: () => readdirSync(`/proc/${child.pid}/fd`).length,
    rssKiB: () => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))?.[1] ?? NaN),
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
}
