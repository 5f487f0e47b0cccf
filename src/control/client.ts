// Client for the control API over the pool's Unix socket.
import http from 'node:http';
import fs from 'node:fs';

export class ControlError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

export class ControlClient {
  constructor(readonly socketPath: string) {}

  /** true when a server is answering on the socket */
  async alive(): Promise<boolean> {
    if (!fs.existsSync(this.socketPath)) return false;
    try {
      await this.request('GET', '/v1/status');
      return true;
    } catch (err) {
      if (err instanceof ControlError) return true;
      return false;
    }
  }

  request<T = unknown>(method: string, path: string, body?: unknown): Promise<T> {
    const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const req = http.request(
        { socketPath: this.socketPath, method, path, headers: data ? { 'content-type': 'application/json', 'content-length': data.length } : {} },
        (res) => {
          const parts: Buffer[] = [];
          res.on('data', (c: Buffer) => parts.push(c));
          res.on('end', () => {
            let parsed: unknown;
            try {
              parsed = JSON.parse(Buffer.concat(parts).toString('utf8'));
            } catch {
              return reject(new ControlError('EIO', `control API sent a non-JSON reply (HTTP ${res.statusCode})`));
            }
            if ((res.statusCode ?? 500) >= 400) {
              const e = (parsed as { error?: { code?: string; message?: string } }).error;
              return reject(new ControlError(e?.code ?? 'EIO', e?.message ?? `HTTP ${res.statusCode}`));
            }
            resolve(parsed as T);
          });
        },
      );
      req.setTimeout(30_000, () => req.destroy(new Error('control API timed out')));
      req.on('error', reject);
      req.end(data);
    });
  }
}
