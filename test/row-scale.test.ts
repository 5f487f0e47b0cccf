// Issue 17: a redirect-on-write volume's metadata follows the blocks mapped, not the regions
// touched. The volume-level case is the one reported: a 1 TiB volume with 65,536 blocks
// written 16 MiB apart (one per pointer-table page) made a 2 GiB checkpoint that could not
// be written, and the volume could not be opened again. The table and the checkpoint's
// piecewise reader and writer are also checked against plain models.
import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { RowVolume } from '../src/storage/row-volume.js';
import { PointerTable, PAGE_ENTRIES, DENSE_AT } from '../src/storage/row-table.js';
import { CheckpointReader, readCheckpoint, writeCheckpoint } from '../src/storage/checkpoint.js';
import { tempDir } from './helpers/server.js';

const log = pino({ level: 'silent' });
const KiB = 1024;
const BS = 4 * KiB;
const TiB = 1024 ** 4;

/** a block's content: its index and a version, repeated (distinct per block and version) */
function tagged(block: number, version: number): Buffer {
  const tag = Buffer.alloc(8);
  tag.writeUInt32LE(block, 0);
  tag.writeUInt32LE(version, 4);
  return Buffer.alloc(BS, tag);
}

/** runs op(i) for i < count, `depth` at a time */
async function each(count: number, op: (i: number) => Promise<void>, depth = 32): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: depth }, async () => {
    while (next < count) await op(next++);
  }));
}

/** every listed block reads back as tagged(block, version), byte for byte; returns the first that does not */
async function firstWrong(v: RowVolume, blocks: number[], version: number): Promise<number | undefined> {
  let wrong: number | undefined;
  await each(blocks.length, async (i) => {
    const got = await v.read(blocks[i] * BS, BS);
    if (!got.equals(tagged(blocks[i], version)) && wrong === undefined) wrong = blocks[i];
  });
  return wrong;
}

function tableBytes(v: RowVolume): number {
  return (v as unknown as { table: PointerTable }).table.bytes;
}

describe('row volume scale (issue 17)', () => {
  it('a 1 TiB volume with 65,536 blocks written 16 MiB apart checkpoints small, reopens after a clean close and after a crash', { timeout: 120_000 }, async () => {
    const dir = path.join(tempDir('row-scale-'), 'v');
    const pages = 65536;
    RowVolume.create(dir, TiB, BS);
    const first = Array.from({ length: pages }, (_, i) => i * PAGE_ENTRIES); // 16 MiB apart
    const v = await RowVolume.open(dir, { log });
    await each(pages, (i) => v.write(first[i] * BS, tagged(first[i], 1)));
    await v.flush();
    // one block per page: tens of bytes each in memory, not a 32 KiB page
    expect(tableBytes(v) / pages).toBeLessThan(100);
    await v.close();
    // (block, pointer, birth) per block: 12 bytes each, plus the header
    expect(fs.statSync(path.join(dir, 'checkpoint')).size).toBeLessThan(pages * 12 + 4 * KiB);

    const reopened = await RowVolume.open(dir, { log });
    expect(await firstWrong(reopened, first, 1)).toBeUndefined();
    expect((await reopened.read((first[7] + 1) * BS, BS)).equals(Buffer.alloc(BS))).toBe(true); // the block after one written
    expect(await reopened.check()).toEqual([]);
    // a second block in every page, flushed, then a crash (no close): only the journal has them
    const second = first.map((l) => l + 1 + (l % 4000));
    await each(pages, (i) => reopened.write(second[i] * BS, tagged(second[i], 2)));
    await reopened.flush();

    const afterCrash = await RowVolume.open(dir, { log }); // replays 65,536 MAP records, checkpoints
    expect(await firstWrong(afterCrash, first, 1)).toBeUndefined();
    expect(await firstWrong(afterCrash, second, 2)).toBeUndefined();
    expect(await afterCrash.check()).toEqual([]);
    expect(fs.statSync(path.join(dir, 'checkpoint')).size).toBeLessThan(2 * pages * 12 + 4 * KiB);
    await afterCrash.close();
    const last = await RowVolume.open(dir, { log });
    expect(await firstWrong(last, second, 2)).toBeUndefined();
    await last.close();
    fs.rmSync(path.dirname(dir), { recursive: true, force: true }); // 512 MiB of data: kept only after a failure
  });
});

