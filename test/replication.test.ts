// Replication between two real `snapblock serve` processes (primary A, secondary B),
// linked over NBD. Real clients write to the primary (qemu-io, nbdsh, fio) and judge
// the secondary byte for byte (nbdsh reading B's ordinary export).
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import http from 'node:http';
import { CLI, cli, nbdsh, run, serverHandle, startServer, tempDir, type RunningServer, cliOk, exportSha256, qemuIo, until } from './helpers/server.js';
import { RegionLog } from '../src/replication/region-log.js';

const MiB = 1024 * 1024;
const MODES = (process.env.SNAPBLOCK_TEST_MODES ?? 'row,cow,mirror').split(',');
process.env.SNAPBLOCK_REPL_TIMEOUT_MS = '2000';

const running: RunningServer[] = [];
afterEach(async () => {
  for (const s of running.splice(0)) await s.stop();
});

async function serve(pool?: string): Promise<RunningServer> {
  const s = await startServer({ pool });
  running.push(s);
  return s;
}

const ok = cliOk;

const qio = qemuIo;

const sha = exportSha256;

type Status = Record<string, unknown> & { replication_status: string };
/** volume info through the server's control API (what `snapblock volume info --json` prints) */
async function status(srv: RunningServer, vol: string): Promise<Status> {
  const body = JSON.stringify({ op: 'volume.info', args: { name: vol } });
  const v = await new Promise<{ replication_status: string; replication?: object }>((resolve, reject) => {
    const req = http.request({ socketPath: path.join(srv.pool, 'control.sock'), method: 'POST', path: '/v1/call', agent: false, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), connection: 'close' } }, (res) => {
      let d = '';
      res.on('data', (c) => (d += c));
      res.on('end', () => ((res.statusCode ?? 500) < 400 ? resolve(JSON.parse(d)) : reject(new Error(d))));
    });
    req.on('error', reject);
    req.end(body);
  });
  return { replication_status: v.replication_status, ...(v.replication ?? {}) };
}

const inSync = (srv: RunningServer, vol: string) => async () => {
  const s = await status(srv, vol);
  return s.link === 'replicating' && s.lagBytes === 0;
};

/** B up; A's pool has backend "b" -> B's Unix socket and a replicated type "repl". */
async function pair(opts: { repl: 'sync' | 'async'; mode?: string; onLinkLoss?: string }): Promise<{ a: RunningServer; b: RunningServer; aPool: string }> {
  const b = await serve();
  const aPool = tempDir('pool-a-');
  ok(aPool, ['backend', 'add', 'b', `nbd+unix:///?socket=${b.socket}`]);
  ok(aPool, ['replication', 'type-create', 'repl', '--replication', opts.repl, '--backend-id', 'b', '--snapshot-mode', opts.mode ?? 'row', '--cow-reserve', '16M', ...(opts.onLinkLoss ? ['--on-link-loss', opts.onLinkLoss] : [])]);
  return { a: await serve(aPool), b, aPool };
}

describe('replication: configuration and status', () => {
  it('backends live in the catalog; bad input is refused; unreplicated volumes say disabled', async () => {
    const pool = tempDir('pool-cfg-');
    ok(pool, ['backend', 'add', 'site-b', 'nbd://127.0.0.1:10809']);
    expect(cli(pool, ['backend', 'add', 'bad', 'http://x']).status).toBe(1);
    expect(cli(pool, ['replication', 'type-create', 't', '--replication', 'sync', '--backend-id', 'nope']).status).toBe(1);
    ok(pool, ['replication', 'type-create', 't', '--replication', 'async', '--backend-id', 'site-b']);
    expect(cli(pool, ['backend', 'rm', 'site-b']).status).toBe(1); // used by type t
    ok(pool, ['volume', 'create', 'plain', '8M']);
    ok(pool, ['volume', 'create', 'rep', '8M', '--type', 't']);
    const plain = JSON.parse(ok(pool, ['volume', 'info', 'plain', '--json']));
    expect(plain.replication_status).toBe('disabled');
    const rep = JSON.parse(ok(pool, ['volume', 'info', 'rep', '--json']));
    expect(rep.replication_status).toBe('enabled');
    expect(rep.replication).toMatchObject({ role: 'primary', mode: 'async', backendId: 'site-b' });
    expect(JSON.parse(ok(pool, ['backend', 'list', '--json']))).toEqual({ 'site-b': { uri: 'nbd://127.0.0.1:10809' } });
  });
});

