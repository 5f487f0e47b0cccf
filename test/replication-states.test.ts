// Disk states of replicated copies (UpToDate / Inconsistent / Outdated) and split brain,
// with two real `snapblock serve` processes (primary A, secondary B) on this machine. The
// data is judged by independent clients (qemu-io, nbdsh, qemu-img) reading the exports.
import { spawn, type ChildProcess } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { cli, nbdsh, run, startServer, tempDir, type RunningServer, cliOk, exportSha256, qemuIo, until } from './helpers/server.js';

const MiB = 1024 * 1024;
process.env.SNAPBLOCK_REPL_TIMEOUT_MS = '2000';

const running: RunningServer[] = [];
const cleanups: Array<() => void> = [];
afterEach(async () => {
  for (const s of running.splice(0)) await s.stop();
  for (const f of cleanups.splice(0)) f();
});

/** `snapblock serve` on a pool, with extra environment for that server only. */
async function serve(pool?: string, env: Record<string, string> = {}): Promise<RunningServer> {
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  Object.assign(process.env, env);
  try {
    const s = await startServer({ pool });
    running.push(s);
    return s;
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

const ok = cliOk;

const qio = qemuIo;

const sha = exportSha256;

type Status = Record<string, unknown> & { replication_status: string; syncProgress?: { phase: string; done: number; total: number } };

/** `replication status VOLUME --json` through the server's control API. */
async function status(srv: RunningServer, vol: string): Promise<Status> {
  const body = JSON.stringify({ op: 'replication.status', args: { volume: vol } });
  return new Promise<Status>((resolve, reject) => {
    const req = http.request({ socketPath: path.join(srv.pool, 'control.sock'), method: 'POST', path: '/v1/call', agent: false, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), connection: 'close' } }, (res) => {
      let d = '';
      res.on('data', (c) => (d += c));
      res.on('end', () => ((res.statusCode ?? 500) < 400 ? resolve(JSON.parse(d)[0]) : reject(new Error(d))));
    });
    req.on('error', reject);
    req.end(body);
  });
}

const inSync = (srv: RunningServer, vol: string) => async () => {
  const s = await status(srv, vol);
  return s.link === 'replicating' && s.lagBytes === 0;
};

/**
 * The network between A and B: a forwarder process (so that the test's own blocking calls
 * never stall it) listening on a Unix socket and piping every connection to B's. Cutting
 * kills it: every connection through it dies and new ones are refused, while both servers
 * keep running, as in a real partition. Healing starts it again.
 */
async function linkBetween(target: string): Promise<{ path: string; cut(): Promise<void>; heal(): Promise<void> }> {
  const at = path.join(tempDir('link-'), 'link.sock');
  const script = `
const net = require('node:net');
const [at, target] = process.argv.slice(1);
require('node:fs').rmSync(at, { force: true });
net.createServer((from) => {
  const to = net.connect(target);
  for (const s of [from, to]) s.on('error', () => { from.destroy(); to.destroy(); });
  from.pipe(to).pipe(from);
}).listen(at, () => console.log('up'));`;
  let proc: ChildProcess | undefined;
  const start = async () => {
    const p = spawn(process.execPath, ['-e', script, at, target], { stdio: ['ignore', 'pipe', 'inherit'] });
    proc = p;
    await new Promise<void>((resolve, reject) => {
      p.stdout!.once('data', () => resolve());
      p.once('exit', (code) => reject(new Error(`link forwarder exited with ${code}`)));
    });
  };
  const stop = async () => {
    const p = proc;
    proc = undefined;
    if (!p || p.exitCode !== null) return;
    const gone = new Promise((r) => p.once('exit', r));
    p.kill('SIGKILL');
    await gone;
  };
  await start();
  cleanups.push(() => void stop());
  return { path: at, cut: stop, heal: start };
}

