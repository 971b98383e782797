// What the guest benchmarks read from the host: CPU time of a process, the QEMU processes on the
// machine (ours and other people's), the load, and what the header of a report says about the host.

import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { qemuBinary } from '../test/e2e/guest.js';

const CLK_TCK = ((): number => {
  const r = spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' });
  const n = Number(r.stdout?.trim());
  return Number.isFinite(n) && n > 0 ? n : 100;
})();

/** user+sys CPU seconds of a process (all its threads), or undefined once it is gone. */
export function cpuSeconds(pid: number): number | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // comm (field 2) may contain spaces: count fields after its closing parenthesis.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(rest[11]) + Number(rest[12])) / CLK_TCK; // fields 14 (utime) and 15 (stime)
  } catch {
    return undefined;
  }
}

/**
 * How many times the main thread of a process slept (voluntary context switches: each one a
 * wake-up later), or undefined once it is gone. For a Node server that is its event loop.
 */
export function mainThreadSleeps(pid: number): number | undefined {
  try {
    const m = /^voluntary_ctxt_switches:\s+(\d+)$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

function ppidOf(pid: number | string): number | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
  } catch {
    return undefined;
  }
}

function isQemu(pid: number | string): boolean {
  try {
    const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    // The harness's wrapper execs the dynamic loader with QEMU as its argument; a system QEMU runs directly.
    const exe = path.basename(argv[0] ?? '');
    return exe.startsWith('qemu-system') || (exe.startsWith('ld-linux') && argv.some((a) => a.includes('qemu-system')));
  } catch {
    return false;
  }
}

/**
 * runGuest() does not expose QEMU's pid: it is the one child of this process that is a QEMU
 * (the QEMU wrapper script execs the dynamic loader, so the pid stays the same).
 */
export function findQemuPid(): number | undefined {
  for (const entry of fs.readdirSync('/proc')) {
    if (/^\d+$/.test(entry) && ppidOf(entry) === process.pid && isQemu(entry)) return Number(entry);
  }
  return undefined;
}

/** QEMU processes on the machine that this benchmark did not start: their load skews the numbers. */
export function foreignQemuCount(): number {
  let n = 0;
  for (const entry of fs.readdirSync('/proc')) {
    if (/^\d+$/.test(entry) && isQemu(entry) && ppidOf(entry) !== process.pid) n++;
  }
  return n;
}

/** Samples foreignQemuCount() every 2 s and keeps the largest value seen until stop(). */
export function watchForeignQemu(): { stop(): number } {
  let max = foreignQemuCount();
  const timer = setInterval(() => (max = Math.max(max, foreignQemuCount())), 2000);
  return {
    stop() {
      clearInterval(timer);
      return max;
    },
  };
}

export function loadavg(): string {
  return os.loadavg().map((l) => l.toFixed(2)).join(' ');
}

export function qemuVersion(): string {
  const r = spawnSync(qemuBinary(), ['--version'], { encoding: 'utf8' });
  return r.stdout?.split('\n')[0]?.trim() || 'unknown';
}

export function cpuModel(): string {
  const m = /^model name\s*:\s*(.*)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'));
  return m?.[1] ?? 'unknown';
}

/** The properties QEMU lists for `-device DRIVER,help` (empty when the driver is unknown). */
export function qemuDeviceProperties(driver: string): Set<string> {
  const r = spawnSync(qemuBinary(), ['-device', `${driver},help`], { encoding: 'utf8' });
  const props = new Set<string>();
  for (const line of (r.stdout ?? '').split('\n')) {
    const m = /^\s+([\w-]+)=/.exec(line);
    if (m) props.add(m[1]!);
  }
  return props;
}

/** A fresh sparse file of `bytes` (default 1 GiB) on tmpfs, RAM-backed like our server's namespace file. */
export function freshImage(file: string, bytes = 2 ** 30): void {
  fs.rmSync(file, { force: true });
  fs.writeFileSync(file, '');
  fs.truncateSync(file, bytes);
}

/**
 * Writes non-zero data over the first `mib` MiB of a file, as the in-guest precondition job does:
 * reads then return written data instead of taking the cheaper path of a sparse file's holes.
 */
export function fillImage(file: string, mib: number): void {
  const chunk = Buffer.alloc(2 ** 20);
  for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE((i * 2654435761) >>> 0, i);
  const fd = fs.openSync(file, 'r+');
  try {
    for (let m = 0; m < mib; m++) {
      chunk.writeUInt32LE(m, 0);
      fs.writeSync(fd, chunk, 0, chunk.length, m * 2 ** 20);
    }
  } finally {
    fs.closeSync(fd);
  }
}
