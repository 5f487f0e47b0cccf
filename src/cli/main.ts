// The snapblock command line. Every read command takes --json; errors go to stderr
// with a non-zero exit code (1: the operation failed, 2: the command was malformed).
import type { Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { failCommand, failRun, snapblockArgs } from './entry.js';
import { createLogger } from '../log.js';
import { parseSize, formatSize } from '../pool/size.js';
import { connectPool, type PoolCaller } from './ops.js';
import { startDaemon } from '../daemon.js';
import type { VolumeInfo, CheckReport } from '../pool/pool.js';
import type { ChangedExtent, SnapshotInfo } from '../storage/volume.js';
import { diffTable, snapshotTable, table, volumeDetails, volumeTable } from './format.js';
import { replicationCommands } from './replication.js';

interface Global {
  pool: string;
  json: boolean;
  'log-level': string;
}

const out = (s: string): void => void process.stdout.write(s + '\n');
const MODES = ['row', 'cow', 'mirror'] as const;

function parseListen(s: string): { host: string; port: number } {
  const m = /^(?:\[?([^\]]*)\]?:)?(\d+)$/.exec(s);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port > 65535) throw new Error(`invalid --listen "${s}": use HOST:PORT, e.g. 127.0.0.1:10809`);
  return { host: m[1] || '127.0.0.1', port };
}

/** Run one pool operation (through the server if one owns the pool) and print its result. */
async function call<T>(argv: Global, op: string, args: Record<string, unknown>, human: (r: T) => string): Promise<void> {
  await callFor(argv, op, args, human);
}

async function callFor<T>(argv: Global, op: string, args: Record<string, unknown>, human: (r: T) => string, opts: { forCheck?: boolean } = {}): Promise<T> {
  // One-shot commands log only warnings unless asked: their result is on stdout.
  const level = argv['log-level'] === 'info' && !process.env.SNAPBLOCK_LOG_LEVEL ? 'warn' : argv['log-level'];
  const pool: PoolCaller = await connectPool(argv.pool, createLogger({ level }), opts);
  try {
    const result = await pool.call<T>(op, args);
    out(argv.json ? JSON.stringify(result, null, 2) : human(result));
    return result;
  } finally {
    await pool.close();
  }
}

const sizeArg = (s: string | undefined) => (s === undefined ? undefined : parseSize(s));

function volumeCommands(y: Argv<Global>): Argv<Global> {
  return y
    .command(
      'create <name> <size>',
      'create a thin volume (size like 10G, 512M)',
      (a) =>
        a
          .positional('name', { type: 'string', demandOption: true })
          .positional('size', { type: 'string', demandOption: true })
          .option('snapshot-mode', { choices: MODES, describe: 'snapshot technique (default: row, or the type\'s)' })
          .option('block-size', { type: 'string', describe: 'pointer-table block size, e.g. 64K' })
          .option('cow-reserve', { type: 'string', describe: 'COW: reserve space per snapshot, e.g. 1G' })
          .option('type', { type: 'string', describe: 'volume type to take the settings from' }),
      (a) =>
        call<VolumeInfo>(a, 'volume.create', { name: a.name, size: parseSize(a.size), mode: a['snapshot-mode'], blockSize: sizeArg(a['block-size']), cowReserve: sizeArg(a['cow-reserve']), type: a.type }, (v) => `created volume ${v.name} (${formatSize(v.size)}, ${v.mode} snapshots); export name "${v.name}"`),
    )
    .command(['list', 'ls'], 'list volumes', (a) => a, (a) => call<VolumeInfo[]>(a, 'volume.list', {}, volumeTable))
    .command('info <name>', 'show one volume (provisioned vs allocated bytes)', (a) => a.positional('name', { type: 'string', demandOption: true }), (a) => call(a, 'volume.info', { name: a.name }, volumeDetails))
    .command(
      'resize <name> <size>',
      'grow a volume (shrinking needs --force)',
      (a) =>
        a
          .positional('name', { type: 'string', demandOption: true })
          .positional('size', { type: 'string', demandOption: true })
          .option('force', { type: 'boolean', default: false, describe: 'allow shrinking, which discards data past the new end' }),
      (a) => call<VolumeInfo>(a, 'volume.resize', { name: a.name, size: parseSize(a.size), force: a.force }, (v) => `resized volume ${v.name} to ${formatSize(v.size)}`),
    )
    .command(
      ['delete <name>', 'rm <name>'],
      'delete a volume and its data (refused while it has snapshots, clones, an active replication pair or connected clients)',
      (a) =>
        a
          .positional('name', { type: 'string', demandOption: true })
          .option('force', { type: 'boolean', default: false, describe: 'also when it has snapshots (deleted with it) or an active replication pair (the peer keeps its copy); never with clones or connected clients' }),
      (a) => call(a, 'volume.delete', { name: a.name, force: a.force }, () => `deleted volume ${a.name}`),
    )
    .command(
      'clone <volume> <snapshot> <name>',
      'create a writable volume from a snapshot',
      (a) => a.positional('volume', { type: 'string', demandOption: true }).positional('snapshot', { type: 'string', demandOption: true }).positional('name', { type: 'string', demandOption: true }),
      (a) => call<VolumeInfo>(a, 'volume.clone', { volume: a.volume, snapshot: a.snapshot, name: a.name }, (v) => `created clone ${v.name} of ${a.volume}@${a.snapshot}`),
    )
    .demandCommand(1, 'name a volume command: create, list, info, resize, delete or clone');
}

