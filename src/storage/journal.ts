// Metadata journal: an append-only file of checksummed batches of records.
// Rules (docs/FORMAT.md): records reach the file as soon as the operation that appended them
// completes, in a *volatile* batch (a pwrite into the page cache, no sync, tagged with the
// kernel's boot id), so a killed process loses nothing it acknowledged. A *commit* batch,
// written with RWF_DSYNC after the data it describes is durable, makes every batch before a
// mark durable and valid after a power loss too. On open, volatile batches no commit covers
// count only if written in this boot (the page cache that holds their data survived);
// a batch is valid only if its checksum matches and its epoch equals the checkpoint's (a
// stale journal left by a crash after a checkpoint is ignored); a torn tail is discarded.
import fs from 'node:fs';
import zlib from 'node:zlib';
import * as native from '../native/index.js';

const FILE_MAGIC = Buffer.from('SBJRNL01');
/** a committed batch: its records, and every volatile batch before its COMMIT mark, count after any crash */
const BATCH_MAGIC = 0x4a424154; // 'JBAT'
/** a volatile batch: payload = 16-byte boot id, then records */
const VOLATILE_MAGIC = 0x4a564f4c; // 'JVOL'
const HEADER = 16; // magic(8) + version(4) + epoch(4)
const BATCH_HEADER = 16; // magic, length, crc, epoch
const BOOT_ID_BYTES = 16;
const VERSION = 1;
/**
 * Once written to, the file is kept written (with zeroes) this far ahead of the last batch: a
 * commit then overwrites blocks the file already has, and its sync has only data to flush, no
 * size or extent change for the filesystem to journal (about half the latency on ext4). The
 * first batch after an open or a reset writes them (that commit syncs the whole file), so an
 * idle volume keeps no zeroes. Replay stops at the zeroes like at any other invalid batch header.
 */
const PREALLOC = 1024 * 1024;
const ZEROES = Buffer.alloc(PREALLOC);
/**
 * Volatile batches not yet durable are kept in memory up to this many bytes, so that a commit
 * rewrites them with its own batch in one pwritev2(RWF_DSYNC) (which syncs only the range it
 * writes); past it they are dropped and the commit syncs the whole file instead.
 */
const UNSYNCED_KEEP = 4 * 1024 * 1024;

/** Fixed-size record: kind + four u32 fields; META carries JSON. */
export const enum Kind {
  MAP = 1, // a=block, b=physical+1 (0 unallocated, ZERO marker), c=birth
  DELTA = 2, // a=snapshot id, b=block, c=physical+1, d=birth
  UNDELTA = 3, // a=snapshot id, b=block
  FREE = 4, // a=physical
  WRITTEN = 5, // a=block, b=generation (COW/mirror: block written in this generation)
  COPY = 6, // a=snapshot id, b=block, reserve slot, d=generation of the copy
  COMMIT = 7, // a,b = low and high 32 bits of the file offset every batch before which is committed
  META = 0xff, // JSON
}

export interface Rec {
  k: Kind;
  a: number;
  b: number;
  c: number;
  d: number;
  json?: unknown;
}

/** This boot of the kernel: a page cache written under it is still the one we read. */
export function currentBootId(): Buffer {
  const hex = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim().replace(/-/g, '');
  return Buffer.from(hex, 'hex');
}

export interface OpenedJournal {
  journal: Journal;
  /** the records to replay, in order */
  records: Rec[];
  /** volatile batches of an earlier boot that were dropped: the caller must checkpoint (new epoch) so no later commit revives them */
  discarded: number;
}

export class Journal {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private writeAt: number;
  /** the file is written (batches, then zeroes) up to here */
  private allocEnd: number;
  /** everything before this offset is durable */
  private syncedTo: number;
  /** volatile batches at or after syncedTo, in file order (empty once dropped, see UNSYNCED_KEEP) */
  private unsynced: Buffer[] = [];
  private unsyncedBytes = 0;
  /** a commit must sync the whole file: unsynced batches were dropped from memory, or zeroes were written ahead unsynced */
  private fullSync = false;
  /** every batch before this offset is covered by a durable COMMIT */
  private committedTo: number;
  private chain: Promise<void> = Promise.resolve();

