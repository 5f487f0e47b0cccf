// Where backups live: a flat key space of immutable objects. Two targets implement
// it: an S3-compatible bucket (the tested path) and a local directory (the embedded
// default for users without S3). Everything above this file sees only keys.
//
// S3 notes (see /work/shared/notes/s3.md): path-style addressing, no aws-chunked
// bodies (requestChecksumCalculation WHEN_REQUIRED), bodies are Buffers with a known
// length so every attempt can be replayed. Retries are ours, not the SDK's (its token
// bucket gives up after a burst of 503s): exponential backoff with jitter on 5xx,
// throttling, timeouts and connection resets. Credentials are never logged or shown.
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import { Readable } from 'node:stream';
// The SDK is loaded when an S3 target is opened, not with this module: loading it
// costs ~0.3 s of CPU on this box, which a directory target or `--help` never needs.
// With require(), not import(): for a CommonJS package, import() first scans every
// file's source for its export names (cjs-module-lexer), another ~0.1 s for the SDK.
import { createRequire } from 'node:module';
import type { S3Client } from '@aws-sdk/client-s3';
type Sdk = typeof import('@aws-sdk/client-s3');

export interface ObjectInfo {
  key: string;
  size: number;
  modified: Date;
}

export interface StoreStats {
  puts: number;
  putBytes: number;
  gets: number;
  getBytes: number;
  heads: number;
  lists: number;
  deletes: number;
  retries: number;
}

export interface ObjectStore {
  /** human description, never with credentials */
  readonly description: string;
  readonly stats: StoreStats;
  /** create the bucket / directory if needed */
  ensure(): Promise<void>;
  /** size of the object, or undefined if it does not exist */
  head(key: string): Promise<number | undefined>;
  /** store an object; sha256 (hex of exactly these bytes), when known, saves hashing it again for signing */
  put(key: string, body: Buffer, opts?: { sha256?: string }): Promise<void>;
  /**
   * The object's bytes, or undefined if it does not exist. With `into`, an object that
   * fits is received into it (a view of `into` is returned): a reused buffer instead of
   * fresh memory per object, whose page faults cost more than the copy on this VM kind.
   */
  get(key: string, into?: Buffer): Promise<Buffer | undefined>;
  list(prefix: string): AsyncIterable<ObjectInfo>;
  delete(key: string): Promise<void>;
  close(): void;
}

const newStats = (): StoreStats => ({ puts: 0, putBytes: 0, gets: 0, getBytes: 0, heads: 0, lists: 0, deletes: 0, retries: 0 });

// ---------------------------------------------------------------------------
// Retry policy
// ---------------------------------------------------------------------------

export interface RetryPolicy {
  attempts: number;
  baseMs: number;
  maxMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { attempts: 10, baseMs: 100, maxMs: 8000 };

const TRANSIENT_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'EAI_AGAIN', 'ECONNABORTED', 'EHOSTUNREACH', 'ENETUNREACH', 'UND_ERR_SOCKET', 'ERR_STREAM_PREMATURE_CLOSE']);
const TRANSIENT_NAMES = new Set(['SlowDown', 'ServiceUnavailable', 'InternalError', 'RequestTimeout', 'RequestTimeTooSkewed', 'TimeoutError', 'ThrottlingException', 'TooManyRequestsException', 'RequestTimeoutException', 'AbortError']);

