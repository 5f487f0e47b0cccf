#!/usr/bin/env node
// Snapshot techniques measured: row (redirect-on-write), cow (copy-on-write), mirror (split
// mirror). One run, one machine; fio's own NBD engine as the load generator (no kernel client).
//
//   node bench/snapshots.mjs [--modes row,cow,mirror] [--runtime S] [--ramp S] [--quick]
//                            [--fill 256M] [--size 1G] [--big 64G] [--creates N]
//                            [--points 0,1,2,4,8,16] [--out bench/results] [--no-chart] [--keep]
//
// Per technique, on a fresh pool served by `snapblock serve`:
//  (a) snapshot create time on a 1 GiB and on a 64 GiB thin volume, each holding --fill of data
//      written as 1 MiB pieces at random offsets over the whole volume, then made durable with
//      an NBD FLUSH (so the create is timed on an idle volume, not charged for the fill's
//      writeback; creates right after writes are phase (b)'s "right after writes" figures).
//      Timed over the control socket: the client's wall time of one snapshot.create call (the
//      server's work plus one local HTTP round trip; no CLI process start-up), --creates times
//      each, median and max reported; next to it the server's own time from its "snapshot
//      created" log line, split into steps (quiesce = write barrier, fdatasync of data,
//      journal commit, ...). One create through the CLI is timed apart, start-up included.
//      mirror: `mirror attach --wait` before each create (its sync time is reported apart, it
//      is not part of the create).
//  (b) 4k random write IOPS, QD32, --runtime seconds, on the 1 GiB volume over its filled range
//      (so every write hits data a snapshot may share), with 0, 1, 2, 4, 8, 16 snapshots. Every
//      snapshot is "hot": it is taken, then written through (a short burst for snapshots that are
//      not a measuring point), so for COW a block's first write after several untouched
//      snapshots is copied into each of them. --repeat N measures each point N times and reports
//      the median (this machine's load swings; one 5 s sample is not enough); before each repeat
//      at a point k > 0 the newest snapshot is deleted and taken again, so every sample starts
//      with a hot snapshot (a second run on the same snapshot would mostly write in place).
//      After each re-take, `check` runs (it also waits for the background punching of the
//      blocks the delete released).
//  (b2) the claim's comparison paired: --paired N times, a run on a volume with no snapshot
//      ("ref", filled the same way), then the newest snapshot of "small" taken again and a run
//      there (with the most snapshots). The ratio of the medians is the claim's figure: load
//      swings on this machine move both sides of each pair alike.
//  (c) 1M sequential read (QD8) of the filled range: right after the fill, and after phase (b)'s
//      random 4k overwrites; cold (the volume's data file dropped from the page cache with
//      fadvise DONTNEED via `dd iflag=nocache`, only that file) and warm.
//  (d) space: `volume info --json` allocated, and du of the volume directory, after each phase.
// Output: a table, <out>/snapshots-<stamp>.json, <out>/snapshots-<stamp>.png (gnuplot), and one
// sentence per claim from the issue: create <= 10 ms whatever the size; row random write with 16
// snapshots >= 0.9x with none.
// Needs: dist/ (npx tsc -p .), fio with ioengine=nbd, gnuplot (gnuplot-nox) for the chart.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { ROOT, eachArg, list, parseSize, sleep } from './lib.mjs';

const CLI = path.join(ROOT, 'bin', 'snapblock.js');
const SYS_PATH = `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH ?? ''}`;
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

const HELP = `usage: node bench/snapshots.mjs [options]
  --modes LIST      techniques (default row,cow,mirror)
  --runtime S       seconds per measured fio run (default 5)
  --ramp S          fio ramp_time (default 1)
  --burst S         seconds of 4k random writes after a snapshot that is not a measuring point (default 1.5)
  --quick           --runtime 2 --ramp 0.5 --burst 0.5 --creates 3
  --fill SIZE       data written before measuring (default 256M)
  --size SIZE       the small volume (default 1G)
  --big SIZE        the large volume for (a) (default 64G)
  --block-size SZ   volume block size (default: snapblock's default)
  --creates N       snapshot creates timed per volume (default 5)
  --repeat N        fio runs per point of (b), median reported (default 1)
  --create-only     only (a), the snapshot create times (no chart)
  --paired N        (b2): N alternating pairs of runs, no snapshot vs the most snapshots (default 3, 0 = skip)
  --points LIST     snapshot counts measured in (b) (default 0,1,2,4,8,16)
  --out DIR         results directory (default bench/results)
  --dir DIR         scratch directory for pools (default system tmp)
  --no-chart        skip the PNG
  --keep            keep the pools
`;


