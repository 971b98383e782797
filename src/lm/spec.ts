// Host Managed Live Migration facts as typed tables: NVMe Base Specification 2.1 §8.1.12 (TP4159,
// "PCIe Infrastructure for Live Migration"), commands in §5.1.16/§5.1.17 (Migration Receive/Send),
// §5.1.26/§5.1.27 (Track Receive/Send), §5.1.5 (Controller Data Queue), Identify CNS 20h, Feature
// 21h, and the NVM Command Set's LBA Migration Queue entry (NVM-CS §5.6, Figure 177). Layouts as
// libnvme and libvfn use them where the parsed spec is garbled (see nvme-live-migration.md).

/** Migration Send (41h) CDW10 SEL. */
export const MigrationSendSelect = { SUSPEND: 0x0, RESUME: 0x1, SET_CONTROLLER_STATE: 0x2 } as const;
/** Migration Send Suspend CDW11 bits 23:16 STYPE. */
export const SuspendType = { NOTIFICATION: 0x0, SUSPEND: 0x1 } as const;
/** Set Controller State MOS bits 1:0 (CDW10 bits 17:16) SEQIND. */
export const SequenceIndicator = { MIDDLE: 0b00, FIRST: 0b01, LAST: 0b10, ONLY: 0b11 } as const;

/** Migration Receive (42h) CDW10 SEL. */
export const MigrationReceiveSelect = { GET_CONTROLLER_STATE: 0x0 } as const;

/** Track Send (3Dh) CDW10 SEL, and the actions in MOS. */
export const TrackSendSelect = { LOG_USER_DATA_CHANGES: 0x0, TRACK_MEMORY_CHANGES: 0x1 } as const;
export const LogAction = { STOP: 0x0, START: 0x1 } as const;
export const TrackAction = { STOP: 0x0, START: 0x1 } as const;
/** Track Receive (3Eh) CDW10 SEL. */
export const TrackReceiveSelect = { TRACKED_MEMORY_CHANGES: 0x0 } as const;

/** Controller Data Queue (45h) CDW10 SEL, and MOS bits 7:0 QT. */
export const CdqSelect = { CREATE: 0x0, DELETE: 0x1 } as const;
export const CdqType = { USER_DATA_MIGRATION: 0x0 } as const;

/** Feature 21h: Controller Data Queue. */
export const FEATURE_CONTROLLER_DATA_QUEUE = 0x21;

/** Management Operation Specific: CDW10 bits 31:16 of every TP4159 command. */
export const MOS_SHIFT = 16;

/** The Controller State data structure (Figure "Controller State"): a 48-byte header. */
export const StateHeader = {
  SIZE: 48,
  VER: 0,
  /** Bit 0: the controller stayed suspended for the whole Get. */
  CSATTR: 2,
  /** NVMe Controller State Size in dwords (128-bit field; the low 64 bits are used). */
  NVMECSS: 16,
  /** Vendor Specific Size in dwords (128-bit field). */
  VSS: 32,
} as const;

/** NVMe Controller State version 0: an 8-byte header, then I/O SQ and I/O CQ states of 24 bytes. */
export const Nvmecs = {
  HEADER_SIZE: 8,
  VER: 0,
  NIOSQ: 2,
  NIOCQ: 4,
  ENTRY_SIZE: 24,
  /** I/O SQ state: PRP1 u64, QSIZE, SQID, CQID, SQA (bit 0 PC, bits 2:1 QPRIO), head, tail. */
  SQ: { PRP1: 0, QSIZE: 8, SQID: 10, CQID: 12, ATTRIBUTES: 14, HEAD: 16, TAIL: 18 },
  /** I/O CQ state: PRP1 u64, QSIZE, CQID, head, tail, CQA (bit 0 PC, 1 IEN, 2 S0PT, bits 31:16 IV). */
  CQ: { PRP1: 0, QSIZE: 8, CQID: 10, HEAD: 12, TAIL: 14, ATTRIBUTES: 16 },
  SQ_PC: 1 << 0,
  SQ_QPRIO_SHIFT: 1,
  CQ_PC: 1 << 0,
  CQ_IEN: 1 << 1,
  CQ_S0PT: 1 << 2,
  CQ_IV_SHIFT: 16,
} as const;

/** NVMECS versions this controller offers, in Identify CNS 20h order (CSVI 1 = the first). */
export const NVMECS_VERSIONS = [0] as const;

/** Our vendor state format (src/lm/controller-state.proto), CSUUIDI 1 in CNS 20h. */
export const VENDOR_STATE_UUID = '6e767566-6d69-4772-8174-696f6e000001';

/** LBA Migration Queue Entry Type 0 (NVM-CS Figure 177): 32 bytes. */
export const LbaMigrationEntry = {
  SIZE: 32,
  NSID: 0,
  /** 0-based. */
  NLB: 4,
  SLBA: 8,
  ATTRIBUTES: 31,
  CDQP: 1 << 0,
  ESA_SHIFT: 1,
  DLBA: 1 << 5,
  LBACIR_SHIFT: 6,
} as const;

/** Entry Sequence Attribute (LBAMQA bits 3:1). */
export const EntrySequence = {
  ORDINARY: 0b000,
  FIRST_AFTER_START: 0b001,
  LAST_HOST_STOPPED: 0b010,
  LAST_SUSPENDED: 0b011,
  LAST_QUEUE_FULL: 0b111,
} as const;

/** LBA Change Information Range (LBAMQA bits 7:6). */
export const LbaChangeRange = { RANGE: 0b00, WHOLE_NAMESPACE: 0b01, NO_RANGE: 0b10 } as const;

/** Identify Controller (CNS 01h) fields of a Migration Management Controller (byte offsets). */
export const IdentifyLm = {
  CMMRTD: 570,
  NMMRTD: 572,
  MINMRTG: 574,
  MAXMRTG: 575,
  TRATTR: 576,
  MCUDMQ: 578,
  MNSUDMQ: 580,
  MCMR: 582,
  NMCMR: 584,
  MCDQPC: 586,
  /** TRATTR bit 0: Track Host Memory Changes Support; bit 1: Track User Data Changes Support; bit 2: MRTLL. */
  THMCS: 1 << 0,
  TUDCS: 1 << 1,
  MRTLL: 1 << 2,
} as const;

/** Track Memory Changes data (Track Send SEL 1, TACT=1). */
export const TrackMemoryLayout = { HEADER: 8, VER: 0, RMRTG: 3, RNMRTD: 4, DESCRIPTOR_SIZE: 12 } as const;
/** Tracked Memory Changes (Track Receive SEL 0): a 16-byte header, then 16-byte descriptors. */
export const TrackedChangesLayout = { HEADER: 16, VER: 0, ATTRIBUTES: 1, CNTLID: 2, NTMCD: 4, RPMPG: 8, DESCRIPTOR_SIZE: 16, MTR: 1 << 0, SUSP: 1 << 1 } as const;