for (const mode of MODES) {
  describe(`sync replication of ${mode} volumes`, () => {
    it('initial sync skips holes and shows progress; every write is on both sides; writes to the secondary are refused', async () => {
      const { a, b, aPool } = await pair({ repl: 'sync', mode });
      // A volume with data before replication is enabled: the initial sync copies only that.
      ok(aPool, ['volume', 'create', 'pre', '256M', '--snapshot-mode', mode, '--cow-reserve', '16M']);
      qio(a.uri('pre'), 'write -P 0x11 0 3M', 'write -P 0x22 100M 1M', 'write -P 0x33 255M 1M');
      ok(aPool, ['replication', 'enable', 'pre', '--mode', 'sync', '--backend-id', 'b']);
      await until('initial sync', inSync(a, 'pre'));
      const st = await status(a, 'pre');
      expect(st.initialSyncDone).toBe(true);
      expect((st.progress as { phase: string; total: number }).phase).toBe('initial');
      expect((st.progress as { total: number }).total).toBeLessThanOrEqual(6 * MiB); // 5 MiB of data in 256
      expect(st.resyncedBytes).toBe(5 * MiB);
      expect(sha(b.uri('pre'))).toBe(sha(a.uri('pre')));

      // A volume of the replicated type: replicates from creation.
      ok(aPool, ['volume', 'create', 'v', '64M', '--type', 'repl']);
      await until('link up', async () => (await status(a, 'v')).link === 'replicating');
      qio(a.uri('v'), 'write -P 0xa1 0 4M', 'write -P 0xa2 5000 70000', 'write -z 1M 64k', 'discard 2M 1M', 'write -P 0xa3 40M 3M', 'flush');
      expect(sha(b.uri('v'))).toBe(sha(a.uri('v')));
      expect(await status(a, 'v')).toMatchObject({ replication_status: 'enabled', role: 'primary', link: 'replicating', lagBytes: 0 });
      expect(await status(b, 'v')).toMatchObject({ replication_status: 'enabled', role: 'secondary' });
      const w = run('qemu-io', ['-f', 'raw', b.uri('v'), '-c', 'write -P 0xff 0 4k']);
      expect(w.stdout + w.stderr).toMatch(/Operation not permitted/);
    });
  });
}

