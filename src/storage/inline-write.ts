// Buffered writes done on the JS thread when the kernel will not make them wait.
//
// Handing a write to the thread pool costs the JS thread a futex wake-up (20–30 µs on this
// kind of VM, more than a whole 4 KiB page-cache write, ~10 µs) and a second context switch
// to come back; nbdkit's file plugin pays neither, its worker does the pwrite itself. A
// page-cache write only blocks when the kernel must read a partial page from disk first, or
// when balance_dirty_pages throttles the writer because too much of memory is dirty. So a
// write runs inline only when it covers whole pages, is at most INLINE_MAX bytes, and the
// dirty page cache is well under the kernel's background threshold; everything else (and
// every write for a while after an inline one turned out slow) goes to the thread pool.
// Where the file is mapped (file-map.ts), an inline write whose pages are all cached goes in
// through the mapping instead of pwrite.
// Set SNAPBLOCK_INLINE_WRITES=0 to send every write to the pool, SNAPBLOCK_MAPPED_WRITES=0 to
// keep inline writes off the mapping.
import fs from 'node:fs';
import * as native from '../native/index.js';
import type { FileMap } from './file-map.js';

const PAGE = 4096;
/** larger writes go to the pool: an inline copy of 4 MiB already holds the loop ~1 ms */
export const INLINE_MAX = 4 * 1024 * 1024;
/** how often the dirty page cache is re-read from /proc/meminfo */
const SAMPLE_MS = 20;
/** an inline write slower than this closes the gate for CLOSE_MS */
const SLOW_MS = 2;
/**
 * the same for a write through the mapping, whose first store into a clean large folio costs
 * ext4 up to a few ms once (page_mkwrite prepares every block of the folio; measured 0.1-2.6 ms
 * for 2 MiB folios), after which stores into it cost nothing until writeback cleans it again
 */
const MAPPED_SLOW_MS = 10;
const CLOSE_MS = 1000;

/** What the gate needs to know about memory, in bytes. */
export interface DirtyState {
  /** Dirty + Writeback */
  dirty: number;
  /** dirty bytes below which inline writes are allowed */
  budget: number;
}

export class InlineWriteGate {
  private sampledAt = -Infinity;
  private state: DirtyState = { dirty: 0, budget: 0 };
  private closedUntil = 0;
  /** counters, for tests and debugging */
  readonly stats = { inline: 0, mapped: 0, pool: 0, slow: 0 };

  constructor(
    private readonly enabled: boolean,
    private readonly sample: () => DirtyState,
    private readonly now: () => number = () => performance.now(),
  ) {}

  /** May a write of `length` bytes at `offset` run on the JS thread now? */
  allows(offset: number, length: number): boolean {
    if (!this.enabled || length > INLINE_MAX || offset % PAGE !== 0 || length % PAGE !== 0) return false;
    if (this.now() < this.closedUntil) return false;
    return this.dirtyRoom();
  }

  /**
   * Is the dirty page cache well under the kernel's background threshold, so that dirtying
   * pages cannot be throttled by balance_dirty_pages? Also asked before a payload is received
   * in place (volume.ts writeInPlace): its page faults on the JS thread would be throttled too.
   */
  dirtyRoom(): boolean {
    const t = this.now();
    if (t - this.sampledAt >= SAMPLE_MS) {
      this.sampledAt = t;
      try {
        this.state = this.sample();
      } catch {
        this.state = { dirty: 0, budget: 0 }; // unknown memory state: never inline
      }
    }
    return this.state.dirty < this.state.budget;
  }

  /** Report how long an inline write took; a slow one closes the gate for a while. */
  took(ms: number, slowMs = SLOW_MS): void {
    if (ms <= slowMs) return;
    this.stats.slow++;
    this.closedUntil = this.now() + CLOSE_MS;
  }
}

const meminfoKb = (text: string, key: string): number => {
  const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text);
  if (!m) throw new Error(`/proc/meminfo has no ${key}`);
  return Number(m[1]) * 1024;
};

