// How the sidecar reaches data: a running `snapblock serve` (control API on
// <pool>/control.sock for snapshots and volumes, its NBD exports for the bytes),
// or any NBD server given by URI. The sidecar is always another process: it never
// opens the pool itself, so a crash of the sidecar cannot touch volume IO.
import path from 'node:path';
import { ControlClient } from '../control/client.js';
import { NbdClient } from '../nbd/client.js';

export interface NbdAddress {
  host?: string;
  port?: number;
  socketPath?: string;
  exportName: string;
}

/** nbd://host[:port]/export, nbd+unix:///export?socket=/path */
export function parseNbdUri(uri: string): NbdAddress {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new Error(`invalid NBD URI "${uri}": use nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH`);
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (u.protocol === 'nbd:') return { host: u.hostname.replace(/^\[|\]$/g, '') || '127.0.0.1', port: u.port ? Number(u.port) : 10809, exportName };
  if (u.protocol === 'nbd+unix:') {
    const socketPath = u.searchParams.get('socket');
    if (!socketPath) throw new Error(`NBD URI "${uri}" has no ?socket=PATH`);
    return { socketPath, exportName };
  }
  throw new Error(`unsupported NBD URI scheme "${u.protocol}" (nbds:// TLS is not supported by the sidecar)`);
}

export function formatNbdUri(a: NbdAddress): string {
  return a.socketPath ? `nbd+unix:///${encodeURIComponent(a.exportName)}?socket=${a.socketPath}` : `nbd://${a.host}:${a.port}/${encodeURIComponent(a.exportName)}`;
}

export function connectNbd(a: NbdAddress, metaContexts: string[] = []): Promise<NbdClient> {
  return NbdClient.connect({ ...a, metaContexts, timeoutMs: 120_000 });
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

  static async connect(dir: string): Promise<PoolServer> {
    const abs = path.resolve(dir);
    const control = new ControlClient(path.join(abs, 'control.sock'));
    if (!(await control.alive())) {
      throw new Error(`no snapblock server is running on pool ${abs}: start \`snapblock --pool ${dir} serve\` first (the backup sidecar reads snapshots and writes restores through its NBD exports, never the pool files)`);
    }
    const status = await control.request<{ endpoints: string[]; tls?: string }>('GET', '/v1/status');
    if (status.tls === 'required') throw new Error('the server requires TLS, which the backup sidecar does not speak yet; serve without --tls require');
    // Prefer the Unix socket (no TCP overhead), else the first TCP listener.
    const unix = status.endpoints.find((e) => e.startsWith('nbd+unix:'));
    const tcp = status.endpoints.find((e) => e.startsWith('nbd://'));
    let endpoint: Omit<NbdAddress, 'exportName'>;
    if (unix) endpoint = { socketPath: new URL(unix).searchParams.get('socket')! };
    else if (tcp) {
      const u = new URL(tcp);
      const host = u.hostname.replace(/^\[|\]$/g, '');
      endpoint = { host: host === '0.0.0.0' || host === '::' || host === '' ? '127.0.0.1' : host, port: Number(u.port) };
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
