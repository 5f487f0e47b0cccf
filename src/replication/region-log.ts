// The replication region log: one bit per region of a primary volume, persisted in
// <pool>/replication/<volume>.rlog. A set bit means "the secondary may differ here":
// it is made durable BEFORE a write to the region is issued (an activity log, like
// DRBD's), and cleared lazily once the region has been idle and the secondary flushed.
// After a crash or restart of either side every set bit is resynced. Concurrent marks
// share one pwrite + fdatasync (group commit).
import fs from 'node:fs';
import path from 'node:path';

const MAGIC = 'SBRLOG01';
const HEADER = 32;
/** header flags */
const INITIAL_DONE = 1;

export class RegionLog {
  private lo = Infinity;
  private hi = -1;
  private headerDirty = false;
  private inProgress?: Promise<void>;
  private next?: Promise<void>;
  private closed = false;
  /** regions set in memory whose commit is still under way */
  private readonly pending = new Map<number, Promise<void>>();

  private constructor(
    private readonly fd: number,
    readonly regionSize: number,
    readonly count: number,
    private readonly bits: Uint8Array,
    private flags: number,
  ) {}

  /** Open (or create) the log; a log of another geometry is replaced by an all-set one. */
  static open(file: string, size: number, regionSize: number): RegionLog {
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
    const count = Math.ceil(size / regionSize);
    const bytes = Math.ceil(count / 8);
    let bits: Uint8Array | undefined;
    let flags = 0;
    if (fs.existsSync(file)) {
      const buf = fs.readFileSync(file);
      if (buf.length >= HEADER && buf.toString('latin1', 0, 8) === MAGIC && buf.readUInt32LE(8) === regionSize && buf.readUInt32LE(12) === count && buf.length >= HEADER + bytes) {
        flags = buf.readUInt32LE(16);
        bits = new Uint8Array(buf.subarray(HEADER, HEADER + bytes));
      }
    }
    const fresh = !bits;
    if (!bits) {
      // Unknown state (new, or the volume was resized): everything may differ.
      bits = new Uint8Array(bytes).fill(0xff);
      flags = 0;
    }
    const fd = fs.openSync(file, fresh ? 'w+' : 'r+', 0o600);
    const log = new RegionLog(fd, regionSize, count, bits, flags);
    if (fresh) {
      fs.writeSync(fd, log.header());
      fs.writeSync(fd, bits, 0, bits.length, HEADER);
      fs.fdatasyncSync(fd);
    }
    return log;
  }

  private header(): Buffer {
    const h = Buffer.alloc(HEADER);
    h.write(MAGIC, 0, 'latin1');
    h.writeUInt32LE(this.regionSize, 8);
    h.writeUInt32LE(this.count, 12);
    h.writeUInt32LE(this.flags, 16);
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

  /** Set bits r0..r1 (inclusive); resolves when all are durable. undefined: they already are. */
  mark(r0: number, r1: number): Promise<void> | undefined {
    let changed = false;
    let waits: Promise<void>[] | undefined;
    for (let r = r0; r <= r1; r++) {
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
    return this.commit();
  }

  /** Clear bits in memory; durable with the next commit(). */
  clear(r: number): void {
    if (!this.isMarked(r)) return;
    this.bits[r >> 3] &= ~(1 << (r & 7));
    this.touch(r);
  }

  clearAll(): void {
    this.bits.fill(0);
    this.lo = 0;
    this.hi = this.bits.length - 1;
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
    this.next ??= this.inProgress.then(() => {
      this.next = undefined;
      return this.commit();
    });
    return this.next;
  }

  private async write(): Promise<void> {
    const lo = this.lo;
    const hi = this.hi;
    const header = this.headerDirty ? this.header() : undefined;
    this.lo = Infinity;
    this.hi = -1;
    this.headerDirty = false;
    if (hi < lo && !header) return;
    const span = hi >= lo ? Buffer.from(this.bits.subarray(lo, hi + 1)) : undefined;
    await new Promise<void>((resolve, reject) => {
      const done = (err: Error | null) => (err ? reject(err) : resolve());
      const sync = () => fs.fdatasync(this.fd, done);
      const body = () => (span ? fs.write(this.fd, span, 0, span.length, HEADER + lo, (e) => (e ? reject(e) : sync())) : sync());
      if (header) fs.write(this.fd, header, 0, HEADER, 0, (e) => (e ? reject(e) : body()));
      else body();
    });
  }

  async close(): Promise<void> {
    await this.commit();
    await this.next;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}
