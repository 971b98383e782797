// Runs the management verbs of the real `nvme-vfio-user` command against a server's control socket.

import { spawn, type ChildProcess } from 'node:child_process';
import { defaultServerCommand, repoRoot } from './server-process.js';

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** `nvme-vfio-user ARGS...` from this checkout (defaultServerCommand()); resolves when it exits. */
export function runCli(
  args: string[],
  options: { stdin?: Uint8Array; timeoutMs?: number; onStderrLine?: (line: string, child: ChildProcess) => void } = {},
): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const [program, ...leading] = defaultServerCommand();
    const child = spawn(program!, [...leading, ...args], { cwd: repoRoot, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    let partial = '';
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
      partial += d.toString();
      let i: number;
      while ((i = partial.indexOf('\n')) >= 0) {
        options.onStderrLine?.(partial.slice(0, i), child);
        partial = partial.slice(i + 1);
      }
    });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`nvme-vfio-user ${args.join(' ')} did not finish: ${stderr}`));
    }, options.timeoutMs ?? 20_000);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
    child.stdin.end(options.stdin ?? new Uint8Array(0));
  });
}

/** Like runCli, but a non-zero exit is an error carrying what the command printed. */
export async function cli(args: string[]): Promise<string> {
  const result = await runCli(args);
  if (result.code !== 0) throw new Error(`nvme-vfio-user ${args.join(' ')} exited ${result.code}: ${result.stderr}${result.stdout}`);
  return result.stdout;
}
