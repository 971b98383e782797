// PCI configuration-space layout. Sources: PCI Local Bus Specification 3.0 §6 (type-0 header),
// PCI Bus Power Management Interface 1.2 §3.2, PCI Express Base 5.0 §7.5–7.7 (MSI, MSI-X, PCIe
// capability), as mirrored by Linux include/uapi/linux/pci_regs.h.

export const CONFIG_SPACE_SIZE = 4096;

export const Cfg = {
  VENDOR_ID: 0x00,
  DEVICE_ID: 0x02,
  COMMAND: 0x04,
  STATUS: 0x06,
  REVISION: 0x08,
  CLASS_PROG: 0x09,
  CACHE_LINE_SIZE: 0x0c,
  LATENCY_TIMER: 0x0d,
  HEADER_TYPE: 0x0e,
  BAR0: 0x10,
  SUBSYSTEM_VENDOR_ID: 0x2c,
  SUBSYSTEM_ID: 0x2e,
  ROM_ADDRESS: 0x30,
  CAPABILITY_LIST: 0x34,
  INTERRUPT_LINE: 0x3c,
  INTERRUPT_PIN: 0x3d,
  FIRST_CAPABILITY: 0x40,
  EXTENDED_CAPABILITIES: 0x100,
} as const;

export const Command = {
  IO: 0x1,
  MEMORY: 0x2,
  BUS_MASTER: 0x4,
  PARITY: 0x40,
  SERR: 0x100,
  INTX_DISABLE: 0x400,
} as const;

export const Status = {
  INTERRUPT: 0x8,
  CAP_LIST: 0x10,
  /** Error bits software clears by writing 1 (master/target aborts, SERR, parity). */
  WRITE_ONE_TO_CLEAR: 0xf900,
} as const;

export const Bar = {
  IO_SPACE: 0x1,
  MEM_TYPE_64: 0x4,
  PREFETCHABLE: 0x8,
} as const;

export const CapId = { PM: 0x01, MSI: 0x05, PCIE: 0x10, MSIX: 0x11 } as const;

/** Capability sizes and field offsets, relative to the capability's own start. */
export const PmCap = { SIZE: 8, PMC: 2, PMCSR: 4, PMCSR_STATE_MASK: 0x3, PMCSR_NO_SOFT_RESET: 0x8 } as const;

export const MsiCap = {
  /** 64-bit address, per-vector masking: id/next, control, addr lo/hi, data, reserved, mask, pending. */
  SIZE: 24,
  CONTROL: 2,
  ADDRESS_LO: 4,
  ADDRESS_HI: 8,
  DATA: 12,
  MASK: 16,
  PENDING: 20,
  CTRL_ENABLE: 0x1,
  CTRL_MULTI_CAPABLE_SHIFT: 1,
  CTRL_MULTI_ENABLE_MASK: 0x70,
  CTRL_64BIT: 0x80,
  CTRL_PER_VECTOR_MASK: 0x100,
} as const;

export const MsixCap = {
  SIZE: 12,
  CONTROL: 2,
  TABLE: 4,
  PBA: 8,
  CTRL_TABLE_SIZE_MASK: 0x7ff,
  CTRL_FUNCTION_MASK: 0x4000,
  CTRL_ENABLE: 0x8000,
  TABLE_ENTRY_SIZE: 16,
} as const;

export const PcieCap = {
  /** Version 2 capability structure, through Slot Status 2. */
  SIZE: 0x3c,
  FLAGS: 0x02,
  DEVCAP: 0x04,
  DEVCTL: 0x08,
  DEVSTA: 0x0a,
  LNKCAP: 0x0c,
  LNKCTL: 0x10,
  LNKSTA: 0x12,
  DEVCAP2: 0x24,
  DEVCTL2: 0x28,
  LNKCAP2: 0x2c,
  LNKCTL2: 0x30,
  FLAGS_VERSION_2: 0x2,
  FLAGS_TYPE_ENDPOINT: 0x0 << 4,
  DEVCAP_FLR: 1 << 28,
  DEVCAP_RBER: 1 << 15,
  DEVCTL_WRITABLE: 0x7fff,
  DEVCTL_INITIATE_FLR: 0x8000,
  DEVSTA_W1C: 0xf,
  /** 8 GT/s (gen3) x4, the link a modest SSD reports. */
  LNKCAP_SPEED_8GT: 0x3,
  LNKCAP_WIDTH_SHIFT: 4,
  LNKCAP2_SPEEDS_TO_8GT: 0b1110,
  DEVCAP2_COMPLETION_TIMEOUT_RANGES: 0xf,
} as const;
