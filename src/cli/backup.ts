// `snapblock backup ...`, `snapblock export-diff`, `snapblock import-diff`: the backup
// sidecar. These commands run in their own process and talk to a running
// `snapblock serve` only through its control API and NBD exports.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { Argv, CommandModule } from 'yargs';
import { formatSize, parseSize } from '../pool/size.js';
import { DEFAULT_CHUNK_SIZE, DEFAULT_CONCURRENCY } from '../backup/defaults.js';
import type { BackupLog, EngineContext } from '../backup/engine.js';
import type { Repository } from '../backup/repo.js';
import type { ObjectStore } from '../backup/store.js';
import type { ProgressMode } from '../backup/progress.js';
import type { TlsFiles } from '../backup/source.js';
import { liteLogger } from '../backup/log-lite.js';
import { table } from './format.js';

// The engine, the S3 SDK and pino are loaded by the command that needs them, not when
// the command line is built: every snapblock command imports this file, and a backup
// from cron should pay only for what it uses (docs/BACKUP.md, "Start-up").
const engine = () => import('../backup/engine.js');
const poolServer = async (pool: string, tls?: TlsFiles) => (await import('../backup/source.js')).PoolServer.connect(pool, tls);

/** NBD over TLS, to the pool's server or to an --nbd / --to URI */
function tlsArgs<T>(y: Argv<T>) {
  return y
    .option('tls', { type: 'boolean', default: false, describe: 'NBD over TLS (STARTTLS, x509) to the server or the --nbd/--to URI (nbds:// URIs imply it)' })
    .option('tls-ca', { type: 'string', describe: "CA certificate (PEM) the NBD server's certificate must chain to (default: the system's CAs)" })
    .option('tls-cert', { type: 'string', describe: 'client certificate (PEM), for servers that verify clients' })
    .option('tls-key', { type: 'string', describe: 'client private key (PEM)' })
    .option('tls-hostname', { type: 'string', describe: 'name the server certificate must carry (default: the host; localhost over a Unix socket)' });
}
interface TlsArgs {
  tls?: boolean;
  'tls-ca'?: string;
  'tls-cert'?: string;
  'tls-key'?: string;
  'tls-hostname'?: string;
}
function tlsFrom(a: TlsArgs): TlsFiles | undefined {
  if (!a.tls && !a['tls-ca'] && !a['tls-cert'] && !a['tls-key'] && !a['tls-hostname']) return undefined;
  return { ca: a['tls-ca'], cert: a['tls-cert'], key: a['tls-key'], hostname: a['tls-hostname'] };
}

interface Global {
  pool: string;
  json: boolean;
  'log-level': string;
}
interface TargetArgs extends Global {
  target?: string;
  's3-endpoint'?: string;
  's3-region'?: string;
  concurrency: number;
  progress: ProgressMode;
}

const out = (s: string): void => void process.stdout.write(s + '\n');

async function logger(a: Global): Promise<BackupLog> {
  const level = a['log-level'] === 'info' && !process.env.SNAPBLOCK_LOG_LEVEL ? 'warn' : a['log-level'];
  return liteLogger(level) ?? (await import('../log.js')).createLogger({ level });
}

function targetOptions<T>(y: Argv<T>) {
  return y
    .option('target', { type: 'string', describe: 's3://BUCKET[/PREFIX] or dir:/PATH (default: S3_BUCKET from the environment, else dir:<pool>/backups)' })
    .option('s3-endpoint', { type: 'string', describe: 'S3 endpoint URL (env S3_ENDPOINT); credentials come only from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the config file' })
    .option('s3-region', { type: 'string', describe: 'S3 region (env S3_REGION, default us-east-1)' })
    .option('concurrency', { type: 'number', default: DEFAULT_CONCURRENCY, describe: 'chunks in flight (memory: about 2 x this x chunk size)' })
    .option('progress', { choices: ['auto', 'bar', 'json', 'none'] as const, default: 'auto' as const, describe: 'progress on stderr: a bar on a TTY, JSON lines otherwise' });
}

