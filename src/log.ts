// One small leveled logger to stderr, so the CLI's stdout stays free for what users copy.

export type LogLevel = 'debug' | 'info' | 'warn' | 'error' | 'silent';
const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 };

export interface Logger {
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
  child(prefix: string): Logger;
}

export function createLogger(level: LogLevel = 'info', prefix = '', sink: (line: string) => void = (line) => process.stderr.write(`${line}\n`)): Logger {
  const emit = (at: LogLevel, message: string): void => {
    if (ORDER[at] < ORDER[level]) return;
    sink(`${new Date().toISOString()} ${at.padEnd(5)} ${prefix ? `[${prefix}] ` : ''}${message}`);
  };
  return {
    debug: (m) => emit('debug', m),
    info: (m) => emit('info', m),
    warn: (m) => emit('warn', m),
    error: (m) => emit('error', m),
    child: (p) => createLogger(level, prefix ? `${prefix}/${p}` : p, sink),
  };
}

export const silentLogger: Logger = createLogger('silent');
