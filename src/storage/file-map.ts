// Large reads of a volume's live data leave for the client straight from a shared mapping of
// the data file: the socket write then copies page cache -> socket once, where pread and
// write copy twice (~230 against ~400 µs of CPU per MiB measured on this kind of VM).
//
// Cached live writes go in through the same mapping. A 4 KiB pwrite into a file whose page
// cache holds large folios (any file read sequentially) costs ~25 µs in ext4, which walks
// every buffer head of the folio; a store through the mapping pays ext4's page_mkwrite once
// per folio (0.1-2.6 ms measured for 2 MiB folios) and then nothing until writeback cleans
// the folio (server CPU per 4 KiB cow write: ~12 against ~37 µs in bench/peers.mjs).
//
// Writeback (or an fdatasync) leaves a cleaned page mapped read-only, and the next store into
// it faults once per 4 KiB page, running page_mkwrite over the whole folio each time. Before a
// placed receive, whole 64 KiB chunks not known to be writable are therefore unmapped, so the
// stores fault once per folio instead; a receive that still faults about once per page shows
// that something cleaned the file behind our back, and every chunk is unmapped again on its
// next placed receive (unmapUnready, place). Faults are counted per thread, so a receive that
// overlapped one into freshly unmapped chunks (faulting by design) judges nothing.
//
// The hazard of a mapping is SIGBUS: touching a mapped byte past the file's end kills the
// process. So a view is given only below the file's size as fstat reports it then; the file
// only grows while views exist, and whoever shrinks it does so in exclusive(), which waits
// until no view is pinned and gives none out meanwhile.
import fs from 'node:fs';
import * as native from '../native/index.js';
import type { MappedRange } from '../block/layer.js';
import type { PlacedRange } from './volume.js';

/** Mapped in pieces of this size: a Buffer holds at most 4 GiB on Node 20. */
const SEGMENT = 1024 ** 3;
const EFAULT = 14;
const PAGE = 4096;
/** placed stores unmap read-only pages in chunks of this size (see unmapUnready) */
const CHUNK = 64 * 1024;
const CHUNKS_PER_SEGMENT = SEGMENT / CHUNK;

/**
 * Placed receives whose chunks were just unmapped, on this thread, across all maps: their
 * stores fault by design, and faults are counted per thread, so a receive into ready chunks
 * that overlaps one of them cannot tell its own faults apart and judges nothing.
 */
const fresh = { pinned: 0, started: 0 };

export class FileMap {
  private segments: Array<Buffer | undefined> = [];
  /** pinned views by the epoch they were taken in; an epoch ends at each released() call */
  private pinned = new Map<number, number>();
  private epoch = 0;
  private waiters: Array<{ upTo: number; done: () => void }> = [];
  private blocked = false;
  /** per segment, one byte per chunk: 1 once we unmapped its pages and stored into them (writable until something cleans them) */
  private ready: Array<Uint8Array | undefined> = [];
  /** false once unmapping failed: then placed stores take whatever faults they meet */
  private unmapping = true;

  /** @param writable the fd is open for writing and write() may store through the mapping */
  constructor(
    private readonly fd: number,
    private writable = false,
  ) {}

  private segment(seg: number): Buffer {
    return (this.segments[seg] ??= native.mapFile(this.fd, seg * SEGMENT, SEGMENT, this.writable));
  }

  /** The [at, at+length) range as (segment mapping, offset in it, length) pieces. */
  private *spans(at: number, length: number): Generator<[Buffer, number, number]> {
    for (let pos = at; pos < at + length; ) {
      const seg = Math.floor(pos / SEGMENT);
      const off = pos - seg * SEGMENT;
      const n = Math.min(SEGMENT - off, at + length - pos);
      yield [this.segment(seg), off, n];
      pos += n;
    }
  }

