// Backup manifests: one JSON object per backup in the bucket (backups/<id>.json), so
// the bucket alone is enough to list, verify and restore. Format in docs/BACKUP.md.
//
// A full backup's image is zeros overlaid with its chunks. An incremental backup's
// image is its parent's image cut (or zero-extended) to the new size, with its
// `zeroed` ranges zeroed and its chunks written over: it stores only what changed,
// so it depends on its parent (and delete refuses to orphan it).
//
// Validation is written out here rather than with zod: loading zod costs ~0.15 s of CPU
// at start-up on this box, as much as a no-change incremental backup's own work.
import { createHash } from 'node:crypto';
import type { Codec } from './chunk.js';

export const MANIFEST_FORMAT = 'snapblock-backup';
/**
 * The newest manifest version this code reads and writes. Version 1: every chunk is its
 * own object. Version 2 adds pack references: a chunk entry with two more fields lives
 * at a byte offset inside a pack object (chunks/<hh>/<sha256 of the pack>.pack). A
 * manifest is written with the lowest version that can express it (1 when it names no
 * pack), so older readers still restore every backup that does not need version 2.
 */
export const MANIFEST_VERSION = 2;
export const MANIFEST_VERSIONS = [1, 2] as const;
export type ManifestVersion = (typeof MANIFEST_VERSIONS)[number];

/**
 * [volume offset, length, sha256 of the content, codec, stored bytes], and in version 2
 * optionally [..., sha256 of the pack object, byte offset of the stored bytes in it]
 */
export type ChunkEntry = [number, number, string, Codec, number] | [number, number, string, Codec, number, string, number];
/** [offset, length] */
export type Range = [number, number];

export type BackupSource =
  | {
      type: 'pool';
      volume: string;
      /** creation time of the volume: a deleted and re-created volume of the same name is another source */
      volumeCreated: string;
      snapshot: string;
      /** the backup took this snapshot itself (and may delete it once a newer backup exists) */
      ownsSnapshot: boolean;
    }
  | { type: 'nbd'; uri: string; export: string };

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  version: ManifestVersion;
  id: string;
  kind: 'full' | 'incremental';
  parent: string | null;
  /** snapshot name of the source (also in source; top level for humans) */
  snapshot: string | null;
  created: string;
  completed: string | null;
  source: BackupSource;
  size: number;
  chunkSize: number;
  chunks: ChunkEntry[];
  zeroed: Range[];
  stats: Record<string, number>;
  checksum: string;
}

// ---- validation: every problem with its path; only the known fields are kept --------
type Check = (v: unknown, path: string, issues: string[]) => unknown;
const fail = (issues: string[], path: string, msg: string) => void issues.push(`${path || '(root)'}: ${msg}`);
const str: Check = (v, p, i) => (typeof v === 'string' ? v : fail(i, p, 'expected a string'));
const nullable = (c: Check): Check => (v, p, i) => (v === null ? null : c(v, p, i));
const int = (min: number): Check => (v, p, i) => (typeof v === 'number' && Number.isSafeInteger(v) && v >= min ? v : fail(i, p, `expected an integer >= ${min}`));
const oneOf = (...vals: unknown[]): Check => (v, p, i) => (vals.includes(v) ? v : fail(i, p, `expected ${vals.map((x) => JSON.stringify(x)).join(' or ')}`));
const bool: Check = (v, p, i) => (typeof v === 'boolean' ? v : fail(i, p, 'expected a boolean'));
const sha: Check = (v, p, i) => (typeof v === 'string' && /^[0-9a-f]{64}$/.test(v) ? v : fail(i, p, 'expected 64 lowercase hex digits'));
const tuple = (...items: Check[]): Check => (v, p, i) => (Array.isArray(v) && v.length === items.length ? items.map((c, k) => c(v[k], `${p}.${k}`, i)) : fail(i, p, `expected an array of ${items.length}`));
/** a tuple of `min` items, or of all of them */
const tupleOpt = (min: number, ...items: Check[]): Check => (v, p, i) =>
  Array.isArray(v) && (v.length === min || v.length === items.length) ? v.map((x, k) => items[k](x, `${p}.${k}`, i)) : fail(i, p, `expected an array of ${min} or ${items.length}`);
