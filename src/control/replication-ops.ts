// Replication operations (docs/REPLICATION.md), in the shape of operations.ts: backends,
// replicated volume types, enable/disable, status, resync, failover and failback. With a
// running server they act on its live replication service; in-process (no server) they
// change the catalog and the region log, which the next `serve` acts on.
import { z } from 'zod';
import type { Pool } from '../pool/pool.js';
import type { VolumeReplication } from '../pool/catalog.js';
import { PoolError, validateName } from '../pool/names.js';
import { parseBackendUri } from '../replication/peer.js';
import { failbackVolume, markForResync, promoteVolume, serviceOf } from '../replication/service.js';
import { diskDetails, newGeneration, readReplicaState, writeReplicaState } from '../replication/disk-state.js';
import { createLogger } from '../log.js';

const name = z.string().min(1);
const replMode = z.enum(['sync', 'async']);
const onLinkLoss = z.enum(['block', 'degrade']);
const mode = z.enum(['row', 'cow', 'mirror']);
const bytes = z.number().int().positive();

function checkBackend(p: Pool, id: string): void {
  if (!p.backends()[id]) throw new PoolError('ENOENT', `no backend "${id}" (see: snapblock backend list)`);
}

async function statusOf(p: Pool, volume: string): Promise<Record<string, unknown>> {
  const info = await p.info(volume);
  // (a running server's status has the disk state already; in-process it comes from here)
  const disk = info.replication ? diskDetails(readReplicaState(p, volume)) : {};
  return { volume, replication_status: info.replication_status, ...disk, ...(info.replication ?? {}) };
}

export const replicationOperations = {
  'backend.add': {
    args: z.object({ id: name, uri: z.string().min(1) }),
    run: async (p: Pool, a: { id: string; uri: string }) => {
      validateName('backend', a.id);
      parseBackendUri(a.uri);
      if (p.backends()[a.id]) throw new PoolError('EEXIST', `backend "${a.id}" already exists`);
      p.setBackend(a.id, { uri: a.uri });
      return { id: a.id, uri: a.uri };
    },
  },
  'backend.list': { args: z.object({}), run: async (p: Pool) => p.backends() },
  'backend.remove': {
    args: z.object({ id: name }),
    run: async (p: Pool, a: { id: string }) => {
      if (!p.backends()[a.id]) throw new PoolError('ENOENT', `no backend "${a.id}"`);
      const users = p.replicatedVolumes().filter((v) => v.replication.backendId === a.id || v.replication.activeBackendId === a.id);
      const types = Object.entries(p.types()).filter(([, t]) => t.replication?.backendId === a.id);
      if (users.length || types.length) throw new PoolError('EBUSY', `backend "${a.id}" is used by ${[...users.map((u) => `volume ${u.name}`), ...types.map(([n]) => `type ${n}`)].join(', ')}`);
      p.setBackend(a.id, undefined);
      return { removed: a.id };
    },
  },
  'replication.type-create': {
    args: z.object({ name, mode: mode.optional(), blockSize: bytes.optional(), cowReserve: z.number().int().nonnegative().optional(), replication: replMode, backendId: name, onLinkLoss: onLinkLoss.optional() }),
    run: async (p: Pool, a: { name: string; mode?: 'row' | 'cow' | 'mirror'; blockSize?: number; cowReserve?: number; replication: 'sync' | 'async'; backendId: string; onLinkLoss?: 'block' | 'degrade' }) => {
      checkBackend(p, a.backendId);
      const t = Object.fromEntries(Object.entries({ mode: a.mode, blockSize: a.blockSize, cowReserve: a.cowReserve }).filter(([, v]) => v !== undefined));
      return p.createType(a.name, { ...t, replication: { mode: a.replication, backendId: a.backendId, ...(a.onLinkLoss ? { onLinkLoss: a.onLinkLoss } : {}) } });
    },
  },
  'replication.enable': {
    args: z.object({ volume: name, mode: replMode, backendId: name, onLinkLoss: onLinkLoss.optional() }),
    run: async (p: Pool, a: { volume: string; mode: 'sync' | 'async'; backendId: string; onLinkLoss?: 'block' | 'degrade' }) => {
      checkBackend(p, a.backendId);
      const r = p.replicationOf(a.volume);
      if (r && r.state !== 'disabled') throw new PoolError('EBUSY', `volume "${a.volume}" is already replicated (${r.role}, ${r.state}); disable it first`);
      const next: VolumeReplication = { mode: a.mode, backendId: a.backendId, onLinkLoss: a.onLinkLoss, role: 'primary', state: 'enabled', changed: new Date().toISOString() };
      // The log first (full initial sync, holes skipped): a write arriving once the volume
      // is a replicating primary starts a session, which must find the log all set.
      await markForResync(p, a.volume);
      // This copy is the source of a new pairing: whatever an earlier one recorded is void.
      writeReplicaState(p, a.volume, { disk: 'UpToDate', gen: newGeneration() });
      p.setVolumeReplication(a.volume, next);
      await serviceOf(p)?.startSession(a.volume);
      return statusOf(p, a.volume);
    },
  },
  'replication.disable': {
    args: z.object({ volume: name }),
    run: async (p: Pool, a: { volume: string }) => {
      const r = p.replicationOf(a.volume);
      if (!r) throw new PoolError('EINVAL', `volume "${a.volume}" is not replicated`);
      p.setVolumeReplication(a.volume, undefined);
      const svc = serviceOf(p);
      const s = svc?.session(a.volume);
      if (svc && s) await svc.reconcile();
      return statusOf(p, a.volume);
    },
  },
  'replication.status': {
    args: z.object({ volume: name.optional() }),
    run: async (p: Pool, a: { volume?: string }) => {
      const names = a.volume ? [a.volume] : p.replicatedVolumes().map((v) => v.name);
      return Promise.all(names.map((n) => statusOf(p, n)));
    },
  },
  'replication.resync': {
    args: z.object({ volume: name }),
    run: async (p: Pool, a: { volume: string }) => {
      const r = p.replicationOf(a.volume);
      if (r?.role !== 'primary' || r.state !== 'enabled') throw new PoolError('EINVAL', `volume "${a.volume}" is not a replicating primary`);
      const svc = serviceOf(p);
      if (svc) await svc.resync(a.volume);
      else await markForResync(p, a.volume);
      return statusOf(p, a.volume);
    },
  },
  'volume.failover': {
    args: z.object({ volume: name, backendId: name.optional(), force: z.boolean().optional() }),
    run: async (p: Pool, a: { volume: string; backendId?: string; force?: boolean }) => {
      const svc = serviceOf(p);
      if (svc) await svc.failover(a.volume, a.backendId, { force: a.force });
      else {
        const r = p.replicationOf(a.volume);
        if (r?.role === 'primary') throw new PoolError('EINVAL', `a planned failover from the primary needs its server running; to fail over without it, run failover against the secondary's pool`);
        promoteVolume(p, a.volume, a.backendId, { force: a.force });
      }
      return statusOf(p, a.volume);
    },
  },
  'volume.failback': {
    args: z.object({ volume: name, discardChangesOn: z.enum(['local', 'remote']).optional() }),
    run: async (p: Pool, a: { volume: string; discardChangesOn?: 'local' | 'remote' }) => {
      const svc = serviceOf(p);
      const opts = { discardChangesOn: a.discardChangesOn };
      const res = svc ? await svc.failback(a.volume, opts) : await failbackVolume(p, a.volume, createLogger({ level: 'warn' }), 5000, opts);
      return { ...(await statusOf(p, a.volume)), copiedBytes: res.copiedBytes, kept: res.kept };
    },
  },
} as const;
