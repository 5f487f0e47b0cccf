// Split-mirror volume. The live data stays in place in DIR/data (a plain raw image).
// attachMirror() builds a full copy in DIR/mirror in the background while writes keep
// flowing; once synced every write goes to both files. A snapshot splits the mirror
// off: DIR/mirror is renamed to DIR/snap-<id>.img and is from then on an independent
// full image. Changed-block tracking: each snapshot keeps the set of blocks written
// while it was the newest one.
//
// Crash safety of the in-place writes: a WRITTEN record is committed BEFORE a block is
// first written in an epoch (an intent, as in md's write-intent bitmap). It only ever
// makes the written sets larger than the truth, never smaller, and it tells open()
// which mirror blocks may disagree with the primary after a crash, so only those are
// copied again. It points at no data, so "data before pointer" is not at stake.
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import * as native from '../native/index.js';
import { BlockError, type Extent } from '../block/layer.js';
import { fsyncDir } from '../pool/atomic-file.js';
import { writeCheckpoint } from './checkpoint.js';
import { Journal, Kind, type Rec } from './journal.js';
import { GroupCommit, fileExtents, readAt } from './io.js';
import { SnapshotError, blocksToExtents, type PlacedRange, type ChangedExtent, type SnapshotInfo, type SnapshotTimer, type CloseOptions } from './volume.js';
import { ioBuffer, recycle } from '../block/io-buffers.js';
import { writeAt, writeAtMapped } from './inline-write.js';
import { JournaledVolume, createVolumeFiles, openJournalAndData, readVolumeCheckpoint, type VolumeMeta } from './journaled-volume.js';

const FORMAT_VERSION = 1;
const JOURNAL_LIMIT = 64 * 1024 * 1024;
const COPY_PIECE = 4 * 1024 * 1024;

export type MirrorState = 'none' | 'syncing' | 'synced';

export interface MirrorStatus {
  state: MirrorState;
  copiedBytes: number;
  totalBytes: number;
  /** why the background copy stopped, if it failed */
  error?: string;
}

interface Snap {
  id: number;
  name: string;
  gen: number;
  size: number;
  created: string;
  /** blocks written while this was the newest snapshot */
  written: Set<number>;
  fd?: number;
  /** allocated bytes of its image, measured when it was split off or opened (it never changes) */
  own: number;
}

interface Meta extends VolumeMeta {
  format: 'snapblock-mirror';
  snapshots: Array<{ id: number; name: string; gen: number; size: number; created: string }>;
  /** cursor: [0, cursor) of the mirror is known to equal the primary */
  mirror: { state: MirrorState; cursor: number };
}

type MetaRecord =
  | { op: 'snapshot'; id: number; name: string; gen: number; size: number; created: string }
  | { op: 'delete-snapshot'; id: number }
  | { op: 'resize'; size: number }
  | { op: 'mirror-attach' }
  | { op: 'mirror-progress'; cursor: number }
  | { op: 'mirror-synced' }
  | { op: 'mirror-detach' };

export interface MirrorOptions {
  log: Logger;
  /** bytes the background copier handles (and persists progress for) at a time */
  chunkBytes?: number;
}

interface Span {
  start: number;
  end: number;
  done: Promise<void>;
}

export class MirrorVolume extends JournaledVolume<Meta, Snap> {
  readonly mode = 'mirror' as const;
  private mirrorFd?: number;
  /** blocks with a WRITTEN record in this journal epoch (cleared by a checkpoint) */
  private epochWritten = new Set<number>();
  /** blocks whose WRITTEN record is appended but not yet durable */
  private pendingIntent = new Map<number, Promise<void>>();
  /** writes in flight: the copier waits for those overlapping the region it copies */
  private writing = new Set<Span>();
  /** the region the copier is copying: writes to it wait */
  private copying?: Span;
  private copier?: Promise<void>;
  private stopping = false;
  private copyError?: string;
  private onProgress?: (copied: number, total: number) => void;
  private flushes = new Set<Promise<unknown>>();
  private readonly exclusive = new Mutex();
  private readonly durable = new GroupCommit(() => this.durably(() => this.journal.commit(this.journal.seal())));
  private closed = false;