  private constructor(
    private readonly fd: number,
    private epoch: number,
    end: number,
    private readonly bootId: Buffer,
  ) {
    this.writeAt = end;
    this.syncedTo = end;
    this.committedTo = end;
    this.allocEnd = end; // zeroes are written ahead by the first batch, so an idle volume's journal stays 16 bytes
  }

  /** Open (creating if needed) and return the records of valid batches for this epoch. */
  static open(file: string, epoch: number, bootId: Buffer = currentBootId()): OpenedJournal {
    const exists = fs.existsSync(file);
    const fd = fs.openSync(file, exists ? 'r+' : 'w+', 0o600);
    const size = fs.fstatSync(fd).size;
    const head = Buffer.alloc(HEADER);
    if (size >= HEADER) fs.readSync(fd, head, 0, HEADER, 0);
    if (size < HEADER || !head.subarray(0, 8).equals(FILE_MAGIC) || head.readUInt32LE(12) !== epoch) {
      // New, foreign or stale journal: start it afresh for this epoch.
      writeHeader(fd, epoch);
      fs.ftruncateSync(fd, HEADER);
      return { journal: new Journal(fd, epoch, HEADER, bootId), records: [], discarded: 0 };
    }
    const data = Buffer.alloc(size - HEADER);
    fs.readSync(fd, data, 0, data.length, HEADER);
    const { records, discarded, end } = replay(data, epoch, bootId);
    if (HEADER + end < size) fs.ftruncateSync(fd, HEADER + end); // torn or garbage tail, or preallocated zeroes (written afresh next)
    return { journal: new Journal(fd, epoch, HEADER + end, bootId), records, discarded };
  }

  get size(): number {
    return this.writeAt + this.pendingBytes;
  }

  append(k: Kind, a = 0, b = 0, c = 0, d = 0): void {
    const r = Buffer.allocUnsafe(17);
    r.writeUInt8(k, 0);
    r.writeUInt32LE(a >>> 0, 1);
    r.writeUInt32LE(b >>> 0, 5);
    r.writeUInt32LE(c >>> 0, 9);
    r.writeUInt32LE(d >>> 0, 13);
    this.pending.push(r);
    this.pendingBytes += 17;
  }

  appendMeta(json: unknown): void {
    const body = Buffer.from(JSON.stringify(json));
    const r = Buffer.allocUnsafe(5 + body.length);
    r.writeUInt8(Kind.META, 0);
    r.writeUInt32LE(body.length, 1);
    body.copy(r, 5);
    this.pending.push(r);
    this.pendingBytes += r.length;
  }

  /**
   * Write the records appended since the last call as one volatile batch into the page cache
   * (synchronous: a few hundred bytes, microseconds), so they survive the process. Called
   * before an operation that appended records is acknowledged.
   */
  persist(): void {
    if (!this.pendingBytes) return;
    const batch = encodeBatch(VOLATILE_MAGIC, this.epoch, [this.bootId, ...this.pending]);
    const at = this.reserve(batch.length);
    try {
      writeAll(this.fd, batch, at);
    } catch (err) {
      // (a full filesystem) the records stay pending: their operations fail, a later persist retries
      this.writeAt = at;
      throw err;
    }
    this.pending = [];
    this.pendingBytes = 0;
    if (this.fullSync) return;
    this.unsynced.push(batch);
    this.unsyncedBytes += batch.length;
    if (this.unsyncedBytes > UNSYNCED_KEEP) this.dropUnsynced();
  }

  private persisting?: Promise<void>;

  /**
   * persist() once for every operation that completes in this turn of the event loop (in its
   * check phase), instead of once each: undefined when nothing is pending.
   */
  persistSoon(): Promise<void> | undefined {
    if (!this.pendingBytes) return this.persisting;
    this.persisting ??= new Promise<void>((resolve, reject) =>
      setImmediate(() => {
        this.persisting = undefined;
        try {
          this.persist();
          resolve();
        } catch (err) {
          reject(err);
        }
      }),
    );
    return this.persisting;
  }

