// The replication region log, an activity log in the manner of DRBD's: one bit per
// extent (a region of the volume) of a primary volume, persisted in
// <pool>/replication/<volume>.rlog (format: docs/REPLICATION.md). A set bit means "the
// secondary may differ here". The set bits are
//
//   * the HOT set: extents written recently. A write into an extent that is already hot
//     (its bit durable) costs no log IO at all; an extent entering the set is made durable
//     BEFORE the write is issued, and extents entering together share one pwrite +
//     fdatasync (group commit). The hot set is bounded (hotLimit extents): past the bound
//     the least recently used extents leave it, but only extents the secondary has and a
//     remote FLUSH covered since their last write (see coverCandidates/covered/evict);
//     leaving is lazy (the cleared bit is written with the next commit).
//   * the DIRTY extents: what the secondary is known to lack (link down, resync pending).
//     The session keeps them in memory; they never leave the log before being resynced.
//
// After a crash of the primary every set bit is resynced; after a clean stop the extents
// that a remote flush covered are cleared first (releaseCovered), so a restart resyncs
// only what may really differ.
import fs from 'node:fs';
import path from 'node:path';
import { writeFileAtomic } from '../pool/atomic-file.js';

const MAGIC_V1 = 'SBRLOG01';
const MAGIC = 'SBRLOG02';
const HEADER = 32;
/** header flags */
const INITIAL_DONE = 1;

/** What the log knows about a hot extent: the sequence number of its last write and the last one a remote flush covered. */
interface Hot {
  seq: number;
  cov: number;
}

export class RegionLog {
  private lo = Infinity;
  private hi = -1;
  private headerDirty = false;
  private inProgress?: Promise<void>;
  private next?: Promise<void>;
  private closed = false;
  /** extents set in memory whose commit is still under way */
  private readonly pending = new Map<number, Promise<void>>();
  /** every set extent, least recently used first (Map iteration order) */
  private readonly hot = new Map<number, Hot>();
  private seq = 1;
  /** log commits that reached the disk (pwrite + fdatasync); for tests and status */
  syncs = 0;

  private constructor(
    private readonly fd: number,
    readonly regionSize: number,
    readonly count: number,
    private readonly bits: Uint8Array,
    private flags: number,
    readonly hotLimit: number,
  ) {
    // After a restart nothing is known about the secondary: every set extent is uncovered.
    for (const r of this.marked()) this.hot.set(r, { seq: 1, cov: 0 });
  }

  /**
   * Open (or create) the log. A v1 log (SBRLOG01, same layout) is read as is; a log of
   * another geometry (the volume was resized, another region size) is replaced by an
   * all-set one: everything may differ.
   */
  static open(file: string, size: number, regionSize: number, opts: { hotLimit?: number } = {}): RegionLog {
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
    const count = Math.ceil(size / regionSize);
    const bytes = Math.ceil(count / 8);
    const hotLimit = Math.max(1, opts.hotLimit ?? defaultHotLimit(regionSize));
    let bits: Uint8Array | undefined;
    let flags = 0;
    let upgrade = false;
    if (fs.existsSync(file)) {
      const buf = fs.readFileSync(file);
      const magic = buf.length >= HEADER ? buf.toString('latin1', 0, 8) : '';
      if ((magic === MAGIC || magic === MAGIC_V1) && buf.readUInt32LE(8) === regionSize && buf.readUInt32LE(12) === count && buf.length >= HEADER + bytes) {
        flags = buf.readUInt32LE(16);
        bits = new Uint8Array(buf.subarray(HEADER, HEADER + bytes));
        upgrade = magic === MAGIC_V1;
      }
    }
    const fresh = !bits;
    if (!bits) {
      bits = new Uint8Array(bytes).fill(0xff);
      flags = 0;
    }
    const fd = fs.openSync(file, fresh ? 'w+' : 'r+', 0o600);
    const log = new RegionLog(fd, regionSize, count, bits, flags, hotLimit);
    if (fresh || upgrade) {
      fs.writeSync(fd, log.header(), 0, HEADER, 0);
      if (fresh) fs.writeSync(fd, bits, 0, bits.length, HEADER);
      fs.fdatasyncSync(fd);
    }
    return log;
  }

  /**
   * The volume was resized: rewrite the log for the new size, keeping the bits of the
   * regions both sizes share (regions past the old end start clear: zeroes on both copies
   * once the secondary is resized too). Atomic (a new file renamed over the old one); a
   * crash before the rename leaves a log of the old geometry, which open() then replaces
   * by an all-set one.
   */
  static reshape(file: string, oldSize: number, newSize: number, regionSize: number): void {
    if (!fs.existsSync(file)) return;
    const buf = fs.readFileSync(file);
    const oldCount = Math.ceil(oldSize / regionSize);
    const magic = buf.length >= HEADER ? buf.toString('latin1', 0, 8) : '';
    if (!(magic === MAGIC || magic === MAGIC_V1) || buf.readUInt32LE(8) !== regionSize || buf.readUInt32LE(12) !== oldCount) return;
    const count = Math.ceil(newSize / regionSize);
    const out = Buffer.alloc(HEADER + Math.ceil(count / 8));
    buf.copy(out, 0, 0, HEADER);
    out.write(MAGIC, 0, 'latin1');
    out.writeUInt32LE(count, 12);
    for (let r = 0; r < Math.min(count, oldCount); r++) if (buf[HEADER + (r >> 3)] & (1 << (r & 7))) out[HEADER + (r >> 3)] |= 1 << (r & 7);
    // a partial last region of the old size may now hold data the secondary lacks
    if (newSize > oldSize && oldSize % regionSize) {
      const r = oldCount - 1;
      out[HEADER + (r >> 3)] |= 1 << (r & 7);
    }
    writeFileAtomic(file, out);
  }