  private constructor(dir: string, meta: Meta, journal: Journal, fd: number, private readonly opts: MirrorOptions) {
    super(dir, meta, journal, fd);
  }

  private get chunk(): number {
    const bs = this.meta.blockSize;
    return Math.max(bs, Math.floor((this.opts.chunkBytes ?? 8 * 1024 * 1024) / bs) * bs);
  }

  private snapPath(id: number): string {
    return path.join(this.dir, `snap-${id}.img`);
  }

  private get mirrorPath(): string {
    return path.join(this.dir, 'mirror');
  }

  static create(dir: string, size: number, blockSize: number): void {
    const meta: Meta = { format: 'snapblock-mirror', version: FORMAT_VERSION, epoch: 1, size, blockSize, gen: 1, nextSnapId: 1, snapshots: [], mirror: { state: 'none', cursor: 0 } };
    createVolumeFiles(dir, { meta, arrays: { written: new Uint32Array(0) } }, size);
  }

  static async open(dir: string, opts: MirrorOptions): Promise<MirrorVolume> {
    const ck = readVolumeCheckpoint<Meta>(dir, 'snapblock-mirror', 'split-mirror', FORMAT_VERSION);
    const { journal, records, discarded, fd } = openJournalAndData(dir, ck.meta.epoch);
    const v = new MirrorVolume(dir, ck.meta, journal, fd, opts);
    v.snaps = ck.meta.snapshots.map((s) => ({ ...s, written: new Set<number>(), own: 0 }));
    const w = ck.arrays.written;
    for (let i = 0; i < w.length; i += 2) v.snapById(w[i]).written.add(w[i + 1]);
    for (const r of records) v.replay(r);
    if (fs.fstatSync(fd).size !== v.meta.size) fs.ftruncateSync(fd, v.meta.size); // undo a resize that never became durable
    const repaired = v.openSnapshotFiles();
    const mirrorChanged = await v.openMirror();
    if (records.length || discarded || repaired || mirrorChanged) await v.quiesce(() => v.checkpoint());
    if (v.meta.mirror.state === 'syncing') v.startCopier();
    return v;
  }

  private replay(r: Rec): void {
    if (r.k === Kind.WRITTEN) {
      // Records replay in the order they happened: the newest snapshot now was the newest then.
      this.snaps[this.snaps.length - 1]?.written.add(r.a);
      this.epochWritten.add(r.a);
    } else if (r.k === Kind.META) this.applyMeta(r.json as MetaRecord);
  }

  private applyMeta(m: MetaRecord): void {
    const mirror = this.meta.mirror;
    switch (m.op) {
      case 'snapshot':
        this.snaps.push({ id: m.id, name: m.name, gen: m.gen, size: m.size, created: m.created, written: new Set(), own: 0 });
        this.countSnapshot(m);
        this.meta.mirror = { state: 'none', cursor: 0 }; // the mirror became the snapshot
        break;
      case 'delete-snapshot': {
        // The interval before it and the one after it become one.
        const i = this.snaps.findIndex((s) => s.id === m.id);
        if (i > 0) for (const l of this.snaps[i].written) this.snaps[i - 1].written.add(l);
        this.snaps.splice(i, 1);
        break;
      }
      case 'resize':
        this.meta.size = m.size;
        mirror.cursor = mirror.state === 'synced' ? m.size : Math.min(mirror.cursor, m.size);
        break;
      case 'mirror-attach':
        this.meta.mirror = { state: 'syncing', cursor: 0 };
        break;
      case 'mirror-progress':
        mirror.cursor = m.cursor;
        break;
      case 'mirror-synced':
        this.meta.mirror = { state: 'synced', cursor: this.meta.size };
        break;
      case 'mirror-detach':
        this.meta.mirror = { state: 'none', cursor: 0 };
        break;
    }
  }

