// A pool directory of thin volumes. Each volume lives in its own directory in the
// format of its snapshot technique; the catalog names them. The pool is also the
// ExportProvider the NBD server asks for exports: VOLUME (read-write) and
// VOLUME@SNAPSHOT (read-only), with "snapblock:changed:<snapshot>" meta contexts.
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type { BlockLayer } from '../block/layer.js';
import type { ExportProvider, MetaContextSource, OpenedExport } from '../nbd/exports.js';
import { createVolumeFiles, openVolume } from '../storage/factory.js';
import { syncFailureProblems } from '../storage/journaled-volume.js';
import { SnapshotError, type ChangedExtent, type SnapshotInfo, type SnapshotMode, type Volume } from '../storage/volume.js';
import { readCatalog, writeCatalog, type Backend, type Catalog, type VolumeRecord, type VolumeReplication, type VolumeType } from './catalog.js';
import { ATOMIC_TMP, fsyncDir } from './atomic-file.js';
import { PoolLock } from './lock.js';
import { MAX_VOLUME_SIZE, PoolError, validateName, validateVolumeSize as checkSize } from './names.js';

/** Pool subdirectories where services keep a file or two per volume, named VOLUME.EXT. */
const SIDECAR_DIRS = ['replication'];

export interface VolumeInfo {
  name: string;
  /** provisioned size in bytes */
  size: number;
  /** bytes of backing storage actually allocated (volume, snapshots, reserves, mirror) */
  allocated: number;
  created: string;
  mode: SnapshotMode;
  blockSize: number;
  cowReserve: number;
  type?: string;
  base?: { volume: string; snapshot: string };
  snapshots: number;
  /** open NBD connections to the volume and its snapshots */
  connections: number;
  /** Cinder's replication_status (docs/REPLICATION.md) */
  replication_status: ReplicationStatus;
  /** role, mode, backend, lag, resync progress (live when a server runs) */
  replication?: Record<string, unknown>;
}

export type ReplicationStatus = 'enabled' | 'disabled' | 'error' | 'failed-over' | 'failover-error' | 'not-capable';
/** Live replication status of a volume, supplied by the replication service of a running server. */
export type ReplicationStatusSource = (volume: string, rec: VolumeReplication | undefined) => { status: ReplicationStatus; details?: Record<string, unknown> };

export interface CheckReport {
  ok: boolean;
  problems: string[];
  repaired: string[];
}

export interface CreateOptions {
  mode?: SnapshotMode;
  blockSize?: number;
  cowReserve?: number;
  type?: string;
}

export const DEFAULT_TYPE: VolumeType = { mode: 'row', blockSize: 4 * 1024, cowReserve: 1024 * 1024 * 1024 };

/**
 * Block size when neither the command nor a type names one. row: 4 KiB, so a 4 KiB write to
 * a block shared with a snapshot is redirected whole (no read-merge of a bigger block); its
 * pointer table is paged, so memory follows the data, not the provisioned size. cow and
 * mirror: 64 KiB (per-block copy-out and write-intent tables). Volumes too large for u32
 * block numbers at 4 KiB get 64 KiB.
 */
export function defaultBlockSize(mode: SnapshotMode, size = 0): number {
  if (mode === 'row' && Math.ceil(size / 4096) <= 0xfffffffe) return 4 * 1024;
  return 64 * 1024;
}
/** A change to a volume that does not go through its export (replication marks and ships these). */
export type BypassChange = { op: 'rollback'; snapshot: string } | { op: 'resize'; from: number; to: number };
export interface BypassHook {
  before(pool: Pool, volume: string, change: BypassChange): Promise<void>;
  after(pool: Pool, volume: string, change: BypassChange, ok: boolean): Promise<void>;
}
const bypassHooks: BypassHook[] = [];
/** Register a hook run around every rollback and resize, in every process (src/replication). */
export function addBypassHook(h: BypassHook): void {
  bypassHooks.push(h);
}

export { MAX_VOLUME_SIZE };
export const SNAPSHOT_CONTEXT_PREFIX = 'snapblock:changed:';

/**
 * Wraps the live layer of a volume's read-write export (replication stacks here, the
 * way an nbdkit filter stacks over a plugin). Called for every new connection.
 */