/** true for errors worth another attempt: 5xx, throttling, timeouts, resets */
export function isTransient(err: unknown): boolean {
  const e = err as { name?: string; code?: string; message?: string; $metadata?: { httpStatusCode?: number }; $retryable?: unknown; cause?: unknown };
  if (!e || typeof e !== 'object') return false;
  const status = e.$metadata?.httpStatusCode;
  if (status !== undefined && (status >= 500 || status === 429 || status === 408)) return true;
  if (e.name && TRANSIENT_NAMES.has(e.name)) return true;
  if (e.code && TRANSIENT_CODES.has(e.code)) return true;
  if (e.$retryable) return true;
  if (/socket hang up|ECONNRESET|EPIPE|timed? ?out|premature close|aborted/i.test(e.message ?? '')) return true;
  // The SDK wraps unparseable (e.g. truncated) responses; those are transient too.
  if (status === undefined && /Deserialization error|char 0|Unexpected end/i.test(e.message ?? '')) return true;
  return e.cause !== undefined && e.cause !== err && isTransient(e.cause);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function withRetry<T>(what: string, fn: () => Promise<T>, policy: RetryPolicy, onRetry?: (err: unknown, attempt: number) => void): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (err) {
      if (attempt >= policy.attempts || !isTransient(err)) {
        const e = err as Error;
        if (attempt > 1) e.message = `${what}: ${e.message} (after ${attempt} attempts)`;
        throw err;
      }
      onRetry?.(err, attempt);
      const cap = Math.min(policy.maxMs, policy.baseMs * 2 ** (attempt - 1));
      await sleep(cap / 2 + Math.random() * (cap / 2));
    }
  }
}

// ---------------------------------------------------------------------------
// S3
// ---------------------------------------------------------------------------

export interface S3Config {
  endpoint?: string;
  region: string;
  bucket: string;
  /** key prefix inside the bucket ('' or ending in '/') */
  prefix: string;
  forcePathStyle: boolean;
  accessKeyId?: string;
  secretAccessKey?: string;
  sessionToken?: string;
  /** max parallel HTTP connections */
  maxSockets?: number;
  retry?: RetryPolicy;
  /** per-request socket idle timeout */
  requestTimeoutMs?: number;
}