  /** Open snapshot images; finish a split interrupted after its record; remove images of no snapshot. */
  private openSnapshotFiles(): boolean {
    let changed = false;
    const newest = this.snaps[this.snaps.length - 1];
    for (const s of this.snaps) {
      const file = this.snapPath(s.id);
      if (!fs.existsSync(file) && s === newest && this.meta.mirror.state === 'none' && fs.existsSync(this.mirrorPath)) {
        fs.renameSync(this.mirrorPath, file);
        fsyncDir(this.dir);
        this.opts.log.warn({ snapshot: s.name, mode: 'mirror' }, 'finished splitting the mirror off into a snapshot after a crash');
        changed = true;
      }
      if (fs.existsSync(file)) {
        s.fd = native.openFile(file, { direct: false, readOnly: true }).fd;
        s.own = fs.fstatSync(s.fd).blocks * 512;
      } else this.opts.log.error({ snapshot: s.name, mode: 'mirror' }, `snapshot image ${file} is missing`);
    }
    const known = new Set(this.snaps.map((s) => path.basename(this.snapPath(s.id))));
    for (const f of fs.readdirSync(this.dir)) {
      if (/^snap-\d+\.img$/.test(f) && !known.has(f)) {
        fs.unlinkSync(path.join(this.dir, f)); // a deletion whose unlink did not happen
        changed = true;
      }
    }
    if (changed) fsyncDir(this.dir);
    return changed;
  }

  /** Bring the mirror file in line with the durable state; returns whether anything changed. */
  private async openMirror(): Promise<boolean> {
    const exists = fs.existsSync(this.mirrorPath);
    if (this.meta.mirror.state === 'none') {
      if (!exists) return false;
      fs.unlinkSync(this.mirrorPath); // an attach that never became durable, or a detach cut short
      fsyncDir(this.dir);
      return true;
    }
    let changed = false;
    if (!exists) {
      this.opts.log.error({ mode: 'mirror' }, 'the mirror file is missing: copying it again from the start');
      this.journal.appendMeta({ op: 'mirror-attach' } satisfies MetaRecord);
      this.applyMeta({ op: 'mirror-attach' });
      changed = true;
    }
    const m = this.meta.mirror;
    this.mirrorFd = native.openFile(this.mirrorPath, { direct: false, readOnly: false, create: true }).fd;
    if (m.state === 'syncing') fs.ftruncateSync(this.mirrorFd, m.cursor); // past the cursor nothing is trusted
    fs.ftruncateSync(this.mirrorFd, this.meta.size);
    // Blocks written since the last checkpoint may have reached only one of the two files.
    const bs = this.meta.blockSize;
    const upTo = Math.min(m.cursor, this.meta.size);
    const blocks = [...this.epochWritten].filter((l) => l * bs < upTo).sort((a, b) => a - b);
    for (const e of blocksToExtents(blocks, bs, upTo)) await this.copyRange(e.offset, e.offset + e.length, true);
    if (blocks.length) {
      await native.fdatasync(this.mirrorFd);
      this.opts.log.info({ mode: 'mirror', blocks: blocks.length }, 'mirror blocks resynchronised after an unclean shutdown');
    }
    return changed || blocks.length > 0;
  }

  // ---- mirror management ----

  mirrorStatus(): MirrorStatus {
    const m = this.meta.mirror;
    const total = m.state === 'none' ? 0 : this.meta.size;
    return { state: m.state, copiedBytes: m.state === 'synced' ? total : Math.min(m.cursor, total), totalBytes: total, ...(this.copyError ? { error: this.copyError } : {}) };
  }

