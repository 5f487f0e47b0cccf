#!/usr/bin/env node
// Replication benchmark: write throughput and latency through fio's NBD engine against the
// primary, for an unreplicated volume, a sync-replicated one and an async-replicated one,
// primary and secondary being two `snapblock serve` processes linked over loopback TCP.
// Then the async lag (RPO) under a steady rate-limited load (default 100 MB/s).
//
//   node bench/replication.mjs [--runtime S] [--rounds N] [--size 1G] [--rate 100m] [--jobs seqwrite,randwrite]
//                              [--out bench/results] [--keep] [--no-fill] [--no-settle]
//
// Needs dist/ (npm ci / npx tsc -p .) and fio with ioengine=nbd.
// Targets (docs/REPLICATION.md): sync >= 0.7x unreplicated throughput, async >= 0.95x,
// async lag <= 1 s at 100 MB/s.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { ROOT, parseSize, sleep } from './lib.mjs';

const CLI = path.join(ROOT, 'bin', 'snapblock.js');
const args = process.argv.slice(2);
const opt = (k, d) => {
  const i = args.indexOf(`--${k}`);
  return i >= 0 ? args[i + 1] : d;
};
const runtime = Number(opt('runtime', 8));
const rounds = Number(opt('rounds', 2));
const size = opt('size', '1G');
const rate = opt('rate', '100m');
const jobs = opt('jobs', 'seqwrite,randwrite').split(',');
const out = opt('out', path.join(ROOT, 'bench', 'results'));
const keep = args.includes('--keep');
// Between runs: wait until the system's dirty pages are written back, so that a run does
// not pay for the writeback of the one before (both copies share this machine's disk).
const settle = !args.includes('--no-settle');
// Before the timed runs every volume is written once end to end (and the replicas caught
// up): otherwise the unreplicated volume, which wraps around its size within a second,
// is timed mostly on overwrites while the slower replicated ones are timed on first writes
// (block allocation on both copies), which cost several times more. --no-fill times that.
const fill = !args.includes('--no-fill');
const PATH = `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH}`;

const JOBS = {
  seqwrite: ['--rw=write', '--bs=256k', '--iodepth=16'],
  randwrite: ['--rw=randwrite', '--bs=4k', '--iodepth=32'],
};

const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'snapblock-repl-bench-'));
const procs = [];

function cli(pool, a) {
  const r = spawnSync(process.execPath, [CLI, '--pool', pool, ...a], { encoding: 'utf8', env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'warn' } });
  if (r.status !== 0) throw new Error(`snapblock ${a.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

function serve(pool) {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI, '--pool', pool, 'serve', '--listen', '127.0.0.1:0'], { env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'info' }, stdio: ['ignore', 'ignore', 'pipe'] });
    procs.push(p);
    let log = '';
    p.stderr.on('data', (c) => {
      log += c;
      const line = log.split('\n').find((l) => l.includes('snapblock serving'));
      const m = line && /nbd:\/\/[^:]+:(\d+)/.exec(line);
      if (m) resolve({ port: Number(m[1]), pool, proc: p });
    });
    p.once('exit', (code) => reject(new Error(`serve exited ${code}: ${log}`)));
  });
}

function control(pool, op, a = {}) {
  const body = JSON.stringify({ op, args: a });
  return new Promise((resolve, reject) => {
    // no keep-alive: a pooled connection goes stale while a blocking fill runs (EPIPE)
    const req = http.request({ socketPath: path.join(pool, 'control.sock'), method: 'POST', path: '/v1/call', agent: false, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      let d = '';
      res.on('data', (c) => (d += c));
      res.on('end', () => (res.statusCode < 400 ? resolve(JSON.parse(d)) : reject(new Error(d))));
    });
    req.on('error', reject);
    req.end(body);
  });
}


async function waitInSync(pool, vol) {
  for (let i = 0; i < 600; i++) {
    const v = await control(pool, 'volume.info', { name: vol });
    if (!v.replication?.link || (v.replication.link === 'replicating' && v.replication.lagBytes === 0)) return;
    await sleep(100);
  }
  throw new Error(`${vol} did not get in sync`);
}

function fio(port, vol, job, extra = []) {
  return new Promise((resolve, reject) => {
    const p = spawn('fio', ['--name=b', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${port}/${vol}`, ...JOBS[job], '--time_based', `--runtime=${runtime}`, '--ramp_time=1', `--size=${size}`, '--output-format=json', ...extra], { env: { ...process.env, PATH } });
    let o = '';
    let e = '';
    p.stdout.on('data', (c) => (o += c));
    p.stderr.on('data', (c) => (e += c));
    p.once('exit', (code) => {
      if (code !== 0) return reject(new Error(`fio failed: ${e}${o}`));
      const w = JSON.parse(o.slice(o.indexOf('{'))).jobs[0].write;
      resolve({ MBps: w.bw_bytes / 1e6, iops: w.iops, latMeanUs: w.clat_ns.mean / 1000, latP99Us: (w.clat_ns.percentile?.['99.000000'] ?? 0) / 1000 });
    });
  });
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function settleDisk() {
  if (settle) spawnSync('sync', [], { env: { ...process.env, PATH } });
}

