// `rbd export-diff` / `rbd import-diff` compatible streams (Ceph doc/dev/rbd-diff.rst,
// format v1), so a snapblock snapshot diff can be applied to an RBD image and back.
//
//   "rbd diff v1\n"
//   metadata, in any order, before any data record:
//     'f' le32 len, from-snapshot name      't' le32 len, to-snapshot name
//     's' le64 image size (at the end snapshot)
//   data:
//     'w' le64 offset, le64 length, data    'z' le64 offset, le64 length (reads as zeros)
//   'e'
//
// Like rbd, import checks that the from-snapshot exists on the target and the
// to-snapshot does not, resizes the target to 's', applies the records and then
// creates the to-snapshot. Unlike rbd, it first reads the whole stream and checks it
// (and that snapblock can create the to-snapshot): a refused import changes nothing.
import type { Readable, Writable } from 'node:stream';
import { once } from 'node:events';
import type { NbdClient } from '../nbd/client.js';
import type { Range } from './manifest.js';
import { intersect, subtract } from './ranges.js';
import { connectNbd, readMap, readRange, writeRange, zeroRange, ZERO, type PoolServer } from './source.js';
import { mergeRanges } from './manifest.js';
import { validateName, validateVolumeSize } from '../pool/names.js';

export const RBD_DIFF_V1 = Buffer.from('rbd diff v1\n');
const RBD_DIFF_V2 = Buffer.from('rbd diff v2\n');
const IO_PIECE = 4 * 1024 * 1024;

// ---- encoding ---------------------------------------------------------------

export function nameRecord(tag: 'f' | 't', name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(5 + n.length);
  b.write(tag, 0, 'latin1');
  b.writeUInt32LE(n.length, 1);
  n.copy(b, 5);
  return b;
}

export function sizeRecord(size: number): Buffer {
  const b = Buffer.allocUnsafe(9);
  b.write('s', 0, 'latin1');
  b.writeBigUInt64LE(BigInt(size), 1);
  return b;
}

/** 'w' or 'z' header (a 'w' header is followed by length bytes of data) */
export function extentRecord(tag: 'w' | 'z', offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(17);
  b.write(tag, 0, 'latin1');
  b.writeBigUInt64LE(BigInt(offset), 1);
  b.writeBigUInt64LE(BigInt(length), 9);
  return b;
}

export const END_RECORD = Buffer.from('e');

async function writeOut(out: Writable, b: Buffer): Promise<void> {
  if (!out.write(b)) await once(out, 'drain');
}

export interface ExportDiffResult {
  volume: string;
  from: string | null;
  to: string;
  size: number;
  dataRecords: number;
  dataBytes: number;
  zeroRecords: number;
  zeroBytes: number;
}

/**
 * Write the diff VOLUME@FROM..VOLUME@TO (or all of VOLUME@TO's data without FROM)
 * to out, reading the snapshot through its NBD export.
 */
