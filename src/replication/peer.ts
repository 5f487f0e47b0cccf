// How two snapblock servers talk: only over NBD. The secondary copy of volume V is
// reached through the reserved export name "replica:V?<params>" that every snapblock
// server's replication service answers (ordinary names never contain ':'):
//
//   op=push      (default) the primary feeds V: V is created as a secondary when missing
//                (size, bs, mode given); a secondary V is served read-write; a V that
//                was promoted here is served READ-ONLY, which tells the old primary that
//                it has been failed over.
//   op=promote   planned failover from the primary side: V becomes the primary here.
//   op=failback  the original primary takes V back: V is demoted to a secondary here
//                (its own clients lose write access) and served read-write so the
//                original primary can copy what changed while it was failed over.
//   op=state     the disk state of V here (disk-state.ts), served as a small read-only
//                export whose bytes are its JSON; with disk=... the primary first records
//                the state it puts V in (durably, before the open completes): Inconsistent
//                before the first byte of a sync lands, progress while it runs, UpToDate
//                (with the shared generation) once the copy is complete and flushed, or
//                detach=clean when it stops with nothing left to ship.
import { NbdClient, type ClientOptions } from '../nbd/client.js';
import { PoolError } from '../pool/names.js';

export const REPLICA_PREFIX = 'replica:';
export type PeerOp = 'push' | 'promote' | 'failback' | 'state';

export interface PeerRequest {
  volume: string;
  op: PeerOp;
  size?: number;
  blockSize?: number;
  mode?: 'row' | 'cow' | 'mirror';
  replMode?: 'sync' | 'async';
  from?: string;
  /** push: the primary's onLinkLoss (degrade: it may acknowledge writes without this copy) */
  onLinkLoss?: 'block' | 'degrade';
  /** state: what the primary puts this copy in */
  disk?: 'UpToDate' | 'Inconsistent';
  phase?: 'initial' | 'resync' | 'failback';
  done?: number;
  total?: number;
  gen?: string;
  lagging?: boolean;
  detach?: 'clean';
}

export function replicaExportName(r: PeerRequest): string {
  const q = new URLSearchParams();
  q.set('op', r.op);
  if (r.size !== undefined) q.set('size', String(r.size));
  if (r.blockSize !== undefined) q.set('bs', String(r.blockSize));
  if (r.mode) q.set('mode', r.mode);
  if (r.replMode) q.set('repl', r.replMode);
  if (r.from) q.set('from', r.from);
  if (r.onLinkLoss) q.set('loss', r.onLinkLoss);
  if (r.disk) q.set('disk', r.disk);
  if (r.phase) q.set('phase', r.phase);
  if (r.done !== undefined) q.set('done', String(r.done));
  if (r.total !== undefined) q.set('total', String(r.total));
  if (r.gen) q.set('gen', r.gen);
  if (r.lagging !== undefined) q.set('lagging', r.lagging ? '1' : '0');
  if (r.detach) q.set('detach', r.detach);
  return `${REPLICA_PREFIX}${r.volume}?${q.toString()}`;
}

