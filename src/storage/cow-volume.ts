// Copy-on-write volume (SNIA "copy-on-write snapshot"). The live data stays in place
// in DIR/data, a plain sparse raw image (other NBD servers can serve the same file).
// A snapshot is a table block → reserve slot plus its own reserve file. The first
// write to a block after a snapshot copies the block's original content into the
// reserve of every snapshot still sharing it, makes those copies durable, and only
// then overwrites the block in place. A snapshot's view of block L is its reserve
// copy if it has one, else the live block (unchanged since the snapshot).
// A reserve that fills up invalidates its snapshot; the volume keeps working.
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import * as native from '../native/index.js';
import type { Extent } from '../block/layer.js';
import { fsyncDir } from '../pool/atomic-file.js';
import { writeCheckpoint } from './checkpoint.js';
import { Journal, Kind, type Rec } from './journal.js';
import { SnapshotError, mergeExtents, type PlacedRange, blocksToExtents, type ChangedExtent, type SnapshotInfo, type SnapshotTimer, type CloseOptions } from './volume.js';
import { GroupCommit, fileExtents, readAt } from './io.js';
import { ioBuffer } from '../block/io-buffers.js';
import { writeAt, writeAtMapped } from './inline-write.js';
import { JournaledVolume, createVolumeFiles, openJournalAndData, readVolumeCheckpoint, type VolumeMeta } from './journaled-volume.js';

/** table entry slot: the original block read as zeroes, so nothing was stored */
const HOLE = 0xffffffff;
const FORMAT_VERSION = 1;
const JOURNAL_LIMIT = 64 * 1024 * 1024;

interface Copy {
  slot: number;
  /** generation of the write that caused the copy: tells "changed before b" from "after b" */
  gen: number;
}

interface Snap {
  id: number;
  name: string;
  gen: number;
  size: number;
  created: string;
  status: 'valid' | 'invalid';
  table: Map<number, Copy>;
  fd?: number;
  /** reserve slots below the high-water mark that nothing references (after a crash) */
  free: number[];
  next: number;
  /** copies in flight into the reserve: the fd stays open until they finish */
  busy: number;
  dirty: boolean;
  released: boolean;
  /** reserve bytes its table references (kept up to date: snapshots() runs on every view read) */
  own: number;
}

interface Meta extends VolumeMeta {
  format: 'snapblock-cow';
  /** bytes of reserve per snapshot */
  reserve: number;
  snapshots: Array<{ id: number; name: string; gen: number; size: number; created: string; status: 'valid' | 'invalid' }>;
}

type MetaRecord =
  | { op: 'snapshot'; id: number; name: string; gen: number; size: number; created: string }
  | { op: 'delete-snapshot'; id: number }
  | { op: 'invalidate'; id: number; reason: string }
  | { op: 'resize'; size: number };

export interface CowOptions {
  log: Logger;
}

export class CowVolume extends JournaledVolume<Meta, Snap> {
  readonly mode = 'cow' as const;
  /** blocks whose original is being copied out: writers wait, then find nothing left to copy */
  private locks = new Map<number, Promise<void>>();
  /** snapshot reads currently reading live blocks: an overwrite waits for them */
  private liveReads = new Set<{ first: number; last: number; done: Promise<unknown> }>();
  private toRelease: Snap[] = [];
  private readonly zeros: Buffer;
  private readonly durable = new GroupCommit(() => this.durably(() => this.commitNow()));
  private closed = false;
  /** a write or trim of the data file since its last fdatasync */
  private dataDirty = false;
  /**
   * The reserve file of the next snapshot (id = meta.nextSnapId), created empty and its
   * directory entry made durable ahead of time, so a create needs no directory sync.
   */
  private spare?: Promise<number | undefined>;

  private constructor(dir: string, meta: Meta, journal: Journal, fd: number, private readonly opts: CowOptions) {
    super(dir, meta, journal, fd);
    this.zeros = Buffer.alloc(meta.blockSize);
  }

