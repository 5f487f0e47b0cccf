// Local control API: HTTP/JSON over a Unix socket inside the pool, mode 0600, so only
// the pool's owner can drive it. POST /v1/call {op, args} runs one pool operation
// (src/control/operations.ts); GET /v1/status describes the running server.
import http from 'node:http';
import fs from 'node:fs';
import type { Logger } from 'pino';
import { z } from 'zod';
import type { Pool } from '../pool/pool.js';
import { PoolError } from '../pool/names.js';
import { SnapshotError } from '../storage/volume.js';
import { runOperation } from './operations.js';

const STATUS: Record<string, number> = { EINVAL: 400, ENOENT: 404, EEXIST: 409, EBUSY: 409, ENOSPC: 507, ELOCKED: 423 };
const MAX_BODY = 64 * 1024;
const Call = z.object({ op: z.string(), args: z.unknown().optional() });

export class ControlServer {
  private readonly server: http.Server;

  constructor(
    private readonly pool: Pool,
    private readonly status: () => unknown,
    private readonly log: Logger,
  ) {
    this.server = http.createServer((req, res) => void this.handle(req, res));
  }

  async listen(socketPath: string): Promise<void> {
    fs.rmSync(socketPath, { force: true });
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      // Create the socket with no group/other permissions from the first instant.
      const old = process.umask(0o177);
      this.server.listen(socketPath, () => {
        process.umask(old);
        resolve();
      });
    });
    fs.chmodSync(socketPath, 0o600);
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const send = (code: number, body: unknown) => {
      res.writeHead(code, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body ?? {}));
    };
    try {
      const body = await readBody(req);
      if (req.method === 'GET' && req.url === '/v1/status') return send(200, this.status());
      if (req.method === 'POST' && req.url === '/v1/call') {
        const call = Call.parse(body);
        this.log.debug({ op: call.op }, 'control call');
        return send(200, await runOperation(this.pool, call.op, call.args));
      }
      send(404, { error: { code: 'ENOTFOUND', message: `no route ${req.method} ${req.url}` } });
    } catch (err) {
      const e = describeError(err);
      if (e.status >= 500) this.log.error({ err }, 'control API request failed');
      send(e.status, { error: { code: e.code, message: e.message } });
    }
  }
}

/** Map an error to an HTTP status and a stable code; unexpected errors are 500/EIO. */
export function describeError(err: unknown): { status: number; code: string; message: string } {
  if (err instanceof PoolError || err instanceof SnapshotError) return { status: STATUS[err.code] ?? 400, code: err.code, message: err.message };
  if (err instanceof z.ZodError) return { status: 400, code: 'EINVAL', message: err.issues.map((i) => `${i.path.join('.') || 'arguments'}: ${i.message}`).join('; ') };
  if (err instanceof BodyError) return { status: 400, code: 'EINVAL', message: err.message };
  return { status: 500, code: 'EIO', message: (err as Error).message };
}

class BodyError extends Error {}

async function readBody(req: http.IncomingMessage): Promise<unknown> {
  const parts: Buffer[] = [];
  let size = 0;
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > MAX_BODY) throw new BodyError(`request body larger than ${MAX_BODY} bytes`);
    parts.push(c as Buffer);
  }
  if (!size) return undefined;
  try {
    return JSON.parse(Buffer.concat(parts).toString('utf8'));
  } catch {
    throw new BodyError('request body is not valid JSON');
  }
}
