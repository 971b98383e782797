// NVMe facts as typed tables. Each table names the section of the NVM Express Base Specification
// 2.0 (or the NVM Command Set Specification 1.0, "NVM-CS") it comes from, once. Everything else in
// src/nvme/ refers to these names instead of bare numbers.

// ---- PCI identity -----------------------------------------------------------------------------

/**
 * Our own PCI IDs: 'NV' / 'ME' in ASCII. Not assigned by the PCI-SIG to anyone we know of and not
 * QEMU's nvme (1b36:0010); guests bind by class code 01:08:02, never by these IDs.
 */
export const PciIdentity = {
  VENDOR_ID: 0x4e56,
  DEVICE_ID: 0x4d45,
  SUBSYSTEM_VENDOR_ID: 0x4e56,
  SUBSYSTEM_ID: 0x0001,
  REVISION: 0x01,
  /** Mass storage / Non-Volatile memory controller / NVM Express (PCI Code and ID Assignment). */
  CLASS_CODE: 0x010802,
} as const;

// ---- Controller properties (Base §3.1.4, "Controller Properties") -----------------------------

export const Reg = {
  CAP: 0x00,
  VS: 0x08,
  INTMS: 0x0c,
  INTMC: 0x10,
  CC: 0x14,
  CSTS: 0x1c,
  NSSR: 0x20,
  AQA: 0x24,
  ASQ: 0x28,
  ACQ: 0x30,
  /** First doorbell; SQyTDBL = DOORBELLS + 2y·stride, CQyHDBL = DOORBELLS + (2y+1)·stride. */
  DOORBELLS: 0x1000,
} as const;

/** CAP field positions (bit offsets inside the 64-bit register). */
export const Cap = {
  MQES_SHIFT: 0,
  CQR_SHIFT: 16,
  AMS_SHIFT: 17,
  TO_SHIFT: 24,
  DSTRD_SHIFT: 32,
  NSSRS_SHIFT: 36,
  CSS_SHIFT: 37,
  MPSMIN_SHIFT: 48,
  MPSMAX_SHIFT: 52,
  /** CSS bit 0: the NVM command set. */
  CSS_NVM: 0x01,
} as const;

export const CC = {
  EN: 0x1,
  CSS_SHIFT: 4,
  CSS_MASK: 0x7,
  MPS_SHIFT: 7,
  MPS_MASK: 0xf,
  AMS_SHIFT: 11,
  AMS_MASK: 0x7,
  SHN_SHIFT: 14,
  SHN_MASK: 0x3,
  IOSQES_SHIFT: 16,
  IOCQES_SHIFT: 20,
  ES_MASK: 0xf,
  /** Bits a host may set (everything else reads back as zero). */
  WRITABLE: 0x00ff_fff1,
  CSS_NVM: 0,
  AMS_ROUND_ROBIN: 0,
  SHN_NONE: 0,
} as const;

export const CSTS = {
  RDY: 0x1,
  CFS: 0x2,
  SHST_SHIFT: 2,
  SHST_MASK: 0x3 << 2,
  SHST_NORMAL: 0,
  SHST_OCCURRING: 1,
  SHST_COMPLETE: 2,
} as const;

export const AQA = { ASQS_MASK: 0xfff, ACQS_SHIFT: 16, ACQS_MASK: 0xfff } as const;

/** log2 of the only queue entry sizes we accept (Base §3.3.3.1 / §3.3.3.2): 64-byte SQE, 16-byte CQE. */
export const SQE_SIZE_LOG2 = 6;
export const CQE_SIZE_LOG2 = 4;
export const SQE_SIZE = 1 << SQE_SIZE_LOG2;
export const CQE_SIZE = 1 << CQE_SIZE_LOG2;

/** Version register value 1.4.0 (Base §3.1.4.2 layout: major 31:16, minor 15:8, tertiary 7:0). */
export const NVME_VERSION_1_4 = 0x0001_0400;

// ---- Submission queue entry layout (Base §4.2, "Submission Queue Entry") ----------------------

export const Sqe = {
  OPCODE: 0,
  FLAGS: 1,
  CID: 2,
  NSID: 4,
  CDW2: 8,
  CDW3: 12,
  MPTR: 16,
  PRP1: 24,
  PRP2: 32,
  /** SGL1 occupies the same 16 bytes as PRP1+PRP2. */
  SGL1: 24,
  CDW10: 40,
  CDW11: 44,
  CDW12: 48,
  CDW13: 52,
  CDW14: 56,
  CDW15: 60,
  /** FLAGS bits 7:6: PRP or SGL for data transfer. */
  PSDT_SHIFT: 6,
  PSDT_MASK: 0x3,
  FUSE_MASK: 0x3,
} as const;

