// Entry of the backup sidecar's commands (backup ..., export-diff, import-diff) when
// bin/snapblock.js sees one of them: the same global options, commands and exit codes
// as src/cli/main.ts, without importing the server (daemon, pool, storage, replication,
// control operations), which costs about half a second of start-up on a busy 2-core box.
// `snapblock --help` and every other command still go through main.ts.
import { hideBin } from 'yargs/helpers';
import { failCommand, failRun, snapblockArgs } from './entry.js';
import { backupCommandModules } from './backup.js';

async function sidecar(args: string[]): Promise<void> {
  await snapblockArgs(args)
    .command(backupCommandModules as never)
    .demandCommand(1, 'name a command: backup, export-diff or import-diff')
    .strict()
    .help()
    .alias('h', 'help')
    // yargs renders the whole help text after every command (cacheHelpMessage), wrapped
    // to the terminal with string-width: ~0.1 s of CPU. Unwrapped it is cheap; --help
    // itself keeps the wrapped layout.
    .wrap(args.some((x) => x === '--help' || x === '-h') ? Math.min(120, process.stdout.columns ?? 80) : null)
    .version()
    .fail(failCommand)
    .parseAsync();
}

sidecar(hideBin(process.argv)).catch(failRun);
