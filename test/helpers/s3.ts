// A real S3 endpoint for tests (Ceph RADOS Gateway, started by scripts/s3/start.sh)
// and a TCP fault proxy to put in front of it.
import { execFile } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
// The SDK version is pinned (package.json): its "node >= 22 after January 2027" notice is noise here.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
const ROOT = path.resolve(import.meta.dirname, '..', '..');
/** One cluster for the whole checkout (git-ignored); override with SNAPBLOCK_S3_DIR. */
export const S3_DATA_DIR = process.env.SNAPBLOCK_S3_DIR ?? path.join(ROOT, '.cache', 's3', 'ceph');

export interface S3Endpoint {
  endpoint: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** ceph.conf of the same cluster, for `rbd`/`rados` (CEPH_CONF=...) */
  cephConf: string;
  /** pool for rbd images, '' if none */
  rbdPool: string;
  /** Release this user of the cluster; the last one stops it (unless it was started by hand). */
  stop(): Promise<void>;
}

/** `export K='V'` lines printed by start.sh (and kept in DATA_DIR/env) */
function parseEnv(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const m of text.matchAll(/^export (\w+)='([^']*)'$/gm)) env[m[1]] = m[2];
  return env;
}

let leases = 0;

/**
 * Start the cluster, or join the one already running on S3_DATA_DIR (start.sh
 * checks its pid files and asks the endpoint, ~0.6 s). Each call takes a lease
 * (a file naming this process); stop() drops it and stops the daemons only when
 * no other live process holds one, so parallel test files share one cluster.
 * A cluster started by hand (`scripts/s3/start.sh .cache/s3/ceph`) stays up
 * across test runs until `scripts/s3/stop.sh .cache/s3/ceph`.
 * First start 7-17 s on a busy 2-core box (plus ~85 s once for the Debian
 * packages); restart on existing data 4-8 s.
 */
export async function startS3(): Promise<S3Endpoint> {
  const script = path.join(ROOT, 'scripts', 's3');
  const lease = `${process.pid}-${++leases}`;
  let stdout: string;
  try {
    ({ stdout } = await run('bash', [path.join(script, 'start.sh'), S3_DATA_DIR], {
      env: { ...process.env, S3_LEASE: lease, S3_LEASE_PID: String(process.pid) },
      timeout: 600_000, // a first run installs the Debian packages
    }));
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`scripts/s3/start.sh failed: ${e.stderr || e.message}`);
  }
  const env = parseEnv(stdout); // the same lines as DATA_DIR/env
  const res = await fetch(env.S3_ENDPOINT, { method: 'HEAD' });
  if (!res.ok) throw new Error(`S3 endpoint ${env.S3_ENDPOINT} answered HEAD / with ${res.status}`);
  let stopped = false;
  return {
    endpoint: env.S3_ENDPOINT,
    region: env.S3_REGION,
    accessKeyId: env.AWS_ACCESS_KEY_ID,
    secretAccessKey: env.AWS_SECRET_ACCESS_KEY,
    cephConf: env.CEPH_CONF,
    rbdPool: env.S3_RBD_POOL,
    async stop() {
      if (stopped) return;
      stopped = true;
      await run('bash', [path.join(script, 'stop.sh'), S3_DATA_DIR, '--release', lease], { timeout: 120_000 });
    },
  };
}

// ---------------------------------------------------------------------------
// Fault proxy: TCP between the client and the S3 endpoint, aware of where each
// HTTP/1.1 request starts (request head + Content-Length body), so a fault hits
// the next request even on a kept-alive connection. Modes:
//
//   pass                 forward bytes both ways
//   drop [n]             reset the connection when a request arrives, for the
//                        next n requests (default: all): a server crash
//   http503 [n]          answer the next n requests (default 1) with `503` and an
//                        S3 XML error body (opts.errorCode: SlowDown, the default,
//                        or ServiceUnavailable), then close; nothing reaches S3
//   slow ms              deliver every chunk ms later, both directions
//   reset-after-bytes n  reset each connection n bytes (both directions) after
//                        its next request starts: a cut in mid-transfer
//
// drop and http503 fall back to pass once their count is used up. A request
// with `Transfer-Encoding: chunked` turns its connection into a plain pipe
// (faults no longer see request boundaries there); the AWS SDK sends lengths.
// ---------------------------------------------------------------------------

export type FaultMode = 'pass' | 'drop' | 'http503' | 'slow' | 'reset-after-bytes';

export interface FaultStats {
  connections: number;
  requests: number;
  dropped: number;
  http503: number;
  resets: number;
  /** bytes forwarded client→server and server→client */
  bytesUp: number;
  bytesDown: number;
}

export interface FaultProxy {
  port: number;
  /** http://127.0.0.1:port, to use as the S3 endpoint */
  endpoint: string;
  setMode(mode: FaultMode, arg?: number): void;
  stats(): FaultStats;
  close(): Promise<void>;
}

