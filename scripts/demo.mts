// `npm run demo`: live migration, as a user would run it. Two servers (two "hosts") on one backing
// file each provision the same virtual NVMe controller with the CLI; a VM (QEMU 11 + Debian
// kernel, installed into ~/.cache/nvme-vfio-user on first use) boots on the first and runs
// verified I/O; `nvme-vfio-user migrate` moves it to the second QEMU and back, mid-I/O, and prints
// the figures. `npm run demo -- --basic` instead shows one guest's view of a plain controller.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runGuest } from '../test/e2e/guest.js';
import { Vm } from '../test/e2e/vm.js';
import { side, stopWorkload, workload, type Side } from '../test/e2e/migration-scenario.js';
import { fields } from '../test/e2e/shell.js';
import { runCli } from '../test/support/cli.js';
import { freePort, startServerProcess } from '../test/support/server-process.js';

const BASIC_SCRIPT = `
set -e
for i in $(seq 1 100); do [ -b /dev/nvme0n2 ] && break; sleep 0.1; done
echo "== lspci"; lspci -nn | grep -i 4e56
echo "== nvme list"; nvme list
echo "== nvme id-ctrl (excerpt)"; nvme id-ctrl /dev/nvme0 | grep -E '^(vid|sn|mn|fr|mdts|ver|oacs|subnqn) '
echo "== nvme smart-log (excerpt)"; nvme smart-log /dev/nvme0 | grep -iE 'temperature|data.units|host_'
echo "== fio: 4k random write+verify, QD16"
fio --name=demo --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \\
    --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=normal | grep -E 'IOPS|err='
echo "== interrupts"; grep nvme /proc/interrupts
`;

async function basic(dir: string): Promise<void> {
  const server = await startServerProcess(join(dir, 'ctrl0.sock'), ['--namespace', `file=${join(dir, 'disk.img')},size=1G`, '--namespace', 'ram,size=256M,lbads=4096']);
  console.log(`server listening on ${server.socketPath}; booting the guest (a few seconds under TCG)…`);
  const run = await runGuest({ script: BASIC_SCRIPT, vfioUserSockets: [server.socketPath], timeoutMs: 300_000 });
  console.log(run.scriptOutput);
  console.log(`\nguest ${run.exitCode === 0 ? 'finished' : `FAILED (exit ${run.exitCode})`} under ${run.accel}: booted in ${run.bootMs} ms, ran for ${run.durationMs} ms`);
  await server.stop();
  if (run.exitCode !== 0) process.exitCode = 1;
}

async function migration(dir: string): Promise<void> {
  const disk = join(dir, 'shared.img');
  console.log('== two servers ("hosts" a and b) on one backing file; each provisions the same virtual controller:');
  console.log('   vsubsys create, vsubsys add --vcid 1, ctrl assign --vq 3 --vi 3, ctrl online, ctrl export');
  const a = await side(dir, 'a', 1, disk, []);
  const b = await side(dir, 'b', 2, disk, []);
  const marker = 'NVU-DEMO-STOP';
  const script = workload(marker);
  console.log('== booting the VM on a; it runs rounds of fio random writes with crc32c verification');
  let vm = await Vm.start({ name: 'demo-a', script, vfioUserSockets: [a.socket], memMiB: 384 });
  const lines: string[] = [];
  vm.onLine((l) => lines.push(l));
  let here: Side = a;
  try {
    await vm.waitForLine(/^round\.0=/, 300_000);
    for (const hop of [1, 2]) {
      const there = here === a ? b : a;
      await new Promise((r) => setTimeout(r, 2000)); // mid-round
      const target = await Vm.start({ name: `demo-${there.name}`, script, vfioUserSockets: [there.socket], memMiB: 384, incoming: true });
      const port = await freePort();
      const args = ['migrate', '--source-qmp', `unix:${vm.qmpPath}`, '--source-control', here.control, '--target-qmp', `unix:${target.qmpPath}`, '--target-control', there.control, '--uri', `tcp:127.0.0.1:${port}`];
      console.log(`\n== hop ${hop}: nvme-vfio-user ${args.join(' ')}`);
      const run = await runCli(args, { timeoutMs: 300_000, onStderrLine: (line) => console.log(`   ${line}`) });
      console.log(run.stdout.trimEnd());
      if (run.code !== 0) throw new Error(`migration failed (exit ${run.code})`);
      target.onLine((l) => lines.push(l));
      await vm.kill();
      vm = target;
      here = there;
      await vm.waitForLine(/^round\.\d+=/, 300_000, vm.lines.length);
    }
    stopWorkload(disk, marker);
    await vm.waitForLine(/@@NVTEST-EXIT/, 300_000);
    const output = lines.join('\n');
    const rounds = [...output.matchAll(/^round\.(\d+)=(\d+),(\d*),(\d+)$/gm)];
    console.log('\n== what the guest saw (round: fio exit code, verify errors, nvme interrupts so far)');
    for (const r of rounds) console.log(`   round ${r[1]}: rc ${r[2]}, errors ${r[3] || 0}, interrupts ${r[4]}`);
    const f = fields(output);
    console.log(`   kernel nvme timeouts/resets/I/O errors: ${f.get('kernel.nvme_trouble')}`);
    const clean = rounds.every((r) => r[2] === '0' && (r[3] ?? '0') === '0') && f.get('kernel.nvme_trouble') === '0';
    console.log(clean ? '\nthe VM moved a -> b -> a mid-I/O and lost nothing.' : '\nSOMETHING WENT WRONG: see above.');
    if (!clean) process.exitCode = 1;
  } finally {
    await vm.kill();
    await a.server.stop();
    await b.server.stop();
  }
}

const dir = mkdtempSync(join(tmpdir(), 'nvme-vfio-user-demo-'));
try {
  if (process.argv.includes('--basic')) await basic(dir);
  else await migration(dir);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
