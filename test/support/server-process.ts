// Runs the real `nvme-vfio-user serve` command in a child process, as users and QEMU see it.

import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface ServerProcess {
  child: ChildProcess;
  socketPath: string;
  /** Everything the server wrote to stderr so far. */
  log(): string;
  alive(): boolean;
  openFds(): number;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Starts `serve --socket socketPath ...extraArgs` and resolves once the socket exists. */
export async function startServerProcess(socketPath: string, extraArgs: string[] = [], timeoutMs = 15_000): Promise<ServerProcess> {
  const child = spawn(process.execPath, ['--import', 'tsx', join(repoRoot, 'src', 'cli.ts'), 'serve', '--socket', socketPath, ...extraArgs], {
    cwd: repoRoot,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  let stdout = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  let exitCode: number | null | undefined;
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve((exitCode = code))));
  const deadline = Date.now() + timeoutMs;
  while (!stdout.includes(`listening on ${socketPath}`)) {
    if (exitCode !== undefined) throw new Error(`server exited with ${exitCode}: ${stderr}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`server did not listen on ${socketPath} within ${timeoutMs} ms: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    child,
    socketPath,
    log: () => stderr,
    alive: () => exitCode === undefined && child.exitCode === null,
    openFds: () => readdirSync(`/proc/${child.pid}/fd`).length,
    async stop(signal = 'SIGTERM') {
      if (exitCode === undefined) child.kill(signal);
      return exited;
    },
  };
}
