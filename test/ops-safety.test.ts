// Operator safety (issue 15, items 4-6): commands that free space work on a full
// filesystem, destructive commands refuse what would lose data unless told, and a refused
// command changes nothing. Judged from outside: the CLI's exit code and one-line error,
// the pool's files, df, and the volume's bytes read back through nbdsh (libnbd).
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CLI, cli, nbdsh, run, startServer, tempDir, type CliResult, type RunningServer, cliOk, exportSha256 } from './helpers/server.js';

const MiB = 1024 * 1024;

const running: RunningServer[] = [];
const mounts: string[] = [];

afterEach(async () => {
  for (const s of running.splice(0)) await s.stop();
});

afterAll(() => {
  // Mounts go even when a test failed half way (lazily if something still holds them).
  for (const m of mounts.splice(0)) {
    if (spawnSync('umount', [m]).status !== 0) spawnSync('umount', ['-l', m]);
    fs.rmSync(m, { recursive: true, force: true });
  }
});

async function serve(pool: string): Promise<RunningServer> {
  const s = await startServer({ pool });
  running.push(s);
  return s;
}

async function stop(s: RunningServer): Promise<void> {
  running.splice(running.indexOf(s), 1);
  expect(await s.stop()).toBe(0);
}

const ok = cliOk;

/** A refusal: exit 1 and exactly one line on stderr, with no stack trace or JSON log in it. */
function refused(r: CliResult, message: RegExp): void {
  expect(r.status, r.stderr + r.stdout).toBe(1);
  const lines = r.stderr.trim().split('\n');
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^snapblock: /);
  expect(lines[0]).toMatch(message);
  expect(r.stderr).not.toMatch(/"stack"|\n\s+at /);
}

/** A small filesystem mounted on a fresh directory (unmounted in afterAll): tmpfs, or ext4 on a loop device. */
function smallFilesystem(kind: 'tmpfs' | 'ext4', size: string): string {
  const dir = tempDir('fullfs-');
  const sh = (cmd: string, args: string[]) => {
    const r = spawnSync(cmd, args, { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  };
  if (kind === 'tmpfs') sh('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir]);
  else {
    const image = `${dir}.img`;
    sh('truncate', ['-s', size, image]);
    sh('mkfs.ext4', ['-q', image]);
    sh('mount', ['-o', 'loop', image, dir]);
    fs.rmSync(image); // the loop device keeps it until the unmount
  }
  mounts.push(dir);
  return dir;
}

/** Fill the filesystem to the brim: dd stops at ENOSPC (as root, ext4's reserve goes too). */
function fill(dir: string): void {
  spawnSync('dd', ['if=/dev/zero', `of=${path.join(dir, `fill-${Date.now()}`)}`, 'bs=1M'], { encoding: 'utf8' });
  spawnSync('dd', ['if=/dev/zero', `of=${path.join(dir, `fill-${Date.now()}-small`)}`, 'bs=1k'], { encoding: 'utf8' });
  // Full: not even one more block can be written (ext4 keeps ~1 MiB for itself).
  const probe = path.join(dir, 'probe');
  expect(() => fs.writeFileSync(probe, Buffer.alloc(4096))).toThrow(/ENOSPC/);
  fs.rmSync(probe, { force: true });
}

/** Free bytes, root's reserve included. */
function freeBytes(dir: string): number {
  const s = fs.statfsSync(dir);
  return s.bfree * s.bsize;
}

const unix = (s: RunningServer, exp: string) => `nbd+unix:///${exp}?socket=${s.socket}`;

/** sha256 of every byte of an export, read by libnbd in 4 MiB pieces. */
const sha = exportSha256;

function fill8(uri: string, byte: number, offset: number, length: number): void {
  nbdsh(uri, `h.pwrite(bytes([${byte}]) * ${length}, ${offset})\nh.flush()`);
}

/**
 * Names and contents of the files under dir, for "nothing was written". A journal counts
 * without its trailing zeroes: opening a volume (any command, check too) rewrites the
 * zeroes it keeps written ahead, and on a full ext4 fewer of them fit (FORMAT.md: they
 * only read as the end of the journal).
 */
function metadataImage(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) {
        let bytes = fs.readFileSync(p);
        if (e.name === 'journal') {
          let end = bytes.length;
          while (end > 0 && bytes[end - 1] === 0) end--;
          bytes = bytes.subarray(0, end);
        }
        out[path.relative(dir, p)] = createHash('sha256').update(bytes).digest('hex');
      }
    }
  };
  walk(dir);
  return out;
}

