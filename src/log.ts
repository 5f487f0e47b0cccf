// pino logger: JSON lines by default (for machines), pretty when stderr is a TTY.
// Logs go to stderr so that command output on stdout (e.g. --json) stays clean.
import pino, { type Logger } from 'pino';

export type { Logger };

export function createLogger(opts: { level?: string; pretty?: boolean } = {}): Logger {
  const level = opts.level ?? process.env.SNAPBLOCK_LOG_LEVEL ?? 'info';
  const pretty = opts.pretty ?? process.stderr.isTTY === true;
  if (pretty) {
    return pino({ level, base: undefined }, pino.transport({ target: 'pino-pretty', options: { destination: 2, colorize: true, translateTime: 'SYS:HH:MM:ss.l' } }));
  }
  return pino({ level, base: { pid: process.pid } }, pino.destination({ dest: 2, sync: true }));
}
