// A hostile or broken client must get error replies (or a clean disconnect where the stream can't
// be trusted) and the server process must go on serving the next client.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, mkdtempSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { native } from '../../src/native.js';
import * as codec from '../../src/vfio-user/codec.js';
import { VfioUserClient } from '../../src/vfio-user/client.js';
import { Command, Errno, HeaderFlags, PciRegion } from '../../src/vfio-user/protocol.js';
import { SCRATCH_MAGIC, ScratchReg } from '../../src/pci/scratch-device.js';
import { startServerProcess, type ServerProcess } from '../support/server-process.js';
import { waitUntil } from './helpers.js';

let dir: string;
let server: ServerProcess;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'nvu-bad-'));
  server = await startServerProcess(join(dir, 'dev.sock'), ['--device', 'scratch', '--log-level', process.env.TEST_LOG ? 'debug' : 'warn']);
});

afterAll(async () => {
  expect(await server.stop()).toBe(0);
  expect(existsSync(server.socketPath)).toBe(false); // SIGTERM removes the socket
  rmSync(dir, { recursive: true, force: true });
});

/** Connects, retrying while the server is still tearing down the previous client. */
async function connect(): Promise<VfioUserClient> {
  for (let attempt = 0; ; attempt++) {
    const client = VfioUserClient.connect(server.socketPath);
    const closed = new Promise<'closed'>((r) => client.onClose(() => r('closed')));
    const ok = await Promise.race([client.negotiate().then(() => 'ok' as const, () => 'closed' as const), closed]);
    if (ok === 'ok') return client;
    if (attempt > 50) throw new Error('server keeps refusing clients');
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function expectHealthy(): Promise<void> {
  expect(server.alive()).toBe(true);
  const client = await connect();
  expect(await client.read32(PciRegion.BAR0, ScratchReg.MAGIC)).toBe(SCRATCH_MAGIC);
  client.close();
  await waitUntil(() => client.isClosed);
}

const raw = (command: number, payload: Uint8Array, flags = 0, id = 7): Uint8Array =>
  codec.encodeMessage({ id, command, flags, error: 0 }, payload);

async function errorFor(client: VfioUserClient, message: Uint8Array, fds: number[] = []): Promise<number> {
  const header = codec.decodeHeader(message);
  const reply = client.waitFor(header.id, header.command);
  client.sendRaw(message, fds);
  try {
    await reply;
    return 0;
  } catch (error) {
    return (error as { errno: number }).errno;
  }
}

describe('malformed messages get error replies', () => {
  it('answers each with the right errno and keeps the connection', async () => {
    const client = await connect();
    const cases: [string, Uint8Array, number][] = [
      ['unknown command', raw(77, new Uint8Array(4)), Errno.ENOSYS],
      ['command 0', raw(0, new Uint8Array(0)), Errno.ENOSYS],
      ['DMA_READ from the client', raw(Command.DMA_READ, new Uint8Array(16)), Errno.EINVAL],
      ['GET_INFO with argsz 4', raw(Command.DEVICE_GET_INFO, codec.deviceInfo.encode({ argsz: 4, flags: 0, numRegions: 0, numIrqs: 0 })), Errno.EINVAL],
      ['GET_REGION_INFO truncated', raw(Command.DEVICE_GET_REGION_INFO, new Uint8Array(12)), Errno.EINVAL],
      ['GET_REGION_INFO argsz 8', raw(Command.DEVICE_GET_REGION_INFO, codec.regionInfo.encode({ argsz: 8, flags: 0, index: 0, capOffset: 0, size: 0n, offset: 0n })), Errno.EINVAL],
      ['REGION_READ past BAR0', raw(Command.REGION_READ, codec.regionAccess.encode({ offset: 0x3ffcn, region: 0, count: 8 })), Errno.EINVAL],
      ['REGION_READ huge offset', raw(Command.REGION_READ, codec.regionAccess.encode({ offset: 0xffff_ffff_ffff_fff0n, region: 0, count: 4 })), Errno.EINVAL],
      ['REGION_READ of region 42', raw(Command.REGION_READ, codec.regionAccess.encode({ offset: 0n, region: 42, count: 4 })), Errno.EINVAL],
      ['REGION_WRITE with short data', raw(Command.REGION_WRITE, codec.regionAccess.encode({ offset: 4n, region: 0, count: 4 }, new Uint8Array(2))), Errno.EINVAL],
      ['REGION_WRITE of 2 MiB', raw(Command.REGION_WRITE, codec.regionAccess.encode({ offset: 0n, region: 7, count: 2 << 20 })), Errno.EINVAL],
      ['DMA_MAP of size 0', raw(Command.DMA_MAP, codec.dmaMap.encode({ argsz: 32, flags: 3, offset: 0n, iova: 0n, size: 0n })), Errno.EINVAL],
      ['DMA_MAP argsz 8', raw(Command.DMA_MAP, codec.dmaMap.encode({ argsz: 8, flags: 3, offset: 0n, iova: 0n, size: 4096n })), Errno.EINVAL],
      ['DMA_MAP past 2^64', raw(Command.DMA_MAP, codec.dmaMap.encode({ argsz: 32, flags: 3, offset: 0n, iova: 0xffff_ffff_ffff_f000n, size: 0x2000n })), Errno.EINVAL],
      ['DMA_UNMAP of nothing', raw(Command.DMA_UNMAP, codec.dmaUnmap.encode({ argsz: 24, flags: 0, iova: 0x1000n, size: 0x1000n })), Errno.ENOENT],
      ['DMA_UNMAP ALL with a range', raw(Command.DMA_UNMAP, codec.dmaUnmap.encode({ argsz: 24, flags: 2, iova: 0x1000n, size: 0x1000n })), Errno.EINVAL],
      ['SET_IRQS with two DATA bits', raw(Command.DEVICE_SET_IRQS, codec.setIrqs.encode({ argsz: 20, flags: 0x5 | 0x20, index: 2, start: 0, count: 1 })), Errno.EINVAL],
      ['SET_IRQS index 9', raw(Command.DEVICE_SET_IRQS, codec.setIrqs.encode({ argsz: 20, flags: 0x24, index: 9, start: 0, count: 1 })), Errno.EINVAL],
      ['DEVICE_RESET with payload', raw(Command.DEVICE_RESET, new Uint8Array(4)), Errno.EINVAL],
      ['VERSION with bad JSON', raw(Command.VERSION, codec.version.encode({ major: 0, minor: 0, json: '{"capabilities":' })), Errno.EINVAL],
      ['VERSION with a negative cap', raw(Command.VERSION, codec.version.encode({ major: 0, minor: 0, json: '{"capabilities":{"max_data_xfer_size":-1}}' })), Errno.EINVAL],
      ['WRITE_MULTI with a wrong count', raw(Command.REGION_WRITE_MULTI, codec.writeMultiCount.encode({ wrCnt: 5n })), Errno.EINVAL],
      ['message type 2', raw(Command.DEVICE_GET_INFO, new Uint8Array(16), 0x2), Errno.EINVAL],
    ];
    for (const [name, message, errno] of cases) {
      expect([name, await errorFor(client, message)]).toEqual([name, errno]);
    }
    // The connection survived all of it.
    expect(await client.read32(PciRegion.BAR0, ScratchReg.MAGIC)).toBe(SCRATCH_MAGIC);
    client.close();
  });

  it('refuses commands before VERSION', async () => {
    const client = VfioUserClient.connect(server.socketPath);
    await expect(client.deviceInfo()).rejects.toMatchObject({ errno: Errno.EINVAL });
    client.close();
  });

  it('closes fds sent where none belong and answers EINVAL', async () => {
    const client = await connect();
    const before = server.openFds();
    for (let i = 0; i < 50; i++) {
      const fds = [native.eventfd(), native.eventfd()];
      const errno = await errorFor(client, raw(Command.REGION_READ, codec.regionAccess.encode({ offset: 0n, region: 0, count: 4 }), 0, i), fds);
      expect(errno).toBe(Errno.EINVAL);
      fds.forEach((fd) => native.closeFd(fd));
    }
    // 100 fds went in; none may stay open in the server.
    expect(server.openFds()).toBeLessThanOrEqual(before + 2);
    client.close();
  });

  it('disconnects on a header whose size cannot be trusted, then serves the next client', async () => {
    for (const size of [3, 0xffff_ffff, (1 << 20) + 4096]) {
      const client = VfioUserClient.connect(server.socketPath);
      const header = raw(Command.DEVICE_GET_INFO, new Uint8Array(0));
      new DataView(header.buffer).setUint32(4, size, true);
      client.sendRaw(header);
      await waitUntil(() => client.isClosed, 3000, `disconnect for size ${size}`);
      await expectHealthy();
    }
  });

  it('survives a truncated header followed by EOF', async () => {
    const client = VfioUserClient.connect(server.socketPath);
    client.sendRaw(new Uint8Array([1, 0, 4, 0, 16]));
    client.close();
    await expectHealthy();
  });
});

describe('randomized malformed traffic', () => {
  it('a few thousand random messages leave the process alive and serving', async () => {
    let seed = 0x2545f491;
    const rand = (n: number): number => {
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      return (seed >>> 0) % n;
    };
    const fdsBefore = server.openFds();
    let sent = 0;
    let disconnects = 0;
    let client = await connect();
    while (sent < 3000) {
      if (client.isClosed) {
        disconnects++;
        client = await connect();
      }
      const command = rand(20);
      const payload = new Uint8Array(rand(5) === 0 ? rand(300) : rand(40));
      for (let i = 0; i < payload.length; i++) payload[i] = rand(4) === 0 ? 0xff : rand(256);
      // Mostly plausible small regions/offsets so the dispatch paths, not just decoding, get hit.
      if (payload.length >= 16 && (command === Command.REGION_READ || command === Command.REGION_WRITE)) {
        new DataView(payload.buffer).setUint32(8, rand(9), true);
        new DataView(payload.buffer).setUint32(12, [1, 2, 4, 8, rand(64)][rand(5)]!, true);
      }
      const flags = [0, 0, 0, HeaderFlags.NO_REPLY, HeaderFlags.TYPE_REPLY, rand(0x100)][rand(6)]!;
      const message = raw(command, payload, flags, rand(0x10000));
      if (rand(50) === 0) new DataView(message.buffer).setUint32(4, rand(64), true); // lie about the size
      const fds = rand(20) === 0 ? [native.eventfd()] : [];
      client.sendRaw(message, fds);
      fds.forEach((fd) => native.closeFd(fd));
      sent++;
      if (sent % 100 === 0) await new Promise((r) => setTimeout(r, 5));
    }
    client.close();
    await expectHealthy();
    if (process.env.TEST_LOG) console.log(server.log());
    expect(server.alive()).toBe(true);
    expect(disconnects).toBeGreaterThan(0); // the size lies did force disconnects
    // No fd leak from thousands of messages, some carrying fds (the eventfds QEMU-like SET_IRQS
    // may legitimately keep are closed when their client goes away).
    await waitUntil(() => server.openFds() <= fdsBefore + 2, 3000, `server fds back to baseline (${fdsBefore} before, ${server.openFds()} now: ${readdirSync(`/proc/${server.child.pid}/fd`).map((f: string) => { try { return readlinkSync(`/proc/${server.child.pid}/fd/${f}`); } catch { return "?"; } }).join(",")})`);
  }, 60_000);
});
