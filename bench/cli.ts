// The benchmarks' command lines behave as the project's own CLI does: --help prints the script's
// leading comment, a bad argument is one line on stderr and exit code 2, and any other failure
// prints its stack and exits 1.

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

/** A bad argument: one line and exit code 2. */
export class UsageError extends Error {}

/** The value of `--name` as a positive whole number, or a UsageError. */
export function positiveWhole(name: string, text: string): number {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n <= 0) throw new UsageError(`--${name}: '${text}' is not a positive whole number`);
  return n;
}

/** Runs `parse`, turning what it throws (node:util parseArgs' own errors too) into a UsageError. */
export function parseUsage<T>(parse: () => T): T {
  try {
    return parse();
  } catch (err) {
    throw err instanceof UsageError ? err : new UsageError((err as Error).message);
  }
}

/** Whether the arguments ask for help (checked before parsing, so a bad argument beside it does not hide it). */
export function wantsHelp(args: readonly string[] = process.argv.slice(2)): boolean {
  return args.includes('--help') || args.includes('-h');
}

/** The leading `//` comment of the script at `scriptUrl` (its usage), without the slashes. */
export function scriptHelp(scriptUrl: string): string {
  const lines = readFileSync(fileURLToPath(scriptUrl), 'utf8').split('\n');
  const end = lines.findIndex((l) => !l.startsWith('//'));
  return lines.slice(0, end < 0 ? lines.length : end).map((l) => l.replace(/^\/\/ ?/, '')).join('\n') + '\n';
}

function exitWithHelp(scriptUrl: string): never {
  process.stdout.write(scriptHelp(scriptUrl));
  process.exit(0);
}

function exitWithUsage(name: string, err: UsageError): never {
  process.stderr.write(`${name}: ${err.message}\n`);
  process.exit(2);
}

/** For a script that reads its arguments as it loads: --help or a bad argument end the process here. */
export function parseOrExit<T>(name: string, scriptUrl: string, parse: () => T): T {
  if (wantsHelp()) exitWithHelp(scriptUrl);
  try {
    return parseUsage(parse);
  } catch (err) {
    exitWithUsage(name, err as UsageError);
  }
}

/**
 * Runs a benchmark's `main`: --help prints its usage (exit 0), a UsageError one line (exit 2),
 * anything else its stack (exit 1).
 */
export function runBench(name: string, scriptUrl: string, main: () => Promise<void>): void {
  if (wantsHelp()) exitWithHelp(scriptUrl);
  main().catch((err: unknown) => {
    if (err instanceof UsageError) exitWithUsage(name, err);
    process.stderr.write(`[${name}] ${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  });
}
