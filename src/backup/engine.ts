// The backup sidecar's work: create (full or incremental), restore, verify.
//
// Notes on the design
// - Reads come from a read-only NBD export of a snapshot (VOLUME@SNAP) served by
//   `snapblock serve`; this process never opens the pool, so it can crash at any
//   point without touching volume IO.
// - Full: base:allocation says where data is; holes are never read or uploaded.
//   Incremental: the `snapblock:changed:<parent snapshot>` meta context of the new
//   snapshot's export says which blocks changed since the parent's snapshot; only
//   those are read, so the cost follows the change, not the volume.
// - Pieces never cross a chunkSize boundary; each is hashed (sha256 of content),
//   zero pieces become holes, known chunks (the parent chain's) are not even HEADed,
//   others are HEADed and PUT only when absent: objects are never rewritten.
// - Bounded memory: `concurrency` pieces in flight, each at most chunkSize (plus its
//   compressed copy).
// - Resume: every few seconds the chunks done so far are written to
//   backups/<id>.partial.json; a new `backup create` of the same source finds it,
//   skips the pieces it lists and continues. Nothing stored is uploaded twice.
import { ChunkError, chooseCodec, chunkKey, decode, encode, isZero, objectKeyOf, packKey, sha256, type Codec } from './chunk.js';
import { manifestKey, mergeRanges, partialKey, resolveImage, sealManifest, MANIFEST_FORMAT, MANIFEST_VERSION, type ChunkEntry, type Manifest, type Range, type Segment } from './manifest.js';
import { createProgress, type ProgressMode } from './progress.js';
import { intersect, planPieces, subtract, total } from './ranges.js';
import { BackupError, ChunkIndex, forEachLimit, idPrefixOf, Repository, semaphore } from './repo.js';
import { connectNbd, formatNbdUri, parseNbdUri, readMap, readRange, writeRange, zeroRange, ZERO, type NbdAddress, type PoolServer, type TlsFiles } from './source.js';
import type { ObjectStore } from './store.js';
import type { NbdClient } from '../nbd/client.js';

import { DEFAULT_CHUNK_SIZE, DEFAULT_CONCURRENCY } from './defaults.js';
export { DEFAULT_CHUNK_SIZE, DEFAULT_CONCURRENCY };
/** pieces read and hashed ahead while `concurrency` uploads are in flight */
export const READ_AHEAD = Number(process.env.SNAPBLOCK_BACKUP_READ_AHEAD ?? 4);
/** NBD read requests in flight at most */
const readsInFlight = () => Number(process.env.SNAPBLOCK_BACKUP_READS ?? 8);
/** listing budget: keys listed per piece to back up (a page of 1000 keys costs about as much as a few HEADs) */
const LIST_KEYS_PER_PIECE = 50;
const CHANGED_PREFIX = 'snapblock:changed:';
/** how often an in-progress backup records what it has stored (for resume) */
const JOURNAL_MS = Number(process.env.SNAPBLOCK_BACKUP_JOURNAL_MS ?? 5000);

/** what the engine logs through (a pino Logger, or the CLI's light one) */
export interface BackupLog {
  info(obj: Record<string, unknown>, msg: string): void;
  warn(msg: string): void;
  debug(obj: Record<string, unknown>, msg: string): void;
}

export interface EngineContext {
  store: ObjectStore;
  log: BackupLog;
  progress?: ProgressMode;
  /** chunks in flight */
  concurrency?: number;
}

export interface CreateOptions {
  /** a running snapblock server and one of its volumes */
  server?: PoolServer;
  volume?: string;
  /** or any NBD export (full backups only) */
  nbdUri?: string;
  /** TLS for nbdUri (an nbds:// URI turns it on by itself) */
  tls?: TlsFiles;
  incremental?: boolean;
  /** back up this existing snapshot instead of taking one */
  snapshot?: string;
  chunkSize?: number;
  /** resume an interrupted backup of the same source (default true) */
  resume?: boolean;
  /** keep the snapshots older backups took (default: only the newest is kept, as the base of the next incremental) */
  keepSnapshots?: boolean;
  /** test hook: stop (throw) after this many pieces */
  failAfterPieces?: number;
}

export interface CreateResult {
  id: string;
  kind: 'full' | 'incremental';
  parent: string | null;
  snapshot: string | null;
  resumed: boolean;
  size: number;
  /** bytes read from the source */
  readBytes: number;
  /** bytes of data (non-zero) in this backup's chunks */
  dataBytes: number;
  chunks: number;
  /** new chunks stored (each in its own object or in a pack) */
  uploadedChunks: number;
  /** objects PUT for them: chunk objects and packs */
  uploadedObjects: number;
  uploadedBytes: number;
  /** chunks already in the store (dedup), found by HEAD or known from the parent chain */
  existingChunks: number;
  /** pieces skipped because the interrupted run had stored them */
  resumedChunks: number;
  seconds: number;
  retries: number;
  warnings: string[];
  /** seconds: snapshot, connect, maps, setup = when each was done; read, slot (waiting for an upload slot), put = summed over units, which overlap */
  timings: Record<string, number>;
}

function newId(name: string): string {
  const ts = new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
  return `${idPrefixOf(name)}${ts}.${Math.random().toString(36).slice(2, 6)}`;
}

