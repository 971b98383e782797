import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot, startServerProcess } from '../support/server-process.js';

const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', join(repoRoot, 'src', 'cli.ts'), ...args], { cwd: repoRoot, encoding: 'utf8', timeout: 20_000 });

describe('nvme-vfio-user CLI', () => {
  it.each([
    [['serve', '--bogus'], /Unknown option '--bogus'/],
    [['serve', '--device', 'floppy'], /unknown device 'floppy'/],
    [['serve', '--log-level', 'loud'], /unknown --log-level 'loud'/],
    [['serve', '--socket', '/tmp/a', '--socket-path', '/tmp/a'], /same socket is given twice/],
    [['serve', '--io-queues', '0'], /--io-queues '0'/],
    [['serve', '--interrupts', 'nmi'], /unknown interrupt mode 'nmi'/],
    [['serve', '--namespace', 'ram'], /needs size=/],
    [['serve', '--config', '/nonexistent.json'], /ENOENT/],
    [['serve', '--socket'], /argument missing|--socket/],
    [['frobnicate'], /unknown command 'frobnicate'/],
  ])('%j fails with one clear line and exit code 2', (args, message) => {
    const result = cli(...(args as string[]));
    expect(result.status).toBe(2);
    expect(result.stderr.trim().split('\n')).toHaveLength(1);
    expect(result.stderr).toMatch(message as RegExp);
  });

  it('--help documents every serve option', () => {
    const result = cli('serve', '--help');
    expect(result.status).toBe(0);
    for (const option of ['--socket', '--namespace', '--config', '--device', '--io-queues', '--queue-entries', '--mdts', '--interrupts', '--nqn', '--write-multiple', '--log-level']) expect(result.stdout).toContain(option);
  });

  it('refuses a socket path held by a live server, and SIGINT removes the socket', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'nvu-cli-'));
    const socket = join(dir, 'a.sock');
    const first = await startServerProcess(socket);
    try {
      const second = cli('serve', '--socket', socket);
      expect(second.status).toBe(1);
      expect(second.stderr).toMatch(/in use by another server/);
      expect(await first.stop('SIGINT')).toBe(0);
      expect(existsSync(socket)).toBe(false);
    } finally {
      await first.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
