// The replication service of one server (one pool). Primary side: a ReplicationSession
// per replicated volume, stacked over the volume's read-write export as a pool export
// filter. Secondary side: it answers the reserved "replica:V?..." exports (peer.ts) and
// keeps ordinary clients from writing a secondary. Failover and failback are here too.
import path from 'node:path';
import type { Logger } from 'pino';
import { BlockError, type BlockLayer, type Capabilities, type Extent, type InPlaceWrite, type MappedRange, type WriteFlags, type ZeroFlags } from '../block/layer.js';
import type { ExportProvider, OpenedExport } from '../nbd/exports.js';
import { addBypassHook, type BypassChange, type Pool, type ReplicationStatus } from '../pool/pool.js';
import type { VolumeReplication } from '../pool/catalog.js';
import { PoolError } from '../pool/names.js';
import type { Volume } from '../storage/volume.js';
import type { NbdClient } from '../nbd/client.js';
import { ReplicationSession } from './session.js';
import { connectPeer, parseReplicaExportName, peerState, type PeerRequest, type PeerState } from './peer.js';
import { RegionLog } from './region-log.js';
import { describeSync, diskDetails, markWrittenApart, newGeneration, ownGeneration, readReplicaState, rejoined, updateReplicaState, writeReplicaState, type ReplicaState } from './disk-state.js';

const services = new WeakMap<Pool, ReplicationService>();

/** The running server's replication service for a pool (undefined when the CLI works in-process). */
export function serviceOf(pool: Pool): ReplicationService | undefined {
  return services.get(pool);
}

export const REGION_SIZE = 1024 * 1024;

export function regionLogPath(pool: Pool, volume: string): string {
  return path.join(pool.dir, 'replication', `${volume}.rlog`);
}

export function regionSizeFor(blockSize: number): number {
  return Math.max(REGION_SIZE, blockSize);
}

export interface ServiceOptions {
  timeoutMs?: number;
  maxLagBytes?: number;
}

export class ReplicationService {
  readonly exports: ExportProvider;
  private readonly sessions = new Map<string, ReplicationSession>();
  /** writes in flight through the filter, per volume (a demotion waits for them) */
  private readonly writing = new Map<string, Set<Promise<unknown>>>();
  private readonly peerLinks = new Map<string, number>();
  /** the primary's replication connections (op=push) per secondary volume */
  private readonly pushLinks = new Map<string, number>();
  /** promoted copies already recorded as written since they parted (the write path checks this first) */
  private readonly writtenApart = new Set<string>();
  private scan?: NodeJS.Timeout;
  /** volumes whose session is stopped for a resize: writes through the export wait for this */
  private readonly paused = new Map<string, { done: Promise<void>; release: () => void }>();
  private stopped = false;
  private readonly timeoutMs: number;
  private readonly maxLagBytes: number;

  constructor(
    readonly pool: Pool,
    private readonly log: Logger,
    opts: ServiceOptions = {},
  ) {
    this.timeoutMs = opts.timeoutMs ?? Number(process.env.SNAPBLOCK_REPL_TIMEOUT_MS ?? 5000);
    this.maxLagBytes = opts.maxLagBytes ?? Number(process.env.SNAPBLOCK_REPL_MAX_LAG ?? 64 * 1024 * 1024);
    services.set(pool, this);
    pool.addExportFilter((volume, layer) => new ReplicatedExport(this, volume, layer));
    pool.setReplicationStatusSource((volume, rec) => this.statusOf(volume, rec));
    this.exports = {
      list: () => pool.list(),
      open: (name) => (parseReplicaExportName(name) ? this.openPeer(name) : pool.open(name)),
    };
  }

  /** Start a session for every volume that is a replicating primary here. */
  async start(): Promise<void> {
    this.outdateLaggingSecondaries();
    await this.reconcile();
    this.scan = setInterval(() => void this.reconcile().catch((err) => this.log.error({ err }, 'replication scan failed')), 2000);
    this.scan.unref();
  }

  /**
   * A secondary that was fed by a lagging primary (async, or sync that degrades) when this
   * server went down may miss writes the primary acknowledged meanwhile: Outdated until the
   * primary reconnects and says otherwise.
   */
  private outdateLaggingSecondaries(): void {
    for (const { name, replication: r } of this.pool.replicatedVolumes()) {
      if (r.role !== 'secondary' || r.state !== 'enabled') continue;
      const st = readReplicaState(this.pool, name);
      if (st.disk === 'UpToDate' && st.lagging) {
        writeReplicaState(this.pool, name, { ...st, disk: 'Outdated', why: 'this server stopped while a primary that acknowledges writes before this copy has them (async) was feeding it' });
        this.log.warn({ volume: name }, 'replication secondary is Outdated: it may have missed writes while this server was down');
      }
    }
  }

