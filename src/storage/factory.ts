// One place that knows which class implements which snapshot technique.
import type { Logger } from 'pino';
import type { BlockLayer } from '../block/layer.js';
import { RowVolume } from './row-volume.js';
import { CowVolume } from './cow-volume.js';
import { MirrorVolume } from './mirror-volume.js';
import type { SnapshotMode, Volume } from './volume.js';

export interface VolumeParams {
  size: number;
  blockSize: number;
  /** COW: bytes of reserve space per snapshot */
  cowReserve: number;
}

export function createVolumeFiles(mode: SnapshotMode, dir: string, p: VolumeParams): void {
  switch (mode) {
    case 'row':
      return RowVolume.create(dir, p.size, p.blockSize);
    case 'cow':
      return CowVolume.create(dir, p.size, p.blockSize, p.cowReserve);
    case 'mirror':
      return MirrorVolume.create(dir, p.size, p.blockSize);
    default:
      throw new Error(`snapshot mode ${mode} is not implemented yet`);
  }
}

export async function openVolume(mode: SnapshotMode, dir: string, opts: { log: Logger; base?: BlockLayer; params: VolumeParams }): Promise<Volume> {
  switch (mode) {
    case 'row':
      return RowVolume.open(dir, { log: opts.log, base: opts.base });
    case 'cow':
    case 'mirror':
      // Their data is a plain raw image read in place: there is no "unallocated, read the base" state.
      if (opts.base) throw new Error(`snapshot mode ${mode} cannot hold a clone; clones need mode row`);
      return mode === 'cow' ? CowVolume.open(dir, { log: opts.log }) : MirrorVolume.open(dir, { log: opts.log });
    default:
      throw new Error(`snapshot mode ${mode} is not implemented yet`);
  }
}