const sameSource = (a: Manifest['source'], b: Manifest['source']) =>
  a.type === 'pool' && b.type === 'pool' ? a.volume === b.volume && a.volumeCreated === b.volumeCreated : a.type === 'nbd' && b.type === 'nbd' ? a.uri === b.uri : false;

export async function createBackup(ctx: EngineContext, opts: CreateOptions): Promise<CreateResult> {
  const t0 = Date.now();
  const tStart = performance.now();
  /** when (ms from the start) the snapshot was taken, NBD connected, the maps read */
  const marks: Record<string, number> = {};
  const { store, log } = ctx;
  const repo = new Repository(store);
  const concurrency = ctx.concurrency ?? DEFAULT_CONCURRENCY;
  const warnings: string[] = [];
  const warn = (msg: string) => (warnings.push(msg), log.warn(msg));
  const retries0 = store.stats.retries;
  const heads0 = store.stats.heads;
  const onDamaged = (key: string, err: Error) => warn(`ignoring damaged manifest ${key}: ${err.message}`);
  const server = opts.server;
  const nbdAddress = opts.nbdUri ? parseNbdUri(opts.nbdUri, opts.tls) : undefined;
  if (!nbdAddress && (!server || !opts.volume)) throw new BackupError('EINVAL', 'name a volume (with a running server) or --nbd URI');

  // ---- the source, the snapshot, the parent -------------------------------------
  // Only this source's manifests are listed (ids start with its name), and only those
  // needed are read, newest first: usually just the parent. The bucket, the listing and
  // the volume's state are fetched at the same time.
  const prefix = idPrefixOf(nbdAddress ? nbdAddress.exportName : opts.volume!);
  const [keys, info, snaps] = await Promise.all([
    // no HeadBucket first: a missing bucket shows as NoSuchBucket here, and is created then
    repo.keys(prefix).catch(async (err: unknown) => {
      if ((err as Error).name !== 'NoSuchBucket') throw err;
      await store.ensure();
      return [];
    }),
    server && !nbdAddress ? server.volumeInfo(opts.volume!) : undefined,
    server && !nbdAddress ? server.snapshots(opts.volume!) : undefined,
  ]);
  const partials = keys.filter((k) => k.partial);
  const completes = keys.filter((k) => !k.partial);
  let source: Manifest['source'];
  let address: NbdAddress;
  let resumeFrom: Manifest | undefined;
  let parent: Manifest | undefined;
  let chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
  let id: string;
  let created = new Date().toISOString();

  if (nbdAddress) {
    const a = nbdAddress;
    address = a;
    const src: Manifest['source'] = { type: 'nbd', uri: formatNbdUri(a), export: a.exportName };
    source = src;
    if (opts.incremental) warn('an NBD URI source has no changed-block tracking: taking a full backup (holes skipped via base:allocation)');
    if (opts.resume !== false) for await (const m of repo.newestFirst(partials, onDamaged)) if (sameSource(m.source, src)) (resumeFrom ??= m);
    id = resumeFrom?.id ?? newId(a.exportName);
    if (resumeFrom) {
      chunkSize = resumeFrom.chunkSize;
      created = resumeFrom.created;
    }
  } else {
    const volume = opts.volume!;
    const snapValid = (name: string) => snaps!.some((s) => s.name === name && s.status === 'valid');
    const mine = (m: Manifest) => m.source.type === 'pool' && m.source.volume === volume && m.source.volumeCreated === info!.created;
    if (opts.resume !== false) {
      for await (const m of repo.newestFirst(partials, onDamaged)) {
        if (mine(m) && m.source.type === 'pool' && snapValid(m.source.snapshot) && (!opts.snapshot || m.snapshot === opts.snapshot)) {
          resumeFrom = m;
          break;
        }
      }
    }
    if (resumeFrom) {
      id = resumeFrom.id;
      source = resumeFrom.source;
      chunkSize = resumeFrom.chunkSize;
      created = resumeFrom.created;
      if (resumeFrom.parent) parent = await repo.get(resumeFrom.parent).catch(() => undefined);
      if (resumeFrom.parent && !parent) throw new BackupError('ECORRUPT', `interrupted backup ${id} depends on ${resumeFrom.parent}, which is gone; delete ${id}`);
      log.info({ id, snapshot: resumeFrom.snapshot }, 'resuming interrupted backup');
    } else {
      id = newId(volume);
      let snapshot = opts.snapshot;
      let owns = false;
      if (snapshot) {
        if (!snapValid(snapshot)) throw new BackupError('ENOENT', `volume ${volume} has no valid snapshot "${snapshot}"`);
      } else {
        snapshot = `backup-${id.split('.').slice(-2).join('.')}`;
        owns = true;
      }
      source = { type: 'pool', volume, volumeCreated: info!.created, snapshot, ownsSnapshot: owns };
      // the newest complete backup of this volume whose snapshot still exists and is older
      // (a snapshot taken now is the newest): looked up while the snapshot is taken
      const order = [...snaps!.map((s) => s.name), ...(owns ? [snapshot] : [])];
      const findParent = async (snap: string) => {
        let candidates = 0;
        for await (const m of repo.newestFirst(completes, onDamaged)) {
          if (!mine(m) || m.source.type !== 'pool') continue;
          candidates++;
          const s = m.source.snapshot;
          if (snapValid(s) && order.indexOf(s) >= 0 && order.indexOf(s) < order.indexOf(snap)) return { parent: m, candidates };
        }
        return { parent: undefined, candidates };
      };
      const [, found] = await Promise.all([owns ? server!.createSnapshot(volume, snapshot) : undefined, opts.incremental ? findParent(snapshot) : undefined]);
      marks.snapshot = performance.now() - tStart;
      if (owns) snaps!.push({ name: snapshot, created: new Date().toISOString(), size: info!.size, status: 'valid' });
      if (found) {
        parent = found.parent;
        if (!parent) warn(found.candidates ? `no earlier backup of ${volume} has its snapshot left on the volume: taking a full backup` : `no earlier backup of ${volume}: taking a full backup`);
      }
    }
    address = server!.address(`${volume}@${source.type === 'pool' ? source.snapshot : ''}`);
  }

  // ---- read plan ----------------------------------------------------------
  const parentSnap = parent && parent.source.type === 'pool' ? parent.source.snapshot : undefined;
  const changedCtx = parentSnap ? CHANGED_PREFIX + parentSnap : undefined;
  // the lease and the NBD connection at the same time (neither needs the other)
  const [leaseR, nbdR] = await Promise.allSettled([repo.backupLease(id, parent?.id ?? null), connectNbd(address, ['base:allocation', ...(changedCtx ? [changedCtx] : [])])]);
  if (leaseR.status === 'rejected') {
    if (nbdR.status === 'fulfilled') await nbdR.value.close().catch(() => {});
    throw leaseR.reason;
  }
  const lease = leaseR.value;
  let released = false;
  let nbd: NbdClient | undefined;
  try {
    if (nbdR.status === 'rejected') throw nbdR.reason;
    nbd = nbdR.value;
    if (parent && !resumeFrom && parent.chunkSize !== chunkSize) {
      if (opts.chunkSize !== undefined) warn(`an incremental keeps its parent's chunk size (${parent.chunkSize} bytes)`);
      chunkSize = parent.chunkSize;
    }
    if (changedCtx && !nbd.contexts.has(changedCtx)) {
      if (resumeFrom) throw new BackupError('EIO', `cannot resume ${id}: the server no longer offers ${changedCtx}`);
      warn(`the server does not offer ${changedCtx}: taking a full backup`);
      parent = undefined;
    }
    const size = nbd.size;
    if (resumeFrom && resumeFrom.size !== size) throw new BackupError('EIO', `cannot resume ${id}: the source size changed`);
    const hasAlloc = nbd.contexts.has('base:allocation');
    // both maps at once (each is a few BLOCK_STATUS round trips)
    marks.connect = performance.now() - tStart;
    const [allocMap, changedMap] = await Promise.all([hasAlloc ? readMap(nbd, 'base:allocation') : undefined, parent ? readMap(nbd, changedCtx!) : undefined]);
    marks.maps = performance.now() - tStart;
    const alloc: Range[] = allocMap ? allocMap.filter((e) => !(e.flags & ZERO)).map((e) => [e.offset, e.length] as Range) : [[0, size]];
    const data = mergeRanges(alloc);
    let toRead: Range[];
    let zeroed: Range[] = [];
    if (parent) {
      const changed: Range[] = changedMap!.filter((e) => e.flags & 1).map((e) => [e.offset, e.length] as Range);
      if (size > parent.size) changed.push([parent.size, size - parent.size]);
      const c = mergeRanges(changed).map(([o, l]) => [o, Math.min(l, size - o)] as Range).filter((r) => r[1] > 0);
      toRead = intersect(c, data);
      zeroed = subtract(c, data);
    } else toRead = data;
    const pieces = planPieces(toRead, chunkSize, Math.floor(chunkSize / 16));

    // ---- what is stored already ---------------------------------------------
    const done = new Map<string, ChunkEntry>(); // "offset:length" -> entry
    const zeroPieces: Range[] = [];
    if (resumeFrom) {
      for (const c of resumeFrom.chunks) done.set(`${c[0]}:${c[1]}`, c);
      for (const z of resumeFrom.zeroed) zeroPieces.push(z);
    }

    const manifest: Manifest = {
      format: MANIFEST_FORMAT,
      version: MANIFEST_VERSION,
      id,
      kind: parent ? 'incremental' : 'full',
      parent: parent?.id ?? null,
      snapshot: source.type === 'pool' ? source.snapshot : null,
      created,
      completed: null,
      source,
      size,
      chunkSize,
      chunks: [],
      zeroed: [],
      stats: {},
      checksum: '',
    };
    const entries: ChunkEntry[] = [...done.values()];
    const stat = { readBytes: 0, dataBytes: 0, uploadedChunks: 0, uploadedObjects: 0, uploadedBytes: 0, existingChunks: 0, resumedChunks: 0 };

    // in-progress journal: one write at a time, the latest state wins
    let journaling: Promise<void> = Promise.resolve();
    let lastJournal = Date.now();
    let journaled = false;
    const journal = () => {
      lastJournal = Date.now();
      journaled = true;
      const snapshot = {
        ...manifest,
        chunks: [...entries].sort((a, b) => a[0] - b[0]),
        zeroed: mergeRanges([...zeroed, ...zeroPieces]),
        stats: { ...stat },
      };
      journaling = journaling.then(() => store.put(partialKey(id), sealManifest(snapshot)));
      return journaling;
    };
    const todo = pieces.filter(([o, l]) => !done.has(`${o}:${l}`));
    // The journal exists for a resume; a backup with nothing to read has nothing to resume.
    // Not awaited: reading starts meanwhile (a chunk stored before the journal lands and
    // then lost to a crash is only garbage for GC); a failed write loses only the resume point.
    if (!resumeFrom && todo.length) void journal().catch(() => {});

    // Which chunks the store holds: the parent chain's (named in their manifests), and one
    // bounded listing of chunks/ instead of a HEAD per chunk (both started now, awaited by
    // the first piece that needs them; neither when there is nothing to read). In a huge
    // bucket the listing stops at a budget and keys past its end are HEADed as before.
    type Known = { stored: number; pack?: string; at?: number };
    const knownP: Promise<Map<string, Known>> = // chunk key -> where its stored bytes are
      parent && todo.length
        ? repo.chain(parent.id).then((chain) => new Map(chain.flatMap((m) => m.chunks.map((c) => [chunkKey(c[2], c[3]), { stored: c[4], pack: c[5], at: c[6] }] as [string, Known]))))
        : Promise.resolve(new Map());
    knownP.catch(() => {}); // awaited below; a failure surfaces there
    const index = todo.length ? ChunkIndex.load(store, todo.length * LIST_KEYS_PER_PIECE).catch(() => undefined) : Promise.resolve(undefined);

    // Work units. A piece of at least half a chunk is one unit (its own chunk object, as in
    // format version 1). In an incremental, smaller pieces are gathered in volume order into
    // units of up to chunkSize bytes, read together and stored as one pack object (version
    // 2): on RGW a 1 MiB PUT costs the endpoint nearly what a 4 MiB one does, so scattered
    // small changes would otherwise cost an object each (docs/BACKUP.md, "Packs").
    const units: Range[][] = [];
    {
      let open: Range[] | undefined;
      let openBytes = 0;
      for (const p of todo) {
        if (!parent || p[1] >= chunkSize / 2) {
          units.push([p]);
          continue;
        }
        if (!open || openBytes + p[1] > chunkSize) {
          open = [];
          openBytes = 0;
          units.push(open);
        }
        open.push(p);
        openBytes += p[1];
      }
    }

    // Memory: `concurrency` uploads in flight plus READ_AHEAD units being read and
    // hashed meanwhile, each in one reused chunk-sized buffer (plus a compressed copy
    // for a compressible chunk while it uploads).
    const free: Buffer[] = [];
    const uploads = semaphore(concurrency);
    // NBD reads in flight: the units' pieces queue here (random 1 MiB snapshot reads went
    // at 1150 MiB/s with 8 in flight and 435 with 16, the server being on the same 2 cores)
    const reads = semaphore(readsInFlight());
    // summed over units (they overlap): where a backup's time goes, for bench/backup.mjs
    const timings: Record<string, number> = { ...marks, setup: performance.now() - tStart, read: 0, slot: 0, put: 0 };
    const progress = createProgress(`backup ${id}`, ctx.progress);
    progress.setTotal(total(pieces));
    for (const [o, l] of pieces) if (done.has(`${o}:${l}`)) (stat.resumedChunks++, progress.add(l));
    let count = 0;
    try {
      await forEachLimit(units, concurrency + READ_AHEAD, async (unit) => {
        if (opts.failAfterPieces !== undefined && (count += unit.length) > opts.failAfterPieces) throw new Error('failAfterPieces (test hook)');
        const mem = free.pop() ?? Buffer.allocUnsafeSlow(chunkSize);
        try {
          // the unit's pieces one after the other in mem, read at the same time
          const bufs: Buffer[] = [];
          let at = 0;
          for (const [, l] of unit) bufs.push(mem.subarray(at, (at += l)));
          let t = performance.now();
          await Promise.all(unit.map(([o, l], i) => reads.run(() => readRange(nbd!, o, l, bufs[i]))));
          timings.read += performance.now() - t;
          const fresh: Array<{ o: number; l: number; sha: string; codec: Codec; key: string; buf: Buffer }> = [];
          for (let i = 0; i < unit.length; i++) {
            const [o, l] = unit[i];
            const buf = bufs[i];
            stat.readBytes += l;
            if (isZero(buf)) {
              if (parent) zeroPieces.push([o, l]);
              continue;
            }
            const sha = sha256(buf);
            const codec = chooseCodec(buf);
            const key = chunkKey(sha, codec);
            const known = await knownP;
            let k = known.get(key);
            if (!k) {
              const idx = await index;
              let stored = idx?.lookup(key);
              if (stored === undefined && !idx?.covers(key)) stored = await store.head(key);
              if (stored !== undefined) k = { stored };
            }
            stat.dataBytes += l;
            if (k) {
              stat.existingChunks++;
              known.set(key, k);
              entries.push(k.pack !== undefined ? [o, l, sha, codec, k.stored, k.pack, k.at!] : [o, l, sha, codec, k.stored]);
            } else fresh.push({ o, l, sha, codec, key, buf });
          }
          if (fresh.length === 1) {
            // one new chunk: its own object
            const f = fresh[0];
            const enc = await encode(f.buf, f.codec, f.sha);
            t = performance.now();
            await uploads.run(() => ((timings.slot += performance.now() - t), store.put(f.key, enc.body, { sha256: enc.sha })));
            timings.put += performance.now() - t;
            stat.uploadedChunks++;
            stat.uploadedObjects++;
            stat.uploadedBytes += enc.body.length;
            (await knownP).set(f.key, { stored: enc.body.length });
            entries.push([f.o, f.l, f.sha, f.codec, enc.body.length]);
          } else if (fresh.length > 1) {
            // several: one pack, their stored bytes one after the other, moved down in mem
            // over the pieces that need no upload (no new buffer unless one grew compressed)
            const encs = await Promise.all(fresh.map((f) => encode(f.buf, f.codec, f.sha)));
            let body: Buffer;
            if (encs.every((e, i) => e.body.length <= fresh[i].l)) {
              let pos = 0;
              for (const e of encs) {
                if (e.body.buffer !== mem.buffer || e.body.byteOffset !== mem.byteOffset + pos) e.body.copy(mem, pos);
                pos += e.body.length;
              }
              body = mem.subarray(0, pos);
            } else body = Buffer.concat(encs.map((e) => e.body));
            const packSha = sha256(body);
            t = performance.now();
            await uploads.run(() => ((timings.slot += performance.now() - t), store.put(packKey(packSha), body, { sha256: packSha })));
            timings.put += performance.now() - t;
            stat.uploadedChunks += fresh.length;
            stat.uploadedObjects++;
            stat.uploadedBytes += body.length;
            const known = await knownP;
            let pos = 0;
            fresh.forEach((f, i) => {
              const stored = encs[i].body.length;
              entries.push([f.o, f.l, f.sha, f.codec, stored, packSha, pos]);
              known.set(f.key, { stored, pack: packSha, at: pos });
              pos += stored;
            });
          }
        } finally {
          free.push(mem);
        }
        progress.add(total(unit));
        if (Date.now() - lastJournal > JOURNAL_MS) void journal().catch(() => {});
      });
    } catch (err) {
      // keep what was done for the resume
      await journal().catch(() => {});
      throw err;
    } finally {
      progress.stop();
    }
    await journaling.catch(() => {});

    // ---- seal -----------------------------------------------------------------
    const seconds = (Date.now() - t0) / 1000;
    manifest.chunks = entries.sort((a, b) => a[0] - b[0]);
    manifest.zeroed = parent ? mergeRanges([...zeroed, ...zeroPieces]) : [];
    manifest.completed = new Date().toISOString();
    const idx = await index;
    manifest.stats = { ...stat, seconds, pieces: pieces.length, headRequests: store.stats.heads - heads0, listedChunkKeys: idx?.size ?? 0 };
    timings.units = performance.now() - tStart;
    await store.put(manifestKey(id), sealManifest(manifest));
    timings.sealed = performance.now() - tStart;

    // Then, at the same time: drop the journal (if there is one), and the snapshots older
    // backups of the volume took (only the newest is needed: the base of the next
    // incremental). Those are named backup-<time>.<random> after their backup's id, so
    // the listing says which backups to read to confirm it: usually just the parent.
    const cleanup: Array<Promise<unknown>> = [];
    if (resumeFrom || journaled) cleanup.push(store.delete(partialKey(id)));
    if (server && snaps && source.type === 'pool' && !opts.keepSnapshots) {
      const src = source;
      const byId = new Map(completes.map((k) => [k.id, k]));
      cleanup.push(
        (async () => {
          const inUse = new Set<string>();
          for await (const m of repo.newestFirst(partials.filter((k) => k.id !== id), onDamaged)) if (m.source.type === 'pool') inUse.add(m.source.snapshot);
          await Promise.all(
            snaps.map(async (s) => {
              const k = s.name !== src.snapshot && s.name.startsWith('backup-') && !inUse.has(s.name) ? byId.get(prefix + s.name.slice('backup-'.length)) : undefined;
              const m = k && (await repo.load(k, onDamaged));
              if (!m || m.source.type !== 'pool' || !sameSource(m.source, src) || !m.source.ownsSnapshot || m.source.snapshot !== s.name) return;
              try {
                await server.deleteSnapshot(src.volume, s.name);
              } catch (err) {
                warn(`could not delete old backup snapshot ${src.volume}@${s.name}: ${(err as Error).message}`);
              }
            }),
          );
        })(),
      );
    }
    // and, now that the manifest names every chunk: the lease and the NBD connection
    cleanup.push(lease.release().catch(() => {}), nbd.close().catch(() => {}));
    released = true;
    await Promise.all(cleanup);
    timings.cleanup = performance.now() - tStart;
    return {
      id,
      kind: manifest.kind,
      parent: manifest.parent,
      snapshot: manifest.snapshot,
      resumed: resumeFrom !== undefined,
      size,
      readBytes: stat.readBytes,
      dataBytes: stat.dataBytes,
      chunks: entries.length,
      uploadedChunks: stat.uploadedChunks,
      uploadedObjects: stat.uploadedObjects,
      uploadedBytes: stat.uploadedBytes,
      existingChunks: stat.existingChunks,
      resumedChunks: stat.resumedChunks,
      seconds: (Date.now() - t0) / 1000,
      retries: store.stats.retries - retries0,
      warnings,
      timings: Object.fromEntries(Object.entries(timings).map(([k, v]) => [k, +(v / 1000).toFixed(3)])),
    };
  } finally {
    if (!released) await Promise.all([nbd?.close().catch(() => {}), lease.release().catch(() => {})]);
  }
}

