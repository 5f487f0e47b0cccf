// The on-disk skeleton every snapshot technique shares (docs/FORMAT.md): a directory with
// a checkpoint, a journal replayed over it, and a data file; plus the snapshot bookkeeping
// (ids, names, generations) that is the same whatever the technique.
import fs from 'node:fs';
import path from 'node:path';
import * as native from '../native/index.js';
import { CheckpointReader, readCheckpoint, writeCheckpoint, type CheckpointContent, type CheckpointData } from './checkpoint.js';
import { Journal, type Rec } from './journal.js';
import { Volume, SnapshotError } from './volume.js';
import type { MappedRange } from '../block/layer.js';
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

/** The journal records of the checkpoint's epoch (to replay) and the open data file. */
export function openJournalAndData(dir: string, epoch: number): { journal: Journal; records: Rec[]; fd: number } {
  const { journal, records } = Journal.open(path.join(dir, 'journal'), epoch);
  const { fd } = native.openFile(path.join(dir, 'data'), { direct: false, readOnly: false });
  return { journal, records, fd };
}
