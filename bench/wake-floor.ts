// What one sleep and wake-up costs a process on this host, whatever it then does: the floor under
// every per-I/O CPU figure where our server sleeps between I/Os (each QD1 I/O, each unbatched
// doorbell message, each batch period). Measured for C (blocking calls, bench/wake-floor-echo.cc,
// compiled with g++) and for Node with our addon's socket and µs timer, the server's own parts:
//   - echo: a client process sends a 36-byte message (a posted 4-byte REGION_WRITE's size) and
//     waits for the answer; the echo's CPU per round trip is one wake-up by another process plus
//     a read and a write. Run with the two processes on different CPUs (as a guest's QEMU and our
//     server mostly are) and on one CPU (taskset), which tells the wake-up from the syscalls.
//   - timer: the process sleeps on a one-shot timer (C: a timerfd; Node: src/nvme/us-timer.ts,
//     the timer --batch-ms collects on), --timer-us apart.
// CPU is the sleeping process's user+sys time (getrusage, process.cpuUsage) over the run.
//
// Usage: npx tsx bench/wake-floor.ts [--round-trips 20000] [--timer-us 50] [--reps 3]
//          [--out bench/results/wake-floor]
// See bench/README.md.

import { spawn, spawnSync, type ChildProcessByStdio } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import type { Readable } from 'node:stream';
import { parseArgs } from 'node:util';
import { loadedNative } from '../src/native.js';
import { setTimeoutUs } from '../src/nvme/us-timer.js';
import { parseUsage, positiveWhole, runBench, UsageError } from './cli.js';
import { cpuModel, loadavg } from './host-stats.js';
import { markdownTable, median } from './report.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const MESSAGE_BYTES = 36;

type Language = 'C' | 'Node';
type Placement = 'two CPUs' | 'one CPU';

interface Sample {
  kind: 'echo' | 'timer';
  language: Language;
  placement: Placement | null;
  rep: number;
  cpuUsPerWake: number;
  /** Echo: wall time per round trip as the client saw it; timer: per period slept. */
  wallUs: number;
}

/** What a child prints last: its CPU over the run, how many wake-ups, and (timer) the wall time. */
function parseChildResult(text: string): { cpuUs: number; count: number; wallUs?: number } {
  const m = /cpu_us ([\d.]+) count (\d+)(?: wall_us ([\d.]+))?/.exec(text);
  if (!m) throw new Error(`unexpected child output: ${text.trim() || '(nothing)'}`);
  return { cpuUs: Number(m[1]), count: Number(m[2]), wallUs: m[3] === undefined ? undefined : Number(m[3]) };
}

// ------------------------------------------------------------------ children

/** The Node echo: our addon's listener and connection, one answer per whole message. */
function nodeEcho(socketPath: string): void {
  const addon = loadedNative();
  const answer = new Uint8Array(MESSAGE_BYTES);
  let start = process.cpuUsage();
  let count = 0;
  let pending = 0;
  const listener = new addon.Listener(socketPath, (conn) => {
    start = process.cpuUsage();
    conn.start(
      (data) => {
        pending += data.length;
        while (pending >= MESSAGE_BYTES) {
          pending -= MESSAGE_BYTES;
          count++;
          conn.send(answer);
        }
      },
      () => {
        const used = process.cpuUsage(start);
        process.stdout.write(`cpu_us ${used.user + used.system} count ${count}\n`);
        listener.close();
      },
    );
  });
  process.stdout.write('listening\n');
}

/** The Node timer: `count` one-shot µs timers in a chain, each set when the last fired. */
function nodeTimer(us: number, count: number): void {
  const cpu0 = process.cpuUsage();
  const wall0 = performance.now();
  let left = count;
  const fire = (): void => {
    if (--left > 0) {
      setTimeoutUs(fire, us);
      return;
    }
    const used = process.cpuUsage(cpu0);
    process.stdout.write(`cpu_us ${used.user + used.system} count ${count} wall_us ${(performance.now() - wall0) * 1000}\n`);
  };
  setTimeoutUs(fire, us);
  // The µs timer does not hold the process open by itself.
  const keepAlive = setInterval(() => {
    if (left === 0) clearInterval(keepAlive);
  }, 50);
}

