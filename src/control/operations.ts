// Every operation on a pool, defined once: the control API serves them to the CLI
// and other tools, and the CLI runs them in-process when no server owns the pool.
// Arguments are validated here, at the edge, with zod.
import { z } from 'zod';
import type { Pool } from '../pool/pool.js';
import { PoolError } from '../pool/names.js';
import { replicationOperations } from './replication-ops.js';

const name = z.string().min(1);
const mode = z.enum(['row', 'cow', 'mirror']);
const bytes = z.number().int().positive();

interface MirrorCapable {
  attachMirror(onProgress?: (done: number, total: number) => void): Promise<void>;
  waitForMirror(): Promise<void>;
  mirrorStatus(): unknown;
  detachMirror(): Promise<void>;
}

async function mirrorOf(pool: Pool, volume: string): Promise<MirrorCapable> {
  const v = await pool.volume(volume);
  if (v.mode !== 'mirror') throw new PoolError('EINVAL', `volume "${volume}" uses ${v.mode} snapshots; mirrors belong to volumes created with --snapshot-mode mirror`);
  return v as unknown as MirrorCapable;
}

export const operations = {
  'volume.list': { args: z.object({}), run: (p: Pool) => p.volumes() },
  'volume.info': { args: z.object({ name }), run: (p: Pool, a: { name: string }) => p.info(a.name) },
  'volume.create': {
    args: z.object({ name, size: bytes, mode: mode.optional(), blockSize: bytes.optional(), cowReserve: z.number().int().nonnegative().optional(), type: name.optional() }),
    run: (p: Pool, a: { name: string; size: number; mode?: 'row' | 'cow' | 'mirror'; blockSize?: number; cowReserve?: number; type?: string }) => p.create(a.name, a.size, a),
  },
  'volume.resize': { args: z.object({ name, size: bytes, force: z.boolean().optional() }), run: (p: Pool, a: { name: string; size: number; force?: boolean }) => p.resize(a.name, a.size, a) },
  'volume.delete': {
    args: z.object({ name, force: z.boolean().optional() }),
    run: async (p: Pool, a: { name: string; force?: boolean }) => (await p.delete(a.name, a), { deleted: a.name }),
  },
  'volume.clone': {
    args: z.object({ volume: name, snapshot: name, name }),
    run: (p: Pool, a: { volume: string; snapshot: string; name: string }) => p.clone(a.volume, a.snapshot, a.name),
  },
  'snapshot.list': { args: z.object({ volume: name }), run: (p: Pool, a: { volume: string }) => p.snapshots(a.volume) },
  'snapshot.create': { args: z.object({ volume: name, name }), run: (p: Pool, a: { volume: string; name: string }) => p.createSnapshot(a.volume, a.name) },
  'snapshot.delete': {
    args: z.object({ volume: name, name }),
    run: async (p: Pool, a: { volume: string; name: string }) => (await p.deleteSnapshot(a.volume, a.name), { deleted: `${a.volume}@${a.name}` }),
  },
  'snapshot.rollback': {
    args: z.object({ volume: name, name, force: z.boolean().optional() }),
    run: async (p: Pool, a: { volume: string; name: string; force?: boolean }) => (await p.rollback(a.volume, a.name, a), { rolledBack: `${a.volume}@${a.name}` }),
  },
  'snapshot.diff': {
    args: z.object({ volume: name, from: name, to: name.optional() }),
    run: (p: Pool, a: { volume: string; from: string; to?: string }) => p.diff(a.volume, a.from, a.to),
  },
  'mirror.attach': {
    args: z.object({ volume: name, wait: z.boolean().optional() }),
    run: async (p: Pool, a: { volume: string; wait?: boolean }) => {
      const m = await mirrorOf(p, a.volume);
      const done = m.attachMirror();
      if (a.wait) {
        await done;
        await m.waitForMirror(); // attach returns once the copy has started
      }
      else done.catch(() => {}); // progress and failure are visible in mirror.status and the log
      return m.mirrorStatus();
    },
  },
  'mirror.status': { args: z.object({ volume: name }), run: async (p: Pool, a: { volume: string }) => (await mirrorOf(p, a.volume)).mirrorStatus() },
  'mirror.detach': {
    args: z.object({ volume: name }),
    run: async (p: Pool, a: { volume: string }) => {
      const m = await mirrorOf(p, a.volume);
      await m.detachMirror();
      return m.mirrorStatus();
    },
  },
  'type.list': { args: z.object({}), run: async (p: Pool) => p.types() },
  'type.create': {
    args: z.object({ name, mode: mode.optional(), blockSize: bytes.optional(), cowReserve: z.number().int().nonnegative().optional() }),
    run: async (p: Pool, a: { name: string; mode?: 'row' | 'cow' | 'mirror'; blockSize?: number; cowReserve?: number }) => {
      const { name: n, ...t } = a;
      return p.createType(n, Object.fromEntries(Object.entries(t).filter(([, v]) => v !== undefined)));
    },
  },
  'type.delete': { args: z.object({ name }), run: async (p: Pool, a: { name: string }) => (p.deleteType(a.name), { deleted: a.name }) },
  check: { args: z.object({ repair: z.boolean().optional() }), run: (p: Pool, a: { repair?: boolean }) => p.check(a) },
  ...replicationOperations,
} as const;

export type OperationName = keyof typeof operations;

export function isOperation(op: string): op is OperationName {
  return Object.hasOwn(operations, op);
}

/** Validate and run one operation. */
export async function runOperation(pool: Pool, op: string, args: unknown): Promise<unknown> {
  if (!isOperation(op)) throw new PoolError('EINVAL', `unknown operation "${op}"`);
  const def = operations[op] as { args: z.ZodType; run: (p: Pool, a: unknown) => unknown };
  return def.run(pool, def.args.parse(args ?? {}));
}