  /**
   * Whether [at, at+length) may be stored into through the mapping on this thread now: every
   * page already cached (no wait for the disk), below the file's end, no shrink in progress.
   */
  private storable(at: number, length: number, size = fs.fstatSync(this.fd).size): boolean {
    if (this.blocked || !this.writable) return false;
    if (at + length > size) return false;
    for (const [map, off, n] of this.spans(at, length)) if (!native.residentNow(map, off, n)) return false;
    return true;
  }

  /**
   * Store data at `at` through the mapping, on this thread, where storable. The kernel does
   * the stores (native copyIntoMapping), so a page it cannot provide is an error, not SIGBUS.
   * False when not (or not wholly) done: the caller then writes all of it normally.
   */
  write(at: number, data: Buffer): boolean {
    if (!this.storable(at, data.length)) return false;
    let from = 0;
    for (const [map, off, n] of this.spans(at, data.length)) {
      const copied = native.copyIntoMapping(map, off, data.subarray(from, from + n));
      if (copied === n) {
        from += n;
        continue;
      }
      // EFAULT is a page the kernel could not provide; anything else (EPERM from a seccomp
      // filter, ENOSYS) means this process cannot use the call at all.
      if (copied < 0 && copied !== -EFAULT) this.writable = false;
      return false;
    }
    return true;
  }

  /**
   * Pinned writable views of the file runs, in order, for the kernel to receive a socket's
   * bytes into (BlockLayer.writeInPlace); undefined unless every run is storable and already
   * allocated on disk. The kernel's copy then cannot fail for want of space (no block to
   * allocate) and never raises SIGBUS (a fault it cannot serve fails the recv instead).
   */
  place(runs: ReadonlyArray<{ at: number; len: number }>): PlacedRange | undefined {
    const size = fs.fstatSync(this.fd).size; // once: a ROW range can be many runs
    for (const r of runs) {
      if (!this.storable(r.at, r.len, size)) return undefined;
      if (native.dataEnd(this.fd, r.at) < r.at + r.len) return undefined;
    }
    const v = this.view(runs, size);
    if (!v) return undefined;
    let unmapped = false;
    try {
      for (const r of runs) unmapped = this.unmapUnready(r.at, r.len) || unmapped;
    } catch {
      this.unmapping = false; // madvise refused (a seccomp filter): stores then fault as they may
    }
    if (unmapped) {
      fresh.pinned++;
      fresh.started++;
    }
    // Only a receive into ready chunks, with none into fresh ones beside it, judges its faults.
    const judged = !unmapped && fresh.pinned === 0;
    const started = fresh.started;
    const faults0 = judged ? native.threadMinorFaults() : 0;
    let released = false;
    return {
      pieces: v.pieces as Buffer[],
      release: () => {
        if (released) return;
        released = true;
        if (unmapped) fresh.pinned--;
        else if (judged && fresh.started === started) {
          // A receive into ready chunks faults only where something made their pages
          // read-only again (fdatasync, writeback, a shrink): about one fault per page.
          const pages = runs.reduce((n, r) => n + Math.ceil(r.len / PAGE), 0);
          if (native.threadMinorFaults() - faults0 >= Math.max(8, pages / 2)) this.ready = [];
        }
        v.release();
      },
    };
  }

  /**
   * Before the kernel stores into [at, at+length): unmap the pages of every whole chunk in it
   * that is not ready, and mark those ready. The stores then take one fault per folio, which
   * maps all of it writable, where pages left read-only (by writeback, an fdatasync, or a
   * mapped read) take one fault per 4 KiB page, each running ext4's page_mkwrite over the
   * whole folio: 1.2 ms against 0.19 ms per MiB measured here with ~1 MiB folios. Partial
   * chunks are left alone: unmapping pages the stores do not cover would leave them to fault
   * later, in a chunk marked ready. Returns whether anything was unmapped.
   */
  private unmapUnready(at: number, length: number): boolean {
    if (!this.unmapping) return false;
    let any = false;
    // Chunk numbers within each segment's mapping: whole chunks only, and never across a seam.
    for (const [map, off, n] of this.spans(at, length)) {
      const ready = (this.ready[Math.floor(at / SEGMENT)] ??= new Uint8Array(CHUNKS_PER_SEGMENT));
      for (let c = Math.ceil(off / CHUNK), end = Math.floor((off + n) / CHUNK); c < end; ) {
        if (ready[c]) {
          c++;
          continue;
        }
        let last = c;
        while (last + 1 < end && !ready[last + 1]) last++;
        native.unmapPages(map, c * CHUNK, (last - c + 1) * CHUNK);
        ready.fill(1, c, last + 1);
        any = true;
        c = last + 1;
      }
      at += n;
    }
    return any;
  }