  /**
   * Persist what is appended and return the mark a later commit makes durable: the caller
   * seals, makes the data those records describe durable, then commits the mark.
   */
  seal(): number {
    this.persist();
    return this.writeAt;
  }

  /** Make every batch before `mark` durable and committed. Commits run in call order. */
  commit(mark: number): Promise<void> {
    const p = this.chain.then(() => this.commitNow(mark));
    this.chain = p.catch(() => {});
    return p;
  }

  private async commitNow(mark: number): Promise<void> {
    if (mark <= this.committedTo) return;
    const batch = encodeBatch(BATCH_MAGIC, this.epoch, [commitRecord(mark)]);
    const at = this.reserve(batch.length);
    try {
      if (this.fullSync) {
        this.dropUnsynced();
        this.fullSync = false;
        await native.pwritev(this.fd, [batch], at);
        await native.fdatasync(this.fd); // the dropped volatile batches, zeroes written ahead, and this batch
      } else {
        // One pwritev2(RWF_DSYNC) over the unsynced volatile batches and the commit batch: durable
        // on return, one trip to the IO thread pool. The volatile bytes are rewritten unchanged.
        const bufs = [...this.unsynced, batch];
        this.unsynced = [];
        this.unsyncedBytes = 0;
        await native.pwritev(this.fd, bufs, this.syncedTo, true);
      }
    } catch (err) {
      this.dropUnsynced(); // what is durable is unknown now: a later commit syncs everything
      throw err;
    }
    this.syncedTo = Math.max(this.syncedTo, at + batch.length);
    this.committedTo = Math.max(this.committedTo, mark);
  }

  /**
   * Room for a batch of `len` bytes at the end of the journal, written synchronously. Past the
   * zeroes written ahead, more zeroes first; those are not durable, so the next commit syncs the file.
   */
  private reserve(len: number): number {
    const at = this.writeAt;
    if (at + len > this.allocEnd) {
      const end = writtenAheadEnd(at + len);
      this.dropUnsynced();
      try {
        for (let z = this.allocEnd; z < end; z += PREALLOC) {
          writeAll(this.fd, ZEROES.subarray(0, Math.min(PREALLOC, end - z)), z);
          this.allocEnd = Math.min(end, z + PREALLOC);
        }
      } catch (err) {
        // A full filesystem: the batch alone may still fit (in the file's last block), and the
        // commands that free space (volume and snapshot delete) must still be able to record it.
        if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
      }
    }
    this.writeAt += len;
    return at;
  }

  /** Forget the unsynced volatile batches kept for rewriting: the next commit syncs the whole file. */
  private dropUnsynced(): void {
    this.fullSync = true;
    this.unsynced = [];
    this.unsyncedBytes = 0;
  }