describe('a full filesystem', () => {
  it.each(['tmpfs', 'ext4'] as const)('offline, %s: check reads only and reports leftovers; check --repair removes them and says so; a failed create leaves nothing; snapshot delete and volume delete free space', async (kind) => {
    const fsDir = smallFilesystem(kind, '48m');
    const pool = path.join(fsDir, 'pool');
    ok(pool, ['volume', 'create', 'keep', '8M']);
    ok(pool, ['volume', 'create', 'old', '8M']);
    const s = await serve(pool);
    fill8(unix(s, 'keep'), 1, 0, 8 * MiB);
    ok(pool, ['snapshot', 'create', 'keep', 's1']);
    fill8(unix(s, 'keep'), 2, 0, 8 * MiB); // s1 now holds 8 MiB of its own
    fill8(unix(s, 'old'), 3, 0, 4 * MiB);
    ok(pool, ['snapshot', 'create', 'old', 'o1']);
    const keepSha = sha(unix(s, 'keep'));
    await stop(s);
    // What an interrupted create and an interrupted checkpoint write leave behind.
    fs.mkdirSync(path.join(pool, 'volumes', 'half.creating'));
    fs.writeFileSync(path.join(pool, 'volumes', 'keep', 'checkpoint.tmp-999999'), 'torn');
    fill(fsDir);

    const before = metadataImage(pool);
    const check = cli(pool, ['check']);
    expect(check.status, check.stderr).toBe(1);
    expect(check.stdout).toMatch(/problem: leftover volumes\/half\.creating .*check --repair/);
    expect(check.stdout).toMatch(/problem: leftover volumes\/keep\/checkpoint\.tmp-999999 /);
    expect(check.stderr).toBe('');
    const json = cli(pool, ['--json', 'check']);
    expect(json.status).toBe(1);
    expect(JSON.parse(json.stdout)).toMatchObject({ ok: false, repaired: [] });
    expect(JSON.parse(json.stdout).problems).toHaveLength(2);
    expect(json.stderr).toBe('');
    expect(metadataImage(pool)).toEqual(before); // check wrote nothing

    const repair = cli(pool, ['check', '--repair']);
    expect(repair.status, repair.stderr).toBe(0);
    expect(repair.stdout).toMatch(/repaired: removed volumes\/half\.creating \(left by a failed or interrupted create\)/);
    expect(repair.stdout).toMatch(/repaired: removed volumes\/keep\/checkpoint\.tmp-999999 /);
    expect(repair.stdout).toMatch(/pool OK/);
    expect(fs.readdirSync(path.join(pool, 'volumes')).sort()).toEqual(['keep', 'old']);
    expect(fs.readdirSync(path.join(pool, 'volumes', 'keep')).sort()).toEqual(['checkpoint', 'data', 'journal']);
    fill(fsDir);

    refused(cli(pool, ['volume', 'create', 'new', '1M']), /cannot create volume "new": no space left/);
    expect(fs.readdirSync(path.join(pool, 'volumes')).sort()).toEqual(['keep', 'old']);

    ok(pool, ['snapshot', 'delete', 'keep', 's1']);
    await expect.poll(() => freeBytes(fsDir), { timeout: 10_000 }).toBeGreaterThanOrEqual(7 * MiB);
    fill(fsDir);
    refused(cli(pool, ['volume', 'delete', 'old']), /refusing to delete volume "old": it has 1 snapshot\(s\) \(o1\).*--force/);
    ok(pool, ['volume', 'delete', 'old', '--force']);
    await expect.poll(() => freeBytes(fsDir), { timeout: 10_000 }).toBeGreaterThanOrEqual(4 * MiB);
    expect(fs.readdirSync(path.join(pool, 'volumes'))).toEqual(['keep']);
    expect(Object.keys(JSON.parse(fs.readFileSync(path.join(pool, 'catalog.json'), 'utf8')).volumes)).toEqual(['keep']);

    // Nothing of the volume that stayed was lost on the way.
    for (const f of fs.readdirSync(fsDir)) if (f.startsWith('fill-')) fs.rmSync(path.join(fsDir, f));
    const again = await serve(pool);
    expect(sha(unix(again, 'keep'))).toBe(keepSha);
    expect(JSON.parse(again.cli(['--json', 'check']).stdout)).toEqual({ ok: true, problems: [], repaired: [] });
  });

  it('live: snapshot delete and volume delete through the control API free the space at once, while the server runs', async () => {
    const fsDir = smallFilesystem('tmpfs', '40m');
    const pool = path.join(fsDir, 'pool');
    ok(pool, ['volume', 'create', 'big', '12M']);
    const s = await serve(pool);
    fill8(unix(s, 'big'), 7, 0, 12 * MiB);
    ok(pool, ['snapshot', 'create', 'big', 'before']);
    fill8(unix(s, 'big'), 8, 0, 4 * MiB);
    fill(fsDir);
    refused(s.cli(['volume', 'create', 'more', '1M']), /cannot create volume "more": no space left/);
    expect(fs.readdirSync(path.join(pool, 'volumes'))).toEqual(['big']);
    ok(pool, ['snapshot', 'delete', 'big', 'before']);
    await expect.poll(() => freeBytes(fsDir), { timeout: 10_000 }).toBeGreaterThanOrEqual(4 * MiB);
    fill(fsDir);
    const del = s.cli(['volume', 'delete', 'big']);
    expect(del.status, del.stderr).toBe(0);
    expect(freeBytes(fsDir)).toBeGreaterThanOrEqual(12 * MiB); // the server released its files
    expect(JSON.parse(s.cli(['--json', 'volume', 'list']).stdout)).toEqual([]);
    expect(fs.readdirSync(path.join(pool, 'volumes'))).toEqual([]);
    expect(JSON.parse(s.cli(['--json', 'check']).stdout).ok).toBe(true);
  });

  it('an interrupted delete (crash after the rename) is finished by check --repair, reported by check', () => {
    const pool = tempDir('deleting-');
    ok(pool, ['volume', 'create', 'gone', '1M']);
    fs.renameSync(path.join(pool, 'volumes', 'gone'), path.join(pool, 'volumes', 'gone.deleting'));
    const check = cli(pool, ['check']);
    expect(check.status).toBe(1);
    expect(check.stdout).toMatch(/volume "gone": its delete was interrupted .*check --repair/);
    const repair = cli(pool, ['check', '--repair']);
    expect(repair.stdout).toMatch(/repaired: finished the interrupted delete of volume "gone"/);
    expect(repair.status).toBe(0);
    expect(fs.readdirSync(path.join(pool, 'volumes'))).toEqual([]);
    expect(JSON.parse(cli(pool, ['--json', 'volume', 'list']).stdout)).toEqual([]);
  });
});

