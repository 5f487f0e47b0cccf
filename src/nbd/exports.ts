// What the protocol needs to know about exports. The pool implements this; the
// protocol never sees files, volumes or snapshots.
import type { BlockLayer } from '../block/layer.js';

/** A metadata context an export offers besides base:allocation (e.g. changed blocks). */
export interface MetaContextSource {
  name: string;
  /** descriptors from offset on, consecutive; may cover less than length but at least one byte */
  descriptors(offset: number, length: number): Promise<Array<{ length: number; flags: number }>>;
}

export interface OpenedExport {
  name: string;
  description?: string;
  layer: BlockLayer;
  metaContexts?: MetaContextSource[];
  /** called once when the connection that opened it ends */
  release(): Promise<void>;
}

export interface ExportProvider {
  list(): Promise<Array<{ name: string; description?: string }>>;
  /** undefined when no export has that name */
  open(name: string): Promise<OpenedExport | undefined>;
}