// ---------------------------------------------------------------------------
// Restore
// ---------------------------------------------------------------------------

export interface RestoreOptions {
  /** create this new volume on a running server */
  server?: PoolServer;
  volume?: string;
  /** or write into an existing NBD export (at least as large); holes are zeroed */
  nbdUri?: string;
  /** TLS for nbdUri (an nbds:// URI turns it on by itself) */
  tls?: TlsFiles;
  /** keep a partly restored volume after a failure (default: delete it) */
  keepPartial?: boolean;
}

export interface RestoreResult {
  id: string;
  target: string;
  size: number;
  chain: string[];
  writtenBytes: number;
  chunks: number;
  seconds: number;
  retries: number;
  /** seconds: setup = before the first GET; get, decode (decompress + sha256), write = summed over objects, which overlap */
  timings: Record<string, number>;
}

/** the chunk instance each segment comes from: consecutive segments of one chunk form one fetch */
function groupByChunk(segs: Segment[]): Segment[][] {
  const groups: Segment[][] = [];
  for (const s of segs) {
    const last = groups[groups.length - 1];
    const l = last?.[last.length - 1];
    if (l && l.sha === s.sha && l.codec === s.codec && l.pack === s.pack && l.packAt === s.packAt && l.offset - l.within === s.offset - s.within) last.push(s);
    else groups.push([s]);
  }
  return groups;
}