  /** Start building a mirror in the background; resolves once the attach is durable. */
  async attachMirror(onProgress?: (copied: number, total: number) => void): Promise<void> {
    if (this.meta.mirror.state !== 'none') throw new SnapshotError('EBUSY', `a mirror is already attached (${this.meta.mirror.state})`);
    await this.quiesce(() =>
      this.exclusive.run(async () => {
        fs.closeSync(fs.openSync(this.mirrorPath, 'w', 0o600));
        fsyncDir(this.dir);
        this.mirrorFd = native.openFile(this.mirrorPath, { direct: false, readOnly: false }).fd;
        fs.ftruncateSync(this.mirrorFd, this.meta.size);
        this.journal.appendMeta({ op: 'mirror-attach' } satisfies MetaRecord);
        this.applyMeta({ op: 'mirror-attach' });
        await this.durable.request();
      }),
    );
    this.opts.log.info({ mode: 'mirror', size: this.meta.size }, 'mirror attached; copying');
    this.onProgress = onProgress;
    this.copyError = undefined;
    this.startCopier();
  }

  /** Resolves when the mirror is synced; rejects if the copy stops before that. */
  async waitForMirror(): Promise<void> {
    while (this.meta.mirror.state === 'syncing') {
      if (!this.copier) throw new SnapshotError('EINVAL', `the mirror stopped syncing${this.copyError ? `: ${this.copyError}` : ''}`);
      await this.copier;
    }
    if (this.meta.mirror.state !== 'synced') throw new SnapshotError('EINVAL', 'no mirror is attached');
  }

  /** Abandon the mirror (syncing or synced). */
  async detachMirror(): Promise<void> {
    if (this.meta.mirror.state === 'none') throw new SnapshotError('EINVAL', 'no mirror is attached');
    await this.stopCopier();
    await this.quiesce(() =>
      this.exclusive.run(async () => {
        this.journal.appendMeta({ op: 'mirror-detach' } satisfies MetaRecord);
        this.applyMeta({ op: 'mirror-detach' });
        await this.durable.request();
        await Promise.allSettled([...this.flushes]); // a flush may still be syncing the mirror's fd
        if (this.mirrorFd !== undefined) native.closeFile(this.mirrorFd);
        this.mirrorFd = undefined;
        fs.rmSync(this.mirrorPath, { force: true });
        fsyncDir(this.dir);
      }),
    );
    this.opts.log.info({ mode: 'mirror' }, 'mirror detached');
  }

  private startCopier(): void {
    if (this.copier) return;
    this.copier = this.runCopier()
      .catch((err: Error) => {
        this.copyError = err.message;
        this.opts.log.error({ mode: 'mirror', err }, 'mirror copy failed; detach and attach the mirror again');
      })
      .finally(() => (this.copier = undefined));
  }

  /**
   * Stop the background copy without detaching (shutdown paths, tests simulating a crash);
   * it resumes from the persisted cursor on the next open.
   */
  async stopMirrorCopy(): Promise<void> {
    await this.stopCopier();
  }

  private async stopCopier(): Promise<void> {
    this.stopping = true;
    try {
      await this.copier;
    } finally {
      this.stopping = false;
    }
  }

  private async runCopier(): Promise<void> {
    while (!this.stopping && this.meta.mirror.state === 'syncing') {
      await this.exclusive.run(() => this.copyChunk());
      this.onProgress?.(this.mirrorStatus().copiedBytes, this.meta.size);
    }
  }

  /** Copy the next chunk past the cursor, then persist the cursor once the copy is durable. */
  private async copyChunk(): Promise<void> {
    const m = this.meta.mirror;
    if (this.stopping || m.state !== 'syncing' || this.mirrorFd === undefined) return;
    if (m.cursor >= this.meta.size) {
      await native.fdatasync(this.mirrorFd);
      this.journal.appendMeta({ op: 'mirror-synced' } satisfies MetaRecord);
      await this.durable.request();
      this.applyMeta({ op: 'mirror-synced' });
      this.opts.log.info({ mode: 'mirror', size: this.meta.size }, 'mirror synced');
      return;
    }
    const start = m.cursor;
    const end = Math.min(this.meta.size, start + this.chunk);
    let open!: () => void;
    this.copying = { start, end, done: new Promise((r) => (open = r)) };
    try {
      // Writes that started before the lock: their data must be in the primary before we read it.
      for (const w of [...this.writing]) if (w.start < end && start < w.end) await w.done;
      await this.copyRange(start, end, false);
      m.cursor = end; // from now on writes below `end` go to the mirror too
    } finally {
      this.copying = undefined;
      open();
    }
    await native.fdatasync(this.mirrorFd);
    this.journal.appendMeta({ op: 'mirror-progress', cursor: end } satisfies MetaRecord);
    await this.durable.request();
  }

