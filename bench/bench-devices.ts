// The block devices the guest benchmarks compare, and how each is put on QEMU's command line.
// Ours runs as a separate `serve` process (started by the caller); the others are QEMU's own.

import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { qemuBinary } from '../test/e2e/guest.js';
import { freshImage, qemuDeviceProperties } from './host-stats.js';
import type { FileCache } from '../src/nvme/backend.js';

export type DeviceKind = 'ours' | 'ours-poll' | 'ours-batch' | 'ours-mapped' | 'ours-mapped-batch' | 'qemu-nvme' | 'qemu-nvme-ioeventfd' | 'virtio-blk' | 'virtio-blk-iothread' | 'qemu-nvme-null';

/** The default order: ours first, then the baseline every ratio is taken against. */
export const ALL_DEVICES: readonly DeviceKind[] = ['ours', 'ours-poll', 'ours-batch', 'ours-mapped', 'ours-mapped-batch', 'qemu-nvme', 'qemu-nvme-ioeventfd', 'virtio-blk', 'virtio-blk-iothread', 'qemu-nvme-null'];

/** The poll window `ours-poll` serves with: longer than a TCG guest takes between two QD1 submissions. */
export const BENCH_POLL_US = 200;

/**
 * The batch period `ours-batch` serves with: 250 µs. Under TCG it measured 1.3-1.5x the 4k QD32
 * IOPS of a 1 ms period (whose ceiling, depth per period, was binding) at about the same host CPU;
 * 0.1 ms cost more server CPU per I/O, 0.5 ms was no better.
 */
export const BENCH_BATCH_MS = 0.25;

/** Our devices (a separate `serve` process; QEMU emulates the rest) and the flags each adds. */
const OUR_FLAGS: Partial<Record<DeviceKind, readonly string[]>> = {
  ours: [],
  'ours-poll': ['--poll-us', String(BENCH_POLL_US)],
  'ours-batch': ['--batch-ms', String(BENCH_BATCH_MS)],
  'ours-mapped': ['--doorbells', 'mapped'],
  'ours-mapped-batch': ['--doorbells', 'mapped', '--batch-ms', String(BENCH_BATCH_MS)],
};

export const isOurs = (kind: DeviceKind): boolean => OUR_FLAGS[kind] !== undefined;

/** `serve` arguments beyond the socket for one of our devices; `cache`: its namespace's cache= (omitted: the server's default, writeback). */
export function ourServeArgs(kind: DeviceKind, image: string, cache?: FileCache): string[] {
  // warn: per-command info logging would be measured as device overhead.
  return ['--namespace', `file=${image},size=1G${cache ? `,cache=${cache}` : ''}`, '--log-level', 'warn', ...(OUR_FLAGS[kind] ?? [])];
}

/** Every ratio in the reports is device / this one, measured in the same run. */
export const BASELINE: DeviceKind = 'qemu-nvme';

export interface DeviceSpec {
  label: string;
  /** Which block device the guest looks for. */
  guest: 'nvme' | 'virtio';
  /** How it is attached, for the report. */
  attach: string;
  /** `-device DRIVER` properties this device needs from QEMU. */
  needs: Array<{ driver: string; prop: string }>;
}

export const DEVICES: Record<DeviceKind, DeviceSpec> = {
  ours: {
    label: 'ours (vfio-user)',
    guest: 'nvme',
    attach: '`nvme-vfio-user serve --namespace file=/dev/shm/…,size=1G --log-level warn` (the real CLI), `-device vfio-user-pci`',
    needs: [],
  },
  'ours-poll': {
    label: 'ours, --poll-us 200',
    guest: 'nvme',
    attach: 'the same with `--poll-us 200`: busy, shallow SQs\' shadow tails polled, EventIdx keeping the guest from ringing',
    needs: [],
  },
  'ours-batch': {
    label: `ours, --batch-ms ${BENCH_BATCH_MS}`,
    guest: 'nvme',
    attach: `the same with \`--batch-ms ${BENCH_BATCH_MS}\`: a deep SQ's commands collected every ${BENCH_BATCH_MS * 1000} µs, EventIdx keeping the guest from ringing meanwhile`,
    needs: [],
  },
  'ours-mapped': {
    label: 'ours, --doorbells mapped',
    guest: 'nvme',
    attach: 'the same with `--doorbells mapped`: BAR0\'s doorbell pages mapped into the guest (sparse mmap), polled by the server (every loop turn for 1 ms after a doorbell moved, every ms otherwise)',
    needs: [],
  },
  'ours-mapped-batch': {
    label: `ours, --doorbells mapped --batch-ms ${BENCH_BATCH_MS}`,
    guest: 'nvme',
    attach: 'the same with both: shallow queues ring through the mapped page, deep ones are batched (their EventIdx held back, so the guest stores no doorbell meanwhile)',
    needs: [],
  },
  'qemu-nvme': {
    label: 'QEMU nvme',
    guest: 'nvme',
    attach: '`-device nvme,drive=d0,serial=bench,ioeventfd=off` (QEMU\'s default; shadow doorbells `dbcs=on` by default) on the image drive',
    needs: [{ driver: 'nvme', prop: 'ioeventfd' }],
  },
  'qemu-nvme-ioeventfd': {
    label: 'QEMU nvme ioeventfd',
    guest: 'nvme',
    attach: '`-device nvme,drive=d0,serial=bench,ioeventfd=on` on the image drive',
    needs: [{ driver: 'nvme', prop: 'ioeventfd' }],
  },
  'virtio-blk': {
    label: 'virtio-blk',
    guest: 'virtio',
    attach: '`-device virtio-blk-pci,drive=d0` on the image drive',
    needs: [],
  },
  'virtio-blk-iothread': {
    label: 'virtio-blk iothread',
    guest: 'virtio',
    attach: '`-object iothread,id=io0 -device virtio-blk-pci,drive=d0,iothread=io0` on the image drive',
    needs: [{ driver: 'virtio-blk-pci', prop: 'iothread' }],
  },
  'qemu-nvme-null': {
    label: 'QEMU nvme null-co',
    guest: 'nvme',
    attach: '`-drive driver=null-co,size=1G,read-zeroes=on -device nvme,ioeventfd=off`: no data is moved at all (reads return zeroes, writes are dropped), so this is the ceiling of the emulation alone, not a storage device',
    needs: [{ driver: 'nvme', prop: 'ioeventfd' }],
  },
};

