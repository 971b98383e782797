import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ftruncateSync } from 'node:fs';
import { native } from '../../src/native.js';
import { GuestMemory, VfioClientError, VfioUserClient } from '../../src/vfio-user/client.js';
import { Command, DeviceFlags, Errno, Feature, FeatureFlags, IrqInfoFlags, PciIrq, PciRegion, RegionFlags } from '../../src/vfio-user/protocol.js';
import { SCRATCH_DEVICE_ID, SCRATCH_MAGIC, SCRATCH_VENDOR_ID, ScratchReg } from '../../src/pci/scratch-device.js';
import { Cfg, CapId, MsixCap } from '../../src/pci/registers.js';
import { ProbeDevice, openFdCount, startServer, waitUntil, type Harness } from './helpers.js';

let device: ProbeDevice;
let harness: Harness;
let client: VfioUserClient;

beforeEach(async () => {
  device = new ProbeDevice();
  harness = startServer(device);
  client = await harness.connect();
});

afterEach(() => harness.cleanup());

/** One full event-loop turn: timers, I/O polling (replies already in our socket buffer arrive), immediates. */
const turnEventLoop = (): Promise<void> => new Promise((resolve) => setTimeout(() => setImmediate(resolve), 0));

const u32 = (b: Uint8Array): number => new DataView(b.buffer, b.byteOffset).getUint32(0, true);
const u16 = (b: Uint8Array): number => new DataView(b.buffer, b.byteOffset).getUint16(0, true);

describe('negotiation and device info', () => {
  it('answers VERSION 0.0 with capabilities QEMU accepts', async () => {
    const other = VfioUserClient.connect(harness.socketPath); // refused: one client per socket
    await waitUntil(() => other.isClosed, 2000, 'second client refused');
    const fresh = startServer(new ProbeDevice());
    try {
      const c = VfioUserClient.connect(fresh.socketPath);
      const caps = await c.negotiate();
      expect(caps.max_msg_fds).toBe(16);
      expect(caps.max_data_xfer_size).toBe(1 << 20);
      expect(caps.pgsizes).toBe(4096);
      expect(caps.write_multiple).toBeUndefined(); // not offered unless enabled
      c.close();
    } finally {
      fresh.cleanup();
    }
  });

  it('rejects a major version other than 0', async () => {
    const fresh = startServer(new ProbeDevice());
    try {
      const c = VfioUserClient.connect(fresh.socketPath);
      const { version } = await import('../../src/vfio-user/codec.js');
      await expect(c.request(Command.VERSION, version.encode({ major: 1, minor: 0, json: '{}' }))).rejects.toMatchObject({ errno: Errno.ENOTSUP });
      c.close();
    } finally {
      fresh.cleanup();
    }
  });

  it('answers a second VERSION with EINVAL and keeps the parameters negotiated first', async () => {
    const fresh = startServer(new ProbeDevice());
    const rom = new GuestMemory(0x200000, 0x10000);
    try {
      const c = VfioUserClient.connect(fresh.socketPath);
      await c.negotiate({ max_msg_fds: 16, max_data_xfer_size: 8192 });
      await c.dmaMap(rom, { viaMessages: true });
      const probe = fresh.server.activeSession!.dma;
      await probe.read(0x200000, 20_000);
      expect(c.dmaRequests.read).toBe(3); // 8 KiB pieces
      await expect(c.negotiate({ max_msg_fds: 16, max_data_xfer_size: 1 << 20 })).rejects.toMatchObject({ errno: Errno.EINVAL });
      await probe.read(0x200000, 20_000);
      expect(c.dmaRequests.read).toBe(6); // still 8 KiB pieces
      expect((await c.deviceInfo()).numRegions).toBe(9); // and the connection still serves
      c.close();
    } finally {
      rom.close();
      fresh.cleanup();
    }
  });

  it('refuses a max_data_xfer_size below one page (EINVAL) and accepts a page', async () => {
    const fresh = startServer(new ProbeDevice());
    try {
      const c = VfioUserClient.connect(fresh.socketPath);
      for (const tooSmall of [1, 512, 4095]) {
        await expect(c.negotiate({ max_msg_fds: 16, max_data_xfer_size: tooSmall })).rejects.toMatchObject({ errno: Errno.EINVAL });
      }
      // A refused VERSION negotiates nothing: the client may try again.
      await expect(c.deviceInfo()).rejects.toMatchObject({ errno: Errno.EINVAL });
      expect((await c.negotiate({ max_msg_fds: 16, max_data_xfer_size: 4096 })).max_data_xfer_size).toBe(1 << 20);
      expect((await c.deviceInfo()).numRegions).toBe(9);
      c.close();
    } finally {
      fresh.cleanup();
    }
  });

  it('reports a resettable PCI device with 9 regions and 5 IRQ indexes', async () => {
    const info = await client.deviceInfo();
    expect(info.flags).toBe(DeviceFlags.PCI | DeviceFlags.RESET);
    expect(info.numRegions).toBe(9);
    expect(info.numIrqs).toBe(5);
  });

  it('describes BAR0, absent BARs and the 4 KiB config region', async () => {
    const bar0 = await client.regionInfo(PciRegion.BAR0);
    expect(bar0.size).toBe(0x4000);
    expect(bar0.flags).toBe(RegionFlags.READ | RegionFlags.WRITE);
    for (const index of [1, 2, 3, 4, 5, 6]) expect((await client.regionInfo(index)).size).toBe(0);
    const cfg = await client.regionInfo(PciRegion.CONFIG);
    expect(cfg.size).toBe(4096);
    await expect(client.regionInfo(9)).rejects.toMatchObject({ errno: Errno.EINVAL });
  });

  it('describes the IRQ indexes', async () => {
    expect(await client.irqInfo(PciIrq.INTX)).toEqual({ count: 0, flags: IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED });
    expect((await client.irqInfo(PciIrq.MSIX)).count).toBe(4);
    expect((await client.irqInfo(PciIrq.ERR)).count).toBe(1);
    await expect(client.irqInfo(5)).rejects.toMatchObject({ errno: Errno.EINVAL });
  });
});

