// Our Migration Management Controller's own limits where TP4159 leaves the choice to the
// controller; Identify Controller reports exactly these (src/lm/spec.ts IdentifyLm).

/** Memory range tracking descriptors one controller may track (CMMRTD) and the subsystem in all (NMMRTD). */
export const TRACKING_DESCRIPTORS_PER_CONTROLLER = 64;
export const TRACKING_DESCRIPTORS_IN_SUBSYSTEM = 256;
/** Tracking granularities: 2^n × 4 KiB for n in MINMRTG..MAXMRTG (4 KiB to 2 MiB). */
export const MIN_TRACKING_GRANULARITY = 0;
export const MAX_TRACKING_GRANULARITY = 9;
/** User Data Migration Queues per controller (MCUDMQ) and in the subsystem (MNSUDMQ). */
export const USER_DATA_QUEUES = 16;
/** Memory ranges one Controller Data Queue may span (MCMR), all of them (NMCMR), PRPs in its list (MCDQPC). */
export const CDQ_RANGES = 64;
export const CDQ_RANGES_IN_SUBSYSTEM = 1024;
export const CDQ_LIST_PRPS = 64;
