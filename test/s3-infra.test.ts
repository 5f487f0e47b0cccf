// The S3 test infrastructure itself: a real Ceph RGW (scripts/s3/start.sh) driven
// by the official AWS SDK v3, directly and through the fault proxy.
import { createHash, randomBytes } from 'node:crypto';
import {
  CreateBucketCommand,
  DeleteBucketCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  type S3ClientConfig,
} from '@aws-sdk/client-s3';
import { Upload } from '@aws-sdk/lib-storage';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startFaultProxy, startS3, type FaultProxy, type S3Endpoint } from './helpers/s3.js';

const MiB = 1024 * 1024;
const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

function client(s3: S3Endpoint, endpoint = s3.endpoint, extra: Partial<S3ClientConfig> = {}): S3Client {
  return new S3Client({
    endpoint,
    region: s3.region,
    credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
    forcePathStyle: true,
    // Since 3.729 the SDK defaults to aws-chunked bodies with a trailing CRC32,
    // which Ceph Pacific rejects (411 MissingContentLength).
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    ...extra,
  });
}

async function getBytes(c: S3Client, Bucket: string, Key: string): Promise<Uint8Array> {
  const res = await c.send(new GetObjectCommand({ Bucket, Key }));
  return res.Body!.transformToByteArray();
}

