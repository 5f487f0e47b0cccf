#!/usr/bin/env node
// Peer benchmark: snapblock against nbdkit, qemu-nbd and nbd-server, all serving the SAME
// backing file, all measured by the same fio jobs (fio's own NBD engine, so no kernel
// client is involved). Servers are interleaved per job so that machine noise and page-cache
// state affect every server alike.
//
//   node bench/peers.mjs [--quick] [--runtime S] [--ramp S] [--size 1G] [--out bench/results]
//                        [--rounds N] [--servers a,b] [--jobs a,b] [--conns 1,4]
//                        [--modes cow,row] [--uv-threads 4,16] [--node-args "..."] [--check]
//                        [--no-chart] [--keep]
//
// snapblock runs once per volume mode: cow (and mirror) keep the live data as a raw image,
// so the shared file itself is hard-linked in as the volume's data file; row has its own
// block-mapped layout, so it gets the same bytes copied in through its export (nbdcopy).
// Needs: dist/ and build/Release (npm ci), fio with ioengine=nbd, nbdkit, qemu-nbd
// (qemu-utils), nbd-server, nbdcopy and nbdinfo (libnbd-bin), gnuplot (gnuplot-nox) for the PNG.
// Writes <out>/peers-<stamp>.json and <out>/peers-<stamp>.png and prints a table.
import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ROOT, eachArg, list, parseSize, sleep } from './lib.mjs';

const EXPORT = 'bench';

// ---------------------------------------------------------------- options

const HELP = `usage: node bench/peers.mjs [options]

  --quick              short runs (3 s + 1 s ramp per measurement)
  --runtime S          seconds measured per fio run (default 8)
  --ramp S             fio ramp_time before measuring (default 2)
  --size SIZE          backing file size, e.g. 1G, 512M (default 1G)
  --out DIR            where the JSON and PNG go (default bench/results)
  --dir DIR            scratch directory for the backing file and pools (default: system tmp)
  --rounds N           measure every (job, server) N times, report the median (default 1)
  --servers LIST       subset of snapblock,nbdkit,qemu-nbd,nbd-server (default all)
  --jobs LIST          subset of randread,randwrite,seqread,seqwrite (default all)
  --conns LIST         connection counts (default 1,4)
  --modes LIST         snapblock volume modes to run, each a server of its own (default cow,row):
                       cow/mirror serve the shared backing file itself (hard-linked in as the
                       volume's raw data file); row has its own layout, so it gets the same
                       bytes copied in through its export with nbdcopy before measuring
  --uv-threads LIST    also run snapblock (first mode) with UV_THREADPOOL_SIZE=N for each N
                       (named snapblock-MODE[uvN]); the others keep the inherited env
  --also-root DIRS     A/B test: also run the snapblock of each other checkout/build DIR (its
                       bin/snapblock.js, dist/, build/), named snapblock-MODE@<basename DIR>
  --node-args "ARGS"   extra node flags for snapblock (e.g. "--cpu-prof --cpu-prof-dir=/tmp/p")
  --check              exit 1 unless snapblock >= 1.0x nbdkit and >= 1.2x qemu-nbd on every job
  --no-chart           skip the PNG (then gnuplot is not needed)
  --chart-from FILE    only (re)draw FILE.json's chart as FILE.png and print its tables
  --keep               keep the scratch directory (backing file, logs, fio outputs)
`;


function parseArgs(argv) {
  const o = {
    runtime: 8,
    ramp: 2,
    size: 1024 ** 3,
    out: path.join(ROOT, 'bench', 'results'),
    dir: os.tmpdir(),
    rounds: 1,
    servers: ['snapblock', 'nbdkit', 'qemu-nbd', 'nbd-server'],
    jobs: ['randread', 'randwrite', 'seqread', 'seqwrite'],
    conns: [1, 4],
    uvThreads: [],
    modes: ['cow', 'row'],
    alsoRoots: [],
    chartFrom: undefined,
    nodeArgs: [],
    check: false,
    chart: true,
    keep: false,
  };
  eachArg(argv, (a, val) => {
    switch (a) {
      case '--quick': o.runtime = 3; o.ramp = 1; break;
      case '--runtime': o.runtime = Number(val()); break;
      case '--ramp': o.ramp = Number(val()); break;
      case '--size': o.size = parseSize(val()); break;
      case '--out': o.out = path.resolve(val()); break;
      case '--dir': o.dir = path.resolve(val()); break;
      case '--rounds': o.rounds = Number(val()); break;
      case '--servers': o.servers = list(val()); break;
      case '--jobs': o.jobs = list(val()); break;
      case '--conns': o.conns = list(val()).map(Number); break;
      case '--uv-threads': o.uvThreads = list(val()).map(Number); break;
      case '--modes': o.modes = list(val()); break;
      case '--chart-from': o.chartFrom = path.resolve(val()); break;
      case '--also-root': o.alsoRoots = list(val()).map((d) => path.resolve(d)); break;
      case '--node-args': o.nodeArgs = val().split(/\s+/).filter(Boolean); break;
      case '--check': o.check = true; break;
      case '--no-chart': o.chart = false; break;
      case '--keep': o.keep = true; break;
      case '-h': case '--help': process.stdout.write(HELP); process.exit(0); break;
      default: throw new Error(`unknown option ${a}\n\n${HELP}`);
    }
  });
  if (!(o.runtime > 0) || !(o.ramp >= 0)) throw new Error('--runtime must be > 0 and --ramp >= 0');
  if (!Number.isInteger(o.rounds) || o.rounds < 1) throw new Error('--rounds must be a positive integer');
  if (o.size % (1024 * 1024) !== 0 || o.size < 16 * 1024 * 1024) throw new Error('--size must be a multiple of 1M and at least 16M');
  for (const s of o.servers) if (!SERVERS[s]) throw new Error(`unknown server "${s}" (known: ${Object.keys(SERVERS).join(', ')})`);
  for (const j of o.jobs) if (!JOBS[j]) throw new Error(`unknown job "${j}" (known: ${Object.keys(JOBS).join(', ')})`);
  for (const c of o.conns) if (!Number.isInteger(c) || c < 1 || c > 16) throw new Error('--conns takes integers 1..16');
  for (const n of o.uvThreads) if (!Number.isInteger(n) || n < 1 || n > 1024) throw new Error('--uv-threads takes integers 1..1024');
  if (o.uvThreads.length && !o.servers.includes('snapblock')) throw new Error('--uv-threads needs snapblock among --servers');
  for (const m of o.modes) if (!['row', 'cow', 'mirror'].includes(m)) throw new Error(`unknown snapshot mode "${m}" (row, cow, mirror)`);
  if (!o.modes.length) throw new Error('--modes needs at least one mode');
  return o;
}

