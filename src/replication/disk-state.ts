// The disk state of one copy of a replicated volume, as DRBD keeps it (docs/REPLICATION.md,
// "Disk states and generations"): UpToDate, Inconsistent (a sync into it started and has not
// completed) or Outdated (it knows it may miss writes), plus the data generation that tells
// a failback whether both copies were written since they parted (split brain).
//
// One small JSON file per volume and pool, <pool>/replication/<volume>.state, replaced
// atomically (write, fsync, rename, fsync of the directory) on every change: a state that
// was reported is durable, whichever process dies next.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Pool } from '../pool/pool.js';
import { writeFileAtomic } from '../pool/atomic-file.js';

export type DiskState = 'UpToDate' | 'Inconsistent' | 'Outdated';
export type SyncPhase = 'initial' | 'resync' | 'failback';

export interface SyncProgress {
  phase: SyncPhase;
  /** bytes of the sync done / to do, as last reported by the copy's source */
  done: number;
  total: number;
}

export interface ReplicaState {
  disk: DiskState;
  /** why the disk is not UpToDate, in words for the operator */
  why?: string;
  /** while Inconsistent: how far the sync into this copy got */
  sync?: SyncProgress;
  /**
   * A secondary fed by a primary that acknowledges writes before this copy has them (async,
   * or sync with onLinkLoss=degrade): if the link ends without the primary's clean stop, or
   * this server dies while fed, this copy may miss writes and becomes Outdated.
   */
  lagging?: boolean;
  /** the data generation of this copy; both copies carry the same one once in sync */
  gen?: string;
  /**
   * Set once this copy acknowledged a write the other copy does not have (a primary writing
   * while the link is down, a promoted secondary written): the generation both shared when
   * they parted. Set on both sides = split brain. Cleared when the copies are made equal.
   */
  parted?: string;
  /** promoted with --force while in this disk state (a copy promoted while Inconsistent lacks data its old primary has) */
  forcedFrom?: DiskState;
  changed?: string;
}

const cache = new Map<string, ReplicaState>();

export function replicaStatePath(pool: Pool, volume: string): string {
  return path.join(pool.dir, 'replication', `${volume}.state`);
}

export const newGeneration = (): string => crypto.randomBytes(8).toString('hex');

/**
 * A copy with no state file predates disk states (or is a primary that never recorded one):
 * it is taken as UpToDate, as every copy was before disk states existed.
 */
export function readReplicaState(pool: Pool, volume: string): ReplicaState {
  const file = replicaStatePath(pool, volume);
  const known = cache.get(file);
  if (known) return known;
  let s: ReplicaState;
  try {
    s = JSON.parse(fs.readFileSync(file, 'utf8')) as ReplicaState;
    if (!['UpToDate', 'Inconsistent', 'Outdated'].includes(s.disk)) throw new Error(`unknown disk state ${String(s.disk)}`);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { disk: 'UpToDate' };
    // Never take an unreadable state for a good one.
    s = { disk: 'Outdated', why: `its disk state file cannot be read (${(err as Error).message})` };
  }
  cache.set(file, s);
  return s;
}

/** Replace the state durably (returns once it is on disk). */
export function writeReplicaState(pool: Pool, volume: string, next: ReplicaState): ReplicaState {
  const file = replicaStatePath(pool, volume);
  fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
  const s: ReplicaState = dropUndefined({ ...next, changed: new Date().toISOString() });
  writeFileAtomic(file, JSON.stringify(s, null, 2) + '\n');
  cache.set(file, s);
  return s;
}

export function updateReplicaState(pool: Pool, volume: string, patch: Partial<ReplicaState>): ReplicaState {
  return writeReplicaState(pool, volume, { ...readReplicaState(pool, volume), ...patch });
}

/** This copy's generation, created (durably) on first use. */
export function ownGeneration(pool: Pool, volume: string): string {
  const s = readReplicaState(pool, volume);
  return s.gen ?? writeReplicaState(pool, volume, { ...s, gen: newGeneration() }).gen!;
}

/**
 * This copy acknowledges (or is about to) a write the other copy will not get: it starts
 * a generation of its own, remembering the one both shared. Once per parting; durable
 * when it returns, so callers make it before acknowledging the write.
 */
export function markWrittenApart(pool: Pool, volume: string): void {
  const s = readReplicaState(pool, volume);
  if (s.parted) return;
  writeReplicaState(pool, volume, { ...s, parted: s.gen ?? 'none', gen: newGeneration() });
}

/** Both copies hold the same data again (sync or failback completed): one shared generation. */
export function rejoined(pool: Pool, volume: string, gen: string): void {
  const s = readReplicaState(pool, volume);
  if (s.disk === 'UpToDate' && s.gen === gen && !s.parted && !s.sync) return;
  writeReplicaState(pool, volume, { disk: 'UpToDate', gen, lagging: s.lagging });
}

/** What `replication status` shows about a copy's disk. */
export function diskDetails(s: ReplicaState): Record<string, unknown> {
  return dropUndefined({
    disk: s.disk,
    diskReason: s.disk === 'UpToDate' ? undefined : s.why,
    syncProgress: s.disk === 'Inconsistent' ? s.sync : undefined,
    generation: s.gen,
    writtenApartSince: s.parted,
    promotedWhile: s.forcedFrom,
  });
}

/** "initial sync had copied 1.0 MiB of 400 MiB (0%)", for messages. */
export function describeSync(p: SyncProgress | undefined): string {
  if (!p) return 'no sync into it has completed';
  const pct = p.total ? Math.floor((100 * p.done) / p.total) : 0;
  return `the ${p.phase} sync into it had copied ${mib(p.done)} of ${mib(p.total)} (${pct}%)`;
}

const mib = (n: number) => `${(n / (1024 * 1024)).toFixed(1)} MiB`;

function dropUndefined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}