export type ExportFilter = (volume: string, layer: BlockLayer) => BlockLayer | Promise<BlockLayer>;

export class Pool implements ExportProvider {
  private catalog: Catalog;
  private readonly opened = new Map<string, Promise<Volume>>();
  private readonly connections = new Map<string, number>();
  private readonly exportFilters: ExportFilter[] = [];
  private replicationSource?: ReplicationStatusSource;
  private readonly lock: PoolLock;

  private constructor(
    readonly dir: string,
    private readonly log: Logger,
    /** opened by `check` in its own process: see open() */
    private readonly forCheck = false,
  ) {
    fs.mkdirSync(path.join(dir, 'volumes'), { recursive: true, mode: 0o700 });
    this.lock = PoolLock.acquire(path.join(dir, 'LOCK'));
    try {
      this.catalog = readCatalog(this.catalogPath);
    } catch (err) {
      this.lock.release();
      throw err;
    }
  }

  /**
   * Open a pool and bring its files in line with the catalog after a crash. forCheck (the
   * `check` command with no server running): no repair on open, so that check() reports
   * what it finds (or with --repair removes it and names it), and check() closes the volumes
   * it opened without a checkpoint, so that a check writes nothing it was not asked to.
   */
  static async open(dir: string, opts: { log: Logger; forCheck?: boolean }): Promise<Pool> {
    const pool = new Pool(path.resolve(dir), opts.log, opts.forCheck ?? false);
    if (pool.forCheck) return pool;
    try {
      const report = await pool.checkFiles(true);
      for (const r of report.repaired) opts.log.warn({ repair: r }, 'pool repaired on open');
    } catch (err) {
      pool.lock.release();
      throw err;
    }
    return pool;
  }

  get controlSocketPath(): string {
    return path.join(this.dir, 'control.sock');
  }

  private get catalogPath(): string {
    return path.join(this.dir, 'catalog.json');
  }

  private record(name: string): VolumeRecord {
    const rec = this.catalog.volumes[name];
    if (!rec) throw new PoolError('ENOENT', `no volume named "${name}"`);
    return rec;
  }

  private save(next: Catalog): void {
    writeCatalog(this.catalogPath, next);
    this.catalog = next;
  }

  /** The open volume object (opened on first use, with its clone base first). */
  volume(name: string): Promise<Volume> {
    const rec = this.record(name);
    let v = this.opened.get(name);
    if (!v) {
      v = (async () => {
        let base: BlockLayer | undefined;
        if (rec.base) base = (await this.volume(rec.base.volume)).snapshotLayer(rec.base.snapshot);
        return openVolume(rec.mode, path.join(this.dir, rec.dir), { log: this.log.child({ volume: name }), base, params: { size: 0, blockSize: rec.blockSize, cowReserve: rec.cowReserve } });
      })();
      this.opened.set(name, v);
      v.catch(() => this.opened.delete(name));
    }
    return v;
  }

  /** Stack a filter over every read-write export opened from now on. */
  addExportFilter(f: ExportFilter): void {
    this.exportFilters.push(f);
  }

  // ---- replication settings (src/replication uses these; the catalog keeps them) ----

  setReplicationStatusSource(f: ReplicationStatusSource): void {
    this.replicationSource = f;
  }

  replicationOf(name: string): VolumeReplication | undefined {
    return this.record(name).replication;
  }

  /** Volumes that have replication settings, with them. */
  replicatedVolumes(): Array<{ name: string; replication: VolumeReplication }> {
    return Object.values(this.catalog.volumes).flatMap((v) => (v.replication ? [{ name: v.name, replication: v.replication }] : []));
  }

  setVolumeReplication(name: string, r: VolumeReplication | undefined): void {
    const rec = { ...this.record(name), replication: r };
    if (!r) delete rec.replication;
    this.save({ ...this.catalog, volumes: { ...this.catalog.volumes, [name]: rec } });
  }

  backends(): Record<string, Backend> {
    return { ...(this.catalog.backends ?? {}) };
  }

  setBackend(id: string, b: Backend | undefined): void {
    const next = { ...(this.catalog.backends ?? {}) };
    if (b) next[id] = b;
    else delete next[id];
    this.save({ ...this.catalog, backends: next });
  }