describe('disk states: no promotion of a half-synced copy', () => {
  it('kill -9 of the primary during the initial sync: the secondary is Inconsistent; failover refuses it without --force and changes nothing; --force promotes', async () => {
    const b = await serve();
    const aPool = tempDir('pool-a-');
    ok(aPool, ['backend', 'add', 'b', `nbd+unix:///?socket=${b.socket}`]);
    ok(aPool, ['volume', 'create', 'big', '256M']);
    // The initial sync copies the 32 MiB of data at 2 MiB/s: it is surely running at the kill.
    const a = await serve(aPool, { SNAPBLOCK_REPL_RESYNC_RATE: String(2 * MiB) });
    qio(a.uri('big'), 'write -P 0x5c 0 32M');
    ok(aPool, ['replication', 'enable', 'big', '--mode', 'sync', '--backend-id', 'b']);
    await until('the initial sync under way, as the secondary reports it', async () => {
      const s = await status(b, 'big');
      return s.disk === 'Inconsistent' && (s.syncProgress?.done ?? 0) > 0;
    });
    await a.kill9();
    running.splice(running.indexOf(a), 1);

    const st = JSON.parse(ok(b.pool, ['replication', 'status', 'big', '--json']))[0] as Status;
    expect(st).toMatchObject({ role: 'secondary', disk: 'Inconsistent', syncProgress: { phase: 'initial' } });
    expect(st.syncProgress!.done).toBeGreaterThan(0);
    expect(st.syncProgress!.done).toBeLessThan(st.syncProgress!.total);
    const text = ok(b.pool, ['replication', 'status', 'big']);
    expect(text).toMatch(/disk Inconsistent, initial sync .* of .* \(\d+%\)/);
    console.log(`secondary at the kill: ${text.trim().split('\n')[0]}`);

    const before = sha(b.uri('big'));
    const refused = cli(b.pool, ['failover', 'big']);
    expect(refused.status, refused.stdout).toBe(1);
    expect(refused.stderr).toMatch(/Inconsistent/);
    expect(refused.stderr).toMatch(/copied [\d.]+ MiB of 32\.0 MiB \(\d+%\)/);
    expect(refused.stderr).toMatch(/--force/);
    expect(await status(b, 'big')).toMatchObject({ role: 'secondary', replication_status: 'enabled', disk: 'Inconsistent' });
    expect(sha(b.uri('big'))).toBe(before);
    const w = run('qemu-io', ['-f', 'raw', b.uri('big'), '-c', 'write -P 1 0 4k']);
    expect(w.stdout + w.stderr).toMatch(/Operation not permitted/); // still a secondary

    const forced = JSON.parse(ok(b.pool, ['failover', 'big', '--force', '--json']));
    expect(forced).toMatchObject({ role: 'primary', replication_status: 'failed-over' });
    // What --force warned about: the promoted copy does not hold what the primary had.
    const check = run('qemu-io', ['-f', 'raw', b.uri('big'), '-c', 'read -P 0x5c 0 32M']);
    expect(check.stdout).toMatch(/Pattern verification failed/);
    qio(b.uri('big'), 'write -P 0x77 100M 1M', 'read -P 0x77 100M 1M');

    // The old primary comes back: its data is not silently overwritten by the half-synced copy.
    const a2 = await serve(aPool);
    await until('the old primary sees the promotion', async () => (await status(a2, 'big')).replication_status === 'failed-over');
    const fb = cli(aPool, ['failback', 'big']);
    expect(fb.status).toBe(1);
    expect(fb.stderr).toMatch(/split brain.*promoted with --force while Inconsistent/s);
    JSON.parse(ok(aPool, ['failback', 'big', '--discard-changes-on', 'remote', '--json']));
    await until('replicating again', inSync(a2, 'big'));
    qio(b.uri('big'), 'read -P 0x5c 0 32M', 'read -P 0 100M 1M');
    expect(await status(b, 'big')).toMatchObject({ role: 'secondary', disk: 'UpToDate' });
  }, 60_000);
});

