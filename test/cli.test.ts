// The CLI as operators and scripts use it: offline on a pool, and live through the
// control API while the server exports other volumes.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { cli, run, startServer, tempDir, type RunningServer } from './helpers/server.js';

const MiB = 1024 * 1024;

describe('offline pool', () => {
  const pool = tempDir('cli-');

  it('create / list / info / resize / delete with --json', () => {
    expect(cli(pool, ['volume', 'create', 'v1', '10M']).status).toBe(0);
    const list = JSON.parse(cli(pool, ['--json', 'volume', 'list']).stdout);
    expect(list.map((v: { name: string; size: number }) => [v.name, v.size])).toEqual([['v1', 10 * MiB]]);
    const info = JSON.parse(cli(pool, ['volume', 'info', 'v1', '--json']).stdout);
    expect(info).toMatchObject({ name: 'v1', size: 10 * MiB, allocated: 0, connections: 0 });
    expect(cli(pool, ['volume', 'resize', 'v1', '20M']).status).toBe(0);
    expect(JSON.parse(cli(pool, ['volume', 'info', 'v1', '--json']).stdout).size).toBe(20 * MiB);
    const human = cli(pool, ['volume', 'list']);
    expect(human.stdout).toMatch(/^NAME\s+SIZE\s+ALLOCATED/);
    expect(human.stdout).toMatch(/v1\s+20\.0 MiB\s+0 B/);
    expect(cli(pool, ['volume', 'delete', 'v1']).status).toBe(0);
    expect(JSON.parse(cli(pool, ['--json', 'volume', 'list']).stdout)).toEqual([]);
    expect(fs.readdirSync(path.join(pool, 'volumes'))).toEqual([]);
  });

  it('refuses shrinking without --force and does it with --force', () => {
    cli(pool, ['volume', 'create', 'v2', '8M']);
    const r = cli(pool, ['volume', 'resize', 'v2', '4M']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/--force/);
    expect(cli(pool, ['volume', 'resize', 'v2', '4M', '--force']).status).toBe(0);
    expect(JSON.parse(cli(pool, ['volume', 'info', 'v2', '--json']).stdout).size).toBe(4 * MiB);
  });

  it('bad input gets a clear error and a non-zero exit code', () => {
    cli(pool, ['volume', 'create', 'v2', '8M']); // exists already unless run alone
    const cases: Array<[string[], number, RegExp]> = [
      [['volume', 'create', '../etc', '1G'], 1, /invalid volume name/],
      [['volume', 'create', 'a/b', '1G'], 1, /invalid volume name/],
      [['volume', 'create', 'snap@x', '1G'], 1, /invalid volume name/],
      [['volume', 'create', 'ok', '12Q'], 1, /invalid size "12Q"/],
      [['volume', 'create', 'ok', '-5'], 1, /invalid size|Not enough|Unknown/],
      [['volume', 'create', 'ok', '1000'], 1, /multiple of 512/],
      [['volume', 'create', 'v2', '1M'], 1, /already exists/],
      [['volume', 'info', 'missing'], 1, /no volume named "missing"/],
      [['volume', 'delete', 'missing'], 1, /no volume named "missing"/],
      [['volume', 'create', 'onlyname'], 2, /Not enough non-option arguments/],
      [['volume', 'frobnicate'], 2, /Unknown argument|Unknown command/],
      [['serve', '--listen', 'nonsense:port'], 2, /invalid --listen/],
      [['serve', '--tls', 'require'], 2, /--tls require needs/],
    ];
    for (const [args, code, msg] of cases) {
      const r = cli(pool, args);
      expect(r.status, args.join(' ')).toBe(code);
      expect(r.stderr, args.join(' ')).toMatch(msg);
    }
    // nothing half-made
    expect(fs.readdirSync(path.join(pool, 'volumes')).sort()).toEqual(['v2']);
  });

  it('--help works everywhere', () => {
    for (const args of [['--help'], ['volume', '--help'], ['volume', 'create', '--help'], ['serve', '--help'], ['check', '--help']]) {
      const r = cli(pool, args);
      expect(r.status, args.join(' ')).toBe(0);
      expect(r.stdout).toMatch(/snapblock/);
    }
  });

  it('check passes on a clean pool and finds planted problems', () => {
    expect(cli(pool, ['check']).stdout).toMatch(/pool OK/);
    fs.writeFileSync(path.join(pool, 'volumes', 'stray.img'), 'x');
    fs.mkdirSync(path.join(pool, 'volumes', 'half.creating'));
    // check reports what an interrupted create or delete left and changes nothing ...
    const r = cli(pool, ['--json', 'check']);
    expect(r.status).toBe(1);
    expect(JSON.parse(r.stdout)).toEqual({
      ok: false,
      problems: [
        'leftover volumes/half.creating (left by a failed or interrupted create); `snapblock check --repair` removes it',
        'leftover volumes/stray.img (not in the catalog); `snapblock check --repair` removes it',
      ],
      repaired: [],
    });
    expect(fs.readdirSync(path.join(pool, 'volumes')).sort()).toEqual(['half.creating', 'stray.img', 'v2']);
    // ... check --repair removes it and says so
    const fixed = cli(pool, ['--json', 'check', '--repair']);
    expect(fixed.status).toBe(0);
    expect(JSON.parse(fixed.stdout).repaired).toEqual(['removed volumes/half.creating (left by a failed or interrupted create)', 'removed volumes/stray.img (not in the catalog)']);
    expect(fs.readdirSync(path.join(pool, 'volumes')).sort()).toEqual(['v2']);
    fs.rmSync(path.join(pool, 'volumes', 'v2', 'checkpoint'));
    const bad = cli(pool, ['check']);
    expect(bad.status).toBe(1);
    expect(bad.stdout).toMatch(/volume "v2": cannot be opened/);
    fs.rmSync(path.join(pool, 'volumes', 'v2'), { recursive: true });
    const gone = cli(pool, ['check']);
    expect(gone.stdout).toMatch(/directory volumes\/v2 is missing/);
  });

  it('a corrupt catalog is reported, never overwritten', () => {
    const p = tempDir('corrupt-');
    cli(p, ['volume', 'create', 'x', '1M']);
    fs.writeFileSync(path.join(p, 'catalog.json'), '{"format":"snapblock-pool","version":2,"types":{},"volumes":{"x":{"name":"x"}}}');
    const r = cli(p, ['volume', 'list']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/catalog .* is invalid/);
    expect(fs.existsSync(path.join(p, 'volumes', 'x', 'data'))).toBe(true);
  });
});