  async reconcile(): Promise<void> {
    if (this.stopped) return;
    for (const { name, replication: r } of this.pool.replicatedVolumes()) {
      if (r.role !== 'primary' || r.state !== 'enabled' || !r.backendId || this.paused.has(name)) continue;
      const s = this.sessions.get(name);
      if (!s) await this.startSession(name).catch((err) => this.log.error({ err, volume: name }, 'cannot start replication'));
      else if (s.offline) {
        const backend = this.pool.backends()[r.backendId];
        if (backend) {
          this.log.info({ volume: name, backend: r.backendId, uri: backend.uri }, 'replication backend configured: connecting');
          s.attachBackend(backend.uri);
        }
      }
    }
    for (const [name, s] of this.sessions) {
      let r: VolumeReplication | undefined;
      try {
        r = this.pool.replicationOf(name);
      } catch {
        r = undefined; // volume deleted
      }
      if (!r || r.role !== 'primary' || r.state !== 'enabled') {
        this.sessions.delete(name);
        await s.stop();
      }
    }
  }

  session(volume: string): ReplicationSession | undefined {
    return this.sessions.get(volume);
  }

  async startSession(volume: string, opts: { resuming?: boolean } = {}): Promise<ReplicationSession | undefined> {
    const existing = this.sessions.get(volume);
    if (existing) return existing;
    if (this.paused.has(volume) && !opts.resuming) return undefined;
    const r = this.pool.replicationOf(volume);
    if (!r || r.role !== 'primary' || r.state !== 'enabled' || !r.backendId) return undefined;
    const local = await this.pool.volume(volume);
    if (this.sessions.has(volume)) return this.sessions.get(volume);
    // Without a backend the session still runs, offline: every write is logged as dirty
    // (resynced once the backend is configured, see reconcile).
    const backend = this.pool.backends()[r.backendId];
    if (!backend) this.log.error({ volume, backend: r.backendId }, 'replication backend is not configured (snapblock backend add); writes are tracked as dirty regions');
    const s = new ReplicationSession({
      volume,
      local,
      settings: r,
      backendUri: backend?.uri,
      logFile: regionLogPath(this.pool, volume),
      log: this.log.child({ replication: volume }),
      regionSize: regionSizeFor(local.blockSize),
      timeoutMs: this.timeoutMs,
      maxLagBytes: this.maxLagBytes,
      onFailedOver: (reason) => this.markFailedOver(volume, reason),
      ownGeneration: () => ownGeneration(this.pool, volume),
      writtenApart: () => markWrittenApart(this.pool, volume),
      rejoined: (gen) => rejoined(this.pool, volume, gen),
    });
    this.sessions.set(volume, s);
    s.start();
    this.log.info({ volume, mode: r.mode, backend: r.backendId, uri: backend?.uri }, 'replication session started');
    return s;
  }

  /**
   * The session every write to a volume goes through, started on demand: a replicating
   * primary's writes are never issued without one (they would be neither shipped nor
   * logged, and a later resync would miss them). undefined: not a replicating primary
   * here (plain, fenced or disabled volume). Throws when the session cannot start: the
   * write is refused rather than left unrecorded.
   */
  async sessionFor(volume: string): Promise<ReplicationSession | undefined> {
    for (;;) {
      const s = this.sessions.get(volume);
      if (s) return s;
      const pause = this.paused.get(volume);
      if (pause) {
        await pause.done;
        continue;
      }
      if (!isReplicatingPrimary(this.pool, volume)) return undefined;
      if (this.stopped) throw new BlockError('ESHUTDOWN', 'replication is stopping');
      let started: ReplicationSession | undefined;
      try {
        started = await this.startSession(volume);
      } catch (err) {
        this.log.error({ err, volume }, 'cannot start replication; refusing the write (it could not be logged)');
        throw new BlockError('EIO', `replication of "${volume}" cannot start (${(err as Error).message}); the write was not issued`);
      }
      if (started) return started;
      if (!this.paused.has(volume) && isReplicatingPrimary(this.pool, volume)) throw new BlockError('EIO', `replication of "${volume}" has no session; the write was not issued`);
    }
  }

  private markFailedOver(volume: string, reason: string): void {
    const r = this.pool.replicationOf(volume);
    if (!r) return;
    this.pool.setVolumeReplication(volume, { ...r, role: 'secondary', state: 'failed-over', activeBackendId: r.backendId, changed: new Date().toISOString() });
    this.log.warn({ volume, reason }, 'volume marked failed-over');
    const s = this.sessions.get(volume);
    this.sessions.delete(volume);
    void s?.stop();
  }

  // ---------------------------------------------------------------- status

  statusOf(volume: string, r: VolumeReplication | undefined): { status: ReplicationStatus; details?: Record<string, unknown> } {
    if (!r) return { status: 'disabled' };
    const details: Record<string, unknown> = { ...r, ...diskDetails(readReplicaState(this.pool, volume)) };
    const s = this.sessions.get(volume);
    if (s) Object.assign(details, s.status());
    if (r.role === 'secondary' && r.state === 'enabled') details.peerConnections = this.peerLinks.get(volume) ?? 0;
    if (r.state !== 'enabled') return { status: r.state, details };
    if (r.role === 'primary' && r.backendId && !this.pool.backends()[r.backendId]) return { status: 'error', details: { ...details, lastError: `backend "${r.backendId}" is not configured` } };
    if (s?.link === 'not-capable') return { status: 'not-capable', details };
    if (s && (s.link === 'disconnected' || s.link === 'error')) return { status: 'error', details };
    if (s?.link === 'failed-over') return { status: 'failed-over', details };
    return { status: 'enabled', details };
  }