describe('guarded destruction', () => {
  /** The same refusals offline and through the control API. */
  function guards(run: (args: string[]) => CliResult): void {
    expect(run(['volume', 'create', 'p', '4M']).status).toBe(0);
    expect(run(['snapshot', 'create', 'p', 's']).status).toBe(0);
    refused(run(['volume', 'delete', 'p']), /refusing to delete volume "p": it has 1 snapshot\(s\) \(s\): delete them first \(snapblock snapshot delete p s\); or pass --force/);
    expect(run(['volume', 'clone', 'p', 's', 'c']).status).toBe(0);
    refused(run(['volume', 'delete', 'p']), /it has clones \(c\) that read through its snapshots: delete them first \(snapblock volume delete c\)/);
    refused(run(['volume', 'delete', 'p', '--force']), /it has clones \(c\)/); // --force never breaks a clone
    refused(run(['snapshot', 'delete', 'p', 's']), /refusing to delete snapshot "p@s": it has clones \(c\) that read through it; delete them first/);
    expect(JSON.parse(run(['--json', 'snapshot', 'list', 'p']).stdout).map((x: { name: string }) => x.name)).toEqual(['s']);
    expect(run(['volume', 'delete', 'c']).status).toBe(0);
    expect(run(['volume', 'delete', 'p', '--force']).status).toBe(0);
    expect(JSON.parse(run(['--json', 'volume', 'list']).stdout)).toEqual([]);
  }

  it('offline', () => {
    const pool = tempDir('guards-');
    guards((args) => cli(pool, args));
  });

  it('through the control API', async () => {
    const s = await serve(tempDir('guards-live-'));
    guards((args) => s.cli(args));
  });

  it('connected clients: refused even with --force, for the volume and for a snapshot export', async () => {
    const s = await serve(tempDir('guards-conn-'));
    ok(s.pool, ['volume', 'create', 'busy', '4M']);
    ok(s.pool, ['snapshot', 'create', 'busy', 'then']);
    const { spawn } = await import('node:child_process');
    const holders = ['busy', 'busy@then'].map((e) => spawn('nbdsh', ['-u', unix(s, e), '-c', 'import time; time.sleep(300)'], { env: { ...process.env, PATH: `/usr/bin:${process.env.PATH}` } }));
    try {
      await expect.poll(() => JSON.parse(s.cli(['--json', 'volume', 'info', 'busy']).stdout).connections, { timeout: 20_000 }).toBe(2);
      refused(s.cli(['volume', 'delete', 'busy', '--force']), /it has 2 open connection\(s\).*disconnect them first/);
      refused(s.cli(['snapshot', 'delete', 'busy', 'then']), /refusing to delete snapshot "busy@then": it is exported to 1 connected client/);
    } finally {
      await Promise.all(holders.map((h) => new Promise((r) => (h.exitCode !== null ? r(null) : (h.once('exit', r), h.kill())))));
    }
    expect(JSON.parse(s.cli(['--json', 'snapshot', 'list', 'busy']).stdout)).toHaveLength(1);
  });

  it('an active replication pair: refused on the primary and on the secondary unless --force', async () => {
    const b = await serve(tempDir('guards-b-'));
    const aPool = tempDir('guards-a-');
    ok(aPool, ['backend', 'add', 'b', `nbd+unix:///?socket=${b.socket}`]);
    ok(aPool, ['replication', 'type-create', 'repl', '--replication', 'async', '--backend-id', 'b']);
    const a = await serve(aPool);
    ok(aPool, ['volume', 'create', 'v', '8M', '--type', 'repl']);
    fill8(unix(a, 'v'), 9, 0, MiB);
    await expect.poll(() => JSON.parse(a.cli(['--json', 'replication', 'status', 'v']).stdout)[0].link, { timeout: 30_000 }).toBe('replicating');
    refused(a.cli(['volume', 'delete', 'v']), /it is the primary of an active replication pair \(async, backend b\): run `snapblock replication disable v` first; or pass --force/);
    refused(b.cli(['volume', 'delete', 'v']), /refusing to delete volume "v": it is the secondary of an active replication pair \(async\): run `snapblock replication disable v` first; or pass --force/);
    expect(a.cli(['volume', 'delete', 'v', '--force']).status).toBe(0);
    expect(JSON.parse(a.cli(['--json', 'volume', 'list']).stdout)).toEqual([]);
  });
});