// ---------------------------------------------------------------- workloads

/** the fio workloads; each runs once per connection count */
const JOBS = {
  randread: { title: '4k randread QD32', rw: 'randread', bs: '4k', iodepth: 32, metric: 'iops', unit: 'IOPS' },
  randwrite: { title: '4k randwrite QD32', rw: 'randwrite', bs: '4k', iodepth: 32, metric: 'iops', unit: 'IOPS' },
  seqread: { title: '1M seqread QD8', rw: 'read', bs: '1M', iodepth: 8, metric: 'mbps', unit: 'MB/s' },
  seqwrite: { title: '1M seqwrite QD8', rw: 'write', bs: '1M', iodepth: 8, metric: 'mbps', unit: 'MB/s' },
};

/** fio job file: numjobs = connections (the nbd engine opens one connection per job) */
function fioJobFile(job, conns, uri, o) {
  const j = JOBS[job];
  const lines = [
    '[global]',
    'ioengine=nbd',
    `uri=${uri}`,
    'thread=1',
    'time_based=1',
    `runtime=${o.runtime}`,
    `ramp_time=${o.ramp}`,
    'group_reporting=1',
    'randrepeat=0',
    'norandommap=1',
    `[${job}-${conns}c]`,
    `rw=${j.rw}`,
    `bs=${j.bs}`,
    `iodepth=${j.iodepth}`,
    `numjobs=${conns}`,
  ];
  if (j.rw === 'read' || j.rw === 'write') {
    // Sequential streams: each connection walks its own slice of the device.
    const slice = Math.floor(o.size / conns / (1024 * 1024)) * 1024 * 1024;
    lines.push(`size=${slice}`, `offset_increment=${slice}`);
  }
  return lines.join('\n') + '\n';
}

// ---------------------------------------------------------------- processes

/** every process we started that may still run: { child?, pgid?, name } */
const live = new Set();
let cleaningUp;

function track(entry) {
  live.add(entry);
  entry.child?.once('exit', (code, sig) => {
    entry.exit = sig ?? code;
    if (!cleaningUp && entry.name !== 'fio') log(`!! ${entry.name} (pid ${entry.child.pid}) exited unexpectedly: ${entry.exit}`);
  });
  return entry;
}

function killEntry(e, sig) {
  try {
    if (e.pgid) process.kill(-e.pgid, sig);
    else if (e.child && e.child.exitCode === null && e.child.signalCode === null) e.child.kill(sig);
  } catch {
    /* already gone */
  }
}

function alive(e) {
  if (e.child) return e.child.exitCode === null && e.child.signalCode === null;
  try {
    process.kill(-e.pgid, 0);
    return true;
  } catch {
    return false;
  }
}

/** SIGTERM, then SIGKILL after graceMs */
async function stopEntry(e, graceMs = 3000) {
  killEntry(e, 'SIGTERM');
  const t0 = Date.now();
  while (alive(e) && Date.now() - t0 < graceMs) await sleep(50);
  if (alive(e)) killEntry(e, 'SIGKILL');
  while (alive(e) && Date.now() - t0 < graceMs + 2000) await sleep(50);
  live.delete(e);
}

function cleanup() {
  cleaningUp ??= Promise.all([...live].map((e) => stopEntry(e)));
  return cleaningUp;
}

process.on('exit', () => {
  for (const e of live) killEntry(e, 'SIGKILL');
});
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(sig, () => {
    log(`\n${sig}: stopping servers…`);
    cleanup().finally(() => {
      removeScratch(true);
      process.exit(130);
    });
  });
}

const log = (s) => process.stderr.write(s + '\n');

function which(cmd) {
  const r = spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : undefined;
}