  // ---------------------------------------------------------------- filter hooks

  /** Track a write through the filter so that a demotion can wait for it. */
  track<T>(volume: string, p: Promise<T>): Promise<T> {
    let set = this.writing.get(volume);
    if (!set) this.writing.set(volume, (set = new Set()));
    set.add(p);
    const done = () => set.delete(p);
    p.then(done, done);
    return p;
  }

  private async drainWrites(volume: string): Promise<void> {
    const set = this.writing.get(volume);
    while (set?.size) await Promise.allSettled([...set]);
  }

  /**
   * Before a write of an ordinary client is issued: a promoted copy written for the first
   * time since the failover has parted from the old primary (durably recorded first: a
   * failback then knows it must not overwrite this write silently).
   */
  noteWrite(volume: string): void {
    if (this.writtenApart.has(volume)) return;
    let r: VolumeReplication | undefined;
    try {
      r = this.pool.replicationOf(volume);
    } catch {
      return;
    }
    if (r?.role !== 'primary' || r.state !== 'failed-over') return;
    markWrittenApart(this.pool, volume);
    this.writtenApart.add(volume);
  }

  /** Why ordinary clients may not write the volume now, or undefined. */
  fenceReason(volume: string): string | undefined {
    let r: VolumeReplication | undefined;
    try {
      r = this.pool.replicationOf(volume);
    } catch {
      return undefined;
    }
    if (!r) return undefined;
    if (r.state === 'failed-over' && r.role === 'secondary') return `volume "${volume}" has been failed over to backend "${r.activeBackendId}"; run failback to make it writable here again`;
    if (r.role === 'secondary') return `volume "${volume}" is a replication secondary; promote it with "snapblock failover ${volume}" to write it`;
    if (r.state === 'failover-error') return `volume "${volume}" was fenced by a failover that could not promote its secondary; run failover against the secondary's pool`;
    return undefined;
  }

  // ---------------------------------------------------------------- secondary side

  private async openPeer(name: string): Promise<OpenedExport | undefined> {
    const req = parseReplicaExportName(name)!;
    let r: VolumeReplication | undefined;
    let exists = true;
    try {
      r = this.pool.replicationOf(req.volume);
    } catch {
      exists = false;
    }
    const now = new Date().toISOString();
    if (!exists) {
      if (req.op !== 'push' || !req.size) return undefined;
      await this.pool.create(req.volume, req.size, { mode: req.mode, blockSize: req.blockSize });
      r = { mode: req.replMode ?? 'async', role: 'secondary', state: 'enabled', peer: req.from, changed: now };
      // Inconsistent before the primary can write a byte into it (the copy starts empty).
      writeReplicaState(this.pool, req.volume, { disk: 'Inconsistent', why: 'created as a replication secondary; the initial sync has not completed', sync: { phase: 'initial', done: 0, total: req.size } });
      this.pool.setVolumeReplication(req.volume, r);
      this.log.info({ volume: req.volume, size: req.size, mode: req.mode }, 'created replication secondary');
    }
    if (!r) {
      this.log.warn({ volume: req.volume }, 'refusing replication into a volume that is not a replication secondary');
      return undefined;
    }
    if (req.op === 'state') return this.openState(name, req, r);
    let readOnly = false;
    if (req.op === 'push') {
      if (r.role === 'primary') readOnly = true; // promoted here: tells the old primary it was failed over
      else {
        if (req.replMode && req.replMode !== r.mode) this.pool.setVolumeReplication(req.volume, (r = { ...r, mode: req.replMode }));
        // The primary was resized: a secondary follows (the primary resyncs what it must).
        const cur = await this.pool.volume(req.volume);
        if (req.size && cur.size !== req.size) {
          await this.pool.resize(req.volume, req.size, { force: true });
          this.log.info({ volume: req.volume, from: cur.size, to: req.size }, 'replication secondary resized to follow its primary');
        }
      }
    } else if (req.op === 'promote') {
      // Planned failover: the primary caught up and flushed this copy before asking.
      if (r.role === 'secondary') await this.promoteLocal(req.volume, undefined, { force: true });
      readOnly = true;
    } else if (req.op === 'failback' && !(r.role === 'secondary' && r.state === 'enabled')) {
      // (open runs more than once per connection: meta context negotiation, then GO)
      if (r.role !== 'primary') return undefined;
      // Demote: ordinary clients lose write access, their writes in flight finish first.
      this.pool.setVolumeReplication(req.volume, { ...r, role: 'secondary', state: 'enabled', activeBackendId: undefined, changed: now });
      await this.drainWrites(req.volume);
      const v = await this.pool.volume(req.volume);
      await v.flush();
      this.log.warn({ volume: req.volume }, 'failback: volume demoted to replication secondary');
    }
    const v = await this.pool.volume(req.volume);
    this.peerLinks.set(req.volume, (this.peerLinks.get(req.volume) ?? 0) + 1);
    const push = req.op === 'push' && !readOnly;
    if (push) this.pushLinks.set(req.volume, (this.pushLinks.get(req.volume) ?? 0) + 1);
    let released = false;
    return {
      name,
      description: `replication secondary of ${req.volume}`,
      layer: new PeerLayer(this, req.volume, v, readOnly),
      release: async () => {
        if (released) return;
        released = true;
        this.peerLinks.set(req.volume, (this.peerLinks.get(req.volume) ?? 1) - 1);
        // (the meta-context negotiation's open is released too: harmless, since a copy is
        // UpToDate and lagging only while a push link is open)
        if (push) this.pushEnded(req.volume);
        await v.flush();
      },
    };
  }

