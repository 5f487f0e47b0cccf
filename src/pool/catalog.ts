// The pool catalog: which volumes exist and their sizes. One JSON file, replaced
// atomically; it is the truth, volume files are reconciled to it on open.
import fs from 'node:fs';
import { z } from 'zod';
import { writeFileAtomic } from './atomic-file.js';

export const CATALOG_FORMAT = 'snapblock-pool';
export const CATALOG_VERSION = 1;

const VolumeRecord = z.object({
  name: z.string(),
  size: z.number().int().nonnegative(),
  created: z.string(),
  /** backing file, relative to the pool directory */
  file: z.string(),
});
export type VolumeRecord = z.infer<typeof VolumeRecord>;

const CatalogSchema = z.object({
  format: z.literal(CATALOG_FORMAT),
  version: z.literal(CATALOG_VERSION),
  volumes: z.record(z.string(), VolumeRecord),
});
export type Catalog = z.infer<typeof CatalogSchema>;

export function emptyCatalog(): Catalog {
  return { format: CATALOG_FORMAT, version: CATALOG_VERSION, volumes: {} };
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
    if (typeof v === 'number' && v > CATALOG_VERSION) throw new Error(`pool catalog ${file} has format version ${v}; this snapblock reads version ${CATALOG_VERSION}`);
    throw new Error(`pool catalog ${file} is invalid: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  }
  return parsed.data;
}

export function writeCatalog(file: string, catalog: Catalog): void {
  writeFileAtomic(file, JSON.stringify(catalog, null, 2) + '\n');
}
