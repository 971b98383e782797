// The controlling function with real QEMU 11 guests: a management VM with the primary controller
// provisions a secondary with stock nvme-cli (primary-ctrl-caps, list-secondary, virt-mgmt and the
// vendor virtual-subsystem commands through admin-passthru); a second VM boots with that secondary,
// exported only once provisioned, sees the virtual identity and verifies data; taking the secondary
// offline fails its I/O (it does not hang) and bringing it back online with a controller reset in
// the guest returns the data intact. Then the same provisioning from the host through the CLI.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureHarness, runGuest, type GuestRun } from './guest.js';
import { Vm } from './vm.js';
import { startServe, type Served } from '../support/serve.js';
import { cli } from '../support/cli.js';
import { fields, HELPERS } from './shell.js';

const VNQN = 'nqn.2026-11.io.example:vm-b';
let dir: string;

beforeAll(() => {
  ensureHarness();
  dir = mkdtempSync(join(tmpdir(), 'nvu-e2e-cf-'));
});

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const MANAGEMENT_SCRIPT = `${HELPERS}
p=/dev/nvme0
nvme primary-ctrl-caps $p -o json > /tmp/caps.json; echo caps.rc=$?
for k in cntlid crt vqfrt vqrfa vqprt vqfrsm vifrt virfa viprt vifrsm; do echo caps.$k=$(json /tmp/caps.json $k); done
nvme list-secondary $p -o json > /tmp/sec.json; echo list.rc=$?
echo list.num=$(json /tmp/sec.json num)
# nvme-cli 2.13 mis-parses -c after -r/-a: give the controller first.
nvme virt-mgmt $p -c 1 -r 0 -a 8 -n 3; echo assign.vq.rc=$?
nvme virt-mgmt $p -c 1 -r 1 -a 8 -n 2; echo assign.vi.rc=$?
printf '%s' '${VNQN}' > /tmp/def.bin; truncate -s 1024 /tmp/def.bin
nvme admin-passthru $p --opcode=0xc1 --data-len=1024 --write --input-file=/tmp/def.bin > /dev/null; echo vsubsys.create.rc=$?
nvme admin-passthru $p --opcode=0xc5 --cdw10=1 --cdw11=7 --data-len=1024 --write --input-file=/tmp/def.bin > /tmp/add.out; echo vsubsys.add.rc=$?
nvme admin-passthru $p --opcode=0xc2 --cdw10=0 --data-len=4096 --read -b > /tmp/list.bin; echo vsubsys.list.rc=$?
echo vsubsys.list.nqn=$(dd if=/tmp/list.bin bs=1 count=27 2>/dev/null)
nvme virt-mgmt $p -c 1 -a 9; echo online.rc=$?
nvme list-secondary $p -o json > /tmp/sec2.json
echo online.state=$(grep -m1 -A3 '"secondary-controller-identifier":1' /tmp/sec2.json | grep state | tr -dc '0-9')
echo @@PROVISIONED@@
# Keep the primary enabled while the other VM uses its secondary; the test ends this VM.
sleep 900
`;

