// The bottom layer: a volume kept in one sparse file, through the native addon.
// Cache policy: 'writeback' (page cache, like nbdkit's file plugin) or 'none'
// (O_DIRECT for aligned IO; unaligned IO falls back to a buffered fd, which Linux
// keeps coherent with direct IO by flushing/invalidating the affected pages).
import fs from 'node:fs';
import * as native from '../native/index.js';
import { BlockError, type BlockLayer, type Capabilities, type Extent, type WriteFlags, type ZeroFlags } from './layer.js';

export type CacheMode = 'writeback' | 'none';

const ZERO_CHUNK = 1024 * 1024;
let zeroBuffer: Buffer | undefined;

export class FileDevice implements BlockLayer {
  readonly caps: Capabilities;
  /** which IO mode is really in effect (O_DIRECT can be refused by the filesystem) */
  readonly direct: boolean;
  private closed = false;
  private zeroRangeWorks = true;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    private readonly directFd: number | undefined,
    private readonly alignment: number,
    public size: number,
    readOnly: boolean,
  ) {
    this.direct = directFd !== undefined;
    this.caps = {
      readOnly,
      multiConn: true,
      trim: !readOnly,
      zero: !readOnly,
      fastZero: !readOnly,
      fua: !readOnly,
      cache: true,
      extents: true,
    };
  }

  static open(path: string, opts: { readOnly?: boolean; cache?: CacheMode } = {}): FileDevice {
    const readOnly = opts.readOnly ?? false;
    const { fd } = native.openFile(path, { direct: false, readOnly });
    let directFd: number | undefined;
    let alignment = 1;
    if (opts.cache === 'none') {
      const d = native.openFile(path, { direct: true, readOnly });
      if (d.direct) {
        directFd = d.fd;
        alignment = native.directAlignment(d.fd);
      } else {
        native.closeFile(d.fd);
      }
    }
    const size = fs.fstatSync(fd).size;
    return new FileDevice(path, fd, directFd, alignment, size, readOnly);
  }

  private aligned(offset: number, length: number): boolean {
    return this.directFd !== undefined && offset % this.alignment === 0 && length % this.alignment === 0;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (this.aligned(offset, length)) {
      const buf = native.allocAligned(length, this.alignment);
      await this.fill(this.directFd!, buf, offset);
      return buf;
    }
    const buf = Buffer.allocUnsafe(length);
    // Page-cache hit: copy synchronously and skip a thread-pool round trip.
    const n = native.preadNowait(this.fd, buf, offset);
    if (n === length) return buf;
    await this.fill(this.fd, buf, offset);
    return buf;
  }

  /** pread, padding with zeroes past EOF (a shrunk or racing file must never leak stale memory) */
  private async fill(fd: number, buf: Buffer, offset: number): Promise<void> {
    const n = await native.pread(fd, buf, offset);
    if (n < buf.length) buf.fill(0, n);
  }

  async write(offset: number, data: Buffer, flags: WriteFlags = {}): Promise<void> {
    if (this.aligned(offset, data.length)) {
      let src = data;
      if ((data.byteOffset & (this.alignment - 1)) !== 0) {
        src = native.allocAligned(data.length, this.alignment);
        data.copy(src);
      }
      await native.pwrite(this.directFd!, src, offset, flags.fua ?? false);
      return;
    }
    await native.pwrite(this.fd, data, offset, flags.fua ?? false);
  }

  async flush(): Promise<void> {
    await native.fdatasync(this.fd);
  }

  async trim(offset: number, length: number, flags: WriteFlags = {}): Promise<void> {
    await native.punchHole(this.fd, offset, length);
    if (flags.fua) await this.flush();
  }

  async zero(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    if (flags.mayTrim) {
      await native.punchHole(this.fd, offset, length);
    } else if (this.zeroRangeWorks) {
      try {
        await native.zeroRange(this.fd, offset, length);
      } catch (err) {
        if (!isUnsupported(err)) throw err;
        this.zeroRangeWorks = false;
      }
    }
    if (!flags.mayTrim && !this.zeroRangeWorks) {
      if (flags.fast) throw new BlockError('ENOTSUP', 'fast zero not supported by this filesystem');
      await this.writeZeroes(offset, length);
    }
    if (flags.fua) await this.flush();
  }

  private async writeZeroes(offset: number, length: number): Promise<void> {
    zeroBuffer ??= Buffer.alloc(ZERO_CHUNK);
    for (let done = 0; done < length; done += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, length - done);
      await native.pwrite(this.fd, zeroBuffer.subarray(0, n), offset + done);
    }
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    const map = await native.extents(this.fd, offset, length);
    const out: Extent[] = map.map((e) => ({ offset: e.offset, length: e.length, hole: !e.data, zero: !e.data }));
    // The file may be shorter than the volume (never, normally): report the tail as a hole.
    const end = map.length ? map[map.length - 1].offset + map[map.length - 1].length : offset;
    if (end < offset + length) out.push({ offset: end, length: offset + length - end, hole: true, zero: true });
    return out;
  }

  async cache(offset: number, length: number): Promise<void> {
    // Prefetch by reading through the page cache; the data is discarded.
    const step = 4 * 1024 * 1024;
    for (let at = offset; at < offset + length; at += step) {
      const n = Math.min(step, offset + length - at);
      await native.pread(this.fd, Buffer.allocUnsafe(n), at);
    }
  }

  /** grow or shrink the backing file (the caller owns the policy) */
  resize(size: number): void {
    fs.ftruncateSync(this.fd, size);
    this.size = size;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    native.closeFile(this.fd);
    if (this.directFd !== undefined) native.closeFile(this.directFd);
  }
}

function isUnsupported(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'EINVAL';
}
