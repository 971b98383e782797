// The `nvme-vfio-user` command (src/bin/nvme-vfio-user.ts runs main()). Bad arguments, and socket
// paths the socket policy refuses, get one line on stderr and exit code 2; other startup failures
// one line and exit code 1; SIGTERM and SIGINT stop the server, remove its socket and exit 0.

import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { createLogger, type Logger, type LogLevel } from './log.js';
import {
  checkDevice,
  checkDoorbells,
  checkInterrupts,
  ConfigError,
  DEFAULT_SOCKET,
  defaults,
  finalize,
  loadConfigFile,
  parseNamespaceSpec,
  parseBatchMs,
  parsePollUs,
  parsePositive,
  parseSocketMode,
  type ServerConfig,
} from './mgmt/config.js';
import { ServerHost } from './mgmt/host.js';
import { DEFAULT_CONTROL, isManagementVerb, runVerb, UsageError, VerbError, VERB_HELP } from './mgmt/verbs.js';
import { checkSocketPath, createSocketDirectory, SocketPathError } from './socket-path.js';
import { vfioUserDeviceOption } from './mgmt/qemu/attach.js';

export { UsageError };

const LOG_LEVELS: LogLevel[] = ['debug', 'info', 'warn', 'error', 'silent'];

const HELP = `Usage: nvme-vfio-user <command> [options]

Commands:
  serve            Serve an NVMe subsystem (or a test device) on vfio-user
                   sockets until SIGTERM/SIGINT.
  help             Show this help.
  version          Print the version.

Management (clients of a running server's control socket; each takes
--control PATH|tcp:HOST:PORT (default: ${DEFAULT_CONTROL}),
--control-token FILE and --json):
${VERB_HELP}

serve options:
  --socket PATH       Unix socket of one controller; repeat for more
                      controllers sharing the namespaces (default:
                      ${DEFAULT_SOCKET}). Also --socket-path. Its
                      directory must not be world-writable (a missing one is
                      created). A stale socket file left by a dead server is
                      replaced; a live one, or a path that is not a socket,
                      is an error.
  --socket-mode MODE  Permission bits of the vfio-user sockets (default 0600:
                      only this user may connect; e.g. 0660 for QEMU in your
                      group). The control socket stays 0600.
  --namespace SPEC    A namespace; repeat for more. SPEC is
                        file=PATH[,size=SIZE][,lbads=512|4096][,nsid=N]
                             [,aio=io_uring|threads]
                             [,cache=writeback|none|writethrough|directsync]
                        ram,size=SIZE[,lbads=512|4096][,nsid=N]
                      A missing file is created sparse (size= required).
                      aio: how reads and writes that wait for the disk
                      are done (default io_uring where the kernel allows).
                      cache: as QEMU's -drive cache= (default writeback);
                      none and directsync bypass the host's page cache
                      (O_DIRECT), writethrough and directsync make every
                      write durable before it completes.
                      SIZE takes K/M/G/T suffixes. Default: one 1 GiB RAM
                      namespace.
  --config FILE       JSON file with any of: device, sockets, namespaces
                      (objects like {"file":"disk.img","size":"1G"} or SPEC
                      strings), nqn, serial, model, ioQueues, queueEntries,
                      mdts, interrupts, pollUs, batchMs, doorbells,
                      writeMultiple,
                      socketMode. Flags
                      given too take precedence.
  --device KIND       nvme (default) or scratch (a minimal PCI function with
                      BAR0 registers and MSI-X, for plumbing tests).
  --io-queues N       I/O queue pairs per controller (default 8, max 64).
  --queue-entries N   Entries per queue at most (default 1024).
  --mdts N            Max data transfer = 2^N x 4 KiB (default 8: 1 MiB).
  --interrupts MODE   Best interrupt mode offered: msix (MSI-X, MSI and INTx;
                      default), msi (MSI and INTx) or intx (INTx only).
  --poll-us N         Poll a busy, shallow I/O queue's shadow doorbell for N
                      µs after it last took commands, keeping the guest from
                      ringing the trapped doorbell meanwhile (needs a driver
                      using Doorbell Buffer Config, as Linux does). Lower QD1
                      latency for CPU. Default 0: never poll. With --doorbells
                      mapped: how long the doorbell page is polled instead.
  --batch-ms N        Take a deep I/O queue's commands in batches every N ms
                      (0.05 to 100, to the µs: 0.25 is 250 µs),
                      its doorbells held back meanwhile (EventIdx, as for
                      --poll-us): fewer guest exits, wake-ups and interrupts
                      per I/O for up to N ms more latency, and at most queue
                      depth / N ms I/Os per queue. For guests whose vCPUs are
                      the bottleneck (TCG, overcommitted hosts). Default 0:
                      off.
  --doorbells MODE    trapped (default): every doorbell write is a vfio-user
                      message. mapped: BAR0's doorbell pages are offered
                      for the client to map, so the guest's doorbell writes
                      are plain stores (no VM exit, no message), and the
                      controller polls them: every event-loop turn for
                      --poll-us µs (default 1000 here) after one moved,
                      every millisecond otherwise. Lower latency and fewer
                      exits for a core's worth of polling while busy.
  --nqn NQN, --serial S, --model M
                      Subsystem identity shown by Identify Controller.
  --write-multiple    Offer REGION_WRITE_MULTI to clients that support it.
  --secondaries N     A controlling function instead of peer controllers: a
                      primary controller (CNTLID 0) and N secondary
                      controllers (1..N). Nothing is exported until
                      provisioned (see Management), except the primary with
                      --primary-socket.
  --primary-socket PATH
                      Export the primary controller (a management VM runs
                      nvme-cli against it).
  --control PATH      The control socket (unix, 0600), or tcp:HOST:PORT.
                      Default: control.sock beside the first socket.
  --state-dir DIR     Record provisioning in DIR and come back from it after a
                      restart (it then wins over flags and --config).
  --control-token FILE
                      Every control request must carry the token in FILE
                      (required with --control tcp:HOST:PORT).
  --log-level L       ${LOG_LEVELS.join(', ')} (default: info). Logs go to stderr.
  -h, --help          Show this help.

Exit status: 0 after SIGTERM/SIGINT, 1 when serving cannot start (socket in
use, backing file unusable, ...), 2 for bad arguments or a refused socket path.

Attach to QEMU (>= 10.1) with fd-backed shared guest RAM:
  qemu-system-x86_64 -machine q35,memory-backend=mem -m 1G \\
    -object memory-backend-memfd,id=mem,size=1G,share=on \\
    -device '{"driver":"vfio-user-pci","socket":{"path":"PATH","type":"unix"}}'
`;

