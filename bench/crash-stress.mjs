#!/usr/bin/env node
// Crash-consistency stress: kill -9 the server in the middle of a write workload and of
// snapshot operations, restart it, and check what survived against a model of what the
// NBD protocol and docs/FORMAT.md promise.
//
//   node bench/crash-stress.mjs [--iterations N] [--modes row,cow,mirror] [--seed S] [options]
//
// Per mode, one pool with two volumes ("a", where snapshots are taken, and "b", which
// only receives writes) lives through all iterations. Each iteration:
//   1. an independent NBD client (libnbd's Python, run by nbdsh; not our code) writes to
//      both volumes over 3 connections (a: 2, multi-conn; b: 1), QD16 each: random sizes
//      512 B..256 KiB, unaligned offsets, small sequential streams, WRITE_ZEROES, FLUSH
//      and FUA. Every byte written is self-describing: the 16-byte record at volume offset
//      r holds (write sequence number, volume id, 0xA5, seed) and r itself, so foreign
//      bytes (another volume's, a deleted snapshot's, a misplaced block) are identified.
//      No two writes in flight on one volume overlap (so ack order is the true order of
//      every byte). The client logs each send, acknowledgement and flush completion, with
//      CLOCK_MONOTONIC times, to a file as it goes.
//   2. meanwhile the harness creates and deletes snapshots of "a" through the CLI or the
//      control socket (--control), either with the writer paused (exact model) or live
//      (writes in flight during `snapshot create` may or may not be in the snapshot);
//      mirror mode attaches a mirror and waits for it before every snapshot (usually
//      before the workload starts, sometimes under it).
//   3. the server gets SIGKILL at a random moment (sometimes timed to land inside a
//      snapshot create/delete), is restarted on the same pool, and then:
//      (a) each volume must read, byte for byte, as the durable model: every write
//          acknowledged before a completed FLUSH was sent (FLUSH on any connection of the
//          volume: the server advertises multi-conn), every FUA write acknowledged, and
//          every write acknowledged before a `snapshot create` that completed, or that the
//          kill interrupted inside the server but whose snapshot survived (FORMAT.md rule 4).
//          Writes not covered by such a barrier (or in flight, or never answered)
//          may read old or new, byte by byte, but nothing else;
//      (b) `snapshot list` must hold every snapshot whose create completed and that no
//          delete touched, none whose delete completed, and nothing unknown; each listed
//          snapshot must read as the volume did at its creation: every write acknowledged
//          before the create started, none sent after it ended, writes in flight either.
//          A CLI call the kill interrupted may find no server and finish on the pool
//          directly, after the crash (README): such a snapshot holds the recovered volume;
//      (c) `snapblock check` must pass;
//      (d) falls out of (a)/(b): any byte not explained by the model is reported with
//          what it is (which volume's write, which sequence number, which offset).
//      After a successful verification the model is set to what was read, so the next
//      iteration starts from an exact state. On a failure the pool, the writer's log and a
//      copy of the volumes' files as the kill left them (forensics-N/, before the restart
//      replays and rewrites them) are kept, and the mode stops.
// After the last iteration the server is stopped cleanly, restarted, and everything must
// read exactly as modelled; an offline `check` runs too.
//
// --root DIR runs another build (e.g. a patched copy) with the same harness.
// Exit code: 0 all iterations passed, 1 some check failed (details printed), 2 usage or
// infrastructure error. Needs dist/ (npx tsc -p .), nbdsh + python3-libnbd, nbdcopy.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { ROOT, eachArg, list, parseSize, sleep } from './lib.mjs';

let CLI = path.join(ROOT, 'bin', 'snapblock.js'); // --root picks another build
const SYS_PATH = `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH ?? ''}`;
const TAG_HI = 0x5b000000; // high u32 of the offset field of every record

// ------------------------------------------------------------------ options

const HELP = `usage: node bench/crash-stress.mjs [options]

  --iterations N      crash cycles per mode (default 20)
  --modes LIST        snapshot modes to test, each with its own pool (default row,cow,mirror)
  --seed S            base seed (default: random; printed for reproduction)
  --start-iteration K start numbering at K (to replay one iteration's seed: --start-iteration K --iterations 1)
  --size SIZE         volume size (default 64M)
  --block-size LIST   block sizes to use, one per mode in turn (default 16K,32K,64K)
  --cow-reserve SIZE  COW reserve per snapshot (default: the volume size, so none overflows)
  --min-run MS        earliest kill after the workload started (default 300)
  --max-run MS        latest kill (default 1800)
  --qd N              requests in flight per connection (default 16)
  --max-snapshots N   snapshots of "a" kept at most (default 4)
  --control MODE      how snapshot operations and checks reach the server:
                        cli   the snapblock CLI (a process per call, ~1 s each here)
                        api   the control socket directly (same operations the CLI calls)
                        mixed each call picks one at random (default)
  --dir DIR           where pools go (default: system tmp)
  --root DIR          test the snapblock build in DIR (DIR/bin/snapblock.js; default: this checkout)
  --json FILE         also write a JSON summary there
  --keep              keep pools (they are always kept after a failure)
  --verbose           log every snapshot operation
`;


function parseArgs(argv) {
  const o = {
    iterations: 20,
    modes: ['row', 'cow', 'mirror'],
    seed: Math.floor(Math.random() * 2 ** 31),
    start: 1,
    size: 64 * 1024 * 1024,
    blockSizes: [16384, 32768, 65536],
    cowReserve: 0,
    minRun: 300,
    maxRun: 1800,
    qd: 16,
    maxSnapshots: 4,
    control: 'mixed',
    dir: os.tmpdir(),
    root: ROOT,
    json: '',
    keep: false,
    verbose: false,
  };
  eachArg(argv, (a, val) => {
    switch (a) {
      case '--iterations': o.iterations = Number(val()); break;
      case '--modes': o.modes = list(val()); break;
      case '--seed': o.seed = Number(val()); break;
      case '--start-iteration': o.start = Number(val()); break;
      case '--size': o.size = parseSize(val()); break;
      case '--block-size': o.blockSizes = list(val()).map(parseSize); break;
      case '--cow-reserve': o.cowReserve = parseSize(val()); break;
      case '--min-run': o.minRun = Number(val()); break;
      case '--max-run': o.maxRun = Number(val()); break;
      case '--qd': o.qd = Number(val()); break;
      case '--max-snapshots': o.maxSnapshots = Number(val()); break;
      case '--control': o.control = val(); break;
      case '--dir': o.dir = path.resolve(val()); break;
      case '--root': o.root = path.resolve(val()); break;
      case '--json': o.json = path.resolve(val()); break;
      case '--keep': o.keep = true; break;
      case '--verbose': o.verbose = true; break;
      case '-h': case '--help': process.stdout.write(HELP); process.exit(0); break;
      default: throw new Error(`unknown option ${a}\n\n${HELP}`);
    }
  });
  if (!Number.isInteger(o.iterations) || o.iterations < 1) throw new Error('--iterations must be a positive integer');
  if (!Number.isInteger(o.seed) || o.seed < 0) throw new Error('--seed must be a non-negative integer');
  if (!Number.isInteger(o.start) || o.start < 1) throw new Error('--start-iteration must be a positive integer');
  for (const m of o.modes) if (!['row', 'cow', 'mirror'].includes(m)) throw new Error(`unknown mode "${m}"`);
  if (!o.modes.length) throw new Error('--modes needs at least one mode');
  if (!['cli', 'api', 'mixed'].includes(o.control)) throw new Error('--control takes cli, api or mixed');
  if (o.size % 4096 || o.size < 4 * 1024 * 1024 || o.size > 2 ** 32) throw new Error('--size must be a multiple of 4K between 4M and 4G');
  if (!(o.minRun >= 0 && o.maxRun >= o.minRun)) throw new Error('need 0 <= --min-run <= --max-run');
  if (!Number.isInteger(o.qd) || o.qd < 1 || o.qd > 64) throw new Error('--qd takes 1..64');
  if (!Number.isInteger(o.maxSnapshots) || o.maxSnapshots < 1) throw new Error('--max-snapshots must be >= 1');
  if (!o.cowReserve) o.cowReserve = o.size;
  return o;
}

