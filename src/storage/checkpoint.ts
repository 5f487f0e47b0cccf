// Checkpoint: the whole metadata of a volume in one file, replaced atomically.
// Layout: "SBCKPT01", u32 JSON length, JSON, the u32 arrays the JSON lists (little
// endian, in order), u32 CRC-32 of everything before it.
//
// Written and read in pieces of at most PIECE bytes, never as one buffer: a row volume's
// pointer table can take gigabytes, and Node refuses a single read or write of 2 GiB or
// more (ERR_OUT_OF_RANGE / ERR_FS_FILE_TOO_LARGE). An array can be handed to the writer as
// consecutive chunks (ChunkedArray), and CheckpointReader hands arrays out piece by piece,
// so neither side needs the table's encoding in memory at once.
import fs from 'node:fs';
import zlib from 'node:zlib';
import { replaceFileAtomic } from '../pool/atomic-file.js';

const MAGIC = Buffer.from('SBCKPT01');
/** bytes per read or write call */
const PIECE = 8 * 1024 * 1024;

/** An array given as its length and its contents in consecutive chunks (produced while the file is written). */
export interface ChunkedArray {
  length: number;
  chunks(): Iterable<Uint32Array>;
}

export type CheckpointArray = Uint32Array | ChunkedArray;

export interface CheckpointData<M> {
  meta: M;
  arrays: Record<string, Uint32Array>;
}

export interface CheckpointContent<M> {
  meta: M;
  arrays: Record<string, CheckpointArray>;
}

export function writeCheckpoint<M extends object>(file: string, data: CheckpointContent<M>): void {
  const names = Object.keys(data.arrays);
  const json = Buffer.from(JSON.stringify({ meta: data.meta, arrays: names.map((n) => [n, data.arrays[n].length]) }));
  replaceFileAtomic(file, (fd) => {
    const out = new PieceWriter(fd);
    out.write(MAGIC);
    out.write(u32(json.length));
    out.write(json);
    for (const name of names) {
      const a = data.arrays[name];
      let written = 0;
      for (const c of a instanceof Uint32Array ? [a] : a.chunks()) {
        out.write(Buffer.from(c.buffer, c.byteOffset, c.byteLength));
        written += c.length;
      }
      if (written !== a.length) throw new Error(`${file}: checkpoint array ${name} announced ${a.length} entries but has ${written}`);
    }
    out.write(u32(out.crc));
    out.end();
  });
}

function u32(x: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32LE(x, 0);
  return b;
}

/** Sequential writes gathered into PIECE-sized writes, with the running CRC-32 of everything written. */
class PieceWriter {
  crc = 0;
  private buf = Buffer.allocUnsafe(PIECE);
  private used = 0;
  constructor(private readonly fd: number) {}

  write(b: Buffer): void {
    this.crc = zlib.crc32(b, this.crc);
    for (let at = 0; at < b.length; ) {
      const n = b.copy(this.buf, this.used, at, Math.min(b.length, at + PIECE - this.used));
      this.used += n;
      at += n;
      if (this.used === PIECE) this.end();
    }
  }

  /** writes out what is gathered */
  end(): void {
    for (let at = 0; at < this.used; ) at += fs.writeSync(this.fd, this.buf, at, this.used - at);
    this.used = 0;
  }
}

/**
 * Reads a checkpoint front to back: begin(name) starts the next array (they come in the
 * order written), take(n) returns its next n entries in a new array. end() checks that every
 * array was read and the CRC; callers must not trust what they built before end() returned.
 * The file's size is checked against the arrays listed at open, so a truncated file is
 * refused before anything the size of its arrays is allocated.
 */
export class CheckpointReader<M> {
  readonly meta: M;
  /** [name, entries] in file order */
  readonly arrays: Array<[string, number]>;
  private pos: number;
  private crc: number;
  private next = 0;
  private left = 0;
  private closed = false;

