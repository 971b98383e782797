// QEMU + Linux guest harness for end-to-end tests.
//
// The QEMU binary (>= 10.1, with the vfio-user-pci client) and the guest
// (Debian kernel + busybox/nvme-cli/fio initramfs) are built outside the
// repository by scripts/setup-qemu.sh and scripts/build-guest.sh into
// cacheDir(). runGuest() boots the guest with a shell script, collects the
// serial console and returns the script's output and exit code, which the
// guest's /init (scripts/guest-init.sh) prints between markers:
//   @@NVTEST-BEGIN@@ ... @@NVTEST-EXIT <rc>@@
// Markers are matched anywhere in a line (SeaBIOS escape sequences may precede
// them).
//
// Environment:
//   NVME_VFIO_USER_CACHE  cache folder (default ~/.cache/nvme-vfio-user)
//   NVME_VFIO_USER_ACCEL  force 'tcg' or 'kvm' (default: KVM only when a probe
//                         boot of the guest under KVM works)

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

export type Accel = 'kvm' | 'tcg';

export interface GuestRun {
  /** Whole serial console output (\r removed), plus harness notes on failure. */
  output: string;
  /** Lines between @@NVTEST-BEGIN@@ and @@NVTEST-EXIT n@@ (joined with \n). */
  scriptOutput: string;
  /** The script's exit code, or null when the exit marker never came (timeout, crash). */
  exitCode: number | null;
  accel: Accel;
  /** From QEMU's start to its exit. */
  durationMs: number;
  /** From QEMU's start to the begin marker (null if it never came). */
  bootMs: number | null;
  /** QEMU's own stderr (warnings such as "Could not enable error recovery"). */
  qemuStderr: string;
  /** QEMU's exit status (null when killed by a signal). */
  qemuExitCode: number | null;
  timedOut: boolean;
}

export interface RunGuestOptions {
  /** Shell script run by busybox sh in the guest (as root, cwd /root). */
  script: string;
  /** vfio-user server sockets; each becomes a vfio-user-pci device (servers must already listen). */
  vfioUserSockets?: string[];
  /** Guest RAM in MiB (default 512). */
  memMiB?: number;
  /** vCPUs (default 2). */
  cpus?: number;
  /** Kill QEMU after this long (default 180000). */
  timeoutMs?: number;
  /** Appended to QEMU's command line. */
  extraQemuArgs?: string[];
  /** Extra kernel command-line words. */
  extraKernelArgs?: string[];
  /** Called with each serial console line as it arrives. */
  onSerialLine?: (line: string) => void;
  /** Force an accelerator (default: probeKvm()). */
  accel?: Accel;
  /** Let the guest reboot (see QemuArgsOptions.allowReboot). */
  allowReboot?: boolean;
  /** Guest RAM without an fd (see QemuArgsOptions.privateRam). */
  privateRam?: boolean;
  /** When this aborts, QEMU gets SIGKILL at once (as `kill -9` would), whatever the guest is doing. */
  kill?: AbortSignal;
}

export const BEGIN_MARKER = '@@NVTEST-BEGIN@@';
const EXIT_RE = /@@NVTEST-EXIT (-?\d+)@@/;
/** Scripts whose base64 text is longer go into an appended initramfs instead of the command line (x86 limit: 2048 bytes). */
const MAX_CMDLINE_SCRIPT = 1500;

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const SCRIPTS = path.join(REPO, 'scripts');

export function cacheDir(): string {
  return process.env.NVME_VFIO_USER_CACHE || path.join(os.homedir(), '.cache', 'nvme-vfio-user');
}

export function qemuBinary(): string {
  return path.join(cacheDir(), 'qemu', 'bin', 'qemu-system-x86_64');
}

export function qemuImgBinary(): string {
  return path.join(cacheDir(), 'qemu', 'bin', 'qemu-img');
}

export function guestKernel(): string {
  return path.join(cacheDir(), 'guest', 'vmlinuz');
}

export function guestInitramfs(): string {
  return path.join(cacheDir(), 'guest', 'initramfs.img');
}

let harnessReady = false;