interface ServeOptions {
  config: ServerConfig;
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
        socket: { type: 'string', multiple: true },
        'socket-path': { type: 'string', multiple: true },
        'socket-mode': { type: 'string' },
        namespace: { type: 'string', multiple: true },
        config: { type: 'string' },
        device: { type: 'string' },
        'io-queues': { type: 'string' },
        'queue-entries': { type: 'string' },
        mdts: { type: 'string' },
        interrupts: { type: 'string' },
        'poll-us': { type: 'string' },
        'batch-ms': { type: 'string' },
        doorbells: { type: 'string' },
        nqn: { type: 'string' },
        serial: { type: 'string' },
        model: { type: 'string' },
        'write-multiple': { type: 'boolean' },
        secondaries: { type: 'string' },
        'primary-socket': { type: 'string' },
        control: { type: 'string' },
        'state-dir': { type: 'string' },
        'control-token': { type: 'string' },
        'log-level': { type: 'string', default: 'info' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (error) {
    throw new UsageError((error as Error).message.split('\n')[0]!);
  }
  const { values } = parsed;
  if (values.help) return 'help';
  if (!LOG_LEVELS.includes(values['log-level'] as LogLevel)) {
    throw new UsageError(`serve: unknown --log-level '${values['log-level']}' (expected one of: ${LOG_LEVELS.join(', ')})`);
  }
  try {
    const config: ServerConfig = { ...defaults(), ...(values.config ? loadConfigFile(values.config) : {}) };
    const sockets = [...(values.socket ?? []), ...(values['socket-path'] ?? [])];
    if (sockets.some((s) => s === '')) throw new ConfigError('--socket needs a path');
    if (sockets.length > 0) config.sockets = sockets.map((s) => resolve(s));
    if (values['socket-mode'] !== undefined) config.socketMode = parseSocketMode(values['socket-mode']);
    if (values.namespace) config.namespaces = values.namespace.map((spec) => parseNamespaceSpec(spec));
    if (values.device !== undefined) config.device = checkDevice(values.device);
    if (values['io-queues'] !== undefined) config.ioQueues = parsePositive(values['io-queues'], '--io-queues');
    if (values['queue-entries'] !== undefined) config.queueEntries = parsePositive(values['queue-entries'], '--queue-entries');
    if (values.mdts !== undefined) config.mdts = parsePositive(values.mdts, '--mdts');
    if (values.interrupts !== undefined) config.interrupts = checkInterrupts(values.interrupts);
    if (values['poll-us'] !== undefined) config.pollUs = parsePollUs(values['poll-us'], '--poll-us');
    if (values['batch-ms'] !== undefined) config.batchMs = parseBatchMs(values['batch-ms'], '--batch-ms');
    if (values.doorbells !== undefined) config.doorbells = checkDoorbells(values.doorbells, '--doorbells');
    if (values.nqn !== undefined) config.nqn = values.nqn;
    if (values.serial !== undefined) config.serial = values.serial;
    if (values.model !== undefined) config.model = values.model;
    if (values['write-multiple'] !== undefined) config.writeMultiple = values['write-multiple'];
    if (values.secondaries !== undefined) config.secondaries = parsePositive(values.secondaries, '--secondaries', 127);
    if (values['primary-socket'] !== undefined) config.primarySocket = resolve(values['primary-socket']);
    if (values.control !== undefined) config.control = values.control.startsWith('tcp:') ? values.control : resolve(values.control.replace(/^unix:/, ''));
    if (values['state-dir'] !== undefined) config.stateDir = resolve(values['state-dir']);
    if (values['control-token'] !== undefined) config.controlToken = resolve(values['control-token']);
    return { config: finalize(config), logLevel: values['log-level'] as LogLevel };
  } catch (error) {
    if (error instanceof ConfigError) throw new UsageError(`serve: ${error.message}`);
    throw error;
  }
}

async function serve(options: ServeOptions): Promise<void> {
  // The server outlives whoever reads its output: a closed stdout or stderr (`serve | head`, a log
  // collector that died) fails those writes, and must not end the process and every VM's
  // controllers with it. Nothing is left to report such an error to.
  for (const stream of [process.stdout, process.stderr]) stream.on('error', () => {});
  const log = createLogger(options.logLevel);
  let runtime: ServerHost;
  try {
    // Socket paths first: a refused one is reported before namespaces are opened and logged.
    for (const socket of unixSockets(options.config)) {
      createSocketDirectory(dirname(socket));
      checkSocketPath(socket);
    }
    runtime = await ServerHost.start(options.config, log);
  } catch (error) {
    if (error instanceof SocketPathError) throw new UsageError(`serve: ${error.message}`);
    process.stderr.write(`nvme-vfio-user: cannot start: ${oneLine(error)}\n`);
    process.exit(error instanceof ConfigError ? 2 : 1);
  }
  installBugReporter(log);
  // One line per socket on stdout once it accepts clients: scripts wait for it before starting QEMU.
  for (const socket of runtime.sockets) process.stdout.write(`listening on ${socket}\n`);
  if (runtime.controlPath) process.stdout.write(`control on ${runtime.controlPath}\n`);
  if (runtime.sockets.length > 0) process.stdout.write(attachHint(runtime.sockets));
  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    log.info(`${signal}: shutting down`);
    runtime.stop().then(
      () => process.exit(0),
      (error: Error) => {
        log.error(`shutdown: ${error.message}`);
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

/** Every unix socket serve will listen on: vfio-user sockets and the control socket. */
function unixSockets(config: ServerConfig): string[] {
  const control = config.control !== undefined && !config.control.startsWith('tcp:') ? [config.control] : [];
  return [...config.sockets, ...(config.primarySocket ? [config.primarySocket] : []), ...control];
}

const oneLine = (error: unknown): string => (error instanceof Error ? error.message : String(error)).split('\n')[0]!;

/**
 * A promise rejection nobody handles is a bug of ours, but it belongs to one command or one client:
 * ending the process for it would take every other controller down. Log it (with its stack, as a
 * bug; repeats only as a count) and keep serving.
 */
export function installBugReporter(log: Logger): void {
  const counts = new Map<string, number>();
  process.on('unhandledRejection', (reason) => {
    const text = reason instanceof Error ? (reason.stack ?? reason.message) : String(reason);
    const count = (counts.get(text) ?? 0) + 1;
    // Bounded: past 1000 distinct failures each further one is logged in full, never counted.
    if (counts.has(text) || counts.size < 1000) counts.set(text, count);
    if (count === 1) log.error(`BUG: unhandled promise rejection (please report it; still serving): ${text}`);
    else if (Number.isInteger(Math.log10(count))) log.error(`BUG: unhandled promise rejection "${text.split('\n')[0]}" has now happened ${count} times`);
  });
}

/** The QEMU options that attach this server (guest RAM must be fd-backed and shared). */
export function attachHint(sockets: readonly string[]): string {
  const devices = sockets.map((path) => `    ${vfioUserDeviceOption(path)}`);
  return [
    'attach with QEMU >= 10.1 (add your own disk/kernel options):',
    '  qemu-system-x86_64 -machine q35,memory-backend=mem -m 1G \\',
    '    -object memory-backend-memfd,id=mem,size=1G,share=on \\',
    devices.join(' \\\n'),
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

/** Runs the command; resolves when a one-shot command is done or once a server is serving. */
export async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'serve': {
        const options = parseServe(rest);
        if (options === 'help') process.stdout.write(HELP);
        else await serve(options);
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
        if (isManagementVerb(argv)) {
          const stdin = async (): Promise<Uint8Array> => {
            const chunks: Buffer[] = [];
            for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
            return Buffer.concat(chunks);
          };
          const output = { out: (text: string) => void process.stdout.write(text), bytes: (data: Uint8Array) => void process.stdout.write(data), stdin };
          runVerb(argv, output).then(
            // Exit once stdout has drained: a state piped to a file must arrive whole.
            () => process.stdout.write('', () => process.exit(0)),
            (error: unknown) => {
              if (error instanceof UsageError || error instanceof VerbError) {
                process.stderr.write(`nvme-vfio-user: ${error.message}\n`);
                process.exit(error instanceof UsageError ? 2 : 1);
              }
              process.stderr.write(`nvme-vfio-user: ${(error as Error).stack ?? String(error)}\n`);
              process.exit(1);
            },
          );
          return;
        }
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