export async function exportDiff(server: PoolServer, volume: string, to: string, from: string | undefined, out: Writable): Promise<ExportDiffResult> {
  const snaps = await server.snapshots(volume);
  const ti = snaps.findIndex((s) => s.name === to && s.status === 'valid');
  if (ti < 0) throw new Error(`volume ${volume} has no valid snapshot "${to}"`);
  if (from !== undefined) {
    const fi = snaps.findIndex((s) => s.name === from);
    if (fi < 0) throw new Error(`volume ${volume} has no snapshot "${from}"`);
    if (fi >= ti) throw new Error(`--from-snap ${from} must be older than ${to}`);
  }
  const changedCtx = from !== undefined ? `snapblock:changed:${from}` : undefined;
  const nbd = await connectNbd(server.address(`${volume}@${to}`), ['base:allocation', ...(changedCtx ? [changedCtx] : [])]);
  try {
    if (changedCtx && !nbd.contexts.has(changedCtx)) throw new Error(`the server offers no ${changedCtx} on ${volume}@${to}`);
    const size = nbd.size;
    const data = mergeRanges((await readMap(nbd, 'base:allocation')).filter((e) => !(e.flags & ZERO)).map((e) => [e.offset, e.length] as Range));
    let writes: Range[];
    let zeros: Range[] = [];
    if (changedCtx) {
      const changed = mergeRanges((await readMap(nbd, changedCtx)).filter((e) => e.flags & 1).map((e) => [e.offset, e.length] as Range));
      writes = intersect(changed, data);
      zeros = subtract(changed, data);
    } else writes = data;
    const res: ExportDiffResult = { volume, from: from ?? null, to, size, dataRecords: 0, dataBytes: 0, zeroRecords: 0, zeroBytes: 0 };
    await writeOut(out, RBD_DIFF_V1);
    if (from !== undefined) await writeOut(out, nameRecord('f', from));
    await writeOut(out, nameRecord('t', to));
    await writeOut(out, sizeRecord(size));
    // records in offset order; 'w' split in pieces read ahead (bounded) and written in order
    const recs: Array<{ tag: 'w' | 'z'; r: Range }> = [
      ...writes.flatMap(([o, l]) => {
        const parts: Array<{ tag: 'w'; r: Range }> = [];
        for (let at = o; at < o + l; at += IO_PIECE) parts.push({ tag: 'w', r: [at, Math.min(IO_PIECE, o + l - at)] });
        return parts;
      }),
      ...zeros.map((r) => ({ tag: 'z' as const, r })),
    ].sort((a, b) => a.r[0] - b.r[0]);
    const AHEAD = 4;
    const reads = new Map<number, Promise<Buffer>>();
    const prefetch = (i: number) => {
      for (let k = i; k < Math.min(recs.length, i + AHEAD); k++) if (recs[k].tag === 'w' && !reads.has(k)) reads.set(k, readRange(nbd, recs[k].r[0], recs[k].r[1]));
    };
    for (let i = 0; i < recs.length; i++) {
      prefetch(i);
      const { tag, r } = recs[i];
      await writeOut(out, extentRecord(tag, r[0], r[1]));
      if (tag === 'w') {
        const buf = await reads.get(i)!;
        reads.delete(i);
        await writeOut(out, buf);
        res.dataRecords++;
        res.dataBytes += r[1];
      } else {
        res.zeroRecords++;
        res.zeroBytes += r[1];
      }
    }
    await writeOut(out, END_RECORD);
    return res;
  } finally {
    await nbd.close().catch(() => {});
  }
}

// ---- decoding ---------------------------------------------------------------

/** exact-length reads from a stream */
class StreamReader {
  private bufs: Buffer[] = [];
  private have = 0;
  private readonly it: AsyncIterator<Buffer>;
  private ended = false;
  consumed = 0;

  constructor(stream: Readable) {
    this.it = stream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  }

  private async fill(n: number): Promise<boolean> {
    while (this.have < n && !this.ended) {
      const r = await this.it.next();
      if (r.done) this.ended = true;
      else {
        const b = typeof r.value === 'string' ? Buffer.from(r.value) : r.value;
        this.bufs.push(b);
        this.have += b.length;
      }
    }
    return this.have >= n;
  }

  /** n bytes, or an error naming what was being read */
  async read(n: number, what: string): Promise<Buffer> {
    if (!(await this.fill(n))) throw new Error(`rbd diff truncated at byte ${this.consumed + this.have}: expected ${what}`);
    const all = this.bufs.length === 1 ? this.bufs[0] : Buffer.concat(this.bufs);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.bufs = rest.length ? [rest] : [];
    this.have = rest.length;
    this.consumed += n;
    return out;
  }

  /** up to n bytes (at least one), for streaming data */
  async readSome(n: number, what: string): Promise<Buffer> {
    if (!(await this.fill(1))) throw new Error(`rbd diff truncated at byte ${this.consumed}: expected ${what}`);
    return this.read(Math.min(n, this.have), what);
  }
}

export type DiffRecord =
  | { tag: 'f'; name: string }
  | { tag: 't'; name: string }
  | { tag: 's'; size: number }
  | { tag: 'w'; offset: number; length: number }
  | { tag: 'z'; offset: number; length: number }
  | { tag: 'e' };

const u64 = (b: Buffer, at: number, what: string) => {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`rbd diff: ${what} ${v} is too large`);
  return Number(v);
};

export class DiffReader {
  private readonly r: StreamReader;
  constructor(stream: Readable) {
    this.r = new StreamReader(stream);
  }

