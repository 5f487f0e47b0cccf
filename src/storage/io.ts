// File IO helpers shared by the snapshot techniques: positional IO that coalesces
// pieces contiguous on disk, zero-fill past EOF, extent maps, grouped syncs.
import * as native from '../native/index.js';
import type { Extent } from '../block/layer.js';
import { mergeExtents } from './volume.js';
import { writeAt, writevAt } from './inline-write.js';

/**
 * Pieces of one buffer laid out on disk, gathered as runs contiguous both on disk and in the
 * buffer, so that a request over many small blocks costs one syscall and one buffer view per
 * run rather than per block.
 */
export class DiskRuns {
  private readonly runs: Array<{ at: number; start: number; len: number }> = [];

  /** buffer bytes [start, start + len) belong at file offset `at` */
  add(at: number, start: number, len: number): void {
    const run = this.runs[this.runs.length - 1];
    if (run && run.at + run.len === at && run.start + run.len === start) run.len += len;
    else this.runs.push({ at, start, len });
  }

  /** the runs as (file offset, view of buf) pieces for readRuns / writeRuns */
  pieces(buf: Buffer): Array<{ at: number; buf: Buffer }> {
    return this.runs.map((r) => ({ at: r.at, buf: buf.subarray(r.start, r.start + r.len) }));
  }
}

/** write each piece (inline or pooled, see inline-write.ts), merging pieces that are contiguous on disk into one vectored write. */
export async function writeRuns(fd: number, pieces: Array<{ at: number; buf: Buffer }>): Promise<void> {
  const jobs: Promise<void>[] = [];
  for (let i = 0; i < pieces.length; ) {
    let j = i + 1;
    let end = pieces[i].at + pieces[i].buf.length;
    while (j < pieces.length && pieces[j].at === end) end += pieces[j++].buf.length;
    jobs.push(j - i === 1 ? writeAt(fd, pieces[i].buf, pieces[i].at) : writevAt(fd, pieces.slice(i, j).map((x) => x.buf), pieces[i].at));
    i = j;
  }
  await Promise.all(jobs);
}

/** pread into each destination, merging pieces contiguous on disk; zero-fill past EOF. */
export async function readRuns(fd: number, pieces: Array<{ at: number; buf: Buffer }>): Promise<void> {
  const jobs: Promise<void>[] = [];
  for (let i = 0; i < pieces.length; ) {
    let j = i + 1;
    let end = pieces[i].at + pieces[i].buf.length;
    while (j < pieces.length && pieces[j].at === end) end += pieces[j++].buf.length;
    const group = pieces.slice(i, j);
    const at = pieces[i].at;
    const want = end - at;
    if (group.length === 1 && cachedRead(fd, group[0].buf, at)) {
      i = j;
      continue;
    }
    jobs.push(
      (group.length === 1 ? native.pread(fd, group[0].buf, at) : native.preadv(fd, group.map((x) => x.buf), at)).then((n) => {
        if (n < want) zeroFrom(group, n);
      }),
    );
    i = j;
  }
  await Promise.all(jobs);
}

function zeroFrom(group: Array<{ buf: Buffer }>, n: number): void {
  let skip = n;
  for (const g of group) {
    if (skip >= g.buf.length) {
      skip -= g.buf.length;
      continue;
    }
    g.buf.fill(0, skip);
    skip = 0;
  }
}

export class GroupCommit {
  private chain: Promise<void> = Promise.resolve();
  private queued?: Promise<void>;

  constructor(private readonly step: () => Promise<void>) {}

  /** Resolves once a step that started after this call has finished. */
  request(): Promise<void> {
    if (this.queued) return this.queued;
    const p = this.chain.then(() => {
      this.queued = undefined;
      return this.step();
    });
    this.queued = p;
    this.chain = p.catch(() => {});
    return p;
  }
}

/**
 * Reads already in the page cache are copied right here (preadv2 RWF_NOWAIT): two context
 * switches through the thread pool cost more than copying up to 1 MiB into a recycled
 * buffer (see io-buffers.ts). Larger reads go to the pool so the event loop never holds
 * for long; uncached ones always do.
 */
const SYNC_READ_MAX = 1024 * 1024;

function cachedRead(fd: number, buf: Buffer, at: number): boolean {
  return buf.length <= SYNC_READ_MAX && native.preadNowait(fd, buf, at) === buf.length;
}

/** pread all of buf; past the end of the file reads as zeroes. */
export async function readAt(fd: number, buf: Buffer, at: number): Promise<void> {
  if (!buf.length || cachedRead(fd, buf, at)) return;
  const n = await native.pread(fd, buf, at);
  if (n < buf.length) buf.fill(0, n);
}

/** SEEK_DATA/SEEK_HOLE extents of a raw file as block-layer extents, covering the whole range. */
export async function fileExtents(fd: number, offset: number, length: number): Promise<Extent[]> {
  const out: Extent[] = [];
  let at = offset;
  for (const e of await native.extents(fd, offset, length)) {
    out.push({ offset: e.offset, length: e.length, hole: !e.data, zero: !e.data });
    at = e.offset + e.length;
  }
  // Past the file's end (it should not be shorter than the view) reads as zeroes.
  if (at < offset + length) out.push({ offset: at, length: offset + length - at, hole: true, zero: true });
  return mergeExtents(out);
}

/** Lay sorted, disjoint ranges (reserve data or recorded holes) over base extents. */