function snapshotCommands(y: Argv<Global>): Argv<Global> {
  const vs = (a: Argv<Global>) => a.positional('volume', { type: 'string', demandOption: true }).positional('name', { type: 'string', demandOption: true });
  return y
    .command('create <volume> <name>', 'take a crash-consistent snapshot (export VOLUME@NAME, read-only)', vs, (a) =>
      call<SnapshotInfo>(a, 'snapshot.create', { volume: a.volume, name: a.name }, (s) => `created snapshot ${a.volume}@${s.name}`),
    )
    .command(['list <volume>', 'ls <volume>'], 'list the snapshots of a volume', (a) => a.positional('volume', { type: 'string', demandOption: true }), (a) => call(a, 'snapshot.list', { volume: a.volume }, snapshotTable))
    .command('info <volume> <name>', 'show one snapshot', vs, (a) =>
      call<SnapshotInfo[]>(a, 'snapshot.list', { volume: a.volume }, (list) => {
        const s = list.find((x) => x.name === a.name);
        if (!s) throw new Error(`no snapshot named "${a.name}"`);
        return snapshotTable([s]);
      }),
    )
    .command(['delete <volume> <name>', 'rm <volume> <name>'], 'delete a snapshot and free what only it holds (refused while a clone reads through it or a client is connected to it; there is no --force: the clone would lose data)', vs, (a) => call(a, 'snapshot.delete', { volume: a.volume, name: a.name }, () => `deleted snapshot ${a.volume}@${a.name}`))
    .command(
      'rollback <volume> <name>',
      'make the volume read exactly as the snapshot (newer snapshots are kept)',
      (a) => vs(a).option('force', { type: 'boolean', default: false, describe: 'even while clients are connected to the volume' }),
      (a) => call(a, 'snapshot.rollback', { volume: a.volume, name: a.name, force: a.force }, () => `rolled ${a.volume} back to ${a.name}`),
    )
    .command(
      'diff <volume> <from> [to]',
      'extents changed between two snapshots, or since a snapshot (no [to])',
      (a) => a.positional('volume', { type: 'string', demandOption: true }).positional('from', { type: 'string', demandOption: true }).positional('to', { type: 'string' }),
      (a) => call<ChangedExtent[]>(a, 'snapshot.diff', { volume: a.volume, from: a.from, to: a.to }, diffTable),
    )
    .demandCommand(1, 'name a snapshot command: create, list, info, delete, rollback or diff');
}

function mirrorCommands(y: Argv<Global>): Argv<Global> {
  const v = (a: Argv<Global>) => a.positional('volume', { type: 'string', demandOption: true });
  const status = (s: unknown) => Object.entries(s as Record<string, unknown>).map(([k, val]) => `${k}: ${val}`).join('\n');
  return y
    .command('attach <volume>', 'build a full mirror in the background (split it off with snapshot create)', (a) => v(a).option('wait', { type: 'boolean', default: false, describe: 'wait until it is synced' }), (a) =>
      call(a, 'mirror.attach', { volume: a.volume, wait: a.wait }, status),
    )
    .command('status <volume>', 'mirror state and sync progress', v, (a) => call(a, 'mirror.status', { volume: a.volume }, status))
    .command('detach <volume>', 'abandon the mirror', v, (a) => call(a, 'mirror.detach', { volume: a.volume }, status))
    .demandCommand(1, 'name a mirror command: attach, status or detach');
}