function parseArgs(argv) {
  const o = { modes: ['row', 'cow', 'mirror'], runtime: 5, ramp: 1, burst: 1.5, fill: 256 * MiB, size: GiB, big: 64 * GiB, blockSize: 0, creates: 5, repeat: 1, paired: 3, points: [0, 1, 2, 4, 8, 16], out: path.join(ROOT, 'bench', 'results'), dir: os.tmpdir(), chart: true, keep: false };
  eachArg(argv, (a, val) => {
    switch (a) {
      case '--modes': o.modes = list(val()); break;
      case '--runtime': o.runtime = Number(val()); break;
      case '--ramp': o.ramp = Number(val()); break;
      case '--burst': o.burst = Number(val()); break;
      case '--quick': o.runtime = 2; o.ramp = 0.5; o.burst = 0.5; o.creates = 3; break;
      case '--fill': o.fill = parseSize(val()); break;
      case '--size': o.size = parseSize(val()); break;
      case '--big': o.big = parseSize(val()); break;
      case '--block-size': o.blockSize = parseSize(val()); break;
      case '--creates': o.creates = Number(val()); break;
      case '--repeat': o.repeat = Number(val()); break;
      case '--paired': o.paired = Number(val()); break;
      case '--create-only': o.createOnly = true; o.chart = false; break;
      case '--points': o.points = list(val()).map(Number); break;
      case '--out': o.out = path.resolve(val()); break;
      case '--dir': o.dir = path.resolve(val()); break;
      case '--no-chart': o.chart = false; break;
      case '--keep': o.keep = true; break;
      case '-h': case '--help': process.stdout.write(HELP); process.exit(0); break;
      default: throw new Error(`unknown option ${a}\n\n${HELP}`);
    }
  });
  for (const m of o.modes) if (!['row', 'cow', 'mirror'].includes(m)) throw new Error(`unknown mode ${m}`);
  if (o.fill > o.size || o.fill % MiB) throw new Error('--fill must be a multiple of 1M and fit in --size');
  if (!o.points.length || o.points.some((p) => !Number.isInteger(p) || p < 0) || o.points.some((p, i) => i && p <= o.points[i - 1])) throw new Error('--points must be increasing non-negative integers');
  if (!(o.runtime > 0 && o.ramp >= 0 && o.burst >= 0)) throw new Error('bad --runtime/--ramp/--burst');
  if (!Number.isInteger(o.creates) || o.creates < 1) throw new Error('--creates must be >= 1');
  if (!Number.isInteger(o.repeat) || o.repeat < 1) throw new Error('--repeat must be >= 1');
  return o;
}

// ------------------------------------------------------------------ processes

const children = new Set();
function track(c) {
  children.add(c);
  c.once('exit', () => children.delete(c));
  return c;
}
process.on('exit', () => {
  for (const c of children) try { c.kill('SIGKILL'); } catch { /* gone */ }
});
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130));

const log = (s) => process.stderr.write(`${new Date().toISOString().slice(11, 19)} ${s}\n`);

function run(cmd, args, opts = {}) {
  return new Promise((resolve) => {
    const p = track(spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, PATH: SYS_PATH }, ...opts }));
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (c) => (stdout += c));
    p.stderr.on('data', (c) => (stderr += c));
    p.once('error', (e) => (stderr += String(e)));
    p.once('close', (code) => resolve({ status: code ?? -1, stdout, stderr }));
  });
}

async function cli(pool, args) {
  const r = await run(process.execPath, [CLI, '--pool', pool, '--log-level', 'warn', ...args]);
  if (r.status !== 0) throw new Error(`snapblock ${args.join(' ')} failed (${r.status}): ${r.stderr || r.stdout}`);
  return r.stdout;
}

function api(pool, op, args) {
  const body = Buffer.from(JSON.stringify({ op, args }));
  return new Promise((resolve, reject) => {
    const req = http.request({ agent: false, socketPath: path.join(pool, 'control.sock'), method: 'POST', path: '/v1/call', headers: { 'content-type': 'application/json', 'content-length': body.length } }, (res) => {
      const parts = [];
      res.on('data', (c) => parts.push(c));
      res.on('end', () => {
        const json = JSON.parse(Buffer.concat(parts).toString('utf8') || '{}');
        if ((res.statusCode ?? 500) >= 400) reject(new Error(`${op}: ${json.error?.code}: ${json.error?.message}`));
        else resolve(json);
      });
    });
    req.setTimeout(600_000, () => req.destroy(new Error(`${op} timed out`)));
    req.on('error', reject);
    req.end(body);
  });
}

async function startServer(pool) {
  const proc = track(spawn(process.execPath, [CLI, '--pool', pool, 'serve', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'info' } }));
  const exited = new Promise((r) => proc.once('exit', (c, s) => r(s ?? c)));
  let buf = '';
  // the server's own account of each snapshot create (JSON log lines with a "steps" field)
  const creates = [];
  let partial = '';
  proc.stderr.on('data', (c) => {
    const lines = (partial + c).split('\n');
    partial = lines.pop();
    for (const l of lines) {
      if (!l.includes('"steps"')) continue;
      try {
        const j = JSON.parse(l);
        if (j.snapshot && j.steps) creates.push({ volume: j.volume, snapshot: j.snapshot, ms: j.ms, steps: j.steps });
      } catch { /* not JSON */ }
    }
  });
  const port = await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`serve did not start: ${buf}`)), 60_000);
    proc.stderr.on('data', (c) => {
      buf += c;
      if (buf.length > 100_000) buf = buf.slice(-50_000);
      const line = buf.split('\n').find((l) => l.includes('snapblock serving'));
      const m = line && /nbd:\/\/[^:"]+:(\d+)/.exec(line);
      if (m) {
        clearTimeout(t);
        resolve(Number(m[1]));
      }
    });
    exited.then((c) => reject(new Error(`serve exited (${c}): ${buf}`)));
  });
  return {
    port,
    uri: (v) => `nbd://127.0.0.1:${port}/${v}`,
    /** the server's log record of a create (waits briefly for the line to arrive) */
    createLog: async (vol, snap) => {
      for (let i = 0; i < 50; i++) {
        const r = creates.find((x) => x.volume === vol && x.snapshot === snap);
        if (r) return r;
        await sleep(10);
      }
      return null;
    },
    stop: async () => {
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 60_000);
      await exited;
      clearTimeout(t);
    },
  };
}