const array = (c: Check): Check => (v, p, i) => (Array.isArray(v) ? v.map((x, k) => c(x, `${p}.${k}`, i)) : fail(i, p, 'expected an array'));
const object = (shape: Record<string, Check>): Check => (v, p, i) => {
  if (!v || typeof v !== 'object' || Array.isArray(v)) return fail(i, p, 'expected an object');
  const o = v as Record<string, unknown>;
  return Object.fromEntries(Object.entries(shape).map(([k, c]) => [k, c(o[k], p ? `${p}.${k}` : k, i)]));
};
const numbers: Check = (v, p, i) => {
  if (!v || typeof v !== 'object' || Array.isArray(v)) return fail(i, p, 'expected an object');
  for (const [k, x] of Object.entries(v)) if (typeof x !== 'number') fail(i, `${p}.${k}`, 'expected a number');
  return { ...v };
};
const source: Check = (v, p, i) => {
  const t = (v as { type?: unknown } | null)?.type;
  if (t === 'pool') return object({ type: str, volume: str, volumeCreated: str, snapshot: str, ownsSnapshot: bool })(v, p, i);
  if (t === 'nbd') return object({ type: str, uri: str, export: str })(v, p, i);
  return fail(i, `${p}.type`, 'expected "pool" or "nbd"');
};
const chunkV1 = tuple(int(0), int(1), sha, oneOf('raw', 'br'), int(0));
const chunkV2 = tupleOpt(5, int(0), int(1), sha, oneOf('raw', 'br'), int(0), sha, int(0));
const manifestShape = (chunk: Check) => ({
  format: oneOf(MANIFEST_FORMAT),
  version: oneOf(...MANIFEST_VERSIONS),
  id: str,
  kind: oneOf('full', 'incremental'),
  parent: nullable(str),
  snapshot: nullable(str),
  created: str,
  completed: nullable(str),
  source,
  size: int(0),
  chunkSize: int(1),
  chunks: array(chunk),
  zeroed: array(tuple(int(0), int(1))),
  stats: numbers,
  checksum: str,
});
const manifestCheck = { 1: object(manifestShape(chunkV1)), 2: object(manifestShape(chunkV2)) } as const;

export const manifestKey = (id: string) => `backups/${id}.json`;
export const partialKey = (id: string) => `backups/${id}.partial.json`;
export function idOfKey(key: string): { id: string; partial: boolean } | undefined {
  const m = /^backups\/([^/]+?)(\.partial)?\.json$/.exec(key);
  return m ? { id: m[1], partial: m[2] !== undefined } : undefined;
}