describe('config space', () => {
  it('holds our IDs, class and a capability chain PM → MSI → MSI-X → PCIe', async () => {
    const header = await client.configRead(0, 64);
    expect(u16(header.subarray(Cfg.VENDOR_ID))).toBe(SCRATCH_VENDOR_ID);
    expect(u16(header.subarray(Cfg.DEVICE_ID))).toBe(SCRATCH_DEVICE_ID);
    expect(header[0x0b]).toBe(0xff);
    const ids: number[] = [];
    for (let at = header[Cfg.CAPABILITY_LIST]!; at !== 0; ) {
      const cap = await client.configRead(at, 2);
      ids.push(cap[0]!);
      at = cap[1]!;
    }
    expect(ids).toEqual([CapId.PM, CapId.MSI, CapId.MSIX, CapId.PCIE]);
  });

  it('sizes a 64-bit BAR through the write mask and keeps read-only fields', async () => {
    await client.configWrite(Cfg.BAR0, new Uint8Array([0xff, 0xff, 0xff, 0xff]));
    expect(u32(await client.configRead(Cfg.BAR0, 4))).toBe(0xffffc004);
    await client.configWrite(Cfg.VENDOR_ID, new Uint8Array([0, 0]));
    expect(u16(await client.configRead(Cfg.VENDOR_ID, 2))).toBe(SCRATCH_VENDOR_ID);
    await client.configWrite(Cfg.COMMAND, new Uint8Array([0x06, 0x00]));
    expect(u16(await client.configRead(Cfg.COMMAND, 2))).toBe(0x0006);
  });
});