/**
 * Makes sure QEMU and the guest images exist. The scripts are run on the
 * first call of each process: they return at once (and offline) when their
 * stamps are current, and rebuild when a script changed.
 */
export function ensureHarness(): void {
  if (harnessReady) return;
  for (const script of ['setup-qemu.sh', 'build-guest.sh']) {
    const r = spawnSync('bash', [path.join(SCRIPTS, script)], {
      stdio: ['ignore', 2, 2],
      env: { ...process.env, NVME_VFIO_USER_CACHE: cacheDir() },
    });
    if (r.error) throw new Error(`harness: could not run scripts/${script}: ${r.error.message}`);
    if (r.status !== 0) {
      throw new Error(
        `harness: scripts/${script} failed (${r.status !== null ? `exit ${r.status}` : `signal ${r.signal}`}); see its output above`,
      );
    }
  }
  for (const f of [qemuBinary(), guestKernel(), guestInitramfs()]) {
    if (!fs.existsSync(f)) throw new Error(`harness: ${f} is missing after the setup scripts ran`);
  }
  harnessReady = true;
}

export interface QemuArgsOptions {
  accel: Accel;
  memMiB?: number;
  cpus?: number;
  vfioUserSockets?: string[];
  /** Kernel command-line words after the harness's own. */
  kernelArgs?: string[];
  /** initramfs to boot (default: guestInitramfs()). */
  initrd?: string;
  extraQemuArgs?: string[];
  /** Let a guest reboot (a real machine reset: SeaBIOS and Linux run again) instead of exiting. */
  allowReboot?: boolean;
  /**
   * Plain anonymous guest RAM instead of a shared memfd: QEMU then maps RAM for vfio-user devices
   * without an fd, and every device DMA becomes a DMA_READ/DMA_WRITE message.
   */
  privateRam?: boolean;
}

/** QEMU's command line (without the binary) for a guest whose serial console is on stdio. */
export function qemuArgsFor(o: QemuArgsOptions): string[] {
  const mem = o.memMiB ?? 512;
  const args = [
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-vga', 'none',
    '-monitor', 'none',
    '-serial', 'stdio',
    ...(o.allowReboot ? [] : ['-no-reboot']),
    ...(o.privateRam
      ? ['-machine', 'q35']
      : ['-object', `memory-backend-memfd,id=mem,size=${mem}M,share=on`, '-machine', 'q35,memory-backend=mem']),
    '-m', `${mem}M`,
    '-smp', String(o.cpus ?? 2),
    ...(o.accel === 'kvm' ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg', '-cpu', 'max']),
    '-kernel', guestKernel(),
    '-initrd', o.initrd ?? guestInitramfs(),
    '-append', ['console=ttyS0', 'quiet', 'panic=-1', ...(o.kernelArgs ?? [])].join(' '),
  ];
  for (const sock of o.vfioUserSockets ?? []) {
    args.push('-device', JSON.stringify({ driver: 'vfio-user-pci', socket: { path: sock, type: 'unix' } }));
  }
  args.push(...(o.extraQemuArgs ?? []));
  return args;
}

// ---------------------------------------------------------------- child cleanup

const live = new Set<ChildProcess>();
let cleanupInstalled = false;

function killAll(): void {
  for (const c of live) {
    try {
      c.kill('SIGKILL');
    } catch {
      /* already gone */
    }
  }
  live.clear();
}

function installCleanup(): void {
  if (cleanupInstalled) return;
  cleanupInstalled = true;
  process.on('exit', killAll);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    const handler = (): void => {
      killAll();
      // Keep the default behaviour (terminate) when nobody else handles it.
      if (process.listenerCount(sig) === 1) {
        process.removeListener(sig, handler);
        process.kill(process.pid, sig);
      }
    };
    process.on(sig, handler);
  }
}

function track(c: ChildProcess): void {
  installCleanup();
  live.add(c);
  c.once('exit', () => live.delete(c));
}

// ---------------------------------------------------------------- initramfs with the script