function typeCommands(y: Argv<Global>): Argv<Global> {
  return y
    .command(
      'create <name>',
      'define a volume type (Cinder style)',
      (a) =>
        a
          .positional('name', { type: 'string', demandOption: true })
          .option('snapshot-mode', { choices: MODES })
          .option('block-size', { type: 'string' })
          .option('cow-reserve', { type: 'string' }),
      (a) => call(a, 'type.create', { name: a.name, mode: a['snapshot-mode'], blockSize: sizeArg(a['block-size']), cowReserve: sizeArg(a['cow-reserve']) }, () => `created volume type ${a.name}`),
    )
    .command(['list', 'ls'], 'list volume types', (a) => a, (a) =>
      call<Record<string, { mode: string; blockSize: number; cowReserve: number }>>(a, 'type.list', {}, (t) =>
        table([['NAME', 'MODE', 'BLOCK SIZE', 'COW RESERVE'], ...Object.entries(t).map(([n, x]) => [n, x.mode, formatSize(x.blockSize), formatSize(x.cowReserve)])]),
      ),
    )
    .command(['delete <name>', 'rm <name>'], 'delete a volume type', (a) => a.positional('name', { type: 'string', demandOption: true }), (a) => call(a, 'type.delete', { name: a.name }, () => `deleted volume type ${a.name}`))
    .demandCommand(1, 'name a type command: create, list or delete');
}

export async function main(args: string[]): Promise<void> {
  await snapblockArgs(args)
    .command(
      'serve',
      'serve every volume (and VOLUME@SNAPSHOT read-only) over NBD, with the control API on <pool>/control.sock',
      (a) =>
        a
          .option('listen', { type: 'string', default: '127.0.0.1:10809', describe: 'TCP HOST:PORT for NBD ("none" to disable)' })
          .option('socket', { type: 'string', describe: 'also serve NBD on this Unix socket' })
          .option('handshake-timeout', { type: 'number', default: 30, describe: 'seconds a negotiating client may take to send each option (the whole negotiation is capped at 10 min)' })
          .option('socket-mode', { type: 'string', default: '600', describe: 'permissions of the --socket file, octal (e.g. 660 to let its group in); the umask does not matter' })
          .option('tls-cert', { type: 'string', describe: 'server certificate (PEM) enabling STARTTLS' })
          .option('tls-key', { type: 'string', describe: 'server private key (PEM)' })
          .option('tls-ca', { type: 'string', describe: 'CA (PEM) that client certificates must chain to' })
          .option('tls', { choices: ['optional', 'require'] as const, default: 'optional' as const, describe: 'require: refuse clients that do not start TLS' })
          .check((a) => {
            if (Boolean(a['tls-cert']) !== Boolean(a['tls-key'])) return '--tls-cert and --tls-key go together';
            if (!(a['handshake-timeout'] > 0)) return `--handshake-timeout must be a positive number of seconds, got ${a['handshake-timeout']}`;
            if (!/^[0-7]{3}$/.test(a['socket-mode'])) return `--socket-mode must be octal permissions like 600 or 660, got "${a['socket-mode']}"`;
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
          socketMode: parseInt(a['socket-mode'], 8),
          handshakeTimeoutMs: a['handshake-timeout'] * 1000,
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
    .command(['snapshot', 'snap'], 'manage snapshots', (y) => snapshotCommands(y as Argv<Global>))
    .command('mirror', 'split-mirror volumes: attach, status, detach', (y) => mirrorCommands(y as Argv<Global>))
    .command('type', 'volume types', (y) => typeCommands(y as Argv<Global>))
    .command(replicationCommands)
    .command((await import('./backup.js')).backupCommandModules as never)
    .command(
      'check',
      'verify the pool and every volume against the format invariants (docs/FORMAT.md)',
      (a) => a.option('repair', { type: 'boolean', default: false, describe: 'remove what failed or interrupted commands left (NAME.creating, NAME.deleting, *.tmp-PID, orphans) and finish interrupted deletes; without it check writes nothing' }),
      async (a) => {
        const report = await callFor<CheckReport>(
          a,
          'check',
          { repair: a.repair },
          (r) => [...r.repaired.map((x) => `repaired: ${x}`), ...r.problems.map((p) => `problem: ${p}`), r.ok ? 'pool OK' : `pool has ${r.problems.length} problem(s)`].join('\n'),
          { forCheck: true },
        );
        if (!report.ok) process.exitCode = 1;
      },
    )
    .demandCommand(1, 'name a command: serve, volume, snapshot, mirror, type or check')
    .strict()
    .help()
    .alias('h', 'help')
    .version()
    .fail(failCommand)
    .parseAsync();
}

main(hideBin(process.argv)).catch(failRun);
