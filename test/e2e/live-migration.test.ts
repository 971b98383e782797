// The headline: a VM running verified I/O on our NVMe controller moves between two QEMU 11
// processes, back and forth, with `nvme-vfio-user migrate`. After every hop its verification
// passes, interrupts keep arriving, the kernel logs no nvme timeout, reset or I/O error, and at
// the end the shared backing file holds what the guest wrote.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureHarness } from './guest.js';
import { Vm } from './vm.js';
import { fields, HELPERS } from './shell.js';
import { startServe, type Served } from '../support/serve.js';
import { cli, runCli } from '../support/cli.js';
import { QmpClient } from '../../src/mgmt/qemu/qmp.js';
import { queryStatus } from '../../src/mgmt/qemu/migration.js';

const VNQN = 'nqn.2026-11.io.example:migrating-vm';
const DISK_MIB = 128;
const HOPS = Number(process.env.NVU_MIGRATION_HOPS ?? 5);
let dir: string;

beforeAll(() => {
  ensureHarness();
  dir = mkdtempSync(join(tmpdir(), 'nvu-e2e-mig-'));
});

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** A free TCP port on loopback for the migration stream. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

/**
 * The guest: rounds of fio random writes with crc32c verification until told to stop by the
 * host (a marker in the namespace's last block), each round printing its result and the nvme
 * interrupt count; then a pattern whose checksum the host compares with the backing file.
 */
function workload(stopMarker: string): string {
  return `${HELPERS}
d=$(wait_dev 1) || exit 10
irqs() { grep -E 'nvme[0-9]q[1-9]' /proc/interrupts | awk '{s+=$2+$3} END {print s+0}'; }
i=0
while ! dd if=$d bs=4096 skip=$((${DISK_MIB} * 256 - 1)) count=1 iflag=direct 2>/dev/null | grep -q ${stopMarker}; do
  fio --name=r$i --filename=$d --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 --size=8M --offset_increment=8M \\
    --time_based --runtime=6 --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting --output-format=terse --terse-version=3 > /tmp/r.out 2>&1
  echo round.$i=$?,$(grep '^3;' /tmp/r.out | cut -d';' -f5),$(irqs)
  i=$((i+1))
  [ $i -gt 400 ] && break
done
echo rounds=$i
dd if=/dev/urandom of=/tmp/pattern bs=64k count=32 2>/dev/null
dd if=/tmp/pattern of=$d bs=64k seek=1024 oflag=direct conv=fsync 2>/dev/null; echo pattern.rc=$?
echo pattern.sha=$(sha256sum /tmp/pattern | cut -d' ' -f1)
echo kernel.nvme_trouble=$(dmesg | grep -ciE 'nvme.*(timeout|reset|I/O error|abort)|I/O error, dev nvme')
`;
}

interface Side {
  name: 'a' | 'b';
  server: Served;
  control: string;
  socket: string;
}

async function side(name: 'a' | 'b', cntlid: number, disk: string, extra: string[]): Promise<Side> {
  const control = join(dir, `${name}-control.sock`);
  const socket = join(dir, `${name}-vm.sock`);
  const server = await startServe(['--secondaries', '2', '--control', control, '--namespace', `file=${disk},size=${DISK_MIB}M`, ...extra], `control on ${control}`);
  const c = ['--control', control];
  await cli(['vsubsys', 'create', ...c, '--virtual-nqn', VNQN]);
  await cli(['vsubsys', 'add', ...c, '--virtual-nqn', VNQN, '--ctrl', String(cntlid), '--vcid', '1']);
  await cli(['ctrl', 'assign', ...c, '--ctrl', String(cntlid), '--vq', '3', '--vi', '3']);
  await cli(['ctrl', 'online', ...c, '--ctrl', String(cntlid)]);
  await cli(['ctrl', 'export', ...c, '--ctrl', String(cntlid), '--socket', socket]);
  return { name, server, control, socket };
}

