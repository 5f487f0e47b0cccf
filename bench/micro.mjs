#!/usr/bin/env node
// Micro-benchmarks of snapblock's per-request hot paths (benchmark.js), against the built
// code in dist/ and the native addon in build/Release:
//   - request header decoding as Session.pump does it (ByteQueue take + field reads)
//   - write payload extraction (zero-copy 4k, copying 1M that arrived in 64 KiB reads)
//   - reply header encoding (session.ts chunkHeader)
//   - volume reads from a warm page cache (cow: raw image; row: block-mapped), 4k and 1M,
//     next to the raw native calls: thread-pool pread vs synchronous preadv2(RWF_NOWAIT),
//     fresh vs reused 1 MiB buffers (what per-request allocation costs)
//   - extent lookup: cow (SEEK_DATA/SEEK_HOLE through the thread pool), row (in-memory map),
//     and the raw native call
//
//   node bench/micro.mjs [--quick] [--filter REGEX] [--json FILE]
import Benchmark from 'benchmark';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const dist = (p) => import(path.join(ROOT, 'dist', p));
let ByteQueue, chunkHeader, CowVolume, RowVolume, FileMap, createLogger, native;
try {
  ({ ByteQueue } = await dist('nbd/byte-queue.js'));
  ({ chunkHeader } = await dist('nbd/session.js'));
  ({ CowVolume } = await dist('storage/cow-volume.js'));
  ({ RowVolume } = await dist('storage/row-volume.js'));
  ({ FileMap } = await dist('storage/file-map.js'));
  ({ createLogger } = await dist('log.js'));
  native = await dist('native/index.js');
} catch (err) {
  process.stderr.write(`micro: cannot load dist/ (${err.message}); build first: npm ci, or npx tsc -p . and node-gyp rebuild\n`);
  process.exit(1);
}

const args = process.argv.slice(2);
const quick = args.includes('--quick');
const filterAt = args.indexOf('--filter');
const filter = filterAt >= 0 ? new RegExp(args[filterAt + 1], 'i') : undefined;
const jsonAt = args.indexOf('--json');
const jsonOut = jsonAt >= 0 ? args[jsonAt + 1] : undefined;
if (args.includes('-h') || args.includes('--help')) {
  process.stdout.write('usage: node bench/micro.mjs [--quick] [--filter REGEX] [--json FILE]\n');
  process.exit(0);
}
const opts = { maxTime: quick ? 0.4 : 1.5, minSamples: quick ? 5 : 20 };

// ---- fixtures

const REQUEST_MAGIC = 0x25609513;
const MiB = 1024 * 1024;

function header(type, cookie, offset, length) {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(REQUEST_MAGIC, 0);
  h.writeUInt16BE(0, 4);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(0, 8);
  h.writeUInt32BE(cookie, 12);
  h.writeUInt32BE(Math.floor(offset / 2 ** 32), 16);
  h.writeUInt32BE(offset >>> 0, 20);
  h.writeUInt32BE(length, 24);
  return h;
}

// 64 READ headers back to back, as a burst of 4k reads arrives in one socket read.
const burst = Buffer.concat(Array.from({ length: 64 }, (_, i) => header(0, i, i * 4096 * 7919, 4096)));
// The same bytes cut into 100-byte reads: about a quarter of the headers straddle two chunks.
const ragged = Array.from({ length: Math.ceil(burst.length / 100) }, (_, i) => burst.subarray(i * 100, (i + 1) * 100));
// A 4k WRITE (header + payload in one read) and a 1M WRITE arriving as 16 reads of 64 KiB.
const write4k = Buffer.concat([header(1, 1, 0, 4096), Buffer.alloc(4096, 0xab)]);
const write1m = Buffer.concat([header(1, 2, 0, MiB), Buffer.alloc(MiB, 0xcd)]);
const write1mChunks = Array.from({ length: Math.ceil(write1m.length / 65536) }, (_, i) => write1m.subarray(i * 65536, (i + 1) * 65536));

/** the decode Session.pump performs for each request header */
function decode(q) {
  const h = q.take(28);
  if (h.readUInt32BE(0) !== REQUEST_MAGIC) throw new Error('bad magic');
  return {
    flags: h.readUInt16BE(4),
    type: h.readUInt16BE(6),
    cookieHi: h.readUInt32BE(8),
    cookieLo: h.readUInt32BE(12),
    offset: h.readUInt32BE(16) * 0x100000000 + h.readUInt32BE(20),
    length: h.readUInt32BE(24),
  };
}