  private header(): Buffer {
    const h = Buffer.alloc(HEADER);
    h.write(MAGIC, 0, 'latin1');
    h.writeUInt32LE(this.regionSize, 8);
    h.writeUInt32LE(this.count, 12);
    h.writeUInt32LE(this.flags, 16);
    h.writeUInt32LE(this.hotLimit, 20);
    return h;
  }

  get initialSyncDone(): boolean {
    return (this.flags & INITIAL_DONE) !== 0;
  }

  setInitialSyncDone(done: boolean): Promise<void> {
    this.flags = done ? this.flags | INITIAL_DONE : this.flags & ~INITIAL_DONE;
    this.headerDirty = true;
    return this.commit();
  }

  isMarked(r: number): boolean {
    return (this.bits[r >> 3] & (1 << (r & 7))) !== 0;
  }

  get hotCount(): number {
    return this.hot.size;
  }

  /**
   * A write is about to touch extents r0..r1: they become (or stay) hot and most recently
   * used, and uncovered until a remote flush covers this write. Resolves when all are
   * durable; undefined when they already are (no log IO: the common case).
   */
  activate(r0: number, r1: number): Promise<void> | undefined {
    const seq = ++this.seq;
    for (let r = r0; r <= r1; r++) {
      const h = this.hot.get(r);
      if (h) {
        this.hot.delete(r); // move to the most recently used end
        h.seq = seq;
        this.hot.set(r, h);
      } else this.hot.set(r, { seq, cov: 0 });
    }
    return this.mark(r0, r1);
  }

  /** Make r0..r1 hot ahead of a sequential writer, without waiting (not used yet: covered). */
  prefetch(r0: number, r1: number): void {
    r1 = Math.min(r1, this.count - 1);
    for (let r = r0; r <= r1; r++) if (!this.hot.has(r)) this.hot.set(r, { seq: 0, cov: 0 });
    const p = this.mark(r0, r1);
    // a failed commit surfaces on the write that waits for it (activate -> pending)
    p?.catch(() => {});
  }

  /** Set bits r0..r1 (inclusive); resolves when all are durable. undefined: they already are. */
  mark(r0: number, r1: number): Promise<void> | undefined {
    let changed = false;
    let waits: Promise<void>[] | undefined;
    for (let r = r0; r <= r1; r++) {
      if (!this.hot.has(r)) this.hot.set(r, { seq: ++this.seq, cov: 0 });
      if (this.isMarked(r)) {
        const p = this.pending.get(r);
        if (p) (waits ??= []).push(p);
        continue;
      }
      this.bits[r >> 3] |= 1 << (r & 7);
      this.touch(r);
      changed = true;
    }
    if (changed) {
      const p = this.commit();
      for (let r = r0; r <= r1; r++) if (!this.pending.has(r)) this.pending.set(r, p);
      void p.then(
        () => {
          for (let r = r0; r <= r1; r++) if (this.pending.get(r) === p) this.pending.delete(r);
        },
        () => {},
      );
      (waits ??= []).push(p);
    }
    if (!waits) return undefined;
    return waits.length === 1 ? waits[0] : Promise.all(waits).then(() => {});
  }

  markAll(): Promise<void> {
    this.bits.fill(0xff);
    this.lo = 0;
    this.hi = this.bits.length - 1;
    this.hot.clear();
    for (let r = 0; r < this.count; r++) this.hot.set(r, { seq: ++this.seq, cov: 0 });
    return this.commit();
  }

  /**
   * Clear a bit in memory; durable with the next commit(). Clearing is never urgent: a
   * bit that is still set on disk only costs a resync.
   */
  clear(r: number): void {
    this.hot.delete(r);
    if (!this.isMarked(r)) return;
    this.bits[r >> 3] &= ~(1 << (r & 7));
    this.touch(r);
    // A commit under way may still write the bit as set (harmless); a later mark()
    // sees the bit clear and commits again.
  }

  clearAll(): void {
    this.bits.fill(0);
    this.hot.clear();
    this.lo = 0;
    this.hi = this.bits.length - 1;
  }

  // ---- covering: what a remote flush made durable on the secondary ----