function cpioEntry(name: string, mode: number, data: Buffer, ino: number): Buffer {
  const nameBuf = Buffer.from(name + '\0');
  const fields = [ino, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, nameBuf.length, 0];
  const header = Buffer.from('070701' + fields.map((v) => v.toString(16).padStart(8, '0')).join(''));
  const pad = (n: number): Buffer => Buffer.alloc((4 - (n % 4)) % 4);
  const headLen = header.length + nameBuf.length;
  return Buffer.concat([header, nameBuf, pad(headLen), data, pad(data.length)]);
}

/** A gzip'd newc cpio holding /nvtest/script.sh, to append to the initramfs. */
export function scriptCpio(script: string): Buffer {
  const cpio = Buffer.concat([
    cpioEntry('nvtest', 0o040755, Buffer.alloc(0), 1),
    cpioEntry('nvtest/script.sh', 0o100755, Buffer.from(script), 2),
    cpioEntry('TRAILER!!!', 0, Buffer.alloc(0), 0),
  ]);
  return gzipSync(cpio);
}

// ---------------------------------------------------------------- serial parsing

function lineSplitter(onLine: (line: string) => void): { push(chunk: string): void; end(): void } {
  let buf = '';
  return {
    push(chunk: string) {
      buf += chunk;
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        onLine(buf.slice(0, i).replace(/\r/g, ''));
        buf = buf.slice(i + 1);
      }
    },
    end() {
      if (buf.length) onLine(buf.replace(/\r/g, ''));
      buf = '';
    },
  };
}

/** Extracts the script output and exit code from serial console lines. */
export function parseMarkers(lines: string[]): { scriptOutput: string; exitCode: number | null; begun: boolean } {
  const out: string[] = [];
  let begun = false;
  for (const line of lines) {
    if (!begun) {
      const i = line.indexOf(BEGIN_MARKER);
      if (i >= 0) {
        begun = true;
        const rest = line.slice(i + BEGIN_MARKER.length);
        if (rest.length) out.push(rest);
      }
      continue;
    }
    const m = EXIT_RE.exec(line);
    if (m) {
      const before = line.slice(0, m.index);
      if (before.length) out.push(before);
      return { scriptOutput: out.join('\n'), exitCode: Number(m[1]), begun };
    }
    out.push(line);
  }
  return { scriptOutput: out.join('\n'), exitCode: null, begun };
}

// ---------------------------------------------------------------- KVM probe

let kvmProbe: Promise<boolean> | undefined;

function bootId(): string {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return 'unknown';
  }
}

/**
 * True when KVM can run the guest: /dev/kvm opens and a probe boot of the
 * guest kernel under KVM reaches its init within 30 s. (Some hosts have a
 * /dev/kvm that runs firmware but not Linux.) The result is cached per boot of
 * the machine in cacheDir()/kvm-probe.json.
 */
export function probeKvm(): Promise<boolean> {
  if (!kvmProbe) kvmProbe = doProbeKvm();
  return kvmProbe;
}

async function doProbeKvm(): Promise<boolean> {
  try {
    fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
  } catch {
    return false;
  }
  ensureHarness();
  const cacheFile = path.join(cacheDir(), 'kvm-probe.json');
  const key = [bootId(), fs.statSync(guestKernel()).mtimeMs, fs.statSync(qemuBinary()).mtimeMs].join('/');
  try {
    const c = JSON.parse(fs.readFileSync(cacheFile, 'utf8')) as { key: string; ok: boolean };
    if (c.key === key) return c.ok;
  } catch {
    /* no cache yet */
  }
  const t0 = Date.now();
  const run = await runGuestWith({ script: 'exit 0', accel: 'kvm', timeoutMs: 30000, memMiB: 256, cpus: 1, quietAccel: true });
  const ok = run.exitCode === 0;
  console.error(`[guest] KVM probe: ${ok ? 'works' : 'does not boot the guest'} (${Date.now() - t0} ms)`);
  try {
    fs.writeFileSync(cacheFile, JSON.stringify({ key, ok }));
  } catch {
    /* cache is optional */
  }
  return ok;
}

export async function chooseAccel(): Promise<Accel> {
  const forced = process.env.NVME_VFIO_USER_ACCEL;
  if (forced === 'kvm' || forced === 'tcg') return forced;
  return (await probeKvm()) ? 'kvm' : 'tcg';
}

// ---------------------------------------------------------------- runGuest