describe('S3 test infrastructure (Ceph RGW + AWS SDK v3)', () => {
  let s3: S3Endpoint;
  let c: S3Client;
  const bucket = `snapblock-infra-${Date.now().toString(36)}-${process.pid}`;
  const big = randomBytes(8 * MiB);

  beforeAll(async () => {
    s3 = await startS3();
    c = client(s3);
  }, 600_000);

  afterAll(async () => {
    if (c) {
      const listed = await c.send(new ListObjectsV2Command({ Bucket: bucket })).catch(() => undefined);
      for (const o of listed?.Contents ?? []) await c.send(new DeleteObjectCommand({ Bucket: bucket, Key: o.Key! }));
      await c.send(new DeleteBucketCommand({ Bucket: bucket })).catch(() => undefined);
      c.destroy();
    }
    await s3?.stop();
  }, 120_000);

  it('exposes a loopback endpoint and a ceph.conf for rbd', () => {
    expect(s3.endpoint).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    expect(s3.cephConf).toMatch(/ceph\.conf$/);
  });

  it('creates a bucket', async () => {
    await c.send(new CreateBucketCommand({ Bucket: bucket }));
    const res = await c.send(new ListObjectsV2Command({ Bucket: bucket }));
    expect(res.KeyCount).toBe(0);
  });

  it('puts and gets an 8 MiB object byte-exact', async () => {
    await c.send(new PutObjectCommand({ Bucket: bucket, Key: 'big', Body: big }));
    const head = await c.send(new HeadObjectCommand({ Bucket: bucket, Key: 'big' }));
    expect(head.ContentLength).toBe(big.length);
    expect(sha256(await getBytes(c, bucket, 'big'))).toBe(sha256(big));
    const range = await c.send(new GetObjectCommand({ Bucket: bucket, Key: 'big', Range: 'bytes=-10' }));
    expect(Buffer.from(await range.Body!.transformToByteArray())).toEqual(big.subarray(big.length - 10));
  });

  it('uploads multipart with lib-storage', async () => {
    const body = randomBytes(20 * MiB + 123);
    const up = new Upload({
      client: c,
      params: { Bucket: bucket, Key: 'multi', Body: body },
      partSize: 5 * MiB,
      queueSize: 4,
    });
    await up.done();
    const head = await c.send(new HeadObjectCommand({ Bucket: bucket, Key: 'multi' }));
    expect(head.ContentLength).toBe(body.length);
    expect(head.ETag).toMatch(/-5"$/); // 5 parts
    expect(sha256(await getBytes(c, bucket, 'multi'))).toBe(sha256(body));
  });

  it('lists and deletes', async () => {
    const listed = await c.send(new ListObjectsV2Command({ Bucket: bucket }));
    expect(listed.Contents?.map((o) => [o.Key, o.Size])).toEqual([
      ['big', 8 * MiB],
      ['multi', 20 * MiB + 123],
    ]);
    await c.send(new DeleteObjectCommand({ Bucket: bucket, Key: 'multi' }));
    const after = await c.send(new ListObjectsV2Command({ Bucket: bucket }));
    expect(after.Contents?.map((o) => o.Key)).toEqual(['big']);
  });

  describe('through the fault proxy', () => {
    let proxy: FaultProxy;
    let pc: S3Client;
    const small = randomBytes(MiB);

    beforeAll(async () => {
      const url = new URL(s3.endpoint);
      proxy = await startFaultProxy({ host: url.hostname, port: Number(url.port) });
      pc = client(s3, proxy.endpoint, { maxAttempts: 3 });
    });
    afterAll(async () => {
      pc?.destroy();
      await proxy?.close();
    });

    it('passes traffic through', async () => {
      proxy.setMode('pass');
      expect(sha256(await getBytes(pc, bucket, 'big'))).toBe(sha256(big));
      expect(proxy.stats().bytesDown).toBeGreaterThan(8 * MiB);
    });

    it('a burst of 503 SlowDown is retried by the SDK', async () => {
      proxy.setMode('http503', 2);
      const before = proxy.stats().http503;
      const res = await pc.send(new PutObjectCommand({ Bucket: bucket, Key: 'retried', Body: small }));
      expect(res.$metadata.attempts).toBe(3);
      expect(proxy.stats().http503 - before).toBe(2);
      expect(sha256(await getBytes(c, bucket, 'retried'))).toBe(sha256(small));
    });

    it('503 beyond maxAttempts surfaces as the S3 error from the XML body', async () => {
      proxy.setMode('http503', 6);
      const before = proxy.stats().http503;
      const err = await pc.send(new HeadObjectCommand({ Bucket: bucket, Key: 'big' })).catch((e) => e);
      expect(err.$metadata?.httpStatusCode).toBe(503);
      const err2 = await pc.send(new GetObjectCommand({ Bucket: bucket, Key: 'big' })).catch((e) => e);
      expect(err2.name).toBe('SlowDown'); // parsed from <Code> (HEAD has no body)
      expect(err2.$metadata.attempts).toBe(3);
      expect(proxy.stats().http503 - before).toBe(6);
      proxy.setMode('pass');
    });

    it('ServiceUnavailable bodies are parsed and retried too', async () => {
      const url = new URL(s3.endpoint);
      const p2 = await startFaultProxy({ host: url.hostname, port: Number(url.port) }, { errorCode: 'ServiceUnavailable', mode: 'http503', arg: 1 });
      const c2 = client(s3, p2.endpoint);
      try {
        const bytes = await getBytes(c2, bucket, 'retried');
        expect(sha256(bytes)).toBe(sha256(small));
        expect(p2.stats().http503).toBe(1);
        p2.setMode('http503', 10);
        const err = await c2.send(new GetObjectCommand({ Bucket: bucket, Key: 'retried' })).catch((e) => e);
        expect(err.name).toBe('ServiceUnavailable');
      } finally {
        c2.destroy();
        await p2.close();
      }
    });

    it('a multipart upload survives 503s in the middle', async () => {
      // Parts of 5 MiB carry `Expect: 100-continue`: the proxy answers before the body.
      const body = randomBytes(30 * MiB);
      const before = proxy.stats().http503;
      const up = new Upload({ client: pc, params: { Bucket: bucket, Key: 'multi-503', Body: body }, partSize: 5 * MiB, queueSize: 2 });
      let armed = false;
      up.on('httpUploadProgress', () => {
        if (!armed) proxy.setMode('http503', 2); // after the first part: hits later parts or Complete
        armed = true;
      });
      await up.done();
      expect(proxy.stats().http503 - before).toBe(2);
      expect(sha256(await getBytes(c, bucket, 'multi-503'))).toBe(sha256(body));
    });

    it('one dropped connection is retried', async () => {
      proxy.setMode('drop', 1);
      const res = await pc.send(new PutObjectCommand({ Bucket: bucket, Key: 'dropped-once', Body: small }));
      expect(res.$metadata.attempts).toBe(2);
      expect(proxy.stats().dropped).toBeGreaterThanOrEqual(1);
    });

    it('dropping every connection surfaces as an error', async () => {
      proxy.setMode('drop');
      const dropped = proxy.stats().dropped;
      const err = await pc.send(new PutObjectCommand({ Bucket: bucket, Key: 'never', Body: small })).catch((e) => e);
      expect(err).toBeInstanceOf(Error);
      expect(`${err.code} ${err.message}`).toMatch(/ECONNRESET|socket hang up|EPIPE/);
      expect(proxy.stats().dropped - dropped).toBe(3); // maxAttempts
      proxy.setMode('pass');
      await expect(pc.send(new HeadObjectCommand({ Bucket: bucket, Key: 'never' }))).rejects.toMatchObject({ name: 'NotFound' });
    });

    it('adds latency', async () => {
      proxy.setMode('slow', 100);
      const t0 = performance.now();
      await pc.send(new HeadObjectCommand({ Bucket: bucket, Key: 'big' }));
      expect(performance.now() - t0).toBeGreaterThanOrEqual(190); // request + response
      proxy.setMode('pass');
    });

    it('a connection reset mid-download surfaces as an error', async () => {
      proxy.setMode('reset-after-bytes', 256 * 1024);
      await expect(getBytes(pc, bucket, 'big')).rejects.toThrow();
      expect(proxy.stats().resets).toBeGreaterThanOrEqual(1);
      proxy.setMode('pass');
      expect(sha256(await getBytes(pc, bucket, 'big'))).toBe(sha256(big));
    });
  });
});
