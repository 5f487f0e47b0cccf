// The backup repository: manifests, dependency chains, leases and garbage collection
// over an ObjectStore. See docs/BACKUP.md for the layout and the GC safety rules.
import os from 'node:os';
import { objectKeyOf, parseChunkKey } from './chunk.js';
import { idOfKey, ManifestError, manifestKey, parseManifest, partialKey, type Manifest } from './manifest.js';
import type { ObjectStore } from './store.js';

export class BackupError extends Error {
  constructor(
    readonly code: 'ENOENT' | 'EBUSY' | 'EINVAL' | 'EIO' | 'ECORRUPT',
    message: string,
  ) {
    super(message);
    this.name = 'BackupError';
  }
}

export interface Listed {
  manifest: Manifest;
  partial: boolean;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** run fn over items with at most n in flight; the first error stops new work and is thrown */
export async function forEachLimit<T>(items: Iterable<T>, n: number, fn: (item: T) => Promise<void>): Promise<void> {
  const it = items[Symbol.iterator]();
  let failed: unknown;
  const worker = async () => {
    for (;;) {
      if (failed !== undefined) return;
      const next = it.next();
      if (next.done) return;
      try {
        await fn(next.value);
      } catch (err) {
        failed ??= err;
        return;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, n) }, worker));
  if (failed !== undefined) throw failed;
}

/** at most n calls of run() at a time, the others wait in order */
export function semaphore(n: number): { run<T>(fn: () => Promise<T>): Promise<T> } {
  let active = 0;
  const waiting: Array<() => void> = [];
  return {
    async run<T>(fn: () => Promise<T>): Promise<T> {
      if (active >= n) await new Promise<void>((r) => waiting.push(r));
      else active++;
      try {
        return await fn();
      } finally {
        const next = waiting.shift();
        if (next) next();
        else active--;
      }
    },
  };
}

/**
 * The chunk objects a store holds, from one listing of chunks/ (keys come sorted), cut
 * off after `maxKeys`. covers(key) says whether the listing answers for that key: a key
 * at or before the last one listed (or any key when the listing is complete) that is
 * not in the listing is not in the store. Taken after the backup's lease, so GC cannot
 * delete what it lists (docs/BACKUP.md); a chunk another backup stores meanwhile may be
 * uploaded a second time under the same key with the same bytes, which is harmless.
 */
export class ChunkIndex {
  private constructor(
    private readonly keys: Map<string, number>,
    /** the last key listed, or undefined when the listing is complete */
    private readonly through: string | undefined,
  ) {}

  static async load(store: ObjectStore, maxKeys: number): Promise<ChunkIndex> {
    const keys = new Map<string, number>();
    let last: string | undefined;
    for await (const o of store.list('chunks/')) {
      keys.set(o.key, o.size);
      last = o.key;
      if (keys.size >= maxKeys) return new ChunkIndex(keys, last);
    }
    return new ChunkIndex(keys, undefined);
  }

  get size(): number {
    return this.keys.size;
  }

  lookup(key: string): number | undefined {
    return this.keys.get(key);
  }

  covers(key: string): boolean {
    return this.through === undefined || key <= this.through;
  }
}

/** a manifest key from a listing, before its manifest is read */
export interface ListedKey {
  id: string;
  key: string;
  partial: boolean;
  /** the id's time stamp (YYYYMMDDTHHMMSSZ): ids sort by it */
  stamp: string;
}

/** the backup id prefix of a source name (ids are `<safe name>.<time>.<random>`) */
export function idPrefixOf(name: string): string {
  return (name.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64) || 'backup') + '.';
}

export class Repository {
  /** parsed manifests by key: complete manifests never change, partials only within a run */
  private readonly cache = new Map<string, Manifest>();

  constructor(readonly store: ObjectStore) {}

  /** manifest keys (complete and in-progress) whose id starts with idPrefix, without reading them */
  async keys(idPrefix = ''): Promise<ListedKey[]> {
    const out: ListedKey[] = [];
    for await (const o of this.store.list(`backups/${idPrefix}`)) {
      const k = idOfKey(o.key);
      if (k) out.push({ id: k.id, key: o.key, partial: k.partial, stamp: k.id.split('.').slice(-2, -1)[0] ?? '' });
    }
    return out;
  }

  /** the manifest behind a listed key; undefined if it is gone or (with onDamaged) damaged */
  async load(k: ListedKey, onDamaged?: (key: string, err: Error) => void): Promise<Manifest | undefined> {
    const hit = this.cache.get(k.key);
    if (hit) return hit;
    const buf = await this.store.get(k.key);
    if (!buf) return undefined;
    try {
      const m = parseManifest(buf, k.key);
      if (!k.partial) this.cache.set(k.key, m);
      return m;
    } catch (err) {
      if (!onDamaged) throw err;
      onDamaged(k.key, err as Error);
      return undefined;
    }
  }