  private constructor(private readonly file: string, private readonly fd: number) {
    const size = fs.fstatSync(fd).size;
    const head = Buffer.alloc(12);
    if (size < 16 || fs.readSync(fd, head, 0, 12, 0) !== 12 || !head.subarray(0, 8).equals(MAGIC)) throw new Error(`${file}: not a snapblock checkpoint`);
    const jlen = head.readUInt32LE(8);
    if (12 + jlen + 4 > size) throw new Error(`${file}: checkpoint truncated (corrupt checkpoint)`);
    const json = this.readBytes(jlen, 12);
    this.crc = zlib.crc32(json, zlib.crc32(head));
    let parsed: { meta: M; arrays: Array<[string, number]> };
    try {
      parsed = JSON.parse(json.toString('utf8'));
    } catch {
      throw new Error(`${file}: checksum mismatch (corrupt checkpoint)`);
    }
    const listed = parsed.arrays;
    if (!Array.isArray(listed) || !listed.every((a) => Array.isArray(a) && typeof a[0] === 'string' && Number.isSafeInteger(a[1]) && a[1] >= 0)) throw new Error(`${file}: checksum mismatch (corrupt checkpoint)`);
    this.meta = parsed.meta;
    this.arrays = listed;
    this.pos = 12 + jlen;
    const expected = this.pos + 4 * this.arrays.reduce((s, [, n]) => s + n, 0) + 4;
    if (expected !== size) throw new Error(`${file}: checkpoint is ${size} bytes but its arrays need ${expected} (corrupt checkpoint)`);
  }

  static open<M>(file: string): CheckpointReader<M> {
    const fd = fs.openSync(file, 'r');
    try {
      return new CheckpointReader<M>(file, fd);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /** names of the arrays, in order */
  get names(): string[] {
    return this.arrays.map(([name]) => name);
  }

  /** Starts array `name`, which must be the next one; returns its number of entries. */
  begin(name: string): number {
    if (this.left !== 0) throw new Error(`${this.file}: checkpoint array ${this.arrays[this.next - 1][0]} not read to its end`);
    const a = this.arrays[this.next];
    if (!a || a[0] !== name) throw new Error(`${this.file}: checkpoint array ${name} expected, found ${a ? a[0] : 'none'}`);
    this.next++;
    this.left = a[1];
    return a[1];
  }

  /** the next n entries of the current array */
  take(n: number): Uint32Array {
    if (n > this.left) throw new Error(`${this.file}: checkpoint array ${this.arrays[this.next - 1][0]} has only ${this.left} more entries, ${n} wanted`);
    const a = new Uint32Array(n);
    const bytes = Buffer.from(a.buffer);
    this.readInto(bytes, this.pos);
    this.crc = zlib.crc32(bytes, this.crc);
    this.pos += bytes.length;
    this.left -= n;
    return a;
  }

  /** Calls fn with the rest of the current array in chunks of `records` records of `size` entries each. */
  takeRecords(size: number, fn: (chunk: Uint32Array) => void, records = 16384): void {
    if (this.left % size !== 0) throw new Error(`${this.file}: checkpoint array ${this.arrays[this.next - 1][0]} is not made of ${size}-entry records`);
    while (this.left > 0) fn(this.take(Math.min(this.left, size * records)));
  }

  /** Every array read and the checksum right: what was read can be trusted. Closes the file. */
  end(): void {
    if (this.left !== 0 || this.next !== this.arrays.length) throw new Error(`${this.file}: checkpoint not read to its end`);
    const stored = this.readBytes(4, this.pos).readUInt32LE(0);
    this.close();
    if (stored !== this.crc) throw new Error(`${this.file}: checksum mismatch (corrupt checkpoint)`);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }

  private readBytes(n: number, at: number): Buffer {
    const b = Buffer.alloc(n);
    this.readInto(b, at);
    return b;
  }

  private readInto(b: Buffer, at: number): void {
    for (let done = 0; done < b.length; ) {
      const got = fs.readSync(this.fd, b, done, Math.min(PIECE, b.length - done), at + done);
      if (got === 0) throw new Error(`${this.file}: checkpoint truncated (corrupt checkpoint)`);
      done += got;
    }
  }
}

/** The whole checkpoint with every array in memory (cow and mirror volumes, row format 1). */
export function readCheckpoint<M>(file: string): CheckpointData<M> {
  const r = CheckpointReader.open<M>(file);
  try {
    const arrays: Record<string, Uint32Array> = {};
    for (const [name] of r.arrays) arrays[name] = r.take(r.begin(name));
    r.end();
    return { meta: r.meta, arrays };
  } finally {
    r.close();
  }
}