  private get slots(): number {
    return Math.floor(this.meta.reserve / this.meta.blockSize);
  }

  private reservePath(id: number): string {
    return path.join(this.dir, `snap-${id}.reserve`);
  }

  static create(dir: string, size: number, blockSize: number, reserve: number): void {
    if (!(reserve >= blockSize)) throw new Error(`a COW reserve of ${reserve} bytes holds not even one ${blockSize}-byte block`);
    const meta: Meta = { format: 'snapblock-cow', version: FORMAT_VERSION, epoch: 1, size, blockSize, reserve, gen: 1, nextSnapId: 1, snapshots: [] };
    createVolumeFiles(dir, { meta, arrays: { table: new Uint32Array(0) } }, size);
  }

  static async open(dir: string, opts: CowOptions): Promise<CowVolume> {
    const ck = readVolumeCheckpoint<Meta>(dir, 'snapblock-cow', 'copy-on-write', FORMAT_VERSION);
    const { journal, records, discarded, fd } = openJournalAndData(dir, ck.meta.epoch);
    const v = new CowVolume(dir, ck.meta, journal, fd, opts);
    v.snaps = ck.meta.snapshots.map((s) => newSnap(s));
    const t = ck.arrays.table;
    for (let i = 0; i < t.length; i += 4) v.setCopy(v.snapById(t[i]), t[i + 1], t[i + 2], t[i + 3]);
    for (const r of records) v.replay(r);
    // A resize whose record did not become durable is undone.
    if (fs.fstatSync(fd).size !== v.meta.size) fs.ftruncateSync(fd, v.meta.size);
    await v.openReserves();
    v.dataDirty = records.length > 0; // replayed volatile records may describe data only in the page cache
    if (records.length || discarded) await v.quiesce(() => v.checkpoint());
    v.prepareSpare();
    return v;
  }

  private setCopy(s: Snap, l: number, slot: number, gen: number): void {
    const prev = s.table.get(l);
    if (prev && prev.slot !== HOLE) s.own -= this.meta.blockSize;
    if (slot !== HOLE) s.own += this.meta.blockSize;
    s.table.set(l, { slot, gen });
  }

  private replay(r: Rec): void {
    if (r.k === Kind.COPY) {
      const s = this.snapById(r.a);
      if (s.status === 'valid') this.setCopy(s, r.b, r.c, r.d);
    } else if (r.k === Kind.META) this.applyMeta(r.json as MetaRecord);
  }

  private applyMeta(m: MetaRecord): void {
    if (m.op === 'snapshot') {
      this.snaps.push(newSnap({ ...m, status: 'valid' }));
      this.countSnapshot(m);
    } else if (m.op === 'delete-snapshot') {
      this.snaps = this.snaps.filter((s) => s.id !== m.id);
    } else if (m.op === 'invalidate') {
      const s = this.snapById(m.id);
      s.status = 'invalid';
      s.table.clear();
      s.own = 0;
    } else if (m.op === 'resize') {
      this.meta.size = m.size;
    }
  }