  // ---- volume types ----

  types(): Record<string, VolumeType> {
    return { default: DEFAULT_TYPE, ...this.catalog.types };
  }

  createType(name: string, t: Partial<VolumeType>): VolumeType {
    validateName('volume type', name);
    if (name === 'default' || this.catalog.types[name]) throw new PoolError('EEXIST', `volume type "${name}" already exists`);
    const type: VolumeType = { ...DEFAULT_TYPE, ...t };
    if (t.blockSize === undefined) type.blockSize = defaultBlockSize(type.mode);
    checkBlockSize(type.blockSize);
    this.save({ ...this.catalog, types: { ...this.catalog.types, [name]: type } });
    return type;
  }

  deleteType(name: string): void {
    if (!this.catalog.types[name]) throw new PoolError('ENOENT', `no volume type named "${name}"`);
    const users = Object.values(this.catalog.volumes).filter((v) => v.type === name);
    if (users.length) throw new PoolError('EBUSY', `volume type "${name}" is used by ${users.map((u) => u.name).join(', ')}`);
    const { [name]: _gone, ...rest } = this.catalog.types;
    this.save({ ...this.catalog, types: rest });
  }

  // ---- volumes ----

  /** Exports for NBD_OPT_LIST: every volume and every valid snapshot. */
  async list(): Promise<Array<{ name: string; description?: string }>> {
    const out: Array<{ name: string; description?: string }> = [];
    for (const v of Object.values(this.catalog.volumes)) {
      out.push({ name: v.name, description: `snapblock ${v.mode} volume ${v.name}` });
      const snaps = (await this.volume(v.name)).snapshots().filter((s) => s.status === 'valid');
      for (const s of snaps) out.push({ name: `${v.name}@${s.name}`, description: `snapshot ${s.name} of ${v.name} (read-only)` });
    }
    return out;
  }

  async volumes(): Promise<VolumeInfo[]> {
    return Promise.all(Object.keys(this.catalog.volumes).sort().map((n) => this.info(n)));
  }

  async info(name: string): Promise<VolumeInfo> {
    const rec = this.record(name);
    const v = await this.volume(name);
    return {
      name,
      size: v.size,
      allocated: v.allocatedBytes(),
      created: rec.created,
      mode: rec.mode,
      blockSize: rec.blockSize,
      cowReserve: rec.cowReserve,
      type: rec.type,
      base: rec.base,
      snapshots: v.snapshots().length,
      connections: this.connectionsTo(name),
      ...this.replicationInfo(name, rec.replication),
    };
  }

  private replicationInfo(name: string, r: VolumeReplication | undefined): Pick<VolumeInfo, 'replication_status' | 'replication'> {
    if (this.replicationSource) {
      const s = this.replicationSource(name, r);
      return { replication_status: s.status, replication: s.details };
    }
    if (!r) return { replication_status: 'disabled' };
    return { replication_status: r.state, replication: { ...r } };
  }

  private connectionsTo(volume: string): number {
    let n = 0;
    for (const [exp, c] of this.connections) if (exp === volume || exp.startsWith(`${volume}@`)) n += c;
    return n;
  }

  async create(name: string, size: number, opts: CreateOptions = {}): Promise<VolumeInfo> {
    validateName('volume', name);
    checkSize(size);
    if (this.catalog.volumes[name]) throw new PoolError('EEXIST', `volume "${name}" already exists`);
    let type = DEFAULT_TYPE;
    if (opts.type) {
      const t = this.types()[opts.type];
      if (!t) throw new PoolError('ENOENT', `no volume type named "${opts.type}" (see: snapblock type list)`);
      type = t;
    }
    const mode = opts.mode ?? type.mode;
    const blockSize = opts.blockSize ?? (opts.type ? type.blockSize : defaultBlockSize(mode, size));
    const cowReserve = opts.cowReserve ?? type.cowReserve;
    checkBlockSize(blockSize);
    const rec: VolumeRecord = { name, created: new Date().toISOString(), dir: path.join('volumes', name), mode, blockSize, cowReserve, type: opts.type };
    if (type.replication) rec.replication = { ...type.replication, role: 'primary', state: 'enabled', changed: rec.created };
    this.makeVolumeDir(rec, () => createVolumeFiles(mode, path.join(this.dir, `${rec.dir}.creating`), { size, blockSize, cowReserve }));
    this.log.info({ volume: name, size, mode, blockSize }, 'volume created');
    return this.openCreated(rec);
  }

