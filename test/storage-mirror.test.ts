// MirrorVolume at unit level: background mirror build under concurrent writes, split
// into snapshots, changed-block sets, deletion, rollback, reopen, crashes and resume.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pino from 'pino';
import { MirrorVolume } from '../src/storage/mirror-volume.js';
import { createVolumeFiles, openVolume } from '../src/storage/factory.js';
import { SnapshotError, type Volume } from '../src/storage/volume.js';

import { Model, pattern, rng, verify } from './helpers/model.js';
const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 4 * KiB;
const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const log = pino({ level: 'silent' });
let tmp: string;
let seq = 0;

beforeAll(() => {
  const base = path.join(repoRoot, '.cache', 'test-tmp');
  fs.mkdirSync(base, { recursive: true });
  tmp = fs.mkdtempSync(path.join(base, 'mirror-'));
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));


async function make(size: number, chunkBytes = 256 * KiB): Promise<{ v: MirrorVolume; dir: string }> {
  const dir = path.join(tmp, `v${seq++}`);
  createVolumeFiles('mirror', dir, { size, blockSize: BS, cowReserve: 0 });
  const v = (await openVolume('mirror', dir, { log, params: { size, blockSize: BS, cowReserve: 0 } })) as MirrorVolume;
  // the factory opens with the default chunk size; tests want small chunks to see progress
  await v.close();
  return { v: await MirrorVolume.open(dir, { log, chunkBytes }), dir };
}

const reopen = (dir: string, chunkBytes = 256 * KiB) => MirrorVolume.open(dir, { log, chunkBytes });

async function dw(v: Volume, m: Model, off: number, data: Buffer): Promise<void> {
  m.write(off, data);
  await v.write(off, data);
}

/** Random writes and trims on disjoint blocks, concurrently, until stop() says so. */
async function churn(v: Volume, m: Model, seed: number, stop: () => boolean, minRounds = 1): Promise<number> {
  const r = rng(seed);
  let rounds = 0;
  while (rounds < minRounds || !stop()) {
    const used = new Set<number>();
    const jobs: Promise<void>[] = [];
    for (let i = 0; i < 16; i++) {
      const off = r(v.size / BS) * BS + r(BS / 2);
      const len = 1 + r(BS * 2);
      if (off + len > v.size) continue;
      // disjoint blocks within a round: the model cannot order overlapping concurrent writes
      const span: number[] = [];
      for (let x = Math.floor(off / BS); x <= Math.floor((off + len - 1) / BS); x++) span.push(x);
      if (span.some((x) => used.has(x))) continue;
      for (const x of span) used.add(x);
      if (r(6) === 0) {
        m.zero(off, len);
        jobs.push(v.trim(off, len));
      } else {
        const d = pattern(len, seed * 1000 + rounds * 16 + i);
        m.write(off, d);
        jobs.push(v.write(off, d));
      }
    }
    await Promise.all(jobs);
    rounds++;
  }
  return rounds;
}

async function attachAndSync(v: MirrorVolume): Promise<void> {
  await v.attachMirror();
  await v.waitForMirror();
}