describe('sync replication: kill -9 of the primary, failover, failback', () => {
  it('the secondary holds every acknowledged write; the old primary fences itself; failback copies back only the changes', async () => {
    const { a, b, aPool } = await pair({ repl: 'sync' });
    ok(aPool, ['volume', 'create', 'db', '128M', '--type', 'repl']);
    await until('link up', async () => (await status(a, 'db')).link === 'replicating');
    // A writer that prints each block index once its write is acknowledged (4 in flight).
    const writer = spawn('nbdsh', ['-u', a.uri('db'), '-c', `
import struct, sys
BS = 65536; N = 2048; nxt = 0; inflight = 0
def buf(i): return struct.pack('<Q', i + 1) * (BS // 8)
def done(i, err):
    global inflight
    inflight -= 1
    if err.value == 0:
        print(i, flush=True)
    return 1
while True:
    while inflight < 4 and nxt < 100000:
        i = nxt % N; nxt += 1; inflight += 1
        h.aio_pwrite(buf(nxt - 1), i * BS, completion=lambda err, i=nxt - 1: done(i, err))
    h.poll(-1)
`], { env: { ...process.env, PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH}` } });
    let out = '';
    writer.stdout.on('data', (c) => (out += c));
    const exited = new Promise((r) => writer.once('exit', r));
    await until('writes flowing', () => out.split('\n').length > 300);
    await a.kill9();
    await exited;
    const acked = out.split('\n').filter(Boolean).map(Number);
    expect(acked.length).toBeGreaterThanOrEqual(300);
    // The latest acknowledged write of each block is what the secondary must hold.
    const latest = new Map<number, number>();
    for (const i of acked) latest.set(i % 2048, Math.max(latest.get(i % 2048) ?? -1, i));

    ok(b.pool, ['failover', 'db']);
    expect(await status(b, 'db')).toMatchObject({ replication_status: 'failed-over', role: 'primary' });
    const check = nbdsh(b.uri('db'), `
import struct, json
latest = json.loads('${JSON.stringify([...latest.entries()])}')
bad = 0
for blk, i in latest:
    got = struct.unpack('<Q', h.pread(8, blk * 65536))[0] - 1
    # a later unacknowledged write may have landed too; never an older one
    if got < i: bad += 1
print(bad)
`);
    expect(Number(check.trim()), 'blocks on the secondary older than their acknowledged write').toBe(0);
    console.log(`sync kill -9: ${acked.length} acknowledged writes over ${latest.size} blocks, all on the secondary after failover`);

    // The promoted secondary is writable; the old primary comes back fenced.
    qio(b.uri('db'), 'write -P 0x5a 64M 2M');
    running.splice(running.indexOf(a), 1);
    const a2 = await serve(aPool);
    await until('old primary sees the promotion', async () => (await status(a2, 'db')).replication_status === 'failed-over');
    expect(await status(a2, 'db')).toMatchObject({ role: 'secondary', activeBackendId: 'b' });
    const w = run('qemu-io', ['-f', 'raw', a2.uri('db'), '-c', 'write -P 1 0 4k']);
    expect(w.stdout + w.stderr).toMatch(/Operation not permitted/);

    // Failback (run against the original primary's pool).
    const fb = JSON.parse(ok(aPool, ['failback', 'db', '--json']));
    expect(fb.replication_status).toBe('enabled');
    // What the dead primary never flushed is lost there too (kill -9): failback copies that
    // back plus what was written after the failover, never the whole volume.
    expect(fb.copiedBytes).toBeLessThan(128 * MiB);
    console.log(`failback copied back ${(fb.copiedBytes / MiB).toFixed(1)} MiB of 128 MiB`);
    expect(await status(b, 'db')).toMatchObject({ role: 'secondary', replication_status: 'enabled' });
    await until('replicating again', inSync(a2, 'db'));
    qio(a2.uri('db'), 'read -P 0x5a 64M 2M', 'write -P 0x6b 70M 1M');
    expect(sha(b.uri('db'))).toBe(sha(a2.uri('db')));
    // The active backend and role survive restarts.
    await a2.stop();
    running.splice(running.indexOf(a2), 1);
    const a3 = await serve(aPool);
    await until('replicating after restart', inSync(a3, 'db'));
    expect(await status(a3, 'db')).toMatchObject({ role: 'primary', replication_status: 'enabled' });
  });

  it('planned failover from the primary: catches up, fences, promotes the secondary over the link', async () => {
    const { a, b, aPool } = await pair({ repl: 'async' });
    ok(aPool, ['volume', 'create', 'p', '32M', '--type', 'repl']);
    await until('link up', async () => (await status(a, 'p')).link === 'replicating');
    qio(a.uri('p'), 'write -P 0x42 0 8M');
    const r = JSON.parse(ok(aPool, ['failover', 'p', '--json']));
    expect(r.replication_status).toBe('failed-over');
    expect(await status(b, 'p')).toMatchObject({ role: 'primary', replication_status: 'failed-over' });
    qio(b.uri('p'), 'read -P 0x42 0 8M', 'write -P 0x43 8M 1M');
  });
});

describe('async replication', () => {
  it('acknowledges after the primary, ships in order with bounded lag (RPO measured under steady load)', async () => {
    const { a, b, aPool } = await pair({ repl: 'async' });
    ok(aPool, ['volume', 'create', 'log', '512M', '--type', 'repl']);
    await until('link up', async () => (await status(a, 'log')).link === 'replicating');
    const fio = spawn('fio', ['--name=steady', '--ioengine=nbd', `--uri=${a.uri('log')}`, '--rw=write', '--bs=64k', '--iodepth=8', '--rate=50m', '--time_based', '--runtime=6', '--size=512M', '--output-format=json'], {
      env: { ...process.env, PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH}` },
    });
    let fout = '';
    fio.stdout.on('data', (c) => (fout += c));
    const done = new Promise<number | null>((r) => fio.once('exit', r));
    let exited = false;
    void done.then(() => (exited = true));
    const samples: Array<{ bytes: number; seconds: number }> = [];
    while (!exited) {
      const s = await status(a, 'log');
      samples.push({ bytes: Number(s.lagBytes), seconds: Number(s.lagSeconds ?? 0) });
      await new Promise((r) => setTimeout(r, 200));
    }
    expect(await done).toBe(0);
    const bw = JSON.parse(fout.slice(fout.indexOf('{'))).jobs[0].write.bw_bytes as number;
    const maxS = Math.max(...samples.map((s) => s.seconds));
    const maxB = Math.max(...samples.map((s) => s.bytes));
    const avgS = samples.reduce((n, s) => n + s.seconds, 0) / samples.length;
    console.log(`async RPO under ${(bw / MiB).toFixed(1)} MiB/s steady writes: lag max ${maxS.toFixed(3)} s / ${(maxB / MiB).toFixed(2)} MiB, mean ${avgS.toFixed(3)} s over ${samples.length} samples`);
    // Bounded lag: the queue never exceeds its bound (64 MiB + what is in flight), so lag
    // stays bounded; the <= 1 s target at 100 MB/s is measured by bench/replication.mjs.
    expect(maxB).toBeLessThanOrEqual(72 * MiB);
    expect(maxS).toBeLessThan(5);
    await until('caught up', inSync(a, 'log'));
    expect(sha(b.uri('log'))).toBe(sha(a.uri('log')));
  });

  it('link loss: keeps serving, persists dirty regions across a primary restart, resyncs only them', async () => {
    const { a, b, aPool } = await pair({ repl: 'async' });
    ok(aPool, ['volume', 'create', 'big', '512M', '--type', 'repl']);
    await until('link up', async () => (await status(a, 'big')).link === 'replicating');
    qio(a.uri('big'), 'write -P 0x10 0 16M', 'write -P 0x11 300M 8M');
    await until('in sync', inSync(a, 'big'));
    // quiescent: a remote flush covered every hot region of the writes above (they stay in
    // the activity log's hot set, but the secondary has them durably)
    await until('hot regions covered by a remote flush', async () => (await status(a, 'big')).unflushedRegions === 0);
    const before = Number((await status(a, 'big')).resyncedBytes);

    await b.kill9();
    running.splice(running.indexOf(b), 1);
    // The primary keeps acknowledging writes while the secondary is gone.
    qio(a.uri('big'), 'write -P 0x20 4M 64k', 'write -P 0x21 301M 4k', 'write -P 0x22 450M 1M', 'discard 8M 64k');
    await until('link loss noticed', async () => (await status(a, 'big')).replication_status === 'error');
    const st = await status(a, 'big');
    expect(st.dirtyRegions).toBeGreaterThan(0);
    // Restart the primary too: the dirty regions are in the persisted region log.
    await a.stop();
    running.splice(running.indexOf(a), 1);
    const b2 = await serve(b.pool);
    const a2 = await serve(aPool);
    await until('resynced', inSync(a2, 'big'));
    const resynced = Number((await status(a2, 'big')).resyncedBytes);
    console.log(`link loss: resynced ${(resynced / MiB).toFixed(2)} MiB of a 512 MiB volume (initial sync had copied ${(before / MiB).toFixed(0)} MiB)`);
    expect(resynced).toBeGreaterThan(0);
    expect(resynced).toBeLessThanOrEqual(8 * MiB);
    expect(sha(b2.uri('big'))).toBe(sha(a2.uri('big')));
  });
});