/** Run one fio job against an NBD export; returns the parsed job result. */
async function fio(uri, job, scratch) {
  const lines = ['[global]', 'ioengine=nbd', `uri=${uri}`, 'thread=1', 'group_reporting=1', 'randrepeat=0', 'norandommap=1', `[${job.name}]`];
  for (const [k, v] of Object.entries(job)) if (k !== 'name') lines.push(`${k}=${v}`);
  const file = path.join(scratch, `${job.name}.fio`);
  fs.writeFileSync(file, lines.join('\n') + '\n');
  const r = await run('fio', ['--output-format=json', file]);
  if (r.status !== 0) throw new Error(`fio ${job.name} failed: ${r.stderr}\n${r.stdout.slice(0, 2000)}`);
  const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{')));
  const x = j.jobs[0];
  if (x.error) throw new Error(`fio ${job.name}: error ${x.error}`);
  return { readIops: x.read.iops, writeIops: x.write.iops, readMBps: x.read.bw_bytes / 1e6, writeMBps: x.write.bw_bytes / 1e6, writeLatP99us: (x.write.clat_ns?.percentile?.['99.000000'] ?? 0) / 1000 };
}

/** Latency of a 4 KiB write + fdatasync on the pool's filesystem: the floor of any durable create. */
function syncLatencyMs(dir, n = 5) {
  const f = path.join(dir, '.synctest');
  const fd = fs.openSync(f, 'w');
  const buf = Buffer.alloc(4096, 1);
  const t = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    fs.writeSync(fd, buf, 0, buf.length, i * 4096);
    fs.fdatasyncSync(fd);
    t.push(performance.now() - t0);
  }
  fs.closeSync(fd);
  fs.rmSync(f);
  return median(t);
}

