// The backup sidecar against a real S3 endpoint (Ceph RGW from scripts/s3/start.sh),
// directly and through the fault-injecting proxy. Judges are independent clients:
// qemu-img compare / nbdcopy read the source snapshot and the restored volume.
import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { DeleteObjectCommand, GetObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client, DeleteBucketCommand } from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startFaultProxy, startS3, type FaultProxy, type S3Endpoint } from './helpers/s3.js';
import { CLI, run, startServer, tempDir, type RunningServer } from './helpers/server.js';
import { makeCerts, type Certs } from './helpers/certs.js';

const MiB = 1024 * 1024;

interface Res {
  status: number;
  stdout: string;
  stderr: string;
}

describe('backup sidecar (S3: Ceph RGW)', () => {
  let s3: S3Endpoint;
  let c: S3Client;
  let srv: RunningServer;
  let proxy: FaultProxy;
  let tmp: string;
  const bucket = `snapblock-bk-${Date.now().toString(36)}-${process.pid}`;

  const env = (endpoint = s3.endpoint, extra: Record<string, string> = {}) => ({
    ...process.env,
    SNAPBLOCK_LOG_LEVEL: 'warn',
    S3_ENDPOINT: endpoint,
    S3_REGION: s3.region,
    S3_BUCKET: bucket,
    AWS_ACCESS_KEY_ID: s3.accessKeyId,
    AWS_SECRET_ACCESS_KEY: s3.secretAccessKey,
    SNAPBLOCK_BACKUP_JOURNAL_MS: '500',
    ...extra,
  });
  const sb = (pool: string, args: string[], endpoint?: string, extra?: Record<string, string>): Res => {
    const r = spawnSync(process.execPath, [CLI, '--pool', pool, ...args], { encoding: 'utf8', env: env(endpoint, extra), timeout: 300_000 });
    return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  };
  const sbJson = <T>(pool: string, args: string[], endpoint?: string): T => {
    const r = sb(pool, [...args, '--json', '--progress', 'none'], endpoint);
    if (r.status !== 0) throw new Error(`snapblock ${args.join(' ')} failed (${r.status}):\n${r.stderr}\n${r.stdout}`);
    return JSON.parse(r.stdout) as T;
  };
  const bk = <T>(args: string[], endpoint?: string) => sbJson<T>(srv.pool, ['backup', ...args], endpoint);
  /** the CLI without blocking this process: needed whenever the fault proxy (which lives here) is in the path */
  const sbAsync = (pool: string, args: string[], endpoint?: string): Promise<Res> =>
    new Promise((resolve) => {
      const child = spawn(process.execPath, [CLI, '--pool', pool, ...args], { env: env(endpoint) });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d) => (stdout += d));
      child.stderr.on('data', (d) => (stderr += d));
      child.on('exit', (code) => resolve({ status: code ?? -1, stdout, stderr }));
    });
  const bkProxy = async <T>(args: string[]): Promise<T> => {
    const r = await sbAsync(srv.pool, ['backup', ...args, '--json', '--progress', 'none'], proxy.endpoint);
    if (r.status !== 0) throw new Error(`snapblock backup ${args.join(' ')} failed (${r.status}):\n${r.stderr}\n${r.stdout}`);
    return JSON.parse(r.stdout) as T;
  };
  const uri = (s: RunningServer, exp: string) => `nbd+unix:///${exp}?socket=${s.socket}`;
  /** write a file of bytes at an offset through qemu-io (an independent client) */
  const writeData = (s: RunningServer, exp: string, offset: number, data: Buffer) => {
    const f = path.join(tmp, `w-${randomBytes(4).toString('hex')}`);
    fs.writeFileSync(f, data);
    const r = run('qemu-io', ['-f', 'raw', uri(s, exp), '-c', `write -s ${f} ${offset} ${data.length}`]);
    fs.rmSync(f);
    if (r.status !== 0) throw new Error(`qemu-io failed: ${r.stderr}${r.stdout}`);
  };
  const qemuIo = (s: RunningServer, exp: string, cmd: string) => {
    const r = run('qemu-io', ['-f', 'raw', uri(s, exp), '-c', cmd]);
    if (r.status !== 0 || /error|fail/i.test(r.stdout)) throw new Error(`qemu-io ${cmd} failed: ${r.stderr}${r.stdout}`);
    return r.stdout;
  };
  /** qemu-img compare: 0 identical, 1 different */
  const compare = (a: string, b: string) => run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);
  /** sha256 of a whole export, read by nbdcopy */
  const imageSha = (u: string) => {
    const f = path.join(tmp, `img-${randomBytes(4).toString('hex')}`);
    const r = run('nbdcopy', [u, f]);
    if (r.status !== 0) throw new Error(`nbdcopy failed: ${r.stderr}`);
    const h = createHash('sha256').update(fs.readFileSync(f)).digest('hex');
    fs.rmSync(f);
    return h;
  };
  const listKeys = async (prefix: string) => {
    const keys: string[] = [];
    let token: string | undefined;
    do {
      const r = await c.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token }));
      for (const o of r.Contents ?? []) keys.push(o.Key!);
      token = r.IsTruncated ? r.NextContinuationToken : undefined;
    } while (token);
    return keys;
  };
  const manifestOf = async (id: string) => {
    const r = await c.send(new GetObjectCommand({ Bucket: bucket, Key: `backups/${id}.json` }));
    return JSON.parse(await r.Body!.transformToString()) as { version: number; chunks: Array<[number, number, string, string, number, string?, number?]> };
  };
  const snapshotsOf = (vol: string) => JSON.parse(srv.cli(['snapshot', 'list', vol, '--json']).stdout) as Array<{ name: string }>;

  interface Created {
    id: string;
    kind: string;
    parent: string | null;
    snapshot: string;
    resumed: boolean;
    readBytes: number;
    chunks: number;
    uploadedChunks: number;
    uploadedObjects: number;
    existingChunks: number;
    resumedChunks: number;
    retries: number;
  }

  beforeAll(async () => {
    tmp = tempDir('backup-');
    s3 = await startS3();
    c = new S3Client({
      endpoint: s3.endpoint,
      region: s3.region,
      credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
      forcePathStyle: true,
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    });
    const u = new URL(s3.endpoint);
    proxy = await startFaultProxy({ host: u.hostname, port: Number(u.port) });
    srv = await startServer({ volumes: { vol: '64M', other: '16M', gone: '32M' } });
  }, 600_000);

  afterAll(async () => {
    await srv?.stop();
    await proxy?.close();
    if (c) {
      for (const k of await listKeys('').catch(() => [])) await c.send(new DeleteObjectCommand({ Bucket: bucket, Key: k })).catch(() => {});
      await c.send(new DeleteBucketCommand({ Bucket: bucket })).catch(() => {});
      c.destroy();
    }
    await s3?.stop();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  }, 120_000);

  let full: Created;
  let incr: Created;
  const data1 = randomBytes(6 * MiB);

  it('full backup: only allocated data is read and uploaded; restore is byte-exact', () => {
    writeData(srv, 'vol', 0, data1); // chunks 0, 1 (4 MiB chunks)
    writeData(srv, 'vol', 40 * MiB, randomBytes(1 * MiB)); // chunk 10
    qemuIo(srv, 'vol', `write -P 0x5a ${60 * MiB} ${512 * 1024}`); // compressible, chunk 15
    full = bk<Created>(['create', 'vol']);
    expect(full.kind).toBe('full');
    expect(full.parent).toBeNull();
    expect(full.readBytes).toBe(6 * MiB + 1 * MiB + 512 * 1024); // holes never read
    expect(full.chunks).toBe(4);
    expect(full.uploadedChunks).toBe(4);
    expect(full.uploadedObjects).toBe(4); // a full backup stores every chunk as its own object
    bk(['restore', full.id, 'vol-r1']);
    expect(compare(uri(srv, `vol@${full.snapshot}`), uri(srv, 'vol-r1')).status).toBe(0);
    // the compressible chunk is stored compressed, the random ones raw
  }, 120_000);

  it('chunks are content-addressed, compressed when that helps, never rewritten', async () => {
    const keys = await listKeys('chunks/');
    expect(keys).toHaveLength(4);
    expect(keys.filter((k) => k.endsWith('.br'))).toHaveLength(1);
    expect(keys.filter((k) => k.endsWith('.raw'))).toHaveLength(3);
    // the same data in another volume: nothing new is uploaded (dedup across volumes)
    writeData(srv, 'other', 4 * MiB, data1.subarray(0, 4 * MiB));
    const o = bk<Created>(['create', 'other']);
    expect(o.uploadedChunks).toBe(0);
    expect(o.existingChunks).toBe(1);
    expect(await listKeys('chunks/')).toHaveLength(4);
  }, 120_000);

  it('incremental reads and uploads only what changed since the parent snapshot', async () => {
    writeData(srv, 'vol', 1 * MiB, randomBytes(64 * 1024)); // chunk 0
    writeData(srv, 'vol', 33 * MiB, randomBytes(128 * 1024)); // chunk 8 (was a hole)
    qemuIo(srv, 'vol', `write -z ${40 * MiB} ${1 * MiB}`); // chunk 10 becomes zeros
    const before = (await listKeys('chunks/')).length;
    incr = bk<Created>(['create', 'vol', '--incremental']);
    expect(incr.kind).toBe('incremental');
    expect(incr.parent).toBe(full.id);
    expect(incr.readBytes).toBeLessThanOrEqual(64 * 1024 + 128 * 1024 + 1 * MiB);
    expect(incr.uploadedChunks).toBe(2);
    // two small pieces of an incremental: one pack object (manifest version 2)
    expect(incr.uploadedObjects).toBe(1);
    expect((await listKeys('chunks/')).length).toBe(before + 1);
    expect((await manifestOf(incr.id)).version).toBe(2);
    // the full backup's snapshot was taken by the sidecar and is no longer needed
    expect(snapshotsOf('vol').map((s) => s.name)).toEqual([incr.snapshot]);
    bk(['restore', incr.id, 'vol-r2']);
    expect(compare(uri(srv, `vol@${incr.snapshot}`), uri(srv, 'vol-r2')).status).toBe(0);
    const v = bk<{ ok: boolean; chain: string[] }>(['verify', incr.id]);
    expect(v.ok).toBe(true);
    expect(v.chain).toEqual([full.id, incr.id]);
  }, 120_000);

  it('an incremental with no change reads nothing', () => {
    const r = bk<Created & { seconds: number }>(['create', 'vol', '--incremental']);
    expect(r.readBytes).toBe(0);
    expect(r.chunks).toBe(0);
    expect(r.parent).toBe(incr.id);
    expect(r.seconds).toBeLessThan(3); // in-process time (the CLI's start-up on a loaded 2-core box is extra)
  }, 60_000);

  it('completes through 503s, dropped connections and a slow link (fault proxy)', async () => {
    writeData(srv, 'vol', 20 * MiB, randomBytes(3 * MiB));
    proxy.setMode('http503', 6);
    const r1 = await bkProxy<Created>(['create', 'vol', '--incremental']);
    expect(r1.retries).toBeGreaterThanOrEqual(1);
    expect(proxy.stats().http503).toBeGreaterThanOrEqual(6);
    writeData(srv, 'vol', 24 * MiB, randomBytes(2 * MiB));
    proxy.setMode('drop', 4);
    const r2 = await bkProxy<Created>(['create', 'vol', '--incremental']);
    expect(proxy.stats().dropped).toBeGreaterThanOrEqual(4);
    expect(r2.retries).toBeGreaterThanOrEqual(1);
    proxy.setMode('slow', 30);
    const v = await bkProxy<{ ok: boolean }>(['verify', r2.id]);
    expect(v.ok).toBe(true);
    proxy.setMode('http503', 3);
    await bkProxy(['restore', r2.id, 'vol-r3']);
    proxy.setMode('pass');
    expect(compare(uri(srv, `vol@${r2.snapshot}`), uri(srv, 'vol-r3')).status).toBe(0);
  }, 180_000);

  it('restores through connections cut in mid-transfer', async () => {
    const list = bk<Array<{ id: string; state: string }>>(['list']);
    const last = list.filter((l) => l.state === 'complete' && l.id.startsWith('vol.')).pop()!;
    proxy.setMode('reset-after-bytes', 300_000);
    const p = sbAsync(srv.pool, ['backup', 'restore', last.id, 'vol-r4', '--json', '--progress', 'none'], proxy.endpoint);
    const deadline = Date.now() + 30_000;
    while (proxy.stats().resets < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    proxy.setMode('pass');
    const r = await p;
    expect(r.status, r.stderr).toBe(0);
    expect(proxy.stats().resets).toBeGreaterThanOrEqual(2);
    const snap = snapshotsOf('vol').pop()!.name;
    expect(compare(uri(srv, `vol@${snap}`), uri(srv, 'vol-r4')).status).toBe(0);
  }, 120_000);

  it('a killed sidecar leaves volume IO alone and its backup resumes without re-uploading', async () => {
    writeData(srv, 'gone', 0, randomBytes(24 * MiB));
    proxy.setMode('slow', 150);
    const child = spawn(process.execPath, [CLI, '--pool', srv.pool, 'backup', 'create', 'gone', '--chunk-size', '1M', '--concurrency', '2', '--progress', 'none'], { env: env(proxy.endpoint), stdio: 'ignore' });
    // wait until the in-progress journal lists a few stored chunks, then SIGKILL
    const deadline = Date.now() + 60_000;
    let partial: { chunks: unknown[]; id: string } | undefined;
    while (Date.now() < deadline) {
      const keys = await listKeys('backups/');
      const k = keys.find((x) => x.startsWith('backups/gone.') && x.endsWith('.partial.json'));
      if (k) {
        const body = await c.send(new GetObjectCommand({ Bucket: bucket, Key: k }));
        partial = JSON.parse(await body.Body!.transformToString()) as typeof partial;
        if (partial!.chunks.length >= 4) break;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    proxy.setMode('pass');
    expect(partial!.chunks.length).toBeGreaterThanOrEqual(4);
    // volume IO is unaffected: the server never noticed more than a closed NBD connection
    qemuIo(srv, 'vol', `write -P 0x42 ${62 * MiB} 64k`);
    expect(qemuIo(srv, 'vol', `read -P 0x42 ${62 * MiB} 64k`)).toMatch(/read 65536/);
    const stored = (await listKeys('chunks/')).length;
    const listed = bk<Array<{ id: string; state: string }>>(['list']);
    expect(listed.find((l) => l.id === partial!.id)?.state).toBe('incomplete');
    // the same command again resumes the same backup
    const r = bk<Created>(['create', 'gone', '--chunk-size', '1M']);
    expect(r.resumed).toBe(true);
    expect(r.id).toBe(partial!.id);
    expect(r.resumedChunks).toBeGreaterThanOrEqual(4);
    expect(r.chunks).toBe(24);
    // every chunk uploaded exactly once over both runs
    expect((await listKeys('chunks/')).length).toBe(stored + r.uploadedChunks);
    expect(r.uploadedChunks + r.existingChunks + r.resumedChunks).toBe(24);
    expect(r.uploadedChunks).toBeLessThan(24 - 4);
    bk(['restore', r.id, 'gone-r1']);
    expect(compare(uri(srv, `gone@${r.snapshot}`), uri(srv, 'gone-r1')).status).toBe(0);
  }, 180_000);

  it('restores after the source volume and its snapshots are deleted, and into a fresh pool', async () => {
    const list = bk<Array<{ id: string; state: string; source: string }>>(['list']);
    const last = list.filter((l) => l.state === 'complete' && l.id.startsWith('gone.')).pop()!;
    const snap = last.source.split('@')[1];
    const sha = imageSha(uri(srv, `gone@${snap}`));
    for (const s of snapshotsOf('gone')) expect(srv.cli(['snapshot', 'delete', 'gone', s.name]).status).toBe(0);
    expect(srv.cli(['volume', 'delete', 'gone']).status).toBe(0);
    bk(['restore', last.id, 'gone-r2']);
    expect(imageSha(uri(srv, 'gone-r2'))).toBe(sha);
    // another server, an empty pool, the same bucket: everything is in the bucket
    const other = await startServer({});
    try {
      const fresh = sbJson<Array<{ id: string }>>(other.pool, ['backup', 'list']);
      expect(fresh.map((f) => f.id)).toContain(last.id);
      sbJson(other.pool, ['backup', 'restore', last.id, 'elsewhere']);
      expect(imageSha(uri(other, 'elsewhere'))).toBe(sha);
      const inc = list.filter((l) => l.state === 'complete' && l.id.startsWith('vol.')).pop()!;
      sbJson(other.pool, ['backup', 'restore', inc.id, 'vol-elsewhere']);
      expect(compare(uri(srv, `vol@${inc.source.split('@')[1]}`), uri(other, 'vol-elsewhere')).status).toBe(0);
    } finally {
      await other.stop();
    }
  }, 180_000);

  it('scattered small changes share one pack (manifest version 2): restore and verify are byte-exact, a damaged pack is named precisely', async () => {
    expect(srv.cli(['volume', 'create', 'packs', '32M']).status).toBe(0);
    writeData(srv, 'packs', 0, randomBytes(256 * 1024));
    const f = bk<Created>(['create', 'packs']);
    expect((await manifestOf(f.id)).version).toBe(1); // nothing packed: the version-1 form
    for (let i = 0; i < 6; i++) writeData(srv, 'packs', (4 * i + 1) * MiB + 4096 * i, randomBytes(64 * 1024 * (i + 1)));
    qemuIo(srv, 'packs', `write -P 0x61 ${30 * MiB} 256k`); // compressible: stored br inside the pack
    const before = (await listKeys('chunks/')).length;
    const inc = bk<Created>(['create', 'packs', '--incremental']);
    expect(inc.kind).toBe('incremental');
    expect(inc.uploadedChunks).toBe(7);
    expect(inc.uploadedObjects).toBe(1);
    const added = (await listKeys('chunks/')).slice(0);
    expect(added.length).toBe(before + 1);
    const m = await manifestOf(inc.id);
    expect(m.version).toBe(2);
    expect(m.chunks.every((e) => e.length === 7 && e[5] === m.chunks[0][5])).toBe(true);
    expect(m.chunks.some((e) => e[3] === 'br')).toBe(true);
    bk(['restore', inc.id, 'packs-r1']);
    expect(compare(uri(srv, `packs@${inc.snapshot}`), uri(srv, 'packs-r1')).status).toBe(0);
    expect(bk<{ ok: boolean; chunks: number }>(['verify', inc.id])).toMatchObject({ ok: true, chunks: 8 });
    // an incremental on top of it reuses nothing it does not need and restores the whole chain
    writeData(srv, 'packs', 9 * MiB, randomBytes(4096));
    const inc2 = bk<Created>(['create', 'packs', '--incremental']);
    bk(['restore', inc2.id, 'packs-r2']);
    expect(compare(uri(srv, `packs@${inc2.snapshot}`), uri(srv, 'packs-r2')).status).toBe(0);
    // one flipped byte inside the third chunk of the pack: verify names that chunk, restore refuses
    const victim = m.chunks[2];
    const key = `chunks/${victim[5]!.slice(0, 2)}/${victim[5]}.pack`;
    const body = await c.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
    const bytes = Buffer.from(await body.Body!.transformToByteArray());
    bytes[victim[6]! + 10] ^= 0xff;
    await c.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: bytes }));
    const vj = JSON.parse(sb(srv.pool, ['backup', 'verify', inc.id, '--json', '--progress', 'none']).stdout) as { ok: boolean; problems: Array<{ backup: string; offset: number; key: string; problem: string }> };
    expect(vj.ok).toBe(false);
    expect(vj.problems).toEqual([expect.objectContaining({ backup: inc.id, offset: victim[0], key, problem: 'corrupt' })]);
    const r = sb(srv.pool, ['backup', 'restore', inc.id, 'packs-bad', '--progress', 'none']);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(key);
    expect(srv.cli(['volume', 'info', 'packs-bad']).status).not.toBe(0);
    bk(['delete', f.id, '--cascade']);
  }, 180_000);

  it('restores a backup whose manifest has the version-1 form (written before packs existed)', async () => {
    // a hand-made version-1 bucket entry: a raw and a brotli chunk object, and a manifest
    // with 5-field chunk entries, sealed as snapblock did before version 2
    const { canonicalJson } = await import('../src/backup/manifest.js');
    const zlib = await import('node:zlib');
    const raw = randomBytes(1 * MiB);
    const pattern = Buffer.alloc(512 * 1024, 0x5b);
    const br = zlib.brotliCompressSync(pattern);
    const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
    await c.send(new PutObjectCommand({ Bucket: bucket, Key: `chunks/${sha(raw).slice(0, 2)}/${sha(raw)}.raw`, Body: raw }));
    await c.send(new PutObjectCommand({ Bucket: bucket, Key: `chunks/${sha(pattern).slice(0, 2)}/${sha(pattern)}.br`, Body: br }));
    const id = 'legacy.20260101T000000Z.abcd';
    const m: Record<string, unknown> = {
      format: 'snapblock-backup', version: 1, id, kind: 'full', parent: null, snapshot: null,
      created: '2026-01-01T00:00:00.000Z', completed: '2026-01-01T00:00:01.000Z',
      source: { type: 'nbd', uri: 'nbd://127.0.0.1:10809/legacy', export: 'legacy' },
      size: 8 * MiB, chunkSize: 4 * MiB,
      chunks: [[1 * MiB, raw.length, sha(raw), 'raw', raw.length], [6 * MiB, pattern.length, sha(pattern), 'br', br.length]],
      zeroed: [], stats: {}, checksum: '',
    };
    m.checksum = 'sha256:' + createHash('sha256').update(canonicalJson(m)).digest('hex');
    await c.send(new PutObjectCommand({ Bucket: bucket, Key: `backups/${id}.json`, Body: JSON.stringify(m) }));
    bk(['restore', id, 'legacy-r']);
    const image = Buffer.alloc(8 * MiB);
    raw.copy(image, 1 * MiB);
    pattern.copy(image, 6 * MiB);
    expect(imageSha(uri(srv, 'legacy-r'))).toBe(sha(image));
    expect(bk<{ ok: boolean }>(['verify', id]).ok).toBe(true);
    bk(['delete', id]);
  }, 120_000);

  it('verify reports a corrupt or missing chunk precisely and restore refuses it', async () => {
    writeData(srv, 'other', 8 * MiB, randomBytes(2 * MiB)); // unique data: its own chunks
    const b = bk<Created>(['create', 'other']);
    const m = JSON.parse(sb(srv.pool, ['backup', 'show', b.id, '--json']).stdout) as { chunks: Array<[number, number, string, string, number]> };
    const victim = m.chunks.find((e) => e[0] === 8 * MiB)!;
    const key = `chunks/${victim[2].slice(0, 2)}/${victim[2]}.${victim[3]}`;
    const body = await c.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
    const bytes = Buffer.from(await body.Body!.transformToByteArray());
    bytes[1000] ^= 0xff; // one flipped byte
    await c.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: bytes }));
    const v = sb(srv.pool, ['backup', 'verify', b.id, '--progress', 'none']);
    expect(v.status).toBe(1);
    expect(v.stdout).toContain(`corrupt: backup ${b.id} offset ${8 * MiB}`);
    expect(v.stdout).toContain(key);
    const r = sb(srv.pool, ['backup', 'restore', b.id, 'other-bad', '--progress', 'none']);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(key);
    expect(r.stderr).toMatch(/corrupt/);
    expect(srv.cli(['volume', 'info', 'other-bad']).status).not.toBe(0); // nothing half-restored left behind
    // a missing chunk: named before anything is written
    await c.send(new DeleteObjectCommand({ Bucket: bucket, Key: key }));
    const vj = JSON.parse(sb(srv.pool, ['backup', 'verify', b.id, '--json', '--progress', 'none']).stdout) as { ok: boolean; problems: Array<{ backup: string; offset: number; key: string; problem: string }> };
    expect(vj.ok).toBe(false);
    expect(vj.problems).toEqual([expect.objectContaining({ backup: b.id, offset: 8 * MiB, key, problem: 'missing' })]);
    const r2 = sb(srv.pool, ['backup', 'restore', b.id, 'other-bad', '--progress', 'none']);
    expect(r2.status).toBe(1);
    expect(r2.stderr).toContain('missing');
    bk(['delete', b.id]);
  }, 120_000);

  it('delete refuses a backup others depend on unless --cascade; unreferenced chunks are collected', async () => {
    const list = bk<Array<{ id: string; parent: string | null; state: string }>>(['list']);
    const vols = list.filter((l) => l.id.startsWith('vol.'));
    const root = vols.find((l) => l.parent === null)!;
    const dependents = vols.filter((l) => l.parent !== null);
    expect(dependents.length).toBeGreaterThan(0);
    const refused = sb(srv.pool, ['backup', 'delete', root.id]);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toMatch(/dependent/);
    expect(refused.stderr).toContain(dependents[0].id);
    const before = await listKeys('chunks/');
    const del = bk<{ deleted: string[]; gc: { deletedChunks: number } }>(['delete', root.id, '--cascade']);
    expect(new Set(del.deleted)).toEqual(new Set(vols.map((v) => v.id)));
    expect(del.gc.deletedChunks).toBeGreaterThan(0);
    const after = await listKeys('chunks/');
    expect(after.length).toBe(before.length - del.gc.deletedChunks);
    // what the remaining backups need is all still there
    for (const l of bk<Array<{ id: string; state: string }>>(['list'])) {
      if (l.state === 'complete') expect(bk<{ ok: boolean }>(['verify', l.id]).ok).toBe(true);
    }
    // the deduplicated chunk shared with "other" survived
    expect(after.some((k) => before.includes(k))).toBe(true);
  }, 180_000);

  it('backs up another NBD server export by URI (holes skipped) to a directory target', () => {
    const img = path.join(tmp, 'peer.img');
    fs.writeFileSync(img, Buffer.alloc(0));
    fs.truncateSync(img, 32 * MiB);
    const fd = fs.openSync(img, 'r+');
    const d = randomBytes(2 * MiB);
    fs.writeSync(fd, d, 0, d.length, 10 * MiB);
    fs.closeSync(fd);
    const sock = path.join(tmp, 'nbdkit.sock');
    const kit = spawn('nbdkit', ['-f', '-U', sock, 'file', img], { stdio: 'ignore' });
    try {
      for (let i = 0; i < 100 && !fs.existsSync(sock); i++) spawnSync('sleep', ['0.05']);
      const dir = path.join(tmp, 'dir-target');
      const r = sbJson<Created>(srv.pool, ['backup', 'create', '--nbd', `nbd+unix:///?socket=${sock}`, '--target', `dir:${dir}`]);
      expect(r.readBytes).toBe(2 * MiB);
      sbJson(srv.pool, ['backup', 'restore', r.id, 'from-peer', '--target', `dir:${dir}`]);
      expect(compare(img, uri(srv, 'from-peer')).status).toBe(0);
    } finally {
      kit.kill();
    }
  }, 60_000);
});

