// Finding a VM's vfio-user-pci devices over QMP.
//
// What QEMU 11.1.3 offers (each checked on a real q35 VM):
// - Every -device lands in QOM under /machine/peripheral/<id> or, without an id,
//   /machine/peripheral-anon/device[N]; `qom-list` shows the child's type as
//   "child<vfio-user-pci>". `qom-list-get` (QEMU >= 10.1, as is vfio-user-pci) returns all of a
//   device's properties in one call.
// - `addr` reads as the devfn number (8 = slot 1 function 0) although its type says "str";
//   `parent_bus` is the bus's QOM path ("/machine/q35/pcie.0", or "/machine/peripheral/rp1/rp1"
//   behind a root port whose QOM path is the bus path's parent).
// - The `socket` property is NOT readable ("Property 'vfio-user-pci.socket' is not readable"),
//   and neither `info qtree` nor query-pci shows it. The socket path survives in the names of the
//   device's memory-region children: "vfio-user:<path> BAR 0[0]" and "vfio-user:<path> base BAR
//   0[0]", with '/', '\', '[' and ']' escaped as \xHH (QEMU's memory_region_escape_name).
// - `query-pci` gives bus/slot/function, IDs, class and BARs ("address": -1 until assigned), and
//   `qdev_id` (empty for anonymous devices, so it cannot identify them). Devices behind a bridge
//   appear under `pci_bridge.devices` only once firmware (or an orchestrator) has given the bridge
//   a secondary bus number; before that their bus has no number and they are not listed.

import type { PciAddress } from './pci-config.js';
import type { QmpClient } from './qmp.js';

export interface QueryPciRegion {
  bar: number;
  type: 'io' | 'memory';
  /** -1 while unassigned. */
  address: number;
  size: number;
  prefetch?: boolean;
  mem_type_64?: boolean;
}

export interface QueryPciDevice {
  bus: number;
  slot: number;
  function: number;
  qdev_id: string;
  id: { vendor: number; device: number; subsystem?: number; 'subsystem-vendor'?: number };
  class_info: { class: number; desc?: string };
  irq_pin: number;
  irq?: number;
  regions: QueryPciRegion[];
  pci_bridge?: {
    bus: { number: number; secondary: number; subordinate: number };
    devices?: QueryPciDevice[];
  };
}

export interface QueryPciBus {
  bus: number;
  devices: QueryPciDevice[];
}

export interface PciBar {
  index: number;
  type: 'io' | 'memory';
  /** Guest-physical (or I/O port) address, null while the BAR is not assigned or not enabled. */
  address: number | null;
  size: number;
  is64Bit: boolean;
  prefetchable: boolean;
}

export interface VfioUserDeviceInfo {
  qomPath: string;
  /** The -device `id`, null for an anonymous device. */
  id: string | null;
  /** The server socket; null if QEMU kept no memory region named after it (a device without BARs). */
  socketPath: string | null;
  /** QOM path of the bus the device sits on. */
  parentBus: string;
  /** Device and function on that bus, as QEMU placed it (slot << 3 | function). */
  devfn: number;
  /** null while the device's bus has no number yet (behind a bridge firmware has not set up). */
  address: PciAddress | null;
  vendorId: number | null;
  deviceId: number | null;
  classCode: number | null;
  bars: PciBar[];
}

const PERIPHERAL_CONTAINERS = ['/machine/peripheral', '/machine/peripheral-anon'];
const VFIO_USER_CHILD_TYPE = 'child<vfio-user-pci>';
const REGION_NAME_WITH_SOCKET = /^vfio-user:(.*) BAR \d+\[\d+\]$/;

interface QomProperty {
  name: string;
  type: string;
  value?: unknown;
}

function queryPci(qmp: QmpClient): Promise<QueryPciBus[]> {
  return qmp.execute<QueryPciBus[]>('query-pci');
}