  /**
   * The primary's link to a secondary here ended. A lagging primary (async, sync that
   * degrades) that did not stop cleanly may go on acknowledging writes this copy will not
   * get (or had some queued): the copy is Outdated until the primary says otherwise.
   */
  private pushEnded(volume: string): void {
    const left = (this.pushLinks.get(volume) ?? 1) - 1;
    this.pushLinks.set(volume, left);
    if (left > 0 || this.stopped) return; // (stopping: start() outdates it on the next run)
    let r: VolumeReplication | undefined;
    try {
      r = this.pool.replicationOf(volume);
    } catch {
      return;
    }
    const st = readReplicaState(this.pool, volume);
    if (r?.role !== 'secondary' || st.disk !== 'UpToDate' || !st.lagging) return;
    writeReplicaState(this.pool, volume, { ...st, disk: 'Outdated', why: `the link from its ${r.mode === 'async' ? 'async' : 'degrading sync'} primary ended without a clean stop: writes the primary acknowledged may be missing here` });
    this.log.warn({ volume }, 'replication link ended uncleanly: secondary is Outdated');
  }

  /**
   * op=state: record what the primary says about this copy (only a secondary takes it: a
   * promoted copy is nobody's target), then serve its state as a small read-only export.
   */
  private openState(name: string, req: PeerRequest, r: VolumeReplication): OpenedExport {
    if (r.role === 'secondary' && r.state === 'enabled') this.applyPeerState(req);
    const st = readReplicaState(this.pool, req.volume);
    const reply: PeerState = { role: r.role, state: r.state, disk: st.disk, why: st.why, gen: st.gen, parted: st.parted, forcedFrom: st.forcedFrom };
    return { name, description: `replication state of ${req.volume}`, layer: new StateLayer(Buffer.from(JSON.stringify(reply))), release: async () => {} };
  }

  private applyPeerState(req: PeerRequest): void {
    const st = readReplicaState(this.pool, req.volume);
    if (req.disk === 'Inconsistent') {
      const phase = req.phase ?? 'resync';
      updateReplicaState(this.pool, req.volume, { disk: 'Inconsistent', why: `a ${phase} sync from the primary started and has not completed`, sync: { phase, done: req.done ?? 0, total: req.total ?? 0 } });
    } else if (req.disk === 'UpToDate') {
      // Equal to the primary's copy now: its generation, no parting, no sync running. From a
      // lagging primary that holds only while its link is up: one that ended meanwhile (the
      // report raced the link's end) may already have cost writes.
      const linkGone = req.lagging && !((this.pushLinks.get(req.volume) ?? 0) > 0);
      const disk = linkGone ? 'Outdated' : 'UpToDate';
      const why = linkGone ? 'the link from its async primary ended as it reported this copy up to date' : undefined;
      writeReplicaState(this.pool, req.volume, { disk, why, gen: req.gen ?? st.gen, lagging: req.lagging ?? st.lagging });
      this.writtenApart.delete(req.volume);
    } else if (req.detach === 'clean' && st.lagging) writeReplicaState(this.pool, req.volume, { ...st, lagging: false });
  }

  /** Make a secondary here the writable primary (failover run on the secondary's pool). */
  async promoteLocal(volume: string, backendId: string | undefined, opts: { force?: boolean } = {}): Promise<VolumeReplication> {
    const next = promoteVolume(this.pool, volume, backendId, opts);
    this.log.warn({ volume }, 'failover: secondary promoted to primary');
    return next;
  }

  /** Copy every region again (e.g. after a rollback, which bypasses the export). */
  async resync(volume: string): Promise<void> {
    // Writes through the export wait while the session is replaced (as for a resize).
    await this.pauseSession(volume, { drainMs: 0 });
    try {
      await markForResync(this.pool, volume);
    } finally {
      await this.resumeSession(volume);
    }
  }

  // ---------------------------------------------------------------- writes behind the export's back

  isPaused(volume: string): boolean {
    return this.paused.has(volume);
  }

  /** Writes through the export wait while the volume's session is paused (resize). */
  settled(volume: string): Promise<void> | undefined {
    return this.paused.get(volume)?.done;
  }

  /** Stop the session for a resize; writes through the export wait until resumeSession. */
  async pauseSession(volume: string, opts: { drainMs?: number } = {}): Promise<void> {
    if (this.paused.has(volume)) return;
    let release!: () => void;
    this.paused.set(volume, { done: new Promise<void>((r) => (release = r)), release });
    await this.drainWrites(volume);
    const s = this.sessions.get(volume);
    this.sessions.delete(volume);
    if (s) await s.stop({ drainMs: opts.drainMs ?? 10_000 });
  }

