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
// Whether a chunk is worth compressing is decided from a 32 KiB sample: four 8 KiB
// slices at 0, 1/4, 1/2 and 3/4 of the chunk, compressed together (brotli q1, ~0.5 ms)
// and kept if they shrink below 7/8. Cheap, representative of the whole chunk rather
// than of its first bytes, and deterministic, so the same content always gets the
// same key. (Format 1 first used the first 128 KiB, ~3 ms a chunk: a chunk stored by
// that rule may get the other codec now and then be stored once more under the other
// key; both objects are valid.)
// Hashing: node:crypto's createHash on the JS thread (SHA-NI: ~3.5 ms per 4 MiB here).
// WebCrypto's digest copies its input and hops to the thread pool: 5x slower per chunk
// (17 ms), and the copies fed the garbage collector. Whole-chunk compression (only for
// chunks whose sample compressed) runs on the libuv thread pool (zlib async).
import { createHash } from 'node:crypto';
import zlib from 'node:zlib';
import { promisify } from 'node:util';

export type Codec = 'raw' | 'br';

const brotli = promisify(zlib.brotliCompress);
const unbrotli = promisify(zlib.brotliDecompress);
const SLICE = 8 * 1024;
const SLICES = 4;

function brotliOpts(size: number): zlib.BrotliOptions {
  return {
    params: {
      [zlib.constants.BROTLI_PARAM_QUALITY]: 1,
      [zlib.constants.BROTLI_PARAM_SIZE_HINT]: size,
      [zlib.constants.BROTLI_PARAM_MODE]: zlib.constants.BROTLI_MODE_GENERIC,
    },
  };
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
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

/**
 * A pack (manifest version 2): the stored bytes of several small chunks one after the
 * other, named by the sha256 of the whole object. Each chunk in it is still named by the
 * sha256 of its own content in the manifest, which says where in the pack it lies.
 */
export function packKey(sha: string): string {
  return `chunks/${sha.slice(0, 2)}/${sha}.pack`;
}

/** the object holding a manifest entry's stored bytes: its pack, or its own chunk object */
export function objectKeyOf(e: readonly [number, number, string, Codec, number, string?, number?]): string {
  return e[5] !== undefined ? packKey(e[5]) : chunkKey(e[2], e[3]);
}

/** parse a chunk or pack key back; undefined for anything else */
export function parseChunkKey(key: string): { sha: string; codec: Codec | 'pack' } | undefined {
  const m = /^chunks\/[0-9a-f]{2}\/([0-9a-f]{64})\.(raw|br|pack)$/.exec(key);
  return m ? { sha: m[1], codec: m[2] as Codec | 'pack' } : undefined;
}

/** the codec this content will be stored with (deterministic) */
export function chooseCodec(data: Buffer): Codec {
  if (data.length < 4096) return 'raw';
  let sample: Buffer;
  if (data.length <= SLICE * SLICES) sample = data;
  else {
    sample = Buffer.allocUnsafe(SLICE * SLICES);
    for (let i = 0; i < SLICES; i++) {
      const at = Math.floor((data.length * i) / SLICES);
      data.copy(sample, i * SLICE, at, at + SLICE);
    }
  }
  const c = zlib.brotliCompressSync(sample, brotliOpts(sample.length));
  return c.length <= sample.length * 0.875 ? 'br' : 'raw';
}

/** the bytes stored for a chunk and their sha256 (for the request signature) */
export async function encode(data: Buffer, codec: Codec, contentSha: string): Promise<{ body: Buffer; sha: string }> {
  if (codec === 'raw') return { body: data, sha: contentSha };
  const body = await brotli(data, brotliOpts(data.length));
  return { body, sha: sha256(body) };
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
  const got = sha256(data);
  if (got !== sha) throw new ChunkError('corrupt', `sha256 is ${got}, expected ${sha}`);
  return data;
}