describe('sync replication on link loss', () => {
  it('block (default): a write waits for the secondary; degrade: it is acknowledged at once and resynced later', async () => {
    for (const policy of ['block', 'degrade'] as const) {
      const { a, b, aPool } = await pair({ repl: 'sync', onLinkLoss: policy });
      ok(aPool, ['volume', 'create', 'w', '32M', '--type', 'repl']);
      await until('link up', async () => (await status(a, 'w')).link === 'replicating');
      await b.kill9();
      running.splice(running.indexOf(b), 1);
      const t0 = Date.now();
      const writer = spawn('qemu-io', ['-f', 'raw', a.uri('w'), '-c', 'write -P 0x77 1M 64k'], { env: { ...process.env, PATH: `/usr/bin:${process.env.PATH}` } });
      const done = new Promise<number>((r) => writer.once('exit', () => r(Date.now() - t0)));
      const early = await Promise.race([done, new Promise<undefined>((r) => setTimeout(r, 3000))]);
      if (policy === 'block') expect(early, 'write acknowledged without the secondary').toBeUndefined();
      else expect(early).toBeLessThan(3000);
      const b2 = await serve(b.pool);
      const ms = await done;
      await until('resynced', inSync(a, 'w'));
      console.log(`sync onLinkLoss=${policy}: write acknowledged after ${ms} ms`);
      expect(sha(b2.uri('w'))).toBe(sha(a.uri('w')));
      for (const s of running.splice(0)) await s.stop();
    }
  });
});