  /**
   * Open each valid snapshot's reserve and rebuild its slot allocator. Slots written but
   * never journaled (a crash before their commit) are unreferenced: cut or punch them so
   * they hold no stale data. Reserves of invalid or deleted snapshots are removed.
   */
  private async openReserves(): Promise<void> {
    const bs = this.meta.blockSize;
    const keep = new Set<string>();
    for (const s of this.snaps) {
      const file = this.reservePath(s.id);
      if (s.status !== 'valid') {
        s.released = true;
        continue;
      }
      keep.add(path.basename(file));
      if (!fs.existsSync(file)) continue; // check() reports it; reads of copied blocks fail
      s.fd = native.openFile(file, { direct: false, readOnly: false }).fd;
      const used = new Set<number>();
      s.next = 0;
      for (const c of s.table.values()) {
        if (c.slot === HOLE) continue;
        used.add(c.slot);
        s.next = Math.max(s.next, c.slot + 1);
      }
      for (let p = s.next - 1; p >= 0; p--) if (!used.has(p)) s.free.push(p);
      fs.ftruncateSync(s.fd, s.next * bs);
      for (const e of await native.extents(s.fd, 0, s.next * bs)) {
        if (!e.data) continue;
        for (let p = Math.floor(e.offset / bs); p * bs < e.offset + e.length; p++) if (!used.has(p)) await native.punchHole(s.fd, p * bs, bs);
      }
    }
    let removed = false;
    // The next snapshot's spare reserve stays if it is still empty.
    const spare = path.basename(this.reservePath(this.meta.nextSnapId));
    if (fs.existsSync(path.join(this.dir, spare)) && fs.statSync(path.join(this.dir, spare)).size === 0) keep.add(spare);
    for (const f of fs.readdirSync(this.dir)) {
      if (/^snap-\d+\.reserve$/.test(f) && !keep.has(f)) {
        fs.unlinkSync(path.join(this.dir, f));
        removed = true;
      }
    }
    if (removed) fsyncDir(this.dir);
  }

  /** Create (in the background) the empty reserve file the next snapshot will use, and make its name durable. */
  private prepareSpare(): void {
    const id = this.meta.nextSnapId;
    const file = this.reservePath(id);
    const p = (async () => {
      if (!fs.existsSync(file)) {
        await (await fs.promises.open(file, 'w', 0o600)).close();
      }
      const h = await fs.promises.open(this.dir, 'r');
      try {
        await h.sync();
      } finally {
        await h.close();
      }
      return id;
    })();
    this.spare = p.catch((err) => {
      this.opts.log.warn({ err, file }, 'could not prepare the next snapshot reserve; the create will make it');
      return undefined;
    });
  }

  // ---- copy-out ----

  /** Valid snapshots that still share block l with the live volume. */
  private sharers(l: number): Snap[] {
    const out: Snap[] = [];
    for (const s of this.snaps) if (s.status === 'valid' && l * this.meta.blockSize < s.size && !s.table.has(l)) out.push(s);
    return out;
  }

  /** Make sure the originals of blocks first..last are preserved (durably) in every snapshot sharing them. */
  private async preserve(first: number, last: number): Promise<void> {
    if (!this.snaps.some((s) => s.status === 'valid')) return;
    for (;;) {
      const waits: Promise<void>[] = [];
      if (this.locks.size) for (let l = first; l <= last; l++) {
        const w = this.locks.get(l);
        if (w) waits.push(w);
      }
      if (!waits.length) break;
      await Promise.all(waits);
    }
    // No await between the check above and taking the locks below.
    const jobs: Promise<void>[] = [];
    for (let l = first; l <= last; l++) {
      const sharers = this.sharers(l);
      if (sharers.length) jobs.push(this.copyOut(l, sharers));
    }
    await Promise.all(jobs);
  }

  private async copyOut(l: number, sharers: Snap[]): Promise<void> {
    let release!: () => void;
    this.locks.set(l, new Promise((r) => (release = r)));
    try {
      const bs = this.meta.blockSize;
      const orig = Buffer.alloc(Math.min(bs, this.meta.size - l * bs));
      await readAt(this.fd, orig, l * bs);
      const zero = orig.equals(this.zeros.subarray(0, orig.length));
      await Promise.all(sharers.map((s) => this.copyInto(s, l, orig, zero)));
      // The copies (and any invalidation) must be durable before the original can be overwritten.
      await this.durable.request();
      for (const r of this.liveReads) if (r.first <= l && l <= r.last) await r.done;
    } finally {
      this.locks.delete(l);
      release();
    }
  }