  /**
   * Pinned views of the file pieces in order (a number is a hole of that length, passed
   * through), or undefined when some piece reaches past the file's end (`size`: as fstat just
   * said, if the caller asked) or a shrink is in progress (the caller then reads normally).
   */
  view(pieces: ReadonlyArray<{ at: number; len: number } | number>, size?: number): MappedRange | undefined {
    if (this.blocked) return undefined;
    let end = 0;
    for (const p of pieces) if (typeof p !== 'number') end = Math.max(end, p.at + p.len);
    if (end > (size ?? fs.fstatSync(this.fd).size)) return undefined;
    const out: Array<Buffer | number> = [];
    for (const p of pieces) {
      if (typeof p === 'number') {
        out.push(p);
        continue;
      }
      for (const [map, off, n] of this.spans(p.at, p.len)) out.push(map.subarray(off, off + n));
    }
    const epoch = this.epoch;
    this.pinned.set(epoch, (this.pinned.get(epoch) ?? 0) + 1);
    let released = false;
    return {
      pieces: out,
      release: () => {
        if (released) return;
        released = true;
        const left = this.pinned.get(epoch)! - 1;
        if (left) this.pinned.set(epoch, left);
        else {
          this.pinned.delete(epoch);
          this.wake();
        }
      },
    };
  }

  /** [offset, offset+length) of a file that is the image itself, its holes found with SEEK_HOLE. */
  raw(offset: number, length: number): MappedRange | undefined {
    if (this.blocked) return undefined;
    const pieces: Array<{ at: number; len: number } | number> = [];
    let covered = offset;
    for (const e of native.extentsNow(this.fd, offset, length)) {
      pieces.push(e.data ? { at: e.offset, len: e.length } : e.length);
      covered = e.offset + e.length;
    }
    if (covered < offset + length) pieces.push(offset + length - covered); // past the end reads as zeroes
    return this.view(pieces);
  }

  /**
   * Resolves once every view pinned before this call has been released. Views pinned later
   * do not delay it, so it ends under a steady stream of mapped reads and placed writes.
   */
  released(): Promise<void> {
    const upTo = this.epoch++;
    if (this.oldestPinned() > upTo) return Promise.resolve();
    return new Promise((done) => this.waiters.push({ upTo, done }));
  }

  private oldestPinned(): number {
    let oldest = Infinity;
    for (const e of this.pinned.keys()) oldest = Math.min(oldest, e);
    return oldest;
  }

  private wake(): void {
    if (!this.waiters.length) return;
    const oldest = this.oldestPinned();
    this.waiters = this.waiters.filter((w) => {
      if (w.upTo >= oldest) return true;
      w.done();
      return false;
    });
  }

  /** Run fn (which may shrink the file) with no view pinned and none given out meanwhile. */
  async exclusive<T>(fn: () => T | Promise<T>): Promise<T> {
    const was = this.blocked;
    this.blocked = true;
    try {
      await this.released(); // no view is given out meanwhile: then none is pinned
      this.ready = []; // a shrink unmaps the pages it drops
      return await fn();
    } finally {
      this.blocked = was;
    }
  }

  /** No more views; the mappings go when the last view's Buffer is collected. */
  close(): void {
    this.blocked = true;
    this.segments = [];
  }
}