// Two 1 GiB volumes with the same content: the first 64 MiB fully written, then 64 KiB of
// data every 128 KiB up to 128 MiB (fragmented), the rest never written (holes).
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapblock-micro-'));
process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
for (const sig of ['SIGINT', 'SIGTERM']) process.once(sig, () => process.exit(130));
const log = createLogger({ level: 'silent', pretty: false });
const BS = 64 * 1024;
CowVolume.create(path.join(dir, 'cow'), 1024 * MiB, BS, 64 * MiB);
RowVolume.create(path.join(dir, 'row'), 1024 * MiB, BS);
const cow = await CowVolume.open(path.join(dir, 'cow'), { log });
const row = await RowVolume.open(path.join(dir, 'row'), { log });
{
  const chunk = Buffer.alloc(4 * MiB, 0x5a);
  for (const v of [cow, row]) {
    for (let off = 0; off < 64 * MiB; off += chunk.length) await v.write(off, chunk);
    for (let off = 64 * MiB; off < 128 * MiB; off += 2 * BS) await v.write(off, chunk.subarray(0, BS));
    await v.flush();
  }
}
const file = path.join(dir, 'cow', 'data'); // a plain raw image: the native calls read it directly
const rawFd = native.openFile(file, { direct: false, readOnly: true }).fd;

// ---- suites

const suites = [];
const suite = (name) => {
  const s = new Benchmark.Suite(name);
  suites.push(s);
  return s;
};
const add = (s, name, fn, extra = {}) => {
  if (filter && !filter.test(`${s.name}: ${name}`)) return;
  if (typeof fn === 'object') {
    batched.add(name);
    s.add(name, { ...opts, ...fn, ...extra });
  } else s.add(name, fn, { ...opts, ...extra });
};
// Async operations run BATCH at a time, one after another, per benchmark.js cycle (deferred
// cycles cost tens of µs of timer overhead); the report divides by BATCH.
const BATCH = 64;
const batched = new Set();
const defer = (fn) => ({
  defer: true,
  fn: async (d) => {
    for (let i = 0; i < BATCH; i++) await fn();
    d.resolve();
  },
});

{
  const s = suite('request header decode (per header)');
  const q1 = new ByteQueue();
  add(s, 'ByteQueue.take(28) + fields, headers in one chunk', () => {
    if (q1.length < 28) q1.push(burst);
    return decode(q1);
  });
  const q2 = new ByteQueue();
  let next = 0;
  add(s, 'ByteQueue.take(28) + fields, 100-byte chunks (straddling)', () => {
    while (q2.length < 28) q2.push(ragged[next++ % ragged.length]);
    return decode(q2);
  });
  const q3 = new ByteQueue();
  add(s, 'ByteQueue.peek(28) only', () => {
    if (q3.length < 28) q3.push(burst);
    return q3.peek(28);
  });
}

{
  const s = suite('write request extraction (per request)');
  const q = new ByteQueue();
  add(s, '4k WRITE: header + zero-copy payload', () => {
    q.push(write4k);
    decode(q);
    return q.take(4096);
  });
  const q2 = new ByteQueue();
  add(s, '1M WRITE from 64 KiB reads: header + copying take(1M)', () => {
    for (const c of write1mChunks) q2.push(c);
    decode(q2);
    return q2.take(MiB);
  });
}

{
  const s = suite('reply encoding (per reply)');
  const req = { cookieHi: 0, cookieLo: 12345 };
  add(s, 'OFFSET_DATA header (session.ts chunkHeader)', () => {
    const h = chunkHeader(req, 1, 1, 8 + 4096, 8);
    h.writeUInt32BE(0, 20);
    h.writeUInt32BE(4096, 24);
    return h;
  });
}

{
  const s = suite('async plumbing (per operation)');
  add(s, 'await an already-resolved promise (baseline of the async benches)', defer(() => Promise.resolve()));
  const empty = Buffer.alloc(0);
  add(s, 'thread-pool round trip: native.pread of 0 bytes (one Job, no IO)', defer(() => native.pread(rawFd, empty, 0)));
}

{
  const s = suite('4k reads, warm page cache (per request)');
  const pos = (i) => ((i * 7919) % 16384) * 4096; // spread over the first 64 MiB
  let a = 0, b = 0, c = 0, d = 0;
  add(s, 'CowVolume.read 4k (thread-pool pread)', defer(() => cow.read(pos(a++), 4096)));
  add(s, 'RowVolume.read 4k (map lookup + thread-pool pread)', defer(() => row.read(pos(b++), 4096)));
  const buf4k = Buffer.allocUnsafe(4096);
  add(s, 'native.pread 4k via the thread pool', defer(() => native.pread(rawFd, buf4k, pos(c++))));
  add(s, 'native.preadNowait 4k, synchronous page-cache hit (no thread-pool hop)', () => native.preadNowait(rawFd, buf4k, pos(d++)));
}

