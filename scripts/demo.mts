// `npm run demo`: serves an NVMe subsystem (two namespaces), boots the test guest (QEMU 11 + Debian
// kernel, installed into ~/.cache/nvme-vfio-user on first use) against it, and shows what the
// guest's own tools see. Extra arguments are passed to `serve`.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runGuest } from '../test/e2e/guest.js';
import { startServerProcess } from '../test/support/server-process.js';

const GUEST_SCRIPT = `
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

const dir = mkdtempSync(join(tmpdir(), 'nvme-vfio-user-demo-'));
try {
  const server = await startServerProcess(join(dir, 'ctrl0.sock'), [
    '--namespace', `file=${join(dir, 'disk.img')},size=1G`,
    '--namespace', 'ram,size=256M,lbads=4096',
    ...process.argv.slice(2),
  ]);
  console.log(`server listening on ${server.socketPath}; booting the guest (a few seconds under TCG)…`);
  const run = await runGuest({ script: GUEST_SCRIPT, vfioUserSockets: [server.socketPath], timeoutMs: 300_000 });
  console.log(run.scriptOutput);
  console.log(`\nguest ${run.exitCode === 0 ? 'finished' : `FAILED (exit ${run.exitCode})`} under ${run.accel}: booted in ${run.bootMs} ms, ran for ${run.durationMs} ms`);
  await server.stop();
  if (run.exitCode !== 0) {
    console.error(run.output);
    process.exitCode = 1;
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