// ------------------------------------------------------------------ small tools

const nowNs = () => Number(process.hrtime.bigint()); // CLOCK_MONOTONIC, like Python's time.monotonic_ns()
const hex = (n) => '0x' + n.toString(16);
const fmtBytes = (b) => (b >= 1024 * 1024 ? `${(b / 1024 / 1024).toFixed(1)}M` : b >= 1024 ? `${(b / 1024).toFixed(1)}K` : `${b}B`);

/** splitmix32-ish PRNG: deterministic per (seed, mode, iteration) */
function rng(...parts) {
  let h = 0x9e3779b9;
  for (const p of parts) {
    for (const ch of String(p)) h = Math.imul(h ^ ch.charCodeAt(0), 0x85ebca6b) >>> 0;
    h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  }
  let s = h >>> 0;
  const next = () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x21f0aaad) >>> 0;
    z = Math.imul(z ^ (z >>> 15), 0x735a2d97) >>> 0;
    return ((z ^ (z >>> 15)) >>> 0) / 2 ** 32;
  };
  return {
    seed: h >>> 0,
    f: next,
    int: (a, b) => a + Math.floor(next() * (b - a + 1)),
    pick: (arr) => arr[Math.floor(next() * arr.length)],
    chance: (p) => next() < p,
  };
}

// ------------------------------------------------------------------ the byte pattern

/**
 * Bytes [off, off+n) of what write `seq` on volume `vol` puts there. The 16-byte record at
 * volume offset r (r % 16 == 0) is: u32 seq, u8 vol, u8 0xA5, u16 seed16, u32 r, u32 TAG_HI.
 * The Python writer builds the same bytes.
 */
function content(vol, seq, seed16, off, n, kind = 'w') {
  if (kind === 'z') return Buffer.alloc(n);
  const r0 = off - (off % 16);
  const r1 = Math.ceil((off + n) / 16) * 16;
  const buf = Buffer.allocUnsafe(r1 - r0);
  for (let r = r0, i = 0; r < r1; r += 16, i += 16) {
    buf.writeUInt32LE(seq >>> 0, i);
    buf[i + 4] = vol;
    buf[i + 5] = 0xa5;
    buf.writeUInt16LE(seed16, i + 6);
    buf.writeUInt32LE(r >>> 0, i + 8);
    buf.writeUInt32LE((TAG_HI + Math.floor(r / 2 ** 32)) >>> 0, i + 12);
  }
  return buf.subarray(off - r0, off - r0 + n);
}

/** What a 16-byte record of read data looks like, for failure reports. */
function describeRecord(buf, at, ctx) {
  const r = at - (at % 16);
  if (r + 16 > buf.length) return 'end of volume';
  const rec = buf.subarray(r, r + 16);
  if (rec.every((b) => b === 0)) return 'zeroes';
  if (rec[5] !== 0xa5 || rec.readUInt32LE(12) >>> 24 !== 0x5b) return `unrecognized bytes ${rec.toString('hex')} (not written by this harness: stale/garbage data)`;
  const seq = rec.readUInt32LE(0);
  const vol = rec[4];
  const recOff = rec.readUInt32LE(8) + (rec.readUInt32LE(12) - TAG_HI) * 2 ** 32;
  const h = ctx.history.get(seq);
  const volName = ctx.volNames[vol] ?? `#${vol}`;
  let s = `bytes of volume ${volName}'s write #${seq}`;
  if (recOff !== r) s += ` meant for offset ${hex(recOff)} (MISPLACED by ${recOff - r})`;
  if (rec.readUInt16LE(6) !== ctx.seed16) s += ` from another run (seed16 ${rec.readUInt16LE(6)})`;
  if (h) s += ` [written in iteration ${h.iter}: ${h.kind === 'z' ? 'zero' : 'write'} ${hex(h.off)}+${h.len}${h.fua ? ' FUA' : ''}]`;
  else s += ' [no such write in this run]';
  return s;
}

// ------------------------------------------------------------------ processes

/** Every child we started that may still run, killed by pid on exit. */
const children = new Set();
function track(child) {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}
function killAll() {
  for (const c of children) {
    try {
      c.kill('SIGKILL');
    } catch {
      /* gone */
    }
  }
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => {
  killAll();
  process.exit(130);
});

function runCli(pool, args) {
  return new Promise((resolve) => {
    const p = track(spawn(process.execPath, [CLI, '--pool', pool, '--log-level', 'warn', ...args], { stdio: ['ignore', 'pipe', 'pipe'] }));
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (c) => (stdout += c));
    p.stderr.on('data', (c) => (stderr += c));
    p.once('exit', (code, sig) => resolve({ status: code ?? -1, signal: sig, stdout, stderr }));
  });
}

function runTool(cmd, args, timeoutMs = 120_000) {
  return new Promise((resolve) => {
    const p = track(spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, PATH: SYS_PATH } }));
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (c) => (stdout += c));
    p.stderr.on('data', (c) => (stderr += c));
    const t = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.once('error', (e) => (stderr += String(e)));
    p.once('close', (code, sig) => {
      clearTimeout(t);
      resolve({ status: code ?? -1, signal: sig, stdout, stderr });
    });
  });
}

/** POST /v1/call on the control socket: the same operations the CLI runs. */
function apiCall(pool, op, args) {
  const body = Buffer.from(JSON.stringify({ op, args }));
  return new Promise((resolve) => {
    const req = http.request({ agent: false, socketPath: path.join(pool, 'control.sock'), method: 'POST', path: '/v1/call', headers: { 'content-type': 'application/json', 'content-length': body.length } }, (res) => {
      const parts = [];
      res.on('data', (c) => parts.push(c));
      res.on('end', () => {
        const text = Buffer.concat(parts).toString('utf8');
        let json;
        try {
          json = JSON.parse(text);
        } catch {
          json = undefined;
        }
        if ((res.statusCode ?? 500) >= 400) resolve({ ok: false, error: json?.error ? `${json.error.code}: ${json.error.message}` : `HTTP ${res.statusCode} ${text}` });
        else resolve({ ok: true, value: json });
      });
      res.on('error', (e) => resolve({ ok: false, error: String(e) }));
    });
    req.setTimeout(60_000, () => req.destroy(new Error('control API timed out')));
    req.on('error', (e) => resolve({ ok: false, error: String(e.message ?? e) }));
    req.end(body);
  });
}

const CLI_ARGS = {
  'snapshot.create': (a) => ['snapshot', 'create', a.volume, a.name],
  'snapshot.delete': (a) => ['snapshot', 'delete', a.volume, a.name],
  'snapshot.list': (a) => ['snapshot', 'list', a.volume, '--json'],
  'mirror.attach': (a) => ['mirror', 'attach', a.volume, ...(a.wait ? ['--wait'] : []), '--json'],
  'mirror.status': (a) => ['mirror', 'status', a.volume, '--json'],
  check: () => ['check', '--json'],
};

/** One control operation through the CLI or the control socket. */
async function control(pool, via, op, args) {
  if (via === 'api') return apiCall(pool, op, args);
  const r = await runCli(pool, CLI_ARGS[op](args));
  let value;
  try {
    value = r.stdout.trim() ? JSON.parse(r.stdout) : undefined;
  } catch {
    value = r.stdout;
  }
  if (op === 'check' && (r.status === 0 || r.status === 1) && value && typeof value === 'object') return { ok: true, value, status: r.status };
  if (r.status !== 0) return { ok: false, error: `CLI exit ${r.status}${r.signal ? ` (${r.signal})` : ''}: ${(r.stderr || r.stdout).trim().split('\n').slice(-3).join(' | ')}` };
  return { ok: true, value };
}