{
  const s = suite('1M reads, warm page cache (per request)');
  let a = 0, b = 0, k = 0, m = 0, f = 0;
  add(s, 'CowVolume.read 1M (fresh Buffer + thread-pool pread)', defer(() => cow.read((a++ % 64) * MiB, MiB)));
  add(s, 'RowVolume.read 1M (fresh Buffer + thread-pool preadv of 16 blocks)', defer(() => row.read((b++ % 64) * MiB, MiB)));
  add(s, 'fresh Buffer.allocUnsafe(1M) + preadNowait (first touch of new pages)', () => native.preadNowait(rawFd, Buffer.allocUnsafe(MiB), (f++ % 64) * MiB));
  const reused = Buffer.allocUnsafe(MiB);
  add(s, 'reused 1M Buffer + preadNowait (what a buffer pool would cost)', () => native.preadNowait(rawFd, reused, (k++ % 64) * MiB));
  add(s, 'reused 1M Buffer + thread-pool pread', defer(() => native.pread(rawFd, reused, (m++ % 64) * MiB)));
}

{
  const s = suite('extent lookup (per call)');
  add(s, 'CowVolume.extents 1M, all data (what a >=64k READ asks first)', defer(() => cow.extents(8 * MiB, MiB)));
  add(s, 'CowVolume.extents 1M, 8 data + 8 hole extents', defer(() => cow.extents(64 * MiB, MiB)));
  add(s, 'RowVolume.extents 1M, all data (in-memory map)', defer(() => row.extents(8 * MiB, MiB)));
  add(s, 'RowVolume.extents 1M, 8 data + 8 hole extents', defer(() => row.extents(64 * MiB, MiB)));
  add(s, 'native.extents 1M, 8 data + 8 hole (SEEK_DATA/SEEK_HOLE in a Job)', defer(() => native.extents(rawFd, 64 * MiB, MiB)));
  add(s, 'native.extentsNow 1M, 8 data + 8 hole (on the JS thread, mapped reads)', () => native.extentsNow(rawFd, 64 * MiB, MiB));
  add(s, 'CowVolume.extents whole 1 GiB (block status)', defer(() => cow.extents(0, 1024 * MiB)));
  add(s, 'RowVolume.extents whole 1 GiB (block status)', defer(() => row.extents(0, 1024 * MiB)));
}

{
  // A 1 GiB file read through sequentially, as a freshly imported image is: ext4 caches it in
  // large folios, where a 4k pwrite walks every buffer head of the folio (see file-map.ts).
  const s = suite('4k writes into a cached file read sequentially (per write)');
  const big = path.join(dir, 'folios');
  const fd = native.openFile(big, { direct: false, readOnly: false, create: true }).fd;
  const fill = Buffer.alloc(16 * MiB, 0x3c);
  for (let off = 0; off < 1024 * MiB; off += fill.length) fs.writeSync(fd, fill, 0, fill.length, off);
  fs.fsyncSync(fd);
  // Drop its cached pages (GNU dd's documented idiom for POSIX_FADV_DONTNEED), so that reading
  // it through caches it the way readahead does.
  spawnSync('dd', [`if=${big}`, 'iflag=nocache', 'count=0'], { stdio: 'ignore' });
  for (let off = 0; off < 1024 * MiB; off += fill.length) fs.readSync(fd, fill, 0, fill.length, off);
  const map = new FileMap(fd, true);
  const data = Buffer.alloc(4096, 0xc3);
  const spot = () => Math.floor(Math.random() * 262144) * 4096;
  add(s, 'pwrite 4k on the JS thread (fs.writeSync: the inline write)', () => fs.writeSync(fd, data, 0, 4096, spot()));
  add(s, 'FileMap.write 4k (mincore + process_vm_writev: the mapped write)', () => {
    const at = spot();
    if (!map.write(at, data)) fs.writeSync(fd, data, 0, 4096, at); // page not cached: as the server does
  });
}

// ---- run

const results = [];
for (const s of suites) {
  if (!s.length) continue;
  process.stdout.write(`\n${s.name}\n`);
  await new Promise((resolve, reject) => {
    s.on('cycle', (ev) => {
      const b = ev.target;
      if (b.error) return reject(b.error);
      const hz = batched.has(b.name) ? b.hz * BATCH : b.hz;
      const ns = 1e9 / hz;
      process.stdout.write(`  ${b.name.padEnd(72)} ${Math.round(hz).toLocaleString('en-US').padStart(13)} ops/s  ${ns < 1000 ? ns.toFixed(0) + ' ns' : (ns / 1000).toFixed(1) + ' µs'}/op  ±${b.stats.rme.toFixed(1)}%\n`);
      results.push({ suite: s.name, name: b.name, opsPerSec: hz, nsPerOp: ns, rme: b.stats.rme, samples: b.stats.sample.length });
    });
    s.on('complete', resolve);
    s.on('error', (ev) => reject(ev.target.error));
    s.run({ async: false });
  });
}
await cow.close();
await row.close();
native.closeFile(rawFd);
if (jsonOut) {
  fs.mkdirSync(path.dirname(path.resolve(jsonOut)), { recursive: true });
  fs.writeFileSync(jsonOut, JSON.stringify({ date: new Date().toISOString(), node: process.version, cpus: os.cpus().length, results }, null, 2) + '\n');
  process.stdout.write(`\nwrote ${jsonOut}\n`);
}