describe('a refused command changes nothing', () => {
  let s: RunningServer;
  let state: () => { sha: string; size: number; snapshots: string[]; volumes: string[] };
  beforeAll(async () => {
    s = await startServer({ pool: tempDir('refused-') });
    ok(s.pool, ['volume', 'create', 'dn', '16M']);
    nbdsh(unix(s, 'dn'), 'import os\nh.pwrite(os.urandom(3 << 20), 1 << 20)\nh.pwrite(os.urandom(4096), 15 << 20)\nh.flush()');
    ok(s.pool, ['snapshot', 'create', 'dn', 's0']);
    fill8(unix(s, 'dn'), 0x5a, 2 * MiB, MiB);
    state = () => ({
      sha: sha(unix(s, 'dn')),
      size: Number(run('nbdinfo', ['--size', unix(s, 'dn')]).stdout.trim()),
      snapshots: JSON.parse(s.cli(['--json', 'snapshot', 'list', 'dn']).stdout).map((x: { name: string }) => x.name),
      volumes: JSON.parse(s.cli(['--json', 'volume', 'list']).stdout).map((x: { name: string }) => x.name),
    });
  });
  afterAll(async () => {
    await s?.stop();
  });

  const sb = (args: string[], input?: Buffer): CliResult => {
    const r = spawnSync(process.execPath, [CLI, '--pool', s.pool, ...args], { env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'warn' }, input, encoding: 'utf8' });
    return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  };
  const name = (tag: 'f' | 't', n: string) => {
    const b = Buffer.alloc(5 + Buffer.byteLength(n));
    b.write(tag, 0, 'latin1');
    b.writeUInt32LE(Buffer.byteLength(n), 1);
    b.write(n, 5);
    return b;
  };
  const u64 = (tag: string, ...v: number[]) => {
    const b = Buffer.alloc(1 + 8 * v.length);
    b.write(tag, 0, 'latin1');
    v.forEach((x, i) => b.writeBigUInt64LE(BigInt(x), 1 + 8 * i));
    return b;
  };
  const BANNER = Buffer.from('rbd diff v1\n');

  function unchanged(what: () => void): void {
    const before = state();
    what();
    expect(state()).toEqual(before);
  }

  it('import-diff of a to-snapshot name snapblock cannot create (rbd can): refused before the resize and the write', () => {
    unchanged(() => {
      const stream = Buffer.concat([BANNER, name('t', 'a b:c'), u64('s', 32 * MiB), u64('w', 0, 4096), Buffer.alloc(4096, 0xee), Buffer.from('e')]);
      refused(sb(['import-diff', '-', 'dn'], stream), /invalid snapshot name "a b:c".*dn was not changed/);
    });
  });

  it('import-diff of a truncated stream (stdin and file): refused before anything is written', () => {
    const stream = Buffer.concat([BANNER, name('f', 's0'), name('t', 'next'), u64('s', 32 * MiB), u64('w', 0, 4096), Buffer.alloc(4096, 0xee), u64('w', 8 * MiB, 65536), Buffer.alloc(1000, 0xee)]);
    unchanged(() => refused(sb(['import-diff', '-', 'dn'], stream), /rbd diff truncated at byte .*dn was not changed/));
    const file = path.join(s.pool, 'truncated.diff');
    fs.writeFileSync(file, stream);
    unchanged(() => refused(sb(['import-diff', file, 'dn']), /truncated.*dn was not changed/));
    // the same stream completed is applied whole
    fs.writeFileSync(file, Buffer.concat([stream.subarray(0, stream.length - 1000), Buffer.alloc(65536, 0xee), Buffer.from('e')]));
    expect(sb(['import-diff', file, 'dn']).status).toBe(0);
    expect(state().size).toBe(32 * MiB);
    expect(state().snapshots).toEqual(['s0', 'next']);
    ok(s.pool, ['snapshot', 'delete', 'dn', 'next']);
  });

  it('import-diff: missing start snapshot, records past the end, a bad size', () => {
    unchanged(() => refused(sb(['import-diff', '-', 'dn'], Buffer.concat([BANNER, name('f', 'nope'), name('t', 'x'), u64('w', 0, 4096), Buffer.alloc(4096), Buffer.from('e')])), /start snapshot 'nope' does not exist/));
    unchanged(() => refused(sb(['import-diff', '-', 'dn'], Buffer.concat([BANNER, name('t', 'x'), u64('z', 64 * MiB, 4096), Buffer.from('e')])), /past the end of dn/));
    unchanged(() => refused(sb(['import-diff', '-', 'dn'], Buffer.concat([BANNER, name('t', 'x'), u64('s', 1000), Buffer.from('e')])), /not a multiple of 512/));
  });

  it('backup restore into an existing name or of a backup that does not exist', () => {
    ok(s.pool, ['volume', 'create', 'src', '4M']);
    fill8(unix(s, 'src'), 0x42, 0, MiB);
    const id = JSON.parse(ok(s.pool, ['--json', 'backup', 'create', 'src', '--progress', 'none'])).id as string;
    unchanged(() => refused(sb(['backup', 'restore', id, 'dn', '--progress', 'none']), /already exists/));
    unchanged(() => expect(sb(['backup', 'restore', 'no-such-backup', 'fresh', '--progress', 'none']).status).toBe(1));
    ok(s.pool, ['volume', 'delete', 'src', '--force']);
  });

  it('resize to an invalid size, clone with bad names or a missing snapshot, rollback to a missing snapshot', () => {
    unchanged(() => {
      refused(sb(['volume', 'resize', 'dn', '1000']), /not a multiple of 512/);
      expect(sb(['volume', 'resize', 'dn', '0']).status).toBe(1);
      expect(sb(['volume', 'resize', 'dn', '12Q']).status).toBe(1);
      refused(sb(['volume', 'resize', 'dn', '1P']), /exceeds the maximum/);
      refused(sb(['volume', 'clone', 'dn', 's0', 'bad name']), /invalid volume name "bad name"/);
      refused(sb(['volume', 'clone', 'dn', 's0', 'dn']), /already exists/);
      refused(sb(['volume', 'clone', 'dn', 'missing', 'c1']), /no snapshot named "missing"/);
      refused(sb(['volume', 'clone', 'nope', 's0', 'c1']), /no volume named "nope"/);
      refused(sb(['snapshot', 'rollback', 'dn', 'missing']), /no snapshot named "missing"/);
    });
  });
});

describe('a deleted volume leaves nothing a new one of the same name would inherit', () => {
  it('its replication region log and disk state go with it; other volumes keep theirs', () => {
    const pool = tempDir('sidecar-');
    ok(pool, ['volume', 'create', 'x', '4M']);
    ok(pool, ['volume', 'create', 'x.y', '4M']);
    const repl = path.join(pool, 'replication');
    fs.mkdirSync(repl, { recursive: true });
    for (const f of ['x.rlog', 'x.state', 'x.y.rlog', 'xy.rlog']) fs.writeFileSync(path.join(repl, f), 'left by replication');
    ok(pool, ['volume', 'delete', 'x']);
    expect(fs.readdirSync(repl).sort()).toEqual(['x.y.rlog', 'xy.rlog']);
  });
});
