// Replication commands (docs/REPLICATION.md): backend add/list/remove, replication
// type-create/enable/disable/status/resync, failover and failback. main.ts registers
// them with `.command(replicationCommands)`.
import type { Argv, CommandModule } from 'yargs';
import { createLogger } from '../log.js';
import { formatSize, parseSize } from '../pool/size.js';
import { connectPool } from './ops.js';
import { table } from './format.js';

interface G {
  pool: string;
  json: boolean;
  'log-level': string;
}

async function call<T>(argv: G, op: string, args: Record<string, unknown>, human: (r: T) => string): Promise<void> {
  const level = argv['log-level'] === 'info' && !process.env.SNAPBLOCK_LOG_LEVEL ? 'warn' : argv['log-level'];
  const pool = await connectPool(argv.pool, createLogger({ level }));
  try {
    const r = await pool.call<T>(op, args);
    process.stdout.write((argv.json ? JSON.stringify(r, null, 2) : human(r)) + '\n');
  } finally {
    await pool.close();
  }
}

type Status = Record<string, unknown> & { volume: string; replication_status: string };

type Progress = { phase: string; done: number; total: number };
const percent = (p: Progress) => `${Math.floor((100 * p.done) / Math.max(1, p.total))}%`;

/** "disk Inconsistent, initial sync 1.0 MiB of 400 MiB (0%)" */
function diskPart(s: Status): string {
  if (!s.disk) return '';
  const p = s.syncProgress as Progress | undefined;
  const sync = p ? `, ${p.phase} sync ${formatSize(p.done)} of ${formatSize(p.total)} (${percent(p)})` : '';
  const peer = s.peerDisk ? `, peer disk ${s.peerDisk}` : '';
  return `, disk ${s.disk}${sync}${peer}`;
}

function statusLine(s: Status): string {
  const lag = s.lagBytes !== undefined ? `, lag ${formatSize(Number(s.lagBytes))}${s.lagSeconds != null ? ` / ${Number(s.lagSeconds).toFixed(2)} s` : ''}` : '';
  const p = s.progress as Progress | undefined;
  const prog = p && p.phase !== 'none' && p.done < p.total ? `, ${p.phase} sync ${percent(p)}` : '';
  const notes = [s.lastError ? `last error: ${s.lastError}` : '', s.diskReason ? `disk ${s.disk}: ${s.diskReason}` : '', s.writtenApartSince ? `written apart from its peer since generation ${s.writtenApartSince}` : ''].filter(Boolean);
  return `${s.volume}: ${s.replication_status}${s.role ? ` (${s.role}, ${s.mode}${s.backendId ? ` -> ${s.backendId}` : ''}${diskPart(s)}${s.link ? `, link ${s.link}` : ''}${lag}${prog})` : ''}${notes.map((n) => `\n  ${n}`).join('')}`;
}

const vol = (a: Argv<G>) => a.positional('volume', { type: 'string', demandOption: true });

function backendCommands(y: Argv<G>): Argv<G> {
  return y
      .command(
        'add <id> <uri>',
        'name a replication target, e.g. snapblock backend add site-b nbd://10.0.0.2:10809',
        (a) => a.positional('id', { type: 'string', demandOption: true }).positional('uri', { type: 'string', demandOption: true }),
        (a) => call(a, 'backend.add', { id: a.id, uri: a.uri }, () => `added backend ${a.id} (${a.uri})`),
      )
      .command(['list', 'ls'], 'list backends', (a) => a, (a) =>
        call<Record<string, { uri: string }>>(a, 'backend.list', {}, (b) => (Object.keys(b).length ? table([['ID', 'URI'], ...Object.entries(b).map(([id, x]) => [id, x.uri])]) : 'no backends')),
      )
      .command(['remove <id>', 'rm <id>'], 'forget a backend', (a) => a.positional('id', { type: 'string', demandOption: true }), (a) => call(a, 'backend.remove', { id: a.id }, () => `removed backend ${a.id}`))
      .demandCommand(1, 'name a backend command: add, list or remove');
}

