// Listens on one unix socket and serves one client at a time. When the client goes away its DMA
// mappings and eventfds are dropped, the device keeps its state, and the socket listens again.

import { existsSync, unlinkSync } from 'node:fs';
import { loadedNative, native, type Connection, type Listener } from '../native.js';
import type { Logger } from '../log.js';
import { bindUnixSocket, DEFAULT_SOCKET_MODE } from '../socket-path.js';
import type { VfioDevice } from './device.js';
import { MigrationController } from './migration.js';
import { Session } from './session.js';

export interface ServerOptions {
  socketPath: string;
  device: VfioDevice;
  log: Logger;
  writeMultiple?: boolean;
  /** Permission bits of the socket file (default 0600: only our user may connect). */
  socketMode?: number;
}

export class VfioUserServer {
  private listener: Listener | null = null;
  private session: Session | null = null;
  private clients = 0;
  private readonly sessionEndListeners: (() => void)[] = [];
  /** The device's migration state outlives its clients (ERROR waits for a DEVICE_RESET). */
  private readonly migration: MigrationController | null;

  constructor(private readonly options: ServerOptions) {
    this.migration = options.device.migration ? new MigrationController(options.device.migration, options.log.child('migration')) : null;
  }

  get socketPath(): string {
    return this.options.socketPath;
  }

  get activeSession(): Session | null {
    return this.session;
  }

  get clientCount(): number {
    return this.clients;
  }

  onSessionEnd(listener: () => void): void {
    this.sessionEndListeners.push(listener);
  }

  start(): void {
    this.listener = bindUnixSocket(this.options.socketPath, this.options.socketMode ?? DEFAULT_SOCKET_MODE, (path) =>
      new native.Listener(path, (connection) => this.accept(connection)),
    );
    this.options.log.debug(`listening on ${this.options.socketPath}`);
  }

  stop(): void {
    this.listener?.close();
    this.listener = null;
    this.session?.end();
    this.session = null;
    if (existsSync(this.options.socketPath)) unlinkSync(this.options.socketPath);
  }

  private accept(connection: Connection): void {
    if (this.session) {
      // vfio-user gives a device exactly one client; a second one would fight over the DMA table.
      this.options.log.warn('refusing a second client while one is connected');
      connection.close();
      return;
    }
    this.clients++;
    const log = this.options.log.child(`client${this.clients}`);
    log.info('client connected');
    const session = new Session({
      device: this.options.device,
      transport: connection,
      native: loadedNative(),
      log,
      writeMultiple: this.options.writeMultiple,
      migration: this.migration,
    });
    this.session = session;
    const finish = (reason: string): void => {
      if (this.session !== session) return;
      session.end();
      this.session = null;
      log.info(`client gone (${reason}); device state kept, listening again`);
      for (const listener of this.sessionEndListeners) listener();
    };
    connection.start(
      (data, fds) => {
        if (!session.receive(data, fds)) finish('protocol error');
      },
      (code) => finish(code ?? 'EOF'),
    );
  }
}
