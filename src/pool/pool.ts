// A pool directory of thin volumes, each one sparse file. The pool is also the
// ExportProvider the NBD server asks for exports: one export per volume, by name.
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { FileDevice, type CacheMode } from '../block/file-device.js';
import type { ExportProvider, OpenedExport } from '../nbd/exports.js';
import { readCatalog, writeCatalog, type Catalog, type VolumeRecord } from './catalog.js';
import { fsyncDir } from './atomic-file.js';
import { PoolLock } from './lock.js';
import { PoolError, validateName } from './names.js';

export interface VolumeInfo {
  name: string;
  /** provisioned size in bytes */
  size: number;
  /** bytes of backing storage actually allocated */
  allocated: number;
  created: string;
  /** open NBD connections */
  connections: number;
}

export interface CheckReport {
  ok: boolean;
  problems: string[];
  repaired: string[];
}

export interface PoolOptions {
  log: Logger;
  cache?: CacheMode;
}

interface OpenVolume {
  device: FileDevice;
  refs: number;
}

export const MAX_VOLUME_SIZE = 2 ** 50; // 1 PiB: a sparse file on ext4 stops at 16 TiB, xfs allows more

export class Pool implements ExportProvider {
  private catalog: Catalog;
  private readonly open_ = new Map<string, OpenVolume>();
  private readonly lock: PoolLock;

  private constructor(
    readonly dir: string,
    private readonly opts: PoolOptions,
  ) {
    fs.mkdirSync(path.join(dir, 'volumes'), { recursive: true, mode: 0o700 });
    this.lock = PoolLock.acquire(path.join(dir, 'LOCK'));
    try {
      this.catalog = readCatalog(this.catalogPath);
      this.reconcile();
    } catch (err) {
      this.lock.release();
      throw err;
    }
  }

  static open(dir: string, opts: PoolOptions): Pool {
    return new Pool(path.resolve(dir), opts);
  }

  get controlSocketPath(): string {
    return path.join(this.dir, 'control.sock');
  }

  private get catalogPath(): string {
    return path.join(this.dir, 'catalog.json');
  }

  private filePath(rec: VolumeRecord): string {
    return path.join(this.dir, rec.file);
  }

  /** Bring files in line with the catalog after a crash (see docs/FORMAT.md, "Recovery"). */
  private reconcile(): void {
    const report = this.check({ repair: true });
    for (const r of report.repaired) this.opts.log.warn({ repair: r }, 'pool repaired on open');
  }

  private record(name: string): VolumeRecord {
    const rec = this.catalog.volumes[name];
    if (!rec) throw new PoolError('ENOENT', `no volume named "${name}"`);
    return rec;
  }

  private save(next: Catalog): void {
    writeCatalog(this.catalogPath, next);
    this.catalog = next;
  }

  private withVolumes(volumes: Catalog['volumes']): Catalog {
    return { ...this.catalog, volumes };
  }

  list(): Array<{ name: string; description?: string }> {
    return Object.values(this.catalog.volumes).map((v) => ({ name: v.name, description: `snapblock volume ${v.name}` }));
  }

  volumes(): VolumeInfo[] {
    return Object.keys(this.catalog.volumes)
      .sort()
      .map((n) => this.info(n));
  }

  info(name: string): VolumeInfo {
    const rec = this.record(name);
    const st = fs.statSync(this.filePath(rec));
    return {
      name: rec.name,
      size: rec.size,
      allocated: st.blocks * 512,
      created: rec.created,
      connections: this.open_.get(name)?.refs ?? 0,
    };
  }