function version(cmd, args, re = /.*/) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  const text = `${r.stdout ?? ''}\n${r.stderr ?? ''}`;
  const line = text.split('\n').find((l) => re.test(l));
  return line?.trim() ?? 'unknown';
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function probe(port) {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function waitListening(port, isAlive, what, logFile, timeoutMs = 15000) {
  const t0 = Date.now();
  while (Date.now() - t0 < timeoutMs) {
    if (!isAlive()) throw new Error(`${what} exited before listening; see ${logFile}:\n${tail(logFile)}`);
    if (await probe(port)) return;
    await sleep(50);
  }
  throw new Error(`${what} did not listen on 127.0.0.1:${port} within ${timeoutMs / 1000} s; see ${logFile}`);
}

function tail(file, n = 15) {
  try {
    return fs.readFileSync(file, 'utf8').trimEnd().split('\n').slice(-n).join('\n');
  } catch {
    return '';
  }
}

/** a foreground server on a port we picked; retried on another port if it dies (port taken) */
async function startOnFreePort(name, scratch, argsFor, opts = {}) {
  let lastErr;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const logFile = path.join(scratch, `${name}.log`);
    const fd = fs.openSync(logFile, 'a');
    const [cmd, ...args] = argsFor(port);
    const child = spawn(cmd, args, { stdio: ['ignore', fd, fd], env: opts.env ?? process.env });
    fs.closeSync(fd);
    const entry = track({ name, child });
    try {
      await waitListening(port, () => alive(entry), name, logFile);
      return { port, entry, logFile };
    } catch (err) {
      lastErr = err;
      await stopEntry(entry);
    }
  }
  throw lastErr;
}

// ---------------------------------------------------------------- servers

/** modes whose live data is a plain raw image in <volume dir>/data that peers can serve too */
const RAW_MODES = new Set(['cow', 'mirror']);

