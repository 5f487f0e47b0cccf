// How the sidecar reaches data: a running `snapblock serve` (control API on
// <pool>/control.sock for snapshots and volumes, its NBD exports for the bytes),
// or any NBD server given by URI. The sidecar is always another process: it never
// opens the pool itself, so a crash of the sidecar cannot touch volume IO.
import fs from 'node:fs';
import path from 'node:path';
import { ControlClient } from '../control/client.js';
import { NbdClient, type ClientTlsOptions } from '../nbd/client.js';

export interface NbdAddress {
  host?: string;
  port?: number;
  socketPath?: string;
  exportName: string;
  /** STARTTLS (x509) before anything else */
  tls?: ClientTlsOptions;
}

/** TLS settings from the command line: PEM file names, as `snapblock serve` takes them */
export interface TlsFiles {
  /** CA certificate(s) the server's certificate must chain to (default: the system's) */
  ca?: string;
  /** client certificate and key, for servers that verify clients (--tls-ca on the server) */
  cert?: string;
  key?: string;
  /** name the server certificate must carry (default: the URI's host; localhost for a Unix socket) */
  hostname?: string;
}

const readPem = (what: string, f: string): Buffer => {
  try {
    return fs.readFileSync(f);
  } catch (err) {
    throw new Error(`cannot read the TLS ${what} ${f}: ${(err as Error).message}`);
  }
};

export function tlsOptions(f: TlsFiles): ClientTlsOptions {
  if (Boolean(f.cert) !== Boolean(f.key)) throw new Error('--tls-cert and --tls-key go together');
  return { ca: f.ca ? readPem('CA', f.ca) : undefined, cert: f.cert ? readPem('certificate', f.cert) : undefined, key: f.key ? readPem('key', f.key) : undefined, hostname: f.hostname };
}

/** libnbd's layout of a tls-certificates directory: ca-cert.pem, client-cert.pem, client-key.pem (each optional) */
function tlsDir(dir: string): TlsFiles {
  const f = (n: string) => (fs.existsSync(path.join(dir, n)) ? path.join(dir, n) : undefined);
  return { ca: f('ca-cert.pem'), cert: f('client-cert.pem'), key: f('client-key.pem') };
}

/**
 * nbd://host[:port]/export, nbd+unix:///export?socket=/path, and with TLS nbds://... and
 * nbds+unix://... (libnbd's ?tls-certificates=DIR and ?tls-hostname=NAME are understood).
 * `tls` (from --tls, --tls-ca, ...) turns TLS on for any scheme and overrides the URI's files.
 */
export function parseNbdUri(uri: string, tls?: TlsFiles): NbdAddress {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new Error(`invalid NBD URI "${uri}": use nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH`);
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  const secure = u.protocol === 'nbds:' || u.protocol === 'nbds+unix:';
  let files: TlsFiles | undefined;
  if (secure || tls) {
    const dir = u.searchParams.get('tls-certificates');
    files = { ...(dir ? tlsDir(dir) : {}), ...(u.searchParams.get('tls-hostname') ? { hostname: u.searchParams.get('tls-hostname')! } : {}) };
    for (const [k, v] of Object.entries(tls ?? {})) if (v !== undefined) (files as Record<string, string>)[k] = v as string;
  }
  const withTls = files ? { tls: tlsOptions(files) } : {};
  if (u.protocol === 'nbd:' || u.protocol === 'nbds:') return { host: u.hostname.replace(/^\[|\]$/g, '') || '127.0.0.1', port: u.port ? Number(u.port) : 10809, exportName, ...withTls };
  if (u.protocol === 'nbd+unix:' || u.protocol === 'nbds+unix:') {
    const socketPath = u.searchParams.get('socket');
    if (!socketPath) throw new Error(`NBD URI "${uri}" has no ?socket=PATH`);
    return { socketPath, exportName, ...withTls };
  }
  throw new Error(`unsupported NBD URI scheme "${u.protocol}": use nbd://, nbds://, nbd+unix:// or nbds+unix://`);
}

/** the URI of an address (nbds when TLS is on), without certificate paths */
export function formatNbdUri(a: NbdAddress): string {
  const s = a.tls ? 's' : '';
  return a.socketPath ? `nbd${s}+unix:///${encodeURIComponent(a.exportName)}?socket=${a.socketPath}` : `nbd${s}://${a.host}:${a.port}/${encodeURIComponent(a.exportName)}`;
}

export async function connectNbd(a: NbdAddress, metaContexts: string[] = []): Promise<NbdClient> {
  try {
    return await NbdClient.connect({ ...a, metaContexts, timeoutMs: 120_000 });
  } catch (err) {
    const e = err as Error;
    if (!a.tls && /requires TLS/.test(e.message)) e.message = `${formatNbdUri(a)}: the server requires TLS: use an nbds:// URI or --tls (with --tls-ca, and --tls-cert/--tls-key if it verifies clients)`;
    throw err;
  }
}

export interface VolumeInfoLite {
  name: string;
  size: number;
  created: string;
  blockSize: number;
}
export interface SnapshotInfoLite {
  name: string;
  created: string;
  size: number;
  status: string;
}

/** A running snapblock server, driven through its control API. */
export class PoolServer {
  readonly control: ControlClient;

  private constructor(
    readonly dir: string,
    private readonly endpoint: Omit<NbdAddress, 'exportName'>,
  ) {
    this.control = new ControlClient(path.join(dir, 'control.sock'));
  }

