// Chunks: the unit of storage. A chunk is a piece of a volume image (at most
// chunkSize bytes, never crossing a chunkSize boundary of the volume), named by the
// sha256 of its uncompressed content, so identical data is stored once across
// backups and volumes, and an object once written is never rewritten.
//
// Object key: chunks/<first 2 hex>/<sha256>.<codec>, codec "raw" or "br".
//
// Compression: brotli at quality 1 (node:zlib). Node 20 has no zstd in node:zlib
// (it arrived in 22.15/23.8), so the choice is deflate or brotli. Measured on this
// 2-core box, 4 MiB chunks: brotli q1 compresses at 160-190 MB/s with ratios as
// good as deflate level 1 (which runs at 75-90 MB/s) and better than deflate 6
// (30-50 MB/s); it also gives up on random data at ~160 MB/s where deflate crawls.
// Whether a chunk is worth compressing is decided from a 128 KiB sample (kept if it
// shrinks below 7/8): cheap, and deterministic, so the same content always gets
// the same key. Compression and hashing run on the libuv thread pool
// (zlib async, WebCrypto digest), off the JS thread.
import { webcrypto } from 'node:crypto';
import zlib from 'node:zlib';
import { promisify } from 'node:util';

export type Codec = 'raw' | 'br';

const brotli = promisify(zlib.brotliCompress);
const unbrotli = promisify(zlib.brotliDecompress);
const SAMPLE = 128 * 1024;

function brotliOpts(size: number): zlib.BrotliOptions {
  return {
    params: {
      [zlib.constants.BROTLI_PARAM_QUALITY]: 1,
      [zlib.constants.BROTLI_PARAM_SIZE_HINT]: size,
      [zlib.constants.BROTLI_PARAM_MODE]: zlib.constants.BROTLI_MODE_GENERIC,
    },
  };
}

export async function sha256(data: Uint8Array): Promise<string> {
  return Buffer.from(await webcrypto.subtle.digest('SHA-256', data)).toString('hex');
}

const ZERO = Buffer.alloc(1024 * 1024);

export function isZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += ZERO.length) {
    const n = Math.min(ZERO.length, buf.length - at);
    if (!buf.subarray(at, at + n).equals(ZERO.subarray(0, n))) return false;
  }
  return true;
}

export function chunkKey(sha: string, codec: Codec): string {
  return `chunks/${sha.slice(0, 2)}/${sha}.${codec}`;
}

/** parse a chunk key back; undefined for anything else */
export function parseChunkKey(key: string): { sha: string; codec: Codec } | undefined {
  const m = /^chunks\/[0-9a-f]{2}\/([0-9a-f]{64})\.(raw|br)$/.exec(key);
  return m ? { sha: m[1], codec: m[2] as Codec } : undefined;
}

/** the codec this content will be stored with (deterministic) */
export async function chooseCodec(data: Buffer): Promise<Codec> {
  const sample = data.subarray(0, Math.min(SAMPLE, data.length));
  if (sample.length < 4096) return 'raw';
  const c = await brotli(sample, brotliOpts(sample.length));
  return c.length <= sample.length * 0.875 ? 'br' : 'raw';
}

/** the bytes stored for a chunk and their sha256 (for the request signature) */
export async function encode(data: Buffer, codec: Codec, contentSha: string): Promise<{ body: Buffer; sha: string }> {
  if (codec === 'raw') return { body: data, sha: contentSha };
  const body = await brotli(data, brotliOpts(data.length));
  return { body, sha: await sha256(body) };
}

export class ChunkError extends Error {
  constructor(
    readonly reason: 'missing' | 'corrupt' | 'size',
    message: string,
  ) {
    super(message);
    this.name = 'ChunkError';
  }
}

/** Decompress and check a stored chunk: its length and sha256 must match what the manifest says. */
export async function decode(stored: Buffer, codec: Codec, sha: string, length: number): Promise<Buffer> {
  let data: Buffer;
  if (codec === 'raw') data = stored;
  else {
    try {
      data = await unbrotli(stored, { maxOutputLength: Math.max(length, 1) });
    } catch (err) {
      throw new ChunkError('corrupt', `does not decompress (${(err as Error).message})`);
    }
  }
  if (data.length !== length) throw new ChunkError('size', `holds ${data.length} bytes, expected ${length}`);
  const got = await sha256(data);
  if (got !== sha) throw new ChunkError('corrupt', `sha256 is ${got}, expected ${sha}`);
  return data;
}
