// The sidecar's logger at its default level (warn): pino's JSON line format (level,
// time, pid, msg, fields) written synchronously to stderr, or a plain line on a TTY,
// without loading pino (and pino-pretty's worker thread on a TTY): a one-shot
// `backup create` from cron should not spend a tenth of a second starting a logger
// that prints nothing. More verbose levels use the project's pino logger (src/log.ts).
import type { BackupLog } from './engine.js';

const LEVELS: Record<string, number> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60, silent: Infinity };

/** a light logger when `level` is warn or quieter; undefined when pino is wanted */
export function liteLogger(level: string, stream: NodeJS.WriteStream = process.stderr): BackupLog | undefined {
  const min = LEVELS[level];
  if (min === undefined || min < LEVELS.warn) return undefined;
  const emit = (lvl: number, name: string, fields: Record<string, unknown>, msg: string) => {
    if (lvl < min) return;
    if (stream.isTTY) stream.write(`snapblock: ${name}: ${msg}${Object.keys(fields).length ? ` ${JSON.stringify(fields)}` : ''}\n`);
    else stream.write(JSON.stringify({ level: lvl, time: Date.now(), pid: process.pid, ...fields, msg }) + '\n');
  };
  return {
    info: (fields, msg) => emit(30, 'info', fields, msg),
    warn: (msg) => emit(40, 'warning', {}, msg),
    debug: (fields, msg) => emit(20, 'debug', fields, msg),
  };
}