  async resumeSession(volume: string): Promise<void> {
    try {
      await this.startSession(volume, { resuming: true });
    } finally {
      const p = this.paused.get(volume);
      this.paused.delete(volume);
      p?.release();
    }
  }

  // ---------------------------------------------------------------- failover / failback

  /**
   * Run on the secondary's pool: promote it (the primary may be dead; it fences itself
   * when it sees the promotion). Run on the primary's pool: planned failover — catch up,
   * fence writes here, flush the secondary, then promote it over the replication link.
   */
  async failover(volume: string, backendId?: string, opts: { force?: boolean } = {}): Promise<VolumeReplication> {
    const r = this.pool.replicationOf(volume);
    if (!r) throw new PoolError('EINVAL', `volume "${volume}" is not replicated`);
    if (r.role === 'secondary' && r.state === 'enabled') return this.promoteLocal(volume, backendId, opts);
    if (r.role !== 'primary' || r.state !== 'enabled') throw new PoolError('EINVAL', `volume "${volume}" is ${r.state} (${r.role}); nothing to fail over`);
    if (backendId && backendId !== r.backendId) throw new PoolError('EINVAL', `volume "${volume}" replicates to backend "${r.backendId}", not "${backendId}"`);
    const s = this.sessions.get(volume);
    if (!s) throw new PoolError('EINVAL', `volume "${volume}" has no running replication session; run failover against the secondary's pool`);
    await s.drain(30_000);
    await s.fence();
    const uri = this.pool.backends()[r.backendId!].uri;
    try {
      await s.remote?.flush();
      const c = await connectPeer(uri, { volume, op: 'promote' }, { timeoutMs: this.timeoutMs });
      await c.close();
    } catch (err) {
      const failed: VolumeReplication = { ...r, state: 'failover-error', changed: new Date().toISOString() };
      this.pool.setVolumeReplication(volume, failed);
      this.sessions.delete(volume);
      await s.stop();
      throw new PoolError('EINVAL', `failover of "${volume}" fenced it here but could not promote the secondary (${(err as Error).message}); run failover against the secondary's pool`);
    }
    // The catalog first: from then on writes are fenced, none starts a new session.
    const next: VolumeReplication = { ...r, role: 'secondary', state: 'failed-over', activeBackendId: r.backendId, changed: new Date().toISOString() };
    this.pool.setVolumeReplication(volume, next);
    this.sessions.delete(volume);
    await s.stop();
    return next;
  }

  async failback(volume: string, opts: FailbackOptions = {}): Promise<FailbackResult> {
    const res = await failbackVolume(this.pool, volume, this.log, this.timeoutMs, opts);
    this.writtenApart.delete(volume);
    await this.startSession(volume);
    return res;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.scan);
    await Promise.all([...this.sessions.values()].map((s) => s.stop({ drainMs: 2000 })));
    this.sessions.clear();
  }
}

export interface FailbackOptions {
  /** split brain: whose changes since the copies parted are thrown away */
  discardChangesOn?: 'local' | 'remote';
  onProgress?: (done: number, total: number) => void;
}

export interface FailbackResult {
  replication: VolumeReplication;
  copiedBytes: number;
  /** which copy's data both hold now: the active backend's (remote) or this pool's (local) */
  kept: 'local' | 'remote';
}

/**
 * Which copy a failback keeps, from what each side recorded since they parted (disk-state.ts):
 * the side that was written wins; both written is a split brain, resolved only by the
 * operator naming the side whose changes are discarded.
 */
export function chooseFailbackSource(volume: string, backendId: string, local: ReplicaState, remote: PeerState, discard?: 'local' | 'remote'): 'local' | 'remote' {
  if (discard) return discard === 'local' ? 'remote' : 'local';
  // A copy promoted while Inconsistent never got all of this one: this one holds data it lacks.
  const localWrote = local.parted !== undefined || remote.forcedFrom === 'Inconsistent';
  const remoteWrote = remote.parted !== undefined;
  if (localWrote && remoteWrote) {
    const here = local.parted !== undefined ? `written apart from ${local.parted}` : `holding data the backend's copy never got: it was promoted with --force while Inconsistent`;
    throw new PoolError(
      'EINVAL',
      `split brain on "${volume}": both copies were written since they parted (here: generation ${local.gen}, ${here}; ` +
        `backend "${backendId}": generation ${remote.gen}, written apart from ${remote.parted}). A failback would overwrite the writes acknowledged here; nothing was changed. ` +
        `Choose the copy whose changes are discarded: "snapblock failback ${volume} --discard-changes-on local" keeps backend "${backendId}"'s data and resyncs it here, ` +
        `"--discard-changes-on remote" keeps this pool's data and resyncs it to "${backendId}"`,
    );
  }
  // Only this copy was written apart (the promoted one was not): keep those writes.
  return localWrote ? 'local' : 'remote';
}

/**
 * Failback, run on the original primary's pool while the volume is failed over. The split
 * brain check comes first (op=state, nothing changes there); then the active copy is
 * demoted over the link and every region that differs (holes on both sides skipped) is
 * copied from the kept copy to the other; the copy being overwritten is Inconsistent until
 * the copy completed and was flushed. Then both share a new generation, this copy is the
 * primary again and replication resumes with nothing dirty.
 */