export interface FaultProxyOptions {
  mode?: FaultMode;
  arg?: number;
  errorCode?: 'SlowDown' | 'ServiceUnavailable';
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function s3Error503(code: string, n: number, isHead: boolean): string {
  const message = code === 'SlowDown' ? 'Please reduce your request rate.' : 'Service is unable to handle request.';
  const body =
    `<?xml version="1.0" encoding="UTF-8"?>\n` +
    `<Error><Code>${code}</Code><Message>${message}</Message><RequestId>faultproxy-${n}</RequestId></Error>`;
  return (
    `HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n` +
    `Content-Length: ${Buffer.byteLength(body)}\r\nx-amz-request-id: faultproxy-${n}\r\n` +
    `Connection: close\r\n\r\n${isHead ? '' : body}` // a HEAD response has no body
  );
}

export async function startFaultProxy(
  target: { host: string; port: number },
  opts: FaultProxyOptions = {},
): Promise<FaultProxy> {
  const stats: FaultStats = { connections: 0, requests: 0, dropped: 0, http503: 0, resets: 0, bytesUp: 0, bytesDown: 0 };
  const sockets = new Set<net.Socket>();
  let mode: FaultMode = 'pass';
  let arg = 0; // ms for slow, bytes for reset-after-bytes, remaining count for drop/http503

  const setMode = (m: FaultMode, a?: number) => {
    mode = m;
    arg = a ?? (m === 'drop' ? Infinity : m === 'http503' ? 1 : 0);
  };
  /** the fault for a request that starts now, counting down drop/http503 */
  const take = (): [FaultMode, number] => {
    const taken: [FaultMode, number] = [mode, arg];
    if ((mode === 'drop' || mode === 'http503') && --arg <= 0) setMode('pass');
    return taken;
  };

  const onConnection = (client: net.Socket) => {
    stats.connections++;
    let upstream: net.Socket | undefined;
    let budget = Infinity; // bytes left before a reset-after-bytes cut
    let answered = false; // a 503 went out: this connection only closes now
    const track = (s: net.Socket) => {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {});
    };
    track(client);
    const kill = () => {
      client.resetAndDestroy();
      upstream?.resetAndDestroy();
    };

    // An ordered writer to one side; in slow mode each chunk waits its turn.
    const writer = (to: () => net.Socket, from: () => net.Socket | undefined, counter: 'bytesUp' | 'bytesDown') => {
      let queue = Promise.resolve();
      let queued = 0;
      const later = (fn: () => void) => {
        const delay = mode === 'slow' ? arg : 0;
        if (!delay && !queued) return fn();
        const due = Date.now() + delay;
        queued++;
        queue = queue.then(() => sleep(due - Date.now())).then(() => (queued--, fn()));
      };
      const write = (chunk: Buffer) => {
        if (budget <= 0) return;
        if (chunk.length > budget) chunk = chunk.subarray(0, budget);
        budget -= chunk.length;
        stats[counter] += chunk.length;
        const cut = budget <= 0;
        later(() => {
          const dst = to();
          if (dst.destroyed) return;
          const flowing = dst.write(chunk, cut ? () => (stats.resets++, kill()) : undefined);
          const src = from();
          if (!flowing && src) {
            src.pause();
            dst.once('drain', () => src.resume());
          }
        });
      };
      return { write, end: () => later(() => to().end()) };
    };
    const up = writer(() => upstream!, () => client, 'bytesUp');
    const down = writer(() => client, () => upstream, 'bytesDown');
    const connectUpstream = () => {
      upstream = net.connect(target.port, target.host);
      track(upstream);
      upstream.on('data', down.write);
      upstream.on('end', down.end);
      upstream.on('close', () => answered || client.destroy());
      client.on('close', () => upstream!.destroy());
    };

    // Client→server: find where each request starts.
    let state: 'head' | 'body' | 'pipe' | 'closing' = 'head';
    let head = Buffer.alloc(0);
    let bodyLeft = 0;
    let refused: string | undefined; // the 503 for the current request
    const answer = () => {
      if (answered || !refused) return;
      answered = true;
      upstream?.destroy();
      client.end(refused);
    };
    const startRequest = (reqHead: Buffer) => {
      stats.requests++;
      const text = reqHead.toString('latin1');
      const chunked = /\r\ntransfer-encoding:\s*chunked/i.test(text);
      bodyLeft = chunked ? 0 : Number(/\r\ncontent-length:\s*(\d+)/i.exec(text)?.[1] ?? 0);
      const [m, a] = take();
      if (m === 'drop') {
        stats.dropped++;
        state = 'closing';
        return kill();
      }
      if (m === 'http503') {
        stats.http503++;
        refused = s3Error503(opts.errorCode ?? 'SlowDown', stats.http503, text.startsWith('HEAD '));
        // With `Expect: 100-continue` the client waits for an answer before its body.
        if (bodyLeft === 0 || /\r\nexpect:\s*100-continue/i.test(text)) answer();
        state = bodyLeft > 0 ? 'body' : 'closing';
        return;
      }
      if (m === 'reset-after-bytes') budget = a;
      if (!upstream) connectUpstream();
      up.write(reqHead);
      state = chunked ? 'pipe' : bodyLeft > 0 ? 'body' : 'head';
    };
    client.on('data', (chunk: Buffer) => {
      while (chunk.length > 0) {
        if (state === 'closing') return; // read and discard: a clean FIN, not a RST
        if (state === 'pipe') return up.write(chunk);
        if (state === 'body') {
          const n = Math.min(bodyLeft, chunk.length);
          if (!refused) up.write(chunk.subarray(0, n));
          bodyLeft -= n;
          chunk = chunk.subarray(n);
          if (bodyLeft === 0) {
            answer();
            state = refused ? 'closing' : 'head';
          }
          continue;
        }
        head = Buffer.concat([head, chunk]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return;
        chunk = head.subarray(end + 4);
        const reqHead = head.subarray(0, end + 4);
        head = Buffer.alloc(0);
        startRequest(reqHead);
      }
    });
    client.on('end', () => upstream && up.end());
  };

  const server = net.createServer(onConnection);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  if (opts.mode) setMode(opts.mode, opts.arg);
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    endpoint: `http://127.0.0.1:${port}`,
    setMode,
    stats: () => ({ ...stats }),
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