class Server {
  static async start(pool) {
    const s = new Server();
    s.pool = pool;
    s.log = [];
    s.proc = track(spawn(process.execPath, [CLI, '--pool', pool, 'serve', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'info' } }));
    s.exited = new Promise((r) => s.proc.once('close', (code, sig) => r(sig ?? code))); // after its output is read
    const keep = (c) => {
      for (const line of String(c).split('\n')) if (line) s.log.push(line);
      if (s.log.length > 400) s.log.splice(0, s.log.length - 400);
    };
    s.proc.stdout.on('data', keep);
    s.port = await new Promise((resolve, reject) => {
      let buf = '';
      const t = setTimeout(() => reject(new Error(`snapblock serve did not start within 60 s:\n${s.log.join('\n')}`)), 60_000);
      s.proc.stderr.on('data', (c) => {
        keep(c);
        buf += c;
        const line = buf.split('\n').find((l) => l.includes('snapblock serving'));
        const m = line && /nbd:\/\/[^:"]+:(\d+)/.exec(line);
        if (m) {
          clearTimeout(t);
          buf = '';
          resolve(Number(m[1]));
        }
      });
      s.exited.then((code) => {
        clearTimeout(t);
        reject(new Error(`snapblock serve exited (${code}) while starting:\n${s.log.slice(-30).join('\n')}`));
      });
    });
    return s;
  }

  uri(exp) {
    return `nbd://127.0.0.1:${this.port}/${exp}`;
  }

  async kill9() {
    this.proc.kill('SIGKILL');
    await this.exited; // reaped: the pool lock's pid is really dead now
  }

  async stop() {
    this.proc.kill('SIGTERM');
    const t = setTimeout(() => this.proc.kill('SIGKILL'), 30_000);
    const code = await this.exited;
    clearTimeout(t);
    return code;
  }
}

// ------------------------------------------------------------------ the client (libnbd Python, run by nbdsh)

const WRITER = String.raw`
import nbd, os, sys, json, select, struct, time, random, math
from array import array

A = json.loads(os.environ['CRASH_STRESS_ARGS'])
rng = random.Random(A['seed'])
now = time.monotonic_ns
logf = open(A['log'], 'w', buffering=1 << 20)
def L(s):
    logf.write(s + '\n')
TAG = 0x5B << 56
SEED16 = A['seed16']
P = A['mix']
QD = A['qd']
assert sys.byteorder == 'little'

def content(vol, seq, off, n):
    r0 = off & ~15
    r1 = (off + n + 15) & ~15
    cnt = (r1 - r0) >> 4
    buf = bytearray(cnt << 4)
    hdr = struct.pack('<IBBH', seq, vol, 0xA5, SEED16)
    for k in range(8):
        buf[k::16] = hdr[k:k + 1] * cnt
    q = array('Q', range(r0 + TAG, r1 + TAG, 16)).tobytes()
    for k in range(8):
        buf[8 + k::16] = q[k::8]
    s = off - r0
    return buf[s:s + n]

conns = []
vols = []
for v in A['vols']:
    vs = {'id': v['id'], 'size': v['size'], 'hot': v['hot'], 'span': v['span'], 'busy': [], 'stream': None}
    vols.append(vs)
    for i, uri in enumerate(v['uris']):
        h = nbd.NBD()
        h.set_handle_name('crash-stress-v%d-c%d' % (v['id'], i))
        h.connect_uri(uri)
        conns.append({'h': h, 'vol': vs, 'id': len(conns), 'inflight': 0, 'dead': False, 'fd': h.aio_get_fd()})
multi = all(c['h'].can_multi_conn() for c in conns)
fua_ok = all(c['h'].can_fua() for c in conns)
zero_ok = all(c['h'].can_zero() for c in conns)
L('H ' + json.dumps({'multiConn': multi, 'fua': fua_ok, 'zero': zero_ok, 'conns': [[c['id'], c['vol']['id']] for c in conns], 't': now()}))

seq = A['seq0']
fid = 0
keep = {}
errors = 0

def overlaps(vs, off, n):
    for (o, m) in vs['busy']:
        if off < o + m and o < off + n:
            return True
    return False

def pick(vs):
    size = vs['size']
    for _ in range(8):
        if vs['stream'] is not None and rng.random() < P['stream']:
            off = vs['stream']
            n = 4096
            if off + n > size or rng.random() < 0.02:
                vs['stream'] = None
                continue
            vs['stream'] = off + n
        else:
            if rng.random() < P['newStream']:
                vs['stream'] = rng.randrange(0, vs['span'] >> 12) << 12
            n = int(math.exp(rng.uniform(math.log(512), math.log(262145))))
            r = rng.random()
            region = vs['hot'] if r < 0.7 else (vs['span'] if r < 0.98 else size)
            region = max(region, n)
            a = rng.random()
            if a < P['unaligned']:
                off = rng.randrange(0, region - n + 1)
            elif a < P['unaligned'] + 0.3:
                n = max(512, n & ~511)
                off = rng.randrange(0, (region - n) // 512 + 1) * 512
            else:
                n = max(4096, n & ~4095)
                off = rng.randrange(0, (region - n) // 4096 + 1) * 4096
        if off + n <= size and not overlaps(vs, off, n):
            return off, n
    return None

def write_done(c, s, off, n):
    def cb(err):
        global errors
        e = err.value
        L('A %d %d %d' % (s, now(), e))
        if e:
            errors += 1
        c['inflight'] -= 1
        c['vol']['busy'].remove((off, n))
        keep.pop(s, None)
        return 1
    return cb

def flush_done(c, f):
    def cb(err):
        global errors
        e = err.value
        L('G %d %d %d' % (f, now(), e))
        if e:
            errors += 1
        c['inflight'] -= 1
        return 1
    return cb

def issue_flush(c):
    global fid
    fid += 1
    f = fid
    c['inflight'] += 1
    L('F %d %d %d %d' % (f, c['id'], c['vol']['id'], now()))
    try:
        c['h'].aio_flush(completion=flush_done(c, f))
    except nbd.Error as ex:
        L('G %d %d %d' % (f, now(), -1))
        c['inflight'] -= 1
        c['dead'] = True

def issue_write(c):
    global seq
    vs = c['vol']
    p = pick(vs)
    if p is None:
        return False
    off, n = p
    kind = 'z' if zero_ok and rng.random() < P['zero'] else 'w'
    fua = fua_ok and rng.random() < P['fua']
    seq += 1
    s = seq
    vs['busy'].append((off, n))
    c['inflight'] += 1
    L('S %d %d %d %d %d %s %s %d' % (s, c['id'], vs['id'], off, n, kind, 'f' if fua else '-', now()))
    flags = nbd.CMD_FLAG_FUA if fua else 0
    try:
        if kind == 'w':
            b = nbd.Buffer.from_bytearray(content(vs['id'], s, off, n))
            keep[s] = b
            c['h'].aio_pwrite(b, off, completion=write_done(c, s, off, n), flags=flags)
        else:
            c['h'].aio_zero(n, off, completion=write_done(c, s, off, n), flags=flags)
    except nbd.Error as ex:
        L('A %d %d %d' % (s, now(), -1))
        c['inflight'] -= 1
        vs['busy'].remove((off, n))
        keep.pop(s, None)
        c['dead'] = True
    return True

paused = False
paused_said = False
stopping = 0
deadline = now() + A['maxMs'] * 1000000
inbuf = b''
sys.stdout.write('ready\n')
sys.stdout.flush()
while True:
    t = now()
    if not paused and not stopping:
        for c in conns:
            while not c['dead'] and c['inflight'] < QD:
                if rng.random() < P['flush']:
                    issue_flush(c)
                elif not issue_write(c):
                    break
    live = [c for c in conns if not c['dead']]
    total = sum(c['inflight'] for c in live)
    if paused and not paused_said and total == 0:
        L('P %d' % now())
        sys.stdout.write('paused\n')
        sys.stdout.flush()
        paused_said = True
    if not live or t > deadline or (stopping and (total == 0 or t > stopping)):
        break
    r = [0]
    w = []
    for c in live:
        d = c['h'].aio_get_direction()
        if d & nbd.AIO_DIRECTION_READ:
            r.append(c['fd'])
        if d & nbd.AIO_DIRECTION_WRITE:
            w.append(c['fd'])
    rr, ww, _ = select.select(r, w, [], 0.05)
    for c in live:
        try:
            if c['fd'] in rr:
                c['h'].aio_notify_read()
            if c['fd'] in ww:
                c['h'].aio_notify_write()
            if c['h'].aio_is_dead():
                c['dead'] = True
        except nbd.Error as ex:
            c['dead'] = True
    if 0 in rr:
        chunk = os.read(0, 4096)
        if not chunk:
            stopping = now() + 300 * 1000000
        inbuf += chunk
        while b'\n' in inbuf:
            line, inbuf = inbuf.split(b'\n', 1)
            cmd = line.strip().decode()
            if cmd == 'pause':
                paused = True
                paused_said = False
            elif cmd == 'resume':
                paused = False
                L('R %d' % now())
            elif cmd == 'stop':
                stopping = now() + 300 * 1000000
L('E %d %d' % (now(), errors))
logf.close()
sys.stdout.write('end\n')
sys.stdout.flush()
`;

