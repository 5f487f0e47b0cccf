// Redirect-on-write volume. A pointer table maps each logical block to a physical
// block of the data file, with the generation it was written in. A snapshot is O(1):
// it records the current generation. The first write to a block shared with the
// newest snapshot goes to a newly allocated block; the old pointer moves into that
// snapshot's delta. A snapshot's view of block L is the first entry found in its own
// delta, then newer snapshots' deltas, then the live table — unless that entry was
// born after the snapshot, in which case the block did not exist yet for it.
// Every physical block has exactly one owner: the live table or one delta.
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import * as native from '../native/index.js';
import type { BlockLayer, Extent, MappedRange } from '../block/layer.js';
import { writeCheckpoint, type CheckpointReader, type ChunkedArray } from './checkpoint.js';
import { Journal, Kind, type Rec } from './journal.js';
import { SnapshotError, mergeExtents, blocksToExtents, type PlacedRange, type ChangedExtent, type SnapshotInfo, type SnapshotTimer, type CloseOptions } from './volume.js';
import { DiskRuns, readAt, readRuns, writeRuns } from './io.js';
import { PointerTable, PAGE_ENTRIES } from './row-table.js';
import { ioBuffer } from '../block/io-buffers.js';
import { writeAt } from './inline-write.js';
import { DeltaMap } from './delta-map.js';
import { JournaledVolume, createVolumeFiles, openJournalAndData, openVolumeCheckpoint, type VolumeMeta } from './journaled-volume.js';

const UNALLOCATED = 0;
/** deallocated on purpose: reads zero even where a base (clone parent) has data */
const ZERO = 0xffffffff;
/**
 * 3: the pointer table is checkpointed sparsely, dense pages plus (block, pointer, birth)
 * triples (row-table.ts), so a checkpoint follows the blocks mapped; 2 (every touched page
 * whole) and 1 (flat arrays) are read and upgraded
 */
const FORMAT_VERSION = 3;
/** block indexes and physical pointers + 1 are u32 in the journal; 0xFFFFFFFF is the ZERO marker */
const MAX_BLOCKS = 0xfffffffe;
/** checkpoint and restart the journal once it grows past this */
const JOURNAL_LIMIT = 64 * 1024 * 1024;

interface Snap {
  id: number;
  name: string;
  gen: number;
  size: number;
  created: string;
  delta: DeltaMap;
}

interface Meta extends VolumeMeta {
  format: 'snapblock-row';
  nextPhysical: number;
  /** formats 2 and 3: entries per pointer-table page */
  tablePage?: number;
  snapshots: Array<{ id: number; name: string; gen: number; size: number; created: string }>;
}

type MetaRecord =
  | { op: 'snapshot'; id: number; name: string; gen: number; size: number; created: string }
  | { op: 'delete-snapshot'; id: number }
  | { op: 'resize'; size: number };

export interface RowOptions {
  log: Logger;
  /** clones: where unallocated blocks are read from */
  base?: BlockLayer;
}

export class RowVolume extends JournaledVolume<Meta, Snap> {
  readonly mode = 'row' as const;
  private table: PointerTable;
  /** a data write was issued since the last fdatasync of the data file */
  private dataDirty = false;
  private free: number[] = [];
  /** freed blocks whose release is not durable yet: never reused before it is */
  private pendingFree: number[] = [];
  /** released durably, being punched in the background; reusable once punched */
  private scrubbing = new Set<number>();
  private punching: Promise<void> = Promise.resolve();
  private locks = new Map<number, Promise<void>>();
  private closed = false;

  private constructor(dir: string, meta: Meta, table: PointerTable, journal: Journal, fd: number, private readonly opts: RowOptions) {
    super(dir, meta, journal, fd);
    this.table = table;
  }

  private get nblocks(): number {
    return Math.ceil(this.meta.size / this.meta.blockSize);
  }

  static create(dir: string, size: number, blockSize: number): void {
    checkBlockCount(size, blockSize);
    const meta: Meta = { format: 'snapblock-row', version: FORMAT_VERSION, epoch: 1, size, blockSize, gen: 1, nextPhysical: 0, nextSnapId: 1, tablePage: PAGE_ENTRIES, snapshots: [] };
    const empty = new PointerTable(Math.ceil(size / blockSize)).checkpointArrays();
    createVolumeFiles(dir, { meta, arrays: { ...empty, delta: new Uint32Array(0) } }, 0);
  }