describe('BAR access', () => {
  it('reads the magic and round-trips 4- and 8-byte registers, posted or not', async () => {
    expect(await client.read32(PciRegion.BAR0, ScratchReg.MAGIC)).toBe(SCRATCH_MAGIC);
    await client.write32(PciRegion.BAR0, ScratchReg.SCRATCH32, 0xdeadbeef);
    expect(await client.read32(PciRegion.BAR0, ScratchReg.SCRATCH32)).toBe(0xdeadbeef);
    await client.write64(PciRegion.BAR0, ScratchReg.SCRATCH64, 0x0123456789abcdefn);
    expect(await client.read64(PciRegion.BAR0, ScratchReg.SCRATCH64)).toBe(0x0123456789abcdefn);
    client.postRegionWrite(PciRegion.BAR0, ScratchReg.SCRATCH32, new Uint8Array([1, 2, 3, 4]));
    // Commands run in order, so the posted write is visible to the next read.
    expect(await client.read32(PciRegion.BAR0, ScratchReg.SCRATCH32)).toBe(0x04030201);
  });

  it('applies REGION_WRITE_MULTI entries in order', async () => {
    const n = await client.writeMulti([
      { offset: BigInt(ScratchReg.SCRATCH32), region: 0, count: 4, data: new Uint8Array([9, 9, 9, 9]) },
      { offset: BigInt(ScratchReg.SCRATCH32), region: 0, count: 2, data: new Uint8Array([1, 2]) },
    ]);
    expect(n).toBe(2);
    expect(await client.read32(PciRegion.BAR0, ScratchReg.SCRATCH32)).toBe(0x09090201);
  });

  it('refuses accesses past the region and odd sizes', async () => {
    await expect(client.regionRead(PciRegion.BAR0, 0x4000 - 2, 4)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.regionRead(PciRegion.BAR0, 0, 3)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.regionRead(PciRegion.CONFIG, 4095, 2)).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(client.regionRead(PciRegion.BAR2, 0, 4)).rejects.toMatchObject({ errno: Errno.EINVAL });
  });
});

