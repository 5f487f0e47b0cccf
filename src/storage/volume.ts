// What every snapshot technique shares: the write gate that makes snapshots
// crash-consistent, read-only snapshot views, rollback and changed-extent reports.
// A technique (row, cow, mirror) supplies the block-level mechanics.
import type { BlockLayer, Capabilities, Extent, InPlaceWrite, WriteFlags, ZeroFlags } from '../block/layer.js';
import { BlockError } from '../block/layer.js';
import { inlineWrites } from './inline-write.js';

export type SnapshotMode = 'row' | 'cow' | 'mirror';
export const SNAPSHOT_MODES: readonly SnapshotMode[] = ['row', 'cow', 'mirror'];

export interface SnapshotInfo {
  name: string;
  created: string;
  /** provisioned size of the volume when the snapshot was taken */
  size: number;
  status: 'valid' | 'invalid';
  /** bytes of storage that only this snapshot holds */
  ownBytes: number;
}

export interface ChangedExtent {
  offset: number;
  length: number;
}

/** Where the bytes of a live write can be received in place: pinned views, in order. */
export interface PlacedRange {
  pieces: Buffer[];
  release(): void;
}

/**
 * While a snapshot (any quiesce) waits for in-place writes whose payload is still arriving,
 * it tells their receivers this often; one whose payload stopped arriving for this long
 * closes its connection (its bytes are already landing in the live volume, so the write
 * cannot be put off instead).
 */
const ARRIVING_PATIENCE_MS = 5000;

/** the most blocks one changedInRange answer covers (the client asks again for the rest) */
const RANGE_BLOCKS = 65536;

export class SnapshotError extends Error {
  constructor(
    readonly code: 'ENOENT' | 'EEXIST' | 'EINVAL' | 'EBUSY',
    message: string,
  ) {
    super(message);
    this.name = 'SnapshotError';
  }
}

/**
 * Where a snapshot create spends its time, step by step (ms): the write barrier
 * (`quiesce`), then the technique's steps (syncs, journal commit, ...). Logged with
 * "snapshot created" so a benchmark can tell the operation's own cost from the rest.
 */
export class SnapshotTimer {
  private readonly t0 = performance.now();
  readonly steps: Record<string, number> = {};

  mark(name: string): void {
    this.steps[name] = round(performance.now() - this.t0);
  }

  async step<T>(name: string, fn: () => Promise<T> | T): Promise<T> {
    const t = performance.now();
    try {
      return await fn();
    } finally {
      this.steps[name] = round((this.steps[name] ?? 0) + performance.now() - t);
    }
  }

  /** fields for the log line: the steps and the time since the create began */
  fields(): { ms: number; steps: Record<string, number> } {
    return { ms: round(performance.now() - this.t0), steps: this.steps };
  }
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}

/** A snapshot technique's view of one point in time, or of the live volume (snapshot undefined). */
export interface ViewOps {
  readView(snapshot: string | undefined, offset: number, length: number): Promise<Buffer>;
  extentsView(snapshot: string | undefined, offset: number, length: number): Promise<Extent[]>;
}

export interface CloseOptions {
  discard?: boolean;
}

export abstract class Volume implements BlockLayer, ViewOps {
  abstract readonly mode: SnapshotMode;
  abstract get size(): number;
  abstract readonly blockSize: number;
  readonly caps: Capabilities = { readOnly: false, multiConn: true, trim: true, zero: true, fastZero: true, fua: true, cache: true, extents: true };

  private inflight = 0;
  private gate?: Promise<void>;
  private drained?: () => void;
  /** `waited` callbacks of in-place writes whose payload is still arriving */
  private readonly arriving = new Set<(idleMs: number) => void>();