export interface QemuDeviceOptions {
  /** The backing image (ignored by qemu-nvme-null). */
  image: string;
  aio: 'io_uring' | 'threads';
  /** `max_ioqpairs` of QEMU nvme (its default, 64, when undefined). */
  maxIoQpairs?: number;
  /** Unique suffix for the ids when several devices share one QEMU. */
  id?: string;
}

/** QEMU arguments that attach a QEMU-emulated device (none for ours: its server is separate). */
export function qemuDeviceArgs(kind: DeviceKind, o: QemuDeviceOptions): string[] {
  const id = `d${o.id ?? '0'}`;
  const drive = ['-drive', `file=${o.image},if=none,id=${id},format=raw,cache=none,aio=${o.aio}`];
  const qp = o.maxIoQpairs !== undefined ? `,max_ioqpairs=${o.maxIoQpairs}` : '';
  switch (kind) {
    case 'ours':
    case 'ours-poll':
    case 'ours-batch':
    case 'ours-mapped':
    case 'ours-mapped-batch':
      return [];
    case 'qemu-nvme':
      return [...drive, '-device', `nvme,drive=${id},serial=bench${id},ioeventfd=off${qp}`];
    case 'qemu-nvme-ioeventfd':
      return [...drive, '-device', `nvme,drive=${id},serial=bench${id},ioeventfd=on${qp}`];
    case 'virtio-blk':
      return [...drive, '-device', `virtio-blk-pci,drive=${id}`];
    case 'virtio-blk-iothread':
      return ['-object', `iothread,id=io${id}`, ...drive, '-device', `virtio-blk-pci,drive=${id},iothread=io${id}`];
    case 'qemu-nvme-null':
      return ['-drive', `driver=null-co,size=1G,read-zeroes=on,if=none,id=${id}`, '-device', `nvme,drive=${id},serial=bench${id},ioeventfd=off${qp}`];
  }
}

/** Whether the device keeps its data in the image file (null-co has none). */
export function usesImage(kind: DeviceKind): boolean {
  return kind !== 'qemu-nvme-null';
}

/** Throws, naming the property, when this QEMU lacks one a chosen device needs. */
export function checkQemuSupports(kinds: readonly DeviceKind[]): void {
  const cache = new Map<string, Set<string>>();
  for (const k of kinds) {
    for (const { driver, prop } of DEVICES[k].needs) {
      if (!cache.has(driver)) cache.set(driver, qemuDeviceProperties(driver));
      if (!cache.get(driver)!.has(prop)) {
        throw new Error(`${DEVICES[k].label}: this QEMU's -device ${driver} has no '${prop}' property (see \`-device ${driver},help\`); leave it out of --devices`);
      }
    }
  }
}

/**
 * QEMU's io_uring AIO needs io_uring_setup, which some hosts forbid (sysctl, seccomp): QEMU then
 * fails when it opens the drive, i.e. at start-up. Start a machine-less QEMU with the drive, paused,
 * and see whether it is still running after a moment.
 */
export async function probeAio(workDir: string): Promise<'io_uring' | 'threads'> {
  const img = path.join('/dev/shm', `nvu-bench-${process.pid}-probe.img`);
  freshImage(img);
  try {
    const child = spawn(qemuBinary(), [
      '-machine', 'none', '-nodefaults', '-display', 'none', '-monitor', 'none', '-S',
      '-drive', `file=${img},if=none,id=p,format=raw,cache=none,aio=io_uring`,
    ], { stdio: ['ignore', 'ignore', 'pipe'], cwd: workDir });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), 2000);
      child.once('exit', () => {
        clearTimeout(timer);
        resolve(true);
      });
    });
    if (!exited) {
      child.kill('SIGKILL');
      return 'io_uring';
    }
    console.error(`[bench] aio=io_uring does not work here, using aio=threads: ${stderr.trim()}`);
    return 'threads';
  } finally {
    fs.rmSync(img, { force: true });
  }
}
