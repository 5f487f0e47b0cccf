#!/usr/bin/env node
// Backup sidecar benchmark against the local S3 (Ceph RGW, scripts/s3/start.sh).
//
//   node bench/backup.mjs [--size-gib 8] [--fill-gib 2] [--concurrency 4] [--json FILE]
//
// A thin volume of --size-gib with --fill-gib of random data (64 MiB extents spread
// over the volume; the rest holes — a full 8 GiB fill would take too long on a
// 2-core box that also runs Ceph and the NBD server). Then, timed in-process:
//   1. the endpoint's own PUT and GET throughput: 4 MiB objects (the chunk size), as
//      many in flight as the backup uploads (--concurrency), payload hash precomputed
//      as the sidecar does; measured right before and right after the full backup,
//      the ratio uses the mean (see "endpoint baseline" below)
//   2. full backup
//   3. incremental after 1% of the data changed, then after 1% of the volume changed
//      (1 MiB random writes at random 1 MiB-aligned offsets)
//   4. incremental after 10% of the volume changed
//   5. incremental with no change (in-process, and the whole CLI process)
//   6. restore of the last incremental (a chain of 4) into a new volume
//   7. Cinder's chunked-driver approach for the 1% incremental: read and sha256 the
//      whole volume in 32 KiB blocks (its cost before it uploads anything)
// Judged byte-exact by qemu-img compare (snapshot vs restored volume).
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes, randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { DeleteBucketCommand, PutObjectCommand, GetObjectCommand, S3Client } from '@aws-sdk/client-s3';

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const { createBackup, restoreBackup } = await import(path.join(ROOT, 'dist/backup/engine.js'));
const { PoolServer } = await import(path.join(ROOT, 'dist/backup/source.js'));
const { S3Store } = await import(path.join(ROOT, 'dist/backup/store.js'));
const { NbdClient } = await import(path.join(ROOT, 'dist/nbd/client.js'));
const { createLogger } = await import(path.join(ROOT, 'dist/log.js'));

const argv = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = argv.indexOf(`--${name}`);
  return i < 0 ? dflt : argv[i + 1];
};
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const SIZE = Number(opt('size-gib', 8)) * GiB;
const FILL = Number(opt('fill-gib', 2)) * GiB;
const CONC = Number(opt('concurrency', 8));
const CLI = path.join(ROOT, 'bin/snapblock.js');
const s3dir = path.join(ROOT, '.cache/s3/ceph');
const log = createLogger({ level: 'warn', pretty: false });
const now = () => performance.now() / 1000;
const say = (s) => process.stderr.write(`bench: ${s}\n`);

// ---- S3 ---------------------------------------------------------------------
const lease = `bench-backup-${process.pid}`;
execFileSync('bash', [path.join(ROOT, 'scripts/s3/start.sh'), s3dir], { stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, S3_LEASE: lease, S3_LEASE_PID: String(process.pid) } });
const env = Object.fromEntries([...fs.readFileSync(path.join(s3dir, 'env'), 'utf8').matchAll(/^export (\w+)='([^']*)'$/gm)].map((m) => [m[1], m[2]]));
const bucket = `bench-backup-${Date.now().toString(36)}`;
const store = new S3Store({ endpoint: env.S3_ENDPOINT, region: env.S3_REGION, bucket, prefix: '', forcePathStyle: true, accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY, maxSockets: CONC * 2 + 2 });
await store.ensure();

// ---- server + volume ------------------------------------------------------------
const work = fs.mkdtempSync(path.join(ROOT, '.cache', 'bench-backup-'));
const pool = path.join(work, 'pool');
const sock = path.join(work, 'nbd.sock');
const sb = (...args) => execFileSync(process.execPath, [CLI, '--pool', pool, ...args], { env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'warn' }, encoding: 'utf8' });
sb('volume', 'create', 'vol', String(SIZE));
const serve = spawn(process.execPath, [CLI, '--pool', pool, 'serve', '--listen', 'none', '--socket', sock], { env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'warn' }, stdio: 'ignore' });
for (let i = 0; i < 200 && !fs.existsSync(path.join(pool, 'control.sock')); i++) await new Promise((r) => setTimeout(r, 50));
const server = await PoolServer.connect(pool);
const ctx = { store, log, progress: 'none', concurrency: CONC };
const results = { host: { cpus: os.cpus().length, loadavg: os.loadavg()[0] }, volume: { sizeGiB: SIZE / GiB, fillGiB: FILL / GiB }, concurrency: CONC };