  /**
   * Data before pointer: the directory is complete before the catalog names it. A create
   * that fails part way (ENOSPC, EIO) removes what it made: nothing is left for `check`.
   */
  private makeVolumeDir(rec: VolumeRecord, build: () => void): void {
    const final = path.join(this.dir, rec.dir);
    const tmp = `${final}.creating`;
    if (fs.existsSync(final)) throw new PoolError('EEXIST', `volumes/${path.basename(final)} exists but is not in the catalog; run \`snapblock check --repair\` to remove it`);
    fs.rmSync(tmp, { recursive: true, force: true });
    let renamed = false;
    try {
      build();
      fs.renameSync(tmp, final);
      renamed = true;
      fsyncDir(path.join(this.dir, 'volumes'));
      this.save({ ...this.catalog, volumes: { ...this.catalog.volumes, [rec.name]: rec } });
    } catch (err) {
      fs.rmSync(renamed ? final : tmp, { recursive: true, force: true });
      throw createFailed(rec.name, err);
    }
  }

  /**
   * The first open of a volume just made writes its journal's zeroes ahead (1 MiB): on a
   * nearly full filesystem that is where a create fails. Then the create is undone, so a
   * failed create leaves neither a catalog entry nor files.
   */
  private async openCreated(rec: VolumeRecord): Promise<VolumeInfo> {
    try {
      return await this.info(rec.name);
    } catch (err) {
      await this.closeUnchanged(rec.name);
      this.removeVolumeDir(rec);
      throw createFailed(rec.name, err);
    }
  }

  async resize(name: string, size: number, opts: { force?: boolean } = {}): Promise<VolumeInfo> {
    checkSize(size);
    const v = await this.volume(name);
    if (size < v.size && !opts.force) {
      throw new PoolError('EINVAL', `shrinking "${name}" from ${v.size} to ${size} bytes destroys data past the new end; pass --force to do it`);
    }
    if (size < v.size && this.connectionsTo(name)) throw new PoolError('EBUSY', `volume "${name}" has ${this.connectionsTo(name)} open connection(s); disconnect them before shrinking`);
    await this.bypass(name, { op: 'resize', from: v.size, to: size }, () => v.resize(size));
    this.log.info({ volume: name, size }, 'volume resized');
    return this.info(name);
  }

  /**
   * Delete a volume and everything it holds. Refused (EBUSY, nothing changed) while clients
   * are connected or clones read through its snapshots; with snapshots or an active
   * replication pair only with force (which deletes the snapshots too and leaves the
   * replication peer's copy alone).
   */
  async delete(name: string, opts: { force?: boolean } = {}): Promise<void> {
    const rec = this.record(name);
    const wasOpen = this.opened.has(name);
    try {
      this.refuseUnsafeDelete(rec, await this.snapshotNamesForDelete(name, opts.force ?? false), opts.force ?? false);
    } catch (err) {
      if (!wasOpen) await this.closeUnchanged(name);
      throw err;
    }
    const v = this.opened.get(name);
    this.opened.delete(name);
    // No checkpoint for a volume about to vanish (and none could be written on a full disk).
    if (v) await (await v).close({ discard: true }).catch((err) => this.log.warn({ volume: name, error: (err as Error).message }, 'closing a volume being deleted failed'));
    this.removeVolumeDir(rec);
    this.log.info({ volume: name }, 'volume deleted');
  }

  /**
   * Close a volume opened only to be looked at, without a checkpoint: nothing changed since
   * its open wrote the state, and a refused command must not write (nor fail on a full disk).
   */
  private async closeUnchanged(name: string): Promise<void> {
    const v = this.opened.get(name);
    this.opened.delete(name);
    await v?.then((x) => x.close({ discard: true })).catch(() => {});
  }