// The sidecar as a TLS client (STARTTLS, x509, client certificates) of a snapblock
// server that requires TLS and of nbdkit --tls=require. Directory targets (the S3 side
// is covered above); data written and read back by libnbd's nbdcopy over TLS.
describe('backup sidecar over NBD with TLS', () => {
  let certs: Certs;
  let srv: RunningServer;
  let tmp: string;
  const img = () => path.join(tmp, 'tls-src.img');
  const tlsFlags = () => ['--tls', '--tls-ca', certs.ca, '--tls-cert', path.join(certs.dir, 'client-cert.pem'), '--tls-key', path.join(certs.dir, 'client-key.pem')];
  const sb = (pool: string, args: string[]) => {
    const r = spawnSync(process.execPath, [CLI, '--pool', pool, ...args, '--progress', 'none'], { encoding: 'utf8', env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'warn' }, timeout: 120_000 });
    return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  };
  const sbJson = <T>(pool: string, args: string[]): T => {
    const r = sb(pool, [...args, '--json']);
    if (r.status !== 0) throw new Error(`snapblock ${args.join(' ')} failed (${r.status}):\n${r.stderr}\n${r.stdout}`);
    return JSON.parse(r.stdout) as T;
  };
  /** sha256 of a whole export, read by nbdcopy (libnbd: TLS with the certificates directory) */
  const shaOf = (u: string) => {
    const f = path.join(tmp, `img-${randomBytes(4).toString('hex')}`);
    const r = run('nbdcopy', [u, f]);
    if (r.status !== 0) throw new Error(`nbdcopy ${u} failed: ${r.stderr}`);
    const h = createHash('sha256').update(fs.readFileSync(f)).digest('hex');
    fs.rmSync(f);
    return h;
  };
  const tlsTcp = (exp: string) => `nbds://127.0.0.1:${srv.port}/${exp}?tls-certificates=${certs.dir}`;

  beforeAll(async () => {
    tmp = tempDir('backup-tls-');
    certs = makeCerts(path.join(tmp, 'certs'));
    // --tls-ca: the server verifies client certificates too
    srv = await startServer({ volumes: { sec: '32M' }, args: ['--tls', 'require', '--tls-cert', certs.serverCert, '--tls-key', certs.serverKey, '--tls-ca', certs.ca] });
    const data = Buffer.alloc(32 * MiB);
    randomBytes(3 * MiB).copy(data, 4 * MiB);
    randomBytes(1 * MiB).copy(data, 20 * MiB);
    data.fill(0x5a, 28 * MiB, 29 * MiB);
    fs.writeFileSync(img(), data);
    const w = run('nbdcopy', [img(), tlsTcp('sec')]);
    if (w.status !== 0) throw new Error(`nbdcopy into the TLS server failed: ${w.stderr}`);
  }, 120_000);

  afterAll(async () => {
    await srv?.stop();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('refuses clearly without TLS, and without a client certificate', () => {
    const dir = `dir:${path.join(tmp, 'target-refused')}`;
    const plain = sb(srv.pool, ['backup', 'create', '--nbd', `nbd://127.0.0.1:${srv.port}/sec`, '--target', dir]);
    expect(plain.status).toBe(1);
    expect(plain.stderr).toMatch(/requires TLS/);
    const pool = sb(srv.pool, ['backup', 'create', 'sec', '--target', dir]);
    expect(pool.status).toBe(1);
    expect(pool.stderr).toMatch(/requires TLS/);
    const noCert = sb(srv.pool, ['backup', 'create', '--nbd', `nbd://127.0.0.1:${srv.port}/sec`, '--tls', '--tls-ca', certs.ca, '--target', dir]);
    expect(noCert.status).toBe(1);
    const other = makeCerts(path.join(tmp, 'other-ca'));
    const untrusted = sb(srv.pool, ['backup', 'create', '--nbd', `nbd://127.0.0.1:${srv.port}/sec`, '--tls', '--tls-ca', other.ca, '--tls-cert', path.join(certs.dir, 'client-cert.pem'), '--tls-key', path.join(certs.dir, 'client-key.pem'), '--target', dir]);
    expect(untrusted.status).toBe(1);
    expect(untrusted.stderr).toMatch(/TLS handshake failed/);
  }, 120_000);

  it('backs up a TLS-requiring snapblock export by URI (--tls flags, and nbds:// with tls-certificates) and restores byte-exact over TLS', () => {
    const target = `dir:${path.join(tmp, 'target')}`;
    const a = sbJson<{ id: string; readBytes: number; uploadedChunks: number }>(srv.pool, ['backup', 'create', '--nbd', `nbd://127.0.0.1:${srv.port}/sec`, ...tlsFlags(), '--target', target]);
    expect(a.readBytes).toBeGreaterThanOrEqual(5 * MiB);
    expect(a.readBytes).toBeLessThan(32 * MiB); // holes skipped via base:allocation, over TLS
    // libnbd's URI form; the same data again: nothing new is stored
    const b = sbJson<{ id: string; uploadedChunks: number; existingChunks: number }>(srv.pool, ['backup', 'create', '--nbd', tlsTcp('sec'), '--target', target]);
    expect(b.uploadedChunks).toBe(0);
    expect(b.existingChunks).toBeGreaterThan(0);
    // restore into a new volume of the same TLS-only server, through its Unix socket
    sbJson(srv.pool, ['backup', 'restore', a.id, 'sec-r1', ...tlsFlags(), '--target', target]);
    expect(shaOf(tlsTcp('sec-r1'))).toBe(createHash('sha256').update(fs.readFileSync(img())).digest('hex'));
  }, 120_000);

  it('backs up a volume of a TLS-requiring server (snapshot, incremental) and restores it', () => {
    const target = `dir:${path.join(tmp, 'target-pool')}`;
    const full = sbJson<{ id: string; kind: string; snapshot: string }>(srv.pool, ['backup', 'create', 'sec', ...tlsFlags(), '--target', target]);
    expect(full.kind).toBe('full');
    const script = `h.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_certificates(${JSON.stringify(certs.dir)})\nh.set_export_name('sec')\nh.connect_tcp('127.0.0.1', '${srv.port}')\nh.pwrite(b'\\xab' * 65536, ${12 * MiB})\nh.flush()`;
    const w = run('nbdsh', ['-c', script]);
    expect(w.status, w.stderr).toBe(0);
    const inc = sbJson<{ id: string; kind: string; readBytes: number; snapshot: string }>(srv.pool, ['backup', 'create', 'sec', '--incremental', ...tlsFlags(), '--target', target]);
    expect(inc.kind).toBe('incremental');
    expect(inc.readBytes).toBeLessThanOrEqual(1 * MiB);
    sbJson(srv.pool, ['backup', 'restore', inc.id, 'sec-r2', ...tlsFlags(), '--target', target]);
    expect(shaOf(tlsTcp('sec-r2'))).toBe(shaOf(tlsTcp(`sec@${inc.snapshot}`)));
  }, 120_000);

  it('backs up nbdkit --tls=require (client certificate verified) by nbds+unix:// URI', () => {
    const sock = path.join(tmp, 'nbdkit-tls.sock');
    const kit = spawn('nbdkit', ['-f', '-U', sock, '--tls=require', `--tls-certificates=${certs.dir}`, '--tls-verify-peer', 'file', img()], { stdio: 'ignore' });
    try {
      for (let i = 0; i < 100 && !fs.existsSync(sock); i++) spawnSync('sleep', ['0.05']);
      const target = `dir:${path.join(tmp, 'target-kit')}`;
      const plain = sb(srv.pool, ['backup', 'create', '--nbd', `nbd+unix:///?socket=${sock}`, '--target', target]);
      expect(plain.status).toBe(1);
      const r = sbJson<{ id: string; readBytes: number }>(srv.pool, ['backup', 'create', '--nbd', `nbds+unix:///?socket=${sock}&tls-certificates=${certs.dir}`, '--target', target]);
      expect(r.readBytes).toBeGreaterThanOrEqual(5 * MiB);
      sbJson(srv.pool, ['backup', 'restore', r.id, 'from-kit', ...tlsFlags(), '--target', target]);
      expect(shaOf(tlsTcp('from-kit'))).toBe(createHash('sha256').update(fs.readFileSync(img())).digest('hex'));
    } finally {
      kit.kill();
    }
  }, 120_000);
});