  /**
   * Manifests of the listed keys, newest first (by the id's time stamp, then by
   * `created` within one second), read only as far as the caller iterates.
   */
  async *newestFirst(keys: ListedKey[], onDamaged?: (key: string, err: Error) => void): AsyncIterable<Manifest> {
    const byStamp = new Map<string, ListedKey[]>();
    for (const k of keys) byStamp.set(k.stamp, [...(byStamp.get(k.stamp) ?? []), k]);
    for (const stamp of [...byStamp.keys()].sort().reverse()) {
      const group = (await Promise.all(byStamp.get(stamp)!.map((k) => this.load(k, onDamaged)))).filter((m): m is Manifest => m !== undefined);
      group.sort((a, b) => (a.created < b.created ? 1 : a.created > b.created ? -1 : a.id < b.id ? 1 : -1));
      yield* group;
    }
  }

  /** every manifest (complete and in-progress), oldest first; damaged ones are reported, not hidden */
  async all(opts: { onDamaged?: (key: string, err: Error) => void } = {}): Promise<Listed[]> {
    const keys: Array<{ key: string; partial: boolean }> = [];
    for await (const o of this.store.list('backups/')) {
      const id = idOfKey(o.key);
      if (id) keys.push({ key: o.key, partial: id.partial });
    }
    const out: Listed[] = [];
    await forEachLimit(keys, 8, async ({ key, partial }) => {
      const buf = await this.store.get(key);
      if (!buf) return; // deleted meanwhile
      try {
        out.push({ manifest: parseManifest(buf, key), partial });
      } catch (err) {
        if (!opts.onDamaged) throw err;
        opts.onDamaged(key, err as Error);
      }
    });
    return out.sort((a, b) => (a.manifest.created < b.manifest.created ? -1 : a.manifest.created > b.manifest.created ? 1 : a.manifest.id < b.manifest.id ? -1 : 1));
  }

  async get(id: string): Promise<Manifest> {
    const key = manifestKey(id);
    const hit = this.cache.get(key);
    if (hit) return hit;
    const buf = await this.store.get(key);
    if (!buf) {
      if (await this.store.head(partialKey(id))) throw new BackupError('EINVAL', `backup ${id} is incomplete (interrupted); run the same \`backup create\` again to resume it, or delete it`);
      throw new BackupError('ENOENT', `no backup ${id} in ${this.store.description}`);
    }
    const m = parseManifest(buf, key);
    this.cache.set(key, m);
    return m;
  }

  async getPartial(id: string): Promise<Manifest | undefined> {
    const buf = await this.store.get(partialKey(id));
    return buf ? parseManifest(buf, partialKey(id)) : undefined;
  }

  /** the backup and its ancestors, the full backup first */
  async chain(id: string): Promise<Manifest[]> {
    const chain: Manifest[] = [];
    const seen = new Set<string>();
    let next: string | null = id;
    while (next) {
      if (seen.has(next)) throw new BackupError('ECORRUPT', `backup ${id}: parent chain loops at ${next}`);
      seen.add(next);
      let m: Manifest;
      try {
        m = await this.get(next);
      } catch (err) {
        if (next !== id && err instanceof BackupError && err.code === 'ENOENT') throw new BackupError('ECORRUPT', `backup ${id} depends on ${next}, which is missing from ${this.store.description}`);
        throw err;
      }
      chain.unshift(m);
      next = m.parent;
    }
    if (chain[0].kind !== 'full') throw new BackupError('ECORRUPT', `backup ${id}: chain does not start with a full backup`);
    return chain;
  }

  // ---- leases ------------------------------------------------------------
  //
  // A running backup holds locks/backup-<id>.json, GC holds locks/gc.json; each is
  // refreshed every ttl/4 and counts as live while its heartbeat is younger than ttl.
  // Each side writes its own lease first and then looks for the other's (Dekker's
  // order over a strongly consistent store): at least one of two racing parties sees
  // the other, so GC never deletes a chunk a running backup has just found present.

  static ttlMs(): number {
    return Number(process.env.SNAPBLOCK_BACKUP_LEASE_TTL_MS ?? 120_000);
  }

  private async readLease(key: string): Promise<{ heartbeat: number; id?: string; parent?: string | null } | undefined> {
    const buf = await this.store.get(key);
    if (!buf) return undefined;
    try {
      return JSON.parse(buf.toString('utf8')) as { heartbeat: number; id?: string; parent?: string | null };
    } catch {
      return { heartbeat: 0 };
    }
  }

  private live(l: { heartbeat: number } | undefined): boolean {
    return l !== undefined && Date.now() - l.heartbeat < Repository.ttlMs();
  }

  private leaseBody(extra: Record<string, unknown>): Buffer {
    return Buffer.from(JSON.stringify({ ...extra, pid: process.pid, host: os.hostname(), heartbeat: Date.now() }));
  }