  // ---- technique hooks ----
  protected abstract writeLive(offset: number, data: Buffer): Promise<void>;
  /**
   * Where a live write of [offset, offset+length) may land as it arrives, with nothing to do
   * before or after the bytes are stored (no copy-out, no redirect, no intent record), or
   * undefined. Only the data file's cached, allocated pages qualify (FileMap.place).
   */
  protected placeLive(_offset: number, _length: number): PlacedRange | undefined {
    return undefined;
  }
  protected abstract trimLive(offset: number, length: number, zero: boolean): Promise<void>;
  /**
   * Hand the metadata records a completed write or trim appended to the kernel (page cache),
   * so the operation survives a kill of this process once acknowledged (docs/FORMAT.md,
   * "process crash"). Called before its reply; durability against power loss is flush()'s job.
   */
  protected persistMetadata(): Promise<void> | undefined {
    return undefined;
  }
  abstract readView(snapshot: string | undefined, offset: number, length: number): Promise<Buffer>;
  abstract extentsView(snapshot: string | undefined, offset: number, length: number): Promise<Extent[]>;
  /** make every completed write and its metadata durable */
  abstract flush(): Promise<void>;
  abstract snapshots(): SnapshotInfo[];
  /** called with writes drained; must make every completed write and the snapshot durable before it resolves */
  protected abstract snapshotNow(name: string, timer: SnapshotTimer): Promise<void>;
  protected abstract deleteSnapshotNow(name: string): Promise<void>;
  /** block-aligned ranges whose content differs between two points (undefined = live volume) */
  abstract changedBlocks(from: string, to: string | undefined): Promise<ChangedExtent[]>;
  abstract check(): Promise<string[]>;
  /** problems `check` reports about earlier failed syncs (they outlive a reopen) */
  syncFailures(): string[] {
    return [];
  }
  /** forget the failed-sync note (`check --repair`); whether there was one */
  clearSyncFailure(): boolean {
    return false;
  }
  /** grow (or, without snapshots, shrink) the live volume */
  abstract resize(size: number): Promise<void>;
  abstract allocatedBytes(): number;
  /**
   * Checkpoint and release the files. discard (the volume is being deleted): release them
   * without a checkpoint. A close whose checkpoint fails (ENOSPC) still releases its files,
   * so a deleted volume's space is freed at once; the journal keeps the state meanwhile.
   */
  abstract close(opts?: CloseOptions): Promise<void>;

  // ---- BlockLayer ----
  read(offset: number, length: number): Promise<Buffer> {
    return this.readView(undefined, offset, length);
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.extentsView(undefined, offset, length);
  }

  async write(offset: number, data: Buffer, flags: WriteFlags = {}): Promise<void> {
    await this.admit();
    try {
      await this.writeLive(offset, data);
      await this.persistMetadata();
    } finally {
      this.leave();
    }
    if (flags.fua) await this.flush();
  }

  writeInPlace(offset: number, length: number, waited: (idleMs: number) => void): InPlaceWrite | undefined {
    if (this.gate || length === 0) return undefined; // admitted now or not at all
    if (!inlineWrites.dirtyRoom()) return undefined; // the receive's page faults must not be throttled
    const range = this.placeLive(offset, length);
    if (!range) return undefined;
    this.inflight++;
    this.arriving.add(waited);
    let finished = false;
    return {
      pieces: range.pieces,
      finish: async (complete, flags = {}) => {
        if (finished) return;
        finished = true;
        this.arriving.delete(waited);
        range.release();
        this.leave();
        if (complete && flags.fua) await this.flush();
      },
    };
  }

  async trim(offset: number, length: number, flags: WriteFlags = {}): Promise<void> {
    await this.admit();
    try {
      await this.trimLive(offset, length, false);
      await this.persistMetadata();
    } finally {
      this.leave();
    }
    if (flags.fua) await this.flush();
  }

  async zero(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    if (!flags.mayTrim && flags.fast) throw new BlockError('ENOTSUP', 'zeroing without deallocating is not fast here');
    await this.admit();
    try {
      if (flags.mayTrim) await this.trimLive(offset, length, true);
      else await this.writeZeroes(offset, length);
      await this.persistMetadata();
    } finally {
      this.leave();
    }
    if (flags.fua) await this.flush();
  }

  private async writeZeroes(offset: number, length: number): Promise<void> {
    const step = 4 * 1024 * 1024;
    const zeros = Buffer.alloc(Math.min(step, length));
    for (let at = offset; at < offset + length; at += step) {
      await this.writeLive(at, zeros.subarray(0, Math.min(step, offset + length - at)));
    }
  }