  static async open(dir: string, opts: RowOptions): Promise<RowVolume> {
    // The checkpoint is read piece by piece (it can exceed what one read returns) and checked
    // whole before the journal is opened: a corrupt checkpoint changes nothing on disk.
    const ck = openVolumeCheckpoint<Meta>(dir, 'snapblock-row', 'redirect-on-write', FORMAT_VERSION);
    const m = ck.meta;
    let table: PointerTable;
    let snaps: Snap[];
    try {
      table = readTable(dir, m, ck);
      snaps = RowVolume.readSnapshots(m, ck);
      ck.end();
    } finally {
      ck.close();
    }
    const { journal, records, discarded, fd } = openJournalAndData(dir, m.epoch);
    const v = new RowVolume(dir, m, table, journal, fd, opts);
    v.snaps = snaps;
    for (const r of records) v.replay(r);
    // Replayed volatile records may describe data still only in the page cache: sync it before the checkpoint.
    v.dataDirty = records.length > 0;
    await v.rebuildFreeList();
    // Replayed or discarded records, or an older format's checkpoint: write the state in the current format.
    if (records.length || discarded || m.version !== FORMAT_VERSION) {
      if (m.version !== FORMAT_VERSION) opts.log.info({ dir, from: m.version, to: FORMAT_VERSION }, 'upgrading redirect-on-write volume format');
      await v.checkpoint();
    }
    return v;
  }

  /** The snapshots the checkpoint lists, with their deltas: array `delta` of (snapshot id, block, pointer, birth) quads. */
  private static readSnapshots(meta: Meta, r: CheckpointReader<Meta>): Snap[] {
    const snaps = meta.snapshots.map((s) => ({ ...s, delta: new DeltaMap() }));
    const byId = new Map(snaps.map((s) => [s.id, s]));
    r.begin('delta');
    r.takeRecords(4, (c) => {
      for (let k = 0; k < c.length; k += 4) {
        const s = byId.get(c[k]);
        if (!s) throw new Error(`checkpoint delta names unknown snapshot id ${c[k]}`);
        s.delta.put(c[k + 1], c[k + 2], c[k + 3]);
      }
    });
    return snaps;
  }

  /** The deltas as checkpoint array `delta`, produced while the file is written. */
  private deltaArray(): ChunkedArray {
    const snaps = this.snaps;
    return { length: 4 * snaps.reduce((k, s) => k + s.delta.size, 0), chunks: () => deltaChunks(snaps) };
  }

  private replay(r: Rec): void {
    switch (r.k) {
      case Kind.MAP:
        this.table.set(r.a, r.b, r.c);
        if (r.b !== UNALLOCATED && r.b !== ZERO) this.meta.nextPhysical = Math.max(this.meta.nextPhysical, r.b);
        break;
      case Kind.DELTA:
        this.snapById(r.a).delta.set(r.b, { p: r.c, birth: r.d });
        break;
      case Kind.UNDELTA:
        this.snapById(r.a).delta.delete(r.b);
        break;
      case Kind.FREE:
        break; // the free list is rebuilt from what nothing references
      case Kind.META:
        this.applyMeta(r.json as MetaRecord);
        break;
    }
  }

  private applyMeta(m: MetaRecord): void {
    if (m.op === 'snapshot') {
      this.snaps.push({ id: m.id, name: m.name, gen: m.gen, size: m.size, created: m.created, delta: new DeltaMap() });
      this.countSnapshot(m);
    } else if (m.op === 'delete-snapshot') {
      this.snaps = this.snaps.filter((s) => s.id !== m.id);
    } else if (m.op === 'resize') {
      this.growTables(m.size);
      this.meta.size = m.size;
    }
  }

  private growTables(size: number): void {
    this.table.grow(Math.ceil(size / this.meta.blockSize));
  }

  /** Every physical block below the high-water mark that nothing owns is free; make sure it holds no old data. */
  private async rebuildFreeList(): Promise<void> {
    const used = new Uint8Array(this.meta.nextPhysical);
    this.forEachOwner((p) => (used[p - 1] = 1));
    this.free = [];
    for (let p = this.meta.nextPhysical - 1; p >= 0; p--) if (!used[p]) this.free.push(p);
    // Blocks written but never journaled (a crash before their flush) lie past the high-water mark.
    const bs = this.meta.blockSize;
    fs.ftruncateSync(this.fd, this.meta.nextPhysical * bs);
    // Blocks freed just before a crash may still hold data: punch them before reuse.
    const data = await native.extents(this.fd, 0, this.meta.nextPhysical * bs);
    const scrub: number[] = [];
    for (const e of data) {
      if (!e.data) continue;
      for (let p = Math.floor(e.offset / bs); p * bs < e.offset + e.length; p++) {
        if (p < this.meta.nextPhysical && !used[p]) scrub.push(p);
      }
    }
    await this.punch(scrub);
  }

