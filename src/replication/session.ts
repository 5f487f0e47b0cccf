// One replication session: the primary side of a replicated volume. It sits between the
// NBD sessions of the volume's read-write export and the volume (a filter), and feeds the
// secondary copy over one pipelined NBD connection (docs/REPLICATION.md).
//
//   sync   a write is acknowledged when the volume AND the secondary completed it; FUA
//          travels along; FLUSH = local flush + remote flush.
//   async  a write is acknowledged when the volume completed it; a copy is queued and
//          shipped in write order (overlapping writes never in flight together; FLUSH is
//          a barrier that the secondary also executes). The queue is bounded: past
//          maxLagBytes, writes wait (bounded lag).
//
// Every write first makes its regions (extents) hot in the persisted activity log
// (region-log.ts): free when they already are, one shared fdatasync when they enter; a
// sequential writer has extents marked ahead of it, in the background. When the link is
// lost, writes mark regions as needing resync instead of shipping; when it returns only
// dirty regions, plus hot ones that no remote flush covered, are copied; after a crash of
// the primary, every region in the log.
//
// The secondary's disk state (disk-state.ts) is told over op=state connections: Inconsistent
// (durable there) before the first byte of every sync, progress once a second, UpToDate
// with this copy's generation once the sync completed and the secondary flushed it.
import type { Logger } from 'pino';
import { BlockError, type WriteFlags, type ZeroFlags } from '../block/layer.js';
import type { NbdClient } from '../nbd/client.js';
import type { Volume } from '../storage/volume.js';
import type { VolumeReplication } from '../pool/catalog.js';
import { RegionLog } from './region-log.js';
import { connectPeer, peerState, type PeerRequest } from './peer.js';
import { ioBuffer, recycle, retain } from '../block/io-buffers.js';

export type LinkState = 'connecting' | 'syncing' | 'replicating' | 'disconnected' | 'not-capable' | 'error' | 'failed-over' | 'stopped';

export interface SessionOptions {
  volume: string;
  local: Volume;
  settings: VolumeReplication;
  /** undefined: the backend is not configured (yet); writes are only logged as dirty until attachBackend */
  backendUri?: string;
  logFile: string;
  log: Logger;
  regionSize: number;
  /** per-request timeout on the link: a silent peer counts as lost after this */
  timeoutMs: number;
  /** async: queued bytes beyond which writes wait */
  maxLagBytes: number;
  /** bound of the activity log's hot set, in extents (default: 1 GiB worth) */
  hotLimit?: number;
  /** the peer has been promoted: fence the volume here */
  onFailedOver(reason: string): void;
  /** this copy's data generation (disk-state.ts), shared with the secondary once it is in sync */
  ownGeneration(): string;
  /** a write is (about to be) acknowledged that the secondary will not get in order: durable on return */
  writtenApart(): void;
  /** the secondary holds what this copy holds, under generation gen */
  rejoined(gen: string): void;
}

type Kind = 'write' | 'trim' | 'zero' | 'flush';

interface Entry {
  kind: Kind;
  offset: number;
  length: number;
  data?: Buffer;
  mayTrim?: boolean;
  r0: number;
  r1: number;
  queued: number;
}

interface Active {
  start: number;
  end: number;
  done: Promise<void>;
}

/** async shipping: requests in flight on the link, and bytes */
const MAX_SHIP_REQUESTS = 16;
const MAX_SHIP_BYTES = 32 * 1024 * 1024;
/** queued writes back to back on the volume leave as one request of up to this much */
const COALESCE_BYTES = 4 * 1024 * 1024;
const COPY_PARALLEL = 8;

