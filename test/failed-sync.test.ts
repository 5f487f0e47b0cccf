// A failed sync poisons the volume until it is reopened (docs/FORMAT.md): once an fdatasync
// has failed, the kernel may have dropped the pages it was to write, so no later FLUSH may
// report success. Made real with a thin device that runs out of space: the pool lives on an
// ext4 whose loop device is a 256 MiB sparse file on a 40 MiB tmpfs, so writes land in the
// page cache and writeback fails (EIO) once the tmpfs is full, as on an overcommitted
// thin pool or SAN LUN. Judged by libnbd (nbdsh) and `snapblock check`.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { cli, nbdsh, startServer, tempDir, type RunningServer } from './helpers/server.js';

const MIB = 1024 * 1024;

let srv: RunningServer | undefined;
const mounts: string[] = [];

afterEach(async () => {
  await srv?.kill9();
  srv = undefined;
  for (const m of mounts.splice(0).reverse()) spawnSync('umount', ['-l', m]);
});

/** An ext4 on a loop device over a sparse file that has only `backing` bytes of real space. */
function thinFilesystem(backingMiB: number): string {
  const root = tempDir('thin-');
  const tmp = path.join(root, 'tmpfs');
  const mnt = path.join(root, 'fs');
  fs.mkdirSync(tmp);
  fs.mkdirSync(mnt);
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${backingMiB}m`, 'tmpfs', tmp]);
  mounts.push(tmp);
  const disk = path.join(tmp, 'disk');
  execFileSync('truncate', ['-s', '256M', disk]);
  execFileSync('mkfs.ext4', ['-q', '-E', 'nodiscard,lazy_itable_init=0,lazy_journal_init=0', disk]);
  // errors=continue: the test is about what snapblock reports, not about ext4 going read-only
  execFileSync('mount', ['-o', 'loop,errors=continue', disk, mnt]);
  mounts.push(mnt);
  return mnt;
}

/** Python: write `mib` MiB of a pattern (waiting for each reply, no flush), then flush `flushes` times; print each flush's outcome. */
function writeThenFlushes(uri: string, mib: number, flushes: number): string[] {
  const out = nbdsh(
    uri,
    `
buf = bytes([(j * 13 + 5) % 251 for j in range(${MIB})])
for i in range(${mib}):
    h.pwrite(buf, i * ${MIB})
for k in range(${flushes}):
    try:
        h.flush()
        print('ok')
    except nbd.Error as e:
        print('error', e.errnum)`,
  );
  return out.trim().split('\n');
}

describe('a failed sync poisons the volume until it is reopened', () => {
  for (const mode of ['row', 'cow', 'mirror']) {
    it(`${mode}: after a FLUSH fails on a thin device out of space, every later FLUSH fails and check reports it`, { timeout: 120_000 }, async () => {
      const pool = path.join(thinFilesystem(40), 'pool');
      expect(cli(pool, ['volume', 'create', 'v', '128M', '--snapshot-mode', mode]).status).toBe(0);
      srv = await startServer({ pool });
      // 60 MiB acknowledged into the page cache; the backing tmpfs holds 40
      const outcomes = writeThenFlushes(srv.uri('v'), 60, 3);
      expect(outcomes[0], srv.logs()).toMatch(/^error/);
      expect(outcomes.slice(1)).toEqual(['error 5', 'error 5']); // EIO, never ok
      // a new connection to the same open volume gets no success either
      expect(() => nbdsh(srv!.uri('v'), 'h.flush()')).toThrow(/flush/i);
      const check = srv.cli(['check']);
      expect(check.status).not.toBe(0);
      expect(check.stdout + check.stderr).toMatch(/sync failed/);
      // the note outlives the process: a check with no server still reports it
      await srv.kill9();
      srv = undefined;
      const after = cli(pool, ['check']);
      expect(after.status).not.toBe(0);
      expect(after.stdout + after.stderr).toMatch(/sync failed/);
    });
  }
});

/** A small tmpfs: writes fail at once (ENOSPC), no writeback involved. */
function smallTmpfs(mib: number): string {
  const dir = path.join(tempDir('full-'), 'fs');
  fs.mkdirSync(dir);
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${mib}m`, 'tmpfs', dir]);
  mounts.push(dir);
  return dir;
}

describe('writes on a full filesystem', () => {
  for (const mode of ['row', 'cow', 'mirror']) {
    it(`${mode}: fail with NBD ENOSPC, the server stays up, and what was acknowledged reads back`, { timeout: 120_000 }, async () => {
      const pool = path.join(smallTmpfs(24), 'pool');
      expect(cli(pool, ['volume', 'create', 'v', '64M', '--snapshot-mode', mode]).status).toBe(0);
      srv = await startServer({ pool });
      const out = nbdsh(
        srv.uri('v'),
        `
acked = []
errs = set()
for i in range(48):
    try:
        h.pwrite(bytes([i + 1]) * ${MIB}, i * ${MIB})
        acked.append(i)
    except nbd.Error as e:
        errs.add(e.errnum)
print(len(acked), sorted(errs))
print(all(h.pread(${MIB}, i * ${MIB}) == bytes([i + 1]) * ${MIB} for i in acked))`,
      );
      const [counts, intact] = out.trim().split('\n');
      const acked = Number(counts.split(' ')[0]);
      expect(acked).toBeGreaterThan(0);
      expect(acked).toBeLessThan(48);
      expect(counts).toContain('[28]'); // ENOSPC, and no other error
      expect(intact).toBe('True');
      // still serving: a new connection reads
      expect(nbdsh(srv.uri('v'), `print(h.pread(4096, 0) == bytes([1]) * 4096)`).trim()).toBe('True');
    });
  }
});
