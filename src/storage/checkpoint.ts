// Checkpoint: the whole metadata of a volume in one file, replaced atomically.
// Layout: "SBCKPT01", u32 JSON length, JSON, the u32 arrays the JSON lists (little
// endian, in order), u32 CRC-32 of everything before it.
import fs from 'node:fs';
import zlib from 'node:zlib';
import { writeFileAtomic } from '../pool/atomic-file.js';

const MAGIC = Buffer.from('SBCKPT01');

export interface CheckpointData<M> {
  meta: M;
  arrays: Record<string, Uint32Array>;
}

export function writeCheckpoint<M extends object>(file: string, data: CheckpointData<M>): void {
  const names = Object.keys(data.arrays);
  const json = Buffer.from(JSON.stringify({ meta: data.meta, arrays: names.map((n) => [n, data.arrays[n].length]) }));
  const len = Buffer.allocUnsafe(4);
  len.writeUInt32LE(json.length, 0);
  const parts = [MAGIC, len, json, ...names.map((n) => Buffer.from(data.arrays[n].buffer, data.arrays[n].byteOffset, data.arrays[n].byteLength))];
  const body = Buffer.concat(parts);
  const crc = Buffer.allocUnsafe(4);
  crc.writeUInt32LE(zlib.crc32(body), 0);
  writeFileAtomic(file, Buffer.concat([body, crc]));
}

export function readCheckpoint<M>(file: string): CheckpointData<M> {
  const buf = fs.readFileSync(file);
  if (buf.length < 16 || !buf.subarray(0, 8).equals(MAGIC)) throw new Error(`${file}: not a snapblock checkpoint`);
  const body = buf.subarray(0, buf.length - 4);
  if (zlib.crc32(body) !== buf.readUInt32LE(buf.length - 4)) throw new Error(`${file}: checksum mismatch (corrupt checkpoint)`);
  const jlen = buf.readUInt32LE(8);
  const head = JSON.parse(buf.toString('utf8', 12, 12 + jlen)) as { meta: M; arrays: Array<[string, number]> };
  let pos = 12 + jlen;
  const arrays: Record<string, Uint32Array> = {};
  for (const [name, n] of head.arrays) {
    const a = new Uint32Array(n);
    Buffer.from(a.buffer).set(buf.subarray(pos, pos + n * 4));
    arrays[name] = a;
    pos += n * 4;
  }
  return { meta: head.meta, arrays };
}