interface HopResult {
  figures: { totalMs: number; vmDowntimeMs: number; devices: { quiesceMs: number; stateBytes: number; dmaWriteBytes: number }[] };
  roundsBefore: number;
}

/** Runs the VM on A, migrates it HOPS times between A and B, then stops the workload. */
async function migrateBackAndForth(hops: number, interrupts: 'msix' | 'msi'): Promise<{ lines: string[]; hops: HopResult[]; disk: string; sides: Side[] }> {
  const disk = join(dir, `disk-${interrupts}.img`);
  const extra = interrupts === 'msi' ? ['--interrupts', 'msi'] : [];
  const a = await side('a', 1, disk, extra);
  const b = await side('b', 2, disk, extra);
  const stopMarker = `NVU-STOP-${interrupts}`;
  const script = workload(stopMarker);
  const lines: string[] = [];
  const results: HopResult[] = [];
  let vm = await Vm.start({ name: 'vm-a0', script, vfioUserSockets: [a.socket], memMiB: 384 });
  vm.onLine((l) => lines.push(l));
  let here = a;
  try {
    for (let hop = 0; hop < hops; hop++) {
      const there = here === a ? b : a;
      // Migrate while a round of verified I/O runs: wait for the round after the last one seen.
      const rounds = lines.filter((l) => /^round\.\d+=/.test(l)).length;
      await vm.waitForLine(/^round\.\d+=/, 240_000, vm.lines.length);
      await new Promise((r) => setTimeout(r, 1500 + Math.random() * 2000)); // into the next round
      const port = await freePort();
      const target = await Vm.start({ name: `vm-${there.name}${hop + 1}`, script, vfioUserSockets: [there.socket], memMiB: 384, incoming: true });
      const run = await runCli([
        'migrate',
        '--source-qmp', `unix:${vm.qmpPath}`,
        '--source-control', here.control,
        '--target-qmp', `unix:${target.qmpPath}`,
        '--target-control', there.control,
        '--uri', `tcp:127.0.0.1:${port}`,
        '--json',
      ], { timeoutMs: 240_000 });
      if (run.code !== 0) {
        await target.kill();
        throw new Error(`hop ${hop + 1} failed (${run.code}): ${run.stderr}\n${here.server.log()}\n${there.server.log()}`);
      }
      results.push({ figures: JSON.parse(run.stdout) as HopResult['figures'], roundsBefore: rounds });
      console.error(`[e2e migration ${interrupts}] hop ${hop + 1}: ${run.stderr.split('\n').filter((l) => l.includes('downtime')).join(' ')}`);
      target.onLine((l) => lines.push(l));
      // The source QEMU stays in postmigrate: end it, so its server's socket can take the next VM.
      await vm.kill();
      vm = target;
      here = there;
    }
    await vm.waitForLine(/^round\.\d+=/, 240_000, vm.lines.length);
    const fd = openSync(disk, 'r+');
    try {
      const { writeSync } = await import('node:fs');
      writeSync(fd, Buffer.from(stopMarker), 0, stopMarker.length, DISK_MIB * 1024 * 1024 - 4096);
    } finally {
      closeSync(fd);
    }
    await vm.waitForLine(/@@NVTEST-EXIT/, 240_000);
    await vm.exited;
    return { lines, hops: results, disk, sides: [a, b] };
  } finally {
    await vm.kill();
  }
}

function readRange(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const out = Buffer.alloc(length);
    readSync(fd, out, 0, length, offset);
    return out;
  } finally {
    closeSync(fd);
  }
}