describe('DMA', () => {
  it('maps memfd guest RAM and reads/writes it in place', async () => {
    const ram = new GuestMemory(0x100000, 1 << 20);
    try {
      await client.dmaMap(ram);
      ram.bytes.set([1, 2, 3, 4], 0x1000);
      expect(Array.from(await device.dma.read(0x101000, 4))).toEqual([1, 2, 3, 4]);
      await device.dma.write(0x1ffffc, new Uint8Array([9, 8, 7, 6]));
      expect(Array.from(ram.bytes.subarray(0xffffc))).toEqual([9, 8, 7, 6]);
      expect(device.dma.view(0x100000, 16, true)).not.toBeNull();
      expect(client.dmaRequests).toEqual({ read: 0, write: 0 });
      await expect(device.dma.read(0x1ffffe, 4)).rejects.toThrow(/outside every mapping/);
      await expect(device.dma.write(0x50, new Uint8Array(1))).rejects.toThrow(/outside every mapping/);
      await client.dmaUnmap(0x100000, 1 << 20);
      await expect(device.dma.read(0x101000, 4)).rejects.toThrow(/outside every mapping/);
    } finally {
      ram.close();
    }
  });

  it('falls back to DMA_READ/DMA_WRITE messages for memory mapped without an fd', async () => {
    const rom = new GuestMemory(0x200000, 2 << 20);
    try {
      await client.dmaMap(rom, { viaMessages: true });
      rom.bytes.set([5, 6, 7], 10);
      expect(Array.from(await device.dma.read(0x20000a, 3))).toEqual([5, 6, 7]);
      const big = new Uint8Array(1_500_000).map((_, i) => i & 0xff);
      await device.dma.write(0x200100, big); // split over the 1 MiB transfer limit
      expect(Buffer.compare(rom.bytes.subarray(0x100, 0x100 + big.length), big)).toBe(0);
      expect(client.dmaRequests.read).toBe(1);
      expect(client.dmaRequests.write).toBe(2);
    } finally {
      rom.close();
    }
  });

  it('keeps memory a running I/O pinned mapped across DMA_UNMAP, and unmaps it when released', async () => {
    const ram = new GuestMemory(0x100000, 0x10000);
    try {
      await client.dmaMap(ram);
      ram.bytes.set([7, 7, 7, 7], 0x100);
      const pinned = device.dma.pin(0x100100, 4, false)!;
      await client.dmaUnmap(0x100000, 0x10000);
      // Gone for new accesses, still there for the I/O that holds it.
      expect(device.dma.view(0x100100, 4, false)).toBeNull();
      expect(Array.from(pinned.bytes)).toEqual([7, 7, 7, 7]);
      pinned.release();
      expect(pinned.bytes.length).toBe(0); // unmapped and detached: no stale access possible
    } finally {
      ram.close();
    }
  });

  it('refuses a mapping larger than its fd (touching it would be SIGBUS for the whole process)', async () => {
    const small = native.memfdCreate('small', 4096);
    try {
      const { dmaMap } = await import('../../src/vfio-user/codec.js');
      const payload = dmaMap.encode({ argsz: 32, flags: 3, offset: 0n, iova: 0x100000n, size: 0x100000n });
      await expect(client.request(Command.DMA_MAP, payload, [small])).rejects.toMatchObject({ errno: Errno.EINVAL });
      await expect(device.dma.read(0x102000, 4)).rejects.toThrow(/outside every mapping/);
    } finally {
      native.closeFd(small);
    }
  });

  it('survives a client that truncates mapped memory: accesses fail, the mapping is refused until unmapped', async () => {
    const a = new GuestMemory(0x100000, 0x10000);
    const b = new GuestMemory(0x200000, 0x10000);
    try {
      await client.dmaMap(a);
      await client.dmaMap(b);
      const pinned = device.dma.pin(0x100000, 4096, true)!;
      const view = device.dma.view(0x200000, 16, true)!;
      ftruncateSync(a.fd, 0);
      ftruncateSync(b.fd, 0);
      // Each of these touches memory past the file's end: SIGBUS for the whole process, unguarded.
      await expect(device.dma.read(0x100100, 64)).rejects.toThrow(/into guest memory its owner truncated/);
      view.set([1, 2, 3, 4]); // the device's own store completes, on zero pages
      expect(pinned.intact()).toBe(false);
      for (const at of [0x100000, 0x200000]) {
        expect(device.dma.view(at, 4, false)).toBeNull();
        expect(device.dma.pin(at, 4, true)).toBeNull();
        expect(device.dma.loadWord(at)).toBeUndefined();
        expect(device.dma.storeWord(at, 1)).toBe(false);
        await expect(device.dma.read(at, 4)).rejects.toThrow(/truncated/);
        await expect(device.dma.write(at, new Uint8Array(4))).rejects.toThrow(/truncated/);
      }
      pinned.release();
      // Until the client unmaps it; then the range can be mapped again, with fresh memory.
      await client.dmaUnmap(0x100000, 0x10000);
      await expect(device.dma.read(0x100000, 4)).rejects.toThrow(/outside every mapping/);
      const again = new GuestMemory(0x100000, 0x10000);
      try {
        await client.dmaMap(again);
        again.bytes.set([5, 6, 7, 8]);
        expect(Array.from(await device.dma.read(0x100000, 4))).toEqual([5, 6, 7, 8]);
      } finally {
        await client.dmaUnmap(0x100000, 0x10000);
        again.close();
      }
    } finally {
      a.close();
      b.close();
    }
  });

  it('refuses overlapping maps, unknown unmaps, and writes to read-only memory', async () => {
    const a = new GuestMemory(0x10000, 0x10000);
    const b = new GuestMemory(0x18000, 0x10000);
    try {
      await client.dmaMap(a, { readOnly: true });
      await expect(client.dmaMap(b)).rejects.toMatchObject({ errno: Errno.EEXIST });
      await expect(client.dmaUnmap(0x10000, 0x1000)).rejects.toMatchObject({ errno: Errno.ENOENT });
      await expect(device.dma.write(0x10000, new Uint8Array(4))).rejects.toThrow(/read-only/);
      await client.dmaUnmapAll();
      await expect(device.dma.read(0x10000, 4)).rejects.toThrow(/outside/);
    } finally {
      a.close();
      b.close();
    }
  });
});