  async cache(offset: number, length: number): Promise<void> {
    const step = 4 * 1024 * 1024;
    for (let at = offset; at < offset + length; at += step) await this.read(at, Math.min(step, offset + length - at));
  }

  // ---- write gate: snapshots see every write acknowledged before them and none after ----
  private async admit(): Promise<void> {
    while (this.gate) await this.gate;
    this.inflight++;
  }

  private leave(): void {
    if (--this.inflight === 0) this.drained?.();
  }

  /** Run fn with no write in flight and new writes held back. */
  protected async quiesce<T>(fn: () => Promise<T>): Promise<T> {
    while (this.gate) await this.gate;
    let open!: () => void;
    this.gate = new Promise((r) => (open = r));
    try {
      if (this.inflight > 0) {
        const drained = new Promise<void>((r) => (this.drained = r));
        const patience = setInterval(() => {
          for (const waited of this.arriving) waited(ARRIVING_PATIENCE_MS);
        }, ARRIVING_PATIENCE_MS);
        try {
          await drained;
        } finally {
          clearInterval(patience);
        }
      }
      this.drained = undefined;
      return await fn();
    } finally {
      this.gate = undefined;
      open();
    }
  }

  // ---- snapshot operations ----
  /** A snapshot's status without building the whole list (every snapshot-export request asks); undefined if there is none. */
  snapshotStatus(name: string): SnapshotInfo['status'] | undefined {
    return this.snapshots().find((x) => x.name === name)?.status;
  }

  findSnapshot(name: string): SnapshotInfo {
    const s = this.snapshots().find((x) => x.name === name);
    if (!s) throw new SnapshotError('ENOENT', `no snapshot named "${name}"`);
    return s;
  }

  async createSnapshot(name: string): Promise<SnapshotInfo> {
    if (this.snapshots().some((s) => s.name === name)) throw new SnapshotError('EEXIST', `snapshot "${name}" already exists`);
    const timer = new SnapshotTimer();
    await this.quiesce(() => {
      timer.mark('quiesce');
      return this.snapshotNow(name, timer);
    });
    return this.findSnapshot(name);
  }

  async deleteSnapshot(name: string): Promise<void> {
    this.findSnapshot(name);
    await this.quiesce(() => this.deleteSnapshotNow(name));
  }

  /**
   * Make the live volume read exactly as the snapshot: every changed range is
   * rewritten through the normal write path, so newer snapshots keep their content.
   */
  async rollback(name: string, onProgress?: (done: number, total: number) => void): Promise<void> {
    const snap = this.findSnapshot(name);
    if (snap.status !== 'valid') throw new SnapshotError('EINVAL', `snapshot "${name}" is ${snap.status}; it cannot be rolled back to`);
    if (snap.size !== this.size) throw new SnapshotError('EINVAL', `snapshot "${name}" has size ${snap.size} but the volume has ${this.size}; resize the volume back first`);
    const changed = await this.changedBlocks(name, undefined);
    const total = changed.reduce((n, c) => n + c.length, 0);
    let done = 0;
    const step = 4 * 1024 * 1024;
    for (const c of changed) {
      for (let at = c.offset; at < c.offset + c.length; at += step) {
        const n = Math.min(step, c.offset + c.length - at);
        const ext = await this.extentsView(name, at, n);
        for (const e of ext) {
          if (e.zero) await this.zero(e.offset, e.length, { mayTrim: true });
          else await this.write(e.offset, await this.readView(name, e.offset, e.length));
        }
        done += n;
        onProgress?.(done, total);
      }
    }
    await this.flush();
  }

