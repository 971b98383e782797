// vfio-user wire constants. Source: QEMU docs/interop/vfio-user.rst ("Protocol Specification",
// "Commands") and Linux include/uapi/linux/vfio.h for the VFIO structures it reuses; the deltas that
// QEMU 11.1 really shows are in shared/reference/qemu-11-facts.md §2.

export const HEADER_SIZE = 16;

export const Command = {
  VERSION: 1,
  DMA_MAP: 2,
  DMA_UNMAP: 3,
  DEVICE_GET_INFO: 4,
  DEVICE_GET_REGION_INFO: 5,
  DEVICE_GET_REGION_IO_FDS: 6,
  DEVICE_GET_IRQ_INFO: 7,
  DEVICE_SET_IRQS: 8,
  REGION_READ: 9,
  REGION_WRITE: 10,
  DMA_READ: 11,
  DMA_WRITE: 12,
  DEVICE_RESET: 13,
  DIRTY_PAGES: 14,
  REGION_WRITE_MULTI: 15,
  DEVICE_FEATURE: 16,
  MIG_DATA_READ: 17,
  MIG_DATA_WRITE: 18,
} as const;

export const commandName = (code: number): string =>
  Object.entries(Command).find(([, value]) => value === code)?.[0] ?? `UNKNOWN(${code})`;

/** Header flags word. */
export const HeaderFlags = {
  TYPE_MASK: 0xf,
  TYPE_COMMAND: 0x0,
  TYPE_REPLY: 0x1,
  NO_REPLY: 0x10,
  ERROR: 0x20,
} as const;

/** Negotiated protocol version: QEMU proposes 0.0 and refuses any other reply. */
export const PROTOCOL_MAJOR = 0;
export const PROTOCOL_MINOR = 0;

export const DmaMapFlags = { READ: 0x1, WRITE: 0x2 } as const;
export const DmaUnmapFlags = { GET_DIRTY_BITMAP: 0x1, ALL: 0x2 } as const;

export const DeviceFlags = { RESET: 0x1, PCI: 0x2 } as const;

export const RegionFlags = { READ: 0x1, WRITE: 0x2, MMAP: 0x4, CAPS: 0x8 } as const;
export const RegionCapId = { SPARSE_MMAP: 1, TYPE: 2, MSIX_MAPPABLE: 3 } as const;

export const IrqInfoFlags = { EVENTFD: 0x1, MASKABLE: 0x2, AUTOMASKED: 0x4, NORESIZE: 0x8 } as const;

export const SetIrqsFlags = {
  DATA_NONE: 0x1,
  DATA_BOOL: 0x2,
  DATA_EVENTFD: 0x4,
  DATA_MASK: 0x7,
  ACTION_MASK: 0x8,
  ACTION_UNMASK: 0x10,
  ACTION_TRIGGER: 0x20,
  ACTION_MASK_ALL: 0x38,
} as const;

/** VFIO PCI region indexes (vfio.h VFIO_PCI_*_REGION_INDEX). */
export const PciRegion = {
  BAR0: 0,
  BAR1: 1,
  BAR2: 2,
  BAR3: 3,
  BAR4: 4,
  BAR5: 5,
  ROM: 6,
  CONFIG: 7,
  VGA: 8,
  COUNT: 9,
} as const;

/** VFIO PCI IRQ indexes (vfio.h VFIO_PCI_*_IRQ_INDEX). */
export const PciIrq = { INTX: 0, MSI: 1, MSIX: 2, ERR: 3, REQ: 4, COUNT: 5 } as const;

// ---- Migration v2 (DEVICE_FEATURE, MIG_DATA_*): vfio-user.rst "VFIO_USER_DEVICE_FEATURE", which
// reuses Linux include/uapi/linux/vfio.h (struct vfio_device_feature and its features). -------------

/** DEVICE_FEATURE flags word: the low 16 bits name the feature, the next three the operation. */
export const FeatureFlags = {
  FEATURE_MASK: 0xffff,
  GET: 0x10000,
  SET: 0x20000,
  PROBE: 0x40000,
} as const;