const segKey = (s: Segment) => (s.pack !== undefined ? packKey(s.pack) : chunkKey(s.sha, s.codec));

/**
 * One GET each: a chunk object for a run of segments from one instance of it; a pack
 * for every segment anywhere in the image that comes from it (in order of first use).
 */
function fetchUnits(segs: Segment[]): Array<{ key: string; segs: Segment[] }> {
  const out: Array<{ key: string; segs: Segment[] }> = [];
  const packs = new Map<string, { key: string; segs: Segment[] }>();
  for (const g of groupByChunk(segs)) {
    const key = segKey(g[0]);
    if (g[0].pack === undefined) out.push({ key, segs: g });
    else {
      let f = packs.get(key);
      if (!f) packs.set(key, (f = { key, segs: [] })), out.push(f);
      f.segs.push(...g);
    }
  }
  return out;
}

/** the stored bytes of a segment's chunk within the object fetched for it */
function storedBytesOf(obj: Buffer, s: Segment): Buffer {
  if (s.pack === undefined) return obj;
  const at = s.packAt!;
  if (at + s.stored > obj.length) throw new ChunkError('size', `pack holds ${obj.length} bytes, the chunk lies at ${at}..${at + s.stored}`);
  return obj.subarray(at, at + s.stored);
}

const ZERO_BLOCK = 64 * 1024;
const ZEROS = Buffer.alloc(ZERO_BLOCK);
/** [start, end) runs of data in buf that are not all zeros, at ZERO_BLOCK granularity */
function dataRuns(buf: Buffer): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let at = 0; at < buf.length; at += ZERO_BLOCK) {
    const e = Math.min(buf.length, at + ZERO_BLOCK);
    if (buf.subarray(at, e).equals(ZEROS.subarray(0, e - at))) continue;
    const last = out[out.length - 1];
    if (last && last[1] === at) last[1] = e;
    else out.push([at, e]);
  }
  return out;
}