  /**
   * Which part of [offset, offset+length) of the live volume changed since snapshot `from`:
   * descriptors from offset on, consecutive, covering at least one byte and at most
   * RANGE_BLOCKS blocks, so that one BLOCK_STATUS request costs the range it asks about,
   * never a walk of the whole volume on the event loop.
   */
  changedInRange(from: string, offset: number, length: number): Array<{ length: number; changed: boolean }> {
    const info = this.findSnapshot(from);
    if (info.status !== 'valid') throw new SnapshotError('EINVAL', `snapshot "${from}" is ${info.status}: its changes are unknown`);
    const bs = this.blockSize;
    const end = Math.min(offset + length, offset + RANGE_BLOCKS * bs - (offset % bs));
    const blockChanged = this.changedSince(from, Math.floor(offset / bs), Math.floor((end - 1) / bs));
    const out: Array<{ length: number; changed: boolean }> = [];
    for (let at = offset; at < end; ) {
      const next = Math.min(end, (Math.floor(at / bs) + 1) * bs);
      // past the snapshot's end everything is new; past the live end nothing is asked
      const changed = at >= info.size || blockChanged(Math.floor(at / bs));
      const last = out[out.length - 1];
      if (last && last.changed === changed) last.length += next - at;
      else out.push({ length: next - at, changed });
      at = next;
    }
    return out;
  }

  /** A test of whether live block l (first <= l <= last) differs (or may differ) from what snapshot `from` holds. */
  protected abstract changedSince(from: string, first: number, last: number): (l: number) => boolean;

  /** Changed extents between two points, clipped to the smaller size, for humans and NBD. */
  async changedExtents(from: string, to: string | undefined): Promise<ChangedExtent[]> {
    this.findSnapshot(from);
    if (to !== undefined) this.findSnapshot(to);
    return this.changedBlocks(from, to);
  }

  /** A read-only block layer showing the snapshot as it was when taken. */
  snapshotLayer(name: string): BlockLayer {
    const info = this.findSnapshot(name);
    if (info.status !== 'valid') throw new SnapshotError('EINVAL', `snapshot "${name}" is ${info.status}`);
    return new SnapshotView(this, name, info.size);
  }
}

/** A snapshot as a read-only BlockLayer (NBD exports VOLUME@SNAPSHOT, clone bases, backups). */
export class SnapshotView implements BlockLayer {
  readonly caps: Capabilities = { readOnly: true, multiConn: true, trim: false, zero: false, fastZero: false, fua: false, cache: true, extents: true };

  constructor(
    private readonly volume: Volume,
    readonly snapshot: string,
    readonly size: number,
  ) {}

  private valid(): void {
    const status = this.volume.snapshotStatus(this.snapshot);
    if (!status) throw new BlockError('EIO', `snapshot "${this.snapshot}" no longer exists`);
    if (status !== 'valid') throw new BlockError('EIO', `snapshot "${this.snapshot}" is ${status}`);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.valid();
    const data = await this.volume.readView(this.snapshot, offset, length);
    this.valid(); // invalidated while we read (COW reserve overflow): the data cannot be trusted
    return data;
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    this.valid();
    return this.volume.extentsView(this.snapshot, offset, length);
  }

  private refuse(): never {
    throw new BlockError('EPERM', `snapshot "${this.snapshot}" is read-only`);
  }

  async write(): Promise<void> {
    this.refuse();
  }
  async trim(): Promise<void> {
    this.refuse();
  }
  async zero(): Promise<void> {
    this.refuse();
  }
  async flush(): Promise<void> {}
  async cache(): Promise<void> {}
  async close(): Promise<void> {}
}

/** Merge adjacent extents of the same kind. */
export function mergeExtents(list: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of list) {
    if (e.length <= 0) continue;
    const last = out[out.length - 1];
    if (last && last.hole === e.hole && last.zero === e.zero && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}

/** Turn a sorted list of block indexes into byte extents clipped to size. */
export function blocksToExtents(blocks: Iterable<number>, blockSize: number, size: number): ChangedExtent[] {
  const sorted = [...blocks].sort((a, b) => a - b);
  const out: ChangedExtent[] = [];
  for (const b of sorted) {
    const off = b * blockSize;
    if (off >= size) continue;
    const len = Math.min(blockSize, size - off);
    const last = out[out.length - 1];
    if (last && last.offset + last.length === off) last.length += len;
    else out.push({ offset: off, length: len });
  }
  return out;
}