/** The user VM: virtual identity, verified I/O, then the offline/online dance driven by the host. */
const USER_SCRIPT = `${HELPERS}
d=$(wait_dev 1) || exit 10
nvme id-ctrl /dev/nvme0 -o json > /tmp/ctrl.json
echo id.subnqn=$(json /tmp/ctrl.json subnqn)
echo id.cntlid=$(json /tmp/ctrl.json cntlid)
echo id.sn=$(json /tmp/ctrl.json sn)
fio --name=v --filename=$d --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1; echo fio.rc=$?
echo fio.errors=$(grep '^3;' /tmp/fio.out | cut -d';' -f5)
dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null
dd if=/tmp/pattern of=$d bs=64k seek=512 oflag=direct conv=fsync 2>/dev/null; echo pattern.rc=$?
want=$(sha256sum /tmp/pattern | cut -d' ' -f1)
bdf=$(basename $(readlink -f /sys/class/nvme/nvme0/device))
bar0=$(head -n1 /sys/bus/pci/devices/$bdf/resource | cut -d' ' -f1)
echo @@OFFLINE-NOW@@
t0=$(date +%s)
# Reads go on until one fails: the secondary is offline under us.
while dd if=$d of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; do
  [ $(( $(date +%s) - t0 )) -gt 120 ] && break
  sleep 0.2
done
echo offline.io_failed_after=$(( $(date +%s) - t0 ))
c=$(ls /sys/bus/pci/devices/$bdf/nvme 2>/dev/null | head -n1)
echo offline.driver_state=$(cat /sys/class/nvme/$c/state 2>/dev/null || echo unbound)
# Linux gave up on the controller; release it so the BAR can be read from here (the driver owns it).
[ -e /sys/bus/pci/devices/$bdf/driver ] && echo $bdf > /sys/bus/pci/drivers/nvme/unbind
csts() { devmem $((bar0 + 0x1c)) 32; }
echo offline.csts=$(csts)
echo @@ERRORS-SEEN@@
# Wait until the host brought it back online: CSTS.CFS clears.
i=0; while [ $(( $(csts) & 2 )) -ne 0 ]; do i=$((i+1)); [ $i -gt 600 ] && break; sleep 0.2; done
echo online.csts=$(csts)
# Probing the function again resets the controller and brings the namespace back.
echo $bdf > /sys/bus/pci/drivers/nvme/bind; echo recover=rebind
d=$(wait_dev 1) || exit 11
got=$(dd if=$d bs=64k skip=512 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] && echo data.intact=yes || echo data.intact=no
`;

async function provisionedByGuest(server: Served, control: string, secondarySocket: string): Promise<{ mgmt: Map<string, string>; user: GuestRun }> {
  const mgmtVm = await Vm.start({ name: 'mgmt', script: MANAGEMENT_SCRIPT, vfioUserSockets: [join(dir, 'primary.sock')], memMiB: 384 });
  try {
    await mgmtVm.waitForLine(/@@PROVISIONED@@/, 240_000);
    const mgmt = fields(mgmtVm.markers().scriptOutput);
    console.error(`[e2e cf] management VM (${mgmtVm.accel}):\n${mgmtVm.markers().scriptOutput}`);
    // Exported only now that it is provisioned.
    await cli(['ctrl', 'export', '--control', control, '--ctrl', '1', '--socket', secondarySocket]);
    const host: Promise<unknown>[] = [];
    const user = await runGuest({
      script: USER_SCRIPT,
      vfioUserSockets: [secondarySocket],
      memMiB: 384,
      timeoutMs: 360_000,
      extraKernelArgs: ['nvme_core.io_timeout=5', 'nvme_core.admin_timeout=5'],
      onSerialLine: (line) => {
        if (line.includes('@@OFFLINE-NOW@@')) host.push(cli(['ctrl', 'offline', '--control', control, '--ctrl', '1']));
        if (line.includes('@@ERRORS-SEEN@@')) {
          host.push(
            (async () => {
              await cli(['ctrl', 'assign', '--control', control, '--ctrl', '1', '--vq', '3', '--vi', '2']);
              await cli(['ctrl', 'online', '--control', control, '--ctrl', '1']);
            })(),
          );
        }
      },
    });
    await Promise.all(host);
    console.error(`[e2e cf] user VM (${user.accel}):\n${user.scriptOutput}`);
    if (user.exitCode !== 0) console.error(user.output, '\n--- server log ---\n', server.log());
    return { mgmt, user };
  } finally {
    await mgmtVm.kill();
  }
}