class Writer {
  constructor(args) {
    this.args = args;
    this.proc = track(spawn('nbdsh', ['-n', '-c', WRITER], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, PATH: SYS_PATH, CRASH_STRESS_ARGS: JSON.stringify(args) } }));
    this.stderr = '';
    this.proc.stderr.on('data', (c) => (this.stderr += c));
    this.proc.stdin.on('error', () => {});
    this.exited = new Promise((r) => this.proc.once('exit', (code, sig) => r(sig ?? code)));
    this.waiters = [];
    readline.createInterface({ input: this.proc.stdout }).on('line', (line) => {
      const w = this.waiters.findIndex((x) => x.word === line.trim());
      if (w >= 0) this.waiters.splice(w, 1)[0].resolve(true);
    });
    this.exited.then(() => {
      for (const w of this.waiters) w.resolve(false);
      this.waiters = [];
    });
  }
  waitFor(word) {
    return new Promise((resolve) => {
      if (this.proc.exitCode !== null) return resolve(false);
      this.waiters.push({ word, resolve });
    });
  }
  send(cmd) {
    try {
      this.proc.stdin.write(cmd + '\n');
    } catch {
      /* writer gone */
    }
  }
}

/** Parse the writer's log into writes and flushes, in log order. */
function parseLog(file) {
  const writes = new Map();
  const flushes = new Map();
  let header;
  let idx = 0;
  let end;
  let pauses = 0;
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    if (!line) continue;
    idx++;
    const f = line.split(' ');
    switch (f[0]) {
      case 'H': header = JSON.parse(line.slice(2)); break;
      case 'S': writes.set(Number(f[1]), { seq: Number(f[1]), conn: Number(f[2]), vol: Number(f[3]), off: Number(f[4]), len: Number(f[5]), kind: f[6], fua: f[7] === 'f', sendT: Number(f[8]), sendIdx: idx, ackT: null, ackIdx: null, err: null }); break;
      case 'A': { const w = writes.get(Number(f[1])); if (w) { w.ackT = Number(f[2]); w.ackIdx = idx; w.err = Number(f[3]); } break; }
      case 'F': flushes.set(Number(f[1]), { fid: Number(f[1]), conn: Number(f[2]), vol: Number(f[3]), sendT: Number(f[4]), sendIdx: idx, ackT: null, ackIdx: null, err: null }); break;
      case 'G': { const fl = flushes.get(Number(f[1])); if (fl) { fl.ackT = Number(f[2]); fl.ackIdx = idx; fl.err = Number(f[3]); } break; }
      case 'P': pauses++; break;
      case 'E': end = { t: Number(f[1]), errors: Number(f[2]) }; break;
    }
  }
  const ws = [...writes.values()];
  for (const w of ws) {
    w.acked = w.err === 0;
    // Non-overlapping in flight: for acked writes ack order is the order of every byte they share;
    // a write never answered overlaps only writes acknowledged before it was sent.
    w.ord = w.acked ? w.ackIdx : 1e12 + w.sendIdx;
  }
  return { header, writes: ws, flushes: [...flushes.values()], end, pauses };
}

// ------------------------------------------------------------------ verification

/** Subtract sorted-or-not intervals from [off, off+len). */
function subtract(off, len, cuts) {
  let parts = [[off, off + len]];
  for (const [a, b] of cuts) {
    const next = [];
    for (const [s, e] of parts) {
      if (b <= s || a >= e) next.push([s, e]);
      else {
        if (a > s) next.push([s, a]);
        if (b < e) next.push([b, e]);
      }
    }
    parts = next;
    if (!parts.length) break;
  }
  return parts;
}

const CHUNK = 4096;

/**
 * Volume-sized buffers are recycled: fresh memory is expensive to fault in on a loaded VM
 * (allocating and reading 64 MiB images dominated an iteration before this).
 */
const images = {
  size: 0,
  free: [],
  get() {
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.size);
  },
  put(...bufs) {
    for (const b of bufs) if (b && b.length === this.size && !this.free.includes(b)) this.free.push(b);
  },
};

/**
 * Check `got` against a model: `base` with the `definite` writes applied (in `ord` order)
 * is what must be there, except that each byte covered by a `maybe` write (and not by a
 * definite write ordered after it) may instead hold that write's byte.
 * Returns { ok, problems: [text] }.
 */
function verifyImage(args) {
  const sortedDef = [...args.definite].sort((x, y) => x.ord - y.ord);
  let expected = args.base;
  if (sortedDef.length) {
    expected = images.get();
    args.base.copy(expected);
    for (const w of sortedDef) content(w.vol, w.seq, args.ctx.seed16, w.off, w.len, w.kind).copy(expected, w.off);
  }
  try {
    return verifyAgainst({ ...args, expected, sortedDef });
  } finally {
    if (expected !== args.base) images.put(expected);
  }
}

function verifyAgainst({ label, got, expected, sortedDef, maybe, ctx, why }) {
  const size = expected.length;
  const problems = [];
  if (got.length !== size) return { ok: false, problems: [`${label}: read ${got.length} bytes, expected ${size}`] };
  const bad = [];
  for (let c = 0; c * CHUNK < size; c++) {
    const s = c * CHUNK;
    const e = Math.min(size, s + CHUNK);
    if (got.compare(expected, s, e, s, e) !== 0) bad.push(c);
  }
  if (!bad.length) return { ok: true, problems };
  const badSet = new Set(bad);
  const okMask = new Map(bad.map((c) => [c, new Uint8Array(CHUNK)]));
  const allowed = []; // [{w, parts}]
  for (const w of maybe) {
    const later = sortedDef.filter((d) => d.ord > w.ord && d.off < w.off + w.len && w.off < d.off + d.len).map((d) => [d.off, d.off + d.len]);
    const parts = subtract(w.off, w.len, later);
    allowed.push({ w, parts });
    for (const [s, e] of parts) {
      for (let c = Math.floor(s / CHUNK); c * CHUNK < e; c++) {
        if (!badSet.has(c)) continue;
        const cs = Math.max(s, c * CHUNK);
        const ce = Math.min(e, (c + 1) * CHUNK);
        const wb = content(w.vol, w.seq, ctx.seed16, cs, ce - cs, w.kind);
        const mask = okMask.get(c);
        for (let i = cs; i < ce; i++) if (got[i] === wb[i - cs]) mask[i - c * CHUNK] = 1;
      }
    }
  }
  // Runs of bytes nothing explains.
  const runs = [];
  let cur = null;
  for (const c of bad) {
    const mask = okMask.get(c);
    const s = c * CHUNK;
    const e = Math.min(size, s + CHUNK);
    for (let i = s; i < e; i++) {
      const badByte = got[i] !== expected[i] && !mask[i - s];
      if (badByte) {
        if (cur && cur.end + 16 > i) cur.end = i + 1; // small gaps where bytes match by chance
        else {
          cur = { start: i, end: i + 1 };
          runs.push(cur);
        }
      }
    }
  }
  if (!runs.length) return { ok: true, problems, ambiguousBytes: true };
  const total = runs.reduce((n, r) => n + r.end - r.start, 0);
  problems.push(`${label}: ${total} byte(s) in ${runs.length} range(s) read neither as the model (${why}) nor as any write allowed to be there`);
  for (const r of runs.slice(0, 6)) {
    const n = Math.min(16, r.end - r.start);
    const writer = sortedDef.filter((d) => d.off <= r.start && r.start < d.off + d.len).pop();
    const cand = allowed.filter((a) => a.parts.some(([s, e]) => s <= r.start && r.start < e)).map((a) => `#${a.w.seq}${a.w.acked ? '(acked, not durable)' : a.w.err === null ? '(never answered)' : `(error ${a.w.err})`}`);
    problems.push(
      `  offset ${hex(r.start)}..${hex(r.end)} (${r.end - r.start} B): expected ${expected.subarray(r.start, r.start + n).toString('hex')} ` +
        `[${writer ? `write #${writer.seq} ${hex(writer.off)}+${writer.len}${writer.kind === 'z' ? ' zero' : ''}${writer.fua ? ' FUA' : ''}` : 'state at iteration start'}]` +
        `${cand.length ? ` or writes ${cand.join(', ')}` : ''}; got ${got.subarray(r.start, r.start + n).toString('hex')} = ${describeRecord(got, r.start, ctx)}` +
        ` (expected bytes are ${describeRecord(expected, r.start, ctx)})`,
    );
  }
  if (runs.length > 6) problems.push(`  … and ${runs.length - 6} more run(s)`);
  return { ok: false, problems };
}