  /** Punch physical blocks (so they read as zeroes), contiguous ones as one range. */
  private async punch(blocks: number[], parallel = 16): Promise<void> {
    if (!blocks.length) return;
    const bs = this.meta.blockSize;
    const sorted = Uint32Array.from(blocks).sort();
    const jobs: Promise<void>[] = [];
    for (let i = 0; i < sorted.length; ) {
      let j = i + 1;
      while (j < sorted.length && sorted[j] === sorted[j - 1] + 1) j++;
      jobs.push(native.punchHole(this.fd, sorted[i] * bs, (j - i) * bs));
      i = j;
      if (jobs.length >= parallel) await Promise.all(jobs.splice(0));
    }
    await Promise.all(jobs);
  }

  /** Calls fn for every owned physical pointer (physical + 1): the live table's (snap undefined) and each delta's. */
  private forEachOwner(fn: (p: number, l: number, snap?: Snap) => void): void {
    this.table.forEachEntry((l, p) => {
      if (p !== UNALLOCATED && p !== ZERO) fn(p, l);
    });
    for (const s of this.snaps) s.delta.forEach((l, p) => fn(p, l, s));
  }

  private allocate(): number {
    const p = this.free.pop();
    if (p !== undefined) return p;
    if (this.meta.nextPhysical >= MAX_BLOCKS) throw new SnapshotError('EINVAL', `no space: the data file holds the maximum of ${MAX_BLOCKS} blocks`);
    return this.meta.nextPhysical++;
  }

  private newest(): Snap | undefined {
    return this.snaps[this.snaps.length - 1];
  }

  /**
   * A redirect in progress on some block of the range, if any. Callers loop
   * `for (let w = this.busy(a, b); w; w = this.busy(a, b)) await w;` and then decide on
   * pointers with no await in between: the final check and the decision happen in one
   * synchronous run of the JS thread, so no other request can slip between them.
   */
  private busy(first: number, last: number): Promise<void> | undefined {
    if (this.locks.size === 0) return undefined;
    for (let l = first; l <= last; l++) {
      const w = this.locks.get(l);
      if (w) return w;
    }
    return undefined;
  }

  // ---- live writes ----