  /** Copy [start, end) of the primary to the mirror, skipping holes (punching them when asked). */
  private async copyRange(start: number, end: number, punch: boolean): Promise<void> {
    const mfd = this.mirrorFd!;
    // One recycled buffer for the whole range: a fresh 4 MiB buffer per piece made V8 run a
    // mark-compact every few hundred ms on external-memory pressure (5-22 ms pauses each).
    const piece = ioBuffer(COPY_PIECE);
    try {
      for (const e of await fileExtents(this.fd, start, end - start)) {
        if (e.hole) {
          if (punch) await native.punchHole(mfd, e.offset, e.length);
          continue;
        }
        for (let at = e.offset; at < e.offset + e.length; at += COPY_PIECE) {
          const buf = piece.subarray(0, Math.min(COPY_PIECE, e.offset + e.length - at));
          await readAt(this.fd, buf, at);
          await writeAt(mfd, buf, at);
        }
      }
    } finally {
      recycle(piece);
    }
  }

  // ---- live writes ----

  /** Make sure every block first..last has a durable WRITTEN record where one is needed. */
  private async intent(first: number, last: number): Promise<void> {
    const newest = this.snaps[this.snaps.length - 1];
    const mirrored = this.meta.mirror.state !== 'none';
    if (!newest && !mirrored) return;
    const waits: Promise<void>[] = [];
    const added: number[] = [];
    for (let l = first; l <= last; l++) {
      if ((newest && !newest.written.has(l)) || (mirrored && !this.epochWritten.has(l))) {
        newest?.written.add(l);
        this.epochWritten.add(l);
        this.journal.append(Kind.WRITTEN, l, this.meta.gen);
        added.push(l);
      } else {
        const p = this.pendingIntent.get(l);
        if (p) waits.push(p);
      }
    }
    if (added.length) {
      const p = this.durable.request();
      for (const l of added) this.pendingIntent.set(l, p);
      const clear = () => {
        for (const l of added) if (this.pendingIntent.get(l) === p) this.pendingIntent.delete(l);
      };
      p.then(clear, clear);
      waits.push(p);
    }
    await Promise.all(waits);
  }

  /** Run op on the primary, and on the mirror for the part of the range already copied. */
  private async both(offset: number, length: number, op: (fd: number, from: number, to: number) => Promise<void>): Promise<void> {
    if (!length) return;
    const end = offset + length;
    const bs = this.meta.blockSize;
    await this.intent(Math.floor(offset / bs), Math.floor((end - 1) / bs));
    for (let c = this.copying; c && c.start < end && offset < c.end; c = this.copying) await c.done;
    // No await between the check above and registering below: the copier sees us or we see it.
    const m = this.meta.mirror;
    const upTo = m.state === 'synced' ? end : m.state === 'syncing' ? Math.min(end, m.cursor) : offset;
    let open!: () => void;
    const span: Span = { start: offset, end, done: new Promise((r) => (open = r)) };
    this.writing.add(span);
    try {
      const jobs = [op(this.fd, offset, end)];
      if (this.mirrorFd !== undefined && upTo > offset) jobs.push(op(this.mirrorFd, offset, upTo));
      await Promise.all(jobs);
    } finally {
      this.writing.delete(span);
      open();
    }
  }

  protected writeLive(offset: number, data: Buffer): Promise<void> {
    return this.both(offset, data.length, (fd, from, to) => {
      const piece = from === offset && to === offset + data.length ? data : data.subarray(from - offset, to - offset);
      return fd === this.fd ? writeAtMapped(this.map, fd, piece, from) : writeAt(fd, piece, from);
    });
  }