/** Completion queue entry (Base §4.2.1, Figure 89): the status field sits above the phase tag. */
export const Cqe = { DW0: 0, DW1: 4, SQHD: 8, SQID: 10, CID: 12, STATUS_PHASE: 14, STATUS_SHIFT: 1 } as const;

/** Command-specific Dword bits (NVM-CS §3.2: Read/Write CDW12, Write Zeroes CDW12, DSM CDW11;
 * Base §5.16: Get Log Page CDW10; Base §5.27.1.5: Error Recovery CDW11). */
export const CmdBits = {
  RW_FUA: 1 << 30,
  WRITE_ZEROES_DEAC: 1 << 25,
  DSM_ATTRIBUTE_DEALLOCATE: 1 << 2,
  DSM_RANGE_SIZE: 16,
  LOG_RETAIN_ASYNC_EVENT: 1 << 15,
  ERROR_RECOVERY_DULBE: 1 << 16,
} as const;

export const Psdt = { PRP: 0, SGL_MPTR_CONTIGUOUS: 1, SGL_MPTR_SGL: 2 } as const;

export const NSID_BROADCAST = 0xffff_ffff;

// ---- Opcodes (Base §5 Figure 28 "Admin commands"; NVM-CS §3 Figure 16 "I/O commands") --------

export const AdminOpcode = {
  DELETE_IO_SQ: 0x00,
  CREATE_IO_SQ: 0x01,
  GET_LOG_PAGE: 0x02,
  DELETE_IO_CQ: 0x04,
  CREATE_IO_CQ: 0x05,
  IDENTIFY: 0x06,
  ABORT: 0x08,
  SET_FEATURES: 0x09,
  GET_FEATURES: 0x0a,
  ASYNC_EVENT_REQUEST: 0x0c,
  KEEP_ALIVE: 0x18,
  DOORBELL_BUFFER_CONFIG: 0x7c,
  FORMAT_NVM: 0x80,
} as const;

export const NvmOpcode = {
  FLUSH: 0x00,
  WRITE: 0x01,
  READ: 0x02,
  COMPARE: 0x05,
  WRITE_ZEROES: 0x08,
  DATASET_MANAGEMENT: 0x09,
  VERIFY: 0x0c,
} as const;

/**
 * Admin commands only a primary controller carries (Base §5 Figure 28: Namespace Attachment 15h,
 * Virtualization Management 1Ch; TP4159: Track Send 3Dh, Track Receive 3Eh, Migration Send 41h,
 * Migration Receive 42h, Controller Data Queue 45h). Kept apart from AdminOpcode, which every
 * controller supports.
 */
export const PrimaryOpcode = {
  NAMESPACE_ATTACHMENT: 0x15,
  VIRTUALIZATION_MANAGEMENT: 0x1c,
  TRACK_SEND: 0x3d,
  TRACK_RECEIVE: 0x3e,
  MIGRATION_SEND: 0x41,
  MIGRATION_RECEIVE: 0x42,
  CONTROLLER_DATA_QUEUE: 0x45,
} as const;

/** Virtualization Management CDW10 (Base §5.22): ACT 3:0, RT 10:8, CNTLID 31:16. */
export const VirtAction = { PRIMARY_FLEXIBLE_ALLOCATION: 0x1, SECONDARY_OFFLINE: 0x7, SECONDARY_ASSIGN: 0x8, SECONDARY_ONLINE: 0x9 } as const;
export const VirtResource = { QUEUE: 0, INTERRUPT: 1 } as const;

/** Namespace Attachment CDW10 SEL (Base §5.19). */
export const NamespaceAttachSelect = { ATTACH: 0x0, DETACH: 0x1 } as const;

// ---- Completion status (Base §4.6.1.2 "Status Code Type" and Figures 101–104) -----------------

export const StatusCodeType = { GENERIC: 0, COMMAND_SPECIFIC: 1, MEDIA: 2, PATH: 3 } as const;

/** Builds the 15-bit Status field (CQE DW3 bits 31:17): DNR 14, M 13, CRD 12:11, SCT 10:8, SC 7:0. */
const status = (sct: number, sc: number, dnr = true): number => ((dnr ? 1 : 0) << 14) | (sct << 8) | sc;