  protected async writeLive(offset: number, data: Buffer): Promise<void> {
    const bs = this.meta.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + data.length - 1) / bs);
    for (let w = this.busy(first, last); w; w = this.busy(first, last)) await w;
    this.dataDirty = true;
    const newest = this.newest();
    const inPlace = new DiskRuns();
    const redirects: Promise<void>[] = [];
    for (let l = first; l <= last; l++) {
      const bo = l === first ? offset - l * bs : 0;
      const start = l * bs + bo - offset;
      const n = Math.min(bs - bo, data.length - start);
      const cur = this.table.ptr(l);
      const shared = newest !== undefined && this.table.birth(l) <= newest.gen;
      if (cur !== UNALLOCATED && cur !== ZERO && !shared) {
        inPlace.add((cur - 1) * bs + bo, start, n);
      } else if (cur === ZERO || (cur === UNALLOCATED && !this.opts.base)) {
        // A fresh or punched block reads as zeroes outside what we write.
        // Recorded at once: until the data lands the block reads as zeroes, which is what
        // it held before, so the record is safe early, and a concurrent in-place write to the
        // same block that is flushed first is covered by it.
        const p = this.allocate();
        this.table.set(l, p + 1, this.meta.gen);
        this.journal.append(Kind.MAP, l, p + 1, this.meta.gen);
        inPlace.add(p * bs + bo, start, n);
      } else {
        redirects.push(this.redirect(l, bo, data.subarray(start, start + n), newest));
      }
    }
    await Promise.all([writeRuns(this.fd, inPlace.pieces(data)), ...redirects]);
  }

  /**
   * In place only where every block of the range is already this volume's own: allocated,
   * born after the newest snapshot, no redirect running. (A block released meanwhile by a
   * trim is not reused while the placed views are pinned, as for mapped reads.)
   */
  protected override placeLive(offset: number, length: number): PlacedRange | undefined {
    const newest = this.newest();
    if (newest !== undefined && !this.everyBlock(offset, length, (l) => this.table.birth(l) > newest.gen)) return undefined;
    const pieces = this.livePieces(offset, length);
    // a hole (unallocated or punched block) would need a block allocated first
    if (!pieces || pieces.some((p) => typeof p === 'number')) return undefined;
    const range = this.map.place(pieces as Array<{ at: number; len: number }>);
    if (range) this.dataDirty = true;
    return range;
  }

  /** Copy-merge a block into a newly allocated one: shared with a snapshot, or a clone block still in its base. */
  private async redirect(l: number, bo: number, slice: Buffer, newest: Snap | undefined): Promise<void> {
    const bs = this.meta.blockSize;
    const old = this.table.ptr(l);
    const oldBirth = this.table.birth(l);
    const p = this.allocate();
    this.table.set(l, p + 1, this.meta.gen);
    let release!: () => void;
    this.locks.set(l, new Promise((r) => (release = r)));
    try {
      const len = Math.min(bs, this.meta.size - l * bs);
      let block: Buffer;
      if (slice.length === len) block = slice;
      else {
        block = Buffer.alloc(len);
        if (old !== UNALLOCATED && old !== ZERO) await native.pread(this.fd, block, (old - 1) * bs);
        else if (old === UNALLOCATED && this.opts.base) (await this.opts.base.read(l * bs, len)).copy(block);
        slice.copy(block, bo);
      }
      await writeAt(this.fd, block, p * bs);
      this.journal.append(Kind.MAP, l, p + 1, this.meta.gen);
      if (old !== UNALLOCATED && old !== ZERO) {
        // The old block now belongs to the newest snapshot (the only one that can be sharing it).
        if (newest && oldBirth <= newest.gen && !newest.delta.has(l)) {
          newest.delta.set(l, { p: old, birth: oldBirth });
          this.journal.append(Kind.DELTA, newest.id, l, old, oldBirth);
        } else this.release(old);
      }
    } finally {
      this.locks.delete(l);
      release();
    }
  }

  private release(p1: number): void {
    // No FREE record: replay rebuilds the free list from what nothing owns, so the record that
    // drops the owner (MAP, UNDELTA, a snapshot delete) is the release. A snapshot delete on a
    // full filesystem then journals only what it keeps, not a record per freed block.
    this.pendingFree.push(p1 - 1);
  }

  protected async trimLive(offset: number, length: number): Promise<void> {
    const bs = this.meta.blockSize;
    const end = offset + length;
    const first = Math.ceil(offset / bs);
    const lastFull = Math.floor(end / bs) - 1;
    // Partial blocks at the edges are zeroed by writing.
    const headEnd = Math.min(end, first * bs);
    if (headEnd > offset) await this.zeroPartial(offset, headEnd - offset);
    const tailStart = Math.max(offset, (lastFull + 1) * bs);
    if (end > tailStart && tailStart >= headEnd) await this.zeroPartial(tailStart, end - tailStart);
    if (lastFull < first) return;
    for (let w = this.busy(first, lastFull); w; w = this.busy(first, lastFull)) await w;
    const newest = this.newest();
    const marker = this.opts.base ? ZERO : UNALLOCATED;
    for (let l = first; l <= lastFull; l++) {
      const cur = this.table.ptr(l);
      if (cur === marker) continue;
      if (cur !== UNALLOCATED && cur !== ZERO) {
        const birth = this.table.birth(l);
        if (newest && birth <= newest.gen && !newest.delta.has(l)) {
          newest.delta.set(l, { p: cur, birth });
          this.journal.append(Kind.DELTA, newest.id, l, cur, birth);
        } else this.release(cur);
      }
      this.table.set(l, marker, this.meta.gen);
      this.journal.append(Kind.MAP, l, marker, this.meta.gen);
    }
  }

  private async zeroPartial(offset: number, length: number): Promise<void> {
    const l = Math.floor(offset / this.meta.blockSize);
    const cur = this.table.ptr(l);
    if (cur === UNALLOCATED && !this.opts.base) return; // already reads as zeroes
    if (cur === ZERO) return;
    await this.writeLive(offset, Buffer.alloc(length));
  }

  // ---- reads and extents, live or of a snapshot ----

  /**
   * The pointer a view sees for block l (UNALLOCATED: falls through to the base or zeroes).
   * `deltas`: the deltas that may hold l, oldest first, from the view's snapshot on (deltasNear).
   */
  private resolve(snap: Snap | undefined, l: number, deltas: DeltaMap[]): number {
    if (!snap) return this.table.ptr(l);
    for (const d of deltas) {
      const k = d.slotOf(l);
      if (k >= 0) return d.birthAt(k) <= snap.gen ? d.ptrAt(k) : UNALLOCATED;
    }
    return this.table.birth(l) <= snap.gen ? this.table.ptr(l) : UNALLOCATED;
  }

  /** The deltas of `snap` and every newer snapshot that may hold a block in [first, last], oldest first. */
  private deltasNear(snap: Snap, first: number, last: number): DeltaMap[] {
    const out: DeltaMap[] = [];
    for (let i = this.snaps.indexOf(snap); i < this.snaps.length; i++) if (this.snaps[i].delta.mayHoldAny(first, last)) out.push(this.snaps[i].delta);
    return out;
  }

  /**
   * Live reads of allocated blocks. A mapped block changes only by a write to its own logical
   * block: a released block is punched and reused only once every view pinned before its
   * release is released (flushOnce).
   */
  override readMapped(offset: number, length: number): MappedRange | undefined {
    const pieces = this.livePieces(offset, length);
    return pieces && this.map.view(pieces);
  }

  /**
   * The live range as data-file runs, contiguous blocks merged, and holes (unallocated or
   * punched blocks) as their lengths; undefined while a redirect runs on some block, or where
   * a block is still in a clone's base.
   */
  private livePieces(offset: number, length: number): Array<{ at: number; len: number } | number> | undefined {
    const bs = this.meta.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    if (length === 0 || this.busy(first, last)) return undefined;
    const pieces: Array<{ at: number; len: number } | number> = [];
    for (let l = first; l <= last; l++) {
      const p = this.table.ptr(l);
      if (p === UNALLOCATED && this.opts.base) return undefined; // still in the clone's base: read()
      const bo = l === first ? offset - l * bs : 0;
      const n = Math.min(bs - bo, offset + length - (l * bs + bo));
      const run = pieces[pieces.length - 1];
      if (p === UNALLOCATED || p === ZERO) {
        if (typeof run === 'number') pieces[pieces.length - 1] = run + n;
        else pieces.push(n);
        continue;
      }
      const at = (p - 1) * bs + bo;
      if (run !== undefined && typeof run !== 'number' && run.at + run.len === at) run.len += n;
      else pieces.push({ at, len: n });
    }
    return pieces;
  }

  async readView(snapshot: string | undefined, offset: number, length: number): Promise<Buffer> {
    const snap = snapshot === undefined ? undefined : this.snapByName(snapshot);
    const bs = this.meta.blockSize;
    const out = ioBuffer(length);
    if (length === 0) return out;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    const deltas = snap ? this.deltasNear(snap, first, last) : []; // once per read, not once per block
    for (let w = this.busy(first, last); w; w = this.busy(first, last)) await w;
    if (first === last) {
      // One block (every small random read): no run bookkeeping.
      const p = this.resolve(snap, first, deltas);
      if (p !== UNALLOCATED && p !== ZERO) await readAt(this.fd, out, (p - 1) * bs + offset - first * bs);
      else if (p === UNALLOCATED && this.opts.base && offset < this.opts.base.size) (await this.opts.base.read(offset, length)).copy(out);
      else out.fill(0);
      return out;
    }
    const runs = new DiskRuns();
    const baseReads: Promise<void>[] = [];
    for (let l = first; l <= last; l++) {
      const bo = l === first ? offset - l * bs : 0;
      const start = l * bs + bo - offset;
      const n = Math.min(bs - bo, length - start);
      const p = this.resolve(snap, l, deltas);
      if (p !== UNALLOCATED && p !== ZERO) {
        runs.add((p - 1) * bs + bo, start, n);
      } else if (p === UNALLOCATED && this.opts.base && l * bs + bo < this.opts.base.size) {
        const dst = out.subarray(start, start + n);
        baseReads.push(this.opts.base.read(l * bs + bo, n).then((b) => void b.copy(dst)));
      } else out.fill(0, start, start + n);
    }
    await Promise.all([readRuns(this.fd, runs.pieces(out)), ...baseReads]);
    return out;
  }

  async extentsView(snapshot: string | undefined, offset: number, length: number): Promise<Extent[]> {
    const snap = snapshot === undefined ? undefined : this.snapByName(snapshot);
    const bs = this.meta.blockSize;
    const out: Extent[] = [];
    const end = offset + length;
    const deltas = snap ? this.deltasNear(snap, Math.floor(offset / bs), Math.floor((end - 1) / bs)) : [];
    for (let l = Math.floor(offset / bs); l * bs < end; l++) {
      const s = Math.max(offset, l * bs);
      const e = Math.min(end, (l + 1) * bs);
      const p = this.resolve(snap, l, deltas);
      if (p === UNALLOCATED && this.opts.base) {
        for (const b of await this.opts.base.extents(s, e - s)) out.push(b);
      } else {
        const hole = p === UNALLOCATED || p === ZERO;
        const last = out[out.length - 1];
        // merged as we go: at 4 KiB blocks a long run is thousands of blocks
        if (last && last.hole === hole && last.zero === hole && last.offset + last.length === s) last.length += e - s;
        else out.push({ offset: s, length: e - s, hole, zero: hole });
      }
      if (out.length > 4096) break; // enough for one reply; the client asks again
    }
    return mergeExtents(out);
  }

  // ---- durability ----

  async flush(): Promise<void> {
    await this.flushNoCheckpoint();
    if (this.journal.size > JOURNAL_LIMIT) await this.quiesce(() => this.checkpoint());
  }

  /** Write the whole state as a new checkpoint, then start a new journal epoch. */
  private async checkpoint(): Promise<void> {
    await this.flushNoCheckpoint();
    const epoch = this.meta.epoch + 1;
    const meta: Meta = { ...this.meta, epoch, snapshots: this.snaps.map(({ delta: _d, ...rest }) => rest) };
    meta.version = FORMAT_VERSION;
    meta.tablePage = PAGE_ENTRIES;
    writeCheckpoint(path.join(this.dir, 'checkpoint'), { meta, arrays: { ...this.table.checkpointArrays(), delta: this.deltaArray() } });
    this.meta = meta;
    await this.journal.reset(epoch);
  }

  private flushing: Promise<void> = Promise.resolve();

  /**
   * Flushes run one after another: two overlapping flushes could otherwise commit their
   * batches out of order (the second one's fdatasync finishing first), and replay would
   * apply a later pointer before an earlier one.
   */
  private flushNoCheckpoint(timer?: SnapshotTimer): Promise<void> {
    const run = this.flushing.then(() => this.durably(() => this.flushOnce(timer)));
    this.flushing = run.catch(() => {});
    return run;
  }

  /** Data, then the journal batch describing it; then released blocks become reusable. */
  private async flushOnce(timer?: SnapshotTimer): Promise<void> {
    const mark = this.journal.seal();
    const freed = this.pendingFree;
    this.pendingFree = [];
    // Nothing written since the last sync (an idle snapshot create): no data to make durable.
    const dirty = this.dataDirty;
    this.dataDirty = false;
    if (dirty) {
      if (timer) await timer.step('fdatasyncData', () => native.fdatasync(this.fd));
      else await native.fdatasync(this.fd);
    }
    if (timer) await timer.step('journalCommit', () => this.journal.commit(mark));
    else await this.journal.commit(mark);
    // Released blocks are durable as free now: scrub, then allow reuse. In the background:
    // a snapshot delete frees tens of thousands of blocks, and nothing waits for their space.
    if (freed.length) {
      for (const p of freed) this.scrubbing.add(p);
      this.punching = this.punching.then(async () => {
        try {
          await this.map.released(); // a view pinned before may still be reading (or receiving into) a released block
          await this.punch(freed, 2);
          for (const p of freed) {
            this.scrubbing.delete(p);
            this.free.push(p);
          }
        } catch (err) {
          // left unowned and unpunched: the next open scrubs them
          this.opts.log.error({ err, blocks: freed.length }, 'punching released blocks failed; they are not reused until the volume is reopened');
        }
      });
    }
  }

  // ---- snapshots ----

  snapshots(): SnapshotInfo[] {
    return this.snaps.map((s) => ({ name: s.name, created: s.created, size: s.size, status: 'valid' as const, ownBytes: s.delta.size * this.meta.blockSize }));
  }

  protected async snapshotNow(name: string, timer: SnapshotTimer): Promise<void> {
    const rec: MetaRecord = { op: 'snapshot', id: this.meta.nextSnapId, name, gen: this.meta.gen, size: this.meta.size, created: new Date().toISOString() };
    this.journal.appendMeta(rec);
    this.applyMeta(rec);
    await this.flushNoCheckpoint(timer);
    this.opts.log.info({ snapshot: name, mode: 'row', gen: rec.gen, ...timer.fields() }, 'snapshot created');
  }

  protected async deleteSnapshotNow(name: string): Promise<void> {
    const s = this.snapByName(name);
    const i = this.snaps.indexOf(s);
    const older = i > 0 ? this.snaps[i - 1] : undefined;
    for (const [l, e] of s.delta) {
      if (older && e.birth <= older.gen && !older.delta.has(l)) {
        older.delta.set(l, e);
        this.journal.append(Kind.DELTA, older.id, l, e.p, e.birth);
      } else this.release(e.p);
    }
    this.journal.appendMeta({ op: 'delete-snapshot', id: s.id });
    this.snaps.splice(i, 1);
    await this.flushNoCheckpoint();
    this.opts.log.info({ snapshot: name, mode: 'row' }, 'snapshot deleted');
  }

  async changedBlocks(from: string, to: string | undefined): Promise<ChangedExtent[]> {
    const a = this.snapByName(from);
    const b = to === undefined ? undefined : this.snapByName(to);
    const candidates = new Set<number>();
    for (let i = this.snaps.indexOf(a); i < this.snaps.length; i++) for (const l of this.snaps[i].delta.keys()) candidates.add(l);
    this.table.bornAfter(a.gen, (l) => candidates.add(l));
    const size = Math.min(a.size, b ? b.size : this.meta.size);
    const changed: number[] = [];
    const da = this.deltasNear(a, 0, MAX_BLOCKS);
    const db = b ? this.deltasNear(b, 0, MAX_BLOCKS) : [];
    for (const l of candidates) if (l * this.meta.blockSize < size && this.resolve(a, l, da) !== this.resolve(b, l, db)) changed.push(l);
    // Blocks past the older view's end count as changed when the newer one is larger.
    const bigger = b ? b.size : this.meta.size;
    const out = blocksToExtents(changed, this.meta.blockSize, size);
    if (bigger > a.size) out.push({ offset: a.size, length: bigger - a.size });
    return out;
  }

  protected changedSince(from: string, first: number, last: number): (l: number) => boolean {
    const snap = this.snapByName(from);
    const deltas = this.deltasNear(snap, first, last);
    return (l) => this.resolve(snap, l, deltas) !== this.table.ptr(l);
  }

  async resize(size: number): Promise<void> {
    checkBlockCount(size, this.meta.blockSize);
    if (size < this.meta.size && this.snaps.length) throw new SnapshotError('EBUSY', 'shrinking a volume that has snapshots is not supported: delete its snapshots first');
    await this.quiesce(async () => {
      if (size < this.meta.size) {
        const bs = this.meta.blockSize;
        const from = Math.ceil(size / bs);
        for (const [l, cur] of [...this.table.entries()]) {
          if (l < from) continue;
          if (cur !== UNALLOCATED && cur !== ZERO) this.release(cur);
          this.table.set(l, UNALLOCATED, 0);
          this.journal.append(Kind.MAP, l, UNALLOCATED, 0);
        }
        if (size % bs) await this.zeroPartial(size, bs - (size % bs));
      }
      const rec: MetaRecord = { op: 'resize', size };
      this.journal.appendMeta(rec);
      this.applyMeta(rec);
      await this.flushNoCheckpoint();
    });
  }

  // ---- invariants ----

  async check(): Promise<string[]> {
    await this.punching; // released blocks still being scrubbed would look leaked
    const problems = this.table.verify();
    const bs = this.meta.blockSize;
    // owners per physical block, counted up to 2: a byte per block of data, not a map of names
    const owners = new Uint8Array(this.meta.nextPhysical);
    let ownedTwice = false;
    this.forEachOwner((p, l, snap) => {
      if (p - 1 >= this.meta.nextPhysical) problems.push(`${ownerName(l, snap)} points past the allocated area (block ${p - 1})`);
      else if (owners[p - 1] < 2 && ++owners[p - 1] === 2) ownedTwice = true;
    });
    if (ownedTwice) problems.push(...this.sharedOwners(owners));
    this.table.forEachEntry((l, _p, birth) => {
      if (birth > this.meta.gen) problems.push(`volume block ${l} born in future generation ${birth}`);
    });
    if (this.table.length < Math.ceil(this.meta.size / bs)) problems.push(`pointer table covers ${this.table.length} blocks but the volume has ${Math.ceil(this.meta.size / bs)}`);
    let prevGen = 0;
    for (const s of this.snaps) {
      if (s.gen <= prevGen) problems.push(`snapshot "${s.name}" generation ${s.gen} is not after the previous one`);
      prevGen = s.gen;
      for (const [l, e] of s.delta) if (e.birth > s.gen) problems.push(`snapshot "${s.name}" block ${l} holds a block born after it`);
    }
    // No leaked space: every allocated region of the data file is owned.
    const pendingFree = new Set([...this.pendingFree, ...this.scrubbing]);
    for (const e of await native.extents(this.fd, 0, Number.MAX_SAFE_INTEGER)) {
      if (!e.data) continue;
      for (let p = Math.floor(e.offset / bs); p * bs < e.offset + e.length; p++) {
        if (!owners[p] && !pendingFree.has(p)) problems.push(`physical block ${p} holds data but nothing owns it (leak)`);
      }
    }
    return problems;
  }

  /** "owned twice" problems for the blocks counted twice: a second pass naming their owners */
  private sharedOwners(owners: Uint8Array): string[] {
    const first = new Map<number, string>();
    const problems: string[] = [];
    this.forEachOwner((p, l, snap) => {
      if (owners[p - 1] !== 2) return;
      const prev = first.get(p);
      if (prev === undefined) first.set(p, ownerName(l, snap));
      else problems.push(`physical block ${p - 1} is owned twice: by ${prev} and ${ownerName(l, snap)}`);
    });
    return problems;
  }

  allocatedBytes(): number {
    return fs.fstatSync(this.fd).blocks * 512;
  }

  async close(opts: CloseOptions = {}): Promise<void> {
    if (this.closed) return;
    try {
      // Punches first: on a full filesystem the checkpoint needs the space they return.
      await this.punching;
      if (!opts.discard) await this.quiesce(() => this.checkpoint());
      await this.punching;
    } finally {
      this.closed = true;
      this.journal.close();
      this.map.close();
      native.closeFile(this.fd);
    }
  }
}