async function main() {
  const loadavgStart = os.loadavg();
  const b = await serve(path.join(scratch, 'B'));
  const aPool = path.join(scratch, 'A');
  cli(aPool, ['backend', 'add', 'b', `nbd://127.0.0.1:${b.port}`]);
  cli(aPool, ['replication', 'type-create', 'sync', '--replication', 'sync', '--backend-id', 'b']);
  cli(aPool, ['replication', 'type-create', 'async', '--replication', 'async', '--backend-id', 'b']);
  const a = await serve(aPool);
  const vols = { unreplicated: 'plain', sync: 'vsync', async: 'vasync' };
  await control(aPool, 'volume.create', { name: 'plain', size: parseSize(size) });
  await control(aPool, 'volume.create', { name: 'vsync', size: parseSize(size), type: 'sync' });
  await control(aPool, 'volume.create', { name: 'vasync', size: parseSize(size), type: 'async' });
  for (const v of Object.values(vols)) await waitInSync(aPool, v);
  if (fill) {
    for (const v of Object.values(vols)) {
      const r = spawnSync('fio', ['--name=fill', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${a.port}/${v}`, '--rw=write', '--bs=1m', '--iodepth=8', `--size=${size}`], { env: { ...process.env, PATH }, encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`fio fill of ${v} failed: ${r.stderr}`);
      await waitInSync(aPool, v);
    }
  }

  const results = {};
  for (const job of jobs) {
    results[job] = {};
    const per = { unreplicated: [], sync: [], async: [] };
    for (let r = 0; r < rounds; r++) {
      for (const [k, v] of Object.entries(vols)) {
        settleDisk();
        const load = os.loadavg()[0];
        per[k].push({ ...(await fio(a.port, v, job)), load1: load });
        await waitInSync(aPool, v);
      }
    }
    for (const [k, list] of Object.entries(per)) {
      results[job][k] = { MBps: median(list.map((x) => x.MBps)), iops: median(list.map((x) => x.iops)), latMeanUs: median(list.map((x) => x.latMeanUs)), latP99Us: median(list.map((x) => x.latP99Us)), runs: list };
    }
    results[job].syncRatio = results[job].sync.MBps / results[job].unreplicated.MBps;
    results[job].asyncRatio = results[job].async.MBps / results[job].unreplicated.MBps;
  }

  // Async lag under a steady rate-limited sequential load.
  const samples = [];
  let done = false;
  settleDisk();
  const load = fio(a.port, 'vasync', 'seqwrite', [`--rate=${rate}`]).finally(() => (done = true));
  while (!done) {
    const v = await control(aPool, 'volume.info', { name: 'vasync' });
    samples.push({ s: v.replication.lagSeconds ?? 0, b: v.replication.lagBytes });
    await sleep(100);
  }
  const lr = await load;
  await waitInSync(aPool, 'vasync');
  const steady = samples.slice(Math.floor(samples.length * 0.15)); // after ramp
  const lag = {
    rate,
    achievedMBps: lr.MBps,
    maxSeconds: Math.max(...steady.map((x) => x.s)),
    meanSeconds: steady.reduce((n, x) => n + x.s, 0) / steady.length,
    p99Seconds: [...steady.map((x) => x.s)].sort((x, y) => x - y)[Math.floor(steady.length * 0.99)],
    maxMB: Math.max(...steady.map((x) => x.b)) / 1e6,
    samples: steady.length,
  };

  const report = { date: new Date().toISOString(), host: os.hostname(), cpus: os.cpus().length, loadavgStart, loadavgEnd: os.loadavg(), runtime, rounds, size, settle, fill, results, asyncLag: lag };
  fs.mkdirSync(out, { recursive: true });
  const file = path.join(out, `replication-${new Date().toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15)}.json`);
  fs.writeFileSync(file, JSON.stringify(report, null, 2) + '\n');

  const rows = [['job', 'mode', 'MB/s', 'IOPS', 'lat mean us', 'lat p99 us', 'vs unrepl.']];
  for (const job of jobs) for (const k of ['unreplicated', 'sync', 'async']) {
    const x = results[job][k];
    rows.push([job, k, x.MBps.toFixed(1), x.iops.toFixed(0), x.latMeanUs.toFixed(0), x.latP99Us.toFixed(0), (x.MBps / results[job].unreplicated.MBps).toFixed(2) + 'x']);
  }
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  console.log(rows.map((r) => r.map((c, i) => c.padEnd(w[i])).join('  ')).join('\n'));
  console.log(`\nasync lag at ${rate}B/s target (achieved ${lag.achievedMBps.toFixed(1)} MB/s): max ${lag.maxSeconds.toFixed(3)} s, p99 ${lag.p99Seconds?.toFixed(3)} s, mean ${lag.meanSeconds.toFixed(3)} s, max ${lag.maxMB.toFixed(1)} MB queued`);
  console.log(`targets: sync >= 0.70x: ${jobs.map((j) => `${j} ${results[j].syncRatio.toFixed(2)}x`).join(', ')}; async >= 0.95x: ${jobs.map((j) => `${j} ${results[j].asyncRatio.toFixed(2)}x`).join(', ')}; lag <= 1 s: ${lag.maxSeconds <= 1 ? 'met' : 'MISSED'}`);
  console.log(`load average (1, 5, 15 min): start ${loadavgStart.map((x) => x.toFixed(2)).join(' ')}, end ${os.loadavg().map((x) => x.toFixed(2)).join(' ')} on ${os.cpus().length} CPUs`);
  console.log(`written ${path.relative(ROOT, file)}`);
}


try {
  await main();
} finally {
  for (const p of procs) if (p.exitCode === null) p.kill('SIGTERM');
  await sleep(500);
  if (!keep) fs.rmSync(scratch, { recursive: true, force: true });
}
