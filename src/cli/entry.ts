// What every snapblock entry point (main.ts, sidecar.ts) shares: the global options and
// how a failure ends the process, so both behave alike.
import yargs from 'yargs';

/** yargs for the snapblock command line with its global options. */
export function snapblockArgs(args: string[]) {
  return yargs(args)
    .scriptName('snapblock')
    .usage('$0 [--pool DIR] <command>')
    .option('pool', { type: 'string', default: process.env.SNAPBLOCK_POOL ?? './data', describe: 'pool directory (env SNAPBLOCK_POOL)', global: true })
    .option('json', { type: 'boolean', default: false, describe: 'machine-readable output', global: true })
    .option('log-level', { type: 'string', default: process.env.SNAPBLOCK_LOG_LEVEL ?? 'info', choices: ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'], global: true });
}

/** yargs .fail(): a thrown Error is a failed operation (exit 1); anything else is a malformed command (exit 2). */
export function failCommand(msg: string | undefined, err: Error | undefined): never {
  if (err instanceof Error && err.name !== 'YError') {
    process.stderr.write(`snapblock: ${err.message}\n`);
    process.exit(1);
  }
  process.stderr.write(`snapblock: ${msg ?? String(err)}\nRun with --help for usage.\n`);
  process.exit(2);
}

/** Top-level rejection of an entry point. */
export function failRun(err: Error): never {
  process.stderr.write(`snapblock: ${err.message}\n`);
  process.exit(1);
}
