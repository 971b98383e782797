// What a guest that moved between the servers of a migration pair (migration-pair.ts) must find
// on arrival: vitest assertions, kept apart so that the pair itself runs outside a test too.

import { expect } from 'vitest';
import { Reg, Status } from '../../src/nvme/spec.js';
import { Cfg, Command as PciCommand, MsixCap } from '../../src/pci/registers.js';
import { IO_QUEUES, type Guest } from './migration-pair.js';

/**
 * What every arrival promises, once the guest drained on its new controller: every command once,
 * with its data; no completion nobody submitted; interrupts on every I/O vector's new eventfd; and
 * bus mastering and MSI-X on, from the state (the guest never wrote the new config space).
 */
export async function expectArrived(guest: Guest, label: string): Promise<void> {
  const { host, workload } = guest;
  expect(workload.violations.join('\n'), label).toBe('');
  for (const q of guest.queues) expect(q.peek(), `${label}: q${q.id} holds a completion nobody submitted`).toBeNull();
  expect(host.interruptCounts.slice(1).every((n) => n > 0), `${label}: interrupts per vector on the target ${host.interruptCounts.join(',')}`).toBe(true);
  expect((await host.client.configRead(Cfg.COMMAND, 1))[0]! & PciCommand.BUS_MASTER, `${label}: bus mastering`).toBe(PciCommand.BUS_MASTER);
  const msix = await host.findCapability(0x11);
  expect((await host.client.configRead(msix + MsixCap.CONTROL + 1, 1))[0]! & (MsixCap.CTRL_ENABLE >> 8), `${label}: MSI-X enable`).toBe(MsixCap.CTRL_ENABLE >> 8);
}

/** The AERs submitted at the start are still the controller's: an event (a doorbell of a queue that does not exist) completes one. */
export async function expectAsyncEventRequestsAlive(guest: Guest): Promise<void> {
  const { host } = guest;
  expect(host.admin.peek()).toBeNull();
  const missingQueue = IO_QUEUES + 3;
  await host.write32(Reg.DOORBELLS + 2 * missingQueue * 4, 1);
  const event = await host.admin.wait();
  expect(guest.asyncEventRequests).toContain(event.cid);
  expect(event.status).toBe(Status.SUCCESS);
}