  private async copyInto(s: Snap, l: number, orig: Buffer, zero: boolean): Promise<void> {
    const gen = this.meta.gen;
    if (zero) {
      this.setCopy(s, l, HOLE, gen);
      this.journal.append(Kind.COPY, s.id, l, HOLE, gen);
      return;
    }
    if (s.fd === undefined) {
      this.invalidate(s, 'its reserve file is missing');
      return;
    }
    const slot = s.free.pop() ?? (s.next < this.slots ? s.next++ : undefined);
    if (slot === undefined) {
      this.invalidate(s, `its reserve of ${this.meta.reserve} bytes is full`);
      return;
    }
    s.busy++;
    try {
      await writeAt(s.fd, orig, slot * this.meta.blockSize);
      s.dirty = true;
    } finally {
      s.busy--;
      this.maybeClose(s);
    }
    if (s.status !== 'valid') return; // invalidated meanwhile: its reserve is going away
    this.setCopy(s, l, slot, gen); // data before pointer: the copy is written
    this.journal.append(Kind.COPY, s.id, l, slot, gen);
  }

  private invalidate(s: Snap, reason: string): void {
    if (s.status !== 'valid') return;
    s.status = 'invalid';
    s.table.clear();
    s.own = 0;
    this.journal.appendMeta({ op: 'invalidate', id: s.id, reason } satisfies MetaRecord);
    this.toRelease.push(s); // released once the invalidation is durable
    this.opts.log.error({ snapshot: s.name, mode: 'cow', reserve: this.meta.reserve }, `snapshot "${s.name}" invalidated: ${reason}`);
  }

  /** One durability step: reserve copies synced, then their records committed, then invalid reserves released. */
  private async commitNow(): Promise<void> {
    const mark = this.journal.seal();
    const release = this.toRelease;
    this.toRelease = [];
    const syncs: Promise<void>[] = [];
    for (const s of this.snaps) {
      if (s.fd !== undefined && s.dirty) {
        s.dirty = false;
        syncs.push(native.fdatasync(s.fd));
      }
    }
    await Promise.all(syncs);
    await this.journal.commit(mark);
    for (const s of release) this.releaseReserve(s);
  }

  private releaseReserve(s: Snap): void {
    s.released = true;
    fs.rmSync(this.reservePath(s.id), { force: true });
    fsyncDir(this.dir);
    this.maybeClose(s);
  }

  private maybeClose(s: Snap): void {
    if (s.released && s.busy === 0 && s.fd !== undefined) {
      native.closeFile(s.fd);
      s.fd = undefined;
    }
  }

  // ---- live writes ----

  protected async writeLive(offset: number, data: Buffer): Promise<void> {
    if (!data.length) return;
    const bs = this.meta.blockSize;
    await this.preserve(Math.floor(offset / bs), Math.floor((offset + data.length - 1) / bs));
    this.dataDirty = true;
    await writeAtMapped(this.map, this.fd, data, offset);
  }

  /** In place only where no snapshot shares a block of the range: nothing to copy out first. */
  protected override placeLive(offset: number, length: number): PlacedRange | undefined {
    const shared = (l: number) => this.locks.has(l) || this.sharers(l).length > 0;
    if (this.snaps.some((s) => s.status === 'valid') && !this.everyBlock(offset, length, (l) => !shared(l))) return undefined;
    const range = this.map.place([{ at: offset, len: length }]);
    if (range) this.dataDirty = true;
    return range;
  }

  protected async trimLive(offset: number, length: number): Promise<void> {
    if (!length) return;
    const bs = this.meta.blockSize;
    await this.preserve(Math.floor(offset / bs), Math.floor((offset + length - 1) / bs));
    this.dataDirty = true;
    await native.punchHole(this.fd, offset, length);
  }

  // ---- reads and extents ----