/** Read a whole export with nbdcopy (libnbd) through a pipe into a recycled buffer. */
function readExport(server, exp, size) {
  return new Promise((resolve) => {
    // --no-extents: read every byte; do not trust the server's own idea of its holes.
    const p = track(spawn('nbdcopy', ['--no-extents', '-C', '1', '-R', '8', '--request-size=1048576', server.uri(exp), '-'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, PATH: SYS_PATH } }));
    const got = images.get();
    let at = 0;
    let over = 0;
    let stderr = '';
    p.stdout.on('data', (c) => {
      const n = Math.min(c.length, size - at);
      c.copy(got, at, 0, n);
      at += n;
      over += c.length - n;
    });
    p.stderr.on('data', (c) => (stderr += c));
    p.once('error', (e) => (stderr += String(e)));
    p.once('close', (code, sig) => {
      if (code !== 0) {
        images.put(got);
        return resolve({ error: `nbdcopy ${exp} failed (${code}${sig ? ' ' + sig : ''}): ${stderr.trim()}` });
      }
      if (at < size) {
        got.fill(0, at);
        return resolve({ got, short: at });
      }
      resolve(over ? { got, short: size + over } : { got });
    });
  });
}

/** Read several exports, 3 at a time; returns Map export → result of readExport. */
async function readExports(server, names, size) {
  const out = new Map();
  const queue = [...names];
  const worker = async () => {
    for (let n; (n = queue.shift()) !== undefined; ) out.set(n, await readExport(server, n, size));
  };
  await Promise.all([worker(), worker(), worker()]);
  return out;
}

// ------------------------------------------------------------------ one mode