  /** The volume's snapshot names, or undefined when it cannot be opened and force says not to care. */
  private async snapshotNamesForDelete(name: string, force: boolean): Promise<string[] | undefined> {
    try {
      return (await this.volume(name)).snapshots().map((s) => s.name);
    } catch (err) {
      if (force) return undefined;
      throw new PoolError('EBUSY', `volume "${name}" cannot be opened to see whether it has snapshots (${(err as Error).message}); pass --force to delete it anyway`);
    }
  }

  /** Throw one EBUSY naming every reason the delete is unsafe and what to run first. */
  private refuseUnsafeDelete(rec: VolumeRecord, snapshots: string[] | undefined, force: boolean): void {
    const name = rec.name;
    const hard: string[] = [];
    const soft: string[] = [];
    const n = this.connectionsTo(name);
    if (n) hard.push(`it has ${n} open connection(s) (NBD clients): disconnect them first`);
    const clones = this.clonesOf(name);
    if (clones.length) hard.push(`it has clones (${clones.join(', ')}) that read through its snapshots: delete them first (snapblock volume delete ${clones[0]})`);
    const forceDoes: string[] = [];
    if (!force && snapshots?.length) {
      soft.push(`it has ${snapshots.length} snapshot(s) (${snapshots.join(', ')}): delete them first (snapblock snapshot delete ${name} ${snapshots[0]})`);
      forceDoes.push('with its snapshots');
    }
    const r = rec.replication;
    if (!force && r && r.state !== 'disabled') {
      soft.push(`it is the ${r.role} of an active replication pair (${r.mode}${r.backendId ? `, backend ${r.backendId}` : ''}): run \`snapblock replication disable ${name}\` first`);
      forceDoes.push('leaving the peer\'s copy as it is');
    }
    if (!hard.length && !soft.length) return;
    const tail = hard.length ? '' : `; or pass --force to delete it ${forceDoes.join(', ')}`;
    throw new PoolError('EBUSY', `refusing to delete volume "${name}": ${[...hard, ...soft].join('; ')}${tail}`);
  }

  private clonesOf(volume: string, snapshot?: string): string[] {
    return Object.values(this.catalog.volumes)
      .filter((c) => c.base?.volume === volume && (snapshot === undefined || c.base.snapshot === snapshot))
      .map((c) => c.name);
  }

  /**
   * Free space first, write the catalog after: on a full filesystem the catalog's temp file
   * needs the space the volume held. The directory is first renamed to NAME.deleting (a
   * rename needs no space), which marks the delete as decided; its files are removed, then
   * the catalog forgets the volume, then the empty marker goes. A crash in between leaves a
   * catalog entry whose directory is NAME.deleting, and opening the pool finishes the delete.
   */
  private removeVolumeDir(rec: VolumeRecord): void {
    const volumes = path.join(this.dir, 'volumes');
    const dir = path.join(this.dir, rec.dir);
    const marker = deletingMarker(dir);
    if (fs.existsSync(dir)) {
      fs.rmSync(marker, { recursive: true, force: true });
      fs.renameSync(dir, marker);
      fsyncDir(volumes);
    }
    if (fs.existsSync(marker)) for (const f of fs.readdirSync(marker)) fs.rmSync(path.join(marker, f), { recursive: true, force: true });
    const { [rec.name]: _gone, ...rest } = this.catalog.volumes;
    this.save({ ...this.catalog, volumes: rest });
    fs.rmSync(marker, { recursive: true, force: true });
    this.removeSidecarFiles(rec.name);
  }

  /**
   * Files services keep per volume beside the pool's volumes (replication/NAME.rlog and
   * NAME.state): a volume created later under the same name must not inherit them (a stale
   * region log could mark its initial sync as done).
   */
  private removeSidecarFiles(name: string): void {
    for (const sub of SIDECAR_DIRS) {
      const dir = path.join(this.dir, sub);
      if (!fs.existsSync(dir)) continue;
      for (const f of fs.readdirSync(dir)) if (path.parse(f).name === name) fs.rmSync(path.join(dir, f), { force: true });
    }
  }

  // ---- snapshots and clones ----

  async snapshots(volume: string): Promise<SnapshotInfo[]> {
    return (await this.volume(volume)).snapshots();
  }