/** deterministic LCG */
function rng(seed: number) {
  let x = seed >>> 0;
  return () => ((x = (Math.imul(x, 1664525) + 1013904223) >>> 0) / 2 ** 32);
}

/** the table's present entries, sorted, as a plain array */
function dump(t: PointerTable): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = [];
  t.forEachEntry((l, p, b) => out.push([l, p, b]));
  return out.sort((a, b) => a[0] - b[0]);
}

/** a checkpoint of the table alone, read back */
function roundTrip(t: PointerTable, file: string): PointerTable {
  writeCheckpoint(file, { meta: {}, arrays: t.checkpointArrays() });
  const r = CheckpointReader.open(file);
  const back = PointerTable.read(t.length, r);
  r.end();
  return back;
}

describe('PointerTable', () => {
  it('behaves like a map of blocks across sparse pages, pages turning dense, deletes and checkpoints', () => {
    const n = 40 * PAGE_ENTRIES + 123;
    const t = new PointerTable(n);
    const model = new Map<number, [number, number]>();
    const r = rng(7);
    const file = path.join(tempDir('row-table-'), 'ck');
    for (let step = 0; step < 60_000; step++) {
      // pages 0-3 fill past DENSE_AT; the rest stay sparse
      const l = r() < 0.6 ? Math.floor(r() * 4 * PAGE_ENTRIES) : Math.floor(r() * n);
      const cleared = r() < 0.1;
      const p = cleared ? 0 : Math.floor(r() * 2 ** 32);
      const b = cleared ? 0 : Math.floor(r() * 50);
      t.set(l, p, b);
      if (p === 0 && b === 0) model.delete(l);
      else model.set(l, [p, b]);
      if (step % 20_000 === 19_999) {
        const want = [...model].map(([k, [pp, bb]]) => [k, pp, bb]).sort((x, y) => x[0] - y[0]);
        expect(dump(t)).toEqual(want);
        expect(t.verify()).toEqual([]);
        expect(dump(roundTrip(t, file))).toEqual(want);
      }
    }
    for (let l = 0; l < n; l += 97) {
      expect(t.ptr(l)).toBe(model.get(l)?.[0] ?? 0);
      expect(t.birth(l)).toBe(model.get(l)?.[1] ?? 0);
    }
    const born: number[] = [];
    t.bornAfter(40, (l) => born.push(l));
    expect(born.sort((x, y) => x - y)).toEqual([...model].filter(([, [, b]]) => b > 40).map(([k]) => k).sort((x, y) => x - y));
    // pages past DENSE_AT are held dense: a fraction of the map's cost per entry
    expect(t.bytes / model.size).toBeLessThan(40);
  });

  it('checkpoints a page dense only when that is smaller than its triples', () => {
    const t = new PointerTable(4 * PAGE_ENTRIES);
    for (let j = 0; j < PAGE_ENTRIES; j++) t.set(j, j + 1, 1); // page 0 full
    for (let j = 0; j <= DENSE_AT; j++) t.set(PAGE_ENTRIES + j, j + 1, 1); // page 1 just dense in memory
    t.set(3 * PAGE_ENTRIES, 5, 1); // page 3: one block
    const a = t.checkpointArrays();
    expect([...a.pages]).toEqual([0]);
    expect(a.dense.length).toBe(2 * PAGE_ENTRIES);
    expect(a.entries.length).toBe(3 * (DENSE_AT + 2));
  });

  it('reads format 2 (every listed page whole) into sparse and dense pages', () => {
    const file = path.join(tempDir('row-table-'), 'ck');
    const map = new Uint32Array(2 * PAGE_ENTRIES);
    const birth = new Uint32Array(2 * PAGE_ENTRIES);
    map[5] = 9; // page 2: one block
    birth[5] = 3;
    for (let j = 0; j < PAGE_ENTRIES; j++) [map[PAGE_ENTRIES + j], birth[PAGE_ENTRIES + j]] = [j + 100, 2]; // page 7: full
    writeCheckpoint(file, { meta: {}, arrays: { pages: Uint32Array.from([2, 7]), map, birth } });
    const r = CheckpointReader.open(file);
    const t = PointerTable.readFormat2(8 * PAGE_ENTRIES, r);
    r.end();
    expect(t.ptr(2 * PAGE_ENTRIES + 5)).toBe(9);
    expect(t.birth(2 * PAGE_ENTRIES + 5)).toBe(3);
    expect(t.ptr(7 * PAGE_ENTRIES + 4095)).toBe(4195);
    expect(t.size).toBe(1 + PAGE_ENTRIES);
    expect(t.verify()).toEqual([]);
    // only the full page costs a dense page
    expect(t.bytes).toBeLessThan(2 * 2 * PAGE_ENTRIES * 4);
  });
});