export const Status = {
  SUCCESS: 0,
  // Generic command status
  INVALID_OPCODE: status(StatusCodeType.GENERIC, 0x01),
  INVALID_FIELD: status(StatusCodeType.GENERIC, 0x02),
  COMMAND_ID_CONFLICT: status(StatusCodeType.GENERIC, 0x03),
  DATA_TRANSFER_ERROR: status(StatusCodeType.GENERIC, 0x04, false),
  INTERNAL_ERROR: status(StatusCodeType.GENERIC, 0x06, false),
  ABORT_REQUESTED: status(StatusCodeType.GENERIC, 0x07),
  ABORTED_SQ_DELETION: status(StatusCodeType.GENERIC, 0x08),
  INVALID_NAMESPACE: status(StatusCodeType.GENERIC, 0x0b),
  COMMAND_SEQUENCE_ERROR: status(StatusCodeType.GENERIC, 0x0c),
  INVALID_SGL_SEGMENT_DESCRIPTOR: status(StatusCodeType.GENERIC, 0x0d),
  INVALID_SGL_DESCRIPTOR_COUNT: status(StatusCodeType.GENERIC, 0x0e),
  DATA_SGL_LENGTH_INVALID: status(StatusCodeType.GENERIC, 0x0f),
  SGL_DESCRIPTOR_TYPE_INVALID: status(StatusCodeType.GENERIC, 0x11),
  PRP_OFFSET_INVALID: status(StatusCodeType.GENERIC, 0x13),
  LBA_OUT_OF_RANGE: status(StatusCodeType.GENERIC, 0x80),
  CAPACITY_EXCEEDED: status(StatusCodeType.GENERIC, 0x81),
  NAMESPACE_NOT_READY: status(StatusCodeType.GENERIC, 0x82, false),
  FORMAT_IN_PROGRESS: status(StatusCodeType.GENERIC, 0x84, false),
  // Command specific status
  COMPLETION_QUEUE_INVALID: status(StatusCodeType.COMMAND_SPECIFIC, 0x00),
  INVALID_QUEUE_IDENTIFIER: status(StatusCodeType.COMMAND_SPECIFIC, 0x01),
  INVALID_QUEUE_SIZE: status(StatusCodeType.COMMAND_SPECIFIC, 0x02),
  ABORT_COMMAND_LIMIT_EXCEEDED: status(StatusCodeType.COMMAND_SPECIFIC, 0x03),
  ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED: status(StatusCodeType.COMMAND_SPECIFIC, 0x05),
  INVALID_INTERRUPT_VECTOR: status(StatusCodeType.COMMAND_SPECIFIC, 0x08),
  INVALID_LOG_PAGE: status(StatusCodeType.COMMAND_SPECIFIC, 0x09),
  INVALID_FORMAT: status(StatusCodeType.COMMAND_SPECIFIC, 0x0a),
  INVALID_QUEUE_DELETION: status(StatusCodeType.COMMAND_SPECIFIC, 0x0c),
  FEATURE_NOT_SAVEABLE: status(StatusCodeType.COMMAND_SPECIFIC, 0x0d),
  FEATURE_NOT_CHANGEABLE: status(StatusCodeType.COMMAND_SPECIFIC, 0x0e),
  NAMESPACE_ALREADY_ATTACHED: status(StatusCodeType.COMMAND_SPECIFIC, 0x18),
  NAMESPACE_IS_PRIVATE: status(StatusCodeType.COMMAND_SPECIFIC, 0x19),
  NAMESPACE_NOT_ATTACHED: status(StatusCodeType.COMMAND_SPECIFIC, 0x1a),
  CONTROLLER_LIST_INVALID: status(StatusCodeType.COMMAND_SPECIFIC, 0x1c),
  INVALID_CONTROLLER_IDENTIFIER: status(StatusCodeType.COMMAND_SPECIFIC, 0x1f),
  INVALID_SECONDARY_CONTROLLER_STATE: status(StatusCodeType.COMMAND_SPECIFIC, 0x20),
  INVALID_NUMBER_OF_CONTROLLER_RESOURCES: status(StatusCodeType.COMMAND_SPECIFIC, 0x21),
  INVALID_RESOURCE_IDENTIFIER: status(StatusCodeType.COMMAND_SPECIFIC, 0x22),
  // Host Managed Live Migration (TP4159; Base 2.1 Figure 103)
  INVALID_CONTROLLER_DATA_QUEUE: status(StatusCodeType.COMMAND_SPECIFIC, 0x37),
  NOT_ENOUGH_RESOURCES: status(StatusCodeType.COMMAND_SPECIFIC, 0x38),
  CONTROLLER_SUSPENDED: status(StatusCodeType.COMMAND_SPECIFIC, 0x39),
  CONTROLLER_NOT_SUSPENDED: status(StatusCodeType.COMMAND_SPECIFIC, 0x3a),
  CONTROLLER_DATA_QUEUE_FULL: status(StatusCodeType.COMMAND_SPECIFIC, 0x3b),
  // Media and data integrity errors
  WRITE_FAULT: status(StatusCodeType.MEDIA, 0x80, false),
  UNRECOVERED_READ_ERROR: status(StatusCodeType.MEDIA, 0x81, false),
  COMPARE_FAILURE: status(StatusCodeType.MEDIA, 0x85),
} as const;

