// The PCI configuration the orchestrator gives the destination VM: in full before the migration,
// then only the groups the guest changed. A fake monitor records the port writes (HMP `o`) and a
// fake control socket the MSI-X table writes.

import { describe, expect, it } from 'vitest';
import { CapId, Cfg, MsiCap, MsixCap } from '../../../src/pci/registers.js';
import { replayPciShadow, type PciEndpoint, type PciShadow } from '../../../src/mgmt/pci-shadow.js';
import type { QmpClient } from '../../../src/mgmt/qemu/qmp.js';
import type { ControlClient } from '../../../src/mgmt/control/client.js';

const MSI_AT = 0x50;
const MSIX_AT = 0x70;
const VECTORS = 4;

function shadow(): PciShadow {
  const config = Buffer.alloc(256);
  config.writeUInt16LE(0x0406, Cfg.COMMAND);
  config.writeUInt32LE(0xfebf0004, Cfg.BAR0); // 64-bit memory BAR0
  config.writeUInt32LE(0x00000001, Cfg.BAR0 + 4);
  config.writeUInt32LE(0xfebe0004, Cfg.BAR0 + 16); // 64-bit memory BAR4: the MSI-X table
  config[Cfg.CAPABILITY_LIST] = MSI_AT;
  config[MSI_AT] = CapId.MSI;
  config[MSI_AT + 1] = MSIX_AT;
  config.writeUInt16LE(MsiCap.CTRL_64BIT | MsiCap.CTRL_PER_VECTOR_MASK, MSI_AT + MsiCap.CONTROL);
  config.writeUInt32LE(0xfee00000, MSI_AT + MsiCap.ADDRESS_LO);
  config.writeUInt16LE(0x4021, MSI_AT + MsiCap.DATA);
  config[MSIX_AT] = CapId.MSIX;
  config.writeUInt16LE(MsixCap.CTRL_ENABLE | (VECTORS - 1), MSIX_AT + MsixCap.CONTROL);
  config.writeUInt32LE(4, MSIX_AT + MsixCap.TABLE); // BIR 4, offset 0
  const msixTable = new Uint8Array(VECTORS * MsixCap.TABLE_ENTRY_SIZE).map((_, i) => i);
  return { config, msixTable };
}

const copy = (s: PciShadow): PciShadow => ({ config: Buffer.from(s.config), msixTable: s.msixTable && Uint8Array.from(s.msixTable) });

/** A destination whose monitor and control socket record what they are asked to write. */
function destination(): { endpoint: PciEndpoint; configWrites: { offset: number; value: number }[]; tableWrites: { address: number; bytes: number }[] } {
  const configWrites: { offset: number; value: number }[] = [];
  const tableWrites: { address: number; bytes: number }[] = [];
  let latch = 0;
  const qmp = {
    async hmp(line: string): Promise<string> {
      const read = /^i \/w 0xcf8$/.exec(line);
      if (read) return `portl[0xcf8] = 0x${latch.toString(16)}\n`;
      const write = /^o \/[bhw] (0x[0-9a-f]+) (0x[0-9a-f]+)$/.exec(line);
      if (!write) throw new Error(`unexpected HMP: ${line}`);
      const port = Number(write[1]);
      const value = Number(write[2]);
      if (port === 0xcf8) latch = value;
      else configWrites.push({ offset: (latch & 0xfc) + (port - 0xcfc), value });
      return '';
    },
  } as unknown as QmpClient;
  const control = {
    async request(r: { clientMemory: { address: number; writeData: Uint8Array } }): Promise<object> {
      tableWrites.push({ address: r.clientMemory.address, bytes: r.clientMemory.writeData.length });
      return {};
    },
  } as unknown as ControlClient;
  return { endpoint: { qmp, control, address: { bus: 0, slot: 3, function: 0 }, cntlid: 1 }, configWrites, tableWrites };
}

describe('replaying QEMU’s PCI configuration into the destination VM', () => {
  it('in full: BARs before the command register, MSI enable last, the table at the BAR address, then MSI-X control', async () => {
    const d = destination();
    const written = await replayPciShadow(d.endpoint, shadow());
    expect(written).toEqual(['BARs and command', 'MSI', 'MSI-X table', 'MSI-X control']);
    const offsets = d.configWrites.map((w) => w.offset);
    expect(offsets.indexOf(Cfg.COMMAND)).toBeGreaterThan(offsets.lastIndexOf(Cfg.BAR0 + 20));
    expect(offsets.indexOf(MSI_AT + MsiCap.CONTROL)).toBeGreaterThan(offsets.indexOf(MSI_AT + MsiCap.MASK));
    expect(offsets[offsets.length - 1]).toBe(MSIX_AT + MsixCap.CONTROL);
    expect(d.configWrites.find((w) => w.offset === Cfg.BAR0 + 4)!.value).toBe(1);
    expect(d.tableWrites).toEqual([{ address: 0xfebe0000, bytes: VECTORS * MsixCap.TABLE_ENTRY_SIZE }]);
  });

  it('nothing when the guest changed nothing since the destination got it', async () => {
    const d = destination();
    expect(await replayPciShadow(d.endpoint, shadow(), shadow())).toEqual([]);
    expect(d.configWrites).toEqual([]);
    expect(d.tableWrites).toEqual([]);
  });

  it('only MSI when the guest moved its MSI vector', async () => {
    const d = destination();
    const now = shadow();
    now.config.writeUInt16LE(0x4031, MSI_AT + MsiCap.DATA);
    expect(await replayPciShadow(d.endpoint, now, shadow())).toEqual(['MSI']);
    expect(d.configWrites.map((w) => w.offset)).toEqual([MSI_AT + 4, MSI_AT + 8, MSI_AT + 12, MSI_AT + 16, MSI_AT + 2]);
    expect(d.configWrites.find((w) => w.offset === MSI_AT + MsiCap.DATA)!.value).toBe(0x4031);
  });

  it('the table and MSI-X control when the guest rewrote or masked a vector', async () => {
    const d = destination();
    const now = shadow();
    now.msixTable![12] = 1; // vector 0's mask bit
    expect(await replayPciShadow(d.endpoint, now, shadow())).toEqual(['MSI-X table', 'MSI-X control']);
    expect(d.configWrites.map((w) => w.offset)).toEqual([MSIX_AT + MsixCap.CONTROL]);
  });

  it('everything behind a moved BAR, the table included', async () => {
    const d = destination();
    const before = shadow();
    const now = copy(before);
    now.config.writeUInt32LE(0xfebd0004, Cfg.BAR0 + 16);
    expect(await replayPciShadow(d.endpoint, now, before)).toEqual(['BARs and command', 'MSI-X table', 'MSI-X control']);
    expect(d.tableWrites).toEqual([{ address: 0xfebd0000, bytes: VECTORS * MsixCap.TABLE_ENTRY_SIZE }]);
  });
});