/** Every vfio-user-pci device of the VM with its PCI placement, socket and BARs. */
export async function findVfioUserDevices(qmp: QmpClient): Promise<VfioUserDeviceInfo[]> {
  const qomPaths: string[] = [];
  for (const container of PERIPHERAL_CONTAINERS) {
    const children = await qmp.execute<QomProperty[]>('qom-list', { path: container });
    for (const child of children) if (child.type === VFIO_USER_CHILD_TYPE) qomPaths.push(`${container}/${child.name}`);
  }
  if (qomPaths.length === 0) return [];
  const [propertyLists, rootBuses] = await Promise.all([
    qmp.execute<Array<{ properties: QomProperty[] }>>('qom-list-get', { paths: qomPaths }),
    queryPci(qmp),
  ]);
  const result: VfioUserDeviceInfo[] = [];
  for (const [index, qomPath] of qomPaths.entries()) {
    const properties = propertyLists[index]!.properties;
    const devfn = Number(propertyValue(properties, 'addr', qomPath));
    const parentBus = String(propertyValue(properties, 'parent_bus', qomPath));
    const pciDevice = await locateOnPciTree(qmp, rootBuses, parentBus, devfn);
    result.push({
      qomPath,
      id: qomPath.startsWith('/machine/peripheral/') ? qomPath.slice('/machine/peripheral/'.length) : null,
      socketPath: socketPathFromRegionNames(properties.map((p) => p.name)),
      parentBus,
      devfn,
      address: pciDevice ? { bus: pciDevice.bus, slot: pciDevice.slot, function: pciDevice.function } : null,
      vendorId: pciDevice?.id.vendor ?? null,
      deviceId: pciDevice?.id.device ?? null,
      classCode: pciDevice?.class_info.class ?? null,
      bars: (pciDevice?.regions ?? []).map(toBar),
    });
  }
  return result;
}

function propertyValue(properties: QomProperty[], name: string, qomPath: string): unknown {
  const property = properties.find((p) => p.name === name);
  if (property?.value === undefined) throw new Error(`${qomPath} has no readable "${name}" property`);
  return property.value;
}

/** The socket path embedded in the device's BAR memory-region names (see the top of this file). */
export function socketPathFromRegionNames(childNames: readonly string[]): string | null {
  const candidates = childNames
    .map((name) => REGION_NAME_WITH_SOCKET.exec(name)?.[1])
    .filter((path): path is string => path !== undefined)
    .map((escaped) => escaped.replace(/\\x([0-9a-f]{2})/gi, (_, code: string) => String.fromCharCode(parseInt(code, 16))));
  // "<path> base BAR n" also matches, with " base" glued to the path: the shortest one is the path.
  candidates.sort((a, b) => a.length - b.length);
  return candidates[0] ?? null;
}

/**
 * Finds the query-pci entry of the device at `devfn` on the bus at QOM path `busPath`, walking
 * up through bridges to the root bus and back down query-pci's tree. null when a bridge on the
 * way has no secondary bus number yet (query-pci does not list what is behind it).
 */
async function locateOnPciTree(qmp: QmpClient, rootBuses: QueryPciBus[], busPath: string, devfn: number): Promise<QueryPciDevice | null> {
  const devfnsFromRoot = [devfn];
  for (let bus = busPath; ; ) {
    const bridgePath = bus.slice(0, bus.lastIndexOf('/'));
    const bridge = await readBridgePlacement(qmp, bridgePath);
    if (!bridge) break; // the bus belongs to a host bridge: it is a root bus
    devfnsFromRoot.unshift(bridge.devfn);
    bus = bridge.parentBus;
  }
  // q35 and i440fx have one root bus; expander bridges (pxb) add more, which this does not place.
  if (rootBuses.length !== 1) return null;
  let devices = rootBuses[0]!.devices;
  let found: QueryPciDevice | undefined;
  for (const step of devfnsFromRoot) {
    found = devices.find((d) => d.slot === step >> 3 && d.function === (step & 7));
    if (!found) return null;
    devices = found.pci_bridge?.devices ?? [];
  }
  return found ?? null;
}

/** A PCI bridge's own devfn and bus, or null if `qomPath` is not a PCI device (a host bridge). */
async function readBridgePlacement(qmp: QmpClient, qomPath: string): Promise<{ devfn: number; parentBus: string } | null> {
  const properties = await qmp.execute<QomProperty[]>('qom-list', { path: qomPath });
  if (!properties.some((p) => p.name === 'addr')) return null;
  const [devfn, parentBus] = await Promise.all([
    qmp.execute<number>('qom-get', { path: qomPath, property: 'addr' }),
    qmp.execute<string>('qom-get', { path: qomPath, property: 'parent_bus' }),
  ]);
  return { devfn: Number(devfn), parentBus };
}

function toBar(region: QueryPciRegion): PciBar {
  return {
    index: region.bar,
    type: region.type,
    address: region.address === -1 ? null : region.address,
    size: region.size,
    is64Bit: region.mem_type_64 ?? false,
    prefetchable: region.prefetch ?? false,
  };
}