describe('mirror volume', () => {
  it('refuses a snapshot without a synced mirror, with the command to run', async () => {
    const { v } = await make(1 * MiB);
    const err = await v.createSnapshot('s').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SnapshotError);
    expect((err as SnapshotError).code).toBe('EINVAL');
    expect((err as Error).message).toMatch(/attach a mirror and wait for it to sync: snapblock mirror attach <volume> --wait/);
    expect(v.mirrorStatus()).toEqual({ state: 'none', copiedBytes: 0, totalBytes: 0 });
    await v.close();
  });

  it('builds the mirror while writes flow; the split snapshot equals the volume at snapshot time', async () => {
    const size = 8 * MiB + 3 * BS;
    const { v, dir } = await make(size, 128 * KiB);
    const m = new Model(size);
    for (let off = 0; off < size; off += 512 * KiB) await dw(v, m, off, pattern(Math.min(200 * KiB, size - off), off)); // data with holes between
    const progress: number[] = [];
    await v.attachMirror((done) => progress.push(done));
    expect(v.mirrorStatus().state).toBe('syncing');
    await expect(v.createSnapshot('early')).rejects.toThrow(/still syncing/);
    const rounds = await churn(v, m, 1, () => v.mirrorStatus().state === 'synced', 3);
    expect(rounds).toBeGreaterThan(1);
    await v.waitForMirror();
    expect(v.mirrorStatus()).toEqual({ state: 'synced', copiedBytes: size, totalBytes: size });
    expect(progress.length).toBeGreaterThan(10);
    await churn(v, m, 2, () => true, 3); // writes to both copies
    await v.createSnapshot('s1');
    m.snap('s1');
    expect(fs.existsSync(path.join(dir, 'snap-1.img'))).toBe(true);
    expect(fs.existsSync(path.join(dir, 'mirror'))).toBe(false);
    expect(v.mirrorStatus().state).toBe('none');
    await churn(v, m, 3, () => true, 5);
    await verify(v, m);
    // the split image is a plain raw file of the volume at snapshot time, holes kept
    expect(fs.readFileSync(path.join(dir, 'snap-1.img')).equals(m.snaps.get('s1')!)).toBe(true);
    const ext = await v.snapshotLayer('s1').extents(0, size);
    expect(ext.some((e) => e.hole)).toBe(true);
    await expect(v.createSnapshot('s2')).rejects.toThrow(/has no mirror/);
    await v.close();
  });

  it('multiple snapshots, changed extents, delete oldest/middle/newest, rollback, reopen', async () => {
    const size = 1 * MiB;
    const { v, dir } = await make(size);
    const m = new Model(size);
    const blocks = (list: Array<{ offset: number; length: number }>) => list.flatMap((e) => Array.from({ length: Math.ceil(e.length / BS) }, (_, i) => e.offset / BS + i));
    await dw(v, m, 0, pattern(64 * BS, 1));
    await attachAndSync(v);
    await v.createSnapshot('a');
    m.snap('a');
    await dw(v, m, 2 * BS, pattern(BS, 2));
    await dw(v, m, 10 * BS - 1, pattern(2, 3));
    await attachAndSync(v);
    await v.createSnapshot('b');
    m.snap('b');
    await dw(v, m, 20 * BS, pattern(BS, 4));
    await v.trim(2 * BS, 10);
    m.zero(2 * BS, 10);
    await attachAndSync(v);
    await v.createSnapshot('c');
    m.snap('c');
    await dw(v, m, 30 * BS, pattern(BS, 5));
    expect(blocks(await v.changedExtents('a', 'b'))).toEqual([2, 9, 10]);
    expect(blocks(await v.changedExtents('b', 'a'))).toEqual([2, 9, 10]);
    expect(blocks(await v.changedExtents('b', 'c'))).toEqual([2, 20]);
    expect(blocks(await v.changedExtents('a', undefined))).toEqual([2, 9, 10, 20, 30]);
    expect(blocks(await v.changedExtents('c', undefined))).toEqual([30]);
    await verify(v, m);
    await v.close();
    const v2 = await reopen(dir);
    await verify(v2, m);
    expect(blocks(await v2.changedExtents('b', 'c'))).toEqual([2, 20]);
    // delete the middle one: a→c now covers what a→b and b→c did
    await v2.deleteSnapshot('b');
    m.snaps.delete('b');
    expect(blocks(await v2.changedExtents('a', 'c'))).toEqual([2, 9, 10, 20]);
    expect(fs.existsSync(path.join(dir, 'snap-2.img'))).toBe(false);
    await verify(v2, m);
    // rollback to a: everything written since a is rewritten; c stays as it was
    await v2.rollback('a');
    m.live = Buffer.from(m.snaps.get('a')!);
    await verify(v2, m);
    // delete the newest: writes since then belong to the snapshot before it
    await v2.deleteSnapshot('c');
    m.snaps.delete('c');
    await dw(v2, m, 40 * BS, pattern(BS, 6));
    expect(blocks(await v2.changedExtents('a', undefined))).toEqual(expect.arrayContaining([2, 9, 10, 20, 30, 40]));
    await attachAndSync(v2);
    await v2.createSnapshot('d');
    m.snap('d');
    // delete the oldest
    await v2.deleteSnapshot('a');
    m.snaps.delete('a');
    await dw(v2, m, 41 * BS, pattern(BS, 7));
    expect(blocks(await v2.changedExtents('d', undefined))).toEqual([41]);
    await verify(v2, m);
    await v2.close();
    await verify(await reopen(dir), m);
  });

  it('restart during the mirror sync resumes from the persisted progress', async () => {
    const size = 16 * MiB;
    const { v, dir } = await make(size, 256 * KiB);
    const m = new Model(size);
    for (let off = 0; off < size; off += 1 * MiB) await dw(v, m, off, pattern(1 * MiB - 4 * KiB, off));
    await v.flush();
    await v.attachMirror();
    while (v.mirrorStatus().copiedBytes < 4 * MiB) await churn(v, m, 4, () => true);
    // crash: the copy stops where it is, the object is dropped without close()
    await v.flush();
    await v.stopMirrorCopy();
    const at = v.mirrorStatus().copiedBytes;
    expect(at).toBeLessThan(size);
    const v2 = await reopen(dir);
    const resumed = v2.mirrorStatus();
    expect(resumed.state).toBe('syncing');
    expect(resumed.copiedBytes).toBeGreaterThan(0);
    expect(resumed.copiedBytes).toBeLessThanOrEqual(at);
    await churn(v2, m, 5, () => v2.mirrorStatus().state === 'synced');
    await v2.waitForMirror();
    // a clean restart while synced keeps it synced
    await v2.close();
    const v3 = await reopen(dir);
    expect(v3.mirrorStatus().state).toBe('synced');
    await v3.createSnapshot('s');
    m.snap('s');
    await churn(v3, m, 6, () => true, 4);
    await verify(v3, m);
    // and a clean close in the middle of a sync resumes too
    await v3.attachMirror();
    await v3.close();
    const v4 = await reopen(dir);
    expect(v4.mirrorStatus().state).not.toBe('none');
    await v4.waitForMirror();
    await v4.createSnapshot('t');
    m.snap('t');
    await verify(v4, m);
    await v4.close();
  });

  it('after a crash, mirror blocks written since the last checkpoint are copied again', async () => {
    const size = 2 * MiB;
    const { v, dir } = await make(size);
    const m = new Model(size);
    await dw(v, m, 0, pattern(size, 1));
    await attachAndSync(v);
    await v.close(); // checkpoint: both copies agree
    const v2 = await reopen(dir);
    await dw(v2, m, 5 * BS, pattern(3 * BS, 2));
    await v2.trim(100 * BS, BS);
    m.zero(100 * BS, BS);
    await v2.flush();
    await dw(v2, m, 200 * BS + 1, pattern(BS, 3)); // never flushed
    // crash, and the mirror's copy of those writes never reached the disk
    const mfd = fs.openSync(path.join(dir, 'mirror'), 'r+');
    for (const b of [5, 6, 7, 100, 200, 201]) fs.writeSync(mfd, Buffer.alloc(BS, 0xee), 0, BS, b * BS);
    fs.closeSync(mfd);
    const v3 = await reopen(dir);
    expect(v3.mirrorStatus().state).toBe('synced');
    await v3.createSnapshot('s');
    m.snap('s');
    await verify(v3, m);
    await v3.close();
  });

  it('survives crashes with snapshots: flushed state intact, check() clean', async () => {
    const size = 1 * MiB;
    const { v, dir } = await make(size);
    const m = new Model(size);
    await churn(v, m, 7, () => true, 4);
    await attachAndSync(v);
    await v.createSnapshot('s1');
    m.snap('s1');
    await churn(v, m, 8, () => true, 4);
    await attachAndSync(v);
    await v.createSnapshot('s2');
    m.snap('s2');
    await v.deleteSnapshot('s1');
    m.snaps.delete('s1');
    await churn(v, m, 9, () => true, 4);
    await v.flush();
    const v2 = await reopen(dir); // crash after flush
    await verify(v2, m);
    const changed = await v2.changedExtents('s2', undefined);
    expect(changed.length).toBeGreaterThan(0);
    const flushed = Buffer.from(m.live);
    await v2.write(0, pattern(BS, 99)); // not flushed
    const v3 = await reopen(dir); // crash without flush
    expect((await v3.snapshotLayer('s2').read(0, size)).equals(m.snaps.get('s2')!)).toBe(true);
    expect((await v3.read(BS, size - BS)).equals(flushed.subarray(BS))).toBe(true);
    // the unflushed block counts as changed either way: intents are durable before the data
    expect((await v3.changedExtents('s2', undefined))[0].offset).toBe(0);
    expect(await v3.check()).toEqual([]);
    await v3.close();
  });

  it('a split interrupted after its record is finished on open', async () => {
    const { v, dir } = await make(1 * MiB);
    const m = new Model(1 * MiB);
    await dw(v, m, 0, pattern(1 * MiB, 1));
    await attachAndSync(v);
    await v.createSnapshot('s');
    m.snap('s');
    await v.flush();
    // rewind the rename as if the crash came right after the journal commit
    fs.renameSync(path.join(dir, 'snap-1.img'), path.join(dir, 'mirror'));
    const v2 = await reopen(dir);
    expect(fs.existsSync(path.join(dir, 'snap-1.img'))).toBe(true);
    await verify(v2, m);
    await v2.close();
  });

  it('detach abandons the mirror; resize keeps both copies in step', async () => {
    const size = 1 * MiB;
    const { v, dir } = await make(size);
    const m = new Model(size);
    await dw(v, m, 0, pattern(size, 1));
    await v.attachMirror();
    await v.detachMirror();
    expect(v.mirrorStatus().state).toBe('none');
    expect(fs.existsSync(path.join(dir, 'mirror'))).toBe(false);
    expect(await v.check()).toEqual([]);
    await attachAndSync(v);
    await v.resize(2 * size);
    const grown = Buffer.alloc(2 * size);
    m.live.copy(grown);
    m.live = grown;
    await dw(v, m, size - 10, pattern(20_000, 2));
    expect(v.allocatedBytes()).toBeGreaterThanOrEqual(2 * size);
    await v.createSnapshot('s');
    m.snap('s');
    expect(v.snapshots()[0].size).toBe(2 * size);
    await expect(v.resize(size)).rejects.toThrow(/shrink/);
    await verify(v, m);
    await v.close();
    await verify(await reopen(dir), m);
  });
});