/** The client of both echoes: `count` round trips, one message outstanding; prints the wall time of each. */
function echoClient(socketPath: string, count: number): void {
  const conn = loadedNative().connect(socketPath);
  const message = new Uint8Array(MESSAGE_BYTES);
  let left = count;
  let pending = 0;
  const t0 = performance.now();
  conn.start(
    (data) => {
      pending += data.length;
      while (pending >= MESSAGE_BYTES) {
        pending -= MESSAGE_BYTES;
        if (--left === 0) {
          process.stdout.write(`round_trip_us ${((performance.now() - t0) * 1000) / count}\n`);
          conn.close();
          return;
        }
        conn.send(message);
      }
    },
    () => undefined,
  );
  conn.send(message);
}

// ------------------------------------------------------------------ parent

/** bench/wake-floor-echo.cc compiled (once per source version) into the temporary directory. */
function compiledHelper(): string {
  const source = path.join(here, 'wake-floor-echo.cc');
  const stamp = Math.floor(fs.statSync(source).mtimeMs);
  const binary = path.join(os.tmpdir(), `nvme-vfio-user-wake-floor-${stamp}`);
  if (fs.existsSync(binary)) return binary;
  // Built beside it and renamed into place: an interrupted g++ leaves no half binary to reuse.
  const building = `${binary}.${process.pid}`;
  const r = spawnSync('g++', ['-O2', '-o', building, source], { encoding: 'utf8' });
  if (r.status !== 0) {
    fs.rmSync(building, { force: true });
    throw new Error(`g++ ${source} failed: ${r.error?.message ?? r.stderr.trim()}`);
  }
  fs.renameSync(building, binary);
  return binary;
}

/** A child of this script (Node) or the helper (C), pinned to `cpu` when one is given. */
function command(language: Language, args: string[], cpu: number | null): { file: string; args: string[] } {
  const base =
    language === 'C'
      ? { file: compiledHelper(), args }
      : { file: process.execPath, args: [...process.execArgv, fileURLToPath(import.meta.url), '--child', ...args] };
  return cpu === null ? base : { file: 'taskset', args: ['-c', String(cpu), base.file, ...base.args] };
}

/** Runs a child to its end; its stdout. */
function runToEnd(file: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`${file} ${args.join(' ')} exited with ${code}`))));
  });
}