async function writeRandom(ranges) {
  const c = await NbdClient.connect({ socketPath: sock, exportName: 'vol' });
  const buf = Buffer.allocUnsafe(4 * MiB);
  let inflight = [];
  for (const [off, len] of ranges) {
    for (let at = 0; at < len; at += buf.length) {
      const n = Math.min(buf.length, len - at);
      const b = Buffer.from(randomFillSync(buf, 0, n).subarray(0, n));
      inflight.push(c.write(off + at, b));
      if (inflight.length >= 8) (await Promise.all(inflight), (inflight = []));
    }
  }
  await Promise.all(inflight);
  await c.flush();
  await c.close();
}

say(`filling ${FILL / GiB} GiB of a ${SIZE / GiB} GiB volume`);
const EXTENT = 64 * MiB;
const n = FILL / EXTENT;
const stride = SIZE / n;
await writeRandom(Array.from({ length: n }, (_, i) => [i * stride, EXTENT]));

// ---- endpoint baseline -------------------------------------------------------
// What a full backup is compared with: the endpoint's own PUT rate for the same object
// size (4 MiB = the chunk size) and the same number of requests in flight (CONC = the
// backup's upload concurrency), from this process, with the SDK set up as the sidecar's
// (no checksums, no Expect: 100-continue, keep-alive) and the payload's sha256 handed to
// the signer precomputed, as the sidecar does: the best PUT rate this client gets, with
// nothing to read, hash or compress. Measured right before and right after the full
// backup (the box's load drifts); the ratio uses their mean. GET likewise, for restore.
// Client CPU (user+sys of this process) per GiB is reported for both sides.
const COUNT = Number(opt('baseline-objects', 128));
const cpuSecs = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1e6; };
async function baseline(label) {
  const client = new S3Client({ endpoint: env.S3_ENDPOINT, region: env.S3_REGION, forcePathStyle: true, credentials: { accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY }, requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED', expectContinueHeader: false, maxAttempts: 1 });
  const bodies = Array.from({ length: CONC }, () => { const b = randomBytes(4 * MiB); return { b, sha: createHash('sha256').update(b).digest('hex') }; });
  const put = (key, { b, sha }) => {
    const cmd = new PutObjectCommand({ Bucket: bucket, Key: key, Body: b, ContentLength: b.length });
    cmd.middlewareStack.add((next) => async (args) => { args.request.headers['x-amz-content-sha256'] = sha; return next(args); }, { step: 'build', name: 'knownPayloadHash' });
    return client.send(cmd);
  };
  const run = async (op) => {
    let next = 0;
    const c0 = cpuSecs();
    const t = now();
    await Promise.all(Array.from({ length: CONC }, async (_, w) => { for (let i; (i = next++) < COUNT;) await op(i, w); }));
    const secs = now() - t;
    return { MiBps: +((COUNT * 4) / secs).toFixed(1), clientCpuSecsPerGiB: +((cpuSecs() - c0) / ((COUNT * 4) / 1024)).toFixed(2) };
  };
  const p = await run((i, w) => put(`baseline/${i}`, bodies[w]));
  const g = await run(async (i) => (await client.send(new GetObjectCommand({ Bucket: bucket, Key: `baseline/${i}` }))).Body.transformToByteArray());
  for (let i = 0; i < COUNT; i++) await store.delete(`baseline/${i}`);
  client.destroy();
  const r = { label, put: p, get: g, objects: COUNT, objectMiB: 4, inflight: CONC, loadavg: os.loadavg()[0] };
  say(`endpoint ${label}: PUT ${p.MiBps} MiB/s (${p.clientCpuSecsPerGiB} CPU s/GiB), GET ${g.MiBps} MiB/s`);
  return r;
}
say('endpoint PUT/GET baseline');
results.endpointRuns = [await baseline('before the full backup')];

const backupRuns = [];
async function backup(label, incremental) {
  const c0 = cpuSecs();
  const heads0 = store.stats.heads;
  const lists0 = store.stats.lists;
  const t = now();
  const r = await createBackup(ctx, { server, volume: 'vol', incremental });
  const secs = now() - t;
  const cpu = cpuSecs() - c0;
  const row = { label, id: r.id, kind: r.kind, secs: +secs.toFixed(2), readMiB: +(r.readBytes / MiB).toFixed(1), uploadedChunks: r.uploadedChunks, uploadedObjects: r.uploadedObjects, uploadedMiB: +(r.uploadedBytes / MiB).toFixed(1), existingChunks: r.existingChunks, readMiBps: +(r.readBytes / MiB / secs).toFixed(1), clientCpuSecs: +cpu.toFixed(2), clientCpuSecsPerGiB: r.readBytes ? +(cpu / (r.readBytes / GiB)).toFixed(2) : null, headRequests: store.stats.heads - heads0, listRequests: store.stats.lists - lists0, loadavg: os.loadavg()[0], snapshot: r.snapshot, timings: r.timings };
  backupRuns.push(row);
  say(`${label}: ${JSON.stringify(row)}`);
  return row;
}

/** `bytes` rewritten with 1 MiB random writes at random 1 MiB-aligned offsets, in the filled extents or anywhere */
const dataExtents = Array.from({ length: n }, (_, i) => i * stride);
async function change(bytes, where) {
  const count = Math.round(bytes / MiB);
  const offs = new Set();
  while (offs.size < count) {
    if (where === 'data') offs.add(dataExtents[Math.floor(Math.random() * n)] + Math.floor(Math.random() * (EXTENT / MiB)) * MiB);
    else offs.add(Math.floor(Math.random() * (SIZE / MiB)) * MiB);
  }
  await writeRandom([...offs].sort((a, b) => a - b).map((o) => [o, MiB]));
}

const full = await backup('full', false);
results.endpointRuns.push(await baseline('after the full backup'));
{
  const [a, b] = results.endpointRuns;
  results.endpoint = { putMiBps: +((a.put.MiBps + b.put.MiBps) / 2).toFixed(1), getMiBps: +((a.get.MiBps + b.get.MiBps) / 2).toFixed(1), objects: COUNT, objectMiB: 4, inflight: CONC, how: 'mean of the runs right before and after the full backup; same object size (4 MiB) and requests in flight as the backup uploads' };
}
await change(0.01 * FILL, 'data');
const inc1d = await backup('incremental 1% of the data', true);
await change(0.01 * SIZE, 'volume');
const inc1 = await backup('incremental 1% of the volume', true);

// Cinder's chunked driver for the same incremental: read the whole snapshot and sha256 every 32 KiB.
say('Cinder-style full read + hash of the volume');
{
  const c = await NbdClient.connect({ socketPath: sock, exportName: `vol@${inc1.snapshot}` });
  const t = now();
  const PIECE = 8 * MiB;
  let ahead = [];
  let hashes = 0;
  for (let off = 0; off < SIZE; off += PIECE) {
    ahead.push(c.read(off, PIECE));
    if (ahead.length < 4) continue;
    const b = await ahead.shift();
    for (let i = 0; i < b.length; i += 32768) (createHash('sha256').update(b.subarray(i, i + 32768)).digest(), hashes++);
  }
  for (const p of ahead) {
    const b = await p;
    for (let i = 0; i < b.length; i += 32768) (createHash('sha256').update(b.subarray(i, i + 32768)).digest(), hashes++);
  }
  const secs = now() - t;
  await c.close();
  results.cinderStyle = { what: 'read + sha256 per 32 KiB of the whole volume (before any upload)', secs: +secs.toFixed(2), hashes, readMiBps: +(SIZE / MiB / secs).toFixed(1) };
  say(`cinder-style read+hash: ${secs.toFixed(1)} s`);
}

await change(0.1 * SIZE, 'volume');
const inc10 = await backup('incremental 10% of the volume', true);
const inc0 = await backup('incremental no change', true);
// the same, as a user runs it: a whole CLI process (node start-up included), 3 times;
// wall and CPU (user+sys, from /usr/bin/time) of each, and the box's load
{
  const runs = [];
  for (let k = 0; k < 3; k++) {
    const t = now();
    const r = spawnSync('/usr/bin/time', ['-f', '%U %S', process.execPath, CLI, '--pool', pool, 'backup', 'create', 'vol', '--incremental', '--json', '--progress', 'none'], {
      env: { ...process.env, ...env, S3_BUCKET: bucket, SNAPBLOCK_LOG_LEVEL: 'warn' },
      encoding: 'utf8',
    });
    const wall = now() - t;
    if (r.status !== 0) throw new Error(r.stderr);
    const j = JSON.parse(r.stdout);
    const [u, sys] = r.stderr.trim().split('\n').pop().split(' ').map(Number);
    runs.push({ processSecs: +wall.toFixed(2), cpuSecs: +(u + sys).toFixed(2), inProcessSecs: j.seconds, readBytes: j.readBytes, loadavg: os.loadavg()[0] });
    backupRuns.push({ label: 'incremental no change (CLI process)', id: j.id, kind: j.kind, secs: +wall.toFixed(2), readMiB: 0, uploadedChunks: j.uploadedChunks, snapshot: j.snapshot });
    say(`no-change incremental, whole CLI process: ${wall.toFixed(2)} s wall, ${(u + sys).toFixed(2)} s CPU`);
  }
  const med = (k) => runs.map((r) => r[k]).sort((a, b) => a - b)[1];
  results.noChangeCli = { runs, medianProcessSecs: med('processSecs'), medianCpuSecs: med('cpuSecs'), medianInProcessSecs: med('inProcessSecs') };
}

say('restore');
let restore;
{
  const last = backupRuns[backupRuns.length - 1];
  const c0 = cpuSecs();
  const t = now();
  const r = await restoreBackup(ctx, last.id, { server, volume: 'restored' });
  const secs = now() - t;
  restore = { id: last.id, chain: r.chain.length, secs: +secs.toFixed(2), writtenMiB: +(r.writtenBytes / MiB).toFixed(1), MiBps: +(r.writtenBytes / MiB / secs).toFixed(1), clientCpuSecs: +(cpuSecs() - c0).toFixed(2), objects: r.chunks, loadavg: os.loadavg()[0], timings: r.timings };
  say(`restore: ${JSON.stringify(restore)}`);
  const cmp = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', `nbd+unix:///vol@${last.snapshot}?socket=${sock}`, `nbd+unix:///restored?socket=${sock}`], { encoding: 'utf8' });
  restore.byteExact = cmp.status === 0;
  if (cmp.status !== 0) say(`RESTORE DIFFERS: ${cmp.stdout}${cmp.stderr}`);
}

const fullMiBps = full.readMiB / full.secs;
results.backups = backupRuns;
results.restore = restore;
results.ratios = {
  fullVsEndpointPut: +(fullMiBps / results.endpoint.putMiBps).toFixed(2),
  fullVsEndpointPutBefore: +(fullMiBps / results.endpointRuns[0].put.MiBps).toFixed(2),
  fullVsEndpointPutAfter: +(fullMiBps / results.endpointRuns[1].put.MiBps).toFixed(2),
  fullClientCpuVsPutClientCpu: +(full.clientCpuSecsPerGiB / ((results.endpointRuns[0].put.clientCpuSecsPerGiB + results.endpointRuns[1].put.clientCpuSecsPerGiB) / 2)).toFixed(2),
  restoreVsEndpointGet: +(restore.MiBps / results.endpoint.getMiBps).toFixed(2),
  inc1DataVsFullTime: +(inc1d.secs / full.secs).toFixed(3),
  inc1VsFullTime: +(inc1.secs / full.secs).toFixed(3),
  inc10VsFullTime: +(inc10.secs / full.secs).toFixed(3),
  cinderStyleVsInc1Time: +(results.cinderStyle.secs / inc1.secs).toFixed(1),
};
results.targets = {
  'incremental 1% of the data <= 5% of full time': inc1d.secs <= 0.05 * full.secs,
  'incremental 1% of the volume <= 5% of full time': inc1.secs <= 0.05 * full.secs,
  'no-change incremental <= 1 s (in-process)': inc0.secs <= 1,
  'no-change incremental <= 1 s (whole CLI process, median of 3)': results.noChangeCli.medianProcessSecs <= 1,
  'full >= 0.8x endpoint PUT': fullMiBps >= 0.8 * results.endpoint.putMiBps,
};
results.host.loadavgEnd = os.loadavg()[0];

// ---- clean up -------------------------------------------------------------
for await (const o of store.list('')) await store.delete(o.key);
store.close();
{
  const client = new S3Client({ endpoint: env.S3_ENDPOINT, region: env.S3_REGION, forcePathStyle: true, credentials: { accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY } });
  await client.send(new DeleteBucketCommand({ Bucket: bucket })).catch(() => {});
  client.destroy();
}
serve.kill('SIGTERM');
await new Promise((r) => serve.once('exit', r));
fs.rmSync(work, { recursive: true, force: true });
try {
  execFileSync('bash', [path.join(ROOT, 'scripts/s3/stop.sh'), s3dir, '--release', lease], { stdio: 'ignore' });
} catch {}

const out = opt('json', path.join(ROOT, 'bench/results', `backup-${new Date().toISOString().replace(/[-:]/g, '').replace(/\..*/, '').replace('T', '-')}.json`));
fs.writeFileSync(out, JSON.stringify(results, null, 2));
console.log(JSON.stringify(results, null, 2));
say(`written to ${out}`);
