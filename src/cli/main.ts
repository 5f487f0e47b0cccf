// The snapblock command line. Every read command takes --json; errors go to stderr
// with a non-zero exit code (1: the operation failed, 2: the command was malformed).
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { createLogger } from '../log.js';
import { parseSize, formatSize } from '../pool/size.js';
import { connectPool } from './ops.js';
import { startDaemon } from '../daemon.js';
import type { VolumeInfo } from '../pool/pool.js';

interface Global {
  pool: string;
  json: boolean;
  'log-level': string;
}

const out = (s: string): void => void process.stdout.write(s + '\n');

function parseListen(s: string): { host: string; port: number } {
  const m = /^(?:\[?([^\]]*)\]?:)?(\d+)$/.exec(s);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port > 65535) throw new Error(`invalid --listen "${s}": use HOST:PORT, e.g. 127.0.0.1:10809`);
  return { host: m[1] || '127.0.0.1', port };
}

function volumeTable(vols: VolumeInfo[]): string {
  if (!vols.length) return 'no volumes';
  const rows = [['NAME', 'SIZE', 'ALLOCATED', 'CONNECTIONS', 'CREATED'], ...vols.map((v) => [v.name, formatSize(v.size), formatSize(v.allocated), String(v.connections), v.created])];
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(w[i])).join('  ').trimEnd()).join('\n');
}

function printVolume(v: VolumeInfo, json: boolean): void {
  if (json) return out(JSON.stringify(v, null, 2));
  out(`name:        ${v.name}\nsize:        ${formatSize(v.size)} (${v.size} bytes)\nallocated:   ${formatSize(v.allocated)} (${v.allocated} bytes)\nconnections: ${v.connections}\ncreated:     ${v.created}`);
}

async function withPool<T>(argv: Global, fn: (ops: Awaited<ReturnType<typeof connectPool>>) => Promise<T>): Promise<T> {
  // One-shot commands log only warnings unless asked: their result is on stdout.
  const log = createLogger({ level: argv['log-level'] === 'info' && !process.env.SNAPBLOCK_LOG_LEVEL ? 'warn' : argv['log-level'] });
  const ops = await connectPool(argv.pool, log);
  try {
    return await fn(ops);
  } finally {
    await ops.close();
  }
}

function volumeCommands(y: Argv<Global>): Argv<Global> {
  return y
    .command(
      'create <name> <size>',
      'create a thin volume (size like 10G, 512M)',
      (a) => a.positional('name', { type: 'string', demandOption: true }).positional('size', { type: 'string', demandOption: true }),
      async (a) => {
        const size = parseSize(a.size);
        const v = await withPool(a, (p) => p.create(a.name, size));
        if (a.json) out(JSON.stringify(v, null, 2));
        else out(`created volume ${v.name} (${formatSize(v.size)}); export name "${v.name}"`);
      },
    )
    .command(['list', 'ls'], 'list volumes', (a) => a, async (a) => {
      const vols = await withPool(a, (p) => p.list());
      out(a.json ? JSON.stringify(vols, null, 2) : volumeTable(vols));
    })
    .command('info <name>', 'show one volume (provisioned vs allocated bytes)', (a) => a.positional('name', { type: 'string', demandOption: true }), async (a) => {
      printVolume(await withPool(a, (p) => p.info(a.name)), a.json);
    })
    .command(
      'resize <name> <size>',
      'grow a volume (shrinking needs --force)',
      (a) =>
        a
          .positional('name', { type: 'string', demandOption: true })
          .positional('size', { type: 'string', demandOption: true })
          .option('force', { type: 'boolean', default: false, describe: 'allow shrinking, which discards data past the new end' }),
      async (a) => {
        const size = parseSize(a.size);
        const v = await withPool(a, (p) => p.resize(a.name, size, a.force));
        if (a.json) out(JSON.stringify(v, null, 2));
        else out(`resized volume ${v.name} to ${formatSize(v.size)}`);
      },
    )
    .command(['delete <name>', 'rm <name>'], 'delete a volume and its data', (a) => a.positional('name', { type: 'string', demandOption: true }), async (a) => {
      await withPool(a, (p) => p.delete(a.name));
      if (a.json) out(JSON.stringify({ deleted: a.name }));
      else out(`deleted volume ${a.name}`);
    })
    .demandCommand(1, 'name a volume command: create, list, info, resize or delete');
}