describe('writes that bypass the export: snapshot rollback and volume resize replicate', () => {
  for (const repl of ['sync', 'async'] as const) {
    it(`${repl}: a rollback resyncs only the changed regions; a resize is carried to the secondary`, async () => {
      const { a, b, aPool } = await pair({ repl });
      ok(aPool, ['volume', 'create', 'rb', '64M', '--type', 'repl']);
      await until('link up', async () => (await status(a, 'rb')).link === 'replicating');
      qio(a.uri('rb'), 'write -P 0x61 0 8M', 'write -P 0x62 30M 2M');
      ok(aPool, ['snapshot', 'create', 'rb', 'before']);
      qio(a.uri('rb'), 'write -P 0x71 1M 1M', 'write -P 0x72 40M 3M', 'discard 30M 1M');
      await until('in sync', inSync(a, 'rb'));
      const before = Number((await status(a, 'rb')).resyncedBytes);
      ok(aPool, ['snapshot', 'rollback', 'rb', 'before']);
      await until('rollback resynced', inSync(a, 'rb'));
      qio(a.uri('rb'), 'read -P 0x61 0 8M', 'read -P 0x62 30M 2M', 'read -P 0 40M 3M');
      expect(sha(b.uri('rb'))).toBe(sha(a.uri('rb')));
      const resynced = Number((await status(a, 'rb')).resyncedBytes) - before;
      console.log(`${repl} rollback: resynced ${(resynced / MiB).toFixed(2)} MiB of 64 MiB`);
      expect(resynced).toBeGreaterThan(0);
      expect(resynced).toBeLessThanOrEqual(3 * MiB); // 1M..2M and 30M..31M had data; 40M..43M became zeroes

      ok(aPool, ['volume', 'resize', 'rb', '96M']);
      await until('replicating at the new size', async () => {
        const st = await status(a, 'rb');
        return st.link === 'replicating' && st.lagBytes === 0;
      });
      expect(Number(nbdsh(b.uri('rb'), 'print(h.get_size())').trim())).toBe(96 * MiB);
      qio(a.uri('rb'), 'write -P 0x81 90M 4M');
      await until('in sync', inSync(a, 'rb'));
      const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a.uri('rb'), b.uri('rb')]);
      expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
      qio(b.uri('rb'), 'read -P 0x81 90M 4M', 'read -P 0x61 0 8M');
    });
  }
});

describe('activity log (region-log.ts)', () => {
  const file = () => path.join(tempDir('rlog-'), 'v.rlog');
  const onDisk = (f: string) => {
    const buf = fs.readFileSync(f);
    const out: number[] = [];
    for (let r = 0; r < buf.readUInt32LE(12); r++) if (buf[32 + (r >> 3)] & (1 << (r & 7))) out.push(r);
    return { magic: buf.toString('latin1', 0, 8), regions: out };
  };
  const fresh = async (f: string, hotLimit: number) => {
    const log = RegionLog.open(f, 64 * MiB, MiB, { hotLimit });
    log.clearAll();
    await log.commit();
    return log;
  };

  it('a write into a hot extent costs no log IO; extents entering together share one commit', async () => {
    const f = file();
    const log = await fresh(f, 8);
    const s0 = log.syncs;
    const p = log.activate(3, 3);
    expect(p).toBeInstanceOf(Promise);
    await p;
    expect(log.syncs).toBe(s0 + 1);
    expect(onDisk(f).regions).toEqual([3]); // durable before the write may go
    for (let i = 0; i < 100; i++) expect(log.activate(3, 3)).toBeUndefined(); // hot: nothing to wait for
    expect(log.syncs).toBe(s0 + 1);
    // Concurrent writers entering new extents: one pwrite + fdatasync for all of them.
    await Promise.all([log.activate(10, 11), log.activate(20, 20), log.activate(30, 30), log.activate(11, 12)]);
    expect(log.syncs).toBe(s0 + 2);
    expect(onDisk(f).regions).toEqual([3, 10, 11, 12, 20, 30]);
    await log.close();
  });

  it('eviction: least recently used first, only covered by a remote flush, never busy ones; lazily', async () => {
    const f = file();
    const log = await fresh(f, 3);
    for (const r of [0, 1, 2, 3, 4]) await log.activate(r, r);
    await log.activate(0, 0); // 0 is the most recently used now: 1 is the oldest
    expect(log.hotExtents()).toEqual([1, 2, 3, 4, 0]);
    // Nothing is covered yet: nothing may leave, whatever the bound.
    expect(log.evict(() => true)).toBe(0);
    expect(log.uncoveredCount()).toBe(5);
    // A remote flush covers what completed before it; 4 was in flight (busy).
    const cands = log.coverCandidates((r) => r === 4);
    log.activate(2, 2); // written again after the flush was sent: not covered by it
    log.covered(cands);
    expect([...log.uncovered()].sort()).toEqual([2, 4]);
    const syncs = log.syncs;
    expect(log.hotExtents()).toEqual([1, 3, 4, 0, 2]);
    // Over the bound by 2: 1 and 0 leave (covered); 3 is covered but busy (e.g. dirty), 4 and 2 are not covered.
    expect(log.evict((r) => r !== 3)).toBe(2);
    expect(log.hotExtents()).toEqual([3, 4, 2]);
    expect(log.syncs).toBe(syncs); // leaving costs no commit of its own
    expect(onDisk(f).regions).toEqual([0, 1, 2, 3, 4]); // still set on disk: harmless
    await log.activate(40, 40); // the next commit carries the cleared bits
    expect(onDisk(f).regions).toEqual([2, 3, 4, 40]);
    expect(log.evict(() => true)).toBe(1); // over by one again: 3, now that it may leave
    expect(log.hotExtents()).toEqual([4, 2, 40]);
    await log.close();
  });

  it('crash recovery: every extent in the log is resynced; a clean stop keeps only what a flush did not cover', async () => {
    const f = file();
    const log = await fresh(f, 100);
    for (const r of [5, 6, 9, 33]) await log.activate(r, r);
    log.prefetch(34, 37); // marked ahead of a sequential writer
    await log.activate(34, 34);
    // kill -9: the process dies, the file is what it is. A new process opens it.
    const after = RegionLog.open(f, 64 * MiB, MiB, { hotLimit: 100 });
    expect([...after.marked()]).toEqual([5, 6, 9, 33, 34, 35, 36, 37]);
    expect([...after.uncovered()]).toEqual([5, 6, 9, 33, 34, 35, 36, 37]); // all of them go to resync
    // Clean stop: what a remote flush covered leaves the log first.
    log.covered(log.coverCandidates((r) => r === 9));
    log.releaseCovered((r) => r !== 9);
    await log.close();
    expect(onDisk(f)).toEqual({ magic: 'SBRLOG02', regions: [9] });
    await after.close().catch(() => {});
  });

  it('reads a v1 log (SBRLOG01) and rewrites its header as v2; a log of another geometry means: everything differs', async () => {
    const f = file();
    const v1 = Buffer.alloc(32 + 8);
    v1.write('SBRLOG01', 0, 'latin1');
    v1.writeUInt32LE(MiB, 8);
    v1.writeUInt32LE(64, 12);
    v1.writeUInt32LE(1, 16);
    v1[32] = 0b00000110;
    fs.writeFileSync(f, v1);
    const log = RegionLog.open(f, 64 * MiB, MiB);
    expect([...log.marked()]).toEqual([1, 2]);
    expect(log.initialSyncDone).toBe(true);
    await log.close();
    expect(onDisk(f)).toEqual({ magic: 'SBRLOG02', regions: [1, 2] });
    const resized = RegionLog.open(f, 128 * MiB, MiB);
    expect(resized.markedCount()).toBe(128);
    expect(resized.initialSyncDone).toBe(false);
    await resized.close();
  });
});