function replicationSubcommands(y: Argv<G>): Argv<G> {
  return y
      .command(
        'type-create <name>',
        'define a volume type whose volumes replicate automatically (Cinder style)',
        (a) =>
          a
            .positional('name', { type: 'string', demandOption: true })
            .option('replication', { choices: ['sync', 'async'] as const, demandOption: true, describe: 'sync: RPO 0; async: acknowledged locally, shipped in order' })
            .option('backend-id', { type: 'string', demandOption: true, describe: 'target backend (snapblock backend add)' })
            .option('on-link-loss', { choices: ['block', 'degrade'] as const, describe: 'sync mode when the link is lost (default block)' })
            .option('snapshot-mode', { choices: ['row', 'cow', 'mirror'] as const })
            .option('block-size', { type: 'string' })
            .option('cow-reserve', { type: 'string' }),
        (a) =>
          call(
            a,
            'replication.type-create',
            { name: a.name, replication: a.replication, backendId: a['backend-id'], onLinkLoss: a['on-link-loss'], mode: a['snapshot-mode'], blockSize: a['block-size'] ? parseSize(a['block-size']) : undefined, cowReserve: a['cow-reserve'] ? parseSize(a['cow-reserve']) : undefined },
            () => `created volume type ${a.name} (${a.replication} replication to ${a['backend-id']})`,
          ),
      )
      .command(
        'enable <volume>',
        'start replicating an existing volume (full initial sync, holes skipped)',
        (a) =>
          vol(a)
            .option('mode', { choices: ['sync', 'async'] as const, demandOption: true })
            .option('backend-id', { type: 'string', demandOption: true })
            .option('on-link-loss', { choices: ['block', 'degrade'] as const }),
        (a) => call<Status>(a, 'replication.enable', { volume: a.volume, mode: a.mode, backendId: a['backend-id'], onLinkLoss: a['on-link-loss'] }, statusLine),
      )
      .command('disable <volume>', 'stop replicating a volume', vol, (a) => call<Status>(a, 'replication.disable', { volume: a.volume }, statusLine))
      .command('status [volume]', 'replication status: link, lag (bytes, seconds), disk state (UpToDate, Inconsistent, Outdated) and sync progress', (a) => a.positional('volume', { type: 'string' }), (a) =>
        call<Status[]>(a, 'replication.status', { volume: a.volume }, (l) => (l.length ? l.map(statusLine).join('\n') : 'no replicated volumes')),
      )
      .command('resync <volume>', 'copy every region to the secondary again (after a rollback)', vol, (a) => call<Status>(a, 'replication.resync', { volume: a.volume }, statusLine))
      .demandCommand(1, 'name a replication command: type-create, enable, disable, status or resync');
}

const backend: CommandModule = {
  command: 'backend',
  describe: 'replication targets: other snapblock servers (nbd://HOST:PORT)',
  builder: (y) => backendCommands(y as unknown as Argv<G>) as unknown as Argv,
  handler: () => {},
};

const replication: CommandModule = {
  command: ['replication', 'repl'],
  describe: 'replicate volumes to another snapblock server (sync or async)',
  builder: (y) => replicationSubcommands(y as unknown as Argv<G>) as unknown as Argv,
  handler: () => {},
};

const failover: CommandModule<G, G & { volume: string; 'backend-id'?: string; force?: boolean }> = {
  command: 'failover <volume>',
  describe: "make the secondary the writable primary: run against the secondary's pool (the primary may be dead), or against the primary's for a planned failover. A secondary that is not UpToDate (Inconsistent: a sync into it did not complete; Outdated: it may miss writes) is refused without --force",
  builder: (y) =>
    vol(y)
      .option('backend-id', { type: 'string', describe: 'on the secondary: the backend that points back at the old primary; on the primary: the target (checked)' })
      .option('force', { type: 'boolean', describe: 'promote a secondary that is Inconsistent or Outdated, knowing its data may be inconsistent or out of date' }) as never,
  handler: (a) => call<Status>(a, 'volume.failover', { volume: a.volume, backendId: a['backend-id'], force: a.force }, statusLine),
};

const failback: CommandModule<G, G & { volume: string; 'discard-changes-on'?: 'local' | 'remote' }> = {
  command: 'failback <volume>',
  describe: "return a failed-over volume to its original primary: run against the original primary's pool (copies back what changed). Refused on split brain (both copies written since they parted) unless --discard-changes-on names the side whose changes are thrown away",
  builder: (y) =>
    vol(y).option('discard-changes-on', {
      choices: ['local', 'remote'] as const,
      describe: "split brain: local = discard this pool's changes (keep the active copy, resync it here); remote = discard the active copy's changes (keep this pool's data, resync it there)",
    }) as never,
  handler: (a) =>
    call<Status & { copiedBytes: number; kept: string }>(a, 'volume.failback', { volume: a.volume, discardChangesOn: a['discard-changes-on'] }, (s) =>
      `${statusLine(s)}\n${s.kept === 'local' ? 'kept the data of this pool, copied to the backend' : 'copied back from the backend'}: ${formatSize(s.copiedBytes)}`,
    ),
};

export const replicationCommands = [backend, replication, failover, failback] as unknown as CommandModule[];