async function runMode(mode, o, modeIdx, summary) {
  const blockSize = o.blockSizes[modeIdx % o.blockSizes.length];
  images.size = o.size;
  const seed16 = rng(o.seed, 'seed16').int(0, 0xffff);
  const pool = fs.mkdtempSync(path.join(o.dir, `snapblock-crash-${mode}-`));
  const res = { mode, blockSize, pool, iterations: 0, passed: 0, failures: [], stats: { writes: 0, acked: 0, durable: 0, pending: 0, flushes: 0, fua: 0, zeroes: 0, snapCreates: 0, snapDeletes: 0, killsDuringCreate: 0, killsDuringDelete: 0, killsDuringMirrorSync: 0, ambiguousResolved: 0, snapshotsVerified: 0 }, seconds: 0 };
  summary.modes.push(res);
  const t0 = Date.now();
  const ctx = { seed16, history: new Map(), volNames: { 1: 'a', 2: 'b' } };
  // Most writes land in a hot area and a span (so blocks get overwritten, shared, redirected, copied);
  // 2% anywhere. Reads verify every byte of the volume either way.
  const volA = { id: 1, name: 'a', exact: images.get().fill(0), hot: Math.min(o.size, 4 << 20), span: Math.min(o.size, 12 << 20), conns: 2 };
  const volB = { id: 2, name: 'b', exact: images.get().fill(0), hot: Math.min(o.size, 2 << 20), span: Math.min(o.size, 6 << 20), conns: 1 };
  const vols = [volA, volB];
  /** snapshots of a known to exist: name → exact content */
  let snaps = new Map();
  /** COW snapshots invalidated by a reserve overflow (only with --cow-reserve below the size) */
  const invalidSnaps = new Set();
  let seq = 0;
  let server;
  const fail = (iter, msg) => {
    res.failures.push({ iteration: iter, message: msg });
  };

  for (const v of vols) {
    const r = await runCli(pool, ['volume', 'create', v.name, String(o.size), '--snapshot-mode', mode, '--block-size', String(blockSize), ...(mode === 'cow' ? ['--cow-reserve', String(o.cowReserve)] : [])]);
    if (r.status !== 0) throw new Error(`volume create ${v.name} (${mode}) failed: ${r.stderr}`);
  }
  server = await Server.start(pool);
  console.log(`== ${mode}: pool ${pool}, volumes a,b ${fmtBytes(o.size)}, block size ${fmtBytes(blockSize)}${mode === 'cow' ? `, reserve ${fmtBytes(o.cowReserve)}` : ''}, seed ${o.seed}`);

  for (let iter = o.start; iter < o.start + o.iterations; iter++) {
    const it0 = Date.now();
    const R = rng(o.seed, mode, iter);
    const viaOf = () => (o.control === 'mixed' ? R.pick(['cli', 'api']) : o.control);
    const problems = [];
    res.iterations++;
    const logFile = path.join(pool, `writer-${iter}.log`);
    if (mode === 'mirror' && R.chance(0.75)) {
      // Usually start with a synced mirror, so the iteration gets to split snapshots off before
      // the kill; otherwise the sync runs under the writes (and the kill often lands in it).
      let st = await control(pool, 'api', 'mirror.status', { volume: 'a' });
      if (st.ok && st.value?.state === 'none') st = await control(pool, 'api', 'mirror.attach', { volume: 'a', wait: true });
      for (let t = 0; st.ok && st.value?.state === 'syncing' && t < 1200; t++) {
        await sleep(50);
        st = await control(pool, 'api', 'mirror.status', { volume: 'a' });
      }
      if (!st.ok || st.value?.state !== 'synced') problems.push(`mirror attach/sync on a failed before the workload: ${st.ok ? JSON.stringify(st.value) : st.error}`);
    }
    const writerArgs = {
      seed: R.seed,
      seed16,
      log: logFile,
      qd: o.qd,
      seq0: seq,
      maxMs: o.maxRun + 60_000,
      mix: { flush: R.pick([0.04, 0.08, 0.15]), zero: 0.05, fua: R.pick([0.05, 0.15, 0.3]), stream: 0.5, newStream: 0.04, unaligned: 0.4 },
      vols: vols.map((v) => ({ id: v.id, size: o.size, hot: v.hot, span: v.span, uris: Array.from({ length: v.conns }, () => server.uri(v.name)) })),
    };
    const writer = new Writer(writerArgs);
    const ready = await Promise.race([writer.waitFor('ready'), sleep(30_000).then(() => false)]);
    if (!ready) {
      writer.proc.kill('SIGKILL');
      throw new Error(`the nbdsh writer did not start: ${writer.stderr}`);
    }
    const wStart = nowNs();

    // ---- snapshot operations while the writer runs; the kill lands at a random moment
    const ops = [];
    let killed = false;
    let killT = 0;
    let killNote = 'timer';
    const killMode = R.chance(0.35) ? 'during-op' : 'timer';
    const killOpIndex = R.int(0, 2);
    let killTimer;
    let resolveKilled;
    const killedP = new Promise((r) => (resolveKilled = r));
    const doKill = async (note) => {
      if (killed) return;
      killed = true;
      clearTimeout(killTimer);
      killNote = note;
      killT = nowNs();
      const inOp = ops.filter((x) => x.T1 === null);
      for (const x of inOp) {
        if (x.kind === 'create') res.stats.killsDuringCreate++;
        if (x.kind === 'delete') res.stats.killsDuringDelete++;
        if (x.kind === 'mirror') res.stats.killsDuringMirrorSync++;
      }
      if (inOp.length) killNote += ` during ${inOp.map((x) => `${x.kind}${x.name ? ' ' + x.name : ''} (${x.via}${x.style ? ', ' + x.style : ''})`).join(', ')}`;
      await server.kill9();
      resolveKilled();
    };
    // mirror: the first snapshot of an iteration waits for a full mirror sync, so give it longer
    const maxRun = mode === 'mirror' ? o.maxRun * 2 : o.maxRun;
    const runMs = R.int(o.minRun, maxRun);
    killTimer = setTimeout(() => doKill('timer'), killMode === 'timer' ? runMs : maxRun);
    const live = new Set(snaps.keys()); // snapshots we believe exist right now
    let created = 0;
    const opsLoop = (async () => {
      for (let k = 0; !killed; k++) {
        await Promise.race([sleep(R.int(0, 250)), killedP]);
        if (killed) break;
        const doCreate = live.size < o.maxSnapshots && (live.size === 0 || R.chance(0.65));
        const killThisOp = killMode === 'during-op' && k === killOpIndex;
        if (doCreate) {
          const name = `i${iter}s${++created}`;
          if (mode === 'mirror') {
            const via = killThisOp ? 'api' : viaOf();
            const op = { kind: 'mirror', via, T0: nowNs(), T1: null, ok: null };
            ops.push(op);
            let st = await control(pool, via, 'mirror.status', { volume: 'a' });
            if (st.ok && st.value?.state === 'none') st = await control(pool, via, 'mirror.attach', { volume: 'a', wait: true });
            for (let t = 0; st.ok && st.value?.state === 'syncing' && t < 600 && !killed; t++) {
              await sleep(50);
              st = await control(pool, 'api', 'mirror.status', { volume: 'a' });
            }
            if (killed) break;
            op.T1 = nowNs();
            op.ok = st.ok && st.value?.state === 'synced';
            if (!op.ok) {
              problems.push(`mirror attach/sync on a failed while the server was up: ${st.ok ? JSON.stringify(st.value) : st.error}`);
              break;
            }
          }
          const via = killThisOp ? 'api' : viaOf();
          const style = R.chance(0.4) ? 'paused' : 'live';
          const op = { kind: 'create', name, via, style, T0: 0, T1: null, ok: null };
          if (style === 'paused') {
            writer.send('pause');
            const p = await Promise.race([writer.waitFor('paused'), killedP.then(() => false), sleep(20_000).then(() => 'timeout')]);
            if (p === 'timeout') problems.push('the writer did not drain within 20 s (server stalled?)');
            if (p !== true) {
              writer.send('resume');
              break;
            }
          }
          ops.push(op);
          op.T0 = nowNs();
          if (killThisOp) killTimer = setTimeout(() => doKill('timer'), R.int(0, 12));
          const r = await control(pool, via, 'snapshot.create', { volume: 'a', name });
          if (!killed) {
            op.T1 = nowNs();
            op.ok = r.ok;
            if (r.ok) {
              live.add(name);
              res.stats.snapCreates++;
            } else problems.push(`snapshot create a@${name} (${via}) failed while the server was up: ${r.error}`);
          } else {
            // The kill came first. A CLI that found no server answering works on the pool
            // directly (README): it may finish the operation offline, after the crash.
            op.error = r.error;
            op.late = r.ok;
          }
          if (style === 'paused') writer.send('resume');
          if (o.verbose) console.log(`   create ${name} ${via} ${style} ${op.ok ? `${((op.T1 - op.T0) / 1e6).toFixed(1)} ms` : 'interrupted'}`);
        } else {
          const name = R.pick([...live].sort());
          const via = killThisOp ? 'api' : viaOf();
          const op = { kind: 'delete', name, via, T0: nowNs(), T1: null, ok: null };
          ops.push(op);
          live.delete(name);
          if (killThisOp) killTimer = setTimeout(() => doKill('timer'), R.int(0, 12));
          const r = await control(pool, via, 'snapshot.delete', { volume: 'a', name });
          if (!killed) {
            op.T1 = nowNs();
            op.ok = r.ok;
            if (r.ok) res.stats.snapDeletes++;
            else problems.push(`snapshot delete a@${name} (${via}) failed while the server was up: ${r.error}`);
          } else {
            // The kill came first. A CLI that found no server answering works on the pool
            // directly (README): it may finish the operation offline, after the crash.
            op.error = r.error;
            op.late = r.ok;
          }
          if (o.verbose) console.log(`   delete ${name} ${via} ${op.ok ? `${((op.T1 - op.T0) / 1e6).toFixed(1)} ms` : 'interrupted'}`);
        }
      }
    })();
    await killedP;
    const tm = { killed: Date.now() };
    await opsLoop;
    writer.send('stop');
    const wcode = await Promise.race([writer.exited, sleep(20_000).then(() => 'timeout')]);
    if (wcode === 'timeout') {
      writer.proc.kill('SIGKILL');
      throw new Error('the nbdsh writer did not stop after the server was killed');
    }
    if (wcode !== 0) throw new Error(`the nbdsh writer failed (${wcode}): ${writer.stderr.slice(-2000)}`);
    const log = parseLog(logFile);
    if (!log.end) throw new Error(`writer log ${logFile} has no end marker`);
    seq += log.writes.length;
    for (const w of log.writes) ctx.history.set(w.seq, { iter, vol: w.vol, off: w.off, len: w.len, kind: w.kind, fua: w.fua });

    // ---- forensics: the on-disk state as the kill left it (a restart replays and rewrites it)
    const forensics = path.join(pool, `forensics-${iter}`);
    for (const v of vols) {
      const src = path.join(pool, 'volumes', v.name);
      const dst = path.join(forensics, v.name);
      fs.mkdirSync(dst, { recursive: true });
      for (const f of fs.readdirSync(src)) {
        if (f === 'data' || f.endsWith('.img') || f === 'mirror' || f.startsWith('reserve')) {
          spawnSync('cp', ['--sparse=always', path.join(src, f), path.join(dst, f)], { stdio: 'ignore' });
          continue;
        }
        try {
          fs.copyFileSync(path.join(src, f), path.join(dst, f));
        } catch {
          /* a directory or vanished file */
        }
      }
    }

    // ---- restart
    try {
      server = await Server.start(pool);
    } catch (err) {
      // Not the server's fault: the checkout changed under us (e.g. an npm install running meanwhile).
      if (/ERR_MODULE_NOT_FOUND|Cannot find (package|module)/.test(err.message)) throw new Error(`cannot run snapblock (broken checkout?): ${err.message}`);
      fail(iter, `restart after kill -9 failed: ${err.message}`);
      console.log(`[${mode} #${iter}] FAIL restart: ${err.message.split('\n')[0]}`);
      break;
    }

    tm.restarted = Date.now();
    // Commands the server answered with an error while it was alive are failures by themselves.
    for (const w of log.writes) if (w.err !== null && w.err !== 0 && w.ackT !== null && w.ackT < killT) problems.push(`write #${w.seq} ${hex(w.off)}+${w.len} on ${ctx.volNames[w.vol]} got error ${w.err} while the server was up`);
    for (const f of log.flushes) if (f.err !== null && f.err !== 0 && f.ackT !== null && f.ackT < killT) problems.push(`flush F${f.fid} on ${ctx.volNames[f.vol]} got error ${f.err} while the server was up`);

    // Read every export to check, a few at a time (reads dominate an iteration's time).
    const list = await control(pool, 'api', 'snapshot.list', { volume: 'a' });
    const listB = await control(pool, 'api', 'snapshot.list', { volume: 'b' });
    const toRead = [...vols.map((v) => v.name), ...(list.ok ? list.value.filter((x) => x.status === 'valid').map((x) => `a@${x.name}`) : [])];
    const reads = await readExports(server, toRead, o.size);
    tm.read = Date.now();

    // ---- (a) volumes against the durable model
    // Barriers for the live model: creates that completed, and creates the kill interrupted inside
    // the server (control socket) whose snapshot nevertheless survived: its record was committed
    // with every write acknowledged before it (FORMAT.md rule 4). (An interrupted CLI create may
    // have been finished offline after the crash instead, so it proves nothing.)
    const listedNow = new Set(list.ok ? list.value.map((x) => x.name) : []);
    const completedCreates = ops.filter((x) => x.kind === 'create' && (x.ok || (x.via === 'api' && x.ok === null && listedNow.has(x.name))));
    const multi = log.header?.multiConn !== false;
    const st = { writes: log.writes.length, acked: 0, durable: 0, pending: 0 };
    for (const v of vols) {
      v.next = undefined;
      const ws = log.writes.filter((w) => w.vol === v.id);
      const okFlushes = log.flushes.filter((f) => f.vol === v.id && f.err === 0);
      for (const w of ws) {
        if (!w.acked) continue;
        st.acked++;
        w.durable =
          w.fua ||
          okFlushes.some((f) => w.ackIdx < f.sendIdx && (multi || f.conn === w.conn)) ||
          (v.id === volA.id && completedCreates.some((c) => w.ackT < c.T0));
      }
      const definite = ws.filter((w) => w.durable);
      const maybe = ws.filter((w) => !w.durable);
      st.durable += definite.length;
      st.pending += maybe.length;
      const r = reads.get(v.name);
      if (r.error) {
        problems.push(`volume ${v.name}: ${r.error}`);
        continue;
      }
      if (r.short !== undefined) problems.push(`volume ${v.name}: export is ${r.short} bytes, expected ${o.size}`);
      const vr = verifyImage({ label: `volume ${v.name}`, got: r.got, base: v.exact, definite, maybe, ctx, why: 'durable writes: acked before a completed FLUSH, FUA, or acked before a completed snapshot create' });
      if (!vr.ok) problems.push(...vr.problems);
      else {
        if (vr.ambiguousBytes) res.stats.ambiguousResolved++;
        v.next = r.got;
      }
    }

    // ---- (b) snapshots: which must exist, and their content
    const nextSnaps = new Map();
    if (!list.ok) problems.push(`snapshot list a failed after restart: ${list.error}`);
    else {
      if (listB.ok && listB.value.length) problems.push(`volume b has snapshots nobody took: ${listB.value.map((s) => s.name).join(', ')}`);
      const listed = new Map(list.value.map((s) => [s.name, s]));
      const deletes = ops.filter((x) => x.kind === 'delete');
      const creates = ops.filter((x) => x.kind === 'create');
      // Must exist / must not exist
      for (const name of snaps.keys()) {
        const d = deletes.find((x) => x.name === name);
        if (!d && !listed.has(name)) problems.push(`snapshot a@${name} (from an earlier iteration, never deleted) is missing after restart`);
        if ((d?.ok || d?.late) && listed.has(name)) problems.push(`snapshot a@${name} is listed after restart although its delete ${d.ok ? 'completed' : 'succeeded (offline, after the kill)'}`);
      }
      for (const c of creates) {
        const d = deletes.find((x) => x.name === c.name);
        if ((c.ok || c.late) && !d && !listed.has(c.name)) problems.push(`snapshot a@${c.name} is missing after restart although its create ${c.ok ? 'completed' : 'succeeded (offline, after the kill)'} (${c.via}, ${c.style})`);
        if ((d?.ok || d?.late) && listed.has(c.name)) problems.push(`snapshot a@${c.name} is listed after restart although its delete succeeded`);
      }
      for (const [name, s] of listed) {
        const known = snaps.has(name) || invalidSnaps.has(name) || creates.some((c) => c.name === name);
        if (!known) {
          problems.push(`snapshot a@${name} is listed after restart but was never created`);
          continue;
        }
        if (s.status !== 'valid') {
          // A COW reserve smaller than the volume may overflow: the snapshot is then invalid, by design.
          if (mode !== 'cow' || o.cowReserve >= o.size) problems.push(`snapshot a@${name} is ${s.status} after restart (reserve ${fmtBytes(o.cowReserve)} cannot overflow on a ${fmtBytes(o.size)} volume)`);
          else if (!invalidSnaps.has(name)) {
            invalidSnaps.add(name);
            res.stats.invalidated = (res.stats.invalidated ?? 0) + 1;
          }
          continue;
        }
        if (s.size !== o.size) problems.push(`snapshot a@${name} has size ${s.size}, expected ${o.size}`);
        const r = reads.get(`a@${name}`);
        if (r.error) {
          problems.push(`snapshot a@${name}: ${r.error}`);
          continue;
        }
        let vr;
        if (snaps.has(name)) {
          vr = verifyImage({ label: `snapshot a@${name}`, got: r.got, base: snaps.get(name), definite: [], maybe: [], ctx, why: 'its content as verified when it was first seen' });
        } else {
          const c = creates.find((x) => x.name === name);
          const T1 = c.T1 ?? Infinity;
          const ws = log.writes.filter((w) => w.vol === volA.id);
          const definite = ws.filter((w) => w.acked && w.ackT < c.T0);
          const maybe = ws.filter((w) => !(w.acked && w.ackT < c.T0) && w.sendT < T1);
          vr = verifyImage({ label: `snapshot a@${name} (${c.via}, ${c.style}${c.ok ? '' : ', create interrupted by the kill'})`, got: r.got, base: volA.exact, definite, maybe, ctx, why: 'every write acked before snapshot create started' });
          if (!vr.ok && !c.ok && c.via === 'cli' && volA.next) {
            // Taken offline by the CLI after the crash: then it is the recovered volume, which is
            // what the volume itself reads after the restart (nothing wrote in between).
            const off = verifyImage({ label: `snapshot a@${name}`, got: r.got, base: volA.next, definite: [], maybe: [], ctx, why: 'the recovered volume' });
            if (off.ok) {
              vr = off;
              res.stats.offlineCreates = (res.stats.offlineCreates ?? 0) + 1;
            } else vr.problems.push(`  (nor does it read as the recovered volume, which a create finished offline by the CLI after the kill (exit ${c.late ? 0 : 'non-zero'}) would hold)`);
          }
        }
        res.stats.snapshotsVerified++;
        if (!vr.ok) problems.push(...vr.problems);
        else nextSnaps.set(name, r.got);
      }
    }

    tm.verified = Date.now();
    // ---- (c) check
    const checkVia = viaOf();
    const chk = await control(pool, checkVia, 'check', {});
    if (!chk.ok) problems.push(`check (${checkVia}) failed to run: ${chk.error}`);
    else if (!chk.value?.ok || chk.value.problems?.length) problems.push(`check (${checkVia}) reports problems: ${JSON.stringify(chk.value.problems ?? chk.value)}`);

    // ---- account
    const wr = log.writes;
    res.stats.writes += wr.length;
    res.stats.acked += st.acked;
    res.stats.durable += st.durable;
    res.stats.pending += st.pending;
    res.stats.flushes += log.flushes.length;
    res.stats.fua += wr.filter((w) => w.fua).length;
    res.stats.zeroes += wr.filter((w) => w.kind === 'z').length;
    tm.check = Date.now();
    const secs = ((Date.now() - it0) / 1000).toFixed(1);
    const phases = `run ${((tm.killed - it0) / 1000).toFixed(1)}+restart ${((tm.restarted - tm.killed) / 1000).toFixed(1)}+read ${((tm.read - tm.restarted) / 1000).toFixed(1)}+verify ${((tm.verified - tm.read) / 1000).toFixed(1)}+check ${((tm.check - tm.verified) / 1000).toFixed(1)}`;
    const opsText = ops.filter((x) => x.kind !== 'mirror').map((x) => `${x.kind === 'create' ? '+' : '-'}${x.name}${x.ok ? '' : '?'}`).join(' ') || 'none';
    const line = `[${mode} #${iter}] ${problems.length ? 'FAIL' : 'ok  '} kill@${((killT - wStart) / 1e6).toFixed(0)}ms ${killNote}; writes ${wr.length} (acked ${st.acked}, durable ${st.durable}, not durable ${st.pending}), flushes ${log.flushes.length}; snapshot ops ${opsText}; snapshots now ${list.ok ? list.value.length : '?'}; ${secs}s (${phases})`;
    console.log(line);
    if (problems.length) {
      const repro = `reproduce: node bench/crash-stress.mjs --modes ${mode} --seed ${o.seed} --start-iteration ${o.start} --iterations ${iter - o.start + 1} --control ${o.control} --size ${o.size} --block-size ${blockSize} (timing-dependent; the failing iteration is #${iter})`;
      if (server.proc.exitCode !== null || server.proc.signalCode !== null) problems.push(`the restarted server exited (${server.proc.exitCode ?? server.proc.signalCode})`);
      const rel = (t) => (t === null ? 'never' : `${((t - log.header.t) / 1e6).toFixed(1)}`);
      problems.push(`harness timeline (ms since the writer connected): ${ops.map((x) => `${x.kind} ${x.name ?? ''} ${x.via}${x.style ? ' ' + x.style : ''} ${rel(x.T0)}..${rel(x.T1)}${x.ok === false ? ' FAILED' : ''}`).join('; ') || 'no snapshot operations'}; kill at ${rel(killT)}`);
      const tail = server.log.filter((l) => !/"level":30/.test(l)).slice(-12);
      if (tail.length) problems.push(`server log (warnings/errors since restart):\n      ${tail.join('\n      ')}`);
      for (const p of problems) console.log(`    ${p}`);
      console.log(`    pool, the writer's log (${path.basename(logFile)}) and the volumes' files as the kill left them (${path.basename(forensics)}/) kept at ${pool}; ${repro}`);
      fail(iter, [...problems, repro].join('\n'));
      // The model no longer matches: stop this mode here.
      break;
    }
    res.passed++;
    fs.rmSync(logFile, { force: true });
    fs.rmSync(forensics, { recursive: true, force: true });
    // Recycle: every image read this round is either the new model or garbage now.
    for (const v of vols) {
      images.put(v.exact);
      v.exact = v.next;
    }
    images.put(...snaps.values());
    snaps = nextSnaps;
    for (const [, r] of reads) if (r.got && r.got !== volA.exact && r.got !== volB.exact && ![...snaps.values()].includes(r.got)) images.put(r.got);

  }

  // ---- clean stop, restart, everything must read exactly as modelled; offline check
  if (!res.failures.length) {
    const problems = [];
    const code = await server.stop();
    if (code !== 0) problems.push(`clean stop (SIGTERM) exited with ${code}: ${server.log.slice(-5).join(' | ')}`);
    const off = await runCli(pool, ['check', '--json']);
    if (off.status !== 0) problems.push(`offline check failed (${off.status}): ${off.stdout}${off.stderr}`);
    server = await Server.start(pool);
    const reads = await readExports(server, [...vols.map((v) => v.name), ...[...snaps.keys()].map((n) => `a@${n}`)], o.size);
    for (const v of vols) {
      const r = reads.get(v.name);
      if (r.error) problems.push(`after clean restart, volume ${v.name}: ${r.error}`);
      else {
        const vr = verifyImage({ label: `after clean restart, volume ${v.name}`, got: r.got, base: v.exact, definite: [], maybe: [], ctx, why: 'as read before the clean stop' });
        if (!vr.ok) problems.push(...vr.problems);
      }
    }
    for (const [name, exact] of snaps) {
      const r = reads.get(`a@${name}`);
      if (r.error) problems.push(`after clean restart, snapshot a@${name}: ${r.error}`);
      else {
        const vr = verifyImage({ label: `after clean restart, snapshot a@${name}`, got: r.got, base: exact, definite: [], maybe: [], ctx, why: 'as read before the clean stop' });
        if (!vr.ok) problems.push(...vr.problems);
      }
    }
    console.log(`[${mode} final] ${problems.length ? 'FAIL' : 'ok  '} clean stop, offline check, restart: volumes and ${snaps.size} snapshot(s) read exactly as modelled`);
    for (const p of problems) console.log(`    ${p}`);
    if (problems.length) fail('final', problems.join('\n'));
  }
  await server.stop().catch(() => {});
  res.seconds = (Date.now() - t0) / 1000;
  if (!res.failures.length && !o.keep) fs.rmSync(pool, { recursive: true, force: true });
  else res.kept = pool;
}

