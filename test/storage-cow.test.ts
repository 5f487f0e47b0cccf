// CowVolume at unit level: byte-for-byte views against an in-memory model, reserve
// overflow, deletion, rollback, changed extents, reopen and simulated crashes.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import pino from 'pino';
import { CowVolume } from '../src/storage/cow-volume.js';
import { createVolumeFiles, openVolume } from '../src/storage/factory.js';
import { SnapshotError, type Volume } from '../src/storage/volume.js';
import { BlockError } from '../src/block/layer.js';

import { Model, pattern, rng, verify } from './helpers/model.js';
const KiB = 1024;
const BS = 4 * KiB;
const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const log = pino({ level: 'silent' });
let tmp: string;
let seq = 0;

beforeAll(() => {
  const base = path.join(repoRoot, '.cache', 'test-tmp');
  fs.mkdirSync(base, { recursive: true });
  tmp = fs.mkdtempSync(path.join(base, 'cow-'));
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));


function newDir(): string {
  return path.join(tmp, `v${seq++}`);
}

async function make(size: number, reserve: number, dir = newDir()): Promise<{ v: CowVolume; dir: string }> {
  createVolumeFiles('cow', dir, { size, blockSize: BS, cowReserve: reserve });
  const v = (await openVolume('cow', dir, { log, params: { size, blockSize: BS, cowReserve: reserve } })) as CowVolume;
  return { v, dir };
}

const reopen = (dir: string) => CowVolume.open(dir, { log });

async function dw(v: Volume, m: Model, off: number, data: Buffer): Promise<void> {
  m.write(off, data);
  await v.write(off, data);
}