  async createSnapshot(volume: string, name: string): Promise<SnapshotInfo> {
    validateName('snapshot', name);
    const t0 = process.hrtime.bigint();
    const s = await (await this.volume(volume)).createSnapshot(name);
    this.log.info({ volume, snapshot: name, ms: Number(process.hrtime.bigint() - t0) / 1e6 }, 'snapshot taken');
    return s;
  }

  async deleteSnapshot(volume: string, name: string): Promise<void> {
    const v = await this.volume(volume);
    v.findSnapshot(name);
    // Not overridable: a clone reads every block it never wrote through this snapshot, so
    // deleting it would silently change the clone's data (there is no flatten yet).
    const clones = this.clonesOf(volume, name);
    if (clones.length) throw new PoolError('EBUSY', `refusing to delete snapshot "${volume}@${name}": it has clones (${clones.join(', ')}) that read through it; delete them first (snapblock volume delete ${clones[0]})`);
    const n = this.connections.get(`${volume}@${name}`);
    if (n) throw new PoolError('EBUSY', `refusing to delete snapshot "${volume}@${name}": it is exported to ${n} connected client(s); disconnect them first`);
    await v.deleteSnapshot(name);
  }

  async rollback(volume: string, name: string, opts: { force?: boolean } = {}): Promise<void> {
    const v = await this.volume(volume);
    const n = this.connections.get(volume) ?? 0;
    if (n && !opts.force) throw new PoolError('EBUSY', `volume "${volume}" has ${n} connected client(s) that would see their data change underneath; disconnect them or pass --force`);
    await this.bypass(volume, { op: 'rollback', snapshot: name }, () => v.rollback(name));
    this.log.info({ volume, snapshot: name }, 'volume rolled back');
  }

  private async bypass(volume: string, change: BypassChange, fn: () => Promise<void>): Promise<void> {
    for (const h of bypassHooks) await h.before(this, volume, change);
    let ok = false;
    try {
      await fn();
      ok = true;
    } finally {
      for (const h of bypassHooks) await h.after(this, volume, change, ok);
    }
  }

  async clone(volume: string, snapshot: string, name: string): Promise<VolumeInfo> {
    validateName('volume', name);
    if (this.catalog.volumes[name]) throw new PoolError('EEXIST', `volume "${name}" already exists`);
    const parent = await this.volume(volume);
    const snap = parent.findSnapshot(snapshot);
    if (snap.status !== 'valid') throw new PoolError('EINVAL', `snapshot "${volume}@${snapshot}" is ${snap.status}`);
    const src = this.record(volume);
    const blockSize = src.blockSize;
    const rec: VolumeRecord = { name, created: new Date().toISOString(), dir: path.join('volumes', name), mode: 'row', blockSize, cowReserve: src.cowReserve, base: { volume, snapshot } };
    this.makeVolumeDir(rec, () => createVolumeFiles('row', path.join(this.dir, `${rec.dir}.creating`), { size: snap.size, blockSize, cowReserve: src.cowReserve }));
    this.log.info({ volume: name, from: `${volume}@${snapshot}` }, 'clone created');
    return this.openCreated(rec);
  }

  async diff(volume: string, from: string, to?: string): Promise<ChangedExtent[]> {
    return (await this.volume(volume)).changedExtents(from, to);
  }

  // ---- NBD exports ----