/** JSON with object keys sorted at every level (arrays keep their order) */
export function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(',')}]`;
  if (v && typeof v === 'object') {
    const o = v as Record<string, unknown>;
    return `{${Object.keys(o).filter((k) => o[k] !== undefined).sort().map((k) => `${JSON.stringify(k)}:${canonicalJson(o[k])}`).join(',')}}`;
  }
  return JSON.stringify(v);
}

/** "sha256:<hex>" over the canonical JSON of the manifest with the checksum field empty */
export function manifestChecksum(m: Manifest): string {
  return 'sha256:' + createHash('sha256').update(canonicalJson({ ...m, checksum: '' })).digest('hex');
}

/** the lowest version that expresses the manifest: 2 only when it names a pack */
export function versionFor(chunks: ChunkEntry[]): ManifestVersion {
  return chunks.some((c) => c.length > 5) ? 2 : 1;
}

export function sealManifest(m: Manifest): Buffer {
  m.version = versionFor(m.chunks);
  m.checksum = manifestChecksum(m);
  return Buffer.from(JSON.stringify(m));
}

export class ManifestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ManifestError';
  }
}

export function parseManifest(buf: Buffer, key: string): Manifest {
  let raw: unknown;
  try {
    raw = JSON.parse(buf.toString('utf8'));
  } catch {
    throw new ManifestError(`${key} is not JSON`);
  }
  const issues: string[] = [];
  const v = (raw as { version?: unknown })?.version;
  const known = MANIFEST_VERSIONS.includes(v as ManifestVersion);
  const m = manifestCheck[known ? (v as ManifestVersion) : MANIFEST_VERSION](raw, '', issues) as Manifest;
  if (issues.length) {
    if ((raw as { format?: unknown })?.format === MANIFEST_FORMAT && !known) throw new ManifestError(`${key}: manifest version ${String(v)} is not supported (this snapblock reads versions ${MANIFEST_VERSIONS.join(' and ')})`);
    throw new ManifestError(`${key} is not a valid manifest: ${issues.slice(0, 10).join('; ')}${issues.length > 10 ? `; and ${issues.length - 10} more` : ''}`);
  }
  // over the object as stored (fields this version does not know count too)
  if (manifestChecksum(raw as Manifest) !== m.checksum) throw new ManifestError(`${key}: checksum mismatch (the manifest was altered or damaged)`);
  checkEntries(m, key);
  return m;
}

function checkEntries(m: Manifest, key: string): void {
  let end = 0;
  for (const [off, len] of m.chunks) {
    if (off < end || off + len > m.size) throw new ManifestError(`${key}: chunk at ${off} overlaps or lies past the end`);
    if (Math.floor(off / m.chunkSize) !== Math.floor((off + len - 1) / m.chunkSize)) throw new ManifestError(`${key}: chunk at ${off} crosses a chunk boundary`);
    end = off + len;
  }
}

// ---------------------------------------------------------------------------
// Effective image of a backup: resolve the chain into data segments.
// ---------------------------------------------------------------------------

/** A run of the image that comes from a chunk: [offset, offset+length) = chunk bytes [within, within+length). */
export interface Segment {
  offset: number;
  length: number;
  sha: string;
  codec: Codec;
  stored: number;
  /** offset inside the chunk's content */
  within: number;
  /** full length of the chunk's content */
  chunkLength: number;
  /** the backup whose manifest names the chunk */
  backup: string;
  /** version 2: the pack object holding the chunk's stored bytes, and where in it */
  pack?: string;
  packAt?: number;
}

/** Remove [a, b) ranges (sorted, not overlapping) from sorted segments. */
function cut(segs: Segment[], ranges: Range[], limit: number): Segment[] {
  const out: Segment[] = [];
  let r = 0;
  for (const s of segs) {
    let start = s.offset;
    const end = Math.min(s.offset + s.length, limit);
    while (r < ranges.length && ranges[r][0] + ranges[r][1] <= start) r++;
    let k = r;
    while (start < end) {
      const rr = ranges[k];
      if (!rr || rr[0] >= end) {
        out.push({ ...s, offset: start, length: end - start, within: s.within + (start - s.offset) });
        break;
      }
      if (rr[0] > start) out.push({ ...s, offset: start, length: rr[0] - start, within: s.within + (start - s.offset) });
      start = Math.max(start, rr[0] + rr[1]);
      k++;
    }
  }
  return out;
}

function mergeSorted(a: Segment[], b: Segment[]): Segment[] {
  const out: Segment[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    if (j >= b.length || (i < a.length && a[i].offset < b[j].offset)) out.push(a[i++]);
    else out.push(b[j++]);
  }
  return out;
}

/** chain: oldest (the full backup) first */
export function resolveImage(chain: Manifest[]): Segment[] {
  let segs: Segment[] = [];
  for (const m of chain) {
    const own: Segment[] = m.chunks.map(([offset, length, sha, codec, stored, pack, packAt]) => ({ offset, length, sha, codec, stored, within: 0, chunkLength: length, backup: m.id, ...(pack !== undefined ? { pack, packAt } : {}) }));
    const covered: Range[] = mergeRanges([...m.zeroed, ...m.chunks.map(([o, l]) => [o, l] as Range)]);
    segs = mergeSorted(cut(segs, covered, m.size), own);
  }
  return segs;
}

/** sort and coalesce ranges */
export function mergeRanges(ranges: Range[]): Range[] {
  const sorted = ranges.filter((r) => r[1] > 0).sort((a, b) => a[0] - b[0]);
  const out: Range[] = [];
  for (const [o, l] of sorted) {
    const last = out[out.length - 1];
    if (last && o <= last[0] + last[1]) last[1] = Math.max(last[1], o + l - last[0]);
    else out.push([o, l]);
  }
  return out;
}