  async readView(snapshot: string | undefined, offset: number, length: number): Promise<Buffer> {
    const out = ioBuffer(length);
    if (length === 0) return out;
    const snap = snapshot === undefined ? undefined : this.snapByName(snapshot);
    if (!snap) {
      await readAt(this.fd, out, offset);
      return out;
    }
    const bs = this.meta.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    const jobs: Promise<void>[] = [];
    let runStart = -1; // a run of blocks read from the live file, contiguous in both
    const flushRun = (upTo: number) => {
      if (runStart >= 0) jobs.push(readAt(this.fd, out.subarray(runStart - offset, upTo - offset), runStart));
      runStart = -1;
    };
    for (let l = first; l <= last; l++) {
      const s = Math.max(offset, l * bs);
      const e = Math.min(offset + length, (l + 1) * bs);
      const c = snap.table.get(l);
      if (!c) {
        if (runStart < 0) runStart = s;
        continue;
      }
      flushRun(s);
      const dst = out.subarray(s - offset, e - offset);
      if (c.slot === HOLE) dst.fill(0);
      else if (snap.fd === undefined) throw new SnapshotError('EINVAL', `snapshot "${snap.name}" has lost its reserve`);
      else jobs.push(readAt(snap.fd, dst, c.slot * bs + (s - l * bs)));
    }
    flushRun(offset + length);
    const done = Promise.allSettled(jobs);
    const entry = { first, last, done };
    this.liveReads.add(entry);
    try {
      await Promise.all(jobs);
    } finally {
      await done;
      this.liveReads.delete(entry);
    }
    return out;
  }

  async extentsView(snapshot: string | undefined, offset: number, length: number): Promise<Extent[]> {
    const live = await fileExtents(this.fd, offset, length);
    const snap = snapshot === undefined ? undefined : this.snapByName(snapshot);
    if (!snap || snap.table.size === 0) return live;
    const bs = this.meta.blockSize;
    const end = offset + length;
    const first = Math.floor(offset / bs);
    const last = Math.floor((end - 1) / bs);
    let blocks: number[];
    if (last - first + 1 <= snap.table.size) {
      blocks = [];
      for (let l = first; l <= last; l++) if (snap.table.has(l)) blocks.push(l);
    } else blocks = [...snap.table.keys()].filter((l) => l >= first && l <= last).sort((a, b) => a - b);
    const over = blocks.map((l) => ({ start: Math.max(offset, l * bs), end: Math.min(end, (l + 1) * bs), hole: snap.table.get(l)!.slot === HOLE }));
    return overlay(live, over);
  }

  // ---- durability ----

  /** fdatasync the data file unless nothing touched it since the last time */
  private async syncData(): Promise<void> {
    if (!this.dataDirty) return;
    this.dataDirty = false;
    await this.durably(() => native.fdatasync(this.fd));
  }

  async flush(): Promise<void> {
    await this.syncData();
    await this.durable.request();
    if (this.journal.size > JOURNAL_LIMIT) await this.quiesce(() => this.checkpoint());
  }

  /** With writes drained: write the whole state as a new checkpoint, then start a new journal epoch. */
  private async checkpoint(): Promise<void> {
    await this.syncData();
    await this.durable.request();
    const table: number[] = [];
    for (const s of this.snaps) for (const [l, c] of s.table) table.push(s.id, l, c.slot, c.gen);
    const epoch = this.meta.epoch + 1;
    const meta: Meta = {
      ...this.meta,
      epoch,
      snapshots: this.snaps.map((s) => ({ id: s.id, name: s.name, gen: s.gen, size: s.size, created: s.created, status: s.status })),
    };
    writeCheckpoint(path.join(this.dir, 'checkpoint'), { meta, arrays: { table: Uint32Array.from(table) } });
    this.meta = meta;
    await this.journal.reset(epoch);
  }

  // ---- snapshots ----

  snapshots(): SnapshotInfo[] {
    return this.snaps.map((s) => ({ name: s.name, created: s.created, size: s.size, status: s.status, ownBytes: s.own }));
  }