export async function failbackVolume(pool: Pool, volume: string, log: Logger, timeoutMs: number, opts: FailbackOptions = {}): Promise<FailbackResult> {
  const r = pool.replicationOf(volume);
  if (!r || r.state !== 'failed-over' || r.role !== 'secondary' || !r.activeBackendId) {
    throw new PoolError('EINVAL', `volume "${volume}" is not failed over from this pool; run failback against the original primary's pool`);
  }
  const backend = pool.backends()[r.activeBackendId];
  if (!backend) throw new PoolError('ENOENT', `backend "${r.activeBackendId}" is not configured`);
  const local = await pool.volume(volume);
  const remoteState = await peerState(backend.uri, { volume }, timeoutMs);
  const kept = chooseFailbackSource(volume, r.activeBackendId, readReplicaState(pool, volume), remoteState, opts.discardChangesOn);
  const c = await connectPeer(backend.uri, { volume, op: 'failback' }, { timeoutMs, allocation: true });
  let copied = 0;
  const total = local.size;
  try {
    if (c.readOnly) throw new PoolError('EINVAL', `backend "${r.activeBackendId}" refused to hand "${volume}" back`);
    if (c.size !== local.size) throw new PoolError('EINVAL', `"${volume}" has ${c.size} bytes on the backend and ${local.size} here`);
    // The copy about to be overwritten is Inconsistent from before its first byte changes.
    const inconsistent = { disk: 'Inconsistent' as const, phase: 'failback' as const, done: 0, total };
    if (kept === 'remote') updateReplicaState(pool, volume, { disk: 'Inconsistent', why: 'a failback copying the active copy back here started and has not completed', sync: { phase: 'failback', done: 0, total } });
    else await peerState(backend.uri, { volume, ...inconsistent }, timeoutMs);
    copied = await copyDifferences(local, c, kept, regionSizeFor(local.blockSize), opts.onProgress);
    await (kept === 'remote' ? local.flush() : c.flush());
  } finally {
    await c.close().catch(() => {});
  }
  // Both copies are equal now: one new generation on both, nothing dirty, the initial sync is done.
  const gen = newGeneration();
  // (not lagging yet: no primary feeds it until the session starts, which says so itself)
  await peerState(backend.uri, { volume, disk: 'UpToDate', gen, lagging: false }, timeoutMs);
  rejoined(pool, volume, gen);
  const rlog = RegionLog.open(regionLogPath(pool, volume), local.size, regionSizeFor(local.blockSize));
  rlog.clearAll();
  await rlog.setInitialSyncDone(true);
  await rlog.close();
  const next: VolumeReplication = { ...r, role: 'primary', state: 'enabled', activeBackendId: undefined, changed: new Date().toISOString() };
  pool.setVolumeReplication(volume, next);
  log.warn({ volume, copiedBytes: copied, kept, discarded: opts.discardChangesOn }, 'failback: volume is the primary again');
  return { replication: next, copiedBytes: copied, kept };
}

/** Copy every region that differs between the two copies, from the kept one to the other; bytes copied. */
async function copyDifferences(local: Volume, c: NbdClient, kept: 'local' | 'remote', step: number, onProgress?: (done: number, total: number) => void): Promise<number> {
  const remoteMap = await c.map('base:allocation');
  let mi = 0;
  const remoteZero = (off: number, end: number) => {
    while (mi < remoteMap.length && remoteMap[mi].offset + remoteMap[mi].length <= off) mi++;
    for (let i = mi; i < remoteMap.length && remoteMap[i].offset < end; i++) if (!(remoteMap[i].flags & 2)) return false;
    return true;
  };
  let copied = 0;
  for (let at = 0; at < local.size; at += step) {
    const end = Math.min(local.size, at + step);
    const ext = await local.extents(at, end - at);
    const localZero = ext.every((e) => e.zero) && ext.length > 0 && ext[ext.length - 1].offset + ext[ext.length - 1].length >= end;
    if (localZero && remoteZero(at, end)) continue;
    const [theirs, ours] = await Promise.all([c.read(at, end - at), local.read(at, end - at)]);
    if (!theirs.equals(ours)) {
      await (kept === 'remote' ? local.write(at, theirs) : c.write(at, ours));
      copied += end - at;
    }
    onProgress?.(end, local.size);
  }
  return copied;
}

/** Promote a secondary in the catalog: role primary, status failed-over. Refused unless UpToDate or forced. */
export function promoteVolume(pool: Pool, volume: string, backendId: string | undefined, opts: { force?: boolean } = {}): VolumeReplication {
  const r = pool.replicationOf(volume);
  if (!r || r.role !== 'secondary' || r.state !== 'enabled') throw new PoolError('EINVAL', `volume "${volume}" is not a replication secondary here`);
  if (backendId && !pool.backends()[backendId]) throw new PoolError('ENOENT', `no backend "${backendId}" (snapblock backend add)`);
  const st = readReplicaState(pool, volume);
  if (st.disk !== 'UpToDate' && !opts.force) throw new PoolError('EINVAL', notUpToDateMessage(volume, st));
  if (st.disk !== 'UpToDate') writeReplicaState(pool, volume, { ...st, forcedFrom: st.disk }); // (a failback will not take it for complete)
  const next: VolumeReplication = { ...r, role: 'primary', state: 'failed-over', backendId: backendId ?? r.backendId, activeBackendId: undefined, changed: new Date().toISOString() };
  pool.setVolumeReplication(volume, next);
  return next;
}