describe('live pool through the control API', () => {
  let srv: RunningServer;
  beforeAll(async () => {
    srv = await startServer({ volumes: { busy: '32M' } });
  });
  afterAll(async () => {
    await srv.stop();
  });

  it('the control socket is private to the owner', () => {
    expect(fs.statSync(path.join(srv.pool, 'control.sock')).mode & 0o777).toBe(0o600);
  });

  it('volumes are created, resized and deleted while another is being served', async () => {
    // Keep "busy" under load from a real client the whole time.
    const load = run('nbdsh', ['-u', srv.uri('busy'), '-c', 'import time\nfor i in range(50): h.pwrite(bytes([i]) * 65536, i * 65536)\nh.flush()']);
    expect(load.status, load.stderr).toBe(0);
    expect(srv.cli(['volume', 'create', 'fresh', '8M']).status).toBe(0);
    const info = run('nbdinfo', ['--size', srv.uri('fresh')]);
    expect(info.stdout.trim()).toBe(String(8 * MiB));
    expect(srv.cli(['volume', 'resize', 'fresh', '16M']).status).toBe(0);
    expect(run('nbdinfo', ['--size', srv.uri('fresh')]).stdout.trim()).toBe(String(16 * MiB));
    expect(srv.cli(['volume', 'delete', 'fresh']).status).toBe(0);
    expect(run('nbdinfo', [srv.uri('fresh')]).status).not.toBe(0);
    const check = run('nbdsh', ['-u', srv.uri('busy'), '-c', 'print(all(h.pread(65536, i * 65536) == bytes([i]) * 65536 for i in range(50)))']);
    expect(check.stdout.trim()).toBe('True');
    const list = JSON.parse(srv.cli(['--json', 'volume', 'list']).stdout);
    expect(list.map((v: { name: string }) => v.name)).toEqual(['busy']);
    expect(list[0].allocated).toBeGreaterThanOrEqual(50 * 65536);
  });

  it('a volume with a connected client cannot be deleted or shrunk', async () => {
    const { spawn } = await import('node:child_process');
    // Holds a connection until killed, however slow the machine is.
    const holder = spawn('nbdsh', ['-u', srv.uri('busy'), '-c', 'import time; time.sleep(300)'], { env: { ...process.env, PATH: `/usr/bin:${process.env.PATH}` } });
    const holderExited = new Promise((r) => holder.once('exit', r));
    for (let i = 0; i < 200 && JSON.parse(srv.cli(['--json', 'volume', 'info', 'busy']).stdout).connections === 0; i++) await new Promise((r) => setTimeout(r, 100));
    const del = srv.cli(['volume', 'delete', 'busy']);
    expect(del.status).toBe(1);
    expect(del.stderr).toMatch(/open connection/);
    const shrink = srv.cli(['volume', 'resize', 'busy', '16M', '--force']);
    expect(shrink.status).toBe(1);
    expect(shrink.stderr).toMatch(/open connection/);
    holder.kill();
    await holderExited;
  });

  it('a second server on the same pool is refused', () => {
    const r = cli(srv.pool, ['serve', '--listen', '127.0.0.1:0']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/pool is in use by process/);
  });
});
