// The pool catalog: which volumes and volume types exist and how each volume is
// configured. One JSON file, replaced atomically; a volume's blocks and snapshots
// live in its own directory (docs/FORMAT.md).
import fs from 'node:fs';
import { z } from 'zod';
import { writeFileAtomic } from './atomic-file.js';

export const CATALOG_FORMAT = 'snapblock-pool';
export const CATALOG_VERSION = 2;

const Mode = z.enum(['row', 'cow', 'mirror']);

export const VolumeType = z.object({
  mode: Mode,
  blockSize: z.number().int().positive(),
  cowReserve: z.number().int().nonnegative(),
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
});
export type VolumeRecord = z.infer<typeof VolumeRecord>;

const CatalogSchema = z.object({
  format: z.literal(CATALOG_FORMAT),
  version: z.literal(CATALOG_VERSION),
  volumes: z.record(z.string(), VolumeRecord),
  types: z.record(z.string(), VolumeType),
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