describe('checkpoint file', () => {
  it('writes and reads arrays larger than one piece, given whole or as chunks', () => {
    const file = path.join(tempDir('ckpt-'), 'ck');
    const big = Uint32Array.from({ length: 3_000_000 }, (_, i) => (i * 2654435761) >>> 0); // 12 MB: more than one 8 MiB piece
    const chunks = [big.subarray(0, 1), big.subarray(1, 2_500_000), big.subarray(2_500_000)];
    writeCheckpoint(file, { meta: { v: 1 }, arrays: { whole: big, chunked: { length: big.length, chunks: () => chunks }, empty: new Uint32Array(0) } });
    const ck = readCheckpoint<{ v: number }>(file);
    expect(ck.meta).toEqual({ v: 1 });
    expect(Object.keys(ck.arrays)).toEqual(['whole', 'chunked', 'empty']);
    expect(Buffer.from(ck.arrays.whole.buffer).equals(Buffer.from(big.buffer))).toBe(true);
    expect(Buffer.from(ck.arrays.chunked.buffer).equals(Buffer.from(big.buffer))).toBe(true);
    const r = CheckpointReader.open(file);
    r.begin('whole');
    const pieces: number[] = [];
    r.takeRecords(3, (c) => pieces.push(c.length), 1000);
    expect(pieces.every((k) => k === 3000)).toBe(true);
    expect(() => r.end()).toThrow(/not read to its end/);
    r.close();
  });

  it('refuses a corrupt or truncated checkpoint, and keeps the old one when an array is not what it announced', () => {
    const file = path.join(tempDir('ckpt-'), 'ck');
    writeCheckpoint(file, { meta: { v: 1 }, arrays: { a: Uint32Array.from([1, 2, 3]) } });
    const good = fs.readFileSync(file);
    const flipped = Buffer.from(good);
    flipped[good.length - 8] ^= 1;
    fs.writeFileSync(file, flipped);
    expect(() => readCheckpoint(file)).toThrow(/checksum mismatch/);
    fs.writeFileSync(file, good.subarray(0, good.length - 4));
    expect(() => readCheckpoint(file)).toThrow(/corrupt checkpoint/);
    fs.writeFileSync(file, good);
    expect(() => writeCheckpoint(file, { meta: { v: 2 }, arrays: { a: { length: 5, chunks: () => [Uint32Array.from([1])] } } })).toThrow(/announced 5 entries but has 1/);
    expect(readCheckpoint<{ v: number }>(file).meta.v).toBe(1);
    expect(fs.readdirSync(path.dirname(file))).toEqual(['ck']);
  });
});
