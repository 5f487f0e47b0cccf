// Row format upgrades against a volume written by an older snapblock: test/fixtures/row-v2/ was
// written by format 2 code (test/fixtures/make-row-v2.mjs, commit 09bddc3): a version 2
// checkpoint plus journal batches after it (a crash after a flush). Opening it must show every
// view exactly as that code left it, and leave a version 3 checkpoint behind.
import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { RowVolume } from '../src/storage/row-volume.js';
import { readCheckpoint } from '../src/storage/checkpoint.js';
import { ROOT, tempDir } from './helpers/server.js';

const log = pino({ level: 'silent' });
const BS = 4096;
const SIZE = 64 * 1024 * 1024;
const FIXTURE = path.join(ROOT, 'test', 'fixtures', 'row-v2');

/** the generator's block content for a version (make-row-v2.mjs) */
function pattern(block: number, version: number): Buffer {
  const b = Buffer.alloc(BS);
  for (let i = 0; i < BS / 4; i++) b.writeUInt32LE((Math.imul(block, 2654435761) ^ Math.imul(version, 40503) ^ Math.imul(i, 97)) >>> 0, i * 4);
  return b;
}

/** block 9000 after its partial rewrite: version 1 with 512 bytes of 0x5a at 1024 */
function patched9000(): Buffer {
  const b = pattern(9000, 1);
  b.fill(0x5a, 1024, 1536);
  return b;
}

/** what each view held when the generator stopped: block -> content; every other block reads as zeroes */
const VIEWS: Record<string, Array<[number, () => Buffer]>> = {
  s1: [0, 1, 2, 4095, 4096, 9000, 16383].map((l) => [l, () => pattern(l, 1)]),
  s2: [
    [0, () => pattern(0, 1)],
    [1, () => pattern(1, 2)],
    [4095, () => pattern(4095, 1)],
    [4096, () => pattern(4096, 2)],
    [9000, patched9000],
    [12000, () => pattern(12000, 2)],
    [16383, () => pattern(16383, 1)],
  ],
  live: [
    [0, () => pattern(0, 3)],
    [1, () => pattern(1, 4)],
    [4095, () => pattern(4095, 1)],
    [4096, () => pattern(4096, 2)],
    [5000, () => pattern(5000, 3)],
    [7000, () => pattern(7000, 4)],
    [9000, patched9000],
    [12000, () => pattern(12000, 2)],
    [16383, () => pattern(16383, 1)],
  ],
};

function expected(view: string): Buffer {
  const img = Buffer.alloc(SIZE);
  for (const [l, content] of VIEWS[view]) content().copy(img, l * BS);
  return img;
}

async function expectViews(v: RowVolume): Promise<void> {
  expect(v.snapshots().map((s) => s.name)).toEqual(['s1', 's2']);
  for (const view of Object.keys(VIEWS)) {
    const got = await v.readView(view === 'live' ? undefined : view, 0, SIZE);
    const want = expected(view);
    // first differing block, for a readable failure
    const bad = Array.from({ length: SIZE / BS }, (_, l) => l).find((l) => !got.subarray(l * BS, (l + 1) * BS).equals(want.subarray(l * BS, (l + 1) * BS)));
    expect(bad, `view ${view}: block ${bad} differs`).toBeUndefined();
  }
}

describe('row format upgrade', () => {
  it('opens a format 2 volume (checkpoint + journal) written by older snapblock, byte for byte, and rewrites it as format 3', async () => {
    expect(readCheckpoint<{ version: number }>(path.join(FIXTURE, 'checkpoint')).meta.version).toBe(2);
    const dir = path.join(tempDir('row-v2-'), 'v');
    fs.cpSync(FIXTURE, dir, { recursive: true });
    const v = await RowVolume.open(dir, { log });
    await expectViews(v);
    expect(await v.check()).toEqual([]);
    // open replayed the journal, so it checkpointed already: in format 3
    const ck = readCheckpoint<{ version: number; epoch: number }>(path.join(dir, 'checkpoint'));
    expect(ck.meta.version).toBe(3);
    expect(Object.keys(ck.arrays)).toEqual(['pages', 'dense', 'entries', 'delta']);
    // 10 live blocks as triples, no page dense enough to store whole: no 32 KiB pages any more
    expect(ck.arrays.pages.length).toBe(0);
    expect(ck.arrays.entries.length).toBe(3 * 10); // 9 mapped blocks + the trimmed block 2 (unallocated, born in gen 2)
    expect(fs.statSync(path.join(dir, 'checkpoint')).size).toBeLessThan(2048);
    await v.write(3000 * BS, pattern(3000, 5));
    await v.close();
    const again = await RowVolume.open(dir, { log });
    VIEWS.live.push([3000, () => pattern(3000, 5)]);
    try {
      await expectViews(again);
    } finally {
      VIEWS.live.pop();
    }
    expect(await again.check()).toEqual([]);
    await again.close();
  });
});