  protected async snapshotNow(name: string, timer: SnapshotTimer): Promise<void> {
    const id = this.meta.nextSnapId;
    // The reserve exists (durably named) before the record naming it; a crash in between
    // leaves an empty file that open keeps as the spare or removes.
    const file = this.reservePath(id);
    if ((await timer.step('spareReserve', () => this.spare)) !== id || !fs.existsSync(file)) {
      await timer.step('createReserve', () => {
        fs.closeSync(fs.openSync(file, 'w', 0o600));
        fsyncDir(this.dir);
      });
    }
    const rec: MetaRecord = { op: 'snapshot', id, name, gen: this.meta.gen, size: this.meta.size, created: new Date().toISOString() };
    this.journal.appendMeta(rec);
    this.applyMeta(rec);
    this.snapById(id).fd = native.openFile(file, { direct: false, readOnly: false }).fd;
    // Every write completed before the snapshot must be durable: the snapshot reads it in place.
    await timer.step('fdatasyncData', () => this.syncData());
    await timer.step('journalCommit', () => this.durable.request());
    this.prepareSpare();
    this.opts.log.info({ snapshot: name, mode: 'cow', gen: rec.gen, reserve: this.meta.reserve, ...timer.fields() }, 'snapshot created');
  }

  protected async deleteSnapshotNow(name: string): Promise<void> {
    const s = this.snapByName(name);
    this.journal.appendMeta({ op: 'delete-snapshot', id: s.id } satisfies MetaRecord);
    this.snaps.splice(this.snaps.indexOf(s), 1);
    await this.durable.request();
    this.releaseReserve(s);
    this.opts.log.info({ snapshot: name, mode: 'cow' }, 'snapshot deleted');
  }

  async changedBlocks(from: string, to: string | undefined): Promise<ChangedExtent[]> {
    const a = this.snapByName(from);
    const b = to === undefined ? undefined : this.snapByName(to);
    // The older point's table lists every block written after it, with the generation of
    // the first such write; a block changed before the newer point iff that came first.
    const older = b && b.gen < a.gen ? b : a;
    const newer = older === a ? b : a;
    if (older.status !== 'valid') throw new SnapshotError('EINVAL', `snapshot "${older.name}" is invalid: its changes are unknown`);
    const limit = newer ? newer.gen : Infinity;
    const changed: number[] = [];
    for (const [l, c] of older.table) if (c.gen <= limit) changed.push(l);
    const size = Math.min(a.size, b ? b.size : this.meta.size);
    const bigger = Math.max(a.size, b ? b.size : this.meta.size);
    const out = blocksToExtents(changed, this.meta.blockSize, size);
    if (bigger > size) out.push({ offset: size, length: bigger - size });
    return out;
  }

  /** The snapshot's table lists every block written after it. */
  protected changedSince(from: string, _first: number, _last: number): (l: number) => boolean {
    const table = this.snapByName(from).table;
    return (l) => table.has(l);
  }

  async resize(size: number): Promise<void> {
    if (size < this.meta.size && this.snaps.length) throw new SnapshotError('EBUSY', 'shrinking a volume that has snapshots is not supported: delete its snapshots first');
    await this.quiesce(async () => {
      const rec: MetaRecord = { op: 'resize', size };
      // Growing: extend first, so the record never names space the file lacks. Shrinking: record first.
      if (size > this.meta.size) fs.ftruncateSync(this.fd, size);
      this.journal.appendMeta(rec);
      await native.fdatasync(this.fd);
      await this.durable.request();
      this.applyMeta(rec);
      if (fs.fstatSync(this.fd).size > size) await this.map.exclusive(() => fs.ftruncateSync(this.fd, size));
    });
  }

  // ---- invariants ----

