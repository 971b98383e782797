// A long-running QEMU 11 guest for end-to-end tests that act on it while it runs: a QMP socket,
// the serial console as a stream of lines to wait on, a target started for incoming migration,
// and a handle to stop it. The guest runs a script like runGuest's (scripts/guest-init.sh).

import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { chooseAccel, ensureHarness, guestInitramfs, parseMarkers, qemuArgsFor, qemuBinary, scriptCpio, type Accel } from './guest.js';

export interface VmOptions {
  name: string;
  /** The guest's script (ignored by a migration target: the guest comes from the source). */
  script: string;
  vfioUserSockets?: string[];
  memMiB?: number;
  cpus?: number;
  /** Start paused (-S). */
  paused?: boolean;
  /** A migration target: `-incoming defer` (and paused). */
  incoming?: boolean;
  extraKernelArgs?: string[];
  extraQemuArgs?: string[];
  accel?: Accel;
  /** Prefix for the serial console lines echoed to stderr (none when undefined). */
  echo?: string;
  /** Run QEMU inside this network namespace (another "host"). */
  netns?: string;
  /** A second QMP monitor on TCP (HOST:PORT), for an orchestrator that reaches the VM over the network. */
  qmpTcp?: string;
}

const live = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of live) c.kill('SIGKILL');
});

export class Vm {
  readonly lines: string[] = [];
  private waiters: Array<{ re: RegExp; resolve(m: RegExpMatchArray): void }> = [];
  private stderr = '';
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  private constructor(
    readonly name: string,
    readonly child: ChildProcess,
    readonly qmpPath: string,
    readonly accel: Accel,
    readonly args: string[],
    tmp: string,
  ) {
    live.add(child);
    let buffer = '';
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (chunk: string) => {
      buffer += chunk;
      let i: number;
      while ((i = buffer.indexOf('\n')) >= 0) {
        this.line(buffer.slice(0, i).replace(/\r/g, ''));
        buffer = buffer.slice(i + 1);
      }
    });
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (c: string) => (this.stderr += c));
    this.exited = new Promise((resolve) =>
      child.once('exit', (code, signal) => {
        live.delete(child);
        if (buffer) this.line(buffer);
        fs.rmSync(tmp, { recursive: true, force: true });
        resolve({ code, signal });
      }),
    );
  }

  /** Boots (or prepares, for a migration target) a guest; resolves once QMP accepts connections. */
  static async start(o: VmOptions): Promise<Vm> {
    ensureHarness();
    const accel = o.accel ?? (await chooseAccel());
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), `nvu-vm-${o.name}-`));
    const qmpPath = path.join(tmp, 'qmp.sock');
    const initrd = path.join(tmp, 'initramfs.img');
    // The script rides in an appended cpio; a target gets the same initrd so its ROMs match.
    fs.writeFileSync(initrd, Buffer.concat([fs.readFileSync(guestInitramfs()), scriptCpio(o.script)]));
    const args = qemuArgsFor({
      accel,
      memMiB: o.memMiB,
      cpus: o.cpus,
      vfioUserSockets: o.vfioUserSockets,
      kernelArgs: o.extraKernelArgs ?? [],
      initrd,
      extraQemuArgs: [
        '-qmp',
        `unix:${qmpPath},server=on,wait=off`,
        ...(o.paused || o.incoming ? ['-S'] : []),
        ...(o.incoming ? ['-incoming', 'defer'] : []),
        ...(o.qmpTcp ? ['-qmp', `tcp:${o.qmpTcp},server=on,wait=off`] : []),
        ...(o.extraQemuArgs ?? []),
      ],
    });
    const child = o.netns
      ? spawn('ip', ['netns', 'exec', o.netns, qemuBinary(), ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
      : spawn(qemuBinary(), args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const vm = new Vm(o.name, child, qmpPath, accel, args, tmp);
    if (o.echo !== undefined) vm.onLine((line) => process.stderr.write(`${o.echo}${line}\n`));
    const deadline = Date.now() + 20_000;
    while (!fs.existsSync(qmpPath)) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`QEMU ${o.name} exited before its QMP socket appeared: ${vm.stderr}`);
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`QEMU ${o.name}: no QMP socket within 20 s: ${vm.stderr}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    return vm;
  }

  private readonly lineListeners: Array<(line: string) => void> = [];

  onLine(listener: (line: string) => void): void {
    this.lineListeners.push(listener);
  }

  private line(text: string): void {
    this.lines.push(text);
    for (const l of this.lineListeners) l(text);
    this.waiters = this.waiters.filter((w) => {
      const m = w.re.exec(text);
      if (m) w.resolve(m);
      return !m;
    });
  }

  /** The first serial line (already seen or yet to come) matching `re`. */
  waitForLine(re: RegExp, timeoutMs: number, after = 0): Promise<RegExpMatchArray> {
    for (let i = after; i < this.lines.length; i++) {
      const m = re.exec(this.lines[i]!);
      if (m) return Promise.resolve(m);
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.re !== re);
        reject(new Error(`${this.name}: no serial line matching ${re} within ${timeoutMs} ms; last lines:\n${this.lines.slice(-15).join('\n')}\n${this.stderr}`));
      }, timeoutMs);
      this.waiters.push({
        re,
        resolve: (m) => {
          clearTimeout(timer);
          resolve(m);
        },
      });
      void this.exited.then(() => {
        clearTimeout(timer);
        reject(new Error(`${this.name}: QEMU exited before a serial line matched ${re}; last lines:\n${this.lines.slice(-15).join('\n')}\n${this.stderr}`));
      });
    });
  }

  get qemuStderr(): string {
    return this.stderr;
  }

  /** The script's output and exit code as far as this QEMU saw them. */
  markers(): ReturnType<typeof parseMarkers> {
    return parseMarkers(this.lines);
  }

  alive(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (this.alive()) this.child.kill(signal);
    await this.exited;
  }
}