for (const interrupts of ['msix', 'msi'] as const) {
  describe(`a VM with ${interrupts === 'msix' ? 'MSI-X' : 'MSI'} migrates back and forth ${interrupts === 'msix' ? HOPS : 2} times mid-I/O`, () => {
    let result: Awaited<ReturnType<typeof migrateBackAndForth>>;
    let f: Map<string, string>;
    let rounds: { rc: string; errors: string; irqs: number }[];

    beforeAll(async () => {
      result = await migrateBackAndForth(interrupts === 'msix' ? HOPS : 2, interrupts);
      const output = result.lines.join('\n');
      f = fields(output);
      rounds = [...output.matchAll(/^round\.\d+=(\d+),(\d*),(\d+)$/gm)].map((m) => ({ rc: m[1]!, errors: m[2]!, irqs: Number(m[3]) }));
      console.error(`[e2e migration ${interrupts}] rounds: ${rounds.map((r) => `${r.rc}/${r.errors}/${r.irqs}`).join(' ')}`);
      for (const s of result.sides) await s.server.stop();
    }, 1_500_000);

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

    it('the kernel logged no nvme timeout, reset or I/O error', () => {
      expect(f.get('kernel.nvme_trouble')).toBe('0');
      expect(result.lines.join('\n')).not.toMatch(/nvme nvme\d+: (I\/O .*timeout|controller is down|resetting)/);
    });

    it('the shared backing file holds what the guest wrote last', () => {
      expect(f.get('pattern.rc')).toBe('0');
      const sha = createHash('sha256').update(readRange(result.disk, 1024 * 64 * 1024, 32 * 64 * 1024)).digest('hex');
      expect(sha).toBe(f.get('pattern.sha'));
    });
  });
}

describe('a migration that fails before the destination runs never loses the VM', () => {
  it('destination QEMU killed mid-migration, orchestrator killed at pre-switchover (then migrate recover), destination refusing the state: the VM keeps running on the source, verified', async () => {
    const disk = join(dir, 'disk-abort.img');
    const a = await side('a', 1, disk, []);
    const b = await side('b', 2, disk, []);
    const stopMarker = 'NVU-STOP-ABORT';
    const script = workload(stopMarker);
    const vm = await Vm.start({ name: 'vm-abort', script, vfioUserSockets: [a.socket], memMiB: 384 });
    const attempt = async (what: string, onLine: (line: string, target: Vm, orchestrator: import('node:child_process').ChildProcess) => void) => {
      await vm.waitForLine(/^round\.\d+=/, 240_000, vm.lines.length);
      await new Promise((r) => setTimeout(r, 1500));
      const target = await Vm.start({ name: `target-${what}`, script, vfioUserSockets: [b.socket], memMiB: 384, incoming: true });
      const port = await freePort();
      const run = await runCli(
        ['migrate', '--source-qmp', `unix:${vm.qmpPath}`, '--source-control', a.control, '--target-qmp', `unix:${target.qmpPath}`, '--target-control', b.control, '--uri', `tcp:127.0.0.1:${port}`],
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
      //    controller suspended, until `migrate recover`.
      const dead = await attempt('orchestrator killed', (line, _target, orchestrator) => {
        // Dead after the suspend, with the VM paused at pre-switchover: the hardest state to leave.
        if (/controller \d+: suspended in/.test(line)) orchestrator.kill('SIGKILL');
      });
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
      const c = ['--control', b.control];
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
      const fd = openSync(disk, 'r+');
      try {
        const { writeSync } = await import('node:fs');
        writeSync(fd, Buffer.from(stopMarker), 0, stopMarker.length, DISK_MIB * 1024 * 1024 - 4096);
      } finally {
        closeSync(fd);
      }
      await vm.waitForLine(/@@NVTEST-EXIT 0@@/, 240_000);
      const output = vm.lines.join('\n');
      const rounds = [...output.matchAll(/^round\.\d+=(\d+),(\d*),\d+$/gm)].map((m) => [m[1], m[2]]);
      expect(rounds.length).toBeGreaterThan(roundsAfter);
      for (const r of rounds) expect(r).toEqual(['0', '0']);
      expect(fields(output).get('kernel.nvme_trouble')).toBe('0');
      const sha = createHash('sha256').update(readRange(disk, 1024 * 64 * 1024, 32 * 64 * 1024)).digest('hex');
      expect(sha).toBe(fields(output).get('pattern.sha'));
    } finally {
      await vm.kill();
      await a.server.stop();
      await b.server.stop();
    }
  }, 900_000);
});