  /** tls: STARTTLS on its NBD exports (needed when it serves with --tls require) */
  static async connect(dir: string, tls?: TlsFiles): Promise<PoolServer> {
    const abs = path.resolve(dir);
    const control = new ControlClient(path.join(abs, 'control.sock'));
    if (!(await control.alive())) {
      throw new Error(`no snapblock server is running on pool ${abs}: start \`snapblock --pool ${dir} serve\` first (the backup sidecar reads snapshots and writes restores through its NBD exports, never the pool files)`);
    }
    const status = await control.request<{ endpoints: string[]; tls?: string }>('GET', '/v1/status');
    if (status.tls === 'required' && !tls) throw new Error('the server requires TLS (serve --tls require): pass --tls, with --tls-ca for its CA and --tls-cert/--tls-key if it verifies clients');
    if (tls && status.tls === 'off') throw new Error('--tls: the server does not offer TLS (serve without --tls-cert)');
    const withTls = tls ? { tls: tlsOptions(tls) } : {};
    // Prefer the Unix socket (no TCP overhead), else the first TCP listener.
    const unix = status.endpoints.find((e) => e.startsWith('nbd+unix:'));
    const tcp = status.endpoints.find((e) => e.startsWith('nbd://'));
    let endpoint: Omit<NbdAddress, 'exportName'>;
    if (unix) endpoint = { socketPath: new URL(unix).searchParams.get('socket')!, ...withTls };
    else if (tcp) {
      const u = new URL(tcp);
      const host = u.hostname.replace(/^\[|\]$/g, '');
      endpoint = { host: host === '0.0.0.0' || host === '::' || host === '' ? '127.0.0.1' : host, port: Number(u.port), ...withTls };
    } else throw new Error('the snapblock server has no NBD listener');
    return new PoolServer(abs, endpoint);
  }

  address(exportName: string): NbdAddress {
    return { ...this.endpoint, exportName };
  }

  call<T>(op: string, args: Record<string, unknown>): Promise<T> {
    return this.control.request<T>('POST', '/v1/call', { op, args });
  }

  volumeInfo(name: string): Promise<VolumeInfoLite> {
    return this.call('volume.info', { name });
  }

  snapshots(volume: string): Promise<SnapshotInfoLite[]> {
    return this.call('snapshot.list', { volume });
  }

  createSnapshot(volume: string, name: string): Promise<SnapshotInfoLite> {
    return this.call('snapshot.create', { volume, name });
  }

  deleteSnapshot(volume: string, name: string): Promise<unknown> {
    return this.call('snapshot.delete', { volume, name });
  }

  createVolume(name: string, size: number): Promise<VolumeInfoLite> {
    return this.call('volume.create', { name, size });
  }

  deleteVolume(name: string): Promise<unknown> {
    return this.call('volume.delete', { name });
  }

  resizeVolume(name: string, size: number, force: boolean): Promise<unknown> {
    return this.call('volume.resize', { name, size, force });
  }
}

/** NBD base:allocation flags */
export const HOLE = 1;
export const ZERO = 2;

/**
 * Every extent of a meta context over the whole export, merged: like NbdClient.map, but in
 * requests as long as the protocol allows (4 GiB - 4 KiB) rather than 1 GiB. snapblock
 * computes a `snapblock:changed:` map over the whole volume for each request, so on an
 * 8 GiB volume with many changed extents the 1 GiB requests cost 8 computations (1.4 s
 * of a 4 GiB volume's 10% incremental under load), these 2.
 */
export async function readMap(c: NbdClient, context: string): Promise<Array<{ offset: number; length: number; flags: number }>> {
  const MAX = 0xffff_f000;
  const out: Array<{ offset: number; length: number; flags: number }> = [];
  let at = 0;
  while (at < c.size) {
    const descs = await c.blockStatus(context, at, Math.min(c.size - at, MAX));
    if (!descs.length) throw new Error('server returned no block status descriptors');
    for (const d of descs) {
      const len = Math.min(d.length, c.size - at);
      const last = out[out.length - 1];
      if (last && last.flags === d.flags && last.offset + last.length === at) last.length += len;
      else out.push({ offset: at, length: len, flags: d.flags });
      at += len;
      if (at >= c.size) break;
    }
  }
  return out;
}

/** Read [offset, offset+length) in requests no larger than the server allows (into `into`, when given). */
export async function readRange(c: NbdClient, offset: number, length: number, into?: Buffer): Promise<Buffer> {
  const max = Math.max(4096, Math.min(c.maxPayload, 32 * 1024 * 1024));
  if (length <= max) return c.read(offset, length, into);
  const out = into ? into.subarray(0, length) : Buffer.allocUnsafe(length);
  const parts: Promise<Buffer>[] = [];
  for (let at = 0; at < length; at += max) parts.push(c.read(offset + at, Math.min(max, length - at), out.subarray(at)));
  await Promise.all(parts);
  return out;
}

export async function writeRange(c: NbdClient, offset: number, data: Buffer): Promise<void> {
  const max = Math.max(4096, Math.min(c.maxPayload, 32 * 1024 * 1024));
  const parts: Promise<void>[] = [];
  for (let at = 0; at < data.length; at += max) parts.push(c.write(offset + at, data.subarray(at, Math.min(data.length, at + max))));
  await Promise.all(parts);
}

/** WRITE_ZEROES in pieces (lengths are u32 on the wire) */
export async function zeroRange(c: NbdClient, offset: number, length: number): Promise<void> {
  const max = 1 << 30;
  for (let at = 0; at < length; at += max) await c.zero(offset + at, Math.min(max, length - at));
}