function notUpToDateMessage(volume: string, st: ReplicaState): string {
  const what = st.disk === 'Inconsistent' ? `${describeSync(st.sync)} when it stopped, so its data may be a mix of old and new blocks or garbage` : `${st.why ?? 'it may miss writes'}`;
  return `refusing to fail over "${volume}": its disk here is ${st.disk} (${what}). ` + `"snapblock failover ${volume} --force" promotes it anyway, knowing the data may be inconsistent or out of date`;
}

/** Set every bit of a volume's region log: the next session copies everything. */
export async function markForResync(pool: Pool, volume: string): Promise<void> {
  const v = await pool.volume(volume);
  const rlog = RegionLog.open(regionLogPath(pool, volume), v.size, regionSizeFor(v.blockSize));
  await rlog.markAll();
  await rlog.close();
}

/** Regions (of size rs) covering the given byte ranges. */
function regionsOf(ranges: Array<{ offset: number; length: number }>, rs: number): number[] {
  const set = new Set<number>();
  for (const x of ranges) for (let r = Math.floor(x.offset / rs); r <= Math.floor((x.offset + Math.max(x.length, 1) - 1) / rs); r++) set.add(r);
  return [...set].sort((a, b) => a - b);
}

const held = new Map<string, number[]>();

/**
 * Rollback and resize change a volume without going through its export. On a replicating
 * primary: a rollback's changed regions are marked in the region log (durably, before the
 * rollback writes anything) and dirty, then resynced; a resize stops the session, reshapes
 * the log, and the next connection carries the new size to the secondary, which follows.
 * Works in-process too (no server): then only the log is marked, and the next `serve`
 * resyncs it.
 */
addBypassHook({
  async before(pool: Pool, volume: string, change: BypassChange): Promise<void> {
    let r: VolumeReplication | undefined;
    try {
      r = pool.replicationOf(volume);
    } catch {
      return;
    }
    if (r?.role === 'primary' && r.state === 'failed-over' && change.op === 'rollback') {
      // A promoted copy rewritten by a rollback has parted from the old primary, as by a write.
      const svc = serviceOf(pool);
      if (svc) svc.noteWrite(volume);
      else markWrittenApart(pool, volume);
      return;
    }
    if (!r || r.role !== 'primary' || r.state !== 'enabled') return;
    const svc = serviceOf(pool);
    const v = await pool.volume(volume);
    const rs = regionSizeFor(v.blockSize);
    if (change.op === 'resize') {
      await svc?.pauseSession(volume);
      return;
    }
    const regions = regionsOf(await v.changedExtents(change.snapshot, undefined), rs);
    // (with a server, through its session — started if need be: one writer of the log file)
    const s = svc ? await svc.sessionFor(volume) : undefined;
    if (s) await s.beginBypass(regions);
    else {
      const rlog = RegionLog.open(regionLogPath(pool, volume), v.size, rs);
      await Promise.all(regions.map((x) => rlog.mark(x, x)));
      await rlog.close();
    }
    held.set(`${pool.dir}\0${volume}`, regions);
  },
  async after(pool: Pool, volume: string, change: BypassChange, ok: boolean): Promise<void> {
    const svc = serviceOf(pool);
    if (change.op === 'resize') {
      if (!svc?.isPaused(volume) && !(svc === undefined && isReplicatingPrimary(pool, volume))) return;
      const v = await pool.volume(volume);
      if (ok) RegionLog.reshape(regionLogPath(pool, volume), change.from, change.to, regionSizeFor(v.blockSize));
      if (svc) await svc.resumeSession(volume);
      return;
    }
    const key = `${pool.dir}\0${volume}`;
    const regions = held.get(key);
    if (!regions) return;
    held.delete(key);
    const s = svc?.session(volume);
    // sync: the rollback returns once the secondary has it too (if the link is up)
    if (s) await s.endBypass(regions, { waitMs: s.mode === 'sync' ? 60_000 : 0 });
  },
});

function isReplicatingPrimary(pool: Pool, volume: string): boolean {
  try {
    const r = pool.replicationOf(volume);
    return r?.role === 'primary' && r.state === 'enabled';
  } catch {
    return false;
  }
}

/** The read-write export of a volume as ordinary clients see it: replicated, fenced or plain. */
class ReplicatedExport implements BlockLayer {
  constructor(
    private readonly svc: ReplicationService,
    private readonly volume: string,
    private readonly layer: BlockLayer,
  ) {}

  get size(): number {
    return this.layer.size;
  }
  get caps(): Capabilities {
    return this.layer.caps;
  }