describe('disk states survive a kill -9 of the secondary', () => {
  it('the secondary killed during the initial sync is still Inconsistent when read back; once back, the sync completes and it is UpToDate', async () => {
    const b = await serve();
    const aPool = tempDir('pool-a-');
    ok(aPool, ['backend', 'add', 'b', `nbd+unix:///?socket=${b.socket}`]);
    ok(aPool, ['volume', 'create', 'v', '128M']);
    const a = await serve(aPool, { SNAPBLOCK_REPL_RESYNC_RATE: String(4 * MiB) });
    qio(a.uri('v'), 'write -P 0x3c 0 16M');
    ok(aPool, ['replication', 'enable', 'v', '--mode', 'async', '--backend-id', 'b']);
    await until('the initial sync under way', async () => ((await status(b, 'v')).syncProgress?.done ?? 0) > 0);
    await b.kill9();
    running.splice(running.indexOf(b), 1);
    // Read back from the pool itself (no server): what was persisted.
    const st = JSON.parse(ok(b.pool, ['replication', 'status', 'v', '--json']))[0] as Status;
    expect(st).toMatchObject({ role: 'secondary', disk: 'Inconsistent', syncProgress: { phase: 'initial' } });
    expect(st.syncProgress!.done).toBeLessThan(st.syncProgress!.total);
    expect(cli(b.pool, ['failover', 'v']).status).toBe(1);
    const b2 = await serve(b.pool);
    await until('sync completed after the secondary came back', async () => (await status(b2, 'v')).disk === 'UpToDate', 30_000);
    await until('in sync', inSync(a, 'v'));
    expect(sha(b2.uri('v'))).toBe(sha(a.uri('v')));
  }, 60_000);
});

