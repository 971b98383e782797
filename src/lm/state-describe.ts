// A controller state decoded for a human (`nvme-vfio-user state show`), and as plain JSON.

import { decodeControllerState, decodeNvmecs, decodeVendor } from './state-format.js';

export function describeState(bytes: Uint8Array): { text: string; json: unknown } {
  const sections = decodeControllerState(bytes);
  const queues = sections.nvmecs ? decodeNvmecs(sections.nvmecs) : null;
  const vendor = sections.vendor ? decodeVendor(sections.vendor) : null;
  const lines = [
    `controller state: ${bytes.length} bytes, ${sections.suspendedThroughout ? 'taken while suspended' : 'NOT taken while suspended (may be inconsistent)'}`,
    `NVMe controller state (v0): ${sections.nvmecs ? `${sections.nvmecs.length} bytes` : 'absent'}`,
  ];
  if (queues) {
    for (const sq of queues.sqs) lines.push(`  SQ ${sq.qid}: ${sq.size} entries at 0x${sq.base.toString(16)}, head ${sq.head}, tail ${sq.tail}, CQ ${sq.cqid}`);
    for (const cq of queues.cqs) {
      lines.push(`  CQ ${cq.qid}: ${cq.size} entries at 0x${cq.base.toString(16)}, head ${cq.head}, tail ${cq.tail}, phase ${cq.phase}, ${cq.interruptsEnabled ? `vector ${cq.vector}` : 'no interrupts'}`);
    }
  }
  lines.push(`vendor state: ${sections.vendor ? `${sections.vendor.length} bytes` : 'absent'}`);
  if (vendor) {
    const s = vendor.state;
    const r = s.registers;
    lines.push(
      `  identity: ${vendor.identity.nqn}, controller ${vendor.identity.cntlid}, serial ${vendor.identity.serial}${vendor.identity.noVolatileWriteCache ? ', no volatile write cache' : ''}`,
      `  registers: CC 0x${r.cc.toString(16)} CSTS 0x${r.csts.toString(16)} AQA 0x${r.aqa.toString(16)} ASQ 0x${r.asq.toString(16)} ACQ 0x${r.acq.toString(16)} INTMS 0x${r.intms.toString(16)}`,
      `  admin queues: ${s.submissionQueues[0] ? `SQ head ${s.submissionQueues[0].head} tail ${s.submissionQueues[0].tail}, CQ head ${s.completionQueues[0]?.head} tail ${s.completionQueues[0]?.tail} phase ${s.completionQueues[0]?.phase}` : 'none'}`,
      `  held completions: ${s.heldCompletions.length}; outstanding Asynchronous Event Requests: ${s.asyncEvents.outstanding.length} (CIDs ${s.asyncEvents.outstanding.join(',') || '-'}); queued events: ${s.asyncEvents.queued.length}`,
      `  I/O queues granted: ${s.features.ioSubmissionQueues} SQ / ${s.features.ioCompletionQueues} CQ; keep alive ${s.features.keepAliveTimeoutMs} ms; doorbell buffer ${s.doorbellBuffer ? `shadow 0x${s.doorbellBuffer.shadow.toString(16)} eventidx 0x${s.doorbellBuffer.eventIdx.toString(16)}` : 'off'}`,
      `  namespaces: ${vendor.namespaces.map((n) => `${n.nsid} (${n.blocks} blocks, LBA format ${n.lbaFormat})`).join(', ') || 'none'}`,
      `  clocks: ${Math.round(s.clocks.sinceResetMs)} ms since reset, timestamp ${s.clocks.timestampMs ?? 'not set'}, keep-alive left ${s.clocks.keepAliveRemainingMs ?? '-'}`,
      `  SMART: ${s.smart.hostReadCommands} reads, ${s.smart.hostWriteCommands} writes, ${s.errorLog.count} errors logged`,
    );
  }
  const json = {
    bytes: bytes.length,
    suspendedThroughout: sections.suspendedThroughout,
    queues,
    vendor: vendor ? { identity: vendor.identity, namespaces: vendor.namespaces.map((n) => ({ ...n, nguid: Buffer.from(n.nguid).toString('hex') })), state: vendor.state } : null,
  };
  return { text: lines.join('\n'), json };
}