const readNumber = (file: string): number | undefined => {
  try {
    const n = Number(fs.readFileSync(file, 'utf8').trim());
    return Number.isFinite(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
};

/** This process's cgroup memory limit (v2 memory.max or v1 memory.limit_in_bytes), if any. */
function cgroupMemoryLimit(): number | undefined {
  let limits: Array<number | undefined> = [];
  try {
    for (const line of fs.readFileSync('/proc/self/cgroup', 'utf8').split('\n')) {
      const [, controllers, where] = line.split(':');
      if (controllers === '') limits.push(readNumber(`/sys/fs/cgroup${where}/memory.max`));
      if (controllers?.split(',').includes('memory')) limits.push(readNumber('/sys/fs/cgroup/memory/memory.limit_in_bytes'));
    }
  } catch {
    limits = [];
  }
  const found = limits.filter((x): x is number => x !== undefined);
  return found.length ? Math.min(...found) : undefined;
}

/**
 * The real state: /proc/meminfo's Dirty + Writeback against half of the kernel's background
 * writeback threshold (dirty_background_bytes, or dirty_background_ratio of the memory this
 * process may use), far below where writers get throttled (midway to dirty_ratio).
 */
export function procDirtyState(): () => DirtyState {
  const limit = cgroupMemoryLimit();
  const bgBytes = readNumber('/proc/sys/vm/dirty_background_bytes');
  const bgRatio = readNumber('/proc/sys/vm/dirty_background_ratio') ?? 10;
  return () => {
    const info = fs.readFileSync('/proc/meminfo', 'utf8');
    const usable = Math.min(meminfoKb(info, 'MemAvailable'), limit ?? Infinity);
    const background = bgBytes ?? (usable * bgRatio) / 100;
    return { dirty: meminfoKb(info, 'Dirty') + meminfoKb(info, 'Writeback'), budget: background / 2 };
  };
}

export const inlineWrites = new InlineWriteGate(process.env.SNAPBLOCK_INLINE_WRITES !== '0', procDirtyState());
/** whether volumes map their data files writable for mapped writes */
export const mappedWrites = process.env.SNAPBLOCK_MAPPED_WRITES !== '0';

function inline(fd: number, bufs: Buffer[], at: number, length: number): Promise<void> {
  const t = performance.now();
  try {
    const done = bufs.length === 1 ? fs.writeSync(fd, bufs[0], 0, length, at) : fs.writevSync(fd, bufs, at);
    if (done < length) {
      // a short write (rare on regular files): the rest from one joined copy
      const rest = Buffer.concat(bufs).subarray(done);
      for (let off = 0; off < rest.length; ) off += fs.writeSync(fd, rest, off, rest.length - off, at + done + off);
    }
  } catch (err) {
    return Promise.reject(err);
  }
  inlineWrites.took(performance.now() - t);
  inlineWrites.stats.inline++;
  return Promise.resolve();
}

/** Buffered write of buf at `at`: inline when the gate allows it, else on the thread pool. */
export function writeAt(fd: number, buf: Buffer, at: number): Promise<void> {
  if (inlineWrites.allows(at, buf.length)) return inline(fd, [buf], at, buf.length);
  inlineWrites.stats.pool++;
  return native.pwrite(fd, buf, at);
}

/** Buffered vectored write of bufs, back to back from `at`: inline or pooled like writeAt. */
export function writevAt(fd: number, bufs: Buffer[], at: number): Promise<void> {
  const length = bufs.reduce((n, b) => n + b.length, 0);
  if (inlineWrites.allows(at, length)) return inline(fd, bufs, at, length);
  inlineWrites.stats.pool++;
  return native.pwritev(fd, bufs, at);
}

/** writeAt for the file `map` maps: an inline write goes through the mapping where it can. */
export function writeAtMapped(map: FileMap, fd: number, buf: Buffer, at: number): Promise<void> {
  if (inlineWrites.allows(at, buf.length)) {
    const t = performance.now();
    if (map.write(at, buf)) {
      inlineWrites.took(performance.now() - t, MAPPED_SLOW_MS);
      inlineWrites.stats.mapped++;
      return Promise.resolve();
    }
  }
  return writeAt(fd, buf, at);
}
