// kill -9 of a real QEMU while its guest reads 1 MiB blocks at queue depth 32 from our controller:
// the server process lives on, and a new QEMU on the same socket gets a controller whose guest
// reads back what the first guest had written and flushed before it died.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureHarness, runGuest } from './guest.js';
import { startServerProcess, type ServerProcess } from '../support/server-process.js';

const MiB = 1 << 20;
/** Where the first guest writes its pattern (MiB into the namespace), outside what fio reads. */
const PATTERN_AT_MIB = 96;
const PATTERN_MIB = 4;
/** Reads the block layer must have in flight on our device before QEMU is killed. */
const MIN_IN_FLIGHT = 16;

const WAIT_DISK = `for i in $(seq 1 200); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done; [ -b /dev/nvme0n1 ] || { dmesg | grep -i nvme; exit 10; }`;

let dir: string;
let server: ServerProcess;
const disk = (): string => join(dir, 'killed.img');

beforeAll(async () => {
  ensureHarness();
  dir = mkdtempSync(join(tmpdir(), 'nvu-e2e-kill-'));
  server = await startServerProcess(join(dir, 'kill.sock'), ['--namespace', `file=${disk()},size=256M`]);
});

afterAll(async () => {
  if (server) await server.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function fileSha(path: string, offset: number, length: number): string {
  const fd = openSync(path, 'r');
  try {
    const data = Buffer.alloc(length);
    readSync(fd, data, 0, length, offset);
    return createHash('sha256').update(data).digest('hex');
  } finally {
    closeSync(fd);
  }
}

describe('kill -9 of QEMU under 1 MiB reads at depth 32', () => {
  it('leaves the server serving, and the next QEMU on the socket reads back what was flushed', async () => {
    // First guest: a known pattern, written and flushed; then fio until QEMU dies under it.
    const first = `${WAIT_DISK}
dd if=/dev/urandom of=/tmp/p bs=1M count=${PATTERN_MIB} 2>/dev/null
echo pattern.sha=$(sha256sum /tmp/p | cut -d' ' -f1)
dd if=/tmp/p of=/dev/nvme0n1 bs=1M seek=${PATTERN_AT_MIB} oflag=direct conv=fsync 2>/dev/null || exit 11
nvme flush /dev/nvme0n1 || exit 12
echo pattern.flushed=yes
fio --name=doomed --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --rw=randread --bs=1m --iodepth=32 \\
    --size=64M --time_based --runtime=600 > /tmp/fio.out 2>&1 &
i=0; n=0
while [ $i -lt 1200 ]; do
  n=$(awk '{print $1}' /sys/block/nvme0n1/inflight)
  [ "$n" -ge ${MIN_IN_FLIGHT} ] && break
  i=$((i+1)); sleep 0.05
done
echo fio.inflight=$n
sleep 600
`;
    const kill = new AbortController();
    let inFlightAtKill = -1;
    const doomed = await runGuest({
      script: first,
      vfioUserSockets: [server.socketPath],
      timeoutMs: 300_000,
      kill: kill.signal,
      onSerialLine: (line) => {
        const m = /fio\.inflight=(\d+)/.exec(line);
        if (!m) return;
        inFlightAtKill = Number(m[1]);
        kill.abort();
      },
    });
    const flushedSha = /pattern\.sha=([0-9a-f]{64})/.exec(doomed.output)?.[1];
    console.error(`[e2e kill] accel=${doomed.accel} boot=${doomed.bootMs} ms, killed with ${inFlightAtKill} reads in flight after ${doomed.durationMs} ms`);
    if (inFlightAtKill < MIN_IN_FLIGHT) console.error(doomed.output, '\n--- server log ---\n', server.log());
    expect(doomed.output).toMatch(/pattern\.flushed=yes/);
    expect(inFlightAtKill).toBeGreaterThanOrEqual(MIN_IN_FLIGHT);
    expect({ timedOut: doomed.timedOut, qemuExitCode: doomed.qemuExitCode }).toEqual({ timedOut: false, qemuExitCode: null });
    expect(server.alive()).toBe(true);
    // What was flushed is in the backing file.
    expect(fileSha(disk(), PATTERN_AT_MIB * MiB, PATTERN_MIB * MiB)).toBe(flushedSha);

    // A new QEMU on the same socket: its guest resets the controller and reads the pattern back.
    const second = `${WAIT_DISK}
dd if=/dev/nvme0n1 bs=1M skip=${PATTERN_AT_MIB} count=${PATTERN_MIB} iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1 | sed 's/^/readback.sha=/'
`;
    const next = await runGuest({ script: second, vfioUserSockets: [server.socketPath], timeoutMs: 240_000 });
    console.error(`[e2e kill] second guest: boot=${next.bootMs} ms total=${next.durationMs} ms`);
    if (next.exitCode !== 0) console.error(next.output, '\n--- server log ---\n', server.log());
    expect(next.exitCode).toBe(0);
    expect(/readback\.sha=([0-9a-f]{64})/.exec(next.scriptOutput)?.[1]).toBe(flushedSha);
    expect(next.output).not.toMatch(/nvme nvme\d+: (I\/O .* timeout|controller is down|Device not ready|Removing after probe failure)/);
    expect(server.alive()).toBe(true);
    expect(server.log()).not.toMatch(/BUG|TypeError|RangeError|ReferenceError|failed unexpectedly/);
    expect(server.log()).toMatch(/client gone/);
    expect(await server.stop()).toBe(0);
  }, 600_000);
});
