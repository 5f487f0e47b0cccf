// RowVolume directly: concurrency and crash rules that NBD clients rarely hit on purpose.
import { describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import path from 'node:path';
import pino from 'pino';
import { RowVolume } from '../src/storage/row-volume.js';
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
});