/** a sequential writer has this many extents ahead of it made hot (in the background) */
const MARK_AHEAD = Math.max(2, Number(process.env.SNAPBLOCK_REPL_MARK_AHEAD ?? 64));
/** under load, the secondary is flushed (to cover hot extents) at most this often */
const COVER_MS = Number(process.env.SNAPBLOCK_REPL_COVER_MS ?? 10_000);
/** how many write streams the sequential detection follows */
const STREAMS = 64;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** resync copy rate limit in bytes per second (DRBD's resync-rate); 0 = as fast as it goes */
const RESYNC_RATE = Number(process.env.SNAPBLOCK_REPL_RESYNC_RATE ?? 0);
/** how often the secondary hears how far a sync into it got */
const PROGRESS_REPORT_MS = 1000;

/**
 * The async queue's hold on a write payload (the caller owns it again once the write is
 * acknowledged): a recycled IO buffer (the NBD session receives large payloads into
 * those) is kept past its owner's recycle, no copy; anything else is copied into one.
 * Either way it goes back to the pool once shipped.
 */
function holdPayload(src: Buffer): Buffer {
  if (retain(src)) return src;
  const copy = ioBuffer(src.length);
  src.copy(copy);
  return copy;
}

export class ReplicationSession {
  link: LinkState = 'connecting';
  lastError?: string;
  /** sync mode running as async because the link was lost (onLinkLoss: degrade) */
  degraded = false;
  resyncedBytes = 0;
  progress = { phase: 'none' as 'none' | 'initial' | 'resync', done: 0, total: 0 };

  private client?: NbdClient;
  private readonly rlog: RegionLog;
  private readonly need: Uint8Array;
  private needCount = 0;
  private readonly inflight = new Map<number, number>();
  private readonly drainWaiters = new Map<number, Array<() => void>>();
  private readonly locks = new Map<number, Promise<void>>();
  /** regions written before the initial sync completed (the initial scan must not clear them) */
  private readonly touched = new Set<number>();
  /** where recent writes ended: a write starting at one of these continues a sequential stream */
  private readonly heads = new Map<number, true>();
  private readonly active = new Set<Active>();
  private cleanWaiters: Array<{ r0: number; r1: number; resolve: () => void; reject: (e: Error) => void }> = [];
  private readonly queue: Entry[] = [];
  private readonly shipping = new Set<Entry>();
  private shippingBytes = 0;
  private shipRequests = 0;
  private shippingFlush = false;
  private queuedBytes = 0;
  private roomWaiters: Array<() => void> = [];
  private stopped = false;
  private fenced = false;
  private timer?: NodeJS.Timeout;
  private connecting?: Promise<void>;
  private cleaning = false;
  private kicking?: Promise<void>;
  private readonly bypassUnlock = new Map<number, () => void>();
  private writesSinceCycle = 0;
  private lastCover = Date.now();
  private readonly size: number;
  /** the resync throttle: when the next region may start copying */
  private nextCopyAt = 0;
  private reporting?: Promise<void>;
  private peerWithoutStates = false;

  constructor(private readonly o: SessionOptions) {
    this.size = o.local.size;
    this.rlog = RegionLog.open(o.logFile, this.size, o.regionSize, { hotLimit: o.hotLimit });
    this.need = new Uint8Array(Math.ceil(this.rlog.count / 8));
  }

  get mode(): 'sync' | 'async' {
    return this.o.settings.mode === 'sync' && !this.degraded ? 'sync' : 'async';
  }

  start(): void {
    this.timer = setInterval(() => void this.cleanCycle(), 1000);
    this.timer.unref();
    if (this.o.backendUri === undefined) {
      this.link = 'error';
      this.lastError = `backend "${this.o.settings.backendId}" is not configured`;
      return;
    }
    this.reconnect();
  }

  get offline(): boolean {
    return this.o.backendUri === undefined;
  }

  /** The backend has been configured since the session started: connect and resync what was written meanwhile. */
  attachBackend(uri: string): void {
    if (this.o.backendUri !== undefined || this.stopped) return;
    this.o.backendUri = uri;
    this.link = 'connecting';
    this.lastError = undefined;
    this.reconnect();
  }

  // ---------------------------------------------------------------- status

  status(): Record<string, unknown> {
    const oldest = this.queue[0] ?? [...this.shipping][0];
    const needBytes = this.needCount * this.o.regionSize;
    return {
      link: this.link,
      peerDisk: this.link === 'replicating' ? 'UpToDate' : this.link === 'syncing' ? 'Inconsistent' : 'Unknown',
      mode: this.o.settings.mode,
      effectiveMode: this.mode,
      degraded: this.degraded,
      lagBytes: this.queuedBytes + needBytes,
      lagSeconds: oldest ? (Date.now() - oldest.queued) / 1000 : needBytes ? null : 0,
      queuedBytes: this.queuedBytes,
      dirtyRegions: this.needCount,
      dirtyBytes: needBytes,
      regionSize: this.o.regionSize,
      loggedRegions: this.rlog.markedCount(),
      hotRegions: this.rlog.hotCount,
      hotLimit: this.rlog.hotLimit,
      unflushedRegions: this.rlog.uncoveredCount(),
      logCommits: this.rlog.syncs,
      initialSyncDone: this.rlog.initialSyncDone,
      progress: this.progress,
      resyncedBytes: this.resyncedBytes,
      lastError: this.lastError,
    };
  }

  /** Resolves when nothing is queued or waiting for resync and the link is up. */
  async drain(timeoutMs: number): Promise<void> {
    const until = Date.now() + timeoutMs;
    while (!(this.link === 'replicating' && this.needCount === 0 && this.queue.length === 0 && this.shipping.size === 0)) {
      if (Date.now() > until) throw new Error(`replication of "${this.o.volume}" did not catch up within ${timeoutMs} ms (link ${this.link}, ${this.needCount} dirty regions, ${this.queuedBytes} bytes queued)`);
      if (this.link === 'failed-over' || this.link === 'stopped') throw new Error(`replication of "${this.o.volume}" is ${this.link}`);
      await sleep(50);
    }
  }

  // ---------------------------------------------------------------- write path

  private regions(offset: number, length: number): [number, number] {
    const rs = this.o.regionSize;
    return [Math.floor(offset / rs), Math.floor((offset + Math.max(length, 1) - 1) / rs)];
  }

  private checkWritable(): void {
    if (this.fenced || this.link === 'failed-over') throw new BlockError('EPERM', `volume "${this.o.volume}" has been failed over to its secondary; it is read-only here`);
    if (this.stopped) throw new BlockError('ESHUTDOWN', 'replication is stopping');
  }

  write(offset: number, data: Buffer, flags: WriteFlags = {}): Promise<void> {
    return this.op({ kind: 'write', offset, length: data.length, data }, flags.fua ?? false);
  }

  trim(offset: number, length: number, flags: WriteFlags = {}): Promise<void> {
    return this.op({ kind: 'trim', offset, length }, flags.fua ?? false);
  }

  zero(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    if (!flags.mayTrim && flags.fast) throw new BlockError('ENOTSUP', 'zeroing without deallocating is not fast here');
    return this.op({ kind: 'zero', offset, length, mayTrim: flags.mayTrim }, flags.fua ?? false);
  }

  async flush(): Promise<void> {
    const c = this.client;
    if (this.mode === 'sync') {
      const remote = c && this.link === 'replicating' ? c.flush().then(() => true, (err: Error) => (this.linkLost(c, err), false)) : Promise.resolve(false);
      const [, ok] = await Promise.all([this.o.local.flush(), remote]);
      if (!ok && this.o.settings.onLinkLoss !== 'degrade' && !this.degraded && this.link !== 'failed-over') {
        // RPO 0: the flush completes when the secondary is back and has caught up.
        await this.waitClean(0, this.rlog.count - 1);
      }
      return;
    }
    await this.o.local.flush();
    if (c && (this.queue.length || this.shipping.size)) {
      this.queue.push({ kind: 'flush', offset: 0, length: 0, r0: 0, r1: -1, queued: Date.now() });
      this.pump();
    }
  }

  /** Overlapping operations run one after the other, so both copies apply them in the same order. */
  private async exclusive(start: number, end: number): Promise<() => void> {
    for (;;) {
      let blocker: Active | undefined;
      for (const a of this.active) if (a.start < end && start < a.end) blocker = a;
      if (!blocker) break;
      await blocker.done;
    }
    let release!: () => void;
    const a: Active = { start, end, done: new Promise<void>((r) => (release = r)) };
    this.active.add(a);
    return () => {
      this.active.delete(a);
      release();
    };
  }

  private async op(e: Omit<Entry, 'r0' | 'r1' | 'queued'>, fua: boolean): Promise<void> {
    this.checkWritable();
    const [r0, r1] = this.regions(e.offset, e.length);
    const release = await this.exclusive(e.offset, e.offset + e.length);
    let entered = false;
    try {
      await this.waitUnlocked(r0, r1);
      this.enter(r0, r1);
      entered = true;
      // Activity log: free when the extents are hot already; else one shared commit.
      const m = this.rlog.activate(r0, r1);
      this.writesSinceCycle++;
      if (this.sequential(e.offset, e.length)) this.markAhead(r1);
      if (m) await m;
      this.checkWritable();
      const local = () => this.applyLocal(e, fua);
      const linked = () => this.client !== undefined && (this.link === 'replicating' || this.link === 'syncing') && !this.anyNeed(r0, r1);
      if (this.mode === 'sync') {
        const c = this.client;
        if (c && linked()) {
          const remote = this.applyRemote(c, e, fua).then(
            () => true,
            (err: Error) => (this.linkLost(c, err), false),
          );
          const [, ok] = await Promise.all([local(), remote]);
          if (ok) return;
        } else await local();
        this.setNeed(r0, r1);
        if (this.link === 'failed-over') throw new BlockError('EPERM', `volume "${this.o.volume}" was failed over while this write was in flight`);
        if (this.o.settings.onLinkLoss === 'degrade') {
          this.degrade();
          this.o.writtenApart();
          return;
        }
        // block: acknowledged only once the secondary has the region again
        this.leave(r0, r1);
        entered = false;
        await this.waitClean(r0, r1);
        return;
      }
      await local();
      if (linked()) {
        this.enter(r0, r1); // held until shipped
        // The caller owns `data` again once we resolve (BlockLayer contract): the queue
        // holds on to it (a recycled IO buffer, no copy) or copies it (holdPayload).
        const data = e.data ? holdPayload(e.data) : undefined;
        this.queue.push({ ...e, data, r0, r1, queued: Date.now() });
        this.queuedBytes += e.length;
        this.pump();
      } else {
        this.setNeed(r0, r1);
        // Acknowledged while no link carries it: this copy has parted from the secondary.
        if (!this.client) this.o.writtenApart();
      }
    } finally {
      if (entered) this.leave(r0, r1);
      release();
    }
    // async back-pressure: bounded lag
    while (this.queuedBytes > this.o.maxLagBytes && this.client && !this.stopped) await new Promise<void>((r) => this.roomWaiters.push(r));
  }

  /** Is a write at offset the continuation of a recent one? (follows STREAMS streams) */
  private sequential(offset: number, length: number): boolean {
    const seq = offset > 0 && this.heads.delete(offset);
    this.heads.set(offset + length, true);
    if (this.heads.size > STREAMS) this.heads.delete(this.heads.keys().next().value as number);
    return seq;
  }

  /**
   * Keep extents ahead of a sequential writer hot, so that it never waits for a log
   * commit: when one of the next MARK_AHEAD/2 extents is not in the log, the next
   * MARK_AHEAD from there are marked in the background (one commit).
   */
  private markAhead(r1: number): void {
    const last = this.rlog.count - 1;
    for (let r = r1 + 1; r <= Math.min(last, r1 + (MARK_AHEAD >> 1)); r++) {
      if (this.rlog.isMarked(r)) continue;
      this.rlog.prefetch(r, Math.min(last, r + MARK_AHEAD - 1));
      return;
    }
  }

  private degrade(): void {
    if (this.degraded || this.o.settings.mode !== 'sync') return;
    this.degraded = true;
    this.o.log.warn({ volume: this.o.volume }, 'sync replication degraded to async: link lost (onLinkLoss=degrade)');
  }

  private applyLocal(e: Omit<Entry, 'r0' | 'r1' | 'queued'>, fua: boolean): Promise<void> {
    const v = this.o.local;
    if (e.kind === 'write') return v.write(e.offset, e.data!, { fua });
    if (e.kind === 'trim') return v.trim(e.offset, e.length, { fua });
    return v.zero(e.offset, e.length, { fua, mayTrim: e.mayTrim });
  }

  private applyRemote(c: NbdClient, e: Omit<Entry, 'r0' | 'r1' | 'queued'>, fua: boolean): Promise<void> {
    if (e.kind === 'write') return c.write(e.offset, e.data!, fua);
    if (e.kind === 'trim') return c.trim(e.offset, e.length, fua);
    if (e.kind === 'flush') return c.flush();
    return c.zero(e.offset, e.length, { noHole: !e.mayTrim, fua });
  }

  // ---------------------------------------------------------------- region bookkeeping

  private enter(r0: number, r1: number): void {
    const initial = !this.rlog.initialSyncDone;
    for (let r = r0; r <= r1; r++) {
      this.inflight.set(r, (this.inflight.get(r) ?? 0) + 1);
      if (initial) this.touched.add(r);
    }
  }

  private leave(r0: number, r1: number): void {
    for (let r = r0; r <= r1; r++) {
      const n = (this.inflight.get(r) ?? 1) - 1;
      if (n > 0) {
        this.inflight.set(r, n);
        continue;
      }
      this.inflight.delete(r);
      const w = this.drainWaiters.get(r);
      if (w) {
        this.drainWaiters.delete(r);
        for (const f of w) f();
      }
    }
  }

  private async waitUnlocked(r0: number, r1: number): Promise<void> {
    for (;;) {
      let l: Promise<void> | undefined;
      for (let r = r0; r <= r1 && !l; r++) l = this.locks.get(r);
      if (!l) return;
      await l;
    }
  }

  private isNeed(r: number): boolean {
    return (this.need[r >> 3] & (1 << (r & 7))) !== 0;
  }

  private anyNeed(r0: number, r1: number): boolean {
    for (let r = r0; r <= r1; r++) if (this.isNeed(r)) return true;
    return false;
  }

  private setNeed(r0: number, r1: number): void {
    for (let r = r0; r <= r1; r++) {
      if (this.isNeed(r)) continue;
      this.need[r >> 3] |= 1 << (r & 7);
      this.needCount++;
    }
  }

  private clearNeed(r: number): void {
    if (!this.isNeed(r)) return;
    this.need[r >> 3] &= ~(1 << (r & 7));
    this.needCount--;
    if (this.cleanWaiters.length) {
      this.cleanWaiters = this.cleanWaiters.filter((w) => {
        if (this.anyNeed(w.r0, w.r1)) return true;
        w.resolve();
        return false;
      });
    }
  }

  private waitClean(r0: number, r1: number): Promise<void> {
    if (!this.anyNeed(r0, r1)) return Promise.resolve();
    return new Promise((resolve, reject) => this.cleanWaiters.push({ r0, r1, resolve, reject }));
  }

  private *needed(): Generator<number> {
    for (let i = 0; i < this.need.length; i++) {
      const b = this.need[i];
      if (!b) continue;
      for (let j = 0; j < 8; j++) if (b & (1 << j)) yield i * 8 + j;
    }
  }

  // ---------------------------------------------------------------- async shipping

  private overlapsShipping(e: Entry): boolean {
    for (const s of this.shipping) if (s.offset < e.offset + e.length && e.offset < s.offset + s.length) return true;
    return false;
  }

  private pump(): void {
    const c = this.client;
    if (!c) return;
    while (this.queue.length && this.shipRequests < MAX_SHIP_REQUESTS && this.shippingBytes < MAX_SHIP_BYTES) {
      if (this.shippingFlush) return; // barrier in flight
      const e = this.queue[0];
      if (e.kind === 'flush' && this.shipping.size) return; // barrier waits for everything before it
      if (this.overlapsShipping(e)) return; // write order for overlaps
      this.queue.shift();
      const batch = [e];
      if (e.kind === 'write') {
        // Writes queued back to back on the volume leave as one request (no copy: writev).
        const max = Math.min(COALESCE_BYTES, c.maxPayload);
        let end = e.offset + e.length;
        let bytes = e.length;
        for (let n = this.queue[0]; n && n.kind === 'write' && n.offset === end && bytes + n.length <= max && !this.overlapsShipping(n); n = this.queue[0]) {
          this.queue.shift();
          batch.push(n);
          end += n.length;
          bytes += n.length;
        }
      }
      this.ship(c, batch);
    }
  }

  private ship(c: NbdClient, batch: Entry[]): void {
    for (const x of batch) {
      this.shipping.add(x);
      this.shippingBytes += x.length;
    }
    this.shipRequests++;
    const e = batch[0];
    if (e.kind === 'flush') this.shippingFlush = true;
    const sent = batch.length > 1 ? c.write(e.offset, batch.map((x) => x.data!)) : this.applyRemote(c, e, false);
    const settle = () => {
      this.shipRequests--;
      if (e.kind === 'flush') this.shippingFlush = false;
      for (const x of batch) this.shipping.delete(x);
    };
    sent.then(
      () => {
        settle();
        for (const x of batch) {
          if (x.data) recycle(x.data); // the secondary replied: the socket is done with it
          this.shipped(x);
        }
        this.pump();
      },
      (err: Error) => {
        settle();
        for (const x of batch) {
          if (x.kind !== 'flush') this.setNeed(x.r0, x.r1);
          this.shipped(x);
        }
        this.linkLost(c, err);
      },
    );
  }

  private shipped(e: Entry): void {
    this.shippingBytes -= e.length;
    this.queuedBytes -= e.length;
    if (e.kind !== 'flush') this.leave(e.r0, e.r1);
    if (this.queuedBytes <= this.o.maxLagBytes && this.roomWaiters.length) {
      const w = this.roomWaiters;
      this.roomWaiters = [];
      for (const f of w) f();
    }
  }

  /** The queue's content goes back to the region bitmap (the link is down). */
  private unqueue(): void {
    for (const e of this.queue.splice(0)) {
      if (e.kind !== 'flush') this.setNeed(e.r0, e.r1);
      if (e.data) recycle(e.data);
      this.shipped(e);
    }
    const w = this.roomWaiters;
    this.roomWaiters = [];
    for (const f of w) f();
  }

  // ---------------------------------------------------------------- link management

  private linkLost(c: NbdClient, err: Error): void {
    if (c !== this.client) return;
    this.client = undefined;
    void c.close().catch(() => {});
    const errno = (err as { errno?: number }).errno;
    if (errno === 1) return this.failedOver('the secondary refused a write (EPERM): it has been promoted');
    this.lastError = err.message;
    this.link = 'disconnected';
    this.o.log.warn({ volume: this.o.volume, err: err.message }, 'replication link lost; tracking dirty regions');
    if (this.queuedBytes > 0) this.o.writtenApart(); // acknowledged, never shipped
    this.unqueue();
    // What the secondary acknowledged but never flushed may be lost there.
    for (const r of this.rlog.uncovered()) this.setNeed(r, r);
    if (this.o.settings.mode === 'sync' && this.o.settings.onLinkLoss === 'degrade') this.degrade();
    this.reconnect();
  }

  private failedOver(reason: string): void {
    if (this.link === 'failed-over') return;
    this.link = 'failed-over';
    this.fenced = true;
    this.lastError = reason;
    this.o.log.warn({ volume: this.o.volume, reason }, 'volume failed over to its secondary; fenced read-only here');
    if (this.queuedBytes > 0) this.o.writtenApart(); // acknowledged here, never reached the promoted copy
    this.unqueue();
    const e = new BlockError('EPERM', `volume "${this.o.volume}" has been failed over: ${reason}`);
    for (const w of this.cleanWaiters.splice(0)) w.reject(e);
    this.o.onFailedOver(reason);
  }

  private reconnect(): void {
    if (this.connecting || this.stopped || this.o.backendUri === undefined) return;
    this.connecting = this.connectLoop().finally(() => (this.connecting = undefined));
  }

  private async connectLoop(): Promise<void> {
    let delay = 200;
    while (!this.stopped && this.link !== 'failed-over') {
      let c: NbdClient | undefined;
      try {
        const s = this.o.settings;
        c = await connectPeer(
          this.o.backendUri!,
          { volume: this.o.volume, op: 'push', size: this.size, blockSize: this.o.local.blockSize, mode: this.o.local.mode, replMode: s.mode, onLinkLoss: s.onLinkLoss },
          { timeoutMs: this.o.timeoutMs, allocation: true },
        );
        if (this.stopped) {
          await c.close();
          return;
        }
        if (c.readOnly) {
          await c.close().catch(() => {});
          return this.failedOver('the secondary has been promoted to primary');
        }
        if (c.size !== this.size) throw Object.assign(new Error(`the secondary has ${c.size} bytes but the volume has ${this.size}`), { permanent: true });
        this.client = c;
        this.lastError = undefined;
        this.link = 'syncing';
        this.o.log.info({ volume: this.o.volume, backend: this.o.settings.backendId }, 'replication link up');
        // Whatever the log holds and no remote flush covered may differ (after a restart:
        // every region in the log; after a link loss: what was unflushed there, or written
        // while apart — already dirty).
        for (const r of this.rlog.uncovered()) this.setNeed(r, r);
        if (!this.rlog.initialSyncDone) await this.initialScan(c);
        await this.resync(c);
        if (this.client !== c) continue;
        await this.peerUpToDate();
        if (!this.rlog.initialSyncDone) {
          await this.rlog.setInitialSyncDone(true);
          this.touched.clear();
        }
        this.link = 'replicating';
        if (this.degraded && this.needCount === 0) {
          this.degraded = false;
          this.o.log.info({ volume: this.o.volume }, 'sync replication restored');
        }
        this.pump();
        return;
      } catch (err) {
        const msg = (err as Error).message;
        if (c && this.client === c) this.client = undefined;
        if (c) void c.close().catch(() => {});
        this.lastError = msg;
        if (/^export ".*" refused/.test(msg)) this.link = 'not-capable';
        else if ((err as { permanent?: boolean }).permanent) this.link = 'error';
        else this.link = 'disconnected';
        this.o.log.debug({ volume: this.o.volume, err: msg }, 'replication connect failed');
        await sleep(delay);
        delay = Math.min(delay * 2, 2000);
      }
    }
  }

  /** Initial full sync: only regions with data here, or not zero there, need copying. */
  private async initialScan(c: NbdClient): Promise<void> {
    const rs = this.o.regionSize;
    const want = new Uint8Array(this.need.length);
    const set = (off: number, len: number) => {
      for (let r = Math.floor(off / rs); r <= Math.floor((off + len - 1) / rs); r++) want[r >> 3] |= 1 << (r & 7);
    };
    for (let at = 0; at < this.size; ) {
      const ext = await this.o.local.extents(at, Math.min(this.size - at, 1 << 30));
      if (!ext.length) break;
      for (const e of ext) {
        if (!e.zero) set(e.offset, e.length);
        at = e.offset + e.length;
      }
    }
    for (const e of await c.map('base:allocation')) if (!(e.flags & 2)) set(e.offset, e.length);
    for (let r = 0; r < this.rlog.count; r++) {
      if (want[r >> 3] & (1 << (r & 7))) continue;
      if (this.inflight.has(r) || this.touched.has(r)) continue; // written meanwhile: copy it
      this.clearNeed(r);
      this.rlog.clear(r);
    }
    await this.rlog.commit();
    this.progress = { phase: 'initial', done: 0, total: this.needCount * rs };
    this.o.log.info({ volume: this.o.volume, bytes: this.needCount * rs, regions: this.needCount }, 'initial sync: copying allocated regions');
  }

  private async resync(c: NbdClient): Promise<void> {
    if (!this.needCount) return;
    if (this.progress.phase !== 'initial') this.progress = { phase: 'resync', done: 0, total: this.needCount * this.o.regionSize };
    // The secondary is Inconsistent from its first copied byte until the copy completed:
    // it records that (durably) before anything lands, and hears the progress meanwhile.
    await this.tellPeer(this.progressReport());
    const reporter = setInterval(() => this.reportProgress(), PROGRESS_REPORT_MS);
    try {
      await this.copyNeeded(c);
    } finally {
      clearInterval(reporter);
    }
  }

  private async copyNeeded(c: NbdClient): Promise<void> {
    const t0 = Date.now();
    let copied = 0;
    while (this.needCount && this.client === c) {
      const batch = [...this.needed()];
      let i = 0;
      const worker = async () => {
        while (i < batch.length && this.client === c) {
          const r = batch[i++];
          copied += await this.copyRegion(c, r);
          this.progress.done += this.o.regionSize;
        }
      };
      await Promise.all(Array.from({ length: COPY_PARALLEL }, worker));
    }
    if (this.client !== c) return;
    const cands = this.rlog.coverCandidates(this.busy);
    await c.flush();
    this.rlog.covered(cands);
    this.o.log.info({ volume: this.o.volume, phase: this.progress.phase, bytes: copied, ms: Date.now() - t0 }, 'resync done');
    this.progress = { ...this.progress, done: this.progress.total };
  }

  /** async, or sync that degrades: writes are acknowledged before the secondary has them */
  private get lagging(): boolean {
    return this.o.settings.mode === 'async' || this.o.settings.onLinkLoss === 'degrade';
  }

  private progressReport(): Omit<PeerRequest, 'op' | 'volume'> {
    const p = this.progress;
    return { disk: 'Inconsistent', phase: p.phase === 'initial' ? 'initial' : 'resync', done: Math.min(p.done, p.total), total: p.total };
  }

  /** Record a state of the secondary there (durable there when this resolves). */
  private async tellPeer(req: Omit<PeerRequest, 'op' | 'volume'>): Promise<void> {
    if (this.o.backendUri === undefined) throw new Error('no backend');
    if (this.peerWithoutStates) return;
    const st = await peerState(this.o.backendUri, { volume: this.o.volume, ...req }, this.o.timeoutMs);
    if (st.unsupported) {
      // A snapblock server from before disk states: replicate without them.
      this.peerWithoutStates = true;
      this.o.log.warn({ volume: this.o.volume }, 'the secondary does not keep disk states (older snapblock): it cannot tell when it is Inconsistent');
    }
  }

  /** Progress for the secondary's status; one report at a time, a lost one is not retried. */
  private reportProgress(): void {
    if (this.reporting) return;
    this.reporting = this.tellPeer(this.progressReport())
      .catch((err: Error) => this.o.log.debug({ volume: this.o.volume, err: err.message }, 'sync progress report failed'))
      .finally(() => (this.reporting = undefined));
  }

  /**
   * Nothing is dirty and the secondary flushed what it got: it is UpToDate, and shares this
   * copy's generation (which ends a parting: what was written apart is there now).
   */
  private async peerUpToDate(): Promise<void> {
    await this.reporting;
    const c = this.client;
    const gen = this.o.ownGeneration();
    await this.tellPeer({ disk: 'UpToDate', gen, lagging: this.lagging });
    // (a link lost meanwhile may have recorded a parting since: that one stands)
    if (this.client === c && c) this.o.rejoined(gen);
  }

  /** Hold a region's copy back so that resyncs run at most at RESYNC_RATE bytes per second. */
  private async throttle(bytes: number): Promise<void> {
    if (!(RESYNC_RATE > 0)) return;
    const now = Date.now();
    const at = Math.max(now, this.nextCopyAt);
    this.nextCopyAt = at + (1000 * bytes) / RESYNC_RATE;
    if (at > now) await sleep(at - now);
  }

  /** Copy one region to the secondary, holding writes to it back meanwhile. */
  private async copyRegion(c: NbdClient, r: number): Promise<number> {
    while (this.locks.has(r)) await this.locks.get(r);
    while (this.inflight.has(r)) await new Promise<void>((res) => this.drainWaiters.set(r, [...(this.drainWaiters.get(r) ?? []), res]));
    if (!this.isNeed(r)) return 0;
    await this.throttle(this.o.regionSize);
    if (!this.isNeed(r) || this.client !== c) return 0;
    if (this.inflight.has(r) || this.locks.has(r)) return this.copyRegion(c, r); // written or taken while throttled: start over
    let unlock!: () => void;
    this.locks.set(r, new Promise((res) => (unlock = res)));
    let bytes = 0;
    try {
      const start = r * this.o.regionSize;
      const end = Math.min(this.size, start + this.o.regionSize);
      for (let at = start; at < end; ) {
        const ext = await this.o.local.extents(at, end - at);
        if (!ext.length) break;
        for (const e of ext) {
          const len = Math.min(e.length, end - e.offset);
          if (e.zero) await c.zero(e.offset, len);
          else {
            await c.write(e.offset, await this.o.local.read(e.offset, len));
            bytes += len;
          }
          at = e.offset + len;
        }
      }
      this.resyncedBytes += bytes;
      this.clearNeed(r);
    } catch (err) {
      this.linkLost(c, err as Error);
    } finally {
      this.locks.delete(r);
      unlock();
    }
    return bytes;
  }

  /** not a candidate for leaving the log or being covered: in flight, dirty, or being copied */
  private readonly busy = (r: number): boolean => this.inflight.has(r) || this.isNeed(r) || this.locks.has(r);

  /**
   * Once a second, when the link is up. The secondary is FLUSHed when that makes hot
   * extents covered (their writes completed before the FLUSH was sent) and it is worth
   * it: the link is idle (cheap there), the hot set is over its bound (eviction needs
   * covered extents), or COVER_MS passed since the last one (bounds what a link loss
   * resyncs). A FLUSH of a busy secondary costs it an fdatasync of everything written
   * since the last one, so under load it is not sent every second. Otherwise a 4 KiB
   * READ is the heartbeat. Then the hot set is brought back under its bound (lazily:
   * the cleared bits ride with the next commit).
   */
  private async cleanCycle(): Promise<void> {
    const c = this.client;
    if (this.cleaning || !c || this.link !== 'replicating') return;
    this.cleaning = true;
    try {
      const idle = this.writesSinceCycle === 0;
      this.writesSinceCycle = 0;
      const cands = this.rlog.coverCandidates(this.busy);
      const due = Date.now() - this.lastCover >= COVER_MS || this.rlog.hotCount > this.rlog.hotLimit;
      if (cands.length && (idle || due)) {
        this.lastCover = Date.now();
        await c.flush();
        this.rlog.covered(cands);
      } else await c.read(0, Math.min(4096, this.size));
      this.rlog.evict((r) => !this.busy(r));
    } catch (err) {
      this.linkLost(c, err as Error);
    } finally {
      this.cleaning = false;
    }
  }

  /** Stop shipping; what was not shipped stays in the persisted log and resyncs on restart. */
  async stop(opts: { drainMs?: number } = {}): Promise<void> {
    if (opts.drainMs && this.link === 'replicating') await this.drain(opts.drainMs).catch(() => {});
    this.stopped = true;
    clearInterval(this.timer);
    const e = new BlockError('ESHUTDOWN', 'replication stopped');
    for (const w of this.cleanWaiters.splice(0)) w.reject(e);
    this.unqueue();
    const c = this.client;
    // A last remote flush covers what the secondary has, so that a restart resyncs nothing.
    if (c && this.link === 'replicating' && !this.cleaning) {
      const cands = this.rlog.coverCandidates(this.busy);
      await c.flush().then(
        () => this.rlog.covered(cands),
        () => {},
      );
    }
    // Nothing left to ship: the secondary need not count itself Outdated when the link ends.
    const caughtUp = c && this.link === 'replicating' && this.needCount === 0 && this.queuedBytes === 0;
    if (caughtUp && this.lagging) await this.tellPeer({ detach: 'clean' }).catch(() => {});
    this.client = undefined;
    if (this.link !== 'failed-over') this.link = 'stopped';
    if (c) await c.close().catch(() => {});
    // Clean stop: covered extents leave the log (the secondary has them durably).
    if (this.link !== 'failed-over') this.rlog.releaseCovered((r) => !this.busy(r));
    await this.rlog.close();
  }

  // ---------------------------------------------------------------- writes behind the export's back

  /**
   * Regions about to be rewritten without going through this filter (snapshot rollback):
   * made durable in the log and dirty before the first such write, and held (no resync
   * copies them, export writes to them wait) until endBypass.
   */
  async beginBypass(regions: number[]): Promise<void> {
    for (const r of regions) {
      while (this.locks.has(r)) await this.locks.get(r);
      let unlock!: () => void;
      this.locks.set(r, new Promise<void>((res) => (unlock = res)));
      this.bypassUnlock.set(r, unlock);
    }
    const marks: Promise<void>[] = [];
    for (const r of regions) {
      const m = this.rlog.activate(r, r);
      if (m) marks.push(m);
      this.setNeed(r, r);
    }
    await Promise.all(marks);
  }

  /** The bypassing writes are done: the regions resync now (link up) or when the link returns. */
  async endBypass(regions: number[], opts: { waitMs?: number } = {}): Promise<void> {
    for (const r of regions) {
      this.locks.delete(r);
      this.bypassUnlock.get(r)?.();
      this.bypassUnlock.delete(r);
    }
    const done = this.resyncNow();
    if (opts.waitMs && this.client) {
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<void>((r) => (timer = setTimeout(r, opts.waitMs).unref()));
      await Promise.race([done.then(() => this.waitClean(0, this.rlog.count - 1)), timeout]).catch(() => {});
      clearTimeout(timer);
    }
  }

  /** Copy the dirty regions now, if the link is up (otherwise the reconnection does). */
  resyncNow(): Promise<void> {
    this.kicking ??= (async () => {
      const c = this.client;
      if (!c || this.link !== 'replicating' || !this.needCount) return;
      this.link = 'syncing';
      try {
        await this.resync(c);
        if (this.client === c) await this.peerUpToDate();
      } catch (err) {
        this.linkLost(c, err as Error);
      }
      if (this.client === c && this.link === 'syncing') {
        this.link = 'replicating';
        this.pump();
      }
    })().finally(() => (this.kicking = undefined));
    return this.kicking;
  }

  /** Fence local writes (planned failover); resolves when none is in flight. */
  async fence(): Promise<void> {
    this.fenced = true;
    while (this.active.size) await Promise.all([...this.active].map((a) => a.done));
    while (this.queue.length || this.shipping.size) {
      if (!this.client) throw new Error('replication link lost while draining');
      await sleep(20);
    }
  }

  get remote(): NbdClient | undefined {
    return this.client;
  }
}