  /**
   * In place only with no mirror attached (its copy would need the bytes too) and where the
   * newest snapshot's record of changed blocks already durably covers the range (intent).
   */
  protected override placeLive(offset: number, length: number): PlacedRange | undefined {
    if (this.meta.mirror.state !== 'none') return undefined;
    const newest = this.snaps[this.snaps.length - 1];
    if (newest && !this.everyBlock(offset, length, (l) => newest.written.has(l) && !this.pendingIntent.has(l))) return undefined;
    return this.map.place([{ at: offset, len: length }]);
  }

  protected trimLive(offset: number, length: number): Promise<void> {
    return this.both(offset, length, (fd, from, to) => native.punchHole(fd, from, to - from));
  }

  // ---- reads and extents ----

  private viewFd(snapshot: string | undefined): number {
    if (snapshot === undefined) return this.fd;
    const s = this.snapByName(snapshot);
    if (s.fd === undefined) throw new BlockError('EIO', `snapshot "${snapshot}" has lost its image file`);
    return s.fd;
  }

  async readView(snapshot: string | undefined, offset: number, length: number): Promise<Buffer> {
    const out = ioBuffer(length);
    await readAt(this.viewFd(snapshot), out, offset);
    return out;
  }

  async extentsView(snapshot: string | undefined, offset: number, length: number): Promise<Extent[]> {
    return fileExtents(this.viewFd(snapshot), offset, length);
  }

  // ---- durability ----

  async flush(): Promise<void> {
    const all = this.durably(() => {
      const syncs = [native.fdatasync(this.fd)];
      if (this.mirrorFd !== undefined) syncs.push(native.fdatasync(this.mirrorFd));
      return Promise.all(syncs);
    });
    this.flushes.add(all);
    try {
      await all;
    } finally {
      this.flushes.delete(all);
    }
    await this.durable.request();
    if (this.journal.size > JOURNAL_LIMIT) await this.quiesce(() => this.checkpoint());
  }

  /** With writes drained: both files durable, whole state as a checkpoint, new journal epoch. */
  private async checkpoint(): Promise<void> {
    await this.exclusive.run(async () => {
      await native.fdatasync(this.fd);
      if (this.mirrorFd !== undefined) await native.fdatasync(this.mirrorFd);
      await this.durable.request();
      const written: number[] = [];
      for (const s of this.snaps) for (const l of s.written) written.push(s.id, l);
      const epoch = this.meta.epoch + 1;
      const meta: Meta = {
        ...this.meta,
        epoch,
        mirror: { ...this.meta.mirror },
        snapshots: this.snaps.map((s) => ({ id: s.id, name: s.name, gen: s.gen, size: s.size, created: s.created })),
      };
      writeCheckpoint(path.join(this.dir, 'checkpoint'), { meta, arrays: { written: Uint32Array.from(written) } });
      this.meta = meta;
      await this.journal.reset(epoch);
      this.epochWritten.clear(); // both files agree now
    });
  }

  // ---- snapshots ----

  snapshots(): SnapshotInfo[] {
    return this.snaps.map((s) => ({
      name: s.name,
      created: s.created,
      size: s.size,
      status: 'valid' as const,
      ownBytes: s.own,
    }));
  }

  private requireSynced(): void {
    const m = this.meta.mirror;
    if (m.state === 'synced') return;
    const what = m.state === 'none' ? 'has no mirror' : `has a mirror that is still syncing (${m.cursor} of ${this.meta.size} bytes)`;
    throw new SnapshotError('EINVAL', `the volume ${what}; a mirror-mode snapshot splits off a synced mirror: attach a mirror and wait for it to sync: snapblock mirror attach <volume> --wait`);
  }

  override async createSnapshot(name: string): Promise<SnapshotInfo> {
    this.requireSynced(); // refuse before holding writes back
    return super.createSnapshot(name);
  }