/** Boots the guest, runs opts.script in it and resolves when QEMU exits (or is killed on timeout). */
export async function runGuest(opts: RunGuestOptions): Promise<GuestRun> {
  ensureHarness();
  const accel = opts.accel ?? (await chooseAccel());
  return runGuestWith({ ...opts, accel });
}

async function runGuestWith(opts: RunGuestOptions & { accel: Accel; quietAccel?: boolean }): Promise<GuestRun> {
  const timeoutMs = opts.timeoutMs ?? 180000;
  const b64 = Buffer.from(opts.script).toString('base64');
  const kernelArgs: string[] = [];
  let tmpDir: string | undefined;
  let initrd = guestInitramfs();
  if (b64.length <= MAX_CMDLINE_SCRIPT) {
    kernelArgs.push(`nvtest.script=${b64}`);
  } else {
    tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvtest-'));
    initrd = path.join(tmpDir, 'initramfs.img');
    fs.writeFileSync(initrd, Buffer.concat([fs.readFileSync(guestInitramfs()), scriptCpio(opts.script)]));
  }
  kernelArgs.push(...(opts.extraKernelArgs ?? []));
  const args = qemuArgsFor({
    accel: opts.accel,
    memMiB: opts.memMiB,
    cpus: opts.cpus,
    vfioUserSockets: opts.vfioUserSockets,
    kernelArgs,
    initrd,
    extraQemuArgs: opts.extraQemuArgs,
    allowReboot: opts.allowReboot,
    privateRam: opts.privateRam,
  });
  if (!opts.quietAccel) {
    console.error(`[guest] accelerator: ${opts.accel}${opts.accel === 'tcg' ? ' (no working KVM: guest CPU is emulated)' : ''}`);
  }

  const lines: string[] = [];
  let stderr = '';
  let bootMs: number | null = null;
  const t0 = Date.now();
  const child = spawn(qemuBinary(), args, { stdio: ['ignore', 'pipe', 'pipe'] });
  track(child);
  const splitter = lineSplitter((line) => {
    lines.push(line);
    if (bootMs === null && line.includes(BEGIN_MARKER)) bootMs = Date.now() - t0;
    if (opts.onSerialLine) {
      try {
        opts.onSerialLine(line);
      } catch (e) {
        console.error('[guest] onSerialLine threw:', e);
      }
    }
  });
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (c: string) => splitter.push(c));
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (c: string) => {
    stderr += c;
  });

  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, timeoutMs);
  const killNow = (): void => void child.kill('SIGKILL');
  if (opts.kill?.aborted) killNow();
  else opts.kill?.addEventListener('abort', killNow, { once: true });

  const { code, spawnError } = await new Promise<{ code: number | null; spawnError?: Error }>((resolve) => {
    child.once('error', (e) => resolve({ code: null, spawnError: e }));
    // 'close' waits for stdout/stderr to drain.
    child.once('close', (c) => resolve({ code: c }));
  });
  clearTimeout(timer);
  opts.kill?.removeEventListener('abort', killNow);
  splitter.end();
  if (tmpDir) fs.rmSync(tmpDir, { recursive: true, force: true });
  const durationMs = Date.now() - t0;

  const parsed = parseMarkers(lines);
  const notes: string[] = [];
  if (spawnError) notes.push(`[harness] could not start QEMU (${qemuBinary()}): ${spawnError.message}`);
  if (timedOut) {
    notes.push(
      `[harness] ERROR: QEMU killed after the ${timeoutMs} ms timeout (${parsed.begun ? 'script did not finish' : 'guest never reached its script'})`,
    );
  } else if (parsed.exitCode === null && !spawnError) {
    notes.push(`[harness] ERROR: QEMU exited (status ${code}) without the exit marker`);
  }
  if (notes.length && stderr.trim()) notes.push('[harness] QEMU stderr:', stderr.trimEnd());
  const output = [...lines, ...notes].join('\n');
  return {
    output,
    scriptOutput: parsed.scriptOutput,
    exitCode: timedOut ? null : parsed.exitCode,
    accel: opts.accel,
    durationMs,
    bootMs,
    qemuStderr: stderr,
    qemuExitCode: code,
    timedOut,
  };
}