function median(a) {
  const s = [...a].sort((x, y) => x - y);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

async function space(pool, vol) {
  const info = await api(pool, 'volume.info', { name: vol });
  const du = spawnSync('du', ['-sk', path.join(pool, 'volumes', vol)], { encoding: 'utf8' });
  return { allocated: info.allocated, du: Number(du.stdout.split(/\s/)[0]) * 1024, snapshots: info.snapshots };
}

/** Drop only this volume's data file from the page cache (fadvise DONTNEED), after syncing it. */
function dropCache(pool, vol) {
  const dir = path.join(pool, 'volumes', vol);
  const f = path.join(dir, 'data');
  // every file of the volume (reserves, mirror images too): no writeback left to compete with the read
  spawnSync('sync', fs.readdirSync(dir).map((x) => path.join(dir, x)));
  const r = spawnSync('dd', [`if=${f}`, 'iflag=nocache', 'count=0', 'status=none'], { encoding: 'utf8' });
  return r.status === 0;
}

/**
 * `check` through the control API: verifies the pool's invariants and, for row volumes, waits
 * until blocks released by a snapshot delete have been punched (done in the background), so
 * that punching does not compete with the next measurement.
 */
async function settle(pool) {
  const r = await api(pool, 'check', {});
  if (!r.ok) throw new Error(`check failed: ${r.problems.join('; ')}`);
}

async function ensureMirror(pool, vol) {
  const t0 = performance.now();
  let st = await api(pool, 'mirror.status', { volume: vol });
  if (st.state === 'none') st = await api(pool, 'mirror.attach', { volume: vol, wait: true });
  while (st.state === 'syncing') {
    await sleep(50);
    st = await api(pool, 'mirror.status', { volume: vol });
  }
  if (st.state !== 'synced') throw new Error(`mirror of ${vol} did not sync: ${JSON.stringify(st)}`);
  return performance.now() - t0;
}

// ------------------------------------------------------------------ one technique

async function runMode(mode, o, scratch) {
  const pool = fs.mkdtempSync(path.join(o.dir, `snapblock-snapbench-${mode}-`));
  const res = { mode, create: {}, randwrite: [], seqread: {}, space: [] };
  const bsArgs = o.blockSize ? ['--block-size', String(o.blockSize)] : [];
  const modeArgs = ['--snapshot-mode', mode, ...bsArgs, ...(mode === 'cow' ? ['--cow-reserve', String(o.size)] : [])];
  await cli(pool, ['volume', 'create', 'small', String(o.size), ...modeArgs]);
  await cli(pool, ['volume', 'create', 'big', String(o.big), ...modeArgs]);
  const info = JSON.parse(await cli(pool, ['volume', 'info', 'small', '--json']));
  res.blockSize = info.blockSize;
  const srv = await startServer(pool);
  try {
    // ---- (a) snapshot create time vs provisioned size
    for (const [vol, size] of [['small', o.size], ['big', o.big]]) {
      log(`${mode}: filling ${vol} (${size / GiB} GiB) with ${o.fill / MiB} MiB at random 1M offsets`);
      await fio(srv.uri(vol), { name: `fill-${vol}`, rw: 'randwrite', bs: '1M', iodepth: 8, size: String(size), io_size: String(o.fill), time_based: 0 }, scratch);
      // make the fill durable: the creates below are timed on an idle volume
      const fl = await run('nbdsh', ['-u', srv.uri(vol), '-c', 'h.flush()']);
      if (fl.status !== 0) throw new Error(`nbdsh flush failed: ${fl.stderr}`);
      const times = [];
      const server = [];
      const syncs = [];
      const fsyncMs = syncLatencyMs(pool);
      // mirror: every create needs a full sync first (tens of seconds at 64 GiB): fewer samples there
      const creates = mode === 'mirror' && vol === 'big' ? Math.min(2, o.creates) : o.creates;
      const viaCli = !(mode === 'mirror' && vol === 'big');
      // The first control request after the fill pays cold code paths on both sides (HTTP
      // client and server, argument validation): timed apart with a snapshot.list, so the
      // creates below measure the create.
      const c0 = performance.now();
      await api(pool, 'snapshot.list', { volume: vol });
      const coldCallMs = performance.now() - c0;
      for (let i = 0; i < creates; i++) {
        if (mode === 'mirror') syncs.push(await ensureMirror(pool, vol));
        const t0 = performance.now();
        await api(pool, 'snapshot.create', { volume: vol, name: `t${i}` });
        times.push(performance.now() - t0);
        server.push(await srv.createLog(vol, `t${i}`));
      }
      // one through the CLI too, for what a user sees (process start-up included)
      let cliMs = null;
      if (viaCli) {
        if (mode === 'mirror') syncs.push(await ensureMirror(pool, vol));
        const c0 = performance.now();
        await cli(pool, ['snapshot', 'create', vol, 'cli']);
        cliMs = performance.now() - c0;
      }
      // the control API's own round trip, with an operation that does no IO (snapshot.list)
      const rtt = [];
      for (let i = 0; i < creates; i++) {
        const t0 = performance.now();
        await api(pool, 'snapshot.list', { volume: vol });
        rtt.push(performance.now() - t0);
      }
      const srvMs = server.filter(Boolean).map((x) => x.ms);
      const stepNames = [...new Set(server.filter(Boolean).flatMap((x) => Object.keys(x.steps)))];
      const steps = Object.fromEntries(stepNames.map((k) => [k, median(server.filter(Boolean).map((x) => x.steps[k] ?? 0))]));
      res.create[vol] = { provisioned: size, ms: times, medianMs: median(times), maxMs: Math.max(...times), server: { ms: srvMs, medianMs: srvMs.length ? median(srvMs) : null, maxMs: srvMs.length ? Math.max(...srvMs) : null, medianSteps: steps }, controlRoundTripMs: median(rtt), coldCallMs, cliMs, fsyncMs, mirrorSyncMs: syncs.length ? syncs : undefined };
      res.space.push({ phase: `(a) ${vol}: filled + its snapshots`, ...(await space(pool, vol)) });
      log(`${mode}: create on ${vol}: median ${median(times).toFixed(2)} ms, max ${Math.max(...times).toFixed(2)} ms; server ${srvMs.length ? median(srvMs).toFixed(2) : '?'} ms ${JSON.stringify(steps)}; control round trip (snapshot.list) ${median(rtt).toFixed(2)} ms, first request after the fill ${coldCallMs.toFixed(1)} ms (CLI ${cliMs === null ? '-' : cliMs.toFixed(0)} ms; 4K write+fdatasync here: ${fsyncMs.toFixed(2)} ms)${syncs.length ? `; mirror sync median ${median(syncs).toFixed(0)} ms` : ''}`);
      for (const s of [...times.keys()].map((i) => `t${i}`).concat(viaCli ? ['cli'] : [])) await api(pool, 'snapshot.delete', { volume: vol, name: s });
    }
    await api(pool, 'volume.delete', { name: 'big' });
    if (o.createOnly) return res;

    // The measured range of the small volume: its first --fill bytes, written sequentially.
    const range = { offset: 0, size: String(o.fill) };
    await fio(srv.uri('small'), { name: 'fill-seq', rw: 'write', bs: '1M', iodepth: 8, ...range }, scratch);
    res.space.push({ phase: '(b) small: filled, 0 snapshots', ...(await space(pool, 'small')) });

    // ---- (c) before: sequential read of the freshly written range
    const seqRead = async (label) => {
      const cold = dropCache(pool, 'small');
      const c = await fio(srv.uri('small'), { name: `seqread-cold-${label}`, rw: 'read', bs: '1M', iodepth: 8, ...range, runtime: o.runtime, time_based: 0 }, scratch);
      const w = await fio(srv.uri('small'), { name: `seqread-warm-${label}`, rw: 'read', bs: '1M', iodepth: 8, ...range, runtime: o.runtime, time_based: 0 }, scratch);
      res.seqread[label] = { coldMBps: cold ? c.readMBps : null, warmMBps: w.readMBps };
      log(`${mode}: 1M seq read ${label}: cold ${cold ? c.readMBps.toFixed(0) : '?'} MB/s, warm ${w.readMBps.toFixed(0)} MB/s`);
    };
    await seqRead('fresh');

    // ---- (b) 4k random writes with 0..16 hot snapshots
    const randwrite = (name, seconds, ramp) => fio(srv.uri('small'), { name, rw: 'randwrite', bs: '4k', iodepth: 32, ...range, time_based: 1, runtime: seconds, ramp_time: ramp }, scratch);
    const maxSnaps = o.points[o.points.length - 1];
    for (let k = 0; k <= maxSnaps; k++) {
      let syncMs;
      let createMs;
      if (k > 0) {
        if (mode === 'mirror') syncMs = await ensureMirror(pool, 'small');
        const t0 = performance.now();
        await api(pool, 'snapshot.create', { volume: 'small', name: `s${k}` });
        const ms = performance.now() - t0;
        createMs = ms;
        res.createUnderLoad = res.createUnderLoad ?? [];
        res.createUnderLoad.push(ms);
        if (!o.points.includes(k)) {
          if (o.burst > 0) await randwrite(`burst-${k}`, o.burst, 0);
          continue;
        }
        log(`${mode}: snapshot ${k} created in ${ms.toFixed(1)} ms${syncMs !== undefined ? ` (mirror synced in ${syncMs.toFixed(0)} ms before)` : ''}`);
      }
      const runs = [];
      for (let i = 0; i < o.repeat; i++) {
        if (i > 0 && k > 0) {
          // every sample starts with a hot newest snapshot: re-take it (the count stays k)
          await api(pool, 'snapshot.delete', { volume: 'small', name: `s${k}` });
          if (mode === 'mirror') await ensureMirror(pool, 'small');
          await api(pool, 'snapshot.create', { volume: 'small', name: `s${k}` });
          await settle(pool);
        }
        runs.push({ ...(await randwrite(`randwrite-${k}-${i}`, o.runtime, o.ramp)), load: os.loadavg()[0] });
      }
      const r = runs.slice().sort((a, b) => a.writeIops - b.writeIops)[Math.floor((runs.length - 1) / 2)];
      const sp = await space(pool, 'small');
      res.randwrite.push({ snapshots: k, iops: r.writeIops, p99us: r.writeLatP99us, samples: runs.map((x) => Math.round(x.writeIops)), load1: runs.map((x) => Number(x.load.toFixed(1))), createMs, mirrorSyncMs: syncMs });
      res.space.push({ phase: `(b) small: after randwrite with ${k} snapshots`, ...sp });
      log(`${mode}: 4k randwrite QD32 with ${k} snapshot(s): ${r.writeIops.toFixed(0)} IOPS${o.repeat > 1 ? ` (median of ${runs.map((x) => x.writeIops.toFixed(0)).join(', ')}; load ${runs.map((x) => x.load.toFixed(1)).join('/')})` : ''} (p99 ${(r.writeLatP99us / 1000).toFixed(1)} ms); allocated ${(sp.allocated / MiB).toFixed(0)} MiB`);
    }

    // ---- (b2) the same comparison, paired: runs alternate between a volume with no snapshot
    // ("ref", filled the same way) and "small" with its maxSnaps snapshots (the newest taken
    // again before each of its runs, so it is hot), so that load drift hits both alike.
    if (o.paired > 0 && maxSnaps > 0) {
      await api(pool, 'volume.create', { name: 'ref', size: o.size, mode, ...(o.blockSize ? { blockSize: o.blockSize } : {}), ...(mode === 'cow' ? { cowReserve: o.size } : {}) });
      await fio(srv.uri('ref'), { name: 'fill-ref', rw: 'write', bs: '1M', iodepth: 8, ...range }, scratch);
      const none = [];
      const snapped = [];
      for (let i = 0; i < o.paired; i++) {
        const a = await fio(srv.uri('ref'), { name: `paired-ref-${i}`, rw: 'randwrite', bs: '4k', iodepth: 32, ...range, time_based: 1, runtime: o.runtime, ramp_time: o.ramp }, scratch);
        await api(pool, 'snapshot.delete', { volume: 'small', name: `s${maxSnaps}` });
        if (mode === 'mirror') await ensureMirror(pool, 'small');
        await api(pool, 'snapshot.create', { volume: 'small', name: `s${maxSnaps}` });
        await settle(pool);
        const b = await randwrite(`paired-snap-${i}`, o.runtime, o.ramp);
        none.push(a.writeIops);
        snapped.push(b.writeIops);
        log(`${mode}: paired ${i + 1}/${o.paired}: no snapshot ${a.writeIops.toFixed(0)} IOPS, ${maxSnaps} snapshots ${b.writeIops.toFixed(0)} IOPS (${(b.writeIops / a.writeIops).toFixed(2)}x; load ${os.loadavg()[0].toFixed(1)})`);
      }
      res.paired = { snapshots: maxSnaps, none, snapped, ratio: median(snapped) / median(none), pairRatios: snapped.map((x, i) => x / none[i]) };
      await api(pool, 'volume.delete', { name: 'ref' });
    }

    // ---- (c) after: the same sequential read over the randomly overwritten range
    await seqRead('after-random-overwrite');

    // ---- (b') back to 0: delete every snapshot and measure again (noise / layout check)
    const d0 = performance.now();
    for (let k = 1; k <= maxSnaps; k++) await api(pool, 'snapshot.delete', { volume: 'small', name: `s${k}` });
    const d1 = performance.now();
    await settle(pool); // row: returns once the released blocks are punched
    res.deleteAll = { deletesMs: d1 - d0, settledMs: performance.now() - d1 };
    log(`${mode}: ${maxSnaps} snapshot deletes took ${(d1 - d0).toFixed(0)} ms; check (after the space was returned) ${(performance.now() - d1).toFixed(0)} ms later`);
    const again = await randwrite('randwrite-0-again', o.runtime, o.ramp);
    res.randwriteAgain = { snapshots: 0, iops: again.writeIops, p99us: again.writeLatP99us };
    res.space.push({ phase: '(b) small: all snapshots deleted', ...(await space(pool, 'small')) });
    log(`${mode}: 4k randwrite QD32 after deleting all snapshots: ${again.writeIops.toFixed(0)} IOPS`);
  } finally {
    await srv.stop();
    if (!o.keep) fs.rmSync(pool, { recursive: true, force: true });
    else res.pool = pool;
  }
  return res;
}

// ------------------------------------------------------------------ report

function table(results, o) {
  const out = [];
  const pad = (s, n) => String(s).padEnd(n);
  const num = (x, d = 0) => (x === null || x === undefined ? '-' : x.toFixed(d));
  out.push(`(a) snapshot create time on an idle (flushed) volume: control-socket call, client wall time, median / max of n; CLI: one create through the CLI, wall time incl. process start-up`);
  out.push(`    ${pad('mode', 8)}${pad(`${o.size / GiB} GiB`, 36)}${pad(`${o.big / GiB} GiB`, 36)}${pad('fdatasync floor', 17)}mirror sync before each (median, ${o.size / GiB} / ${o.big / GiB} GiB)`);
  for (const r of results) {
    const c = (v) => `${num(r.create[v].medianMs, 2)} / ${num(r.create[v].maxMs, 2)} ms (n=${r.create[v].ms.length}, CLI ${num(r.create[v].cliMs)})`;
    const sync = r.create.small.mirrorSyncMs ? `${num(median(r.create.small.mirrorSyncMs))} ms / ${num(median(r.create.big.mirrorSyncMs))} ms` : '';
    out.push(`    ${pad(r.mode, 8)}${pad(c('small'), 36)}${pad(c('big'), 36)}${pad(`${num(r.create.small.fsyncMs, 2)} / ${num(r.create.big.fsyncMs, 2)} ms`, 17)}${sync}`);
  }
  out.push(`    server side (its "snapshot created" log line), median ms and median of each step:`);
  for (const r of results) {
    const sv = (v) => `${num(r.create[v].server?.medianMs, 2)} ms (${Object.entries(r.create[v].server?.medianSteps ?? {}).map(([k, x]) => `${k} ${num(x, 2)}`).join(', ')}), control round trip alone ${num(r.create[v].controlRoundTripMs, 2)} ms`;
    out.push(`    ${pad(r.mode, 8)}${o.size / GiB} GiB: ${sv('small')}; ${o.big / GiB} GiB: ${sv('big')}`);
  }
  if (results[0].createUnderLoad) out.push(`    right after writes (phase b, before each of the ${results[0].createUnderLoad?.length ?? 0} snapshots): ${results.map((r) => `${r.mode} median ${num(median(r.createUnderLoad ?? [NaN]), 1)} / max ${num(Math.max(...(r.createUnderLoad ?? [NaN])), 1)} ms`).join(', ')}`);
  if (o.createOnly) return out.join('\n');
  out.push('');
  out.push(`(b) 4k random write IOPS, QD32, ${o.runtime}s, over the ${o.fill / MiB} MiB written range, by number of hot snapshots (ratio to 0)`);
  out.push(`    ${pad('mode', 8)}${o.points.map((p) => pad(p, 15)).join('')}0 again (all deleted)`);
  for (const r of results) {
    const base = r.randwrite.find((x) => x.snapshots === 0)?.iops;
    out.push(`    ${pad(r.mode, 8)}${r.randwrite.map((x) => pad(`${num(x.iops)} (${num(x.iops / base, 2)})`, 15)).join('')}${r.randwriteAgain ? `${num(r.randwriteAgain.iops)} (${num(r.randwriteAgain.iops / base, 2)})` : '-'}`);
  }
  const paired = results.filter((r) => r.paired);
  if (paired.length) {
    out.push(`    (b2) paired, alternating runs: no snapshot vs ${paired[0].paired.snapshots} snapshots (newest hot), IOPS`);
    for (const r of paired) out.push(`    ${pad(r.mode, 8)}none ${r.paired.none.map((x) => num(x)).join(', ')}; with ${r.paired.snapshots}: ${r.paired.snapped.map((x) => num(x)).join(', ')}; ratio of medians ${num(r.paired.ratio, 2)} (pairs ${r.paired.pairRatios.map((x) => num(x, 2)).join(', ')})`);
  }
  out.push('');
  out.push(`(c) 1M sequential read QD8 of the ${o.fill / MiB} MiB range, MB/s: fresh vs after the random 4k overwrites of (b)`);
  out.push(`    ${pad('mode', 8)}${pad('fresh cold', 13)}${pad('after cold', 13)}${pad('ratio', 8)}${pad('fresh warm', 13)}${pad('after warm', 13)}ratio`);
  for (const r of results) {
    const f = r.seqread.fresh;
    const a = r.seqread['after-random-overwrite'];
    out.push(`    ${pad(r.mode, 8)}${pad(num(f.coldMBps), 13)}${pad(num(a.coldMBps), 13)}${pad(num(a.coldMBps / f.coldMBps, 2), 8)}${pad(num(f.warmMBps), 13)}${pad(num(a.warmMBps), 13)}${num(a.warmMBps / f.warmMBps, 2)}`);
  }
  out.push('');
  out.push('(d) space: volume info "allocated" (du of the volume directory), MiB');
  const phases = results[0].space.map((s) => s.phase.replace(/^\(.\) /, ''));
  out.push(`    ${pad('phase', 46)}${results.map((r) => pad(r.mode, 18)).join('')}`);
  for (let i = 0; i < phases.length; i++) {
    out.push(`    ${pad(phases[i], 46)}${results.map((r) => pad(r.space[i] ? `${num(r.space[i].allocated / MiB)} (${num(r.space[i].du / MiB)})` : '-', 18)).join('')}`);
  }
  return out.join('\n');
}

function claims(results) {
  const out = [];
  for (const r of results) {
    const worst = Math.max(r.create.small.maxMs, r.create.big.maxMs);
    const med = Math.max(r.create.small.medianMs, r.create.big.medianMs);
    const ratio = r.create.big.medianMs / r.create.small.medianMs;
    const ok = worst <= 10;
    out.push(
      `Claim "snapshot create <= 10 ms whatever the volume size" for ${r.mode}: ${ok ? 'CONFIRMED' : med <= 10 ? 'REFUTED at the tail' : 'REFUTED'} — ` +
        `median ${r.create.small.medianMs.toFixed(2)} ms at ${(r.create.small.provisioned / GiB).toFixed(0)} GiB vs ${r.create.big.medianMs.toFixed(2)} ms at ${(r.create.big.provisioned / GiB).toFixed(0)} GiB (x${ratio.toFixed(2)}), worst ${worst.toFixed(2)} ms` +
        `${ok ? ` (${(10 / worst).toFixed(1)}x under the limit)` : ` (${(worst / 10).toFixed(1)}x over the limit)`}` +
        `; the server's own part: median ${r.create.small.server?.medianMs?.toFixed(2) ?? '?'} / ${r.create.big.server?.medianMs?.toFixed(2) ?? '?'} ms, the rest is the control round trip (alone: ${r.create.small.controlRoundTripMs?.toFixed(2) ?? '?'} ms)` +
        `${r.mode === 'mirror' ? `; not counted: the mirror sync each create needs first (median ${median(r.create.big.mirrorSyncMs).toFixed(0)} ms at ${(r.create.big.provisioned / GiB).toFixed(0)} GiB)` : ''}` +
        `${r.createUnderLoad?.length ? `; on a volume just written to (phase b) a create takes median ${median(r.createUnderLoad).toFixed(0)} ms, max ${Math.max(...r.createUnderLoad).toFixed(0)} ms: it makes the dirty data durable first` : ''}.`,
    );
  }
  const row = results.find((r) => r.mode === 'row' && r.randwrite.length);
  if (row) {
    const base = row.randwrite.find((x) => x.snapshots === 0);
    const top = row.randwrite[row.randwrite.length - 1];
    const seqRatio = top.iops / base.iops;
    const p = row.paired;
    const ratio = p ? p.ratio : seqRatio;
    const how = p
      ? `paired runs (b2): median ${median(p.snapped).toFixed(0)} vs ${median(p.none).toFixed(0)} IOPS = ${ratio.toFixed(2)}x; in the progressive series (b) ${top.iops.toFixed(0)} vs ${base.iops.toFixed(0)} = ${seqRatio.toFixed(2)}x`
      : `${top.iops.toFixed(0)} vs ${base.iops.toFixed(0)} IOPS = ${ratio.toFixed(2)}x`;
    out.push(`Claim "row random write with ${top.snapshots} snapshots >= 0.9x with none": ${ratio >= 0.9 ? 'CONFIRMED' : 'REFUTED'} — ${how} (${ratio >= 0.9 ? `${((ratio - 0.9) * 100).toFixed(0)} points above` : `${((0.9 - ratio) * 100).toFixed(0)} points below`} the 0.9x bar).`);
  }
  return out.join('\n');
}

function chart(results, o, pngFile, scratch) {
  const dat = (name, text) => {
    const f = path.join(scratch, name);
    fs.writeFileSync(f, text);
    return f;
  };
  const modes = results.map((r) => r.mode);
  const fCreate = dat('create.dat', `${results.map((r) => `${r.mode} ${r.create.small.medianMs} ${r.create.big.medianMs}`).join('\n')}\n`);
  const fRw = dat('randwrite.dat', `${o.points.map((p) => `${p} ${results.map((r) => r.randwrite.find((x) => x.snapshots === p)?.iops ?? 'NaN').join(' ')}`).join('\n')}\n`);
  const fSeq = dat('seq.dat', `${results.map((r) => `${r.mode} ${r.seqread.fresh.coldMBps ?? 'NaN'} ${r.seqread['after-random-overwrite'].coldMBps ?? 'NaN'} ${r.seqread.fresh.warmMBps} ${r.seqread['after-random-overwrite'].warmMBps}`).join('\n')}\n`);
  const fSp = dat('space.dat', `${o.points.map((p) => `${p} ${results.map((r) => (r.space.find((s) => s.phase === `(b) small: after randwrite with ${p} snapshots`)?.allocated ?? NaN) / MiB).join(' ')}`).join('\n')}\n`);
  const script = `
set terminal pngcairo size 1400,1000 font "sans,10"
set output "${pngFile}"
set multiplot layout 2,2 title "snapblock snapshot techniques (${os.hostname()}, ${new Date().toISOString().slice(0, 10)}, ${os.cpus().length} CPUs)"
set key top left
set grid ytics
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set title "(a) snapshot create time, median (ms)"
set ylabel "ms"
set yrange [0:*]
plot "${fCreate}" using 2:xtic(1) title "${o.size / GiB} GiB", "" using 3 title "${o.big / GiB} GiB", 10 with lines dt 2 lc rgb "red" title "10 ms target"
set title "(b) 4k random write QD32 vs hot snapshots"
set style data linespoints
set ylabel "IOPS"
set xlabel "snapshots"
set logscale x 2
set xrange [0.5:*]
plot ${modes.map((m, i) => `"${fRw}" using ($1 == 0 ? 0.7 : $1):${i + 2} title "${m}" with linespoints lw 2`).join(', ')}
unset logscale x
unset xlabel
set xrange [*:*]
set title "(c) 1M sequential read QD8: fresh vs after random 4k overwrite"
set style data histograms
set ylabel "MB/s"
plot "${fSeq}" using 2:xtic(1) title "fresh, cold", "" using 3 title "after, cold", "" using 4 title "fresh, warm", "" using 5 title "after, warm"
set title "(d) allocated space after each randwrite phase (MiB)"
set style data linespoints
set xlabel "snapshots"
set ylabel "MiB"
plot ${modes.map((m, i) => `"${fSp}" using 1:${i + 2} title "${m}" with linespoints lw 2`).join(', ')}
unset multiplot
`;
  const r = spawnSync('gnuplot', [], { input: script, encoding: 'utf8', env: { ...process.env, PATH: SYS_PATH } });
  if (r.error || r.status !== 0) return `gnuplot failed: ${r.error ?? r.stderr}`;
  return null;
}

// ------------------------------------------------------------------ main

async function main() {
  let o;
  try {
    o = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(e.message);
    process.exit(2);
  }
  if (!fs.existsSync(path.join(ROOT, 'dist', 'cli', 'main.js'))) {
    console.error('dist/ is missing: npx tsc -p .');
    process.exit(2);
  }
  if (spawnSync('fio', ['--enghelp=nbd'], { env: { ...process.env, PATH: SYS_PATH } }).status !== 0) {
    console.error('fio with the nbd engine is needed (apt-get install -y fio)');
    process.exit(2);
  }
  if (o.chart && spawnSync('gnuplot', ['--version'], { env: { ...process.env, PATH: SYS_PATH } }).status !== 0) {
    console.error('gnuplot is needed for the chart: apt-get install -y gnuplot-nox (or pass --no-chart)');
    process.exit(2);
  }
  const stamp = new Date().toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'snapblock-snapbench-'));
  const t0 = Date.now();
  const load0 = os.loadavg();
  const results = [];
  for (const m of o.modes) results.push(await runMode(m, o, scratch));
  const load1 = os.loadavg();
  const text = table(results, o);
  const cl = claims(results);
  const env = `${os.cpus().length} CPUs (${os.cpus()[0]?.model}), ${(os.totalmem() / GiB).toFixed(0)} GiB RAM, load average ${load0.map((x) => x.toFixed(1)).join('/')} at start, ${load1.map((x) => x.toFixed(1)).join('/')} at end; node ${process.version}; ${((Date.now() - t0) / 1000).toFixed(0)} s`;
  console.log(`\nsnapblock snapshot techniques — one run, one machine: ${env}\n`);
  console.log(text);
  console.log('');
  console.log(cl);
  fs.mkdirSync(o.out, { recursive: true });
  const jsonFile = path.join(o.out, `snapshots-${stamp}.json`);
  fs.writeFileSync(jsonFile, JSON.stringify({ started: new Date(t0).toISOString(), env, options: o, results, table: text, claims: cl.split('\n') }, null, 2) + '\n');
  console.log(`\nresults: ${path.relative(process.cwd(), jsonFile)}`);
  if (o.chart) {
    const png = path.join(o.out, `snapshots-${stamp}.png`);
    const err = chart(results, o, png, scratch);
    console.log(err ? `chart: ${err}` : `chart:   ${path.relative(process.cwd(), png)}`);
  }
  fs.rmSync(scratch, { recursive: true, force: true });
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