// ------------------------------------------------------------------ main

async function main() {
  let o;
  try {
    o = parseArgs(process.argv.slice(2));
  } catch (err) {
    console.error(err.message);
    process.exit(2);
  }
  CLI = path.join(o.root, 'bin', 'snapblock.js');
  for (const f of [path.join(o.root, 'dist', 'cli', 'main.js'), CLI]) if (!fs.existsSync(f)) {
    console.error(`${f} is missing: build first (npx tsc -p .)`);
    process.exit(2);
  }
  const summary = { started: new Date().toISOString(), seed: o.seed, options: { ...o }, modes: [] };
  console.log(`crash-stress: seed ${o.seed}, modes ${o.modes.join(',')}, ${o.iterations} iteration(s) each, control via ${o.control}${o.root !== ROOT ? `, snapblock from ${o.root}` : ''}`);
  let infraError;
  for (let i = 0; i < o.modes.length; i++) {
    try {
      await runMode(o.modes[i], o, i, summary);
    } catch (err) {
      infraError = err;
      console.error(`!! ${o.modes[i]}: infrastructure error: ${err.stack ?? err}`);
      const m = summary.modes.find((x) => x.mode === o.modes[i]);
      if (m) m.infraError = String(err.message ?? err);
    }
  }
  console.log('\nsummary');
  let failed = 0;
  for (const m of summary.modes) {
    const s = m.stats;
    console.log(
      `  ${m.mode.padEnd(6)} ${m.passed}/${m.iterations} iterations passed${m.failures.length ? `, ${m.failures.length} FAILURE(S)` : ''}${m.infraError ? ', INFRASTRUCTURE ERROR' : ''}; ` +
        `${s.writes} writes (${s.acked} acked, ${s.durable} durable-by-protocol, ${s.fua} FUA, ${s.zeroes} zeroes), ${s.flushes} flushes, ` +
        `${s.snapCreates} snapshot creates / ${s.snapDeletes} deletes completed, kills inside create ${s.killsDuringCreate} / delete ${s.killsDuringDelete}${m.mode === 'mirror' ? ` / mirror sync ${s.killsDuringMirrorSync}` : ''}, ` +
        `${s.snapshotsVerified} snapshot reads verified, ${m.seconds.toFixed(0)}s (block size ${fmtBytes(m.blockSize)})`,
    );
    failed += m.failures.length;
    for (const f of m.failures) console.log(`    iteration ${f.iteration}: ${f.message.split('\n')[0]}`);
  }
  summary.finished = new Date().toISOString();
  summary.ok = failed === 0 && !infraError;
  if (o.json) {
    fs.mkdirSync(path.dirname(o.json), { recursive: true });
    fs.writeFileSync(o.json, JSON.stringify(summary, null, 2) + '\n');
    console.log(`  summary written to ${o.json}`);
  }
  process.exit(failed ? 1 : infraError ? 2 : 0);
}

main().catch((err) => {
  console.error(err);
  process.exit(2);
});
