// export-diff / import-diff: the `rbd export-diff` v1 stream (ceph doc/dev/rbd-diff.rst).
// Round trips between snapblock volumes, then interop with Ceph's own `rbd` on the
// single-node cluster scripts/s3/start.sh runs (RBD pool + ceph.conf), judged by
// qemu-img compare (qemu's rbd and nbd drivers) — independent of snapblock's code.
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startS3, type S3Endpoint } from './helpers/s3.js';
import { CLI, run, startServer, tempDir, type RunningServer } from './helpers/server.js';

const MiB = 1024 * 1024;

describe('export-diff / import-diff (rbd diff v1)', () => {
  let srv: RunningServer;
  let tmp: string;
  const uri = (exp: string) => `nbd+unix:///${exp}?socket=${srv.socket}`;
  const sb = (args: string[], input?: Buffer) => {
    const r = spawnSync(process.execPath, [CLI, '--pool', srv.pool, ...args], { env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'warn' }, input, maxBuffer: 512 * MiB });
    return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr.toString() };
  };
  const ok = (args: string[], input?: Buffer) => {
    const r = sb(args, input);
    if (r.status !== 0) throw new Error(`snapblock ${args.join(' ')} failed: ${r.stderr}`);
    return r.stdout;
  };
  const qemuIo = (target: string, cmd: string) => {
    const r = run('qemu-io', ['-f', 'raw', target, '-c', cmd]);
    if (r.status !== 0 || /error|fail/i.test(r.stdout)) throw new Error(`qemu-io ${cmd}: ${r.stderr}${r.stdout}`);
  };
  const writeRandom = (target: string, offset: number, length: number) => {
    const f = path.join(tmp, `rnd-${randomBytes(4).toString('hex')}`);
    fs.writeFileSync(f, randomBytes(length));
    qemuIo(target, `write -s ${f} ${offset} ${length}`);
    fs.rmSync(f);
  };
  const compare = (a: string, b: string) => run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);

  beforeAll(async () => {
    tmp = tempDir('rbddiff-');
    srv = await startServer({ volumes: { src: '32M', dst: '32M', empty: '32M' } });
  }, 60_000);

  afterAll(async () => {
    await srv?.stop();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  const fullDiff = () => path.join(tmp, 'full.diff');
  const incDiff = () => path.join(tmp, 'inc.diff');

  it('writes the v1 stream: banner, metadata, data records, end', () => {
    writeRandom(uri('src'), 0, 3 * MiB);
    writeRandom(uri('src'), 20 * MiB, 512 * 1024);
    ok(['snapshot', 'create', 'src', 's1']);
    ok(['export-diff', 'src@s1', fullDiff()]);
    const b = fs.readFileSync(fullDiff());
    expect(b.subarray(0, 12).toString('latin1')).toBe('rbd diff v1\n');
    // 't' le32 2 "s1", then 's' le64 size
    expect(b[12]).toBe('t'.charCodeAt(0));
    expect(b.readUInt32LE(13)).toBe(2);
    expect(b.subarray(17, 19).toString()).toBe('s1');
    expect(b[19]).toBe('s'.charCodeAt(0));
    expect(Number(b.readBigUInt64LE(20))).toBe(32 * MiB);
    expect(b[28]).toBe('w'.charCodeAt(0));
    expect(Number(b.readBigUInt64LE(29))).toBe(0);
    expect(b[b.length - 1]).toBe('e'.charCodeAt(0));
    // headers + 3.5 MiB of data, nothing for the holes
    expect(b.length).toBeLessThan(3.5 * MiB + 1024);
    expect(b.length).toBeGreaterThan(3.5 * MiB);
  });

  it('round-trips a full and an incremental diff between volumes, with the rbd checks', () => {
    writeRandom(uri('src'), 1 * MiB, 100 * 1024);
    qemuIo(uri('src'), `write -z ${20 * MiB} ${256 * 1024}`);
    writeRandom(uri('src'), 30 * MiB, 64 * 1024);
    ok(['snapshot', 'create', 'src', 's2']);
    ok(['export-diff', 'src@s2', '--from-snap', 's1', incDiff()]);
    const inc = fs.readFileSync(incDiff());
    expect(inc[12]).toBe('f'.charCodeAt(0));
    expect(inc.length).toBeLessThan(1 * MiB); // only the change
    // the incremental needs s1 on the target
    const refused = sb(['import-diff', incDiff(), 'dst']);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toMatch(/start snapshot 's1' does not exist/);
    ok(['import-diff', fullDiff(), 'dst']);
    ok(['import-diff', incDiff(), 'dst']);
    expect(compare(uri('src@s1'), uri('dst@s1')).status).toBe(0);
    expect(compare(uri('src@s2'), uri('dst@s2')).status).toBe(0);
    // the to-snapshot must not exist yet
    const again = sb(['import-diff', incDiff(), 'dst']);
    expect(again.status).toBe(1);
    expect(again.stderr).toMatch(/end snapshot 's2' already exists/);
  });

  it('streams through stdout and stdin', () => {
    const stream = spawnSync(process.execPath, [CLI, '--pool', srv.pool, 'export-diff', 'src@s2', '-'], { env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'warn' }, maxBuffer: 512 * MiB });
    expect(stream.status).toBe(0);
    ok(['import-diff', '-', 'empty'], stream.stdout);
    expect(compare(uri('src@s2'), uri('empty@s2')).status).toBe(0);
    expect(compare(uri('src@s2'), uri('empty')).status).toBe(0);
  });

  it('rejects a damaged stream', () => {
    const bad = path.join(tmp, 'bad.diff');
    fs.writeFileSync(bad, Buffer.from('rbd diff v2\n'));
    expect(sb(['import-diff', bad, 'empty']).stderr).toMatch(/v2/);
    const b = fs.readFileSync(fullDiff());
    fs.writeFileSync(bad, b.subarray(0, b.length - 1000));
    const r = sb(['import-diff', bad, 'empty']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/truncated/);
  });

  describe('interop with Ceph rbd', () => {
    let s3: S3Endpoint | undefined;
    let rbdEnv: NodeJS.ProcessEnv;
    const img = `sb-${Date.now().toString(36)}-${process.pid}`;
    const rbd = (args: string[]) => {
      const r = spawnSync('timeout', ['60', 'rbd', '-p', s3!.rbdPool, ...args], { env: rbdEnv, encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`rbd ${args.join(' ')} failed: ${r.stderr}`);
      return r.stdout;
    };
    const qemuRbd = (name: string) => `rbd:${s3!.rbdPool}/${name}:conf=${s3!.cephConf}`;

    beforeAll(async () => {
      s3 = await startS3();
      if (!s3.rbdPool) throw new Error('the S3 cluster has no rbd pool (S3_RBD_POOL)');
      rbdEnv = { ...process.env, CEPH_CONF: s3.cephConf };
    }, 600_000);

    afterAll(async () => {
      if (s3?.rbdPool) {
        for (const name of [img, `${img}-b`]) {
          spawnSync('timeout', ['60', 'rbd', '-p', s3.rbdPool, 'snap', 'purge', name], { env: rbdEnv });
          spawnSync('timeout', ['60', 'rbd', '-p', s3.rbdPool, 'rm', name], { env: rbdEnv });
        }
      }
      await s3?.stop();
    }, 120_000);

    it('rbd import-diff applies snapblock export-diff streams', () => {
      rbd(['create', img, '--size', '32M']);
      rbd(['import-diff', fullDiff(), img]);
      rbd(['import-diff', incDiff(), img]);
      expect(rbd(['snap', 'ls', img])).toMatch(/s1[\s\S]*s2/);
      expect(compare(uri('src@s1'), qemuRbd(`${img}@s1`)).status).toBe(0);
      expect(compare(uri('src@s2'), qemuRbd(`${img}@s2`)).status).toBe(0);
    }, 120_000);

    it('snapblock import-diff applies rbd export-diff streams', () => {
      const b = `${img}-b`;
      rbd(['create', b, '--size', '32M']);
      writeRandom(qemuRbd(b), 2 * MiB, 5 * MiB);
      writeRandom(qemuRbd(b), 25 * MiB, 300 * 1024);
      rbd(['snap', 'create', `${b}@a`]);
      writeRandom(qemuRbd(b), 3 * MiB, 70 * 1024);
      qemuIo(qemuRbd(b), `discard ${25 * MiB} ${4 * MiB}`);
      writeRandom(qemuRbd(b), 31 * MiB, 8192);
      rbd(['snap', 'create', `${b}@b`]);
      const da = path.join(tmp, 'rbd-a.diff');
      const db = path.join(tmp, 'rbd-b.diff');
      rbd(['export-diff', `${b}@a`, da]);
      rbd(['export-diff', '--from-snap', 'a', `${b}@b`, db]);
      ok(['volume', 'create', 'fromrbd', '32M']);
      ok(['import-diff', da, 'fromrbd']);
      ok(['import-diff', db, 'fromrbd']);
      expect(compare(qemuRbd(`${b}@a`), uri('fromrbd@a')).status).toBe(0);
      expect(compare(qemuRbd(`${b}@b`), uri('fromrbd@b')).status).toBe(0);
      // and snapblock's own diff of the imported snapshots is accepted by rbd again
      const back = path.join(tmp, 'back.diff');
      ok(['export-diff', 'fromrbd@b', '--from-snap', 'a', back]);
      rbd(['snap', 'rollback', `${b}@a`]);
      rbd(['snap', 'rm', `${b}@b`]);
      rbd(['import-diff', back, b]);
      expect(compare(uri('fromrbd@b'), qemuRbd(`${b}@b`)).status).toBe(0);
    }, 120_000);
  });
});