  async open(exportName: string): Promise<OpenedExport | undefined> {
    const at = exportName.indexOf('@');
    const volName = at < 0 ? exportName : exportName.slice(0, at);
    const snapName = at < 0 ? undefined : exportName.slice(at + 1);
    if (!this.catalog.volumes[volName]) return undefined;
    const v = await this.volume(volName);
    const snaps = v.snapshots();
    let layer: BlockLayer = v;
    if (snapName === undefined) for (const f of this.exportFilters) layer = await f(volName, layer);
    let contexts: SnapshotInfo[] = snaps;
    if (snapName !== undefined) {
      const i = snaps.findIndex((s) => s.name === snapName);
      if (i < 0 || snaps[i].status !== 'valid') return undefined;
      layer = v.snapshotLayer(snapName);
      contexts = snaps.slice(0, i);
    }
    const metaContexts: MetaContextSource[] = contexts
      .filter((s) => s.status === 'valid')
      .map((s) => {
        // Between two snapshots the answer never changes: computed once per connection,
        // not once per BLOCK_STATUS request (a request covers at most 4 GiB, and each
        // computation walks the whole block table: ~0.15-0.3 s for an 8 GiB volume here).
        // The live volume changes under the client: each request asks about its own range only.
        let memo: Promise<ChangedExtent[]> | undefined;
        const descriptors =
          snapName === undefined
            ? async (offset: number, length: number) => v.changedInRange(s.name, offset, length).map((d) => ({ length: d.length, flags: d.changed ? 1 : 0 }))
            : async (offset: number, length: number) => changedDescriptors(await (memo ??= v.changedExtents(s.name, snapName)), offset, length);
        return { name: `${SNAPSHOT_CONTEXT_PREFIX}${s.name}`, descriptors };
      });
    this.connections.set(exportName, (this.connections.get(exportName) ?? 0) + 1);
    let released = false;
    return {
      name: exportName,
      description: snapName ? `snapshot ${snapName} of ${volName} (read-only)` : `snapblock ${v.mode} volume ${volName}`,
      layer,
      metaContexts,
      release: async () => {
        if (released) return;
        released = true;
        const n = (this.connections.get(exportName) ?? 1) - 1;
        if (n) this.connections.set(exportName, n);
        else this.connections.delete(exportName);
        if (!snapName) await v.flush();
      },
    };
  }

  // ---- invariants ----

  /** Verify the pool's invariants (docs/FORMAT.md); with repair, fix what recovery may fix. */
  async check(opts: { repair?: boolean } = {}): Promise<CheckReport> {
    const report = await this.checkFiles(opts.repair ?? false);
    for (const name of Object.keys(this.catalog.volumes).sort()) {
      if (report.problems.some((p) => p.startsWith(`volume "${name}"`))) continue;
      try {
        const v = await this.volume(name);
        for (const p of await v.check()) report.problems.push(`volume "${name}": ${p}`);
        if (opts.repair && v.clearSyncFailure()) report.repaired.push(`volume "${name}": cleared the note of a failed sync (its data was to be verified first)`);
        else for (const p of v.syncFailures()) report.problems.push(`volume "${name}": ${p}`);
      } catch (err) {
        report.problems.push(`volume "${name}": cannot be opened: ${(err as Error).message}`);
        for (const p of syncFailureProblems(path.join(this.dir, this.catalog.volumes[name].dir))) report.problems.push(`volume "${name}": ${p}`);
      }
    }
    // Only in check's own process: no client can have opened these volumes meanwhile.
    // Clones first: they read through their parents' snapshots.
    if (this.forCheck) for (const name of this.clonesFirst()) await this.closeUnchanged(name);
    report.ok = report.problems.length === 0;
    return report;
  }

  /**
   * The pool's files against its catalog. What a crash or a failed command can leave (see
   * docs/FORMAT.md, pool recovery) is reported, or with repair removed and named: a delete
   * interrupted after its rename (finished), volume directories the catalog does not name
   * (NAME.creating from a create, anything else), and temp files of atomic replacements.
   * Writes nothing without repair; with repair it only removes, and writes the catalog
   * after the space is free.
   */
  private async checkFiles(repair: boolean): Promise<CheckReport> {
    const problems: string[] = [];
    const repaired: string[] = [];
    const volDir = path.join(this.dir, 'volumes');
    const known = new Set<string>();
    const interrupted: VolumeRecord[] = [];
    for (const [key, rec] of Object.entries(this.catalog.volumes)) {
      if (key !== rec.name) problems.push(`catalog key "${key}" holds volume named "${rec.name}"`);
      known.add(path.basename(rec.dir));
      const dir = path.join(this.dir, rec.dir);
      if (path.dirname(path.resolve(this.dir, rec.dir)) !== volDir) problems.push(`volume "${rec.name}": directory ${rec.dir} is outside the pool`);
      else if (!fs.existsSync(dir) && fs.existsSync(deletingMarker(dir))) {
        known.add(path.basename(deletingMarker(dir)));
        interrupted.push(rec);
      } else if (!fs.existsSync(dir)) problems.push(`volume "${rec.name}": directory ${rec.dir} is missing`);
      if (rec.base && !this.catalog.volumes[rec.base.volume]) problems.push(`volume "${rec.name}": clone parent "${rec.base.volume}" is missing`);
    }
    for (const rec of interrupted) {
      if (!repair) problems.push(`volume "${rec.name}": its delete was interrupted (${rec.dir}.deleting); run \`snapblock check --repair\` to finish it`);
      else {
        this.removeVolumeDir(rec);
        repaired.push(`finished the interrupted delete of volume "${rec.name}"`);
      }
    }
    const leftovers = [
      ...fs.readdirSync(volDir).filter((f) => !known.has(f)).map((f) => ({ file: `volumes/${f}`, why: f.endsWith('.creating') ? 'left by a failed or interrupted create' : f.endsWith('.deleting') ? 'left by an interrupted delete' : 'not in the catalog' })),
      ...this.atomicTempFiles().map((file) => ({ file, why: 'temp file of an interrupted metadata write' })),
    ];
    for (const { file, why } of leftovers) {
      if (repair) {
        fs.rmSync(path.join(this.dir, file), { recursive: true, force: true });
        repaired.push(`removed ${file} (${why})`);
      } else problems.push(`leftover ${file} (${why}); \`snapblock check --repair\` removes it`);
    }
    return { ok: problems.length === 0, problems, repaired };
  }

