// The headline: a VM running verified I/O on our NVMe controller moves between two QEMU 11
// processes, back and forth, with `nvme-vfio-user migrate`. After every hop its verification
// passes, interrupts keep arriving, the kernel logs no nvme timeout, reset or I/O error, and at
// the end the shared backing file holds what the guest wrote.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { spawnSync } from 'node:child_process';
import { createServer, connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { ensureHarness } from './guest.js';
import { Vm } from './vm.js';
import { fields } from './shell.js';
import { side, stopWorkload, workload, type Placement, type Side } from './migration-scenario.js';
import { freePort } from '../support/server-process.js';
import { startServe } from '../support/serve.js';
import { fileRange } from '../support/files.js';
import { cli, runCli } from '../support/cli.js';
import { QmpClient } from '../../src/mgmt/qemu/qmp.js';
import { queryStatus } from '../../src/mgmt/qemu/migration.js';
import { mappedDoorbellCounts } from '../support/doorbell-log.js';

const HOPS = Number(process.env.NVU_MIGRATION_HOPS ?? 5);
let dir: string;

beforeAll(() => {
  ensureHarness();
  dir = mkdtempSync(join(tmpdir(), 'nvu-e2e-mig-'));
});

const tokenFile = (): string => join(dir, 'control.token');

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

interface HopResult {
  figures: { totalMs: number; vmDowntimeMs: number; devices: { quiesceMs: number; stateBytes: number; dmaWriteBytes: number }[] };
}

/** Runs the VM on A, migrates it HOPS times between A and B, then stops the workload. */
async function migrateBackAndForth(
  hops: number,
  interrupts: 'msix' | 'msi',
  memMiB: number,
  network?: { a: Placement; b: Placement },
): Promise<{ lines: string[]; hops: HopResult[]; disk: string; sides: Side[] }> {
  const label = `${interrupts}${network ? '-hosts' : ''}`;
  const disk = join(dir, `disk-${label}.img`);
  // The MSI VM's servers also batch deep queues: a hop then finds EventIdx held back in guest
  // memory, and the destination must arm it again or the guest never rings there.
  const extra = interrupts === 'msi' ? ['--interrupts', 'msi', '--batch-ms', '1'] : [];
  // The MSI-X VM's B side offers its doorbells as a mapped page: every hop then moves the
  // controller between a trapped and a mapped doorbell page, one way or the other.
  const mappedOnB = interrupts === 'msix' && !network ? ['--doorbells', 'mapped'] : [];
  // Between hosts the namespace is O_DIRECT, as QEMU users run shared storage (cache=none).
  const cache = network ? 'none' : undefined;
  const a = await side(dir, 'a', 1, disk, extra, network?.a, cache);
  const b = await side(dir, 'b', 2, disk, [...extra, ...mappedOnB], network?.b, cache);
  const stopMarker = `NVU-STOP-${label}`;
  const script = workload(stopMarker);
  const lines: string[] = [];
  const results: HopResult[] = [];
  let qmpPort = 7100;
  /** QEMU's QMP as the orchestrator reaches it: over TCP from another namespace, or its unix socket. */
  const startVm = async (name: string, on: Side, incoming: boolean): Promise<{ vm: Vm; qmp: string }> => {
    const tcp = on.placement ? `${on.placement.managementAddress}:${qmpPort++}` : undefined;
    const vm = await Vm.start({ name, script, vfioUserSockets: [on.socket], memMiB, incoming, ...(on.placement ? { netns: on.placement.netns, qmpTcp: tcp } : {}) });
    return { vm, qmp: tcp ? `tcp:${tcp}` : `unix:${vm.qmpPath}` };
  };
  let { vm, qmp } = await startVm('vm-a0', a, false);
  vm.onLine((l) => lines.push(l));
  let here = a;
  try {
    for (let hop = 0; hop < hops; hop++) {
      const there = here === a ? b : a;
      // Migrate while a round of verified I/O runs: wait for the round after the last one seen.
      await vm.waitForLine(/^round\.\d+=/, 240_000, vm.lines.length);
      await new Promise((r) => setTimeout(r, 1500 + Math.random() * 2000)); // into the next round
      const port = there.placement ? 7200 + hop : await freePort();
      const { vm: target, qmp: targetQmp } = await startVm(`vm-${there.name}${hop + 1}`, there, true);
      const run = await runCli([
        'migrate',
        '--source-qmp', qmp,
        '--source-control', here.control,
        '--target-qmp', targetQmp,
        '--target-control', there.control,
        '--uri', `tcp:${there.placement?.migrationAddress ?? '127.0.0.1'}:${port}`,
        ...(here.placement ? ['--control-token', tokenFile()] : []),
        '--json',
      ], { timeoutMs: 240_000 });
      if (run.code !== 0) {
        await target.kill();
        throw new Error(`hop ${hop + 1} failed (${run.code}): ${run.stderr}\n${here.server.log()}\n${there.server.log()}`);
      }
      results.push({ figures: JSON.parse(run.stdout) as HopResult['figures'] });
      const hopFigures = results[results.length - 1]!.figures as HopResult['figures'] & { switchover?: Record<string, number> };
      console.error(`[e2e migration ${label}] hop ${hop + 1}: downtime ${hopFigures.vmDowntimeMs.toFixed(0)} ms, total ${hopFigures.totalMs.toFixed(0)} ms; ${JSON.stringify(hopFigures.switchover)}`);
      target.onLine((l) => lines.push(l));
      // The source QEMU stays in postmigrate: end it, so its server's socket can take the next VM.
      await vm.kill();
      vm = target;
      qmp = targetQmp;
      here = there;
    }
    await vm.waitForLine(/^round\.\d+=/, 240_000, vm.lines.length);
    stopWorkload(disk, stopMarker);
    await vm.waitForLine(/@@NVTEST-EXIT/, 240_000);
    await vm.exited;
    return { lines, hops: results, disk, sides: [a, b] };
  } finally {
    await vm.kill();
  }
}


// Guest RAM spans the range a user runs: 384 MiB with MSI-X, 2 GiB with MSI, 256 MiB across hosts.
const GUEST_MIB = { msix: 384, msi: 2048 } as const;

for (const interrupts of ['msix', 'msi'] as const) {
  describe(`a ${GUEST_MIB[interrupts]} MiB VM with ${interrupts === 'msix' ? 'MSI-X (B: serve --doorbells mapped)' : 'MSI (and serve --batch-ms 1)'} migrates back and forth ${interrupts === 'msix' ? HOPS : 2} times mid-I/O`, () => {
    let result: Awaited<ReturnType<typeof migrateBackAndForth>>;
    let f: Map<string, string>;
    let rounds: { rc: string; errors: string; irqs: number }[];

    beforeAll(async () => {
      result = await migrateBackAndForth(interrupts === 'msix' ? HOPS : 2, interrupts, GUEST_MIB[interrupts]);
      const output = result.lines.join('\n');
      f = fields(output);
      rounds = [...output.matchAll(/^round\.\d+=(\d+),(\d*),(\d+)$/gm)].map((m) => ({ rc: m[1]!, errors: m[2]!, irqs: Number(m[3]) }));
      console.error(`[e2e migration ${interrupts}] rounds: ${rounds.map((r) => `${r.rc}/${r.errors}/${r.irqs}`).join(' ')}`);
      for (const s of result.sides) await s.server.stop();
    }, Math.max(1_500_000, HOPS * 60_000));

    it('every hop completes with the figures the orchestrator reports', () => {
      expect(result.hops).toHaveLength(interrupts === 'msix' ? HOPS : 2);
      for (const hop of result.hops) {
        expect(hop.figures.totalMs).toBeGreaterThan(0);
        expect(hop.figures.vmDowntimeMs).toBeGreaterThan(0);
        expect(hop.figures.devices).toHaveLength(1);
        expect(hop.figures.devices[0]!.stateBytes).toBeGreaterThan(48);
      }
      // The device's writes during the RAM copy went through QEMU (so its dirty tracking saw them).
      expect(result.hops.reduce((n, h) => n + h.figures.devices[0]!.dmaWriteBytes, 0)).toBeGreaterThan(0);
    });

    it('every round of verified I/O passes, before, across and after every hop', () => {
      expect(rounds.length).toBeGreaterThan(result.hops.length);
      for (const r of rounds) expect([r.rc, r.errors]).toEqual(['0', '0']);
    });

    it('interrupts keep rising through every hop', () => {
      // Each QEMU's guest counts from where the previous left off (the same guest kernel).
      for (let i = 1; i < rounds.length; i++) expect(rounds[i]!.irqs).toBeGreaterThan(rounds[i - 1]!.irqs);
    });

    if (interrupts === 'msix') {
      it('on B the guest stored its doorbells to the mapped page', () => {
        const b = result.sides.find((s) => s.name === 'b')!;
        // One line per VM that left B (each QEMU is ended after its hop away).
        const clients = mappedDoorbellCounts(b.server.log());
        console.error(`[e2e migration msix] B's clients, doorbells from the page / by message: ${clients.map((c) => `${c.fromPage}/${c.byMessage}`).join(' ')}`);
        expect(clients.length).toBeGreaterThanOrEqual(2);
        // A migrated guest never runs its firmware or INTx there: every doorbell is a store.
        for (const { fromPage, byMessage } of clients) expect([fromPage > 1000, byMessage]).toEqual([true, 0]);
      });
    }

    if (interrupts === 'msi') {
      it('both servers batched the guest\'s deep queues at some point (the batching was not idle)', () => {
        for (const s of result.sides) expect([s.name, /SQ \d+ is deep: its commands are collected every 1 ms/.test(s.server.log())]).toEqual([s.name, true]);
      });
    }

    it('every hop notified both sides (write-back and cache drop ahead), made the source durable at the suspend and dropped the destination page cache before its state loaded', () => {
      // One host, one page cache: a stale cache cannot show here (the unit test proves the drop with
      // fincore); this shows each step ran in a real migration whose verified I/O lost nothing.
      const logs = result.sides.map((s) => s.server.log()).join('\n');
      const count = (re: RegExp): number => [...logs.matchAll(re)].length;
      const hops = result.hops.length;
      // Both sides are notified: the source as QEMU starts copying RAM, the destination before it is suspended ahead.
      expect(count(/suspend notified: 1 namespace\(s\) to be re-read from storage \(page cache dropped\) in/g)).toBe(2 * hops);
      // The destination's controller is suspended ahead of each hop too: both sides log a suspend.
      expect(count(/suspended: 1 namespace\(s\) made durable in/g)).toBe(2 * hops);
      expect(count(/state arriving: 1 namespace\(s\) to be re-read from storage \(page cache dropped\) in/g)).toBe(hops);
    });

    it('the kernel logged no nvme timeout, reset or I/O error', () => {
      expect(f.get('kernel.nvme_trouble')).toBe('0');
      expect(result.lines.join('\n')).not.toMatch(/nvme nvme\d+: (I\/O .*timeout|controller is down|resetting)/);
    });

    it('the shared backing file holds what the guest wrote last', () => {
      expect(f.get('pattern.rc')).toBe('0');
      const sha = createHash('sha256').update(fileRange(result.disk, 1024 * 64 * 1024, 32 * 64 * 1024)).digest('hex');
      expect(sha).toBe(f.get('pattern.sha'));
    });
  });
}

describe('a migration that fails before the destination runs never loses the VM', () => {
  it('destination QEMU killed mid-migration, orchestrator killed at pre-switchover (then migrate recover), destination refusing the state: the VM keeps running on the source, verified, and then migrates', async () => {
    const disk = join(dir, 'disk-abort.img');
    const a = await side(dir, 'a', 1, disk, []);
    const b = await side(dir, 'b', 2, disk, []);
    const stopMarker = 'NVU-STOP-ABORT';
    const script = workload(stopMarker);
    const vm = await Vm.start({ name: 'vm-abort', script, vfioUserSockets: [a.socket], memMiB: 384 });
    let target: Vm | undefined;
    const attempt = async (what: string, onLine: (line: string, target: Vm, orchestrator: import('node:child_process').ChildProcess) => void, sourceQmp = vm.qmpPath) => {
      await vm.waitForLine(/^round\.\d+=/, 240_000, vm.lines.length);
      await new Promise((r) => setTimeout(r, 1500));
      const target = await Vm.start({ name: `target-${what}`, script, vfioUserSockets: [b.socket], memMiB: 384, incoming: true });
      const port = await freePort();
      const run = await runCli(
        ['migrate', '--source-qmp', `unix:${sourceQmp}`, '--source-control', a.control, '--target-qmp', `unix:${target.qmpPath}`, '--target-control', b.control, '--uri', `tcp:127.0.0.1:${port}`],
        { timeoutMs: 240_000, onStderrLine: (line, child) => onLine(line, target, child) },
      );
      await target.kill();
      console.error(`[e2e migration abort] ${what}: exit ${run.code ?? run.signal}\n${run.stderr}`);
      return run;
    };
    try {
      // 1. The destination QEMU dies while RAM is being copied.
      const killed = await attempt('destination killed', (line, target) => {
        if (line.includes('migrating RAM')) void target.kill();
      });
      expect(killed.code).toBe(1);
      expect(killed.stderr).toMatch(/putting the source back into service/);
      // 2. The orchestrator itself dies at pre-switchover: the source is left paused with its
      //    controller suspended, until `migrate recover`. Dead exactly when it asks the source QEMU
      //    to continue, after the suspend and the state out: the hardest state to leave. (Killing
      //    it on its progress line raced with that migrate-continue.)
      let orchestrator: import('node:child_process').ChildProcess | undefined;
      const tripwire = await qmpTripwire(join(dir, 'qmp-tripwire.sock'), vm.qmpPath, 'migrate-continue', () => orchestrator?.kill('SIGKILL'));
      const dead = await attempt('orchestrator killed', (_line, _target, child) => (orchestrator = child), tripwire.path);
      await tripwire.close();
      expect(tripwire.tripped()).toBe(true);
      expect(dead.code).toBeNull();
      const stuck = JSON.parse(await cli(['list', '--control', a.control, '--json'])) as { controllers: { cntlid: number; runState: string }[] };
      expect(stuck.controllers.find((c) => c.cntlid === 1)!.runState).toBe('suspended');
      // QEMU's QMP socket takes one client at a time: look, then make room for `migrate recover`.
      const running = async (): Promise<boolean> => {
        const qmp = await QmpClient.connect(`unix:${vm.qmpPath}`);
        try {
          return (await queryStatus(qmp)).running;
        } finally {
          qmp.close();
        }
      };
      expect(await running()).toBe(false);
      const recovered = await runCli(['migrate', 'recover', '--source-qmp', `unix:${vm.qmpPath}`, '--source-control', a.control]);
      if (recovered.code !== 0) console.error(recovered.stderr);
      expect(recovered.code).toBe(0);
      expect(recovered.stdout).toMatch(/back in service; resumed controllers: 1/);
      expect(await running()).toBe(true);
      // 3. The destination refuses the state: its controller has fewer queues than the VM uses.
      const c = b.controlArgs;
      await cli(['ctrl', 'offline', ...c, '--ctrl', '2']);
      await cli(['ctrl', 'assign', ...c, '--ctrl', '2', '--vq', '2', '--vi', '3']);
      await cli(['ctrl', 'online', ...c, '--ctrl', '2']);
      const refused = await attempt('state refused', () => undefined);
      expect(refused.code).toBe(1);
      expect(refused.stderr).toMatch(/NOT_ENOUGH_RESOURCES/);
      expect(refused.stderr).toMatch(/putting the source back into service/);
      // The VM never stopped being ours: verified rounds go on, on the same QEMU.
      const roundsAfter = vm.lines.filter((l) => /^round\.\d+=/.test(l)).length;
      await vm.waitForLine(/^round\.\d+=/, 240_000, vm.lines.length);
      expect(vm.lines.filter((l) => /^round\.\d+=/.test(l)).length).toBeGreaterThan(roundsAfter);
      // 4. After three failures the same source still migrates: the destination gets its queues back.
      await cli(['ctrl', 'offline', ...c, '--ctrl', '2']);
      await cli(['ctrl', 'assign', ...c, '--ctrl', '2', '--vq', '3', '--vi', '3']);
      await cli(['ctrl', 'online', ...c, '--ctrl', '2']);
      await vm.waitForLine(/^round\.\d+=/, 240_000, vm.lines.length);
      await new Promise((r) => setTimeout(r, 1500));
      target = await Vm.start({ name: 'target-after-failures', script, vfioUserSockets: [b.socket], memMiB: 384, incoming: true });
      const port = await freePort();
      await cli(['migrate', '--source-qmp', `unix:${vm.qmpPath}`, '--source-control', a.control, '--target-qmp', `unix:${target.qmpPath}`, '--target-control', b.control, '--uri', `tcp:127.0.0.1:${port}`]);
      const before = vm.lines.join('\n');
      await vm.kill();
      await target.waitForLine(/^round\.\d+=/, 240_000, target.lines.length);
      stopWorkload(disk, stopMarker);
      await target.waitForLine(/@@NVTEST-EXIT 0@@/, 240_000);
      const output = `${before}\n${target.lines.join('\n')}`;
      const rounds = [...output.matchAll(/^round\.\d+=(\d+),(\d*),\d+$/gm)].map((m) => [m[1], m[2]]);
      expect(rounds.length).toBeGreaterThan(roundsAfter);
      for (const r of rounds) expect(r).toEqual(['0', '0']);
      expect(fields(output).get('kernel.nvme_trouble')).toBe('0');
      const sha = createHash('sha256').update(fileRange(disk, 1024 * 64 * 1024, 32 * 64 * 1024)).digest('hex');
      expect(sha).toBe(fields(output).get('pattern.sha'));
    } finally {
      await vm.kill();
      await target?.kill();
      await a.server.stop();
      await b.server.stop();
    }
  }, 900_000);
});

/** Two "hosts" on this machine: network namespaces joined to the orchestrator's and to each other. */
function makeHosts(): { a: Placement; b: Placement; remove(): void } {
  const run = (args: string): void => {
    const r = spawnSync('ip', args.split(' '), { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`ip ${args}: ${r.stderr || r.error?.message}`);
  };
  const remove = (): void => {
    for (const ns of ['nvu-host-a', 'nvu-host-b']) spawnSync('ip', ['netns', 'del', ns]);
    for (const link of ['nvu-ra', 'nvu-rb']) spawnSync('ip', ['link', 'del', link]);
  };
  remove();
  run('netns add nvu-host-a');
  run('netns add nvu-host-b');
  for (const ns of ['nvu-host-a', 'nvu-host-b']) run(`-n ${ns} link set lo up`);
  // Orchestrator <-> a, orchestrator <-> b, a <-> b (the migration stream).
  const link = (left: string, leftNs: string | null, leftIp: string, right: string, rightNs: string, rightIp: string): void => {
    run(`link add ${left} type veth peer name ${right}`);
    run(`link set ${right} netns ${rightNs}`);
    if (leftNs) run(`link set ${left} netns ${leftNs}`);
    const n = (ns: string | null): string => (ns ? `-n ${ns} ` : '');
    run(`${n(leftNs)}addr add ${leftIp}/24 dev ${left}`);
    run(`${n(rightNs)}addr add ${rightIp}/24 dev ${right}`);
    run(`${n(leftNs)}link set ${left} up`);
    run(`${n(rightNs)}link set ${right} up`);
  };
  link('nvu-ra', null, '10.77.1.1', 'nvu-ar', 'nvu-host-a', '10.77.1.2');
  link('nvu-rb', null, '10.77.2.1', 'nvu-br', 'nvu-host-b', '10.77.2.2');
  link('nvu-ab', 'nvu-host-a', '10.77.3.1', 'nvu-ba', 'nvu-host-b', '10.77.3.2');
  return {
    a: { netns: 'nvu-host-a', managementAddress: '10.77.1.2', migrationAddress: '10.77.3.1' },
    b: { netns: 'nvu-host-b', managementAddress: '10.77.2.2', migrationAddress: '10.77.3.2' },
    remove,
  };
}

describe('across two hosts (network namespaces): control and QMP over TCP with a token, the migration stream between them', () => {
  let result: Awaited<ReturnType<typeof migrateBackAndForth>>;
  let hosts: ReturnType<typeof makeHosts>;

  beforeAll(async () => {
    hosts = makeHosts();
    result = await migrateBackAndForth(2, 'msix', 256, hosts);
    for (const s of result.sides) await s.server.stop();
  }, 900_000);

  afterAll(() => hosts?.remove());

  it('moves the VM there and back with every round verified, its namespace O_DIRECT (cache=none) on both hosts', () => {
    for (const s of result.sides) expect([s.name, /namespace 1: file:\S+, aio=\w+, cache=none/.test(s.server.log())]).toEqual([s.name, true]);
    const output = result.lines.join('\n');
    const rounds = [...output.matchAll(/^round\.\d+=(\d+),(\d*),\d+$/gm)].map((m) => [m[1], m[2]]);
    expect(result.hops).toHaveLength(2);
    expect(rounds.length).toBeGreaterThan(2);
    for (const r of rounds) expect(r).toEqual(['0', '0']);
    expect(fields(output).get('kernel.nvme_trouble')).toBe('0');
    const sha = createHash('sha256').update(fileRange(result.disk, 1024 * 64 * 1024, 32 * 64 * 1024)).digest('hex');
    expect(sha).toBe(fields(output).get('pattern.sha'));
  });

  it('refuses a control request without the token', async () => {
    const server = await startServe(['--secondaries', '1', '--control', 'tcp:10.77.1.2:7099', '--control-token', tokenFile()], 'control on ', 15_000, 'nvu-host-a');
    try {
      const refused = await runCli(['list', '--control', 'tcp:10.77.1.2:7099']);
      expect(refused.code).toBe(1);
      expect(refused.stderr).toMatch(/missing or wrong control token/);
      expect(await cli(['list', '--control', 'tcp:10.77.1.2:7099', '--control-token', tokenFile()])).toMatch(/primary/);
    } finally {
      await server.stop();
    }
  });
});

/**
 * A QMP socket at `path` in front of QEMU's at `qmpPath`, forwarding both ways until its client
 * sends `command`: that command never reaches QEMU, `onCommand` runs, and the client is left
 * waiting for a reply (so a client being killed cannot react to a closed socket first).
 */
async function qmpTripwire(path: string, qmpPath: string, command: string, onCommand: () => void): Promise<{ path: string; tripped(): boolean; close(): Promise<void> }> {
  let tripped = false;
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = connect(qmpPath);
    sockets.add(client).add(upstream);
    upstream.on('data', (d: Buffer) => {
      if (!tripped) client.write(d);
    });
    let tail = '';
    client.on('data', (d: Buffer) => {
      if (tripped) return;
      const text = tail + d.toString('latin1');
      if (text.includes(`"${command}"`)) {
        tripped = true;
        onCommand();
        return;
      }
      upstream.write(d);
      tail = text.slice(-command.length - 2);
    });
    const end = (): void => {
      client.destroy();
      upstream.destroy();
    };
    client.on('close', end).on('error', end);
    upstream.on('close', end).on('error', end);
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return {
    path,
    tripped: () => tripped,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
