// The on-disk skeleton every snapshot technique shares (docs/FORMAT.md): a directory with
// a checkpoint, a journal replayed over it, and a data file; plus the snapshot bookkeeping
// (ids, names, generations) that is the same whatever the technique.
import fs from 'node:fs';
import path from 'node:path';
import * as native from '../native/index.js';
import { CheckpointReader, readCheckpoint, writeCheckpoint, type CheckpointContent, type CheckpointData } from './checkpoint.js';
import { Journal, type Rec } from './journal.js';
import { Volume, SnapshotError } from './volume.js';
import { BlockError, type MappedRange } from '../block/layer.js';
import { FileMap } from './file-map.js';
import { mappedWrites } from './inline-write.js';

/** What every technique's checkpoint metadata holds. */
export interface VolumeMeta {
  format: string;
  version: number;
  /** journal epoch: records of older epochs are already in the checkpoint */
  epoch: number;
  size: number;
  blockSize: number;
  /** generation of the next write interval; a snapshot closes one */
  gen: number;
  nextSnapId: number;
}

export interface SnapRef {
  id: number;
  name: string;
  /** cow snapshots can be invalidated (reserve overflow); the others are always valid */
  status?: 'valid' | 'invalid';
}

export abstract class JournaledVolume<M extends VolumeMeta, S extends SnapRef> extends Volume {
  protected snaps: S[] = [];
  /** the data file mapped for large live reads and cached live writes (file-map.ts); shrinking the file goes through map.exclusive */
  protected readonly map: FileMap;

  protected constructor(
    protected readonly dir: string,
    protected meta: M,
    protected journal: Journal,
    protected readonly fd: number,
  ) {
    super();
    this.map = new FileMap(fd, mappedWrites);
  }

  /**
   * Live reads straight from the data file where it is the image itself (cow, mirror; row maps
   * through its pointer table). Never for snapshots: a COW snapshot's unpreserved blocks are
   * live bytes that a later write changes.
   */
  readMapped(offset: number, length: number): MappedRange | undefined {
    return this.map.raw(offset, length);
  }

  /**
   * Run a sync (data fdatasync, journal commit, or a flush made of them). The first one that
   * fails poisons the volume until it is reopened: every later sync fails too, because the
   * kernel may have dropped the dirty pages the failed one was to write (the "fsyncgate"
   * lesson), so a later success would vouch for lost data. The failure is also recorded in the
   * volume directory (best effort: the filesystem may be full) for `check`.
   */
  protected async durably<T>(op: () => Promise<T>): Promise<T> {
    if (this.syncFailure) throw poisoned(this.syncFailure);
    try {
      return await op();
    } catch (err) {
      if (!this.syncFailure) this.poison(err as Error);
      throw err;
    }
  }

  private syncFailure?: Error;

  private poison(err: Error): void {
    this.syncFailure = err;
    const note = { at: new Date().toISOString(), code: (err as NodeJS.ErrnoException).code ?? 'EIO', message: err.message };
    try {
      fs.writeFileSync(path.join(this.dir, SYNC_FAILED), JSON.stringify(note) + '\n', { mode: 0o600 });
    } catch {
      // a full or failing filesystem: the volume still refuses every flush until reopened
    }
  }

  override syncFailures(): string[] {
    return syncFailureProblems(this.dir);
  }

  override clearSyncFailure(): boolean {
    const file = path.join(this.dir, SYNC_FAILED);
    if (!fs.existsSync(file)) return false;
    fs.rmSync(file, { force: true });
    return true;
  }

  protected override persistMetadata(): Promise<void> | undefined {
    return this.journal.persistSoon();
  }

  get size(): number {
    return this.meta.size;
  }

  get blockSize(): number {
    return this.meta.blockSize;
  }

  /** Whether ok(l) holds for every logical block l that [offset, offset+length) touches. */
  protected everyBlock(offset: number, length: number, ok: (l: number) => boolean): boolean {
    const bs = this.meta.blockSize;
    for (let l = Math.floor(offset / bs), last = Math.floor((offset + length - 1) / bs); l <= last; l++) if (!ok(l)) return false;
    return true;
  }

  override snapshotStatus(name: string): 'valid' | 'invalid' | undefined {
    const s = this.snaps.find((x) => x.name === name);
    return s && (s.status ?? 'valid');
  }