function snapblockServer(variant, mode, env, root = ROOT) {
  return {
    name: variant,
    mode,
    root,
    async start(ctx) {
      // A private pool with one volume "bench" of the backing file's size.
      const pool = path.join(ctx.scratch, `pool-${variant.replace(/[^a-z0-9]+/gi, '_')}`);
      const cli = path.join(root, 'bin', 'snapblock.js');
      const run = (...args) => {
        const r = spawnSync(process.execPath, [cli, '--pool', pool, '--log-level', 'warn', ...args], { encoding: 'utf8' });
        if (r.status !== 0) throw new Error(`snapblock ${args.join(' ')} failed: ${r.stderr || r.stdout}`);
        return r.stdout;
      };
      run('volume', 'create', EXPORT, String(ctx.size), '--snapshot-mode', mode);
      const catalog = JSON.parse(fs.readFileSync(path.join(pool, 'catalog.json'), 'utf8'));
      const rec = catalog.volumes?.[EXPORT];
      if (!rec || rec.mode !== mode) throw new Error(`snapblock created no ${mode} volume (catalog: ${JSON.stringify(rec)})`);
      const data = path.join(pool, rec.dir ?? path.join('volumes', EXPORT), 'data');
      if (RAW_MODES.has(mode)) {
        // Live data is a raw image: swap in the shared backing file (hard link, same inode).
        if (fs.statSync(data).size !== ctx.size) throw new Error(`snapblock ${mode} data file is ${fs.statSync(data).size} bytes, expected ${ctx.size}`);
        fs.rmSync(data);
        fs.linkSync(ctx.file, data);
      }
      const info = JSON.parse(run('volume', 'info', EXPORT, '--json'));
      if (info.size !== ctx.size) throw new Error(`snapblock catalog size ${info.size} != backing file size ${ctx.size}`);
      const logFile = path.join(ctx.scratch, `${variant}.log`);
      const logFd = fs.openSync(logFile, 'a');
      const child = spawn(process.execPath, [...ctx.nodeArgs, cli, '--pool', pool, 'serve', '--listen', '127.0.0.1:0', '--log-level', 'info'], {
        stdio: ['ignore', logFd, 'pipe'],
        env: { ...process.env, ...env },
      });
      const entry = track({ name: variant, child });
      // Port 0: the kernel picks a free port; the "snapblock serving" log line tells which.
      const port = await new Promise((resolve, reject) => {
        let buf = '';
        let found = false;
        const timer = setTimeout(() => reject(new Error(`${variant} did not report its port within 15 s; see ${logFile}`)), 15000);
        child.stderr.on('data', (d) => {
          fs.writeSync(logFd, d);
          if (found) return;
          buf += d.toString();
          for (let nl; (nl = buf.indexOf('\n')) >= 0; ) {
            const line = buf.slice(0, nl);
            buf = buf.slice(nl + 1);
            const m = line.includes('"snapblock serving"') ? /nbd:\/\/[^"]*?:(\d+)/.exec(line) : null;
            if (m) {
              found = true;
              clearTimeout(timer);
              resolve(Number(m[1]));
              return;
            }
          }
        });
        child.once('exit', (code, sig) => {
          clearTimeout(timer);
          if (!found) reject(new Error(`${variant} exited (${code ?? sig}) before serving; see ${logFile}:\n${tail(logFile)}`));
        });
      });
      child.once('exit', () => fs.closeSync(logFd));
      if (!RAW_MODES.has(mode)) {
        // The data file has snapblock's own layout (e.g. row: a block map): give it the same
        // bytes through its own export, once, before measuring; then keep it warm like the file.
        const r = spawnSync('nbdcopy', ['--flush', ctx.file, `nbd://127.0.0.1:${port}/${EXPORT}`], { encoding: 'utf8', timeout: 600_000 });
        if (r.status !== 0) throw new Error(`nbdcopy into ${variant} failed: ${r.stderr || r.error?.message}`);
        ctx.files.push(data);
      }
      return { port, exportName: EXPORT, entry, logFile, pid: child.pid, mode, dataFile: data };
    },
  };
}

const SERVERS = {
  snapblock: { name: 'snapblock' }, // expanded per --modes / --uv-threads in main()
  nbdkit: {
    name: 'nbdkit',
    async start(ctx) {
      const s = await startOnFreePort('nbdkit', ctx.scratch, (port) => ['nbdkit', '-f', '-p', String(port), '-i', '127.0.0.1', 'file', ctx.file]);
      return { ...s, exportName: '', pid: s.entry.child.pid };
    },
  },
  'qemu-nbd': {
    name: 'qemu-nbd',
    async start(ctx) {
      // --shared: allow several clients at once (default 1); --persistent: survive the last one.
      const s = await startOnFreePort('qemu-nbd', ctx.scratch, (port) => [
        'qemu-nbd', '--persistent', '--shared=16', '-f', 'raw', '-b', '127.0.0.1', '-p', String(port), '-x', EXPORT, ctx.file,
      ]);
      return { ...s, exportName: EXPORT, pid: s.entry.child.pid };
    },
  },
  'nbd-server': {
    name: 'nbd-server',
    async start(ctx) {
      // nbd-server -d serves one connection only, so it runs as the daemon it wants to be
      // (forking per connection); its pid file gives its process group, which we kill.
      let lastErr;
      for (let attempt = 0; attempt < 3; attempt++) {
        const port = await freePort();
        const conf = path.join(ctx.scratch, 'nbd-server.conf');
        const pidFile = path.join(ctx.scratch, 'nbd-server.pid');
        const logFile = path.join(ctx.scratch, 'nbd-server.log');
        fs.rmSync(pidFile, { force: true });
        fs.writeFileSync(
          conf,
          ['[generic]', '    listenaddr = 127.0.0.1', `    port = ${port}`, '    allowlist = false', `[${EXPORT}]`, `    exportname = ${ctx.file}`, '    multifile = false', '    readonly = false', ''].join('\n'),
        );
        const r = spawnSync('nbd-server', ['-C', conf, '-p', pidFile], { encoding: 'utf8' });
        fs.writeFileSync(logFile, `${r.stdout ?? ''}${r.stderr ?? ''}`, { flag: 'a' });
        let pid;
        for (let i = 0; i < 100 && !pid; i++) {
          pid = Number(fs.existsSync(pidFile) ? fs.readFileSync(pidFile, 'utf8').trim() : 0) || undefined;
          if (!pid) await sleep(50);
        }
        if (!pid) {
          lastErr = new Error(`nbd-server wrote no pid file (exit ${r.status}); see ${logFile}:\n${tail(logFile)}`);
          continue;
        }
        const entry = track({ name: 'nbd-server', pgid: pid });
        try {
          await waitListening(port, () => alive(entry), 'nbd-server', logFile);
          return { port, exportName: EXPORT, entry, logFile, pid };
        } catch (err) {
          lastErr = err;
          await stopEntry(entry);
        }
      }
      throw lastErr;
    },
  },
};

// ---------------------------------------------------------------- measuring

// Server CPU time (all threads; for nbd-server all processes of its group), from /proc.
const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout) || 100;
function statOf(pid) {
  try {
    const t = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = t.slice(t.lastIndexOf(')') + 2).split(' '); // fields from 3 (state) on
    // utime + stime, plus cutime + cstime: the reaped per-connection children of nbd-server
    return { pgrp: Number(f[2]), cpu: (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) / CLK_TCK };
  } catch {
    return undefined;
  }
}
function serverCpu(srv) {
  if (!srv.entry.pgid) return statOf(srv.pid)?.cpu ?? NaN;
  let sum = 0;
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    const st = statOf(d);
    if (st && st.pgrp === srv.entry.pgid) sum += st.cpu;
  }
  return sum;
}

/** runs fio; onStart(child) is called once it has been spawned */
function runFio(jobFile, outFile, timeoutMs, onStart) {
  return new Promise((resolve, reject) => {
    const child = spawn('fio', ['--output-format=json', `--output=${outFile}`, jobFile], { stdio: ['ignore', 'ignore', 'pipe'] });
    const entry = track({ name: 'fio', child });
    onStart?.(child);
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => {
      stderr += `\n(killed after ${timeoutMs / 1000} s)`;
      killEntry(entry, 'SIGKILL');
    }, timeoutMs);
    child.once('exit', (code, sig) => {
      clearTimeout(timer);
      live.delete(entry);
      let json;
      try {
        const text = fs.readFileSync(outFile, 'utf8');
        json = JSON.parse(text.slice(text.indexOf('{')));
      } catch {
        /* reported below */
      }
      const job = json?.jobs?.[0];
      if (code !== 0 || !job || job.error) {
        reject(new Error(`fio ${path.basename(jobFile)} failed (exit ${code ?? sig}, error ${job?.error}): ${stderr.trim().split('\n').slice(-5).join(' | ')}`));
      } else resolve(job);
    });
  });
}