/** Reads the pointer table of a checkpoint in any supported format. */
function readTable(dir: string, m: Meta, r: CheckpointReader<Meta>): PointerTable {
  const n = Math.ceil(m.size / m.blockSize);
  if (m.version === 1) {
    const map = r.take(r.begin('map'));
    return PointerTable.fromFlat(n, map, r.take(r.begin('birth')));
  }
  if (m.tablePage !== PAGE_ENTRIES) throw new Error(`${dir}: pointer-table pages of ${m.tablePage} entries are not supported (this snapblock uses ${PAGE_ENTRIES})`);
  return m.version === 2 ? PointerTable.readFormat2(n, r) : PointerTable.read(n, r);
}

/** every snapshot's delta as (snapshot id, block, pointer, birth) quads, in bounded chunks */
function* deltaChunks(snaps: Snap[]): Generator<Uint32Array> {
  const chunk = new Uint32Array(4 * 16384);
  let k = 0;
  for (const s of snaps) {
    for (let slot = 0; slot < s.delta.capacity; slot++) {
      const l = s.delta.keyAt(slot);
      if (l < 0) continue;
      chunk[k++] = s.id;
      chunk[k++] = l;
      chunk[k++] = s.delta.ptrAt(slot);
      chunk[k++] = s.delta.birthAt(slot);
      if (k === chunk.length) {
        yield chunk; // written out before the generator resumes
        k = 0;
      }
    }
  }
  if (k > 0) yield chunk.subarray(0, k);
}

function ownerName(l: number, snap: Snap | undefined): string {
  return snap ? `snapshot "${snap.name}" block ${l}` : `volume block ${l}`;
}

/** Block indexes and physical pointers + 1 must fit the journal's u32 fields. */
function checkBlockCount(size: number, blockSize: number): void {
  const n = Math.ceil(size / blockSize);
  if (n > MAX_BLOCKS) throw new SnapshotError('EINVAL', `a ${size}-byte volume has ${n} blocks of ${blockSize} bytes; redirect-on-write volumes hold at most ${MAX_BLOCKS}: use a larger --block-size`);
}
