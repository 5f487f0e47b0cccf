// Backup manifests: one JSON object per backup in the bucket (backups/<id>.json), so
// the bucket alone is enough to list, verify and restore. Format in docs/BACKUP.md.
//
// A full backup's image is zeros overlaid with its chunks. An incremental backup's
// image is its parent's image cut (or zero-extended) to the new size, with its
// `zeroed` ranges zeroed and its chunks written over: it stores only what changed,
// so it depends on its parent (and delete refuses to orphan it).
import { createHash } from 'node:crypto';
import { z } from 'zod';
import type { Codec } from './chunk.js';

export const MANIFEST_FORMAT = 'snapblock-backup';
export const MANIFEST_VERSION = 1;

/** [volume offset, length, sha256 of the content, codec, stored bytes] */
export type ChunkEntry = [number, number, string, Codec, number];
/** [offset, length] */
export type Range = [number, number];

const nonneg = z.number().int().nonnegative();
const ChunkEntrySchema = z.tuple([nonneg, z.number().int().positive(), z.string().regex(/^[0-9a-f]{64}$/), z.enum(['raw', 'br']), nonneg]);
const RangeSchema = z.tuple([nonneg, z.number().int().positive()]);

const SourceSchema = z.discriminatedUnion('type', [
  z.object({
    type: z.literal('pool'),
    volume: z.string(),
    /** creation time of the volume: a deleted and re-created volume of the same name is another source */
    volumeCreated: z.string(),
    snapshot: z.string(),
    /** the backup took this snapshot itself (and may delete it once a newer backup exists) */
    ownsSnapshot: z.boolean(),
  }),
  z.object({ type: z.literal('nbd'), uri: z.string(), export: z.string() }),
]);

export const ManifestSchema = z.object({
  format: z.literal(MANIFEST_FORMAT),
  version: z.literal(MANIFEST_VERSION),
  id: z.string(),
  kind: z.enum(['full', 'incremental']),
  parent: z.string().nullable(),
  /** snapshot name of the source (also in source; top level for humans) */
  snapshot: z.string().nullable(),
  created: z.string(),
  completed: z.string().nullable(),
  source: SourceSchema,
  size: nonneg,
  chunkSize: z.number().int().positive(),
  chunks: z.array(ChunkEntrySchema),
  zeroed: z.array(RangeSchema),
  stats: z.record(z.string(), z.number()),
  checksum: z.string(),
});

export type Manifest = z.infer<typeof ManifestSchema>;
export type BackupSource = Manifest['source'];

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

export function sealManifest(m: Manifest): Buffer {
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
  const r = ManifestSchema.safeParse(raw);
  if (!r.success) {
    const v = (raw as { version?: unknown })?.version;
    if ((raw as { format?: unknown })?.format === MANIFEST_FORMAT && v !== MANIFEST_VERSION) throw new ManifestError(`${key}: manifest version ${String(v)} is not supported (this snapblock reads version ${MANIFEST_VERSION})`);
    throw new ManifestError(`${key} is not a valid manifest: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  }
  const m = r.data;
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
    const own: Segment[] = m.chunks.map(([offset, length, sha, codec, stored]) => ({ offset, length, sha, codec, stored, within: 0, chunkLength: length, backup: m.id }));
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