function summarize(jobName, fioJob) {
  const j = JOBS[jobName];
  const side = j.rw.includes('read') ? fioJob.read : fioJob.write;
  const pct = side.clat_ns?.percentile ?? {};
  return {
    value: j.metric === 'iops' ? side.iops : side.bw_bytes / 1e6,
    iops: side.iops,
    mbps: side.bw_bytes / 1e6,
    ios: side.total_ios,
    latMeanUs: (side.lat_ns?.mean ?? 0) / 1000,
    clatP99Us: (pct['99.000000'] ?? 0) / 1000,
    cpuUsr: fioJob.usr_cpu,
    cpuSys: fioJob.sys_cpu,
  };
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

// ---------------------------------------------------------------- backing file

function prepareBackingFile(file, size) {
  // Sparse first (truncate), then every byte written with random data so reads hit real,
  // incompressible data; fsync so no writeback is pending, then read through to warm the cache.
  const fd = fs.openSync(file, 'w+');
  try {
    fs.ftruncateSync(fd, size);
    const chunk = Buffer.allocUnsafe(16 * 1024 * 1024);
    for (let off = 0; off < size; off += chunk.length) {
      const n = Math.min(chunk.length, size - off);
      crypto.randomFillSync(chunk, 0, n);
      fs.writeSync(fd, chunk, 0, n, off);
    }
    fs.fsyncSync(fd);
    for (let off = 0; off < size; off += chunk.length) fs.readSync(fd, chunk, 0, Math.min(chunk.length, size - off), off);
  } finally {
    fs.closeSync(fd);
  }
}

/** read the file through so every server starts from a warm page cache (others may drop caches) */
function warmBackingFile(file, size) {
  const fd = fs.openSync(file, 'r');
  try {
    warmBuf ??= Buffer.allocUnsafe(16 * 1024 * 1024);
    for (let off = 0; off < size; off += warmBuf.length) fs.readSync(fd, warmBuf, 0, Math.min(warmBuf.length, size - off), off);
  } finally {
    fs.closeSync(fd);
  }
}
let warmBuf;

function flushBackingFile(file) {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

let scratchDir;
let keepScratch = false;
function removeScratch(failed = false) {
  if (!scratchDir || keepScratch) return;
  if (!failed) return fs.rmSync(scratchDir, { recursive: true, force: true });
  // Keep the logs and fio outputs for a post-mortem, drop the big images.
  for (const f of fs.readdirSync(scratchDir, { recursive: true })) {
    if (String(f).endsWith('.img')) fs.rmSync(path.join(scratchDir, String(f)), { force: true });
  }
  log(`logs kept in ${scratchDir}`);
}

// ---------------------------------------------------------------- reporting

const fmtCpu = (s) => (Number.isFinite(s.serverCpuUsPerOp) ? `${s.serverCpuPct.toFixed(0).padStart(3)}% of a core, ${s.serverCpuUsPerOp.toFixed(1)} µs/op` : 'n/a');
const fmt = (v, metric) => (v === undefined ? '—' : metric === 'iops' ? Math.round(v).toLocaleString('en-US') : v.toFixed(0));
const pad = (rows) => {
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => String(r[i]).length)));
  return rows.map((r) => r.map((c, i) => (i === 0 ? String(c).padEnd(w[i]) : String(c).padStart(w[i]))).join('  ')).join('\n');
};

function tables(result) {
  const { servers, rows } = result;
  const abs = [['job', 'unit', ...servers]];
  for (const r of rows) abs.push([r.label, JOBS[r.job].unit, ...servers.map((s) => fmt(r.servers[s]?.value, JOBS[r.job].metric))]);
  const ratioCols = Object.keys(rows[0]?.ratios ?? {});
  const rel = [['job', ...ratioCols, 'target']];
  for (const r of rows) rel.push([r.label, ...ratioCols.map((k) => (r.ratios[k] === undefined ? '—' : r.ratios[k].toFixed(2) + 'x')), targetText(r)]);
  const cpu = [['job', ...servers]];
  for (const r of rows) cpu.push([r.label, ...servers.map((s) => (Number.isFinite(r.servers[s]?.serverCpuUsPerOp) ? r.servers[s].serverCpuUsPerOp.toFixed(1) : '—'))]);
  return (
    `Absolute (median of ${result.options.rounds} round(s), ${result.options.runtime} s each; IOPS for 4k, MB/s for 1M):\n${pad(abs)}\n\n` +
    (ratioCols.length ? `snapblock / peer (target: >= 1.00x nbdkit and >= 1.20x qemu-nbd):\n${pad(rel)}\n\n` : '') +
    `Server CPU time per request, µs (all threads; less sensitive to machine load than throughput):\n${pad(cpu)}\n`
  );
}

function targetText(r) {
  if (!r.target) return '—';
  const e = Object.entries(r.target);
  return e.length === 1 ? e[0][1] : e.map(([v, t]) => `${v.replace(/^snapblock-/, '')}:${t}`).join(' ');
}