describe('split brain', () => {
  it('async pair partitioned, both sides written: failback is refused; --discard-changes-on resolves it, the kept side wins byte for byte', async () => {
    const b = await serve();
    const link = await linkBetween(b.socket);
    const aPool = tempDir('pool-a-');
    ok(aPool, ['backend', 'add', 'b', `nbd+unix:///?socket=${link.path}`]);
    ok(aPool, ['replication', 'type-create', 'repl', '--replication', 'async', '--backend-id', 'b']);
    const a = await serve(aPool);
    const vols = ['keep-b', 'keep-a'];
    for (const v of vols) {
      ok(aPool, ['volume', 'create', v, '32M', '--type', 'repl']);
      await until('link up', async () => (await status(a, v)).link === 'replicating');
      qio(a.uri(v), 'write -P 0x11 0 8M');
      await until('in sync', inSync(a, v));
      expect(await status(b, v)).toMatchObject({ role: 'secondary', disk: 'UpToDate' });
    }

    await link.cut();
    for (const v of vols) {
      await until('link loss noticed', async () => (await status(a, v)).replication_status === 'error');
      // The partitioned primary keeps acknowledging writes: they are written apart.
      qio(a.uri(v), 'write -P 0xa1 1M 1M');
      expect((await status(a, v)).writtenApartSince).toEqual(expect.any(String));
      // The secondary knows its async link ended uncleanly: Outdated, promoted only with --force.
      await until('secondary outdated', async () => (await status(b, v)).disk === 'Outdated');
      const r = cli(b.pool, ['failover', v]);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/Outdated.*--force/s);
      ok(b.pool, ['failover', v, '--force']);
      qio(b.uri(v), 'write -P 0xb1 2M 1M');
      expect((await status(b, v)).writtenApartSince).toEqual(expect.any(String));
    }
    await link.heal();
    const aData: Record<string, string> = {};
    const bData: Record<string, string> = {};
    for (const v of vols) {
      await until('the old primary sees the promotion', async () => (await status(a, v)).replication_status === 'failed-over');
      aData[v] = sha(a.uri(v));
      bData[v] = sha(b.uri(v));
      expect(aData[v]).not.toBe(bData[v]);
      const refused = cli(aPool, ['failback', v]);
      expect(refused.status, refused.stdout).toBe(1);
      expect(refused.stderr).toMatch(/split brain/);
      expect(refused.stderr).toMatch(/--discard-changes-on local/);
      expect(refused.stderr).toMatch(/--discard-changes-on remote/);
      // Nothing changed on either side.
      expect(await status(b, v)).toMatchObject({ role: 'primary', replication_status: 'failed-over' });
      expect(await status(a, v)).toMatchObject({ role: 'secondary', replication_status: 'failed-over' });
      expect(sha(a.uri(v))).toBe(aData[v]);
      expect(sha(b.uri(v))).toBe(bData[v]);
    }

    // Discard this pool's changes: B's data comes back here.
    const fb1 = JSON.parse(ok(aPool, ['failback', 'keep-b', '--discard-changes-on', 'local', '--json']));
    expect(fb1).toMatchObject({ kept: 'remote', role: 'primary', replication_status: 'enabled' });
    // Discard B's changes: this pool's data goes to B.
    const fb2 = JSON.parse(ok(aPool, ['failback', 'keep-a', '--discard-changes-on', 'remote', '--json']));
    expect(fb2).toMatchObject({ kept: 'local', role: 'primary', replication_status: 'enabled' });
    for (const v of vols) {
      await until('replicating again', inSync(a, v));
      expect(await status(b, v)).toMatchObject({ role: 'secondary', disk: 'UpToDate' });
      expect((await status(a, v)).writtenApartSince).toBeUndefined();
      const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a.uri(v), b.uri(v)]);
      expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
    }
    expect(sha(a.uri('keep-b'))).toBe(bData['keep-b']);
    expect(sha(b.uri('keep-b'))).toBe(bData['keep-b']);
    qio(a.uri('keep-b'), 'read -P 0x11 1M 1M', 'read -P 0xb1 2M 1M');
    expect(sha(a.uri('keep-a'))).toBe(aData['keep-a']);
    expect(sha(b.uri('keep-a'))).toBe(aData['keep-a']);
    qio(b.uri('keep-a'), 'read -P 0xa1 1M 1M', 'read -P 0x11 2M 1M');
  }, 60_000);

  it('only the partitioned primary was written (the promoted copy was not): failback keeps those writes instead of overwriting them', async () => {
    const b = await serve();
    const link = await linkBetween(b.socket);
    const aPool = tempDir('pool-a-');
    ok(aPool, ['backend', 'add', 'b', `nbd+unix:///?socket=${link.path}`]);
    ok(aPool, ['replication', 'type-create', 'repl', '--replication', 'async', '--backend-id', 'b']);
    const a = await serve(aPool);
    ok(aPool, ['volume', 'create', 'v', '32M', '--type', 'repl']);
    await until('link up', async () => (await status(a, 'v')).link === 'replicating');
    qio(a.uri('v'), 'write -P 0x11 0 4M');
    await until('in sync', inSync(a, 'v'));
    await link.cut();
    await until('link loss noticed', async () => (await status(a, 'v')).replication_status === 'error');
    qio(a.uri('v'), 'write -P 0xa2 1M 1M');
    await until('secondary outdated', async () => (await status(b, 'v')).disk === 'Outdated');
    ok(b.pool, ['failover', 'v', '--force']); // promoted, never written
    await link.heal();
    await until('the old primary sees the promotion', async () => (await status(a, 'v')).replication_status === 'failed-over');
    const fb = JSON.parse(ok(aPool, ['failback', 'v', '--json']));
    expect(fb).toMatchObject({ kept: 'local', replication_status: 'enabled' });
    await until('replicating again', inSync(a, 'v'));
    qio(b.uri('v'), 'read -P 0xa2 1M 1M', 'read -P 0x11 0 1M');
    qio(a.uri('v'), 'read -P 0xa2 1M 1M');
  }, 60_000);
});
