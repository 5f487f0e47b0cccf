#!/usr/bin/env node
// Pointer-table cost of a redirect-on-write volume (issue 17), at the storage layer, against
// the built code in dist/:
//   scattered: a 1 TiB row volume (4 KiB blocks), N 4 KiB writes at random blocks, flush:
//              memory per mapped block (RSS, and the typed-array bytes V8 reports), the
//              table's own estimate, then close: checkpoint bytes per mapped block.
//   dense:     a 1 GiB row volume (4 KiB blocks): random 4 KiB writes into the fresh volume
//              until every block is written (tables fill from sparse to dense), then random
//              4 KiB writes and reads over the full volume, 32 in flight, ops/s (page cache).
//   node --expose-gc bench/row-scale.mjs [--blocks 20000] [--rounds 5] [--only scattered|dense]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, eachArg } from './lib.mjs';

const { RowVolume } = await import(path.join(ROOT, 'dist/storage/row-volume.js'));
const { default: pino } = await import('pino');
const log = pino({ level: 'silent' });

let blocks = 20000;
let rounds = 5;
let only;
eachArg(process.argv.slice(2), (a, value) => {
  if (a === '--blocks') blocks = Number(value());
  else if (a === '--rounds') rounds = Number(value());
  else if (a === '--only') only = value();
  else throw new Error(`unknown argument ${a}`);
});

const KiB = 1024;
const GiB = 1024 * 1024 * KiB;
const BS = 4 * KiB;
const gc = globalThis.gc ?? (() => {});

/** deterministic xorshift, so before/after runs write the same blocks */
function rng(seed) {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

function memory() {
  gc();
  const m = process.memoryUsage();
  return { rss: m.rss, arrayBuffers: m.arrayBuffers, heapUsed: m.heapUsed };
}

async function scattered() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'row-scale-'));
  const vdir = path.join(dir, 'v');
  RowVolume.create(vdir, 1024 * GiB, BS);
  const v = await RowVolume.open(vdir, { log });
  const n = (1024 * GiB) / BS;
  const rand = rng(17);
  const chosen = new Set();
  while (chosen.size < blocks) chosen.add(Math.floor(rand() * n));
  const payload = Buffer.alloc(BS, 0x5a);
  const before = memory();
  const t0 = performance.now();
  for (const l of chosen) await v.write(l * BS, payload);
  await v.flush();
  const writeMs = performance.now() - t0;
  const after = memory();
  const tableBytes = v.table?.bytes;
  const t1 = performance.now();
  await v.close();
  const closeMs = performance.now() - t1;
  const ck = fs.statSync(path.join(vdir, 'checkpoint')).size;
  fs.rmSync(dir, { recursive: true, force: true });
  const per = (b) => Math.round(b / blocks);
  return {
    blocks,
    writeMs: Math.round(writeMs),
    closeMs: Math.round(closeMs),
    rssPerBlock: per(after.rss - before.rss),
    arrayBuffersPerBlock: per(after.arrayBuffers - before.arrayBuffers),
    heapPerBlock: per(after.heapUsed - before.heapUsed),
    tableBytesPerBlock: tableBytes === undefined ? undefined : per(tableBytes),
    checkpointBytes: ck,
    checkpointPerBlock: per(ck),
  };
}

/** ops/s of `count` operations, `depth` in flight */
async function rate(count, depth, op) {
  let next = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: depth }, async () => {
    while (next < count) await op(next++);
  }));
  return Math.round(count / ((performance.now() - t0) / 1000));
}

async function dense() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'row-dense-'));
  const vdir = path.join(dir, 'v');
  RowVolume.create(vdir, GiB, BS);
  const v = await RowVolume.open(vdir, { log });
  const n = GiB / BS;
  const rand = rng(99);
  const order = Uint32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const payload = Buffer.alloc(BS, 0xa5);
  const fill = await rate(n, 32, (i) => v.write(order[i] * BS, payload));
  await v.flush();
  const res = { fillWriteIops: fill, randWriteIops: [], randReadIops: [] };
  for (let r = 0; r < rounds; r++) {
    res.randWriteIops.push(await rate(100_000, 32, () => v.write(Math.floor(rand() * n) * BS, payload)));
    res.randReadIops.push(await rate(100_000, 32, () => v.read(Math.floor(rand() * n) * BS, BS)));
  }
  await v.close();
  fs.rmSync(dir, { recursive: true, force: true });
  const median = (a) => [...a].sort((x, y) => x - y)[a.length >> 1];
  return { ...res, randWriteMedian: median(res.randWriteIops), randReadMedian: median(res.randReadIops) };
}

const out = {};
if (only !== 'dense') out.scattered = await scattered();
if (only !== 'scattered') out.dense = await dense();
process.stdout.write(JSON.stringify(out, null, 2) + '\n');
