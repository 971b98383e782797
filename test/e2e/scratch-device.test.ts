// Real QEMU 11 + a real Linux guest against our server: QEMU realizes the device from our socket,
// the guest enumerates it, and its BAR reads and writes reach the server process.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureHarness, runGuest, type GuestRun } from './guest.js';
import { startServerProcess, type ServerProcess } from '../support/server-process.js';
import { SCRATCH_DEVICE_ID, SCRATCH_MAGIC, SCRATCH_VENDOR_ID, ScratchReg } from '../../src/pci/scratch-device.js';

const hex = (n: number, width = 4): string => `0x${n.toString(16).padStart(width, '0')}`;

// Runs in the guest: find our function in sysfs, enable it, poke BAR0 with devmem.
const GUEST_SCRIPT = `
set -e
dev=""
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = "${hex(SCRATCH_VENDOR_ID)}" ] && [ "$(cat $d/device)" = "${hex(SCRATCH_DEVICE_ID)}" ]; then dev=$d; fi
done
[ -n "$dev" ] || { echo "device not found"; lspci -nn || true; exit 3; }
echo "found=$(basename $dev)"
echo "class=$(cat $dev/class)"
echo "lspci=$(lspci -nn | grep -i "${SCRATCH_VENDOR_ID.toString(16)}:${SCRATCH_DEVICE_ID.toString(16).padStart(4, '0')}" | tr ' ' '_')"
echo 1 > $dev/enable
bar0=$(head -n1 $dev/resource | cut -d' ' -f1)
echo "bar0=$bar0"
b=$(printf '%d' $bar0)
echo "magic=$(devmem $(printf '0x%x' $((b + ${ScratchReg.MAGIC}))) 32)"
devmem $(printf '0x%x' $((b + ${ScratchReg.SCRATCH32}))) 32 0xcafef00d
echo "scratch32=$(devmem $(printf '0x%x' $((b + ${ScratchReg.SCRATCH32}))) 32)"
devmem $(printf '0x%x' $((b + ${ScratchReg.SCRATCH64}))) 64 0x0123456789abcdef
echo "scratch64=$(devmem $(printf '0x%x' $((b + ${ScratchReg.SCRATCH64}))) 64)"
echo "writes=$(devmem $(printf '0x%x' $((b + ${ScratchReg.WRITE_COUNT}))) 32)"
`;

let dir: string;
let server: ServerProcess;
let run: GuestRun;

beforeAll(async () => {
  ensureHarness(); // fails loudly (with the reason) when QEMU or the guest cannot be installed
  dir = mkdtempSync(join(tmpdir(), 'nvu-e2e-'));
  server = await startServerProcess(join(dir, 'scratch.sock'), ['--device', 'scratch']);
  run = await runGuest({ script: GUEST_SCRIPT, vfioUserSockets: [server.socketPath], timeoutMs: 240_000 });
  console.error(`[e2e] accel=${run.accel} boot=${run.bootMs} ms total=${run.durationMs} ms`);
}, 300_000);

afterAll(async () => {
  await server?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const field = (name: string): string | undefined => run.scriptOutput.match(new RegExp(`^${name}=(\\S+)`, 'm'))?.[1];

describe('scratch device in a real QEMU 11 guest', () => {
  it('boots and runs the guest script to completion', () => {
    if (run.exitCode !== 0) console.error(run.output, '\n--- server log ---\n', server.log());
    expect(run.exitCode).toBe(0);
  });

  it('shows our vendor, device and class in the guest', () => {
    expect(field('found')).toMatch(/^0000:00:/);
    expect(field('class')).toBe('0xff0000');
    expect(field('lspci')).toMatch(new RegExp(`1b36:00ff`, 'i'));
  });

  it('serves guest BAR reads and writes from the server', () => {
    expect(Number(field('magic'))).toBe(SCRATCH_MAGIC);
    expect(Number(field('scratch32'))).toBe(0xcafef00d);
    expect(BigInt(field('scratch64')!)).toBe(0x0123456789abcdefn);
    // Two guest writes reached the server (its own counter says so).
    expect(Number(field('writes'))).toBe(2);
  });

  it('kept serving QEMU without protocol errors', () => {
    expect(server.alive()).toBe(true);
    expect(server.log()).not.toMatch(/unusable|error /);
    expect(run.qemuStderr).not.toMatch(/vfio-user.*(error|failed)/i);
  });
});
