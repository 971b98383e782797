// The QEMU options that attach a vfio-user socket as a PCI function (QEMU >= 10.1).

/** `-device` for one vfio-user socket. */
export function vfioUserDeviceOption(socketPath: string): string {
  return `-device '${JSON.stringify({ driver: 'vfio-user-pci', socket: { path: socketPath, type: 'unix' } })}'`;
}