async function withStore<T>(a: TargetArgs, fn: (ctx: EngineContext, repo: Repository) => Promise<T>): Promise<T> {
  const [{ openTarget }, { Repository }] = await Promise.all([import('../backup/store.js'), import('../backup/repo.js')]);
  const store: ObjectStore = openTarget({
    target: a.target,
    endpoint: a['s3-endpoint'],
    region: a['s3-region'],
    defaultDir: path.join(path.resolve(a.pool), 'backups'),
    maxSockets: Math.max(8, a.concurrency * 2 + 2),
  });
  const log = await logger(a);
  log.debug({ target: store.description }, 'backup target');
  try {
    return await fn({ store, log, concurrency: Math.max(1, a.concurrency), progress: a.progress }, new Repository(store));
  } finally {
    store.close();
  }
}

const mib = (n: number) => `${(n / 1048576).toFixed(1)} MiB`;

function backupCommands(y: Argv<Global>): Argv<Global> {
  return targetOptions(y)
    .command(
      'create [volume]',
      'back up a volume (a snapshot of it) or an NBD export to the target',
      (a) =>
        tlsArgs(a)
          .positional('volume', { type: 'string', describe: 'volume of the running server on --pool' })
          .option('incremental', { type: 'boolean', default: false, describe: 'store only what changed since the newest backup of the volume' })
          .option('snapshot', { type: 'string', describe: 'back up this existing snapshot (default: take one named backup-<time>)' })
          .option('nbd', { type: 'string', describe: 'back up any NBD export instead: nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH (full, holes skipped)' })
          .option('chunk-size', { type: 'string', describe: 'chunk size, a power of two from 64K to 64M (default 4M; an incremental keeps its parent\'s)' })
          .option('resume', { type: 'boolean', default: true, describe: 'resume an interrupted backup of the same volume (--no-resume: start over)' })
          .option('keep-snapshots', { type: 'boolean', default: false, describe: 'keep the snapshots older backups took (default: only the newest, the base of the next incremental)' })
          .check((x) => {
            if (!x.volume === !x.nbd) return 'name a VOLUME or --nbd URI (one of them)';
            const cs = x['chunk-size'] === undefined ? DEFAULT_CHUNK_SIZE : parseSize(x['chunk-size']);
            if (cs < 65536 || cs > 64 * 1048576 || (cs & (cs - 1)) !== 0) return '--chunk-size must be a power of two between 64K and 64M';
            return true;
          }),
      async (a) => {
        const r = await withStore(a as unknown as TargetArgs, async (ctx) => {
          const tls = tlsFrom(a);
          const [server, { createBackup }] = await Promise.all([a.volume ? poolServer(a.pool, tls) : undefined, engine()]);
          return createBackup(ctx, {
            server,
            volume: a.volume,
            nbdUri: a.nbd,
            tls,
            incremental: a.incremental,
            snapshot: a.snapshot,
            chunkSize: a['chunk-size'] !== undefined ? parseSize(a['chunk-size']) : undefined,
            resume: a.resume,
            keepSnapshots: a['keep-snapshots'],
          });
        });
        out(
          a.json
            ? JSON.stringify(r, null, 2)
            : `${r.resumed ? 'resumed and completed' : 'created'} ${r.kind} backup ${r.id}${r.parent ? ` (parent ${r.parent})` : ''} of ${r.snapshot ?? 'the export'}: ` +
                `read ${mib(r.readBytes)}, ${r.chunks} chunks, uploaded ${r.uploadedChunks} in ${r.uploadedObjects} object(s) (${mib(r.uploadedBytes)}), ${r.existingChunks} already stored` +
                `${r.resumedChunks ? `, ${r.resumedChunks} from the interrupted run` : ''}, ${r.seconds.toFixed(1)} s`,
        );
      },
    )
    .command(
      ['list', 'ls'],
      'list backups in the target',
      (a) => a,
      async (a) => {
        const rows = await withStore(a as unknown as TargetArgs, async (_ctx, repo) => {
          const damaged: string[] = [];
          const all = await repo.all({ onDamaged: (k, e) => damaged.push(`${k}: ${e.message}`) });
          for (const d of damaged) process.stderr.write(`snapblock: damaged manifest ${d}\n`);
          return all.map(({ manifest: m, partial }) => ({
            id: m.id,
            state: partial ? 'incomplete' : 'complete',
            kind: m.kind,
            parent: m.parent,
            source: m.source.type === 'pool' ? `${m.source.volume}@${m.source.snapshot}` : m.source.uri,
            size: m.size,
            dataBytes: m.chunks.reduce((n, c) => n + c[1], 0),
            storedBytes: m.chunks.reduce((n, c) => n + c[4], 0),
            created: m.created,
          }));
        });
        if (a.json) return out(JSON.stringify(rows, null, 2));
        if (!rows.length) return out('no backups');
        out(table([['ID', 'STATE', 'KIND', 'PARENT', 'SOURCE', 'SIZE', 'DATA', 'CREATED'], ...rows.map((r) => [r.id, r.state, r.kind, r.parent ?? '-', r.source, formatSize(r.size), formatSize(r.dataBytes), r.created])]));
      },
    )
    .command(
      'show <id>',
      'show one backup (manifest summary; --json prints the manifest)',
      (a) => a.positional('id', { type: 'string', demandOption: true }),
      async (a) => {
        await withStore(a as unknown as TargetArgs, async (_ctx, repo) => {
          const m = (await repo.getPartial(a.id).catch(() => undefined)) ?? (await repo.get(a.id));
          const full = await repo.get(a.id).catch(() => undefined);
          const man = full ?? m;
          if (a.json) return out(JSON.stringify(man, null, 2));
          const chain = full ? (await repo.chain(a.id)).map((c) => c.id) : [];
          out(
            [
              ['id', man.id],
              ['state', full ? 'complete' : 'incomplete (interrupted)'],
              ['kind', man.kind],
              ['parent', man.parent ?? '-'],
              ['chain', chain.join(' <- ') || '-'],
              ['source', man.source.type === 'pool' ? `volume ${man.source.volume} (created ${man.source.volumeCreated}), snapshot ${man.source.snapshot}` : man.source.uri],
              ['size', `${formatSize(man.size)} (${man.size} bytes)`],
              ['chunk size', formatSize(man.chunkSize)],
              ['chunks', `${man.chunks.length} (${formatSize(man.chunks.reduce((n, c) => n + c[1], 0))} data, ${formatSize(man.chunks.reduce((n, c) => n + c[4], 0))} stored)`],
              ['zeroed ranges', String(man.zeroed.length)],
              ['created', man.created],
              ['completed', man.completed ?? '-'],
              ['checksum', man.checksum],
            ]
              .map(([k, v]) => `${k.padEnd(14)} ${v}`)
              .join('\n'),
          );
        });
      },
    )
    .command(
      ['delete <id>', 'rm <id>'],
      'delete a backup (refused while incrementals depend on it, unless --cascade), then collect unreferenced chunks',
      (a) => a.positional('id', { type: 'string', demandOption: true }).option('cascade', { type: 'boolean', default: false, describe: 'also delete every backup that depends on it' }),
      async (a) => {
        const r = await withStore(a as unknown as TargetArgs, (_ctx, repo) => repo.delete(a.id, { cascade: a.cascade }));
        out(
          a.json
            ? JSON.stringify(r, null, 2)
            : `deleted backup(s) ${r.deleted.join(', ')}; ` + (r.gc?.deferred ? `chunk collection deferred: ${r.gc.deferred}` : `collected ${r.gc?.deletedChunks ?? 0} unreferenced chunk(s) (${mib(r.gc?.deletedBytes ?? 0)})`),
        );
      },
    )
    .command(
      'restore <id> [volume]',
      'restore a backup into a NEW volume of the running server (or --to an NBD export)',
      (a) =>
        tlsArgs(a)
          .positional('id', { type: 'string', demandOption: true })
          .positional('volume', { type: 'string', describe: 'name of the new volume' })
          .option('to', { type: 'string', describe: 'write into this NBD export instead (nbd://HOST[:PORT]/EXPORT); holes are zeroed' })
          .option('keep-partial', { type: 'boolean', default: false, describe: 'keep the new volume if the restore fails' })
          .check((x) => (!x.volume === !x.to ? 'name a new VOLUME or --to URI (one of them)' : true)),
      async (a) => {
        const r = await withStore(a as unknown as TargetArgs, async (ctx) =>
          (await engine()).restoreBackup(ctx, a.id, { server: a.volume ? await poolServer(a.pool, tlsFrom(a)) : undefined, volume: a.volume, nbdUri: a.to, tls: tlsFrom(a), keepPartial: a['keep-partial'] }),
        );
        out(a.json ? JSON.stringify(r, null, 2) : `restored ${r.id} (${formatSize(r.size)}, chain ${r.chain.length}) into ${r.target}: wrote ${mib(r.writtenBytes)} from ${r.chunks} chunks in ${r.seconds.toFixed(1)} s`);
      },
    )
    .command(
      'verify <id>',
      're-read every chunk the backup needs and check its sha256',
      (a) => a.positional('id', { type: 'string', demandOption: true }),
      async (a) => {
        const r = await withStore(a as unknown as TargetArgs, async (ctx) => (await engine()).verifyBackup(ctx, a.id));
        if (a.json) out(JSON.stringify(r, null, 2));
        else {
          for (const p of r.problems) out(`${p.problem}: backup ${p.backup} offset ${p.offset} length ${p.length} chunk ${p.key}: ${p.detail}`);
          out(r.ok ? `backup ${r.id} OK: ${r.chunks} chunks, ${mib(r.bytes)} verified (chain ${r.chain.join(' <- ')})` : `backup ${r.id} FAILED: ${r.problems.length} problem(s) in ${r.chunks} chunks`);
        }
        if (!r.ok) process.exitCode = 1;
      },
    )
    .command(
      'gc',
      'delete chunks no backup references (deferred while a backup runs)',
      (a) => a.option('dry-run', { type: 'boolean', default: false }),
      async (a) => {
        const r = await withStore(a as unknown as TargetArgs, (_ctx, repo) => repo.collectGarbage({ dryRun: a['dry-run'] }));
        out(a.json ? JSON.stringify(r, null, 2) : r.deferred ? `deferred: ${r.deferred}` : `${a['dry-run'] ? 'would delete' : 'deleted'} ${r.deletedChunks} chunk(s) (${mib(r.deletedBytes)}), kept ${r.keptChunks}`);
      },
    )
    .demandCommand(1, 'name a backup command: create, list, show, delete, restore, verify or gc');
}