  /**
   * FILE.tmp-PID files in the pool and in volume directories. writeFileAtomic makes and
   * renames (or removes) them inside one synchronous call, so any seen here is debris.
   */
  private atomicTempFiles(): string[] {
    const dirs = ['.', ...Object.values(this.catalog.volumes).map((r) => r.dir)];
    return dirs.flatMap((d) => {
      try {
        return fs.readdirSync(path.join(this.dir, d)).filter((f) => ATOMIC_TMP.test(f)).map((f) => path.join(d, f));
      } catch {
        return []; // a missing volume directory is reported above
      }
    });
  }

  /** The open volumes, clones before the rest: clones read through their parents' snapshots. */
  private clonesFirst(): string[] {
    return [...this.opened.keys()].sort((a, b) => Number(!!this.catalog.volumes[b]?.base) - Number(!!this.catalog.volumes[a]?.base));
  }

  async close(): Promise<void> {
    for (const name of this.clonesFirst()) {
      try {
        await (await this.opened.get(name)!).close();
      } catch (err) {
        // One line, no stack: on a full filesystem this is expected, and harmless (the close
        // still released the files; the journal holds the state and the next open replays it).
        this.log.error({ volume: name, error: (err as Error).message }, 'closing volume failed: its checkpoint was not written; the next open recovers from its journal');
      }
    }
    this.opened.clear();
    this.lock.release();
  }
}

/** NBD descriptors for [offset, offset+length): flag 1 where changed. */
function changedDescriptors(changed: ChangedExtent[], offset: number, length: number): Array<{ length: number; flags: number }> {
  const out: Array<{ length: number; flags: number }> = [];
  const end = offset + length;
  let at = offset;
  const push = (len: number, flags: number) => {
    if (len <= 0) return;
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += len;
    else out.push({ length: len, flags });
  };
  for (const c of changed) {
    const cEnd = c.offset + c.length;
    if (cEnd <= at) continue;
    if (c.offset >= end) break;
    push(Math.max(0, c.offset - at), 0);
    const s = Math.max(at, c.offset);
    const e = Math.min(end, cEnd);
    push(e - s, 1);
    at = e;
  }
  push(end - at, 0);
  return out;
}

/** A create that failed and was undone: ENOSPC as a one-line PoolError that says what to do. */
function createFailed(name: string, err: unknown): Error {
  if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') return err as Error;
  return new PoolError('ENOSPC', `cannot create volume "${name}": no space left on the pool's filesystem (nothing was kept; free space by deleting a volume or snapshot)`);
}

/** What a volume directory is renamed to while it is being deleted. */
const deletingMarker = (dir: string) => `${dir}.deleting`;

function checkBlockSize(bs: number): void {
  if (!Number.isInteger(bs) || bs < 4096 || bs > 4 * 1024 * 1024 || (bs & (bs - 1)) !== 0) {
    throw new PoolError('EINVAL', `block size ${bs} must be a power of two between 4 KiB and 4 MiB`);
  }
}

export { SnapshotError };