  async header(): Promise<void> {
    const h = await this.r.read(RBD_DIFF_V1.length, 'the "rbd diff v1" banner');
    if (h.equals(RBD_DIFF_V2)) throw new Error('this is an rbd diff v2 stream (export-diff --export-format 2); only v1 is supported');
    if (!h.equals(RBD_DIFF_V1)) throw new Error('not an rbd diff v1 stream (bad banner)');
  }

  /** the next record; for 'w' the caller must then consume `length` bytes with data() */
  async next(): Promise<DiffRecord> {
    const tag = (await this.r.read(1, 'a record tag')).toString('latin1');
    switch (tag) {
      case 'f':
      case 't': {
        const len = (await this.r.read(4, 'a snapshot name length')).readUInt32LE(0);
        if (len > 4096) throw new Error(`rbd diff: snapshot name of ${len} bytes`);
        const name = (await this.r.read(len, 'a snapshot name')).toString('utf8');
        return tag === 'f' ? { tag, name } : { tag, name };
      }
      case 's':
        return { tag, size: u64(await this.r.read(8, 'the image size'), 0, 'size') };
      case 'w':
      case 'z': {
        const b = await this.r.read(16, `a '${tag}' record`);
        return { tag, offset: u64(b, 0, 'offset'), length: u64(b, 8, 'length') };
      }
      case 'e':
        return { tag };
      default:
        throw new Error(`rbd diff: unknown record tag 0x${Buffer.from(tag, 'latin1').toString('hex')} at byte ${this.r.consumed - 1}`);
    }
  }

  /** stream the data of a 'w' record in pieces of at most max bytes */
  async *data(length: number, max = IO_PIECE): AsyncGenerator<Buffer> {
    let left = length;
    while (left > 0) {
      const b = await this.r.readSome(Math.min(max, left), 'record data');
      left -= b.length;
      yield b;
    }
  }
}

export interface ImportDiffResult {
  volume: string;
  from: string | null;
  to: string | null;
  size: number | null;
  resized: boolean;
  dataRecords: number;
  dataBytes: number;
  zeroRecords: number;
  zeroBytes: number;
  snapshotCreated: string | null;
}

/** What a full pass over a stream found, before anything is applied. */
export interface DiffPlan {
  from: string | null;
  to: string | null;
  size: number | null;
  /** end of the furthest 'w' or 'z' record */
  extentEnd: number;
  dataRecords: number;
  dataBytes: number;
  zeroRecords: number;
  zeroBytes: number;
}

/**
 * Read a whole stream without applying it: the banner, every record, metadata before data,
 * and the closing 'e'. A damaged or truncated stream fails here, before the volume changes.
 */
export async function scanDiff(input: Readable): Promise<DiffPlan> {
  const rd = new DiffReader(input);
  await rd.header();
  const plan: DiffPlan = { from: null, to: null, size: null, extentEnd: 0, dataRecords: 0, dataBytes: 0, zeroRecords: 0, zeroBytes: 0 };
  let rec = await rd.next();
  for (; rec.tag === 'f' || rec.tag === 't' || rec.tag === 's'; rec = await rd.next()) {
    if (rec.tag === 'f') plan.from = rec.name;
    else if (rec.tag === 't') plan.to = rec.name;
    else plan.size = rec.size;
  }
  for (; rec.tag !== 'e'; rec = await rd.next()) {
    if (rec.tag === 'f' || rec.tag === 't' || rec.tag === 's') throw new Error(`rbd diff: '${rec.tag}' metadata record after data records`);
    plan.extentEnd = Math.max(plan.extentEnd, rec.offset + rec.length);
    if (rec.tag === 'w') {
      for await (const _piece of rd.data(rec.length)) {
        /* only its length matters here */
      }
      plan.dataRecords++;
      plan.dataBytes += rec.length;
    } else {
      plan.zeroRecords++;
      plan.zeroBytes += rec.length;
    }
  }
  return plan;
}

