// `snapblock serve`: the pool, the NBD server and the control API in one process.
import fs from 'node:fs';
import tls from 'node:tls';
import type { Logger } from 'pino';
import { Pool } from './pool/pool.js';
import { NbdServer } from './nbd/server.js';
import { ControlServer } from './control/server.js';
import { ReplicationService } from './replication/service.js';
import { inlineWrites } from './storage/inline-write.js';

export interface ServeOptions {
  pool: string;
  listen?: { host: string; port: number };
  socket?: string;
  /** a negotiating client that sends no option for this long is dropped (default 30 s) */
  handshakeTimeoutMs?: number;
  /** permissions of the NBD Unix socket (default 0600) */
  socketMode?: number;
  tls?: { cert: string; key: string; ca?: string; required: boolean };
  log: Logger;
}

export interface Daemon {
  pool: Pool;
  nbd: NbdServer;
  port?: number;
  stop(): Promise<void>;
}

export async function startDaemon(opts: ServeOptions): Promise<Daemon> {
  const { log } = opts;
  const pool = await Pool.open(opts.pool, { log });
  const tlsPolicy = opts.tls
    ? {
        context: tls.createSecureContext({
          cert: fs.readFileSync(opts.tls.cert),
          key: fs.readFileSync(opts.tls.key),
          ca: opts.tls.ca ? fs.readFileSync(opts.tls.ca) : undefined,
        }),
        required: opts.tls.required,
        verifyClients: opts.tls.ca !== undefined,
      }
    : undefined;
  const replication = new ReplicationService(pool, log);
  const nbd = new NbdServer({ exports: replication.exports, log, tls: tlsPolicy, handshakeTimeoutMs: opts.handshakeTimeoutMs });
  let port: number | undefined;
  const endpoints: string[] = [];
  try {
    if (opts.listen) {
      port = (await nbd.listenTcp(opts.listen.host, opts.listen.port)).port;
      endpoints.push(`nbd://${opts.listen.host}:${port}`);
    }
    if (opts.socket) {
      await nbd.listenUnix(opts.socket, opts.socketMode);
      endpoints.push(`nbd+unix:///?socket=${opts.socket}`);
    }
  } catch (err) {
    await nbd.close();
    await replication.stop();
    await pool.close();
    throw err;
  }
  const started = new Date().toISOString();
  const control = new ControlServer(
    pool,
    () => ({ pid: process.pid, started, pool: pool.dir, endpoints, connections: nbd.connectionCount, tls: opts.tls ? (opts.tls.required ? 'required' : 'optional') : 'off' }),
    log,
  );
  await control.listen(pool.controlSocketPath);
  await replication.start();
  log.info({ pool: pool.dir, endpoints, control: pool.controlSocketPath }, 'snapblock serving');

  let stopping: Promise<void> | undefined;
  return {
    pool,
    nbd,
    port,
    stop: () =>
      (stopping ??= (async () => {
        log.info('shutting down: finishing in-flight requests');
        await nbd.close();
        await replication.stop();
        await control.close();
        await pool.close();
        fs.rmSync(pool.controlSocketPath, { force: true });
        // how buffered data writes were done in this run (inline-write.ts): for tests and tuning
        log.info({ dataWrites: inlineWrites.stats }, 'stopped cleanly');
      })()),
  };
}