async function echoOnce(language: Language, placement: Placement, roundTrips: number, rep: number): Promise<Sample> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wake-floor-'));
  const socketPath = path.join(dir, 'echo.sock');
  let server: ChildProcessByStdio<null, Readable, null> | undefined;
  try {
    const serverCmd = command(language, ['echo', socketPath, String(MESSAGE_BYTES)], placement === 'two CPUs' ? 1 : 0);
    const echo = spawn(serverCmd.file, serverCmd.args, { stdio: ['ignore', 'pipe', 'inherit'] });
    server = echo;
    let serverOut = '';
    const listening = new Promise<void>((resolve, reject) => {
      echo.stdout.on('data', (d: Buffer) => {
        serverOut += d.toString();
        if (serverOut.includes('listening')) resolve();
      });
      echo.on('error', reject);
      echo.on('close', (code) => reject(new Error(`the ${language} echo exited with ${code} before it listened`)));
    });
    const ended = new Promise<void>((resolve) => echo.on('close', () => resolve()));
    await listening;
    const clientCmd = command('Node', ['client', socketPath, String(roundTrips)], 0);
    const clientOut = await runToEnd(clientCmd.file, clientCmd.args);
    await ended;
    const result = parseChildResult(serverOut);
    if (result.count !== roundTrips) throw new Error(`the ${language} echo answered ${result.count} of ${roundTrips} messages`);
    const rtt = /round_trip_us ([\d.]+)/.exec(clientOut);
    if (!rtt) throw new Error(`unexpected client output: ${clientOut.trim()}`);
    return { kind: 'echo', language, placement, rep, cpuUsPerWake: result.cpuUs / result.count, wallUs: Number(rtt[1]) };
  } finally {
    // A client that failed leaves the echo waiting in accept() or read(): it must not outlive us.
    if (server && server.exitCode === null && server.signalCode === null) server.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function timerOnce(language: Language, us: number, count: number, rep: number): Promise<Sample> {
  const cmd = command(language, ['timer', String(us), String(count)], null);
  const result = parseChildResult(await runToEnd(cmd.file, cmd.args));
  if (result.wallUs === undefined) throw new Error('the timer child gave no wall time');
  return { kind: 'timer', language, placement: null, rep, cpuUsPerWake: result.cpuUs / result.count, wallUs: result.wallUs / result.count };
}

function summaryRows(samples: Sample[], timerUs: number): string[][] {
  const groups = new Map<string, Sample[]>();
  for (const s of samples) {
    const key = `${s.kind}|${s.language}|${s.placement ?? ''}`;
    groups.set(key, [...(groups.get(key) ?? []), s]);
  }
  return [...groups.values()].map((g) => {
    const { kind, language, placement } = g[0];
    const cpu = g.map((s) => s.cpuUsPerWake);
    const wall = g.map((s) => s.wallUs);
    const what = kind === 'echo' ? `woken by a message (echo), ${placement}` : `woken by its own ${timerUs} µs timer`;
    const range = (xs: number[]): string => `${Math.min(...xs).toFixed(1)}–${Math.max(...xs).toFixed(1)}`;
    return [what, language, median(cpu).toFixed(1), range(cpu), `${median(wall).toFixed(1)} (${kind === 'echo' ? 'round trip' : 'period'})`];
  });
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  if (argv[0] === '--child') return child(argv.slice(1));
  const { values } = parseUsage(() =>
    parseArgs({
      args: argv,
      options: {
        'round-trips': { type: 'string', default: '20000' },
        'timer-us': { type: 'string', default: '50' },
        reps: { type: 'string', default: '3' },
        out: { type: 'string', default: path.join(here, 'results', 'wake-floor') },
      },
    }),
  );
  const roundTrips = positiveWhole('round-trips', values['round-trips']);
  const timerUs = positiveWhole('timer-us', values['timer-us']);
  const reps = positiveWhole('reps', values.reps);
  if (os.cpus().length < 2) throw new UsageError('this benchmark compares one CPU with two: the machine has one');
  const loadBefore = loadavg();
  const startedAt = new Date();
  const samples: Sample[] = [];
  // Interleaved, so that a busy moment of the shared host falls on every kind alike.
  for (let rep = 0; rep < reps; rep++) {
    for (const placement of ['two CPUs', 'one CPU'] as const) {
      for (const language of ['C', 'Node'] as const) {
        const s = await echoOnce(language, placement, roundTrips, rep);
        console.error(`[wake-floor] rep ${rep + 1}: echo ${language}, ${placement}: ${s.cpuUsPerWake.toFixed(1)} CPU-µs per wake-up, ${s.wallUs.toFixed(1)} µs round trip`);
        samples.push(s);
      }
    }
    for (const language of ['C', 'Node'] as const) {
      const s = await timerOnce(language, timerUs, roundTrips, rep);
      console.error(`[wake-floor] rep ${rep + 1}: ${timerUs} µs timer ${language}: ${s.cpuUsPerWake.toFixed(1)} CPU-µs per wake-up, ${s.wallUs.toFixed(1)} µs per period`);
      samples.push(s);
    }
  }
  const table = markdownTable(['wake-up', 'process', 'CPU µs per wake-up (median)', 'min–max', 'wall µs (median)'], summaryRows(samples, timerUs));
  const md = [
    '# What a sleep and wake-up costs on this host',
    '',
    `- when: ${startedAt.toISOString()} – ${new Date().toISOString()}`,
    `- host: ${os.cpus().length} CPUs (${cpuModel()}), kernel ${os.release()}, node ${process.version}`,
    `- load average before / after: ${loadBefore} / ${loadavg()}`,
    `- ${reps} interleaved repetitions; ${roundTrips} round trips or timer periods each`,
    '',
    'CPU is the sleeping process\'s user+sys time per wake-up: the least any server pays for an I/O it sleeps before. See bench/README.md (`wake-floor.ts`).',
    '',
    table,
    '',
  ].join('\n');
  fs.mkdirSync(path.dirname(values.out), { recursive: true });
  fs.writeFileSync(`${values.out}.md`, md);
  fs.writeFileSync(`${values.out}.json`, JSON.stringify({ meta: { startedAt, host: os.release(), cpus: os.cpus().length, loadBefore, loadAfter: loadavg() }, options: { roundTrips, timerUs, reps, messageBytes: MESSAGE_BYTES }, samples }, null, 2));
  process.stdout.write(md);
  console.error(`[wake-floor] wrote ${values.out}.md and .json`);
}

async function child(args: string[]): Promise<void> {
  const [mode, a, b] = args;
  if (mode === 'echo' && a) return nodeEcho(a);
  if (mode === 'timer' && a && b) return nodeTimer(Number(a), Number(b));
  if (mode === 'client' && a && b) return echoClient(a, Number(b));
  throw new UsageError(`--child ${args.join(' ')}: not a child mode of this script`);
}

runBench('wake-floor', import.meta.url, main);
