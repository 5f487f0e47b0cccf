// Where the CLI's operations run: through the control API when a server owns the
// pool, in-process on the pool (under its lock) when none does.
import path from 'node:path';
import { ControlClient } from '../control/client.js';
import { runOperation } from '../control/operations.js';
import { Pool } from '../pool/pool.js';
import type { Logger } from '../log.js';

export interface PoolCaller {
  call<T = unknown>(op: string, args?: unknown): Promise<T>;
  readonly live: boolean;
  close(): Promise<void>;
}

/** opts apply with no server: how to open the pool (Pool.open). */
export async function connectPool(dir: string, log: Logger, opts: { forCheck?: boolean } = {}): Promise<PoolCaller> {
  const client = new ControlClient(path.join(path.resolve(dir), 'control.sock'));
  if (await client.alive()) {
    return { live: true, call: (op, args) => client.request('POST', '/v1/call', { op, args: args ?? {} }), close: async () => {} };
  }
  const pool = await Pool.open(dir, { log, ...opts });
  return {
    live: false,
    call: async <T>(op: string, args?: unknown) => (await runOperation(pool, op, args)) as T,
    close: () => pool.close(),
  };
}