describe('interrupts', () => {
  it('fires the MSI-X eventfd the client wired, and replaces and de-assigns them', async () => {
    const fds = [native.eventfd(), native.eventfd()];
    try {
      await client.setIrqEventfds(PciIrq.MSIX, 0, fds);
      // The guest enables MSI-X (QEMU forwards the control write to us too).
      const cap = device.config.caps.msix!;
      await client.configWrite(cap + MsixCap.CONTROL, new Uint8Array([0x03, 0x80]));
      await client.write32(PciRegion.BAR0, ScratchReg.IRQ_DOORBELL, 1);
      expect(native.eventfdRead(fds[1]!)).toBe(1n);
      expect(native.eventfdRead(fds[0]!)).toBe(0n);
      await client.setIrqEventfds(PciIrq.MSIX, 1, [], 1); // de-assign vector 1
      await client.write32(PciRegion.BAR0, ScratchReg.IRQ_DOORBELL, 1);
      expect(native.eventfdRead(fds[1]!)).toBe(0n);
      expect(await client.read32(PciRegion.BAR0, ScratchReg.IRQ_DOORBELL)).toBe(1);
      await client.disableIrqs(PciIrq.MSIX);
      await client.write32(PciRegion.BAR0, ScratchReg.IRQ_DOORBELL, 0);
      expect(native.eventfdRead(fds[0]!)).toBe(0n);
    } finally {
      fds.forEach((fd) => native.closeFd(fd));
    }
  });

  it('rejects SET_IRQS past the vector count or with mismatched fds', async () => {
    const fd = native.eventfd();
    try {
      await expect(client.setIrqEventfds(PciIrq.MSIX, 4, [fd])).rejects.toMatchObject({ errno: Errno.EINVAL });
      await expect(client.setIrqEventfds(PciIrq.MSIX, 0, [fd], 2)).rejects.toMatchObject({ errno: Errno.EINVAL });
      await expect(client.setIrqEventfds(PciIrq.REQ, 0, [fd])).rejects.toMatchObject({ errno: Errno.EINVAL });
    } finally {
      native.closeFd(fd);
    }
  });
});

describe('reset and reconnect', () => {
  it('DEVICE_RESET returns registers and config to power-on state', async () => {
    await client.write32(PciRegion.BAR0, ScratchReg.SCRATCH32, 42);
    await client.configWrite(Cfg.COMMAND, new Uint8Array([0x06, 0]));
    await client.reset();
    expect(await client.read32(PciRegion.BAR0, ScratchReg.SCRATCH32)).toBe(0);
    expect(u16(await client.configRead(Cfg.COMMAND, 2))).toBe(0);
  });

  it('DEVICE_RESET replies only once I/O holding pinned guest memory has finished, and later commands wait in order', async () => {
    const ram = new GuestMemory(0x100000, 0x10000);
    try {
      await client.dmaMap(ram);
      await client.write32(PciRegion.BAR0, ScratchReg.SCRATCH32, 42);
      const pinned = device.dma.pin(0x100000, 4096, true)!;
      const order: string[] = [];
      const reset = client.reset().then(() => order.push('reset'));
      const read = client.read32(PciRegion.BAR0, ScratchReg.MAGIC).then((v) => order.push(`read ${v.toString(16)}`));
      // The server has run the reset (registers cleared) and would have replied by now if it did not wait.
      await waitUntil(() => u32(device.regionRead(PciRegion.BAR0, ScratchReg.SCRATCH32, 4)) === 0, 2000, 'reset to reach the device');
      await turnEventLoop();
      order.push('I/O done');
      pinned.bytes.fill(0xee); // the I/O lands
      pinned.release();
      await Promise.all([reset, read]);
      // The reset waited for the pinned I/O; the read waited behind the reset.
      expect(order).toEqual(['I/O done', 'reset', `read ${SCRATCH_MAGIC.toString(16)}`]);
    } finally {
      ram.close();
    }
  });

  it('keeps device state for the next client and releases the previous client\'s resources', async () => {
    const ram = new GuestMemory(0x100000, 0x10000);
    const irq = native.eventfd();
    const fdsBefore = openFdCount();
    await client.dmaMap(ram);
    await client.setIrqEventfds(PciIrq.MSIX, 0, [irq]);
    await client.write32(PciRegion.BAR0, ScratchReg.SCRATCH32, 0x5151);
    client.close();
    await waitUntil(() => device.detachCount === 1 && harness.server.activeSession === null, 2000, 'session end');
    // The server closed the eventfd it held and unmapped the DMA region.
    expect(openFdCount()).toBeLessThanOrEqual(fdsBefore - 1);
    const second = await harness.connect();
    expect(await second.read32(PciRegion.BAR0, ScratchReg.SCRATCH32)).toBe(0x5151);
    await expect(device.dma.read(0x100000, 4)).rejects.toThrow(/outside/);
    expect(device.attachCount).toBe(2);
    ram.close();
    native.closeFd(irq);
  });
});