  /**
   * The session a write goes through, or undefined for a volume that is not a replicating
   * primary. A replicating primary's write never bypasses a session (not yet started at
   * start-up, backend missing, being replaced): it waits for one, so it is logged.
   */
  private async route(): Promise<ReplicationSession | undefined> {
    await this.svc.settled(this.volume);
    const why = this.svc.fenceReason(this.volume);
    if (why) throw new BlockError('EPERM', why);
    this.svc.noteWrite(this.volume);
    return this.svc.session(this.volume) ?? this.svc.sessionFor(this.volume);
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.layer.read(offset, length);
  }
  readMapped(offset: number, length: number): MappedRange | undefined {
    return this.layer.readMapped?.(offset, length);
  }
  /** Only for a volume that is not replicated (nor fenced, nor paused): a session needs the bytes. */
  writeInPlace(offset: number, length: number, waited: (idleMs: number) => void): InPlaceWrite | undefined {
    if (!this.layer.writeInPlace || this.svc.settled(this.volume) || this.svc.session(this.volume) || !this.unreplicated()) return undefined;
    const w = this.layer.writeInPlace(offset, length, waited);
    if (!w) return undefined;
    // In flight, for whoever drains the volume's writes, until its payload is in.
    let landed!: () => void;
    void this.svc.track(this.volume, new Promise<void>((r) => (landed = r)));
    return {
      pieces: w.pieces,
      finish: (complete, flags) => {
        landed();
        return w.finish(complete, flags);
      },
    };
  }
  private unreplicated(): boolean {
    try {
      return !this.svc.pool.replicationOf(this.volume);
    } catch {
      return false;
    }
  }
  async write(offset: number, data: Buffer, flags?: WriteFlags): Promise<void> {
    const s = await this.route();
    return this.svc.track(this.volume, s ? s.write(offset, data, flags) : this.layer.write(offset, data, flags));
  }
  async trim(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    const s = await this.route();
    return this.svc.track(this.volume, s ? s.trim(offset, length, flags) : this.layer.trim(offset, length, flags));
  }
  async zero(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    const s = await this.route();
    return this.svc.track(this.volume, s ? s.zero(offset, length, flags) : this.layer.zero(offset, length, flags));
  }
  async flush(): Promise<void> {
    await this.svc.settled(this.volume);
    const s = this.svc.session(this.volume) ?? (await this.svc.sessionFor(this.volume));
    return s ? s.flush() : this.layer.flush();
  }
  extents(offset: number, length: number): Promise<Extent[]> {
    return this.layer.extents(offset, length);
  }
  cache(offset: number, length: number): Promise<void> {
    return this.layer.cache(offset, length);
  }
  async close(): Promise<void> {}
}

/** The secondary copy as the primary writes it; refuses writes once promoted here. */
class PeerLayer implements BlockLayer {
  readonly caps: Capabilities;

  constructor(
    private readonly svc: ReplicationService,
    private readonly volume: string,
    private readonly v: Volume,
    readOnly: boolean,
  ) {
    this.caps = { ...v.caps, readOnly, multiConn: false };
  }

  get size(): number {
    return this.v.size;
  }

  private guard(): void {
    if (this.caps.readOnly) throw new BlockError('EPERM', `"${this.volume}" is the primary here`);
    let r: VolumeReplication | undefined;
    try {
      r = this.svc.pool.replicationOf(this.volume);
    } catch {
      throw new BlockError('EIO', `volume "${this.volume}" no longer exists`);
    }
    if (r?.role !== 'secondary') throw new BlockError('EPERM', `"${this.volume}" has been promoted to primary here`);
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.v.read(offset, length);
  }
  async write(offset: number, data: Buffer, flags?: WriteFlags): Promise<void> {
    this.guard();
    return this.v.write(offset, data, flags);
  }
  async trim(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    this.guard();
    return this.v.trim(offset, length, flags);
  }
  async zero(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    this.guard();
    return this.v.zero(offset, length, flags);
  }
  flush(): Promise<void> {
    return this.v.flush();
  }
  extents(offset: number, length: number): Promise<Extent[]> {
    return this.v.extents(offset, length);
  }
  cache(offset: number, length: number): Promise<void> {
    return this.v.cache(offset, length);
  }
  async close(): Promise<void> {}
}

/** op=state: a copy's disk state (JSON) as a tiny read-only disk. */
class StateLayer implements BlockLayer {
  readonly caps: Capabilities = { readOnly: true, multiConn: false, trim: false, zero: false, fastZero: false, fua: false, cache: false, extents: false };

  constructor(private readonly bytes: Buffer) {}

  get size(): number {
    return this.bytes.length;
  }
  async read(offset: number, length: number): Promise<Buffer> {
    const out = Buffer.alloc(length);
    this.bytes.copy(out, 0, offset, Math.min(this.bytes.length, offset + length));
    return out;
  }
  private refuse(): Promise<never> {
    return Promise.reject(new BlockError('EPERM', 'replication state is read-only'));
  }
  write(): Promise<void> {
    return this.refuse();
  }
  trim(): Promise<void> {
    return this.refuse();
  }
  zero(): Promise<void> {
    return this.refuse();
  }
  async flush(): Promise<void> {}
  async extents(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, zero: false, hole: false }];
  }
  async cache(): Promise<void> {}
  async close(): Promise<void> {}
}

export type { PeerRequest };