const statusOf = (err: unknown) => (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
const isNotFound = (err: unknown) => statusOf(err) === 404 || ['NotFound', 'NoSuchKey'].includes((err as Error).name);

export class S3Store implements ObjectStore {
  readonly stats = newStats();
  readonly description: string;
  private readonly retry: RetryPolicy;
  /** the SDK and the client, loaded in the background from the constructor on */
  private readonly ready: Promise<{ sdk: Sdk; client: S3Client }>;
  private client?: S3Client;

  /** GETs over our own keep-alive connections (plain http endpoints only) */
  private readonly rawGet?: RawGet;

  constructor(private readonly cfg: S3Config) {
    if (cfg.endpoint && process.env.SNAPBLOCK_BACKUP_RAW_GET !== '0') {
      const u = new URL(cfg.endpoint);
      if (u.protocol === 'http:') this.rawGet = new RawGet(cfg.maxSockets ?? 16, cfg.requestTimeoutMs ?? 120_000);
    }
    // The SDK is pinned (package.json) precisely so that Node 20 keeps working: no nagging.
    process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
    this.description = `s3://${cfg.bucket}/${cfg.prefix}${cfg.endpoint ? ` at ${redactUrl(cfg.endpoint)}` : ''}`;
    this.retry = cfg.retry ?? DEFAULT_RETRY;
    this.ready = Promise.resolve().then(() => {
      const sdk = createRequire(import.meta.url)('@aws-sdk/client-s3') as Sdk;
      return { sdk, client: (this.client = this.makeClient(sdk)) };
    });
    this.ready.catch(() => {}); // reported by the first request
  }

  private makeClient(sdk: Sdk): S3Client {
    const cfg = this.cfg;
    const agentOpts = { keepAlive: true, maxSockets: cfg.maxSockets ?? 16 };
    return new sdk.S3Client({
      endpoint: cfg.endpoint,
      region: cfg.region,
      forcePathStyle: cfg.forcePathStyle,
      credentials: cfg.accessKeyId && cfg.secretAccessKey ? { accessKeyId: cfg.accessKeyId, secretAccessKey: cfg.secretAccessKey, sessionToken: cfg.sessionToken } : undefined,
      // aws-chunked bodies with trailing CRCs break Ceph/Swift and halve throughput
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      maxAttempts: 1, // withRetry below decides
      // `Expect: 100-continue` (the SDK's default for bodies >= 2 MiB) costs a round trip per PUT
      expectContinueHeader: false,
      requestHandler: {
        connectionTimeout: 10_000,
        // a whole request, then an idle socket: either aborts the attempt (and withRetry tries again)
        requestTimeout: cfg.requestTimeoutMs ?? 120_000,
        throwOnRequestTimeout: true,
        socketTimeout: 30_000,
        httpAgent: new http.Agent(agentOpts),
        httpsAgent: new https.Agent(agentOpts),
      },
    });
  }

  private key(k: string): string {
    return this.cfg.prefix + k;
  }

  private async call<T>(what: string, fn: (client: S3Client, sdk: Sdk) => Promise<T>): Promise<T> {
    const { sdk, client } = await this.ready;
    return withRetry(what, () => fn(client, sdk), this.retry, () => this.stats.retries++);
  }

  async ensure(): Promise<void> {
    const Bucket = this.cfg.bucket;
    try {
      await this.call('HeadBucket', (client, sdk) => client.send(new sdk.HeadBucketCommand({ Bucket })));
    } catch (err) {
      if (!isNotFound(err)) throw err;
      await this.call('CreateBucket', async (client, sdk) => {
        try {
          await client.send(new sdk.CreateBucketCommand({ Bucket }));
        } catch (e) {
          const n = (e as Error).name;
          if (n !== 'BucketAlreadyOwnedByYou' && n !== 'BucketAlreadyExists') throw e;
        }
      });
    }
  }

  async head(key: string): Promise<number | undefined> {
    this.stats.heads++;
    try {
      const r = await this.call(`HEAD ${key}`, (client, sdk) => client.send(new sdk.HeadObjectCommand({ Bucket: this.cfg.bucket, Key: this.key(key) })));
      return r.ContentLength ?? 0;
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  async put(key: string, body: Buffer, opts: { sha256?: string } = {}): Promise<void> {
    await this.call(`PUT ${key}`, (client, sdk) => {
      const cmd = new sdk.PutObjectCommand({ Bucket: this.cfg.bucket, Key: this.key(key), Body: body, ContentLength: body.length });
      if (opts.sha256) {
        // The SigV4 signer takes a present x-amz-content-sha256 as the payload hash
        // instead of hashing the body again: we already know it (content addressing).
        const sha = opts.sha256;
        cmd.middlewareStack.add(
          (next) => async (args) => {
            const req = args.request as { headers?: Record<string, string> };
            if (req.headers) req.headers['x-amz-content-sha256'] = sha;
            return next(args);
          },
          { step: 'build', name: 'snapblockKnownPayloadHash' },
        );
      }
      return client.send(cmd);
    });
    this.stats.puts++;
    this.stats.putBytes += body.length;
  }

  async get(key: string, into?: Buffer): Promise<Buffer | undefined> {
    try {
      const buf = await this.call(`GET ${key}`, async (client, sdk) => {
        const cmd = new sdk.GetObjectCommand({ Bucket: this.cfg.bucket, Key: this.key(key) });
        // Over plain HTTP the signed request goes out on our own connection, whose body
        // lands straight in `into` (see RawGet); the SDK still builds, signs and parses it.
        let raw: Buffer | undefined;
        if (this.rawGet && into) {
          const pool = this.rawGet;
          cmd.middlewareStack.addRelativeTo(
            (_next: unknown) => async (args: { request: unknown }) => {
              const r = await pool.get(args.request as RawRequest, into);
              if (r.status >= 200 && r.status < 300) raw = r.body;
              return { response: { statusCode: r.status, reason: '', headers: r.headers, body: Readable.from(raw ? [] : [r.body]) }, output: undefined };
            },
            { relation: 'after', toMiddleware: 'deserializerMiddleware', name: 'snapblockRawGet' },
          );
        }
        const r = await client.send(cmd);
        if (raw) {
          if (r.ContentLength !== undefined && raw.length !== r.ContentLength) throw Object.assign(new Error(`short body: ${raw.length} of ${r.ContentLength} bytes`), { code: 'ECONNRESET' });
          return raw;
        }
        const bytes = await receive(r.Body as AsyncIterable<Uint8Array>, r.ContentLength, into);
        // A cut connection can end a body early without an error from the stream.
        if (r.ContentLength !== undefined && bytes.length !== r.ContentLength) {
          throw Object.assign(new Error(`short body: ${bytes.length} of ${r.ContentLength} bytes`), { code: 'ECONNRESET' });
        }
        return bytes;
      });
      this.stats.gets++;
      this.stats.getBytes += buf.length;
      return buf;
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    let token: string | undefined;
    do {
      this.stats.lists++;
      const r = await this.call(`LIST ${prefix}`, (client, sdk) =>
        client.send(new sdk.ListObjectsV2Command({ Bucket: this.cfg.bucket, Prefix: this.key(prefix), ContinuationToken: token })),
      );
      for (const o of r.Contents ?? []) yield { key: o.Key!.slice(this.cfg.prefix.length), size: o.Size ?? 0, modified: o.LastModified ?? new Date(0) };
      token = r.IsTruncated ? r.NextContinuationToken : undefined;
    } while (token);
  }

  async delete(key: string): Promise<void> {
    this.stats.deletes++;
    await this.call(`DELETE ${key}`, (client, sdk) => client.send(new sdk.DeleteObjectCommand({ Bucket: this.cfg.bucket, Key: this.key(key) })));
  }

  close(): void {
    this.client?.destroy();
    this.rawGet?.close();
  }
}

// ---------------------------------------------------------------------------
// GET bodies straight into a caller's buffer
// ---------------------------------------------------------------------------

/** the parts of the SDK's (signed) HttpRequest a GET needs */
interface RawRequest {
  method: string;
  hostname: string;
  port?: number;
  path: string;
  query?: Record<string, string | string[] | null>;
  headers: Record<string, string>;
}

/** the SDK's escapeUri: encodeURIComponent plus !'()* */
const escapeUri = (s: string) => encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);

function queryString(q: RawRequest['query']): string {
  const parts: string[] = [];
  for (const k of Object.keys(q ?? {}).sort()) {
    const v = q![k];
    if (v === null || v === undefined) parts.push(escapeUri(k));
    else for (const x of Array.isArray(v) ? v : [v]) parts.push(`${escapeUri(k)}=${escapeUri(x)}`);
  }
  return parts.join('&');
}

class HttpConnError extends Error {
  constructor(
    message: string,
    readonly code = 'ECONNRESET',
  ) {
    super(message);
  }
}

/**
 * HTTP/1.1 GETs on keep-alive connections whose socket reads go where we choose
 * (net.Socket `onread`): the response head into a reused 64 KiB buffer, the body straight
 * into the caller's buffer. Through the SDK's http client every 64 KiB socket read is a
 * fresh buffer and the body is then copied once more: restoring 1.4 GB that way cost
 * ~2.5 s of garbage collection and ~0.4 s of copying on this 2-core box. Only GETs whose
 * response has a Content-Length; errors (short bodies, resets, timeouts) are ECONNRESET /
 * ETIMEDOUT, which the store's retry policy retries.
 */
class RawGet {
  private readonly idle: RawConn[] = [];
  private readonly waiting: Array<() => void> = [];
  private open = 0;

  constructor(
    private readonly maxConns: number,
    private readonly timeoutMs: number,
  ) {}

  async get(req: RawRequest, into: Buffer): Promise<{ status: number; headers: Record<string, string>; body: Buffer }> {
    while (!this.idle.length && this.open >= this.maxConns) await new Promise<void>((r) => this.waiting.push(r));
    let conn = this.idle.pop();
    // one the server closed while it was idle is dropped
    while (conn && !conn.reusable) (this.open--, (conn = this.idle.pop()));
    if (!conn) {
      this.open++;
      conn = new RawConn(req.hostname.replace(/^\[|\]$/g, ''), req.port ?? 80, this.timeoutMs);
    }
    try {
      const r = await conn.request(req, into);
      if (conn.reusable) this.idle.push(conn);
      else (conn.destroy(), this.open--);
      return r;
    } catch (err) {
      conn.destroy();
      this.open--;
      throw err;
    } finally {
      this.waiting.shift()?.();
    }
  }

  close(): void {
    for (const c of this.idle.splice(0)) c.destroy();
  }
}

class RawConn {
  private readonly sock: net.Socket;
  private readonly head = Buffer.allocUnsafe(64 * 1024);
  private headLen = 0;
  /** body phase: where the body goes, its length, bytes received */
  private body?: Buffer;
  private want = 0;
  private got = 0;
  private current?: { resolve: (r: { status: number; headers: Record<string, string>; body: Buffer }) => void; reject: (e: Error) => void; into: Buffer };
  private status = 0;
  private headers: Record<string, string> = {};
  private ready: Promise<void>;
  private timer?: NodeJS.Timeout;
  reusable = true;

  constructor(host: string, port: number, private readonly timeoutMs: number) {
    this.sock = net.connect({
      host,
      port,
      noDelay: true,
      onread: {
        buffer: () => (this.body ? this.body.subarray(this.got, this.want) : this.head.subarray(this.headLen)),
        callback: (n: number) => this.onRead(n),
      },
    } as net.NetConnectOpts);
    this.ready = new Promise((resolve, reject) => {
      this.sock.once('connect', () => resolve());
      this.sock.once('error', reject);
    });
    this.ready.catch(() => {});
    // any socket error counts as a reset (retried), whatever its code
    this.sock.on('error', (err) => this.fail(new HttpConnError(`${(err as NodeJS.ErrnoException).code ?? 'error'}: ${err.message}`)));
    this.sock.on('close', () => this.fail(new HttpConnError('connection closed before the response was complete')));
    this.sock.setTimeout(30_000, () => this.fail(new HttpConnError('socket idle for 30 s', 'ETIMEDOUT')));
  }

  async request(req: RawRequest, into: Buffer): Promise<{ status: number; headers: Record<string, string>; body: Buffer }> {
    await this.ready;
    const q = queryString(req.query);
    let text = `${req.method} ${req.path}${q ? `?${q}` : ''} HTTP/1.1\r\n`;
    for (const [k, v] of Object.entries(req.headers)) text += `${k}: ${v}\r\n`;
    text += '\r\n';
    return new Promise((resolve, reject) => {
      this.current = { resolve, reject, into };
      this.status = 0;
      this.headers = {};
      this.body = undefined;
      this.timer = setTimeout(() => this.fail(new HttpConnError(`no complete response in ${this.timeoutMs} ms`, 'ETIMEDOUT')), this.timeoutMs);
      this.sock.write(text, 'latin1');
    });
  }

  private onRead(n: number): boolean {
    if (!this.current) {
      // bytes nobody asked for: the connection is out of step
      if (n > 0) this.fail(new HttpConnError('unexpected bytes from the server'));
      return true;
    }
    if (this.body) {
      this.got += n;
      if (this.got >= this.want) this.finish();
      return true;
    }
    this.headLen += n;
    const end = this.head.subarray(0, this.headLen).indexOf('\r\n\r\n');
    if (end < 0) {
      if (this.headLen >= this.head.length) this.fail(new HttpConnError('response head too large', 'EPROTO'));
      return true;
    }
    const lines = this.head.toString('latin1', 0, end).split('\r\n');
    const m = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0]);
    if (!m) return (this.fail(new HttpConnError(`not an HTTP response: ${lines[0].slice(0, 80)}`, 'EPROTO')), true);
    this.status = Number(m[1]);
    for (const l of lines.slice(1)) {
      const i = l.indexOf(':');
      if (i > 0) this.headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
    }
    const len = this.headers['content-length'];
    if (len === undefined || this.headers['transfer-encoding']) return (this.fail(new HttpConnError('response without a Content-Length', 'EPROTO')), true);
    if (/close/i.test(this.headers.connection ?? '')) this.reusable = false;
    this.want = Number(len);
    const ok = this.status >= 200 && this.status < 300;
    this.body = ok && this.current.into.length >= this.want ? this.current.into : Buffer.allocUnsafe(this.want);
    const extra = this.headLen - (end + 4);
    if (extra > this.want) return (this.fail(new HttpConnError('more bytes than the Content-Length', 'EPROTO')), true);
    this.head.copy(this.body, 0, end + 4, this.headLen);
    this.got = extra;
    this.headLen = 0;
    if (this.got >= this.want) this.finish();
    return true;
  }

  private finish(): void {
    const cur = this.current!;
    const body = this.body!.subarray(0, this.want);
    this.current = undefined;
    this.body = undefined;
    clearTimeout(this.timer);
    cur.resolve({ status: this.status, headers: this.headers, body });
  }

  private fail(err: Error): void {
    this.reusable = false;
    clearTimeout(this.timer);
    const cur = this.current;
    this.current = undefined;
    this.body = undefined;
    if (!this.sock.destroyed) this.sock.destroy();
    cur?.reject(err);
  }

  destroy(): void {
    this.reusable = false;
    clearTimeout(this.timer);
    if (!this.sock.destroyed) this.sock.destroy();
  }
}

/**
 * A response body, received into `into` when its announced length fits (one copy per
 * socket read, no concatenation), else into one buffer of that length, else (no length)
 * concatenated. A body longer than announced is cut at the announced length plus one
 * byte, which the caller's length check then rejects.
 */
async function receive(body: AsyncIterable<Uint8Array>, length: number | undefined, into?: Buffer): Promise<Buffer> {
  if (length === undefined) {
    const parts: Buffer[] = [];
    for await (const c of body) parts.push(Buffer.from(c.buffer, c.byteOffset, c.byteLength));
    return Buffer.concat(parts);
  }
  const out = into && into.length > length ? into : Buffer.allocUnsafe(length + 1);
  let n = 0;
  for await (const c of body) {
    const take = Math.min(c.byteLength, out.length - n);
    out.set(take === c.byteLength ? c : c.subarray(0, take), n);
    n += take;
  }
  return out.subarray(0, n);
}

/** an URL without user:password */
export function redactUrl(u: string): string {
  try {
    const url = new URL(u);
    url.username = '';
    url.password = '';
    return url.toString().replace(/\/$/, '');
  } catch {
    return '<endpoint>';
  }
}

// ---------------------------------------------------------------------------
// Local directory
// ---------------------------------------------------------------------------

/** Keys are relative paths; objects are written to a temp file, fsynced and renamed. */
export class DirStore implements ObjectStore {
  readonly stats = newStats();
  readonly description: string;

  constructor(readonly root: string) {
    this.root = path.resolve(root);
    this.description = `dir:${this.root}`;
  }

  private file(key: string): string {
    if (key.split('/').some((p) => p === '..' || p === '')) throw new Error(`invalid object key "${key}"`);
    return path.join(this.root, key);
  }

  async ensure(): Promise<void> {
    await fs.promises.mkdir(this.root, { recursive: true, mode: 0o700 });
  }

  async head(key: string): Promise<number | undefined> {
    this.stats.heads++;
    try {
      return (await fs.promises.stat(this.file(key))).size;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }

  async put(key: string, body: Buffer): Promise<void> {
    const f = this.file(key);
    await fs.promises.mkdir(path.dirname(f), { recursive: true, mode: 0o700 });
    const tmp = `${f}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
    const fh = await fs.promises.open(tmp, 'w', 0o600);
    try {
      await fh.writeFile(body);
      await fh.datasync();
    } finally {
      await fh.close();
    }
    await fs.promises.rename(tmp, f);
    this.stats.puts++;
    this.stats.putBytes += body.length;
  }

  async get(key: string): Promise<Buffer | undefined> {
    try {
      const b = await fs.promises.readFile(this.file(key));
      this.stats.gets++;
      this.stats.getBytes += b.length;
      return b;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    this.stats.lists++;
    const out: ObjectInfo[] = [];
    const walk = async (dir: string, rel: string) => {
      let entries: fs.Dirent[];
      try {
        entries = await fs.promises.readdir(dir, { withFileTypes: true });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
        throw err;
      }
      for (const e of entries) {
        const k = rel + e.name;
        if (e.isDirectory()) {
          if ((k + '/').startsWith(prefix) || prefix.startsWith(k + '/')) await walk(path.join(dir, e.name), k + '/');
        } else if (k.startsWith(prefix) && !e.name.includes('.tmp-')) {
          const st = await fs.promises.stat(path.join(dir, e.name));
          out.push({ key: k, size: st.size, modified: st.mtime });
        }
      }
    };
    await walk(this.root, '');
    out.sort((a, b) => (a.key < b.key ? -1 : 1));
    yield* out;
  }

  async delete(key: string): Promise<void> {
    this.stats.deletes++;
    await fs.promises.rm(this.file(key), { force: true });
  }

  close(): void {}
}

// ---------------------------------------------------------------------------
// Target selection: --target s3://bucket[/prefix] | dir:/path, env, config file
// ---------------------------------------------------------------------------

export interface TargetOptions {
  /** s3://bucket[/prefix], dir:/path or a plain path */
  target?: string;
  endpoint?: string;
  region?: string;
  /** default directory target when nothing names S3 */
  defaultDir: string;
  maxSockets?: number;
  retry?: RetryPolicy;
}

/**
 * Precedence: --target / flags > environment (S3_ENDPOINT, S3_REGION, S3_BUCKET,
 * S3_PREFIX, S3_FORCE_PATH_STYLE, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
 * AWS_SESSION_TOKEN) > the JSON file named by SNAPBLOCK_BACKUP_CONFIG > dir:<pool>/backups.
 */
export function openTarget(opts: TargetOptions, env: NodeJS.ProcessEnv = process.env): ObjectStore {
  let file: Record<string, string | boolean | undefined> = {};
  if (env.SNAPBLOCK_BACKUP_CONFIG) file = JSON.parse(fs.readFileSync(env.SNAPBLOCK_BACKUP_CONFIG, 'utf8')) as typeof file;
  const str = (v: unknown) => (typeof v === 'string' && v !== '' ? v : undefined);
  const target = opts.target ?? str(env.SNAPBLOCK_BACKUP_TARGET) ?? str(file.target);
  let bucket: string | undefined;
  let prefix = '';
  if (target?.startsWith('dir:')) return new DirStore(target.slice(4));
  if (target?.startsWith('s3://')) {
    const rest = target.slice(5);
    const slash = rest.indexOf('/');
    bucket = slash < 0 ? rest : rest.slice(0, slash);
    prefix = slash < 0 ? '' : rest.slice(slash + 1);
  } else if (target) {
    if (/^[a-z][a-z0-9+]*:/.test(target)) throw new Error(`unknown backup target "${target}": use s3://BUCKET[/PREFIX] or dir:/PATH`);
    return new DirStore(target);
  } else {
    bucket = str(env.S3_BUCKET) ?? str(file.bucket);
    prefix = str(env.S3_PREFIX) ?? str(file.prefix) ?? '';
  }
  if (!bucket) return new DirStore(opts.defaultDir);
  if (prefix && !prefix.endsWith('/')) prefix += '/';
  const pathStyle = env.S3_FORCE_PATH_STYLE ?? file.forcePathStyle;
  return new S3Store({
    endpoint: opts.endpoint ?? str(env.S3_ENDPOINT) ?? str(file.endpoint),
    region: opts.region ?? str(env.S3_REGION) ?? str(env.AWS_REGION) ?? str(file.region) ?? 'us-east-1',
    bucket,
    prefix,
    forcePathStyle: pathStyle === undefined ? true : pathStyle !== 'false' && pathStyle !== false,
    accessKeyId: str(env.AWS_ACCESS_KEY_ID) ?? str(file.accessKeyId),
    secretAccessKey: str(env.AWS_SECRET_ACCESS_KEY) ?? str(file.secretAccessKey),
    sessionToken: str(env.AWS_SESSION_TOKEN) ?? str(file.sessionToken),
    maxSockets: opts.maxSockets,
    retry: opts.retry,
  });
}
