// Local control API: HTTP/JSON over a Unix socket inside the pool, mode 0600, so only
// the pool's owner can drive it. The CLI uses it for every operation on a live pool.
import http from 'node:http';
import fs from 'node:fs';
import type { Logger } from 'pino';
import { z } from 'zod';
import type { Pool } from '../pool/pool.js';
import { PoolError } from '../pool/names.js';
import { CreateVolume, ResizeVolume } from './api.js';

const STATUS: Record<string, number> = { EINVAL: 400, ENOENT: 404, EEXIST: 409, EBUSY: 409, ENOSPC: 507, ELOCKED: 423 };
const MAX_BODY = 64 * 1024;

type Handler = (params: string[], body: unknown) => unknown | Promise<unknown>;

export class ControlServer {
  private readonly server: http.Server;
  private readonly routes: Array<{ method: string; pattern: RegExp; handler: Handler }> = [];

  constructor(
    private readonly pool: Pool,
    private readonly status: () => unknown,
    private readonly log: Logger,
  ) {
    const vol = '([^/]+)';
    this.route('GET', '^/v1/status$', () => this.status());
    this.route('GET', '^/v1/volumes$', () => this.pool.volumes());
    this.route('POST', '^/v1/volumes$', (_p, b) => {
      const req = CreateVolume.parse(b);
      return this.pool.create(req.name, req.size);
    });
    this.route('GET', `^/v1/volumes/${vol}$`, ([n]) => this.pool.info(n));
    this.route('POST', `^/v1/volumes/${vol}/resize$`, ([n], b) => {
      const req = ResizeVolume.parse(b);
      return this.pool.resize(n, req.size, { force: req.force });
    });
    this.route('DELETE', `^/v1/volumes/${vol}$`, ([n]) => {
      this.pool.delete(n);
      return { deleted: n };
    });
    this.route('GET', '^/v1/check$', () => this.pool.check());
    this.server = http.createServer((req, res) => void this.handle(req, res));
  }

  private route(method: string, pattern: string, handler: Handler): void {
    this.routes.push({ method, pattern: new RegExp(pattern), handler });
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
      res.end(JSON.stringify(body));
    };
    try {
      const url = new URL(req.url ?? '/', 'http://local');
      const body = await readBody(req);
      for (const r of this.routes) {
        const m = r.pattern.exec(url.pathname);
        if (!m || r.method !== req.method) continue;
        const params = m.slice(1).map(decodeURIComponent);
        return send(200, (await r.handler(params, body)) ?? {});
      }
      send(404, { error: { code: 'ENOTFOUND', message: `no route ${req.method} ${url.pathname}` } });
    } catch (err) {
      if (err instanceof PoolError) return send(STATUS[err.code] ?? 400, { error: { code: err.code, message: err.message } });
      if (err instanceof z.ZodError) {
        return send(400, { error: { code: 'EINVAL', message: err.issues.map((i) => `${i.path.join('.') || 'body'}: ${i.message}`).join('; ') } });
      }
      if (err instanceof BodyError) return send(400, { error: { code: 'EINVAL', message: err.message } });
      this.log.error({ err }, 'control API request failed');
      send(500, { error: { code: 'EIO', message: (err as Error).message } });
    }
  }
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