  async check(): Promise<string[]> {
    const problems: string[] = [];
    const bs = this.meta.blockSize;
    if (fs.fstatSync(this.fd).size !== this.meta.size) problems.push(`data file is ${fs.fstatSync(this.fd).size} bytes but the volume is ${this.meta.size}`);
    let prevGen = 0;
    for (const s of this.snaps) {
      const where = `snapshot "${s.name}"`;
      if (s.gen <= prevGen) problems.push(`${where} generation ${s.gen} is not after the previous one`);
      prevGen = s.gen;
      const exists = fs.existsSync(this.reservePath(s.id));
      if (s.status === 'invalid') {
        if (s.table.size) problems.push(`${where} is invalid but still has ${s.table.size} table entries`);
        if (exists && !this.toRelease.includes(s)) problems.push(`${where} is invalid but its reserve file was not released`);
        continue;
      }
      if (!exists) problems.push(`${where} reserve file ${path.basename(this.reservePath(s.id))} is missing`);
      const owner = new Map<number, number>();
      for (const [l, c] of s.table) {
        if (l * bs >= s.size) problems.push(`${where} block ${l} lies past the snapshot's size`);
        if (c.gen <= s.gen || c.gen > this.meta.gen) problems.push(`${where} block ${l} copied in generation ${c.gen}, outside (${s.gen}, ${this.meta.gen}]`);
        if (c.slot === HOLE) continue;
        if (c.slot >= this.slots) problems.push(`${where} block ${l} points outside the reserve (slot ${c.slot} of ${this.slots})`);
        const prev = owner.get(c.slot);
        if (prev !== undefined) problems.push(`${where} reserve slot ${c.slot} is shared by blocks ${prev} and ${l}`);
        owner.set(c.slot, l);
      }
      if (s.fd === undefined) continue;
      const fileSize = fs.fstatSync(s.fd).size;
      for (const slot of owner.keys()) if (slot * bs >= fileSize) problems.push(`${where} reserve slot ${slot} lies past the reserve file's end`);
      for (const e of await native.extents(s.fd, 0, Number.MAX_SAFE_INTEGER)) {
        if (!e.data) continue;
        for (let p = Math.floor(e.offset / bs); p * bs < e.offset + e.length; p++) if (!owner.has(p)) problems.push(`${where} reserve slot ${p} holds data but no table entry references it (leak)`);
      }
    }
    const known = new Set(this.snaps.map((s) => path.basename(this.reservePath(s.id))));
    const spare = path.basename(this.reservePath(this.meta.nextSnapId));
    for (const f of fs.readdirSync(this.dir)) {
      if (!/^snap-\d+\.reserve$/.test(f) || known.has(f)) continue;
      if (f === spare && fs.statSync(path.join(this.dir, f)).size === 0) continue; // the next snapshot's spare
      problems.push(`reserve file ${f} belongs to no snapshot`);
    }
    return problems;
  }

  allocatedBytes(): number {
    let n = fs.fstatSync(this.fd).blocks * 512;
    for (const s of this.snaps) if (s.fd !== undefined && !s.released) n += fs.fstatSync(s.fd).blocks * 512;
    return n;
  }

  async close(opts: CloseOptions = {}): Promise<void> {
    if (this.closed) return;
    try {
      await this.spare;
      if (!opts.discard) await this.quiesce(() => this.checkpoint());
    } finally {
      this.closed = true;
      this.journal.close();
      for (const s of this.snaps) {
        s.released = true;
        this.maybeClose(s);
      }
      this.map.close();
      native.closeFile(this.fd);
    }
  }
}

function newSnap(s: { id: number; name: string; gen: number; size: number; created: string; status: 'valid' | 'invalid' }): Snap {
  return { id: s.id, name: s.name, gen: s.gen, size: s.size, created: s.created, status: s.status, table: new Map(), free: [], next: 0, busy: 0, dirty: false, released: false, own: 0 };
}

/** Serialises durability steps; callers arriving while one is queued (not started) share it. */
function overlay(base: Extent[], ranges: Array<{ start: number; end: number; hole: boolean }>): Extent[] {
  const out: Extent[] = [];
  let ri = 0;
  for (const e of base) {
    const end = e.offset + e.length;
    let at = e.offset;
    while (at < end) {
      while (ri < ranges.length && ranges[ri].end <= at) ri++;
      const r = ranges[ri];
      if (r && r.start <= at) {
        const stop = Math.min(end, r.end);
        out.push({ offset: at, length: stop - at, hole: r.hole, zero: r.hole });
        at = stop;
      } else {
        const stop = r ? Math.min(end, r.start) : end;
        out.push({ offset: at, length: stop - at, hole: e.hole, zero: e.zero });
        at = stop;
      }
    }
  }
  return mergeExtents(out);
}
