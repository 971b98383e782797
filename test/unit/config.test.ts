import { describe, expect, it } from 'vitest';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, DEFAULT_SOCKET, defaults, finalize, loadConfigFile, parseNamespaceSpec, parseSize } from '../../src/mgmt/config.js';

describe('sizes', () => {
  it.each([
    ['4096', 4096],
    ['64M', 64 << 20],
    ['1G', 1 << 30],
    ['1GiB', 1 << 30],
    ['2t', 2 * 2 ** 40],
    ['1.5K', 1536],
  ])('%s = %d bytes', (text, bytes) => expect(parseSize(text)).toBe(bytes));

  it.each(['', 'G', '-1M', '1X', '0', '0.1'])('refuses %j', (text) => expect(() => parseSize(text)).toThrow(ConfigError));
});

describe('namespace specs', () => {
  it('parses file and RAM namespaces', () => {
    expect(parseNamespaceSpec('file=/d/disk.img,size=1G,lbads=4096,nsid=3')).toEqual({ file: '/d/disk.img', size: 1 << 30, lbads: 4096, nsid: 3 });
    expect(parseNamespaceSpec('file=disk.img', '/base')).toEqual({ file: '/base/disk.img', lbads: 512 });
    expect(parseNamespaceSpec('ram,size=64M')).toEqual({ size: 64 << 20, lbads: 512 });
    expect(parseNamespaceSpec('ram=64M')).toEqual({ size: 64 << 20, lbads: 512 });
    expect(parseNamespaceSpec('file=/d/a.img,aio=threads')).toEqual({ file: '/d/a.img', lbads: 512, aio: 'threads' });
    expect(parseNamespaceSpec('file=/d/a.img,aio=io_uring')).toEqual({ file: '/d/a.img', lbads: 512, aio: 'io_uring' });
    expect(parseNamespaceSpec('file=/d/a.img,cache=none,lbads=4096')).toEqual({ file: '/d/a.img', lbads: 4096, cache: 'none' });
    expect(parseNamespaceSpec('file=/d/a.img,cache=directsync')).toEqual({ file: '/d/a.img', lbads: 512, cache: 'directsync' });
  });

  it.each([
    ['ram', /needs size/],
    ['size=1G', /needs file=PATH or ram/],
    ['file=a,ram,size=1M', /not both/],
    ['file=a,lbads=1024', /512 or 4096/],
    ['file=a,size=1000,lbads=4096', /not a multiple/],
    ['file=a,color=red', /unknown key 'color'/],
    ['file=', /needs a path/],
    ['ram,size=1M,nsid=0', /nsid/],
    ['file=a,aio=native', /aio must be threads or io_uring, got 'native'/],
    ['ram,size=1M,aio=io_uring', /aio= is for file namespaces/],
    ['file=a,cache=unsafe', /cache must be writeback, none, writethrough, directsync, got 'unsafe'/],
    ['ram,size=1M,cache=none', /cache= is for file namespaces/],
  ])('refuses %j', (spec, message) => expect(() => parseNamespaceSpec(spec)).toThrow(message));
});

describe('finalize', () => {
  it('defaults to one controller on the default socket with a 1 GiB RAM namespace', () => {
    const c = finalize(defaults());
    expect(c.sockets).toEqual([DEFAULT_SOCKET]);
    expect(c.namespaces).toEqual([{ size: 1 << 30, lbads: 512, nsid: 1 }]);
  });

  it('numbers namespaces around explicit NSIDs and refuses duplicates', () => {
    const c = finalize({ ...defaults(), namespaces: [{ lbads: 512, size: 4096 }, { lbads: 512, size: 4096, nsid: 1 }, { lbads: 512, size: 4096 }] });
    expect(c.namespaces.map((n) => n.nsid)).toEqual([2, 1, 3]);
    expect(() => finalize({ ...defaults(), namespaces: [{ lbads: 512, size: 4096, nsid: 2 }, { lbads: 512, size: 4096, nsid: 2 }] })).toThrow(/twice/);
    expect(() => finalize({ ...defaults(), sockets: ['/a', '/a'] })).toThrow(/twice/);
  });
});

describe('JSON config files', () => {
  it('loads everything the flags can say, with paths relative to the file', () => {
    const dir = mkdtempSync(join(tmpdir(), 'nvu-cfg-'));
    const path = join(dir, 'cfg.json');
    writeFileSync(path, JSON.stringify({
      sockets: ['c0.sock', '/abs/c1.sock'],
      namespaces: [{ file: 'disk.img', size: '1G', lbads: 4096, aio: 'threads', cache: 'none' }, 'ram,size=8M'],
      nqn: 'nqn.2026-11.test:x',
      ioQueues: 4,
      mdts: 5,
      interrupts: 'msi',
      pollUs: 150,
      batchMs: 0.25,
    }));
    const c = loadConfigFile(path);
    expect(c.sockets).toEqual([join(dir, 'c0.sock'), '/abs/c1.sock']);
    expect(c.namespaces).toEqual([{ file: join(dir, 'disk.img'), size: 1 << 30, lbads: 4096, aio: 'threads', cache: 'none' }, { size: 8 << 20, lbads: 512 }]);
    expect(c.nqn).toBe('nqn.2026-11.test:x');
    expect([c.ioQueues, c.mdts, c.interrupts, c.pollUs, c.batchMs]).toEqual([4, 5, 'msi', 150, 0.25]);
  });

  it('names the problem in a bad file', () => {
    const dir = mkdtempSync(join(tmpdir(), 'nvu-cfg-'));
    const bad = (content: string): string => {
      const p = join(dir, `${Math.random()}.json`);
      writeFileSync(p, content);
      return p;
    };
    expect(() => loadConfigFile(bad('{'))).toThrow(/config .*json/);
    expect(() => loadConfigFile(bad('[]'))).toThrow(/not a JSON object/);
    expect(() => loadConfigFile(bad('{"colour":1}'))).toThrow(/unknown key 'colour'/);
    expect(() => loadConfigFile(bad('{"ioQueues":0}'))).toThrow(/ioQueues/);
    expect(() => loadConfigFile(bad('{"interrupts":"nmi"}'))).toThrow(/unknown interrupt mode/);
    expect(() => loadConfigFile(bad('{"pollUs":-5}'))).toThrow(/pollUs '-5' must be a whole number of microseconds from 0 to 1000000/);
    expect(() => loadConfigFile(bad('{"batchMs":0.01}'))).toThrow(/batchMs '0.01' must be 0 \(off\) or from 0.05 to 100 milliseconds, to the microsecond/);
    expect(() => loadConfigFile(bad('{"batchMs":0.0005}'))).toThrow(/batchMs '0.0005'/);
    expect(() => loadConfigFile(bad('{"namespaces":[{"file":"a","lbads":7}]}'))).toThrow(/512 or 4096/);
    expect(() => loadConfigFile(bad('{"namespaces":[{"file":"a","aio":"uring"}]}'))).toThrow(/aio must be threads or io_uring/);
    expect(() => loadConfigFile(bad('{"namespaces":[{"file":"a","cache":"direct"}]}'))).toThrow(/cache must be writeback, none/);
    expect(() => loadConfigFile(join(dir, 'missing.json'))).toThrow(/ENOENT/);
  });
});
