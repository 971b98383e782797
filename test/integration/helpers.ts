import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VfioUserClient } from '../../src/vfio-user/client.js';
import { VfioUserServer } from '../../src/vfio-user/server.js';
import type { DmaSpace, VfioDevice } from '../../src/vfio-user/device.js';
import { ScratchDevice } from '../../src/pci/scratch-device.js';
import { createLogger, silentLogger, type Logger } from '../../src/log.js';

export const testLogger = (): Logger => (process.env.TEST_LOG ? createLogger('debug') : silentLogger);

export interface Harness {
  dir: string;
  socketPath: string;
  server: VfioUserServer;
  connect(): Promise<VfioUserClient>;
  cleanup(): void;
}

/** A real server on a real socket in a temp dir, with `device` behind it. */
export function startServer(device: VfioDevice, options: { writeMultiple?: boolean } = {}): Harness {
  const dir = mkdtempSync(join(tmpdir(), 'nvu-test-'));
  const socketPath = join(dir, 'device.sock');
  const server = new VfioUserServer({ socketPath, device, log: testLogger(), ...options });
  server.start();
  const clients: VfioUserClient[] = [];
  return {
    dir,
    socketPath,
    server,
    async connect() {
      const client = VfioUserClient.connect(socketPath);
      clients.push(client);
      await client.negotiate();
      return client;
    },
    cleanup() {
      for (const c of clients) c.close();
      server.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Resolves once `predicate` holds, polling the event loop; rejects after `timeoutMs`. */
export async function waitUntil(predicate: () => boolean, timeoutMs = 2000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** fds this process holds: leaks show up as growth. */
export const openFdCount = (): number => readdirSync('/proc/self/fd').length;

/** The scratch device with its DMA/IRQ context visible, so tests can act as the device side. */
export class ProbeDevice extends ScratchDevice {
  attachCount = 0;
  detachCount = 0;
  get dma(): DmaSpace {
    if (!this.context) throw new Error('no client attached');
    return this.context.dma;
  }
  protected override onAttach(): void {
    this.attachCount++;
  }
  protected override onDetach(): void {
    this.detachCount++;
  }
}