// ---------------------------------------------------------------------------------------
// The secondary in another network namespace, reached over a veth pair; the link is cut
// with `ip link set ... down` (no process dies: packets just stop, as on a real network).
const NS = `sbr${process.pid}`;
const VETH_A = `sbra${process.pid % 100000}`;
const VETH_B = `sbrb${process.pid % 100000}`;
const NET = `10.213.${process.pid % 250}`;
const ADDR_A = `${NET}.1`;
const ADDR_B = `${NET}.2`;
const netnsProbe = (() => {
  const probe = `sbrprobe${process.pid}`;
  const r = run('ip', ['netns', 'add', probe]);
  if (r.status !== 0) return `ip netns add is not permitted here (${r.stderr.trim()})`;
  run('ip', ['netns', 'del', probe]);
  return undefined;
})();
if (netnsProbe) console.warn(`SKIPPING the network-namespace replication tests: ${netnsProbe}`);

function ip(...args: string[]): void {
  const r = run('ip', args);
  if (r.status !== 0) throw new Error(`ip ${args.join(' ')}: ${r.stderr}`);
}

/** `snapblock serve` inside the namespace, on the veth address (plus its Unix socket, reachable from here whatever the link). */
async function serveInNetns(pool: string): Promise<RunningServer> {
  const socket = path.join(pool, 'nbd.sock');
  const proc = spawn('ip', ['netns', 'exec', NS, process.execPath, CLI, '--pool', pool, 'serve', '--listen', `${ADDR_B}:10809`, '--socket', socket], {
    env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'info', PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH}` },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  proc.stdout!.on('data', (c) => (log += c));
  proc.stderr!.on('data', (c) => (log += c));
  await until('the namespaced server listening', () => log.includes('snapblock serving') || proc.exitCode !== null, 20_000);
  if (proc.exitCode !== null) throw new Error(`serve in ${NS} exited: ${log}`);
  const s = serverHandle({ pool, port: 10809, socket, proc, uri: (name) => `nbd+unix:///${name}?socket=${socket}`, logs: () => log });
  running.push(s);
  return s;
}

describe.skipIf(netnsProbe !== undefined)('replication to a secondary in another network namespace (veth), link cut with ip link', () => {
  beforeAll(() => {
    run('ip', ['netns', 'del', NS]);
    ip('netns', 'add', NS);
    ip('link', 'add', VETH_A, 'type', 'veth', 'peer', 'name', VETH_B);
    ip('link', 'set', VETH_B, 'netns', NS);
    ip('addr', 'add', `${ADDR_A}/30`, 'dev', VETH_A);
    ip('link', 'set', VETH_A, 'up');
    ip('netns', 'exec', NS, 'ip', 'addr', 'add', `${ADDR_B}/30`, 'dev', VETH_B);
    ip('netns', 'exec', NS, 'ip', 'link', 'set', VETH_B, 'up');
    ip('netns', 'exec', NS, 'ip', 'link', 'set', 'lo', 'up');
  });
  afterAll(async () => {
    for (const s of running.splice(0)) await s.stop().catch(() => {});
    run('ip', ['link', 'del', VETH_A]);
    run('ip', ['netns', 'del', NS]);
  });

  const linkDown = () => ip('link', 'set', VETH_A, 'down');
  const linkUp = () => ip('link', 'set', VETH_A, 'up');

  async function netPair(): Promise<{ a: RunningServer; b: RunningServer; aPool: string }> {
    const b = await serveInNetns(tempDir('pool-ns-b-'));
    const aPool = tempDir('pool-ns-a-');
    ok(aPool, ['backend', 'add', 'b', `nbd://${ADDR_B}:10809`]);
    ok(aPool, ['replication', 'type-create', 'async', '--replication', 'async', '--backend-id', 'b']);
    ok(aPool, ['replication', 'type-create', 'block', '--replication', 'sync', '--backend-id', 'b', '--on-link-loss', 'block']);
    ok(aPool, ['replication', 'type-create', 'degrade', '--replication', 'sync', '--backend-id', 'b', '--on-link-loss', 'degrade']);
    return { a: await serve(aPool), b, aPool };
  }

  it('async keeps serving while the link is down, records dirty regions, resyncs only them when it returns', async () => {
    const { a, b, aPool } = await netPair();
    ok(aPool, ['volume', 'create', 'an', '256M', '--type', 'async']);
    await until('link up over the veth', async () => (await status(a, 'an')).link === 'replicating');
    qio(a.uri('an'), 'write -P 0x31 0 8M', 'write -P 0x32 100M 4M');
    await until('in sync', inSync(a, 'an'));
    expect(sha(b.uri('an'))).toBe(sha(a.uri('an')));
    await until('covered', async () => (await status(a, 'an')).unflushedRegions === 0);
    const before = Number((await status(a, 'an')).resyncedBytes);

    linkDown();
    try {
      // The primary acknowledges at once although the secondary is unreachable.
      const t0 = Date.now();
      qio(a.uri('an'), 'write -P 0x41 1M 64k', 'write -P 0x42 150M 1M', 'write -z 101M 64k', 'discard 200M 1M');
      expect(Date.now() - t0).toBeLessThan(3000);
      await until('link loss noticed', async () => (await status(a, 'an')).replication_status === 'error', 20_000);
      const st = await status(a, 'an');
      expect(st.link).toBe('disconnected');
      expect(Number(st.dirtyRegions)).toBeGreaterThanOrEqual(3);
      expect(Number(st.dirtyRegions)).toBeLessThanOrEqual(6);
      qio(a.uri('an'), 'write -P 0x43 2M 4k'); // still serving
      // The secondary (checked over its Unix socket, inside its namespace's reach) has not got it.
      qio(b.uri('an'), 'read -P 0x31 1M 64k');
    } finally {
      linkUp();
    }
    await until('resynced after the link returned', inSync(a, 'an'), 60_000);
    const resynced = Number((await status(a, 'an')).resyncedBytes) - before;
    console.log(`netns async: link cut, resynced ${(resynced / MiB).toFixed(2)} MiB of 256 MiB when it returned`);
    expect(resynced).toBeGreaterThan(0);
    expect(resynced).toBeLessThanOrEqual(6 * MiB);
    expect(sha(b.uri('an'))).toBe(sha(a.uri('an')));
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a.uri('an'), b.uri('an')]);
    expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
  });

  it('sync, onLinkLoss=block: a write waits for the link; degrade: acknowledged at once, resynced when it returns', async () => {
    const { a, b, aPool } = await netPair();
    for (const policy of ['block', 'degrade'] as const) {
      const vol = `s-${policy}`;
      ok(aPool, ['volume', 'create', vol, '64M', '--type', policy]);
      await until('link up over the veth', async () => (await status(a, vol)).link === 'replicating');
      qio(a.uri(vol), 'write -P 0x51 0 4M');
      expect(sha(b.uri(vol))).toBe(sha(a.uri(vol)));
      linkDown();
      let writer: ReturnType<typeof spawn> | undefined;
      let ms: number;
      try {
        const t0 = Date.now();
        writer = spawn('qemu-io', ['-f', 'raw', a.uri(vol), '-c', 'write -P 0x77 1M 64k', '-c', 'write -P 0x78 40M 64k'], { env: { ...process.env, PATH: `/usr/bin:${process.env.PATH}` } });
        const done = new Promise<number>((r) => writer!.once('exit', (code) => r(code === 0 ? Date.now() - t0 : -1)));
        const early = await Promise.race([done, new Promise<undefined>((r) => setTimeout(r, 6000))]);
        if (policy === 'block') {
          expect(early, 'write acknowledged without the secondary').toBeUndefined();
          expect((await status(a, vol)).replication_status).toBe('error');
        } else {
          expect(early).toBeGreaterThanOrEqual(0);
          expect(early).toBeLessThan(6000);
          expect(await status(a, vol)).toMatchObject({ degraded: true, replication_status: 'error' });
        }
        linkUp();
        ms = await done;
      } finally {
        linkUp();
      }
      expect(ms).toBeGreaterThanOrEqual(0);
      await until('resynced', inSync(a, vol), 60_000);
      console.log(`netns sync onLinkLoss=${policy}: write acknowledged after ${ms} ms`);
      expect(await status(a, vol)).toMatchObject({ degraded: false, replication_status: 'enabled' });
      expect(sha(b.uri(vol))).toBe(sha(a.uri(vol)));
      qio(b.uri(vol), 'read -P 0x77 1M 64k', 'read -P 0x78 40M 64k');
    }
  });
});