  create(name: string, size: number): VolumeInfo {
    validateName('volume', name);
    checkSize(size);
    if (this.catalog.volumes[name]) throw new PoolError('EEXIST', `volume "${name}" already exists`);
    const rec: VolumeRecord = { name, size, created: new Date().toISOString(), file: path.join('volumes', `${name}.img`) };
    // Data before pointer: the file exists at full size before the catalog names it.
    const tmp = `${this.filePath(rec)}.creating`;
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.ftruncateSync(fd, size);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, this.filePath(rec));
    fsyncDir(path.join(this.dir, 'volumes'));
    this.save(this.withVolumes({ ...this.catalog.volumes, [name]: rec }));
    this.opts.log.info({ volume: name, size }, 'volume created');
    return this.info(name);
  }

  resize(name: string, size: number, opts: { force?: boolean } = {}): VolumeInfo {
    const rec = this.record(name);
    checkSize(size);
    if (size < rec.size && !opts.force) {
      throw new PoolError('EINVAL', `shrinking "${name}" from ${rec.size} to ${size} bytes destroys data past the new end; pass --force to do it`);
    }
    const live = this.open_.get(name);
    if (size < rec.size && live) throw new PoolError('EBUSY', `volume "${name}" has ${live.refs} open connection(s); disconnect them before shrinking`);
    const next = this.withVolumes({ ...this.catalog.volumes, [name]: { ...rec, size } });
    if (size > rec.size) {
      // Grow: file first (an unrecorded larger file is trimmed back on open).
      this.truncate(rec, size, live);
      this.save(next);
    } else {
      // Shrink: catalog first (a larger file is trimmed to the catalog on open).
      this.save(next);
      this.truncate(rec, size, live);
    }
    this.opts.log.info({ volume: name, from: rec.size, to: size }, 'volume resized');
    return this.info(name);
  }

  private truncate(rec: VolumeRecord, size: number, live?: OpenVolume): void {
    if (live) live.device.resize(size);
    else fs.truncateSync(this.filePath(rec), size);
  }

  delete(name: string): void {
    const rec = this.record(name);
    const live = this.open_.get(name);
    if (live) throw new PoolError('EBUSY', `volume "${name}" has ${live.refs} open connection(s); disconnect them first`);
    // Pointer before data: once the catalog forgets it, the file is an orphan removed on open.
    const { [name]: _gone, ...rest } = this.catalog.volumes;
    this.save(this.withVolumes(rest));
    fs.rmSync(this.filePath(rec), { force: true });
    this.opts.log.info({ volume: name }, 'volume deleted');
  }

  async open(exportName: string): Promise<OpenedExport | undefined> {
    const rec = this.catalog.volumes[exportName];
    if (!rec) return undefined;
    let ov = this.open_.get(rec.name);
    if (!ov) {
      const device = FileDevice.open(this.filePath(rec), { cache: this.opts.cache ?? 'writeback' });
      ov = { device, refs: 0 };
      this.open_.set(rec.name, ov);
      this.opts.log.debug({ volume: rec.name, direct: device.direct }, 'volume opened');
    }
    ov.refs++;
    const held = ov;
    let released = false;
    return {
      name: rec.name,
      description: `snapblock volume ${rec.name}`,
      layer: held.device,
      release: async () => {
        if (released) return;
        released = true;
        if (--held.refs > 0) return;
        this.open_.delete(rec.name);
        await held.device.flush();
        await held.device.close();
      },
    };
  }

  /** Verify the pool's invariants (docs/FORMAT.md); with repair, fix what recovery may fix. */
  check(opts: { repair?: boolean } = {}): CheckReport {
    const problems: string[] = [];
    const repaired: string[] = [];
    const volDir = path.join(this.dir, 'volumes');
    const known = new Set<string>();
    for (const [key, rec] of Object.entries(this.catalog.volumes)) {
      if (key !== rec.name) problems.push(`catalog key "${key}" holds volume named "${rec.name}"`);
      known.add(path.basename(rec.file));
      const file = this.filePath(rec);
      if (path.dirname(path.resolve(file)) !== volDir) problems.push(`volume "${rec.name}" file ${rec.file} is outside the pool`);
      if (!fs.existsSync(file)) {
        problems.push(`volume "${rec.name}": backing file ${rec.file} is missing`);
        continue;
      }
      const size = fs.statSync(file).size;
      if (size !== rec.size) {
        if (opts.repair) {
          fs.truncateSync(file, rec.size);
          repaired.push(`volume "${rec.name}": file size ${size} set to catalog size ${rec.size}`);
        } else problems.push(`volume "${rec.name}": file size ${size} differs from catalog size ${rec.size}`);
      }
    }
    for (const f of fs.readdirSync(volDir)) {
      if (known.has(f)) continue;
      if (opts.repair) {
        fs.rmSync(path.join(volDir, f), { force: true });
        repaired.push(`removed orphan file volumes/${f} (left by an interrupted create or delete)`);
      } else problems.push(`orphan file volumes/${f} is not in the catalog`);
    }
    return { ok: problems.length === 0, problems, repaired };
  }

  async close(): Promise<void> {
    for (const [name, ov] of this.open_) {
      await ov.device.flush();
      await ov.device.close();
      this.open_.delete(name);
    }
    this.lock.release();
  }
}

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0) throw new PoolError('EINVAL', `volume size must be a positive number of bytes, got ${size}`);
  if (size > MAX_VOLUME_SIZE) throw new PoolError('EINVAL', `volume size ${size} exceeds the maximum of ${MAX_VOLUME_SIZE} bytes`);
  if (size % 512 !== 0) throw new PoolError('EINVAL', `volume size ${size} is not a multiple of 512 bytes`);
}