  /** Start a new, empty journal for a new epoch (after a checkpoint made the old one redundant). */
  async reset(epoch: number): Promise<void> {
    await this.chain;
    this.epoch = epoch;
    writeHeader(this.fd, epoch);
    fs.ftruncateSync(this.fd, HEADER);
    this.pending = [];
    this.pendingBytes = 0;
    this.unsynced = [];
    this.unsyncedBytes = 0;
    this.fullSync = false;
    this.writeAt = this.syncedTo = this.committedTo = HEADER;
    this.allocEnd = HEADER;
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}

/** The COMMIT record of a mark (a file offset, split into two u32). */
function commitRecord(mark: number): Buffer {
  const lo = mark % 0x100000000;
  const rec = Buffer.alloc(17);
  rec.writeUInt8(Kind.COMMIT, 0);
  rec.writeUInt32LE(lo, 1);
  rec.writeUInt32LE((mark - lo) / 0x100000000, 5);
  return rec;
}

/** One batch: header (magic, payload length, CRC-32 of the payload, epoch), then the payload. */
function encodeBatch(magic: number, epoch: number, parts: Buffer[]): Buffer {
  const payload = Buffer.concat(parts);
  const out = Buffer.allocUnsafe(BATCH_HEADER + payload.length);
  out.writeUInt32LE(magic, 0);
  out.writeUInt32LE(payload.length, 4);
  out.writeUInt32LE(zlib.crc32(payload), 8);
  out.writeUInt32LE(epoch, 12);
  payload.copy(out, BATCH_HEADER);
  return out;
}

/**
 * The records of the valid batches of `data` (the file after its header), in order. Volatile
 * batches wait for a COMMIT covering them; at the end, those left count only if written in this
 * boot, else they are dropped (a power loss may have kept them without the data they describe).
 */
function replay(data: Buffer, epoch: number, bootId: Buffer): { records: Rec[]; discarded: number; end: number } {
  const records: Rec[] = [];
  let waiting: Array<{ at: number; boot: Buffer; recs: Rec[] }> = [];
  let pos = 0;
  while (pos + BATCH_HEADER <= data.length) {
    const magic = data.readUInt32LE(pos);
    if (magic !== BATCH_MAGIC && magic !== VOLATILE_MAGIC) break;
    const len = data.readUInt32LE(pos + 4);
    const crc = data.readUInt32LE(pos + 8);
    const ep = data.readUInt32LE(pos + 12);
    if (ep !== epoch || pos + BATCH_HEADER + len > data.length) break;
    const payload = data.subarray(pos + BATCH_HEADER, pos + BATCH_HEADER + len);
    if (zlib.crc32(payload) !== crc) break;
    const at = HEADER + pos;
    if (magic === VOLATILE_MAGIC) {
      waiting.push({ at, boot: payload.subarray(0, BOOT_ID_BYTES), recs: decode(payload.subarray(BOOT_ID_BYTES)) });
    } else {
      for (const r of decode(payload)) {
        if (r.k !== Kind.COMMIT) records.push(r);
        else {
          const mark = r.a + r.b * 0x100000000;
          for (const w of waiting) if (w.at < mark) records.push(...w.recs);
          waiting = waiting.filter((w) => w.at >= mark);
        }
      }
    }
    pos += BATCH_HEADER + len;
  }
  const thisBoot = waiting.every((w) => w.boot.equals(bootId));
  if (thisBoot) for (const w of waiting) records.push(...w.recs);
  return { records, discarded: thisBoot ? 0 : waiting.length, end: pos };
}

/** where the zeroes written ahead of `from` end: the next PREALLOC boundary at least PREALLOC ahead */
const writtenAheadEnd = (from: number) => Math.ceil((from + PREALLOC) / PREALLOC) * PREALLOC;

/** pwrite all of buf at `at`; a short write (a filesystem filling up) is an ENOSPC error, never ignored */
function writeAll(fd: number, buf: Buffer, at: number): void {
  const n = fs.writeSync(fd, buf, 0, buf.length, at);
  if (n !== buf.length) throw Object.assign(new Error(`journal: wrote ${n} of ${buf.length} bytes (no space left on device?)`), { code: 'ENOSPC' });
}

function writeHeader(fd: number, epoch: number): void {
  const h = Buffer.alloc(HEADER);
  FILE_MAGIC.copy(h, 0);
  h.writeUInt32LE(VERSION, 8);
  h.writeUInt32LE(epoch, 12);
  fs.writeSync(fd, h, 0, HEADER, 0);
}

function decode(payload: Buffer): Rec[] {
  const out: Rec[] = [];
  let pos = 0;
  while (pos < payload.length) {
    const k = payload.readUInt8(pos) as Kind;
    if (k === Kind.META) {
      const len = payload.readUInt32LE(pos + 1);
      out.push({ k, a: 0, b: 0, c: 0, d: 0, json: JSON.parse(payload.toString('utf8', pos + 5, pos + 5 + len)) });
      pos += 5 + len;
    } else {
      out.push({ k, a: payload.readUInt32LE(pos + 1), b: payload.readUInt32LE(pos + 5), c: payload.readUInt32LE(pos + 9), d: payload.readUInt32LE(pos + 13) });
      pos += 17;
    }
  }
  return out;
}