  /** Hot extents written since the last flush that covered them and not excluded by busy (in flight, dirty, being copied). */
  coverCandidates(busy: (r: number) => boolean): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    for (const [r, h] of this.hot) if (h.seq !== h.cov && !busy(r)) out.push([r, h.seq]);
    return out;
  }

  /** A remote FLUSH sent after coverCandidates() returned cands succeeded: they are durable there unless written since. */
  covered(cands: Array<[number, number]>): void {
    for (const [r, seq] of cands) {
      const h = this.hot.get(r);
      if (h && h.seq === seq) h.cov = seq;
    }
  }

  isCovered(r: number): boolean {
    const h = this.hot.get(r);
    return !h || h.seq === h.cov;
  }

  /** Hot extents that no remote flush covered since their last write: the secondary may lack them. */
  *uncovered(): Generator<number> {
    for (const [r, h] of this.hot) if (h.seq !== h.cov) yield r;
  }

  uncoveredCount(): number {
    let n = 0;
    for (const h of this.hot.values()) if (h.seq !== h.cov) n++;
    return n;
  }

  /**
   * Bring the hot set back under its bound: least recently used first, only extents that
   * are covered and that canLeave allows (not in flight, not dirty). Lazy: the cleared
   * bits are written by the next commit. Returns how many left.
   */
  evict(canLeave: (r: number) => boolean): number {
    let over = this.hot.size - this.hotLimit;
    let n = 0;
    if (over <= 0) return 0;
    for (const [r, h] of this.hot) {
      if (over <= 0) break;
      if (h.seq !== h.cov || this.pending.has(r) || !canLeave(r)) continue;
      this.clear(r);
      over--;
      n++;
    }
    return n;
  }

  /** Clean stop: every covered extent leaves the log (the secondary has it durably). Returns how many. */
  releaseCovered(canLeave: (r: number) => boolean): number {
    let n = 0;
    for (const [r, h] of [...this.hot]) {
      if (h.seq !== h.cov || this.pending.has(r) || !canLeave(r)) continue;
      this.clear(r);
      n++;
    }
    return n;
  }

  /** Least recently used first. */
  hotExtents(): number[] {
    return [...this.hot.keys()];
  }

  *marked(): Generator<number> {
    for (let i = 0; i < this.bits.length; i++) {
      const b = this.bits[i];
      if (!b) continue;
      for (let j = 0; j < 8; j++) if (b & (1 << j) && i * 8 + j < this.count) yield i * 8 + j;
    }
  }

  markedCount(): number {
    let n = 0;
    for (const _ of this.marked()) n++;
    return n;
  }

  /** Changes not yet written (cleared bits wait for the next commit). */
  get hasUnwritten(): boolean {
    return this.hi >= this.lo || this.headerDirty;
  }

  private touch(r: number): void {
    const byte = r >> 3;
    if (byte < this.lo) this.lo = byte;
    if (byte > this.hi) this.hi = byte;
  }

  /** Make every change so far durable; concurrent callers share one write + fdatasync. */
  commit(): Promise<void> {
    if (this.closed) return Promise.resolve();
    if (!this.inProgress) {
      this.inProgress = this.write().finally(() => (this.inProgress = undefined));
      return this.inProgress;
    }
    this.next ??= this.inProgress.then(
      () => {
        this.next = undefined;
        return this.commit();
      },
      () => {
        this.next = undefined;
        return this.commit();
      },
    );
    return this.next;
  }

  private async write(): Promise<void> {
    // Start at the end of this turn of the event loop: the writes that arrived together
    // (one socket read holds many requests) share this commit.
    await new Promise<void>((r) => setImmediate(r));
    const lo = this.lo;
    const hi = this.hi;
    const header = this.headerDirty ? this.header() : undefined;
    this.lo = Infinity;
    this.hi = -1;
    this.headerDirty = false;
    if (hi < lo && !header) return;
    const span = hi >= lo ? Buffer.from(this.bits.subarray(lo, hi + 1)) : undefined;
    try {
      await new Promise<void>((resolve, reject) => {
        const done = (err: Error | null) => (err ? reject(err) : resolve());
        const sync = () => fs.fdatasync(this.fd, done);
        const body = () => (span ? fs.write(this.fd, span, 0, span.length, HEADER + lo, (e) => (e ? reject(e) : sync())) : sync());
        if (header) fs.write(this.fd, header, 0, HEADER, 0, (e) => (e ? reject(e) : body()));
        else body();
      });
      this.syncs++;
    } catch (err) {
      // not durable: write the span again with the next commit
      if (hi >= lo) {
        this.touch(lo * 8);
        this.touch(hi * 8);
      }
      if (header) this.headerDirty = true;
      throw err;
    }
  }

  async close(): Promise<void> {
    await this.commit();
    await this.next;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}

/** Default bound of the hot set: 1 GiB worth of extents (SNAPBLOCK_REPL_HOT_BYTES). */
export function defaultHotLimit(regionSize: number): number {
  const bytes = Number(process.env.SNAPBLOCK_REPL_HOT_BYTES ?? 1024 * 1024 * 1024);
  return Math.max(16, Math.ceil(bytes / regionSize));
}