describe('a management VM provisions a secondary with nvme-cli; another VM uses it', () => {
  let server: Served;
  let result: { mgmt: Map<string, string>; user: GuestRun };
  let u: Map<string, string>;
  const control = () => join(dir, 'control.sock');

  beforeAll(async () => {
    server = await startServe(
      ['--secondaries', '2', '--primary-socket', join(dir, 'primary.sock'), '--control', control(), '--namespace', `file=${join(dir, 'disk.img')},size=64M`],
      `control on ${control()}`,
    );
    result = await provisionedByGuest(server, control(), join(dir, 'vm-b.sock'));
    u = fields(result.user.scriptOutput);
  }, 700_000);

  afterAll(async () => {
    await server?.stop();
  });

  it('nvme-cli on the primary sees its capabilities and secondaries, and provisions one', () => {
    const m = result.mgmt;
    expect(m.get('caps.rc')).toBe('0');
    expect(m.get('caps.cntlid')).toBe('0');
    expect(m.get('caps.crt')).toMatch(/^(3|0x3)$/);
    expect(Number(m.get('caps.vqfrt'))).toBeGreaterThan(0);
    expect(Number(m.get('caps.vifrt'))).toBeGreaterThan(0);
    expect(m.get('list.num')).toBe('2');
    expect([m.get('assign.vq.rc'), m.get('assign.vi.rc')]).toEqual(['0', '0']);
    expect(m.get('vsubsys.create.rc')).toBe('0');
    expect(m.get('vsubsys.add.rc')).toBe('0');
    expect(m.get('vsubsys.list.rc')).toBe('0');
    expect(m.get('vsubsys.list.nqn')).toBe(VNQN);
    expect(m.get('online.rc')).toBe('0');
    expect(m.get('online.state')).toBe('1');
  });

  it('the second VM sees the virtual NQN and controller ID and verifies data', () => {
    expect(result.user.exitCode).toBe(0);
    expect(u.get('id.subnqn')).toBe(VNQN);
    expect(u.get('id.cntlid')).toBe('7');
    expect(u.get('id.sn')).toMatch(/^VS[0-9A-F]{18}$/);
    expect([u.get('fio.rc'), u.get('fio.errors')]).toEqual(['0', '0']);
  });

  it('offline fails the I/O with errors instead of hanging; online plus a reset brings the data back', () => {
    expect(Number(u.get('offline.io_failed_after'))).toBeLessThan(60);
    expect(Number(u.get('offline.csts')) & 2).toBe(2);
    expect(Number(u.get('online.csts')) & 2).toBe(0);
    expect(u.get('offline.driver_state')).toMatch(/^(dead|deleting|unbound)/);
    expect(u.get('recover')).toBe('rebind');
    expect(u.get('data.intact')).toBe('yes');
    expect(server.alive()).toBe(true);
  });
});

describe('the same provisioning from the host through the CLI', () => {
  it('gives the VM the same virtual identity and verified data', async () => {
    const control = join(dir, 'control2.sock');
    const socket = join(dir, 'vm-c.sock');
    const server = await startServe(['--secondaries', '2', '--control', control, '--namespace', `file=${join(dir, 'disk2.img')},size=64M`], `control on ${control}`);
    try {
      const c = ['--control', control];
      await expect(cli(['ctrl', 'export', ...c, '--ctrl', '1', '--socket', socket])).rejects.toThrow(/not provisioned/);
      await cli(['vsubsys', 'create', ...c, '--virtual-nqn', VNQN]);
      await cli(['vsubsys', 'add', ...c, '--virtual-nqn', VNQN, '--ctrl', '1', '--vcid', '7']);
      await cli(['ctrl', 'assign', ...c, '--ctrl', '1', '--vq', '3', '--vi', '2']);
      await cli(['ctrl', 'online', ...c, '--ctrl', '1']);
      await cli(['ctrl', 'export', ...c, '--ctrl', '1', '--socket', socket]);
      const run = await runGuest({
        script: `${HELPERS}
d=$(wait_dev 1) || exit 10
nvme id-ctrl /dev/nvme0 -o json > /tmp/ctrl.json
echo id.subnqn=$(json /tmp/ctrl.json subnqn)
echo id.cntlid=$(json /tmp/ctrl.json cntlid)
fio --name=v --filename=$d --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1; echo fio.rc=$?
`,
        vfioUserSockets: [socket],
        memMiB: 384,
        timeoutMs: 240_000,
      });
      const f = fields(run.scriptOutput);
      if (run.exitCode !== 0) console.error(run.output, server.log());
      expect(run.exitCode).toBe(0);
      expect(f.get('id.subnqn')).toBe(VNQN);
      expect(f.get('id.cntlid')).toBe('7');
      expect(f.get('fio.rc')).toBe('0');
      const list = JSON.parse(await cli(['list', ...c, '--json'])) as { controllers: { cntlid: number; online: boolean; virtualCntlid: number; socket: string }[] };
      expect(list.controllers.find((x) => x.cntlid === 1)).toMatchObject({ online: true, virtualCntlid: 7, socket });
    } finally {
      await server.stop();
    }
  }, 300_000);
});
