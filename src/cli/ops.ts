// Volume operations for the CLI: through the control API when a server owns the
// pool, directly on the pool (under its lock) when none does.
import path from 'node:path';
import { ControlClient } from '../control/client.js';
import { Pool, type CheckReport, type VolumeInfo } from '../pool/pool.js';
import type { Logger } from '../log.js';

export interface PoolOps {
  list(): Promise<VolumeInfo[]>;
  info(name: string): Promise<VolumeInfo>;
  create(name: string, size: number): Promise<VolumeInfo>;
  resize(name: string, size: number, force: boolean): Promise<VolumeInfo>;
  delete(name: string): Promise<void>;
  check(repair: boolean): Promise<CheckReport>;
  close(): Promise<void>;
}

export async function connectPool(dir: string, log: Logger): Promise<PoolOps> {
  const client = new ControlClient(path.join(path.resolve(dir), 'control.sock'));
  if (await client.alive()) return remoteOps(client);
  return localOps(Pool.open(dir, { log }));
}

function remoteOps(c: ControlClient): PoolOps {
  const v = (n: string) => `/v1/volumes/${encodeURIComponent(n)}`;
  return {
    list: () => c.request('GET', '/v1/volumes'),
    info: (n) => c.request('GET', v(n)),
    create: (name, size) => c.request('POST', '/v1/volumes', { name, size }),
    resize: (n, size, force) => c.request('POST', `${v(n)}/resize`, { size, force }),
    delete: async (n) => void (await c.request('DELETE', v(n))),
    check: async (repair) => {
      if (repair) throw new Error('check --repair needs exclusive use of the pool: stop the server first');
      return c.request('GET', '/v1/check');
    },
    close: async () => {},
  };
}

function localOps(pool: Pool): PoolOps {
  return {
    list: async () => pool.volumes(),
    info: async (n) => pool.info(n),
    create: async (n, s) => pool.create(n, s),
    resize: async (n, s, force) => pool.resize(n, s, { force }),
    delete: async (n) => pool.delete(n),
    check: async (repair) => pool.check({ repair }),
    close: () => pool.close(),
  };
}
