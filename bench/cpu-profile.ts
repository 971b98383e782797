// Reads a V8 .cpuprofile (what `node --cpu-prof` writes) into what a reader of the benchmark
// needs: the functions with the most self time, their inclusive time, and the sampled stacks in
// the folded format that flame graph tools (flamegraph.pl, speedscope, inferno) take.

import * as fs from 'node:fs';
import { SourceMap } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { markdownTable } from './report.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}

export interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  /** µs since the previous sample, one per sample. */
  timeDeltas: number[];
}

export interface ProfileSummary {
  label: string;
  markdown: string;
  folded: string;
  rawPath: string;
}

/** Nodes V8 adds that are no JavaScript function: where the thread was instead. */
const PSEUDO = new Set(['(root)', '(program)', '(idle)', '(garbage collector)']);

const sourceMaps = new Map<string, SourceMap | null>();

/** The TypeScript file and line behind a position in compiled JavaScript (its .js.map), if known. */
function original(file: string, line: number, column: number): { file: string; line: number } {
  let map = sourceMaps.get(file);
  if (map === undefined) {
    try {
      map = new SourceMap(JSON.parse(fs.readFileSync(`${file}.map`, 'utf8')));
    } catch {
      map = null;
    }
    sourceMaps.set(file, map);
  }
  const entry = map?.findEntry(line, column);
  if (!entry || !('originalSource' in entry) || !entry.originalSource) return { file, line: line + 1 };
  const source = entry.originalSource.startsWith('file://') ? fileURLToPath(entry.originalSource) : path.resolve(path.dirname(file), entry.originalSource);
  return { file: source, line: entry.originalLine + 1 };
}

/** Where a path lives, said briefly: relative to the checkout it belongs to, or from node_modules. */
function shortPath(file: string): string {
  if (file.includes('node_modules')) return file.slice(file.lastIndexOf('node_modules'));
  const src = file.lastIndexOf(`${path.sep}src${path.sep}`);
  return src >= 0 ? file.slice(src + 1) : path.relative(REPO, file);
}

function frameName(frame: CallFrame): string {
  const name = frame.functionName || '(anonymous)';
  if (PSEUDO.has(name) || !frame.url) return name;
  if (!frame.url.startsWith('file://')) return `${name} (${frame.url}:${frame.lineNumber + 1})`;
  const where = original(fileURLToPath(frame.url), frame.lineNumber, frame.columnNumber);
  return `${name} (${shortPath(where.file)}:${where.line})`;
}

/** A span of CLOCK_MONOTONIC in µs: V8 stamps its samples with that clock, in every process alike. */
export interface MonotonicWindow {
  fromUs: number;
  toUs: number;
}

/** CLOCK_MONOTONIC now, in µs (the clock of a profile's timestamps). */
export const monotonicUs = (): number => Number(process.hrtime.bigint() / 1000n);

/** Summarises the samples taken inside `window` (the measured run, not start-up or preconditioning). */
export function summariseProfile(profile: CpuProfile, label: string, rawPath: string, window: MonotonicWindow | null = null, top = 30): ProfileSummary {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  // Self time per node: the delta that follows a sample is the time spent where it was taken.
  const selfUs = new Map<number, number>();
  const hits = new Map<number, number>();
  let at = profile.startTime;
  let sampledUs = 0;
  profile.samples.forEach((id, i) => {
    at += profile.timeDeltas[i] ?? 0;
    if (window && (at < window.fromUs || at > window.toUs)) return;
    const dt = profile.timeDeltas[i + 1] ?? 0;
    sampledUs += dt;
    selfUs.set(id, (selfUs.get(id) ?? 0) + dt);
    hits.set(id, (hits.get(id) ?? 0) + 1);
  });
  const stackOf = (id: number): string[] => {
    const names: string[] = [];
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const name = frameName(byId.get(at)!.callFrame);
      if (name !== '(root)') names.push(name);
    }
    return names.reverse();
  };
  const self = new Map<string, number>();
  const total = new Map<string, number>();
  const folded = new Map<string, number>();
  let allUs = 0;
  let idleUs = 0;
  for (const [id, us] of selfUs) {
    const stack = stackOf(id);
    const leaf = stack[stack.length - 1] ?? '(root)';
    allUs += us;
    if (leaf === '(idle)') idleUs += us;
    self.set(leaf, (self.get(leaf) ?? 0) + us);
    // A recursive function counts once per sample in its inclusive time.
    for (const name of new Set(stack)) total.set(name, (total.get(name) ?? 0) + us);
    const key = stack.join(';');
    folded.set(key, (folded.get(key) ?? 0) + (hits.get(id) ?? 0));
  }
  const busyUs = allUs - idleUs;
  const pct = (us: number, of: number): string => (of > 0 ? ((100 * us) / of).toFixed(1) : 'n/a');
  const rows = [...self.entries()]
    .filter(([name]) => name !== '(idle)')
    .sort((a, b) => b[1] - a[1])
    .slice(0, top)
    .map(([name, us], i) => [String(i + 1), (us / 1000).toFixed(1), pct(us, busyUs), pct(total.get(name) ?? 0, busyUs), name.replace(/\|/g, '\\|')]);
  const markdown = [
    '# Server CPU profile (device-only benchmark)',
    '',
    `${label}.`,
    '',
    `${(sampledUs / 1e6).toFixed(1)} s of the server's main thread sampled (V8 \`--cpu-prof\`)${window ? ', the measured window only (not start-up or preconditioning)' : ''}: busy ${(busyUs / 1e6).toFixed(2)} s, idle ${(idleUs / 1e6).toFixed(2)} s. ` +
      'Percentages are of busy time. Self is time in the function itself; total includes what it called. ' +
      'The sampler measures wall time: a thread the kernel preempts inside a system call (an eventfd write that wakes the driver on a busy 2-CPU machine) is charged to the function that made the call, so native calls can look costlier here than their share of the CPU time /proc reports. ' +
      'The whole sampled stacks are in `device-profile.folded` (one stack per line with its sample count: the input of flamegraph.pl or speedscope); ' +
      'the raw profile is written beside it as `device-profile.cpuprofile` (Chrome DevTools, speedscope) and kept out of git.',
    '',
    `## Top ${top} functions by self time`,
    '',
    markdownTable(['#', 'self ms', 'self %', 'total %', 'function (file:line)'], rows),
    '',
  ].join('\n');
  const foldedText = [...folded.entries()].sort((a, b) => b[1] - a[1]).map(([stack, n]) => `${stack} ${n}`).join('\n') + '\n';
  return { label, markdown, folded: foldedText, rawPath };
}