export function parseReplicaExportName(name: string): PeerRequest | undefined {
  if (!name.startsWith(REPLICA_PREFIX)) return undefined;
  const rest = name.slice(REPLICA_PREFIX.length);
  const q = rest.indexOf('?');
  const volume = q < 0 ? rest : rest.slice(0, q);
  const p = new URLSearchParams(q < 0 ? '' : rest.slice(q + 1));
  const num = (k: string) => (p.has(k) ? Number(p.get(k)) : undefined);
  const op = (p.get('op') ?? 'push') as PeerOp;
  if (!['push', 'promote', 'failback', 'state'].includes(op)) return undefined;
  const mode = p.get('mode') ?? undefined;
  const repl = p.get('repl') ?? undefined;
  const disk = p.get('disk');
  const phase = p.get('phase');
  return {
    volume,
    op,
    size: num('size'),
    blockSize: num('bs'),
    mode: mode === 'row' || mode === 'cow' || mode === 'mirror' ? mode : undefined,
    replMode: repl === 'sync' || repl === 'async' ? repl : undefined,
    from: p.get('from') ?? undefined,
    onLinkLoss: p.get('loss') === 'degrade' ? 'degrade' : p.get('loss') === 'block' ? 'block' : undefined,
    disk: disk === 'UpToDate' || disk === 'Inconsistent' ? disk : undefined,
    phase: phase === 'initial' || phase === 'resync' || phase === 'failback' ? phase : undefined,
    done: num('done'),
    total: num('total'),
    gen: p.get('gen') ?? undefined,
    lagging: p.has('lagging') ? p.get('lagging') === '1' : undefined,
    detach: p.get('detach') === 'clean' ? 'clean' : undefined,
  };
}

/** Where a backend URI points: nbd://HOST[:PORT] or nbd+unix:///?socket=PATH. */
export function parseBackendUri(uri: string): Pick<ClientOptions, 'host' | 'port' | 'socketPath'> {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new PoolError('EINVAL', `backend URI "${uri}" is not a URI; use nbd://HOST:PORT or nbd+unix:///?socket=PATH`);
  }
  if (u.protocol === 'nbd:') {
    if (!u.hostname) throw new PoolError('EINVAL', `backend URI "${uri}" names no host`);
    if (u.pathname && u.pathname !== '/') throw new PoolError('EINVAL', `backend URI "${uri}" must not name an export: replication picks the export per volume`);
    return { host: u.hostname.replace(/^\[|\]$/g, ''), port: u.port ? Number(u.port) : 10809 };
  }
  if (u.protocol === 'nbd+unix:') {
    const socketPath = u.searchParams.get('socket');
    if (!socketPath) throw new PoolError('EINVAL', `backend URI "${uri}" needs ?socket=PATH`);
    return { socketPath };
  }
  throw new PoolError('EINVAL', `backend URI "${uri}" must start with nbd:// or nbd+unix://`);
}

export function connectPeer(uri: string, req: PeerRequest, opts: { timeoutMs?: number; allocation?: boolean } = {}): Promise<NbdClient> {
  return NbdClient.connect({ ...parseBackendUri(uri), exportName: replicaExportName(req), timeoutMs: opts.timeoutMs, metaContexts: opts.allocation ? ['base:allocation'] : undefined });
}

/** What op=state serves: the copy's disk state and its role there. */
export interface PeerState {
  role?: 'primary' | 'secondary';
  state?: string;
  disk: 'UpToDate' | 'Inconsistent' | 'Outdated';
  why?: string;
  gen?: string;
  parted?: string;
  forcedFrom?: 'UpToDate' | 'Inconsistent' | 'Outdated';
  /** the server keeps no disk states (older snapblock, or no such replicated volume there) */
  unsupported?: boolean;
}

/**
 * Ask the server behind uri for the disk state of its copy of the volume, recording an
 * update there first when the request carries one (durable there once this resolves).
 */
export async function peerState(uri: string, req: Omit<PeerRequest, 'op'>, timeoutMs: number): Promise<PeerState> {
  try {
    return await askPeerState(uri, req, timeoutMs);
  } catch (err) {
    // A snapblock server from before disk states refuses op=state: it keeps none.
    if (/^export ".*" refused/.test((err as Error).message)) return { disk: 'UpToDate', unsupported: true };
    throw err;
  }
}

async function askPeerState(uri: string, req: Omit<PeerRequest, 'op'>, timeoutMs: number): Promise<PeerState> {
  const c = await connectPeer(uri, { ...req, op: 'state' }, { timeoutMs });
  try {
    return JSON.parse((await c.read(0, c.size)).toString('utf8')) as PeerState;
  } finally {
    await c.close().catch(() => {});
  }
}
