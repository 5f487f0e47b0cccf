#!/usr/bin/env node
// Pointer-table cost of a redirect-on-write volume (issue 17), at the storage layer, against
// the built code in dist/:
//   scattered: a 1 TiB row volume (4 KiB blocks), N 4 KiB writes at random blocks (--contiguous:
//              blocks 0..N-1, the same writes with a table of N/4096 dense pages), flush:
//              memory per mapped block (RSS, and the typed-array bytes V8 reports), the
//              table's own estimate, then close: checkpoint bytes per mapped block.
//   dense:     a 1 GiB row volume (4 KiB blocks): random 4 KiB writes into the fresh volume
//              until every block is written (tables fill from sparse to dense), then random
//              4 KiB writes and reads over the full volume, 32 in flight, ops/s (page cache),
//              and process CPU µs per op.
//   table:     the pointer table alone, 1 GiB at 4 KiB blocks, every block mapped (dense pages):
//              ns per set() filling an empty table in order and in random order, per random ptr()+birth()
//              lookup and per set() of an existing block (best of --rounds).
//   node --expose-gc bench/row-scale.mjs [--blocks 20000] [--rounds 5] [--only scattered|dense|table] [--dist DIR]
// --dist: another build's dist/ (with build/ beside it), to compare two builds on one machine.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, eachArg } from './lib.mjs';

let blocks = 20000;
let rounds = 5;
let only;
let dist = path.join(ROOT, 'dist');
let contiguous = false;
eachArg(process.argv.slice(2), (a, value) => {
  if (a === '--blocks') blocks = Number(value());
  else if (a === '--rounds') rounds = Number(value());
  else if (a === '--only') only = value();
  else if (a === '--dist') dist = path.resolve(value());
  else if (a === '--contiguous') contiguous = true;
  else throw new Error(`unknown argument ${a}`);
});

const { RowVolume } = await import(path.join(dist, 'storage/row-volume.js'));
const { PointerTable } = await import(path.join(dist, 'storage/row-table.js'));
const { default: pino } = await import('pino');
const log = pino({ level: 'silent' });

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
  while (chosen.size < blocks) chosen.add(contiguous ? chosen.size : Math.floor(rand() * n));
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

/** process CPU µs (user + system, all threads) per operation of the last rate() call: steadier than ops/s on a shared machine */
let lastCpuUs = 0;

/** ops/s of `count` operations, `depth` in flight */
async function rate(count, depth, op) {
  let next = 0;
  const t0 = performance.now();
  const c0 = process.cpuUsage();
  await Promise.all(Array.from({ length: depth }, async () => {
    while (next < count) await op(next++);
  }));
  const c = process.cpuUsage(c0);
  lastCpuUs = Number(((c.user + c.system) / count).toFixed(2));
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
  const res = { fillWriteIops: fill, fillCpuUs: lastCpuUs, randWriteIops: [], randReadIops: [], randWriteCpuUs: [], randReadCpuUs: [] };
  for (let r = 0; r < rounds; r++) {
    res.randWriteIops.push(await rate(100_000, 32, () => v.write(Math.floor(rand() * n) * BS, payload)));
    res.randWriteCpuUs.push(lastCpuUs);
    res.randReadIops.push(await rate(100_000, 32, () => v.read(Math.floor(rand() * n) * BS, BS)));
    res.randReadCpuUs.push(lastCpuUs);
  }
  await v.close();
  fs.rmSync(dir, { recursive: true, force: true });
  const median = (a) => [...a].sort((x, y) => x - y)[a.length >> 1];
  return { ...res, randWriteMedian: median(res.randWriteIops), randReadMedian: median(res.randReadIops), randWriteCpuUsMedian: median(res.randWriteCpuUs), randReadCpuUsMedian: median(res.randReadCpuUs) };
}

function table() {
  const n = GiB / BS;
  const rand = rng(5);
  // filling an empty table in random order: every page goes through its sparse form first
  const order = Uint32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const fills = [];
  const seqFills = [];
  let t;
  for (let r = 0; r < rounds; r++) {
    t = new PointerTable(n);
    let t0 = process.hrtime.bigint();
    for (let l = 0; l < n; l++) t.set(l, l + 1, 1);
    seqFills.push(Number(process.hrtime.bigint() - t0) / n);
    t = new PointerTable(n);
    t0 = process.hrtime.bigint();
    for (let i = 0; i < n; i++) t.set(order[i], order[i] + 1, 1);
    fills.push(Number(process.hrtime.bigint() - t0) / n);
  }
  const blocksAt = Uint32Array.from({ length: 1 << 20 }, () => Math.floor(rand() * n));
  const ns = (fn) => {
    const best = [];
    for (let r = 0; r < rounds; r++) {
      const t0 = process.hrtime.bigint();
      const k = fn();
      best.push(Number(process.hrtime.bigint() - t0) / k);
    }
    return Number(Math.min(...best).toFixed(2));
  };
  let sink = 0;
  const lookup = ns(() => {
    for (let rep = 0; rep < 8; rep++) for (let i = 0; i < blocksAt.length; i++) sink += t.ptr(blocksAt[i]) + t.birth(blocksAt[i]);
    return 8 * blocksAt.length;
  });
  const set = ns(() => {
    for (let rep = 0; rep < 8; rep++) for (let i = 0; i < blocksAt.length; i++) t.set(blocksAt[i], i + 1, 2);
    return 8 * blocksAt.length;
  });
  return { seqFillSetNs: Number(Math.min(...seqFills).toFixed(2)), fillSetNs: Number(Math.min(...fills).toFixed(2)), lookupNs: lookup, setNs: set, sink: sink > 0 };
}

const out = {};
if (!only || only === 'scattered') out.scattered = await scattered();
if (!only || only === 'dense') out.dense = await dense();
if (!only || only === 'table') out.table = table();
process.stdout.write(JSON.stringify(out, null, 2) + '\n');