describe('mmap regions', () => {
  it('answers a short GET_REGION_INFO with the argsz it needs and CAPS cleared', async () => {
    const { MmapProbeDevice } = await import('./mmap-device.js');
    const dev = new MmapProbeDevice();
    const h = startServer(dev);
    try {
      const c = VfioUserClient.connect(h.socketPath);
      await c.negotiate();
      const { regionInfo } = await import('../../src/vfio-user/codec.js');
      const first = await c.request(Command.DEVICE_GET_REGION_INFO, regionInfo.encode({ argsz: 32, flags: 0, index: 0, capOffset: 0, size: 0n, offset: 0n }));
      const short = regionInfo.decode(first.payload);
      expect(short.argsz).toBe(32 + 16 + 16);
      expect(short.flags & RegionFlags.CAPS).toBe(0);
      expect(first.fds).toEqual([]);
      expect(first.header.size).toBe(16 + 32);
      const full = await c.regionInfo(0);
      expect(full.flags).toBe(RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP | RegionFlags.CAPS);
      expect(full.sparseAreas).toEqual([{ offset: 0x1000n, size: 0x1000n }]);
      expect(full.fd).toBeGreaterThan(2);
      // The client's mapping and the server's view are the same memory.
      const page = native.mmap(full.fd!, full.offset + 0x1000n, 0x1000, true);
      new DataView(page).setUint32(8, 0xfeedf00d, true);
      expect(dev.doorbell(8)).toBe(0xfeedf00d);
      native.munmap(page);
      native.closeFd(full.fd!);
      c.close();
    } finally {
      h.cleanup();
    }
  });
});

describe('errors reach the client as error replies', () => {
  it('a device without migration answers its features and MIG_DATA_* with ENOTSUP; unknown commands are ENOSYS', async () => {
    const fresh = startServer(new ProbeDevice(4, { migration: false }));
    try {
      const c = await fresh.connect();
      await expect(c.probeFeature(Feature.MIGRATION)).rejects.toMatchObject({ errno: Errno.ENOTSUP });
      await expect(c.migrationState()).rejects.toMatchObject({ errno: Errno.ENOTSUP });
      await expect(c.readMigrationData(16)).rejects.toMatchObject({ errno: Errno.ENOTSUP });
      await expect(c.writeMigrationData(new Uint8Array(4))).rejects.toMatchObject({ errno: Errno.ENOTSUP });
      // Dirty logging belongs to the DMA table, which every device has.
      await expect(c.probeFeature(Feature.DMA_LOGGING_START, FeatureFlags.SET)).resolves.toBeUndefined();
      await expect(c.request(99)).rejects.toBeInstanceOf(VfioClientError);
      await expect(c.request(99)).rejects.toMatchObject({ errno: Errno.ENOSYS });
    } finally {
      fresh.cleanup();
    }
  });
});