export const statusName = (value: number): string => {
  for (const [name, v] of Object.entries(Status)) if (v === value) return name;
  return `SCT ${(value >> 8) & 7} SC 0x${(value & 0xff).toString(16)}`;
};

/** Status without the DNR/More bits: what "is this the same error" compares. */
export const statusCode = (value: number): number => value & 0x7ff;

// ---- Identify (Base §5.17, Figure 273 "CNS values") ------------------------------------------

export const Cns = {
  NAMESPACE: 0x00,
  CONTROLLER: 0x01,
  ACTIVE_NAMESPACES: 0x02,
  NAMESPACE_DESCRIPTORS: 0x03,
  CSI_NAMESPACE: 0x05,
  CSI_CONTROLLER: 0x06,
  CSI_ACTIVE_NAMESPACES: 0x07,
  CSI_INDEPENDENT_NAMESPACE: 0x08,
  ATTACHED_CONTROLLERS: 0x12,
  CONTROLLER_LIST: 0x13,
  PRIMARY_CONTROLLER_CAPABILITIES: 0x14,
  SECONDARY_CONTROLLER_LIST: 0x15,
  IO_COMMAND_SET: 0x1c,
  /** TP4159: Supported Controller State Formats. */
  SUPPORTED_CONTROLLER_STATE_FORMATS: 0x20,
} as const;

/** Command Set Identifiers (Base §5.17.2.1 / Figure 286). */
export const Csi = { NVM: 0x00 } as const;

/** Namespace Identification Descriptor types (Base §5.17.2.3, Figure 291). */
export const NsIdType = { EUI64: 1, NGUID: 2, UUID: 3, CSI: 4 } as const;

export const IDENTIFY_SIZE = 4096;

// ---- Features (Base §5.27.1, Figure 316 "Feature Identifiers") -------------------------------

export const FeatureId = {
  ARBITRATION: 0x01,
  POWER_MANAGEMENT: 0x02,
  TEMPERATURE_THRESHOLD: 0x04,
  ERROR_RECOVERY: 0x05,
  VOLATILE_WRITE_CACHE: 0x06,
  NUMBER_OF_QUEUES: 0x07,
  INTERRUPT_COALESCING: 0x08,
  INTERRUPT_VECTOR_CONFIG: 0x09,
  WRITE_ATOMICITY: 0x0a,
  ASYNC_EVENT_CONFIG: 0x0b,
  TIMESTAMP: 0x0e,
  KEEP_ALIVE_TIMER: 0x0f,
  HOST_BEHAVIOR_SUPPORT: 0x16,
} as const;

/**
 * Interrupt Coalescing, Feature 08h (Base §5.27.1.9): CDW11 holds Aggregation Threshold (THR,
 * completion entries per vector, 0's based) in bits 7:0 and Aggregation Time (TIME, the longest a
 * controller should delay an interrupt to coalesce, in 100 µs units; 0 = no delay) in bits 15:8.
 * The settings are not applied to the Admin Completion Queue.
 */
export const InterruptCoalescing = { THR_MASK: 0xff, TIME_SHIFT: 8, TIME_MASK: 0xff, TIME_UNIT_US: 100, FIELDS_MASK: 0xffff } as const;

/**
 * Interrupt Vector Configuration, Feature 09h (Base §5.27.1.10): CDW11 bits 15:0 name the vector
 * (IV), bit 16 is Coalescing Disable (CD): no coalescing for that vector.
 */
export const InterruptVectorConfig = { IV_MASK: 0xffff, CD: 1 << 16 } as const;