function markdown(result) {
  const { servers, rows } = result;
  const head = ['job', 'unit', ...servers, ...Object.keys(rows[0]?.ratios ?? {}), 'target'];
  const lines = [`| ${head.join(' | ')} |`, `| ${head.map((_, i) => (i < 2 ? '---' : '---:')).join(' | ')} |`];
  for (const r of rows) {
    lines.push(`| ${[r.label, JOBS[r.job].unit, ...servers.map((s) => fmt(r.servers[s]?.value, JOBS[r.job].metric)), ...Object.values(r.ratios).map((x) => (x === undefined ? '—' : x.toFixed(2) + 'x')), targetText(r)].join(' | ')} |`);
  }
  return lines.join('\n') + '\n';
}

const COLORS = { 'snapblock-cow': 0xd62728, 'snapblock-row': 0xff7f0e, 'snapblock-mirror': 0xe377c2, nbdkit: 0x1f77b4, 'qemu-nbd': 0x2ca02c, 'nbd-server': 0x9467bd };
const variantColors = [0x8c564b, 0x7f7f7f, 0xbcbd22, 0x17becf, 0xf7b6d2, 0xc49c94];

function chart(result, pngFile, scratch) {
  const { servers, rows, options } = result;
  const color = (s, i) => COLORS[s] ?? variantColors[i % variantColors.length];
  const dat = path.join(scratch, 'chart.dat');
  const blocks = rows.map((r) =>
    servers.map((s, i) => `"${s}" ${r.servers[s]?.value ?? 0} ${color(s, i)}`).join('\n'),
  );
  fs.writeFileSync(dat, blocks.join('\n\n\n') + '\n');
  const jobs = [...new Set(rows.map((r) => r.job))];
  const conns = [...new Set(rows.map((r) => r.conns))];
  const w = Math.max(900, jobs.length * Math.max(300, servers.length * 75));
  const h = 140 + conns.length * 360;
  const script = [
    `set terminal pngcairo size ${w},${h} font "sans,10"`,
    `set output "${pngFile}"`,
    'set termoption noenhanced', // server names hold @, [ ] and _ : print them literally
    `set multiplot layout ${conns.length},${jobs.length} title "snapblock vs peers — fio nbd engine, same ${formatBytes(options.size)} file, ${options.runtime} s x ${options.rounds} round(s), ${result.machine.cpus} CPUs, ${result.date}" font ",12"`,
    'set style fill solid 0.85 border -1',
    'set boxwidth 0.7',
    'set grid ytics',
    'set yrange [0:*]',
    'set offsets 0.5, 0.5, 0, 0',
    'set xtics rotate by -30 nomirror',
    'unset key',
  ];
  rows.forEach((r, k) => {
    const unit = JOBS[r.job].unit;
    const top = Math.max(...servers.map((s) => r.servers[s]?.value ?? 0)) * 1.18 || 1;
    script.push(
      `set title "${r.label}" font ",11"`,
      `set ylabel "${unit}"`,
      `set yrange [0:${top}]`,
      `plot "${dat}" index ${k} using 0:2:3:xtic(1) with boxes lc rgb variable, ` +
        `"" index ${k} using 0:2:(${JOBS[r.job].metric === 'iops' ? 'sprintf("%.0fk", $2/1000)' : 'sprintf("%.0f", $2)'}) with labels offset 0,0.8 font ",9"`,
    );
  });
  script.push('unset multiplot');
  const r = spawnSync('gnuplot', [], { input: script.join('\n') + '\n', encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`gnuplot failed: ${r.stderr}`);
}

function formatBytes(n) {
  for (const [u, m] of [['T', 1024 ** 4], ['G', 1024 ** 3], ['M', 1024 ** 2]]) if (n >= m && n % m === 0) return `${n / m} ${u}iB`;
  return `${n} B`;
}

function stamp(d) {
  const p = (x) => String(x).padStart(2, '0');
  return `${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}

// ---------------------------------------------------------------- main

async function main() {
  const o = parseArgs(process.argv.slice(2));
  if (o.chartFrom) {
    if (!which('gnuplot')) throw new Error('gnuplot is missing (Debian package gnuplot-nox)');
    const result = JSON.parse(fs.readFileSync(o.chartFrom, 'utf8'));
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'snapblock-chart-'));
    try {
      const png = o.chartFrom.replace(/\.json$/, '') + '.png';
      chart(result, png, tmp);
      process.stdout.write(tables(result) + `\nwrote ${png}\n`);
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
    return;
  }

  // Fail before spending minutes on measurements if anything is missing.
  const need = { fio: 'fio', nbdkit: 'nbdkit', 'qemu-nbd': 'qemu-utils', 'nbd-server': 'nbd-server' };
  const missing = [];
  if (!which('fio')) missing.push('fio (Debian package fio)');
  for (const s of o.servers) if (need[s] && !which(s)) missing.push(`${s} (Debian package ${need[s]})`);
  if (o.servers.includes('snapblock') && o.modes.some((m) => !RAW_MODES.has(m)) && !which('nbdcopy')) missing.push('nbdcopy (Debian package libnbd-bin), to fill the row volume');
  if (o.chart && !which('gnuplot')) missing.push('gnuplot (Debian package gnuplot-nox; or pass --no-chart)');
  if (missing.length) throw new Error(`missing tools: ${missing.join(', ')}. Install them with scripts/install-deps.sh or apt-get install.`);
  const eng = spawnSync('fio', ['--enghelp=nbd'], { encoding: 'utf8' });
  if (eng.status !== 0 || !/uri/.test(eng.stdout + eng.stderr)) throw new Error('this fio has no ioengine=nbd (Debian fio >= 3.19 has it)');
  if (o.servers.includes('snapblock') && (!fs.existsSync(path.join(ROOT, 'dist', 'cli', 'main.js')) || !fs.existsSync(path.join(ROOT, 'build', 'Release', 'snapblock_native.node')))) {
    throw new Error('snapblock is not built: run npm ci (or npx tsc -p . and node-gyp rebuild) first');
  }

  // Server line-up: peers plus snapblock and its UV_THREADPOOL_SIZE variants.
  const servers = [];
  for (const s of o.servers) {
    if (s !== 'snapblock') {
      servers.push(SERVERS[s]);
      continue;
    }
    for (const m of o.modes) servers.push(snapblockServer(`snapblock-${m}`, m, {}));
    for (const n of o.uvThreads) servers.push(snapblockServer(`snapblock-${o.modes[0]}[uv${n}]`, o.modes[0], { UV_THREADPOOL_SIZE: String(n) }));
    for (const r of o.alsoRoots) {
      if (!fs.existsSync(path.join(r, 'bin', 'snapblock.js'))) throw new Error(`--also-root ${r}: no bin/snapblock.js there`);
      for (const m of o.modes) servers.push(snapblockServer(`snapblock-${m}@${path.basename(r)}`, m, {}, r));
    }
  }
  const names = servers.map((s) => s.name);
  const snapVariants = names.filter((n) => n.startsWith('snapblock'));
  const peers = names.filter((n) => !n.startsWith('snapblock'));

  fs.mkdirSync(o.out, { recursive: true });
  scratchDir = fs.mkdtempSync(path.join(o.dir, 'snapblock-peers-'));
  keepScratch = o.keep;
  const file = path.join(scratchDir, 'backing.img');
  log(`scratch: ${scratchDir}`);
  log(`preparing ${formatBytes(o.size)} backing file (random data, page cache warm)…`);
  prepareBackingFile(file, o.size);
  // files: every file a server reads its data from (kept warm and flushed alike)
  const ctx = { scratch: scratchDir, file, files: [file], size: o.size, nodeArgs: o.nodeArgs };

  const started = new Date();
  const result = {
    date: started.toISOString(),
    machine: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, memGiB: Math.round(os.totalmem() / 1024 ** 3), kernel: os.release(), node: process.version, env: { UV_THREADPOOL_SIZE: process.env.UV_THREADPOOL_SIZE ?? null } },
    versions: {
      snapblock: gitRev(),
      fio: version('fio', ['--version']),
      nbdkit: o.servers.includes('nbdkit') ? version('nbdkit', ['--version']) : undefined,
      'qemu-nbd': o.servers.includes('qemu-nbd') ? version('qemu-nbd', ['--version'], /qemu-nbd/) : undefined,
      'nbd-server': o.servers.includes('nbd-server') ? version('nbd-server', ['-V'], /version/) : undefined,
    },
    options: { runtime: o.runtime, ramp: o.ramp, size: o.size, rounds: o.rounds, jobs: o.jobs, conns: o.conns, modes: o.modes, uvThreads: o.uvThreads, alsoRoots: o.alsoRoots, nodeArgs: o.nodeArgs },
    servers: names,
    rows: [],
  };

  try {
    // All servers run for the whole benchmark (idle ones cost nothing) and share the file
    // through the page cache; each measurement talks to exactly one of them.
    const running = {};
    for (const s of servers) {
      running[s.name] = await s.start(ctx);
      log(`started ${s.name} on 127.0.0.1:${running[s.name].port} (export "${running[s.name].exportName}")`);
    }
    checkSizes(running, o.size);

    const cases = [];
    for (const conns of o.conns) for (const job of o.jobs) cases.push({ job, conns });
    const samples = new Map(cases.map((c) => [`${c.job}/${c.conns}`, Object.fromEntries(names.map((n) => [n, []]))]));
    const total = o.rounds * cases.length * names.length;
    const perRun = o.runtime + o.ramp + 1;
    log(`${total} fio runs, about ${Math.ceil((total * perRun) / 60)} min`);
    let n = 0;
    for (let round = 0; round < o.rounds; round++) {
      for (const [ci, c] of cases.entries()) {
        // Rotate who goes first so no server always follows a write burst or starts cold.
        const shift = (ci + round) % names.length;
        const order = [...names.slice(shift), ...names.slice(0, shift)];
        for (const name of order) {
          const srv = running[name];
          const tag = `${c.job}-${c.conns}c-${name.replace(/[^a-z0-9]+/gi, '_')}-r${round}`;
          const jobFile = path.join(scratchDir, `${tag}.fio`);
          const outFile = path.join(scratchDir, `${tag}.json`);
          fs.writeFileSync(jobFile, fioJobFile(c.job, c.conns, `nbd://127.0.0.1:${srv.port}/${srv.exportName}`, o));
          if (!alive(srv.entry)) throw new Error(`${name} is not running (exit ${srv.entry.exit ?? '?'}); see ${srv.logFile}:\n${tail(srv.logFile)}`);
          for (const f of ctx.files) warmBackingFile(f, o.size);
          // Server CPU is sampled from the end of the ramp to fio's exit (the measured part).
          let cpu0;
          let rampTimer;
          const job = await runFio(jobFile, outFile, (o.runtime + o.ramp + 60) * 1000, () => {
            rampTimer = setTimeout(() => (cpu0 = { cpu: serverCpu(srv), t: Date.now() }), o.ramp * 1000 + 100);
          }).finally(() => clearTimeout(rampTimer));
          const tEnd = Date.now();
          if (srv.entry.pgid) await sleep(300); // let nbd-server reap its per-connection children
          const cpu1 = { cpu: serverCpu(srv), t: tEnd };
          const s = summarize(c.job, job);
          if (cpu0) {
            s.serverCpuPct = ((cpu1.cpu - cpu0.cpu) / ((cpu1.t - cpu0.t) / 1000)) * 100;
            s.serverCpuUsPerOp = s.ios > 0 ? ((cpu1.cpu - cpu0.cpu) * 1e6) / s.ios : NaN;
          }
          samples.get(`${c.job}/${c.conns}`)[name].push(s);
          n++;
          log(`[${String(n).padStart(String(total).length)}/${total}] ${JOBS[c.job].title.padEnd(18)} ${c.conns} conn  ${name.padEnd(18)} ${fmt(s.value, JOBS[c.job].metric).padStart(9)} ${JOBS[c.job].unit.padEnd(4)}  server CPU ${fmtCpu(s)}`);
          if (JOBS[c.job].rw.includes('write')) for (const f of ctx.files) flushBackingFile(f); // no dirty pages left for the next server
          if (!alive(srv.entry)) throw new Error(`${name} died during ${tag}; see ${srv.logFile}:\n${tail(srv.logFile)}`);
        }
      }
    }

    for (const c of cases) {
      const per = samples.get(`${c.job}/${c.conns}`);
      const row = { job: c.job, conns: c.conns, label: `${JOBS[c.job].title}, ${c.conns} conn`, unit: JOBS[c.job].unit, servers: {}, ratios: {} };
      for (const name of names) {
        const xs = per[name];
        const pick = (k) => median(xs.map((x) => x[k]));
        row.servers[name] = {
          value: pick('value'),
          iops: pick('iops'),
          mbps: pick('mbps'),
          latMeanUs: pick('latMeanUs'),
          clatP99Us: pick('clatP99Us'),
          serverCpuPct: pick('serverCpuPct'),
          serverCpuUsPerOp: pick('serverCpuUsPerOp'),
          samples: xs.map((x) => x.value),
        };
      }
      for (const v of snapVariants) for (const p of peers) row.ratios[`${v}/${p}`] = row.servers[v].value / row.servers[p].value;
      if (names.includes('nbdkit') || names.includes('qemu-nbd')) {
        row.target = {};
        for (const v of snapVariants) {
          const okK = !names.includes('nbdkit') || row.ratios[`${v}/nbdkit`] >= 1.0;
          const okQ = !names.includes('qemu-nbd') || row.ratios[`${v}/qemu-nbd`] >= 1.2;
          row.target[v] = okK && okQ ? 'met' : 'MISSED';
        }
      }
      result.rows.push(row);
    }
  } finally {
    await cleanup();
  }

  result.finished = new Date().toISOString();
  const base = path.join(o.out, `peers-${stamp(started)}`);
  fs.writeFileSync(`${base}.json`, JSON.stringify(result, null, 2) + '\n');
  process.stdout.write('\n' + tables(result) + '\nMarkdown:\n' + markdown(result));
  if (o.chart) chart(result, `${base}.png`, scratchDir);
  process.stdout.write(`\nwrote ${path.relative(process.cwd(), base)}.json${o.chart ? ` and ${path.relative(process.cwd(), base)}.png` : ''}\n`);
  removeScratch();
  if (keepScratch) log(`kept scratch directory ${scratchDir}`);
  if (o.check && result.rows.some((r) => Object.values(r.target ?? {}).includes('MISSED'))) process.exitCode = 1;
}

function checkSizes(running, size) {
  // Every export must be the same device: ask each with nbdinfo when it is there.
  if (!which('nbdinfo')) return;
  for (const [name, s] of Object.entries(running)) {
    const r = spawnSync('nbdinfo', ['--size', `nbd://127.0.0.1:${s.port}/${s.exportName}`], { encoding: 'utf8', timeout: 15000 });
    if (r.status !== 0) throw new Error(`nbdinfo could not open ${name}'s export: ${r.stderr}`);
    if (Number(r.stdout.trim()) !== size) throw new Error(`${name} exports ${r.stdout.trim()} bytes, expected ${size}`);
  }
}

function gitRev() {
  const r = spawnSync('git', ['-C', ROOT, 'describe', '--always', '--dirty'], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : 'unknown';
}

main().catch(async (err) => {
  log(`peers: ${err.message}`);
  await cleanup();
  removeScratch(true);
  process.exit(1);
});