/** Everything the target must satisfy, checked before the first write (rbd's checks and snapblock's own). */
async function checkTarget(server: PoolServer, volume: string, plan: DiffPlan): Promise<{ size: number }> {
  const info = await server.volumeInfo(volume);
  if (plan.to !== null) {
    try {
      validateName('snapshot', plan.to);
    } catch (err) {
      throw new Error(`end snapshot: ${(err as Error).message}; snapblock cannot create it, aborting`);
    }
  }
  const snaps = await server.snapshots(volume);
  if (plan.from !== null && !snaps.some((s) => s.name === plan.from)) throw new Error(`start snapshot '${plan.from}' does not exist in volume ${volume}, aborting`);
  if (plan.to !== null && snaps.some((s) => s.name === plan.to)) throw new Error(`end snapshot '${plan.to}' already exists in volume ${volume}, aborting`);
  const size = plan.size ?? info.size;
  if (plan.size !== null) validateVolumeSize(plan.size);
  if (plan.extentEnd > size) throw new Error(`rbd diff: records reach byte ${plan.extentEnd}, past the end of ${volume} (${size} bytes), aborting`);
  return { size };
}

/**
 * Apply an rbd diff v1 stream to VOLUME (through its NBD export), then create the
 * to-snapshot. open() gives the stream from its start; it is read twice: a first pass
 * checks all of it (scanDiff) and the target (checkTarget), so a stream that is damaged,
 * truncated or names what snapblock cannot create is refused with the volume unchanged.
 * Only a failure while applying (an IO error, the server going away) leaves it changed,
 * and the error says how far the import got.
 */
export async function importDiff(server: PoolServer, volume: string, open: () => Readable): Promise<ImportDiffResult> {
  let plan: DiffPlan;
  let size: number;
  try {
    plan = await scanDiff(open());
    ({ size } = await checkTarget(server, volume, plan));
  } catch (err) {
    throw new Error(`${(err as Error).message}; ${volume} was not changed`);
  }
  const res: ImportDiffResult = { volume, from: plan.from, to: plan.to, size: plan.size, resized: false, dataRecords: 0, dataBytes: 0, zeroRecords: 0, zeroBytes: 0, snapshotCreated: null };
  try {
    return await applyDiff(server, volume, open(), size, res);
  } catch (err) {
    const done = res.resized || res.dataRecords || res.zeroRecords ? `; ${volume} was already changed (${res.resized ? `resized to ${size} bytes, ` : ''}${res.dataBytes} bytes written, ${res.zeroBytes} zeroed) and no snapshot was created` : `; ${volume} was not changed`;
    throw new Error(`import-diff failed: ${(err as Error).message}${done}`);
  }
}

async function applyDiff(server: PoolServer, volume: string, input: Readable, size: number, res: ImportDiffResult): Promise<ImportDiffResult> {
  const rd = new DiffReader(input);
  await rd.header();
  let nbd: NbdClient | undefined;
  const inflight = new Set<Promise<void>>();
  let failed: unknown;
  const track = (p: Promise<void>) => {
    const q = p.catch((e) => void (failed ??= e)).finally(() => inflight.delete(q));
    inflight.add(q);
  };
  const drain = async (limit: number) => {
    while (inflight.size > limit) await Promise.race(inflight);
    if (failed) throw failed;
  };
  try {
    let rec = await rd.next();
    while (rec.tag === 'f' || rec.tag === 't' || rec.tag === 's') rec = await rd.next();
    if ((await server.volumeInfo(volume)).size !== size) {
      await server.resizeVolume(volume, size, true);
      res.resized = true;
    }
    nbd = await connectNbd(server.address(volume));
    if (nbd.size !== size) throw new Error(`${volume} has ${nbd.size} bytes, the diff needs ${size}`);
    for (; rec.tag !== 'e'; rec = await rd.next()) {
      // The first pass checked all of this; a stream that changed since is caught anyway.
      if (rec.tag === 'f' || rec.tag === 't' || rec.tag === 's' || rec.offset + rec.length > size) throw new Error('the stream changed between the check and the import');
      if (rec.tag === 'w') {
        let at = rec.offset;
        for await (const piece of rd.data(rec.length)) {
          await drain(8);
          track(writeRange(nbd, at, piece));
          at += piece.length;
        }
        res.dataRecords++;
        res.dataBytes += rec.length;
      } else {
        await drain(8);
        if (rec.length > 0) track(zeroRange(nbd, rec.offset, rec.length));
        res.zeroRecords++;
        res.zeroBytes += rec.length;
      }
    }
    await drain(0);
    await nbd.flush();
    await nbd.close();
    nbd = undefined;
    if (res.to !== null) {
      await server.createSnapshot(volume, res.to);
      res.snapshotCreated = res.to;
    }
    return res;
  } finally {
    await Promise.allSettled(inflight);
    await nbd?.close().catch(() => {});
  }
}
