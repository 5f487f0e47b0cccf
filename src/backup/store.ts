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
import path from 'node:path';
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

  constructor(private readonly cfg: S3Config) {
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
        const r = await client.send(new sdk.GetObjectCommand({ Bucket: this.cfg.bucket, Key: this.key(key) }));
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