  protected async snapshotNow(name: string, timer: SnapshotTimer): Promise<void> {
    this.requireSynced();
    await this.exclusive.run(async () => {
      timer.mark('exclusive');
      const mfd = this.mirrorFd!;
      await timer.step('fdatasyncDataAndMirror', () => Promise.all([native.fdatasync(this.fd), native.fdatasync(mfd)]));
      const id = this.meta.nextSnapId;
      // Record first, rename second: open() finishes a rename a crash interrupted.
      const rec: MetaRecord = { op: 'snapshot', id, name, gen: this.meta.gen, size: this.meta.size, created: new Date().toISOString() };
      this.journal.appendMeta(rec);
      this.applyMeta(rec);
      await timer.step('journalCommit', () => this.durable.request());
      fs.renameSync(this.mirrorPath, this.snapPath(id));
      // The rename need not be durable before the create returns: the record is, and open()
      // finishes a split whose rename a crash lost. The directory is synced in the background.
      fs.promises.open(this.dir, 'r').then((h) => h.sync().finally(() => h.close())).catch((err) => this.opts.log.warn({ err }, 'syncing the volume directory after a split failed'));
      const snap = this.snapById(id);
      snap.fd = mfd; // same inode: the mirror's fd now reads the snapshot
      snap.own = fs.fstatSync(mfd).blocks * 512;
      this.mirrorFd = undefined;
      this.opts.log.info({ snapshot: name, mode: 'mirror', gen: rec.gen, ...timer.fields() }, 'mirror split off as a snapshot');
    });
  }

  protected async deleteSnapshotNow(name: string): Promise<void> {
    const s = this.snapByName(name);
    this.journal.appendMeta({ op: 'delete-snapshot', id: s.id } satisfies MetaRecord);
    this.applyMeta({ op: 'delete-snapshot', id: s.id });
    await this.durable.request();
    if (s.fd !== undefined) native.closeFile(s.fd);
    s.fd = undefined;
    fs.rmSync(this.snapPath(s.id), { force: true });
    fsyncDir(this.dir);
    this.opts.log.info({ snapshot: name, mode: 'mirror' }, 'snapshot deleted');
  }

  async changedBlocks(from: string, to: string | undefined): Promise<ChangedExtent[]> {
    const a = this.snapByName(from);
    const b = to === undefined ? undefined : this.snapByName(to);
    const ia = this.snaps.indexOf(a);
    const ib = b ? this.snaps.indexOf(b) : this.snaps.length;
    const blocks = new Set<number>();
    for (let i = Math.min(ia, ib); i < Math.max(ia, ib); i++) for (const l of this.snaps[i].written) blocks.add(l);
    const size = Math.min(a.size, b ? b.size : this.meta.size);
    const bigger = Math.max(a.size, b ? b.size : this.meta.size);
    const out = blocksToExtents(blocks, this.meta.blockSize, size);
    if (bigger > size) out.push({ offset: size, length: bigger - size });
    return out;
  }

  /** Each snapshot from `from` on keeps the blocks written while it was the newest. */
  protected changedSince(from: string, _first: number, _last: number): (l: number) => boolean {
    const sets = this.snaps.slice(this.snaps.indexOf(this.snapByName(from))).map((s) => s.written);
    return (l) => sets.some((w) => w.has(l));
  }

  async resize(size: number): Promise<void> {
    if (size < this.meta.size && this.snaps.length) throw new SnapshotError('EBUSY', 'shrinking a volume that has snapshots is not supported: delete its snapshots first');
    await this.quiesce(() =>
      this.exclusive.run(async () => {
        const files = this.mirrorFd === undefined ? [this.fd] : [this.fd, this.mirrorFd];
        // Growing: extend first, so the record never names space a file lacks. Shrinking: record first.
        if (size > this.meta.size) for (const f of files) fs.ftruncateSync(f, size);
        this.journal.appendMeta({ op: 'resize', size } satisfies MetaRecord);
        await Promise.all(files.map((f) => native.fdatasync(f)));
        await this.durable.request();
        this.applyMeta({ op: 'resize', size });
        if (fs.fstatSync(this.fd).size > size) await this.map.exclusive(() => fs.ftruncateSync(this.fd, size));
        if (this.mirrorFd !== undefined && fs.fstatSync(this.mirrorFd).size > size) fs.ftruncateSync(this.mirrorFd, size);
      }),
    );
  }