export async function main(args: string[]): Promise<void> {
  await yargs(args)
    .scriptName('snapblock')
    .usage('$0 [--pool DIR] <command>')
    .option('pool', { type: 'string', default: process.env.SNAPBLOCK_POOL ?? './data', describe: 'pool directory (env SNAPBLOCK_POOL)', global: true })
    .option('json', { type: 'boolean', default: false, describe: 'machine-readable output', global: true })
    .option('log-level', { type: 'string', default: process.env.SNAPBLOCK_LOG_LEVEL ?? 'info', choices: ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'], global: true })
    .command(
      'serve',
      'serve every volume of the pool over NBD, with the control API on <pool>/control.sock',
      (a) =>
        a
          .option('listen', { type: 'string', default: '127.0.0.1:10809', describe: 'TCP HOST:PORT for NBD ("none" to disable)' })
          .option('socket', { type: 'string', describe: 'also serve NBD on this Unix socket' })
          .option('cache', { choices: ['writeback', 'none'] as const, default: 'writeback' as const, describe: 'writeback: page cache; none: O_DIRECT where the filesystem allows' })
          .option('tls-cert', { type: 'string', describe: 'server certificate (PEM) enabling STARTTLS' })
          .option('tls-key', { type: 'string', describe: 'server private key (PEM)' })
          .option('tls-ca', { type: 'string', describe: 'CA (PEM) that client certificates must chain to' })
          .option('tls', { choices: ['optional', 'require'] as const, default: 'optional' as const, describe: 'require: refuse clients that do not start TLS' })
          .check((a) => {
            if (Boolean(a['tls-cert']) !== Boolean(a['tls-key'])) return '--tls-cert and --tls-key go together';
            if (a.tls === 'require' && !a['tls-cert']) return '--tls require needs --tls-cert and --tls-key';
            if (a.listen !== 'none') {
              try {
                parseListen(a.listen);
              } catch (err) {
                return (err as Error).message;
              }
            }
            return true;
          }),
      async (a) => {
        const log = createLogger({ level: a['log-level'] });
        const daemon = await startDaemon({
          pool: a.pool,
          listen: a.listen === 'none' ? undefined : parseListen(a.listen),
          socket: a.socket,
          cache: a.cache,
          tls: a['tls-cert'] ? { cert: a['tls-cert'], key: a['tls-key']!, ca: a['tls-ca'], required: a.tls === 'require' } : undefined,
          log,
        });
        await new Promise<void>((resolve) => {
          const onSignal = (sig: string) => {
            log.info({ signal: sig }, 'signal received');
            daemon.stop().then(resolve, (err) => {
              log.error({ err }, 'shutdown failed');
              process.exitCode = 1;
              resolve();
            });
          };
          process.once('SIGTERM', () => onSignal('SIGTERM'));
          process.once('SIGINT', () => onSignal('SIGINT'));
        });
      },
    )
    .command(['volume', 'vol'], 'manage volumes', (y) => volumeCommands(y as Argv<Global>))
    .command(
      'check',
      'verify the pool format invariants (docs/FORMAT.md)',
      (a) => a.option('repair', { type: 'boolean', default: false, describe: 'fix what recovery may fix (orphans, file sizes)' }),
      async (a) => {
        const report = await withPool(a, (p) => p.check(a.repair));
        if (a.json) out(JSON.stringify(report, null, 2));
        else {
          for (const r of report.repaired) out(`repaired: ${r}`);
          for (const p of report.problems) out(`problem: ${p}`);
          out(report.ok ? 'pool OK' : `pool has ${report.problems.length} problem(s)`);
        }
        if (!report.ok) process.exitCode = 1;
      },
    )
    .demandCommand(1, 'name a command: serve, volume or check')
    .strict()
    .help()
    .alias('h', 'help')
    .version()
    .fail((msg, err) => {
      // A thrown Error is a failed operation (exit 1); anything else is a malformed command (exit 2).
      if (err instanceof Error && err.name !== 'YError') {
        process.stderr.write(`snapblock: ${err.message}\n`);
        process.exit(1);
      }
      process.stderr.write(`snapblock: ${msg ?? String(err)}\nRun with --help for usage.\n`);
      process.exit(2);
    })
    .parseAsync();
}

main(hideBin(process.argv)).catch((err: Error) => {
  process.stderr.write(`snapblock: ${err.message}\n`);
  process.exit(1);
});