function describeSeg(s: Segment): string {
  return `chunk ${chunkKey(s.sha, s.codec)}${s.pack !== undefined ? ` in pack ${packKey(s.pack)} at ${s.packAt}` : ''} (backup ${s.backup}, volume offset ${s.offset - s.within}, ${s.chunkLength} bytes)`;
}

export async function restoreBackup(ctx: EngineContext, id: string, opts: RestoreOptions): Promise<RestoreResult> {
  const t0 = Date.now();
  const tStart = performance.now();
  // summed over objects (they overlap): where a restore's time goes, for bench/backup.mjs
  const timings = { setup: 0, get: 0, decode: 0, write: 0 };
  const { store } = ctx;
  const retries0 = store.stats.retries;
  const repo = new Repository(store);
  const chain = await repo.chain(id);
  const m = chain[chain.length - 1];
  const segs = resolveImage(chain);
  const fetches = fetchUnits(segs);

  // Every object must be there before anything is written: one listing of chunks/
  // (bounded as for a backup; keys past its end are HEADed).
  const keys = new Map<string, Segment>();
  for (const f of fetches) if (!keys.has(f.key)) keys.set(f.key, f.segs[0]);
  const missing: string[] = [];
  const index = keys.size ? await ChunkIndex.load(store, keys.size * LIST_KEYS_PER_PIECE).catch(() => undefined) : undefined;
  await forEachLimit(keys, 16, async ([key, s]) => {
    if (index?.lookup(key) !== undefined) return;
    if (index?.covers(key) || (await store.head(key)) === undefined) missing.push(describeSeg(s));
  });
  if (missing.length) throw new BackupError('ECORRUPT', `backup ${id} cannot be restored: ${missing.length} chunk(s) missing from ${store.description}:\n  ${missing.join('\n  ')}`);

  let address: NbdAddress;
  let createdVolume: string | undefined;
  if (opts.nbdUri) address = parseNbdUri(opts.nbdUri, opts.tls);
  else {
    if (!opts.server || !opts.volume) throw new BackupError('EINVAL', 'name a new volume (with a running server) or --to nbd://...');
    await opts.server.createVolume(opts.volume, m.size);
    createdVolume = opts.volume;
    address = opts.server.address(opts.volume);
  }
  let nbd: NbdClient | undefined;
  let written = 0;
  try {
    nbd = await connectNbd(address);
    if (nbd.readOnly) throw new BackupError('EINVAL', `${formatNbdUri(address)} is read-only`);
    if (nbd.size < m.size) throw new BackupError('EINVAL', `${formatNbdUri(address)} has ${nbd.size} bytes, the backup needs ${m.size}`);
    if (!createdVolume) {
      // an existing export: whatever the image does not cover must read as zeros
      const data = mergeRanges(segs.map((s) => [s.offset, s.length] as Range));
      for (const [o, l] of subtract([[0, m.size]], data)) await zeroRange(nbd, o, l);
    }
    const target = nbd;
    // A new thin volume reads as zeros: zero blocks inside chunks are not written to it.
    const put = async (offset: number, data: Buffer) => {
      if (!createdVolume) return writeRange(target, offset, data);
      await Promise.all(dataRuns(data).map(([a, e]) => writeRange(target, offset + a, data.subarray(a, e))));
    };
    const progress = createProgress(`restore ${id}`, ctx.progress);
    progress.setTotal(segs.reduce((n, s) => n + s.length, 0));
    // Memory: `concurrency` objects in flight, each received into a reused buffer (fresh
    // memory costs more in page faults than the copy out of the socket), plus the
    // decompressed copy of a compressed chunk while it is written.
    const bufSize = Math.max(m.chunkSize, ...chain.map((c) => c.chunkSize)) + 64 * 1024;
    const free: Buffer[] = [];
    timings.setup = performance.now() - tStart;
    try {
      // GETs and writes overlap: a worker hands each object it received to a write job
      // (decode, check, write its segments, give the buffer back) and fetches the next
      // one; at most `conc` jobs at a time, so at most 2 x conc buffers.
      const conc = ctx.concurrency ?? DEFAULT_CONCURRENCY;
      const jobs = new Set<Promise<void>>();
      let jobError: unknown;
      let writing = 0;
      const slotFree: Array<() => void> = [];
      const writeObject = async (f: (typeof fetches)[number], obj: Buffer) => {
        // each chunk in the object decoded once (a pack holds several), written as
        // soon as it is checked; all writes of the object in flight together
        const contents = new Map<number, Buffer>();
        const writes: Array<Promise<void>> = [];
        try {
          for (const s of f.segs) {
            const at = s.packAt ?? 0;
            let content = contents.get(at);
            if (!content) {
              try {
                const t = performance.now();
                content = await decode(storedBytesOf(obj, s), s.codec, s.sha, s.chunkLength);
                timings.decode += performance.now() - t;
              } catch (err) {
                if (err instanceof ChunkError) throw new BackupError('ECORRUPT', `${describeSeg(s)} is ${err.reason}: ${err.message}; restore refused`);
                throw err;
              }
              contents.set(at, content);
            }
            writes.push(
              put(s.offset, content.subarray(s.within, s.within + s.length)).then(() => {
                written += s.length;
                progress.add(s.length);
              }),
            );
          }
        } finally {
          // every write settled before the buffer is reused (the socket may still hold it)
          const t = performance.now();
          const bad = (await Promise.allSettled(writes)).find((r) => r.status === 'rejected');
          timings.write += performance.now() - t;
          if (bad) throw (bad as PromiseRejectedResult).reason;
        }
      };
      try {
        await forEachLimit(fetches, conc, async (f) => {
          if (jobError !== undefined) throw jobError;
          const mem = free.pop() ?? Buffer.allocUnsafeSlow(bufSize);
          let handed = false;
          try {
            const t = performance.now();
            const obj = await store.get(f.key, mem);
            timings.get += performance.now() - t;
            if (!obj) throw new BackupError('ECORRUPT', `${describeSeg(f.segs[0])} is missing`);
            while (writing >= conc) await new Promise<void>((r) => slotFree.push(r));
            if (jobError !== undefined) throw jobError;
            writing++;
            handed = true;
            const job: Promise<void> = writeObject(f, obj)
              .catch((err: unknown) => void (jobError ??= err))
              .finally(() => {
                free.push(mem);
                writing--;
                jobs.delete(job);
                slotFree.shift()?.();
              });
            jobs.add(job);
          } finally {
            if (!handed) free.push(mem);
          }
        });
      } finally {
        await Promise.all([...jobs]);
      }
      if (jobError !== undefined) throw jobError;
    } finally {
      progress.stop();
    }
    await nbd.flush();
  } catch (err) {
    await nbd?.close().catch(() => {});
    nbd = undefined;
    if (createdVolume && !opts.keepPartial) {
      // the server may still be releasing our NBD connection: EBUSY for a moment
      let gone = false;
      let why = '';
      for (let i = 0; i < 50 && !gone; i++) {
        try {
          await opts.server!.deleteVolume(createdVolume);
          gone = true;
        } catch (e) {
          why = (e as Error).message;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      (err as Error).message += gone ? ` (the partly restored volume ${createdVolume} was deleted)` : ` (the partly restored volume ${createdVolume} could not be deleted: ${why})`;
    }
    throw err;
  } finally {
    await nbd?.close().catch(() => {});
  }
  return {
    id,
    target: createdVolume ? `volume ${createdVolume}` : formatNbdUri(address),
    size: m.size,
    chain: chain.map((c) => c.id),
    writtenBytes: written,
    chunks: fetches.length,
    seconds: (Date.now() - t0) / 1000,
    retries: store.stats.retries - retries0,
    timings: Object.fromEntries(Object.entries(timings).map(([k, v]) => [k, +(v / 1000).toFixed(3)])),
  };
}

// ---------------------------------------------------------------------------
// Verify
// ---------------------------------------------------------------------------

export interface VerifyProblem {
  backup: string;
  /** volume offset where the chunk starts */
  offset: number;
  length: number;
  sha256: string;
  key: string;
  problem: 'missing' | 'corrupt' | 'size';
  detail: string;
}

export interface VerifyResult {
  id: string;
  ok: boolean;
  chain: string[];
  chunks: number;
  bytes: number;
  problems: VerifyProblem[];
  seconds: number;
}

/** Re-read every chunk the backup needs (its whole chain) and check its sha256. */
export async function verifyBackup(ctx: EngineContext, id: string): Promise<VerifyResult> {
  const t0 = Date.now();
  const { store } = ctx;
  const repo = new Repository(store);
  const chain = await repo.chain(id);
  const segs = resolveImage(chain);
  // each object once (a chunk object, or a pack with the chunks in it), each chunk in it
  // once, with every (backup, offset) that uses it
  type Use = { sha: string; codec: Segment['codec']; length: number; seg: Segment; at: Array<{ backup: string; offset: number }> };
  const objects = new Map<string, Map<string, Use>>();
  for (const s of segs) {
    const key = segKey(s);
    let inObj = objects.get(key);
    if (!inObj) objects.set(key, (inObj = new Map()));
    const ck = `${s.packAt ?? 0}:${chunkKey(s.sha, s.codec)}`;
    const at = { backup: s.backup, offset: s.offset - s.within };
    const u = inObj.get(ck);
    if (!u) inObj.set(ck, { sha: s.sha, codec: s.codec, length: s.chunkLength, seg: s, at: [at] });
    else if (!u.at.some((x) => x.backup === at.backup && x.offset === at.offset)) u.at.push(at);
  }
  const problems: VerifyProblem[] = [];
  let bytes = 0;
  let chunks = 0;
  const progress = createProgress(`verify ${id}`, ctx.progress);
  progress.setTotal([...objects.values()].reduce((n, o) => n + [...o.values()].reduce((k, u) => k + u.length, 0), 0));
  const free: Buffer[] = [];
  const bufSize = Math.max(...chain.map((c) => c.chunkSize)) + 64 * 1024;
  try {
    await forEachLimit(objects, ctx.concurrency ?? DEFAULT_CONCURRENCY, async ([key, uses]) => {
      const mem = free.pop() ?? Buffer.allocUnsafeSlow(bufSize);
      try {
        const stored = await store.get(key, mem);
        for (const u of uses.values()) {
          chunks++;
          let problem: VerifyProblem['problem'] | undefined;
          let detail = '';
          if (!stored) {
            problem = 'missing';
            detail = 'object not found';
          } else {
            try {
              await decode(storedBytesOf(stored, u.seg), u.codec, u.sha, u.length);
              bytes += u.length;
            } catch (err) {
              if (!(err instanceof ChunkError)) throw err;
              problem = err.reason;
              detail = u.seg.pack !== undefined ? `chunk ${u.sha} at ${u.seg.packAt} in the pack: ${err.message}` : err.message;
            }
          }
          if (problem) for (const a of u.at) problems.push({ backup: a.backup, offset: a.offset, length: u.length, sha256: u.sha, key, problem, detail });
          progress.add(u.length);
        }
      } finally {
        free.push(mem);
      }
    });
  } finally {
    progress.stop();
  }
  problems.sort((a, b) => a.offset - b.offset);
  return { id, ok: problems.length === 0, chain: chain.map((c) => c.id), chunks, bytes, problems, seconds: (Date.now() - t0) / 1000 };
}