  // ---- invariants ----

  async check(): Promise<string[]> {
    const problems: string[] = [];
    const size = this.meta.size;
    const nblocks = Math.ceil(size / this.meta.blockSize);
    if (fs.fstatSync(this.fd).size !== size) problems.push(`data file is ${fs.fstatSync(this.fd).size} bytes but the volume is ${size}`);
    const m = this.meta.mirror;
    const mirrorExists = fs.existsSync(this.mirrorPath);
    if (m.state === 'none') {
      if (mirrorExists) problems.push('a mirror file exists but no mirror is attached');
      if (this.mirrorFd !== undefined) problems.push('no mirror is attached but a mirror file is open');
    } else {
      if (!mirrorExists) problems.push(`the mirror is ${m.state} but its file is missing`);
      if (this.mirrorFd === undefined) problems.push(`the mirror is ${m.state} but not open`);
      else if (fs.fstatSync(this.mirrorFd).size !== size) problems.push(`mirror file is ${fs.fstatSync(this.mirrorFd).size} bytes but the volume is ${size}`);
      if (m.cursor > size) problems.push(`mirror copy cursor ${m.cursor} lies past the volume's end ${size}`);
      if (m.state === 'synced' && m.cursor !== size) problems.push(`mirror is synced but its cursor is ${m.cursor} of ${size}`);
      if (this.copyError) problems.push(`the mirror copy failed: ${this.copyError}`);
    }
    let prevGen = 0;
    for (const s of this.snaps) {
      const where = `snapshot "${s.name}"`;
      if (s.gen <= prevGen) problems.push(`${where} generation ${s.gen} is not after the previous one`);
      prevGen = s.gen;
      if (!fs.existsSync(this.snapPath(s.id))) problems.push(`${where} image ${path.basename(this.snapPath(s.id))} is missing`);
      else if (fs.statSync(this.snapPath(s.id)).size !== s.size) problems.push(`${where} image is ${fs.statSync(this.snapPath(s.id)).size} bytes but the snapshot is ${s.size}`);
      for (const l of s.written) if (l >= nblocks) problems.push(`${where} records block ${l} as written, past the volume's end`);
    }
    const known = new Set(this.snaps.map((s) => path.basename(this.snapPath(s.id))));
    for (const f of fs.readdirSync(this.dir)) if (/^snap-\d+\.img$/.test(f) && !known.has(f)) problems.push(`snapshot image ${f} belongs to no snapshot`);
    return problems;
  }

  allocatedBytes(): number {
    let n = fs.fstatSync(this.fd).blocks * 512;
    if (this.mirrorFd !== undefined) n += fs.fstatSync(this.mirrorFd).blocks * 512;
    for (const s of this.snaps) if (s.fd !== undefined) n += fs.fstatSync(s.fd).blocks * 512;
    return n;
  }

  async close(opts: CloseOptions = {}): Promise<void> {
    if (this.closed) return;
    try {
      await this.stopCopier();
      if (!opts.discard) await this.quiesce(() => this.checkpoint());
    } finally {
      this.closed = true;
      this.journal.close();
      if (this.mirrorFd !== undefined) native.closeFile(this.mirrorFd);
      for (const s of this.snaps) if (s.fd !== undefined) native.closeFile(s.fd);
      this.map.close();
      native.closeFile(this.fd);
    }
  }
}

/** Runs functions one at a time: the copier's chunks against snapshot, resize, detach and checkpoint. */
class Mutex {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.tail.then(fn);
    this.tail = p.catch(() => {});
    return p;
  }
}