describe('cow volume', () => {
  it('keeps the data in place as a raw image', async () => {
    const { v, dir } = await make(256 * KiB, 64 * KiB);
    const d = pattern(10_000, 1);
    await v.write(5000, d);
    await v.flush();
    const raw = fs.readFileSync(path.join(dir, 'data'));
    expect(raw.length).toBe(256 * KiB);
    expect(raw.subarray(5000, 15000).equals(d)).toBe(true);
    await v.close();
  });

  it('snapshots see the volume as it was: full, partial and unaligned overwrites, trims, zeroes', async () => {
    const size = 512 * KiB + 3000; // last block partial
    const { v } = await make(size, 512 * KiB);
    const m = new Model(size);
    await dw(v, m, 0, pattern(64 * KiB, 1));
    await dw(v, m, 200 * KiB + 17, pattern(50_000, 2));
    await dw(v, m, size - 5000, pattern(5000, 3));
    await v.createSnapshot('s1');
    m.snap('s1');
    await dw(v, m, 0, pattern(BS, 4)); // full block
    await dw(v, m, BS + 100, pattern(200, 5)); // partial
    await dw(v, m, 3 * BS - 10, pattern(BS + 20, 6)); // unaligned over two blocks
    await dw(v, m, 300 * KiB, pattern(3 * BS, 7)); // into a hole
    await dw(v, m, size - 100, pattern(100, 8)); // the partial last block
    await v.trim(8 * BS, 2 * BS);
    m.zero(8 * BS, 2 * BS);
    await v.zero(10 * BS + 5, 3000, { mayTrim: true });
    m.zero(10 * BS + 5, 3000);
    await v.zero(12 * BS, BS);
    m.zero(12 * BS, BS);
    await verify(v, m);
    await v.createSnapshot('s2');
    m.snap('s2');
    await dw(v, m, 0, pattern(20 * BS, 9));
    await dw(v, m, 210 * KiB, pattern(1, 10));
    await verify(v, m);
    // Later writes to an already copied block copy nothing more.
    const own = v.snapshots().map((s) => s.ownBytes);
    await dw(v, m, 0, pattern(BS, 11));
    expect(v.snapshots().map((s) => s.ownBytes)).toEqual(own);
    expect(v.snapshots().map((s) => s.status)).toEqual(['valid', 'valid']);
    await verify(v, m);
    await v.close();
  });

  it('concurrent writes to one block while its original is copied out are all kept', async () => {
    const { v } = await make(256 * KiB, 256 * KiB);
    const m = new Model(256 * KiB);
    await dw(v, m, 0, pattern(64 * KiB, 1));
    await v.createSnapshot('s');
    m.snap('s');
    const jobs: Promise<void>[] = [];
    for (let i = 0; i < 64; i++) {
      const off = (i % 8) * BS + Math.floor(i / 8) * 512; // 8 writers per block, disjoint bytes
      const d = pattern(512, 100 + i);
      m.write(off, d);
      jobs.push(v.write(off, d));
    }
    await Promise.all(jobs);
    await verify(v, m);
    expect(v.snapshots()[0].ownBytes).toBe(8 * BS);
    await v.close();
  });

  it('random operations against several snapshots, concurrent within a round', async () => {
    const size = 1024 * KiB;
    const { v, dir } = await make(size, 1024 * KiB);
    const m = new Model(size);
    const r = rng(7);
    for (let round = 0; round < 6; round++) {
      const jobs: Promise<void>[] = [];
      const used = new Set<number>();
      for (let i = 0; i < 40; i++) {
        const b = r(size / BS);
        if (used.has(b)) continue; // disjoint blocks: the model cannot order overlapping writes
        used.add(b);
        const off = b * BS + r(BS / 2);
        const len = 1 + r(BS / 2);
        if (r(5) === 0) {
          m.zero(off, len);
          jobs.push(v.trim(off, len));
        } else {
          const d = pattern(len, round * 100 + i);
          m.write(off, d);
          jobs.push(v.write(off, d));
        }
      }
      await Promise.all(jobs);
      await v.createSnapshot(`r${round}`);
      m.snap(`r${round}`);
    }
    await verify(v, m);
    await v.close();
    const v2 = await reopen(dir);
    await verify(v2, m);
    await v2.close();
  });

  it('reserve overflow invalidates that snapshot only; the volume keeps working', async () => {
    const lines: string[] = [];
    const sink = new Writable({ write: (c, _e, cb) => (lines.push(String(c)), cb()) });
    const warnLog = pino({ level: 'warn' }, sink);
    const dir = newDir();
    createVolumeFiles('cow', dir, { size: 256 * KiB, blockSize: BS, cowReserve: 4 * BS });
    const v = await CowVolume.open(dir, { log: warnLog });
    const m = new Model(256 * KiB);
    await dw(v, m, 0, pattern(32 * BS, 1));
    await v.createSnapshot('small');
    const view = v.snapshotLayer('small');
    await dw(v, m, 0, pattern(4 * BS, 2)); // fills the reserve exactly
    expect(v.snapshots()[0].status).toBe('valid');
    await dw(v, m, 40 * BS, pattern(BS, 3)); // a hole: costs no reserve
    expect(v.snapshots()[0].status).toBe('valid');
    await dw(v, m, 4 * BS, pattern(BS, 4)); // overflow
    expect(v.snapshots()[0].status).toBe('invalid');
    expect(v.snapshots()[0].ownBytes).toBe(0);
    await expect(view.read(0, BS)).rejects.toBeInstanceOf(BlockError);
    expect(() => v.snapshotLayer('small')).toThrow(SnapshotError);
    await expect(v.rollback('small')).rejects.toThrow(/invalid/);
    expect(lines.join('')).toMatch(/invalidated.*reserve.*full/);
    expect(JSON.parse(lines[0]).level).toBeGreaterThanOrEqual(40);
    expect(fs.existsSync(path.join(dir, 'snap-1.reserve'))).toBe(false);
    await dw(v, m, 50 * BS, pattern(10 * BS, 5));
    await v.createSnapshot('next');
    m.snap('next');
    await dw(v, m, 50 * BS, pattern(2 * BS, 6));
    await verify(v, m);
    await v.close();
    const v2 = await CowVolume.open(dir, { log });
    expect(v2.snapshots().map((s) => [s.name, s.status])).toEqual([
      ['small', 'invalid'],
      ['next', 'valid'],
    ]);
    await verify(v2, m);
    await v2.deleteSnapshot('small');
    expect(await v2.check()).toEqual([]);
    await v2.close();
  });

  for (const which of ['oldest', 'middle', 'newest'] as const) {
    it(`deleting the ${which} snapshot keeps the others intact`, async () => {
      const { v, dir } = await make(256 * KiB, 256 * KiB);
      const m = new Model(256 * KiB);
      for (let i = 0; i < 3; i++) {
        await dw(v, m, i * 3 * BS, pattern(8 * BS, i + 1));
        await v.createSnapshot(`s${i}`);
        m.snap(`s${i}`);
      }
      await dw(v, m, 0, pattern(16 * BS, 9));
      const name = which === 'oldest' ? 's0' : which === 'middle' ? 's1' : 's2';
      await v.deleteSnapshot(name);
      m.snaps.delete(name);
      expect(v.snapshots().map((s) => s.name)).toEqual([...m.snaps.keys()]);
      // snap-4.reserve: the empty spare the next snapshot will use
      expect(fs.readdirSync(dir).filter((f) => f.endsWith('.reserve') && f !== 'snap-4.reserve')).toHaveLength(2);
      await dw(v, m, 4 * BS, pattern(8 * BS, 10));
      await verify(v, m);
      await v.close();
      await verify(await reopen(dir), m);
    });
  }

  it('rollback makes the volume read as the snapshot and leaves newer snapshots alone', async () => {
    const { v } = await make(256 * KiB, 256 * KiB);
    const m = new Model(256 * KiB);
    await dw(v, m, 0, pattern(20 * BS, 1));
    await v.createSnapshot('a');
    m.snap('a');
    await dw(v, m, 5 * BS + 7, pattern(10 * BS, 2));
    await v.trim(0, 2 * BS);
    m.zero(0, 2 * BS);
    await dw(v, m, 40 * BS, pattern(BS, 3));
    await v.createSnapshot('b');
    m.snap('b');
    await v.rollback('a');
    m.live = Buffer.from(m.snaps.get('a')!);
    await verify(v, m);
    expect(await v.changedExtents('a', undefined)).not.toEqual([]); // rollback rewrote them
    await v.close();
  });

  it('changedExtents tells changes between snapshots from changes after them', async () => {
    const size = 256 * KiB + 1000;
    const { v } = await make(size, 256 * KiB);
    await v.write(0, pattern(64 * BS + 1000, 1));
    await v.createSnapshot('a');
    await v.write(2 * BS, pattern(BS, 2)); // block 2
    await v.write(10 * BS - 1, pattern(2, 3)); // blocks 9 and 10
    await v.createSnapshot('b');
    await v.write(20 * BS, pattern(BS, 4)); // block 20
    await v.write(2 * BS, pattern(10, 5)); // block 2 again
    await v.trim(64 * BS, 1000); // the partial last block
    await v.createSnapshot('c');
    await v.write(30 * BS, pattern(BS, 6));
    const blocks = (list: Array<{ offset: number; length: number }>) => list.flatMap((e) => Array.from({ length: Math.ceil(e.length / BS) }, (_, i) => e.offset / BS + i));
    expect(blocks(await v.changedExtents('a', 'b'))).toEqual([2, 9, 10]);
    expect(blocks(await v.changedExtents('b', 'a'))).toEqual([2, 9, 10]);
    expect(blocks(await v.changedExtents('b', 'c'))).toEqual([2, 20, 64]);
    expect(blocks(await v.changedExtents('a', 'c'))).toEqual([2, 9, 10, 20, 64]);
    expect(blocks(await v.changedExtents('c', undefined))).toEqual([30]);
    expect(blocks(await v.changedExtents('a', undefined))).toEqual([2, 9, 10, 20, 30, 64]);
    expect((await v.changedExtents('a', undefined)).at(-1)).toEqual({ offset: 64 * BS, length: 1000 });
    // growing the volume: the new tail counts as changed
    await v.resize(size + 64 * KiB);
    expect((await v.changedExtents('c', undefined)).at(-1)).toEqual({ offset: size, length: 64 * KiB });
    await v.close();
  });

  it('extents: a block held by the snapshot can be a hole live and vice versa', async () => {
    const { v } = await make(64 * BS, 64 * BS);
    await v.write(0, pattern(4 * BS, 1));
    await v.createSnapshot('s');
    await v.trim(0, 2 * BS); // live hole, snapshot data (copied)
    await v.write(8 * BS, pattern(BS, 2)); // live data, snapshot hole (recorded as hole)
    const live = await v.extents(0, 64 * BS);
    const snap = await v.snapshotLayer('s').extents(0, 64 * BS);
    const at = (list: typeof live, off: number) => list.find((e) => e.offset <= off && off < e.offset + e.length)!;
    expect(at(live, 0).hole).toBe(true);
    expect(at(snap, 0).hole).toBe(false);
    expect(at(live, 3 * BS).hole).toBe(false);
    expect(at(snap, 3 * BS).hole).toBe(false);
    expect(at(live, 8 * BS).hole).toBe(false);
    expect(at(snap, 8 * BS).hole).toBe(true);
    expect(at(snap, 8 * BS).zero).toBe(true);
    for (const list of [live, snap]) {
      let end = 0;
      for (const e of list) {
        expect(e.offset).toBe(end);
        end += e.length;
      }
      expect(end).toBe(64 * BS);
    }
    const sub = await v.snapshotLayer('s').extents(BS + 100, 8 * BS);
    expect(sub[0].offset).toBe(BS + 100);
    expect(sub.reduce((n, e) => n + e.length, 0)).toBe(8 * BS);
    await v.close();
  });

  it('survives a crash: flushed state intact, unflushed writes never corrupt a snapshot', async () => {
    const size = 512 * KiB;
    const { v, dir } = await make(size, 512 * KiB);
    const m = new Model(size);
    await dw(v, m, 0, pattern(64 * BS, 1));
    await v.createSnapshot('s1');
    m.snap('s1');
    await dw(v, m, 10 * BS + 5, pattern(10 * BS, 2));
    await v.trim(30 * BS, 4 * BS);
    m.zero(30 * BS, 4 * BS);
    await v.createSnapshot('s2');
    m.snap('s2');
    await dw(v, m, 0, pattern(5 * BS, 3));
    await v.deleteSnapshot('s1');
    m.snaps.delete('s1');
    await v.createSnapshot('s3');
    m.snap('s3');
    await dw(v, m, 2 * BS, pattern(BS, 4));
    await v.flush();
    // crash: the object is dropped without close(); the journal holds everything since open
    const v2 = await reopen(dir);
    await verify(v2, m);
    expect(v2.snapshots().map((s) => s.name)).toEqual(['s2', 's3']);
    // now writes that are never flushed, then a crash
    const before = Buffer.from(m.live);
    const unflushed = [40 * BS, 41 * BS + 9, 2 * BS];
    for (const [i, off] of unflushed.entries()) await v2.write(off, pattern(BS, 50 + i));
    const v3 = await reopen(dir);
    for (const [name, img] of m.snaps) expect((await v3.snapshotLayer(name).read(0, size)).equals(img)).toBe(true);
    const now = await v3.read(0, size);
    // every byte reads either as flushed or as the unflushed write
    for (let b = 0; b < size / BS; b++) {
      const touched = unflushed.some((o) => o < (b + 1) * BS && b * BS < o + BS);
      if (!touched) expect(now.subarray(b * BS, (b + 1) * BS).equals(before.subarray(b * BS, (b + 1) * BS)), `block ${b}`).toBe(true);
    }
    expect(await v3.check()).toEqual([]);
    await v3.close();
  });

  it('reopen preserves everything; resize grows with snapshots and refuses to shrink', async () => {
    const size = 128 * KiB;
    const { v, dir } = await make(size, 128 * KiB);
    const m = new Model(size);
    await dw(v, m, 0, pattern(size, 1));
    await v.createSnapshot('s');
    m.snap('s');
    await v.resize(size * 2);
    const grown = Buffer.alloc(size * 2);
    m.live.copy(grown);
    m.live = grown;
    await dw(v, m, size - 100, pattern(1000, 2));
    await expect(v.resize(size)).rejects.toThrow(/shrink/);
    await verify(v, m);
    await v.close();
    const v2 = await reopen(dir);
    expect(v2.size).toBe(size * 2);
    expect(v2.snapshots()[0].size).toBe(size);
    await verify(v2, m);
    expect(v2.allocatedBytes()).toBeGreaterThanOrEqual(size + BS);
    await v2.deleteSnapshot('s');
    m.snaps.clear();
    await v2.resize(size / 2);
    m.live = m.live.subarray(0, size / 2);
    await verify(v2, m);
    await v2.close();
  });

  it('after a crash, reserve slots written but never journaled are scrubbed, stray reserves removed', async () => {
    const { v, dir } = await make(64 * BS, 64 * BS);
    const m = new Model(64 * BS);
    await dw(v, m, 0, pattern(8 * BS, 1));
    await v.createSnapshot('s');
    m.snap('s');
    await dw(v, m, 0, pattern(2 * BS, 2));
    await v.flush();
    // copies that reached the reserve but whose records did not: past the high-water mark
    fs.appendFileSync(path.join(dir, 'snap-1.reserve'), pattern(3 * BS, 3));
    // a snapshot whose record never became durable
    fs.writeFileSync(path.join(dir, 'snap-2.reserve'), pattern(BS, 4));
    const v2 = await reopen(dir);
    // removed; it may come back empty as the spare for the next snapshot (id 2)
    const stray = path.join(dir, 'snap-2.reserve');
    expect(!fs.existsSync(stray) || fs.statSync(stray).size === 0).toBe(true);
    expect(fs.statSync(path.join(dir, 'snap-1.reserve')).size).toBe(2 * BS);
    await dw(v2, m, 4 * BS, pattern(BS, 5)); // reuses slot numbering from the high-water mark
    await verify(v2, m);
    await v2.close();
    expect(() => CowVolume.create(newDir(), 64 * BS, BS, BS - 1)).toThrow(/not even one/);
  });

  it('check() reports a reserve file that is missing and one that belongs to nobody', async () => {
    const { v, dir } = await make(64 * BS, 64 * BS);
    await v.write(0, pattern(BS, 1));
    await v.createSnapshot('s');
    await v.write(0, pattern(BS, 2));
    fs.writeFileSync(path.join(dir, 'snap-99.reserve'), 'x');
    fs.renameSync(path.join(dir, 'snap-1.reserve'), path.join(dir, 'gone'));
    const problems = await v.check();
    expect(problems.join('\n')).toMatch(/snap-1\.reserve is missing/);
    expect(problems.join('\n')).toMatch(/snap-99\.reserve belongs to no snapshot/);
    fs.renameSync(path.join(dir, 'gone'), path.join(dir, 'snap-1.reserve'));
    fs.unlinkSync(path.join(dir, 'snap-99.reserve'));
    expect(await v.check()).toEqual([]);
    await v.close();
  });

  it('a create uses the spare reserve made ahead of time (no directory sync), on an idle volume with one journal commit', async () => {
    const lines: Array<Record<string, any>> = [];
    const capture = pino({ level: 'info' }, new Writable({ write: (c, _e, cb) => (lines.push(JSON.parse(String(c))), cb()) }));
    const dir = newDir();
    createVolumeFiles('cow', dir, { size: 256 * KiB, blockSize: BS, cowReserve: 64 * KiB });
    const v = await CowVolume.open(dir, { log: capture });
    const m = new Model(256 * KiB);
    await dw(v, m, 0, pattern(8 * BS, 1));
    await v.flush();
    await new Promise((r) => setTimeout(r, 50)); // the spare is made in the background
    expect(fs.statSync(path.join(dir, 'snap-1.reserve')).size).toBe(0);
    expect(await v.check()).toEqual([]); // the spare is no stray file
    await v.createSnapshot('s1');
    m.snap('s1');
    const created = lines.find((l) => l.msg === 'snapshot created' && l.snapshot === 's1')!;
    expect(Object.keys(created.steps)).not.toContain('createReserve');
    expect(created.steps.journalCommit).toBeGreaterThan(0);
    await dw(v, m, 2 * BS, pattern(BS, 2));
    await v.flush();
    await new Promise((r) => setTimeout(r, 50));
    expect(fs.existsSync(path.join(dir, 'snap-2.reserve'))).toBe(true);
    // crash with the spare in place: reopen keeps it, the snapshot reads as taken, check is clean
    const again = await reopen(dir);
    await verify(again, m);
    expect(await again.check()).toEqual([]);
    await again.createSnapshot('s2');
    m.snap('s2');
    await dw(again, m, 0, pattern(BS, 3));
    await verify(again, m);
    await again.close();
  });
});

