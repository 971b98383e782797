// The live-migration scenario the end-to-end test and `npm run demo` share: two servers on one
// backing file with the same virtual controller provisioned and exported, and a guest workload
// of verified I/O rounds that runs until the host writes a stop marker into the namespace.

import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { HELPERS } from './shell.js';
import { startServe, type Served } from '../support/serve.js';
import { cli } from '../support/cli.js';
import type { FileCache } from '../../src/nvme/backend.js';

export const VNQN = 'nqn.2026-11.io.example:migrating-vm';
export const DISK_MIB = 128;

/** Tells the guest's workload to finish: the marker goes into the namespace's last block. */
export function stopWorkload(disk: string, marker: string): void {
  const fd = openSync(disk, 'r+');
  try {
    writeSync(fd, Buffer.from(marker), 0, marker.length, DISK_MIB * 1024 * 1024 - 4096);
  } finally {
    closeSync(fd);
  }
}

/**
 * The guest: rounds of fio random writes with crc32c verification until told to stop by the
 * host (a marker in the namespace's last block), each round printing its result and the nvme
 * interrupt count; then a pattern whose checksum the host compares with the backing file.
 */
export function workload(stopMarker: string, disk: 'nvme' | 'virtio' = 'nvme'): string {
  const find = disk === 'nvme' ? 'd=$(wait_dev 1) || exit 10' : 'd=/dev/vda; [ -b $d ] || exit 10';
  const irqs = disk === 'nvme' ? 'nvme[0-9]q[1-9]' : 'virtio[0-9]-req';
  return `${HELPERS}
${find}
irqs() { grep -E '${irqs}' /proc/interrupts | awk '{s+=$2+$3} END {print s+0}'; }
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

export interface Side {
  name: 'a' | 'b';
  server: Served;
  /** How the orchestrator and the CLI reach its control socket (with the token on TCP). */
  control: string;
  controlArgs: string[];
  socket: string;
  placement: Placement | undefined;
}

/** Another "host": a network namespace with an address the orchestrator reaches and one the peer reaches. */
export interface Placement {
  netns: string;
  /** Where its control socket and QEMU's QMP listen (reached from the orchestrator's namespace). */
  managementAddress: string;
  /** Where its QEMU listens for an incoming migration (reached from the other host). */
  migrationAddress: string;
}

/** `cache`: the namespace's cache= (absent: the default, writeback). */
export async function side(dir: string, name: 'a' | 'b', cntlid: number, disk: string, extra: string[], placement?: Placement, cache?: FileCache): Promise<Side> {
  const control = placement ? `tcp:${placement.managementAddress}:${7000 + cntlid}` : join(dir, `${name}-control.sock`);
  const socket = join(dir, `${name}-vm.sock`);
  const tokenFile = join(dir, 'control.token');
  if (placement && !existsSync(tokenFile)) writeFileSync(tokenFile, `${randomBytes(24).toString('hex')}\n`, { mode: 0o600 });
  const controlArgs = ['--control', control, ...(placement ? ['--control-token', tokenFile] : [])];
  const server = await startServe(['--secondaries', '2', ...controlArgs, '--namespace', `file=${disk},size=${DISK_MIB}M${cache ? `,cache=${cache}` : ''}`, ...extra], 'control on ', 15_000, placement?.netns);
  await cli(['vsubsys', 'create', ...controlArgs, '--virtual-nqn', VNQN]);
  await cli(['vsubsys', 'add', ...controlArgs, '--virtual-nqn', VNQN, '--ctrl', String(cntlid), '--vcid', '1']);
  await cli(['ctrl', 'assign', ...controlArgs, '--ctrl', String(cntlid), '--vq', '3', '--vi', '3']);
  await cli(['ctrl', 'online', ...controlArgs, '--ctrl', String(cntlid)]);
  await cli(['ctrl', 'export', ...controlArgs, '--ctrl', String(cntlid), '--socket', socket]);
  return { name, server, control, controlArgs, socket, placement };
}