/** Feature indexes vfio-user defines (a subset of vfio.h's VFIO_DEVICE_FEATURE_*). */
export const Feature = {
  MIGRATION: 1,
  MIG_DEVICE_STATE: 2,
  DMA_LOGGING_START: 6,
  DMA_LOGGING_STOP: 7,
  DMA_LOGGING_REPORT: 8,
} as const;

/** Data of a MIGRATION GET reply: which optional states the device offers (RUNNING, STOP and ERROR always exist). */
export const MigrationFlags = { STOP_COPY: 0x1n, P2P: 0x2n, PRE_COPY: 0x4n } as const;

/** enum vfio_device_mig_state. The P2P states exist in the numbering but not in vfio-user. */
export const MigrationState = {
  ERROR: 0,
  STOP: 1,
  RUNNING: 2,
  STOP_COPY: 3,
  RESUMING: 4,
  RUNNING_P2P: 5,
  PRE_COPY: 6,
  PRE_COPY_P2P: 7,
} as const;
export type MigrationState = (typeof MigrationState)[keyof typeof MigrationState];

export const migrationStateName = (value: number): string =>
  Object.entries(MigrationState).find(([, v]) => v === value)?.[0] ?? `state ${value}`;

/** MIG_DEVICE_STATE carries an fd number the socket transport never uses; replies say "none". */
export const NO_DATA_FD = 0xffffffff;

/** Fixed payload sizes (bytes after the 16-byte header). */
export const PayloadSize = {
  DMA_MAP: 32,
  DMA_UNMAP: 24,
  DEVICE_INFO: 16,
  REGION_INFO: 32,
  SPARSE_MMAP_CAP_HEADER: 16,
  SPARSE_MMAP_AREA: 16,
  IRQ_INFO: 16,
  REGION_IO_FDS: 16,
  SET_IRQS: 20,
  REGION_ACCESS: 16,
  DMA_ACCESS: 16,
  WRITE_MULTI_ENTRY: 24,
  WRITE_MULTI_DATA: 8,
  DEVICE_FEATURE: 8,
  FEATURE_MIGRATION: 8,
  FEATURE_MIG_STATE: 8,
  DMA_LOGGING_CONTROL: 16,
  DMA_LOGGING_RANGE: 16,
  DMA_LOGGING_REPORT: 24,
  MIG_DATA: 8,
} as const;

/** A DMA_LOGGING_REPORT bitmap's size: one bit per page of the range, padded to whole u64s. */
export const dirtyBitmapBytes = (length: number, pageSize: number): number => Math.ceil(Math.ceil(length / pageSize) / 64) * 8;

/** Linux errno values used in error replies (positive, as the protocol carries them). */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  E2BIG: 7,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  EINVAL: 22,
  ENOSPC: 28,
  ERANGE: 34,
  ENOSYS: 38,
  EPROTO: 71,
  EMSGSIZE: 90,
  ENOTSUP: 95,
} as const;

export const errnoName = (value: number): string =>
  Object.entries(Errno).find(([, v]) => v === value)?.[0] ?? `errno ${value}`;

/** What this server accepts and promises (sent in the VERSION reply). */
export const Limits = {
  /** Largest REGION/DMA read or write payload; QEMU's default is the same 1 MiB. */
  maxDataTransfer: 1 << 20,
  /** The smallest max_data_xfer_size a client may ask for: one page (refused below, with EINVAL). */
  minClientDataTransfer: 4096,
  /** fds we accept in one message: QEMU splits SET_IRQS fd arrays into runs of this size. */
  maxMessageFds: 16,
  maxDmaMaps: 65535,
  /** Whole-message bound: the largest legal message is a 1 MiB REGION_WRITE. */
  maxMessageSize: (1 << 20) + 64,
  /** Replies a client may leave unread before we hang up on it. */
  maxQueuedReplyBytes: 64 << 20,
  /** Ranges in one DMA_LOGGING_START (the bound Linux puts on the same ioctl, LOG_MAX_RANGES). */
  maxDmaLoggingRanges: 256,
  /** Incoming migration stream a target buffers before RESUMING→STOP hands it to the device. */
  maxMigrationStream: 256 << 20,
} as const;