/** Copy a stream that can be read only once (stdin, a pipe) into a private temp file in $TMPDIR. */
async function spool(input: NodeJS.ReadableStream, what: string): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapblock-import-'));
  const file = path.join(dir, 'input.diff');
  try {
    await pipeline(input, fs.createWriteStream(file, { mode: 0o600 }));
  } catch (err) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw new Error(`reading the diff from ${what} into ${dir} failed: ${(err as Error).message}`);
  }
  return file;
}

function parseVolSnap(s: string): { volume: string; snapshot: string } {
  const at = s.indexOf('@');
  if (at <= 0 || at === s.length - 1) throw new Error(`"${s}": name a snapshot as VOLUME@SNAPSHOT`);
  return { volume: s.slice(0, at), snapshot: s.slice(at + 1) };
}

export const backupCommandModules: CommandModule<Global, Global>[] = [
  {
    command: 'backup',
    describe: 'backup sidecar: chunked full/incremental backups to S3 or a directory, restore, verify',
    builder: (y) => backupCommands(y as Argv<Global>),
    handler: () => {},
  },
  {
    command: 'export-diff <snapshot> <file>',
    describe: 'write VOLUME@SNAP (or its changes since --from-snap) as an `rbd export-diff` v1 stream (FILE or - for stdout)',
    builder: (y) =>
      tlsArgs(y as Argv<Global>)
        .positional('snapshot', { type: 'string', demandOption: true, describe: 'VOLUME@TO' })
        .positional('file', { type: 'string', demandOption: true })
        .option('from-snap', { type: 'string', describe: 'older snapshot of the same volume' }) as unknown as Argv<Global>,
    handler: async (a) => {
      const args = a as unknown as Global & TlsArgs & { snapshot: string; file: string; 'from-snap'?: string };
      const { volume, snapshot } = parseVolSnap(args.snapshot);
      const server = await poolServer(args.pool, tlsFrom(args));
      // yargs hands a lone "-" positional over as ''
      const toStdout = args.file === '-' || args.file === '';
      const tmp = toStdout ? '' : `${args.file}.tmp-${process.pid}`;
      const stream = toStdout ? process.stdout : fs.createWriteStream(tmp);
      try {
        const r = await (await import('../backup/rbd-diff.js')).exportDiff(server, volume, snapshot, args['from-snap'], stream);
        if (!toStdout) {
          await new Promise<void>((resolve, reject) => (stream as fs.WriteStream).end((err?: Error | null) => (err ? reject(err) : resolve())));
          fs.renameSync(tmp, args.file);
        }
        const msg = `exported ${volume}@${snapshot}${r.from ? ` since ${r.from}` : ''}: ${r.dataRecords} data records (${mib(r.dataBytes)}), ${r.zeroRecords} zero records (${mib(r.zeroBytes)})`;
        if (toStdout) process.stderr.write(msg + '\n');
        else out(args.json ? JSON.stringify(r, null, 2) : msg);
      } catch (err) {
        if (!toStdout) {
          (stream as fs.WriteStream).destroy();
          fs.rmSync(tmp, { force: true });
        }
        throw err;
      }
    },
  },
  {
    command: 'import-diff <file> <volume>',
    describe: 'apply an `rbd export-diff` v1 stream (FILE or - for stdin) to VOLUME and create its to-snapshot; the whole stream is checked first (stdin is kept in $TMPDIR meanwhile), so a refused import changes nothing',
    builder: (y) => tlsArgs(y as Argv<Global>).positional('file', { type: 'string', demandOption: true }).positional('volume', { type: 'string', demandOption: true }) as unknown as Argv<Global>,
    handler: async (a) => {
      const args = a as unknown as Global & TlsArgs & { file: string; volume: string };
      const server = await poolServer(args.pool, tlsFrom(args));
      // The stream is read twice (checked whole, then applied): stdin or a pipe is kept in a temp file.
      const fromStdin = args.file === '-' || args.file === '';
      const spooled = fromStdin || !fs.statSync(args.file).isFile();
      const file = fromStdin ? await spool(process.stdin, 'stdin') : spooled ? await spool(fs.createReadStream(args.file), args.file) : args.file;
      let r;
      try {
        r = await (await import('../backup/rbd-diff.js')).importDiff(server, args.volume, () => fs.createReadStream(file, { highWaterMark: 1 << 20 }));
      } finally {
        if (spooled) fs.rmSync(path.dirname(file), { recursive: true, force: true });
      }
      out(args.json ? JSON.stringify(r, null, 2) : `imported into ${args.volume}${r.from ? ` (from ${r.from})` : ''}: ${r.dataRecords} data records (${mib(r.dataBytes)}), ${r.zeroRecords} zero records${r.snapshotCreated ? `; created snapshot ${args.volume}@${r.snapshotCreated}` : ''}`);
    },
  },
];