/** Get Features Select field (Base §5.15, Figure 195). */
export const FeatureSelect = { CURRENT: 0, DEFAULT: 1, SAVED: 2, SUPPORTED_CAPABILITIES: 3 } as const;

// ---- Log pages (Base §5.16.1, Figure 202 "Log Page Identifiers") -----------------------------

export const LogId = {
  ERROR_INFORMATION: 0x01,
  SMART_HEALTH: 0x02,
  FIRMWARE_SLOT: 0x03,
  CHANGED_NAMESPACES: 0x04,
  COMMANDS_SUPPORTED_AND_EFFECTS: 0x05,
} as const;

// ---- Asynchronous events (Base §5.2, Figures 146–150) ----------------------------------------

export const AsyncEventType = { ERROR: 0, SMART_HEALTH: 1, NOTICE: 2, ONE_SHOT: 4 } as const;

export const AsyncEventInfo = {
  /** Error: a doorbell was written for a queue that does not exist. */
  INVALID_DOORBELL_REGISTER: 0x00,
  /** Error: a doorbell value outside the queue, or a CQ head past what was posted. */
  INVALID_DOORBELL_VALUE: 0x01,
  /** Notice: Changed Namespace List log has new entries. */
  NAMESPACE_ATTRIBUTE_CHANGED: 0x00,
  /** One-Shot (Base 2.1 Figure 154): the Controller Data Queue's tail reached its trigger slot. */
  CDQ_TAIL_POINTER: 0x00,
  /** One-Shot: a Controller Data Queue became full. */
  CDQ_FULL: 0x01,
} as const;

/** Asynchronous Event Configuration feature bits (Base §5.27.1.7). */
export const AsyncEventConfig = { SMART_CRITICAL_WARNINGS: 0xff, NAMESPACE_ATTRIBUTE_NOTICES: 1 << 8 } as const;

// ---- SGL descriptors (Base §4.3.2, Figure 117 "SGL Descriptor Types") ------------------------

export const SglType = { DATA_BLOCK: 0x0, BIT_BUCKET: 0x1, SEGMENT: 0x2, LAST_SEGMENT: 0x3, KEYED_DATA_BLOCK: 0x4 } as const;
export const SGL_DESCRIPTOR_SIZE = 16;
/** Descriptor subtype 0: the address field is a memory address (the only one PCIe uses). */
export const SGL_SUBTYPE_ADDRESS = 0x0;

// ---- Identify Controller capability bits (Base §5.17.2.1, Figure 275) -------------------------

export const Oacs = {
  FORMAT_NVM: 1 << 1,
  NAMESPACE_MANAGEMENT: 1 << 3,
  VIRTUALIZATION_MANAGEMENT: 1 << 7,
  DOORBELL_BUFFER_CONFIG: 1 << 8,
  /** TP4159: Host Managed Live Migration Support (the controller is a Migration Management Controller). */
  HOST_MANAGED_LIVE_MIGRATION: 1 << 11,
} as const;
export const Oncs = {
  COMPARE: 1 << 0,
  DATASET_MANAGEMENT: 1 << 2,
  WRITE_ZEROES: 1 << 3,
  SAVE_SELECT: 1 << 4,
  TIMESTAMP: 1 << 6,
  VERIFY: 1 << 7,
} as const;
export const Lpa = { COMMANDS_EFFECTS: 1 << 1, EXTENDED_DATA: 1 << 2 } as const;
export const Oaes = { NAMESPACE_ATTRIBUTE_NOTICES: 1 << 8 } as const;
/** SGLS: bits 1:0 = 01b "SGLs supported, no alignment requirement"; bit 18: SGL longer than data allowed. */
export const Sgls = { SUPPORTED: 0x1, LONGER_THAN_DATA: 1 << 18 } as const;

/** Commands Supported and Effects entry bits (Base §5.16.1.6, Figure 211). */
export const CommandEffect = {
  SUPPORTED: 1 << 0,
  LBA_CONTENT_CHANGE: 1 << 1,
  NAMESPACE_CAPABILITY_CHANGE: 1 << 2,
  NAMESPACE_INVENTORY_CHANGE: 1 << 3,
  /** CSE = 001b: no other command to the same namespace while this one runs. */
  EXCLUSIVE_PER_NAMESPACE: 1 << 16,
} as const;

// ---- LBA formats we offer (NVM-CS §4.1.5.1 Identify Namespace LBAF) ---------------------------

/** Index → log2(block size). Metadata size 0 for both. */
export const LBA_FORMATS = [9, 12] as const;