  protected snapById(id: number): S {
    const s = this.snaps.find((x) => x.id === id);
    if (!s) throw new Error(`journal names unknown snapshot id ${id}`);
    return s;
  }

  protected snapByName(name: string): S {
    const s = this.snaps.find((x) => x.name === name);
    if (!s) throw new SnapshotError('ENOENT', `no snapshot named "${name}"`);
    return s;
  }

  /** A snapshot record, new or replayed: the next write interval and snapshot id move past it. */
  protected countSnapshot(m: { id: number; gen: number }): void {
    this.meta.gen = m.gen + 1;
    this.meta.nextSnapId = Math.max(this.meta.nextSnapId, m.id + 1);
  }
}

/** The note a failed sync leaves in the volume directory (docs/FORMAT.md). */
export const SYNC_FAILED = 'sync-failed';

/** `check` problems: a sync that failed since the note was last cleared (by `check --repair`, once the data is verified). */
export function syncFailureProblems(dir: string): string[] {
  const file = path.join(dir, SYNC_FAILED);
  if (!fs.existsSync(file)) return [];
  let what = 'unknown error';
  try {
    const n = JSON.parse(fs.readFileSync(file, 'utf8')) as { at: string; code: string; message: string };
    what = `${n.code} at ${n.at}: ${n.message}`;
  } catch {
    // unreadable note: still a failed sync
  }
  return [`a data or journal sync failed (${what}); writes acknowledged before it may be lost: verify the volume's data, then clear this with \`check --repair\``];
}

/** The error every sync after a failed one reports. */
function poisoned(first: Error): BlockError {
  return new BlockError('EIO', `an earlier sync of this volume failed (${(first as NodeJS.ErrnoException).code ?? first.message}); writes acknowledged before it may be lost, so no flush can succeed until the volume is reopened`);
}

/** A new volume directory: the data file (sparse, dataSize bytes) and the first checkpoint. */
export function createVolumeFiles(dir: string, first: CheckpointContent<VolumeMeta>, dataSize: number): void {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const fd = fs.openSync(path.join(dir, 'data'), 'w', 0o600);
  try {
    if (dataSize > 0) fs.ftruncateSync(fd, dataSize);
  } finally {
    fs.closeSync(fd);
  }
  writeCheckpoint(path.join(dir, 'checkpoint'), first);
}

/** A volume directory's checkpoint, refused unless it is `format` (`what` names it) in versions 1..maxVersion. */
export function readVolumeCheckpoint<M extends VolumeMeta>(dir: string, format: string, what: string, maxVersion: number): CheckpointData<M> {
  const ck = readCheckpoint<M>(path.join(dir, 'checkpoint'));
  checkVolumeFormat(dir, ck.meta, format, what, maxVersion);
  return ck;
}

/** readVolumeCheckpoint for checkpoints too large to hold whole: the caller reads the arrays (and calls end()). */
export function openVolumeCheckpoint<M extends VolumeMeta>(dir: string, format: string, what: string, maxVersion: number): CheckpointReader<M> {
  const r = CheckpointReader.open<M>(path.join(dir, 'checkpoint'));
  try {
    checkVolumeFormat(dir, r.meta, format, what, maxVersion);
  } catch (err) {
    r.close();
    throw err;
  }
  return r;
}

function checkVolumeFormat(dir: string, m: VolumeMeta, format: string, what: string, maxVersion: number): void {
  if (m.format !== format) throw new Error(`${dir}: not a ${what} volume (format ${m.format})`);
  if (!(m.version >= 1 && m.version <= maxVersion)) {
    throw new Error(`${dir}: ${format} format version ${m.version} is not supported by this snapblock (it reads versions 1 to ${maxVersion}); upgrade snapblock`);
  }
}

/**
 * The journal records of the checkpoint's epoch (to replay) and the open data file. With records
 * replayed or volatile batches discarded, the caller checkpoints (so the discarded ones never count).
 */
export function openJournalAndData(dir: string, epoch: number): { journal: Journal; records: Rec[]; discarded: number; fd: number } {
  const { journal, records, discarded } = Journal.open(path.join(dir, 'journal'), epoch);
  const { fd } = native.openFile(path.join(dir, 'data'), { direct: false, readOnly: false });
  return { journal, records, discarded, fd };
}
