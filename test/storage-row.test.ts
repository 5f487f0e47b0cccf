// RowVolume directly: concurrency and crash rules that NBD clients rarely hit on purpose.
import { describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { Writable } from 'node:stream';
import { RowVolume } from '../src/storage/row-volume.js';
import { readCheckpoint, writeCheckpoint } from '../src/storage/checkpoint.js';
import { tempDir } from './helpers/server.js';

const log = pino({ level: 'silent' });
const KiB = 1024;

async function fresh(size = 1024 * KiB, bs = 64 * KiB, base?: RowVolume['snapshotLayer'] extends (n: string) => infer L ? L : never) {
  const dir = path.join(tempDir('row-'), 'v');
  RowVolume.create(dir, size, bs);
  return { dir, v: await RowVolume.open(dir, { log, base }) };
}

describe('RowVolume', () => {
  it('concurrent partial writes into one block shared with a snapshot are all kept', async () => {
    const { v } = await fresh();
    await v.write(0, Buffer.alloc(64 * KiB, 0xaa));
    await v.createSnapshot('s');
    const pieces = Array.from({ length: 16 }, (_, i) => crypto.randomBytes(4 * KiB));
    await Promise.all(pieces.map((p, i) => v.write(i * 4 * KiB, p)));
    const got = await v.read(0, 64 * KiB);
    expect(got.equals(Buffer.concat(pieces))).toBe(true);
    expect((await v.readView('s', 0, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0xaa))).toBe(true);
    expect(await v.check()).toEqual([]);
    await v.close();
  });

  it('concurrent partial writes into an unwritten clone block merge with the base', async () => {
    const { v: parent } = await fresh();
    await parent.write(0, Buffer.alloc(128 * KiB, 0x5c));
    await parent.createSnapshot('base');
    const { v: clone } = await fresh(1024 * KiB, 64 * KiB, parent.snapshotLayer('base'));
    const pieces = Array.from({ length: 8 }, () => crypto.randomBytes(2 * KiB));
    // Every other 4 KiB slot of the first block, all at once, plus reads racing them.
    const reads = [clone.read(60 * KiB, 4 * KiB), clone.read(64 * KiB, 4 * KiB)];
    await Promise.all([...pieces.map((p, i) => clone.write(i * 8 * KiB, p)), ...reads]);
    const got = await clone.read(0, 128 * KiB);
    const want = Buffer.alloc(128 * KiB, 0x5c);
    pieces.forEach((p, i) => p.copy(want, i * 8 * KiB));
    expect(got.equals(want)).toBe(true);
    for (const r of await Promise.all(reads)) expect(r.equals(Buffer.alloc(4 * KiB, 0x5c))).toBe(true);
    expect(await clone.check()).toEqual([]);
    await clone.close();
    await parent.close();
  });

  it('a flushed write survives a crash even when another write into the same fresh block is still in flight', async () => {
    const { dir, v } = await fresh();
    const a = v.write(0, Buffer.alloc(4 * KiB, 1)); // allocates the block
    await v.write(8 * KiB, Buffer.alloc(4 * KiB, 2)); // lands in place in the same block
    await v.flush();
    await a;
    // crash: drop the object without close(), reopen from disk
    const again = await RowVolume.open(dir, { log });
    expect((await again.read(8 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 2))).toBe(true);
    expect(await again.check()).toEqual([]);
    await again.close();
  });

  it('4 KiB blocks: writes into blocks shared with several snapshots, across table pages, survive a crash', async () => {
    const bs = 4 * KiB;
    // 64 MiB = 16384 blocks: four pointer-table pages
    const { dir, v } = await fresh(64 * 1024 * KiB, bs);
    const at = [0, 4095 * bs, 4096 * bs, 8191 * bs + 100, 16383 * bs];
    for (const o of at) await v.write(o, Buffer.alloc(bs, 1));
    await v.createSnapshot('a');
    for (const o of at) await v.write(o, Buffer.alloc(bs, 2)); // whole-block redirects
    await v.createSnapshot('b');
    for (const o of at) await v.write(o + 512, Buffer.alloc(1024, 3)); // partial: read-merge
    await v.flush();
    const again = await RowVolume.open(dir, { log }); // crash: no close
    for (const o of at) {
      expect((await again.readView('a', o, 512)).equals(Buffer.alloc(512, 1))).toBe(true);
      expect((await again.readView('b', o, bs)).equals(Buffer.alloc(bs, 2))).toBe(true);
      const live = await again.read(o, 2 * KiB);
      expect(live.subarray(0, 512).equals(Buffer.alloc(512, 2))).toBe(true);
      expect(live.subarray(512, 1536).equals(Buffer.alloc(1024, 3))).toBe(true);
    }
    expect(await again.check()).toEqual([]);
    await again.deleteSnapshot('a'); // oldest: its blocks are freed (punched as ranges)
    expect(await again.check()).toEqual([]);
    for (const o of at) expect((await again.readView('b', o, bs)).equals(Buffer.alloc(bs, 2))).toBe(true);
    await again.close();
  });

  it('a 64 GiB volume at 4 KiB blocks keeps a small checkpoint: only blocks with data are stored', async () => {
    const { dir, v } = await fresh(64 * 1024 * 1024 * KiB, 4 * KiB);
    expect(fs.statSync(path.join(dir, 'checkpoint')).size).toBeLessThan(4 * KiB);
    for (let i = 0; i < 8; i++) await v.write(i * 8 * 1024 * 1024 * KiB, Buffer.alloc(64 * KiB, i + 1)); // 8 GiB apart
    await v.createSnapshot('s');
    await v.write(0, Buffer.alloc(4 * KiB, 9));
    expect((await v.changedExtents('s', undefined))).toEqual([{ offset: 0, length: 4 * KiB }]);
    await v.close();
    // 8 x 16 written blocks as (block, pointer, birth) and one delta entry: not 128 MiB of flat arrays, nor 8 pages of 32 KiB
    expect(fs.statSync(path.join(dir, 'checkpoint')).size).toBeLessThan(4 * KiB);
    const again = await RowVolume.open(dir, { log });
    for (let i = 0; i < 8; i++) expect((await again.readView('s', i * 8 * 1024 * 1024 * KiB, 64 * KiB)).equals(Buffer.alloc(64 * KiB, i + 1))).toBe(true);
    expect(await again.check()).toEqual([]);
    await again.close();
  });

  it('opens a format 1 volume (flat pointer table) and upgrades it; refuses a newer format with a clear error', async () => {
    const dir = path.join(tempDir('row-v1-'), 'v');
    fs.mkdirSync(dir, { recursive: true });
    const bs = 64 * KiB;
    const n = 16;
    // Format 1 as written by earlier snapblock: block 0 -> physical 0 (born gen 1), snapshot "old"
    // at gen 1, then block 0 rewritten to physical 1 in gen 2; the old pointer in the delta.
    const data = Buffer.concat([Buffer.alloc(bs, 0x11), Buffer.alloc(bs, 0x22)]);
    fs.writeFileSync(path.join(dir, 'data'), data);
    const map = new Uint32Array(n);
    const birth = new Uint32Array(n);
    map[0] = 2;
    birth[0] = 2;
    const meta = { format: 'snapblock-row', version: 1, epoch: 1, size: n * bs, blockSize: bs, gen: 2, nextPhysical: 2, nextSnapId: 2, snapshots: [{ id: 1, name: 'old', gen: 1, size: n * bs, created: '2026-11-01T00:00:00.000Z' }] };
    writeCheckpoint(path.join(dir, 'checkpoint'), { meta, arrays: { map, birth, delta: Uint32Array.from([1, 0, 1, 1]) } });
    const v = await RowVolume.open(dir, { log });
    expect((await v.read(0, bs)).equals(Buffer.alloc(bs, 0x22))).toBe(true);
    expect((await v.readView('old', 0, bs)).equals(Buffer.alloc(bs, 0x11))).toBe(true);
    expect(await v.check()).toEqual([]);
    await v.close();
    const ck = readCheckpoint<{ version: number }>(path.join(dir, 'checkpoint'));
    expect(ck.meta.version).toBe(3);
    expect(Object.keys(ck.arrays)).toEqual(['pages', 'dense', 'entries', 'delta']);
    // a format this build does not know
    writeCheckpoint(path.join(dir, 'checkpoint'), { meta: { ...ck.meta, version: 4 }, arrays: ck.arrays });
    await expect(RowVolume.open(dir, { log })).rejects.toThrow(/format version 4 is not supported.*upgrade snapblock/);
  });

  it('refuses a volume whose block numbers would not fit 32 bits', () => {
    const dir = path.join(tempDir('row-big-'), 'v');
    expect(() => RowVolume.create(dir, 2 ** 45, 4 * KiB)).toThrow(/larger --block-size/);
  });

  it('snapshot create logs its steps; on an idle volume it is one journal commit, no data sync', async () => {
    const lines: Array<Record<string, any>> = [];
    const capture = pino({ level: 'info' }, new Writable({ write: (c, _e, cb) => (lines.push(JSON.parse(String(c))), cb()) }));
    const dir = path.join(tempDir('row-'), 'v');
    RowVolume.create(dir, 1024 * KiB, 4 * KiB);
    const v = await RowVolume.open(dir, { log: capture });
    await v.write(0, Buffer.alloc(8 * KiB, 1));
    await v.createSnapshot('busy'); // written since the last sync: data first
    await v.createSnapshot('idle');
    const steps = (name: string) => lines.find((l) => l.msg === 'snapshot created' && l.snapshot === name)!.steps;
    expect(Object.keys(steps('busy'))).toEqual(['quiesce', 'fdatasyncData', 'journalCommit']);
    expect(Object.keys(steps('idle'))).toEqual(['quiesce', 'journalCommit']);
    await v.write(0, Buffer.alloc(4 * KiB, 2));
    const again = await RowVolume.open(dir, { log }); // crash: both snapshots were durable at create
    expect((await again.readView('idle', 0, 8 * KiB)).equals(Buffer.alloc(8 * KiB, 1))).toBe(true);
    expect(again.snapshots().map((s) => s.name)).toEqual(['busy', 'idle']);
    await again.close();
  });
});