  private holdLease(key: string, extra: Record<string, unknown>): { release(): Promise<void> } {
    const timer = setInterval(() => void this.store.put(key, this.leaseBody(extra)).catch(() => {}), Math.max(1000, Repository.ttlMs() / 4));
    timer.unref();
    return {
      release: async () => {
        clearInterval(timer);
        await this.store.delete(key);
      },
    };
  }

  /** lease for a running backup; waits (up to waitMs) while a GC runs */
  async backupLease(id: string, parent: string | null, waitMs = 600_000): Promise<{ release(): Promise<void> }> {
    const key = `locks/backup-${id}.json`;
    const deadline = Date.now() + waitMs;
    for (;;) {
      await this.store.put(key, this.leaseBody({ id, parent }));
      if (!this.live(await this.readLease('locks/gc.json'))) return this.holdLease(key, { id, parent });
      await this.store.delete(key);
      if (Date.now() > deadline) throw new BackupError('EBUSY', 'a garbage collection holds the repository; try again later');
      await sleep(1000);
    }
  }

  /** ids (and parents) of backups running now */
  async runningBackups(): Promise<Array<{ id: string; parent: string | null }>> {
    const out: Array<{ id: string; parent: string | null }> = [];
    for await (const o of this.store.list('locks/backup-')) {
      const l = await this.readLease(o.key);
      if (this.live(l)) out.push({ id: l!.id ?? o.key, parent: l!.parent ?? null });
    }
    return out;
  }

  /**
   * Delete chunks no manifest (complete or in-progress) references. Deferred (nothing
   * deleted) while a backup runs. Returns what it did.
   */
  async collectGarbage(opts: { dryRun?: boolean } = {}): Promise<{ deferred?: string; deletedChunks: number; deletedBytes: number; keptChunks: number }> {
    const key = 'locks/gc.json';
    await this.store.put(key, this.leaseBody({ gc: true }));
    const lease = this.holdLease(key, { gc: true });
    try {
      const running = await this.runningBackups();
      if (running.length) return { deferred: `backup(s) running: ${running.map((r) => r.id).join(', ')}; run \`backup gc\` later`, deletedChunks: 0, deletedBytes: 0, keptChunks: 0 };
      const referenced = new Set<string>();
      // A damaged manifest aborts GC: its chunks cannot be told apart from garbage.
      for (const { manifest } of await this.all()) for (const c of manifest.chunks) referenced.add(objectKeyOf(c));
      let deletedChunks = 0;
      let deletedBytes = 0;
      let keptChunks = 0;
      const doomed: Array<{ key: string; size: number }> = [];
      for await (const o of this.store.list('chunks/')) {
        if (!parseChunkKey(o.key)) continue; // not ours
        if (referenced.has(o.key)) keptChunks++;
        else doomed.push(o);
      }
      await forEachLimit(doomed, 8, async (o) => {
        if (!opts.dryRun) await this.store.delete(o.key);
        deletedChunks++;
        deletedBytes += o.size;
      });
      return { deletedChunks, deletedBytes, keptChunks };
    } finally {
      await lease.release();
    }
  }

  /** Delete a backup (complete or interrupted); with cascade also every backup that depends on it. */
  async delete(id: string, opts: { cascade?: boolean; gc?: boolean } = {}): Promise<{ deleted: string[]; gc?: Awaited<ReturnType<Repository['collectGarbage']>> }> {
    const all = await this.all({ onDamaged: () => {} });
    const me = all.find((l) => l.manifest.id === id);
    if (!me) throw new BackupError('ENOENT', `no backup ${id} in ${this.store.description}`);
    // dependents, transitively, deepest last
    const dependents: Listed[] = [];
    const frontier = [id];
    while (frontier.length) {
      const p = frontier.shift()!;
      for (const l of all) if (l.manifest.parent === p && !dependents.includes(l)) (dependents.push(l), frontier.push(l.manifest.id));
    }
    const running = (await this.runningBackups()).filter((r) => r.parent === id || dependents.some((d) => d.manifest.id === r.parent) || r.id === id);
    if (running.length) throw new BackupError('EBUSY', `backup ${id} is in use by running backup(s) ${running.map((r) => r.id).join(', ')}`);
    if (dependents.length && !opts.cascade) {
      throw new BackupError('EBUSY', `backup ${id} has dependent incremental backup(s): ${dependents.map((d) => d.manifest.id).join(', ')}; delete them first or use --cascade`);
    }
    const deleted: string[] = [];
    for (const l of [...dependents.reverse(), me]) {
      await this.store.delete(l.partial ? partialKey(l.manifest.id) : manifestKey(l.manifest.id));
      // an interrupted run of the same id may also have left a partial
      if (!l.partial) await this.store.delete(partialKey(l.manifest.id));
      deleted.push(l.manifest.id);
    }
    return { deleted, gc: opts.gc === false ? undefined : await this.collectGarbage() };
  }
}

export { ManifestError };
