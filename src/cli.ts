#!/usr/bin/env node
// The `nvme-vfio-user` command. Bad arguments get one line on stderr and exit code 2; SIGTERM and
// SIGINT stop the server, remove its socket and exit 0.

import { mkdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { createLogger, type LogLevel } from './log.js';
import { ScratchDevice } from './pci/scratch-device.js';
import type { VfioDevice } from './vfio-user/device.js';
import { VfioUserServer } from './vfio-user/server.js';

export class UsageError extends Error {}

const DEVICES = ['scratch'] as const;
type DeviceKind = (typeof DEVICES)[number];
const LOG_LEVELS: LogLevel[] = ['debug', 'info', 'warn', 'error', 'silent'];
const DEFAULT_SOCKET = join(tmpdir(), 'nvme-vfio-user', 'ctrl0.sock');

const HELP = `Usage: nvme-vfio-user <command> [options]

Commands:
  serve            Serve a device on a vfio-user socket until SIGTERM/SIGINT.
  help             Show this help.
  version          Print the version.

serve options:
  --socket PATH    Unix socket to listen on (default: ${DEFAULT_SOCKET}).
                   Also --socket-path. A stale socket file left by a dead
                   server is replaced; a live one is an error.
  --device KIND    Device to serve: ${DEVICES.join(', ')} (default: scratch).
                   scratch: a minimal PCI function (BAR0 registers + MSI-X)
                   that proves the QEMU plumbing.
  --write-multiple Offer REGION_WRITE_MULTI to clients that support it.
  --log-level L    ${LOG_LEVELS.join(', ')} (default: info). Logs go to stderr.
  -h, --help       Show this help.

Attach to QEMU (>= 10.1) with fd-backed shared guest RAM:
  qemu-system-x86_64 -machine q35,memory-backend=mem -m 1G \\
    -object memory-backend-memfd,id=mem,size=1G,share=on \\
    -device '{"driver":"vfio-user-pci","socket":{"path":"PATH","type":"unix"}}'
`;

interface ServeOptions {
  socket: string;
  device: DeviceKind;
  writeMultiple: boolean;
  logLevel: LogLevel;
}

export function parseServe(args: string[]): ServeOptions | 'help' {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      allowPositionals: false,
      options: {
        socket: { type: 'string' },
        'socket-path': { type: 'string' },
        device: { type: 'string', default: 'scratch' },
        'write-multiple': { type: 'boolean', default: false },
        'log-level': { type: 'string', default: 'info' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (error) {
    throw new UsageError((error as Error).message.split('\n')[0]!);
  }
  const { values } = parsed;
  if (values.help) return 'help';
  if (values.socket !== undefined && values['socket-path'] !== undefined) {
    throw new UsageError('serve: give --socket or --socket-path, not both');
  }
  const socket = values.socket ?? values['socket-path'] ?? DEFAULT_SOCKET;
  if (socket === '') throw new UsageError('serve: --socket needs a path');
  if (!DEVICES.includes(values.device as DeviceKind)) {
    throw new UsageError(`serve: unknown --device '${values.device}' (expected one of: ${DEVICES.join(', ')})`);
  }
  if (!LOG_LEVELS.includes(values['log-level'] as LogLevel)) {
    throw new UsageError(`serve: unknown --log-level '${values['log-level']}' (expected one of: ${LOG_LEVELS.join(', ')})`);
  }
  return {
    socket: resolve(socket),
    device: values.device as DeviceKind,
    writeMultiple: values['write-multiple'] ?? false,
    logLevel: values['log-level'] as LogLevel,
  };
}

function createDevice(kind: DeviceKind): VfioDevice {
  switch (kind) {
    case 'scratch':
      return new ScratchDevice();
  }
}

function serve(options: ServeOptions): void {
  const log = createLogger(options.logLevel);
  mkdirSync(dirname(options.socket), { recursive: true });
  const server = new VfioUserServer({
    socketPath: options.socket,
    device: createDevice(options.device),
    log,
    writeMultiple: options.writeMultiple,
  });
  try {
    server.start();
  } catch (error) {
    process.stderr.write(`nvme-vfio-user: cannot listen on ${options.socket}: ${(error as Error).message}\n`);
    process.exit(1);
  }
  // A line on stdout once the socket accepts clients: scripts wait for it before starting QEMU.
  process.stdout.write(`listening on ${options.socket}\n`);
  process.stdout.write(attachHint(options.socket));
  const stop = (signal: string): void => {
    log.info(`${signal}: shutting down`);
    server.stop();
    process.exit(0);
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

/** The QEMU options that attach this server (guest RAM must be fd-backed and shared). */
export function attachHint(socket: string): string {
  const device = JSON.stringify({ driver: 'vfio-user-pci', socket: { path: socket, type: 'unix' } });
  return [
    'attach it with QEMU >= 10.1 (add your own disk/kernel options):',
    '  qemu-system-x86_64 -machine q35,memory-backend=mem -m 1G \\',
    '    -object memory-backend-memfd,id=mem,size=1G,share=on \\',
    `    -device '${device}'`,
    '',
  ].join('\n');
}

function packageVersion(): string {
  const root = join(dirname(fileURLToPath(import.meta.url)), '..');
  for (const candidate of [join(root, 'package.json'), join(root, '..', 'package.json')]) {
    try {
      return (JSON.parse(readFileSync(candidate, 'utf8')) as { version: string }).version;
    } catch {
      // Not at this depth (src/ vs dist/src/): try the next.
    }
  }
  return 'unknown';
}

export function main(argv: string[]): void {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'serve': {
        const options = parseServe(rest);
        if (options === 'help') process.stdout.write(HELP);
        else serve(options);
        return;
      }
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        process.stdout.write(HELP);
        return;
      case 'version':
      case '--version':
        process.stdout.write(`${packageVersion()}\n`);
        return;
      default:
        throw new UsageError(`unknown command '${command}' (try --help)`);
    }
  } catch (error) {
    if (error instanceof UsageError) {
      process.stderr.write(`nvme-vfio-user: ${error.message}\n`);
      process.exit(2);
    }
    throw error;
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2));
}
