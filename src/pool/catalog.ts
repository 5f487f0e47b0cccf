// The pool catalog: which volumes and volume types exist and how each volume is
// configured. One JSON file, replaced atomically; a volume's blocks and snapshots
// live in its own directory (docs/FORMAT.md).
import fs from 'node:fs';
import { z } from 'zod';
import { writeFileAtomic } from './atomic-file.js';

export const CATALOG_FORMAT = 'snapblock-pool';
export const CATALOG_VERSION = 2;

const Mode = z.enum(['row', 'cow', 'mirror']);

/** Replication settings of a volume type (docs/REPLICATION.md). */
export const ReplicationSpec = z.object({
  mode: z.enum(['sync', 'async']),
  /** a backend named in the catalog's `backends` */
  backendId: z.string(),
  /** sync mode when the link is lost: hold writes (RPO 0, default) or continue as async */
  onLinkLoss: z.enum(['block', 'degrade']).optional(),
});
export type ReplicationSpec = z.infer<typeof ReplicationSpec>;

/** A volume's replication state; changes only on enable/disable, failover and failback. */
export const VolumeReplication = z.object({
  mode: z.enum(['sync', 'async']),
  /** primary: the backend replicated to; secondary: unset (fed by a peer) */
  backendId: z.string().optional(),
  onLinkLoss: z.enum(['block', 'degrade']).optional(),
  role: z.enum(['primary', 'secondary']),
  state: z.enum(['enabled', 'disabled', 'failed-over', 'failover-error']),
  /** where the volume's active copy lives; unset = here (Cinder's active_backend_id) */
  activeBackendId: z.string().optional(),
  /** the peer this secondary was last fed from (informational) */
  peer: z.string().optional(),
  changed: z.string().optional(),
});
export type VolumeReplication = z.infer<typeof VolumeReplication>;

export const Backend = z.object({ uri: z.string() });
export type Backend = z.infer<typeof Backend>;

export const VolumeType = z.object({
  mode: Mode,
  blockSize: z.number().int().positive(),
  cowReserve: z.number().int().nonnegative(),
  replication: ReplicationSpec.optional(),
});
export type VolumeType = z.infer<typeof VolumeType>;

const VolumeRecord = z.object({
  name: z.string(),
  created: z.string(),
  /** the volume's directory, relative to the pool directory */
  dir: z.string(),
  mode: Mode,
  blockSize: z.number().int().positive(),
  cowReserve: z.number().int().nonnegative(),
  type: z.string().optional(),
  /** clones: the snapshot whose content shows through unwritten blocks */
  base: z.object({ volume: z.string(), snapshot: z.string() }).optional(),
  replication: VolumeReplication.optional(),
});
export type VolumeRecord = z.infer<typeof VolumeRecord>;

const CatalogSchema = z.object({
  format: z.literal(CATALOG_FORMAT),
  version: z.literal(CATALOG_VERSION),
  volumes: z.record(z.string(), VolumeRecord),
  types: z.record(z.string(), VolumeType),
  /** named replication targets (snapblock backend add) */
  backends: z.record(z.string(), Backend).optional(),
});
export type Catalog = z.infer<typeof CatalogSchema>;

export function emptyCatalog(): Catalog {
  return { format: CATALOG_FORMAT, version: CATALOG_VERSION, volumes: {}, types: {} };
}

export function readCatalog(file: string): Catalog {
  if (!fs.existsSync(file)) return emptyCatalog();
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`pool catalog ${file} is not valid JSON (${(err as Error).message})`);
  }
  const parsed = CatalogSchema.safeParse(raw);
  if (!parsed.success) {
    const v = (raw as { version?: unknown })?.version;
    if (typeof v === 'number' && v !== CATALOG_VERSION) throw new Error(`pool catalog ${file} has format version ${v}; this snapblock reads version ${CATALOG_VERSION}`);
    throw new Error(`pool catalog ${file} is invalid: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  }
  return parsed.data;
}

export function writeCatalog(file: string, catalog: Catalog): void {
  writeFileAtomic(file, JSON.stringify(catalog, null, 2) + '\n');
}