describe('writes while no replication session is connected are logged and resynced', () => {
  const compare = (x: string, y: string) => {
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', x, y]);
    expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
  };
  const dropBackend = (pool: string) => {
    const f = path.join(pool, 'catalog.json');
    const cat = JSON.parse(fs.readFileSync(f, 'utf8'));
    delete cat.backends.b;
    fs.writeFileSync(f, JSON.stringify(cat, null, 2) + '\n');
  };

  for (const repl of ['async', 'sync'] as const) {
    it(`${repl}: secondary down when the primary starts, then its backend missing: every write reaches the secondary once it is back`, async () => {
      const { a, b, aPool } = await pair({ repl, onLinkLoss: 'degrade' });
      ok(aPool, ['volume', 'create', 'g', '64M', '--type', 'repl']);
      await until('link up', async () => (await status(a, 'g')).link === 'replicating');
      qio(a.uri('g'), 'write -P 0x11 0 8M');
      await until('in sync', inSync(a, 'g'));
      await until('covered', async () => (await status(a, 'g')).unflushedRegions === 0);
      // Clean stops: the region log keeps nothing (the secondary has everything).
      await a.stop();
      await b.stop();
      running.splice(0);

      // 1. The primary starts while the secondary is down.
      const a2 = await serve(aPool);
      qio(a2.uri('g'), 'write -P 0x21 1M 64k', 'write -P 0x22 20M 2M', 'write -z 4M 64k', 'discard 6M 1M');
      await until('link down', async () => (await status(a2, 'g')).replication_status === 'error');
      const b2 = await serve(b.pool);
      await until('resynced', inSync(a2, 'g'), 60_000);
      compare(a2.uri('g'), b2.uri('g'));
      await until('covered', async () => (await status(a2, 'g')).unflushedRegions === 0);
      await a2.stop();
      await b2.stop();
      running.splice(0);

      // 2. The primary starts with its backend missing from the catalog (no session at all).
      dropBackend(aPool);
      const a3 = await serve(aPool);
      expect((await status(a3, 'g')).replication_status).toBe('error');
      qio(a3.uri('g'), 'write -P 0x31 2M 64k', 'write -P 0x32 40M 3M', 'write -z 0 4k');
      const b3 = await serve(b.pool);
      ok(aPool, ['backend', 'add', 'b', `nbd+unix:///?socket=${b3.socket}`]); // through the running server
      await until('resynced after the backend came back', inSync(a3, 'g'), 60_000);
      compare(a3.uri('g'), b3.uri('g'));
      qio(b3.uri('g'), 'read -P 0x31 2M 64k', 'read -P 0x32 40M 3M', 'read -P 0x21 1M 64k');
    });
  }
});
