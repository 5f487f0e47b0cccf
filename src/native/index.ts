// Typed facade over the C++ addon (native/). The addon only does what Node
// cannot do well; every policy (when to use O_DIRECT, how to split IO) lives in TS.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export interface Extent {
  offset: number;
  length: number;
  /** true = data (allocated), false = hole */
  data: boolean;
}

export interface OpenOptions {
  /** try O_DIRECT; falls back to buffered IO where the filesystem refuses it (tmpfs) */
  direct: boolean;
  readOnly: boolean;
  /** create the file if missing (mode 0600) */
  create?: boolean;
}

export interface OpenedFile {
  fd: number;
  /** whether O_DIRECT is actually in effect */
  direct: boolean;
}

interface Addon {
  open(path: string, direct: boolean, readOnly: boolean, create: boolean): OpenedFile;
  close(fd: number): void;
  dupFd(fd: number): number;
  pread(fd: number, buf: Buffer, offset: number): Promise<number>;
  pwrite(fd: number, buf: Buffer, offset: number, dsync: boolean): Promise<void>;
  preadv(fd: number, bufs: Buffer[], offset: number): Promise<number>;
  pwritev(fd: number, bufs: Buffer[], offset: number, dsync: boolean): Promise<void>;
  preadNowait(fd: number, buf: Buffer, offset: number): number;
  fdatasync(fd: number): Promise<void>;
  punchHole(fd: number, offset: number, length: number): Promise<void>;
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
  extents(fd: number, offset: number, length: number): Promise<Float64Array>;
  extentsNow(fd: number, offset: number, length: number): Float64Array;
  dataEnd(fd: number, offset: number): number;
  allocAligned(size: number, alignment: number): Buffer;
  alignment(fd: number): number;
  unmapPages(mapping: Buffer, at: number, length: number): void;
  threadMinorFaults(): number;
  sendBuffers(fd: number, bufs: Buffer[], timeoutMs: number): Promise<number>;
  mapFile(fd: number, offset: number, length: number, writable: boolean): Buffer;
  copyIntoMapping(mapping: Buffer, at: number, src: Buffer): number;
  residentNow(mapping: Buffer, at: number, length: number): boolean;
}

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const addon: Addon = require(path.join(root, 'build', 'Release', 'snapblock_native.node'));

export const openFile = (file: string, o: OpenOptions): OpenedFile =>
  addon.open(file, o.direct, o.readOnly, o.create ?? false);
export const closeFile = (fd: number): void => addon.close(fd);
/** A close-on-exec duplicate of fd (the same open socket or file under a second number). */
export const dupFd = (fd: number): number => addon.dupFd(fd);
/** Reads up to buf.length bytes at offset off the JS thread; resolves with bytes read (short only at EOF). */
export const pread = (fd: number, buf: Buffer, offset: number): Promise<number> => addon.pread(fd, buf, offset);
/** Writes all of buf at offset off the JS thread; dsync = RWF_DSYNC (used for FUA). */
export const pwrite = (fd: number, buf: Buffer, offset: number, dsync = false): Promise<void> =>
  addon.pwrite(fd, buf, offset, dsync);
export const preadv = (fd: number, bufs: Buffer[], offset: number): Promise<number> => addon.preadv(fd, bufs, offset);
export const pwritev = (fd: number, bufs: Buffer[], offset: number, dsync = false): Promise<void> =>
  addon.pwritev(fd, bufs, offset, dsync);
/**
 * Synchronous preadv2(RWF_NOWAIT): returns bytes read when the range is already in the page
 * cache, or -1 when it would block (caller then uses pread). Never blocks the event loop on disk.
 */
export const preadNowait = (fd: number, buf: Buffer, offset: number): number => addon.preadNowait(fd, buf, offset);
export const fdatasync = (fd: number): Promise<void> => addon.fdatasync(fd);
/** fallocate(PUNCH_HOLE|KEEP_SIZE): range reads as zeroes and frees space. */
export const punchHole = (fd: number, offset: number, length: number): Promise<void> =>
  addon.punchHole(fd, offset, length);
/** fallocate(ZERO_RANGE|KEEP_SIZE): range reads as zeroes, stays allocated. Rejects with EOPNOTSUPP where unsupported. */
export const zeroRange = (fd: number, offset: number, length: number): Promise<void> =>
  addon.zeroRange(fd, offset, length);
/** SEEK_DATA/SEEK_HOLE map of [offset, offset+length), clipped to file size, contiguous and in order. */
export async function extents(fd: number, offset: number, length: number): Promise<Extent[]> {
  return unflatten(await addon.extents(fd, offset, length));
}
function unflatten(flat: Float64Array): Extent[] {
  const out: Extent[] = [];
  for (let i = 0; i < flat.length; i += 3) out.push({ offset: flat[i], length: flat[i + 1], data: flat[i + 2] === 1 });
  return out;
}
/**
 * extents() computed on the JS thread, from the filesystem's cached extent tree: only for
 * ranges about to be read from the page cache anyway (file-map.ts).
 */
export function extentsNow(fd: number, offset: number, length: number): Extent[] {
  return unflatten(addon.extentsNow(fd, offset, length));
}
/** Where the run of data from offset ends (SEEK_HOLE): offset itself in a hole or past the end. */
export const dataEnd = (fd: number, offset: number): number => addon.dataEnd(fd, offset);
/** A Buffer whose memory is aligned for O_DIRECT (default 4096). */
export const allocAligned = (size: number, alignment = 4096): Buffer => addon.allocAligned(size, alignment);
/** The alignment O_DIRECT needs on this fd (logical block size of the device, at least 512). */
export const directAlignment = (fd: number): number => addon.alignment(fd);
/**
 * Send bufs in order on a connected socket from the thread pool, waiting for room up to
 * timeoutMs in all; resolves with the bytes sent (short only when the time ran out).
 */
export const sendBuffers = (fd: number, bufs: Buffer[], timeoutMs: number): Promise<number> =>
  addon.sendBuffers(fd, bufs, timeoutMs);
/**
 * A shared mapping of [offset, offset+length) of the file, unmapped when the Buffer is
 * collected; read-only unless `writable` (the fd must then be open for writing). Touching a
 * byte past the file's end kills the process (SIGBUS): see file-map.ts.
 */
export const mapFile = (fd: number, offset: number, length: number, writable = false): Buffer =>
  addon.mapFile(fd, offset, length, writable);
/**
 * Copy src into a writable mapping at `at`, the kernel doing the stores (process_vm_writev):
 * a page that cannot be had (no space, IO error) ends it with no signal. Returns the bytes
 * copied, short after such a failure, or -errno when none were.
 */
export const copyIntoMapping = (mapping: Buffer, at: number, src: Buffer): number => addon.copyIntoMapping(mapping, at, src);
/**
 * Drop our page table entries for [at, at+length) of a mapping (widened to whole pages); the
 * page cache keeps the data. The next store maps a whole folio writable in one fault, where a
 * page left read-only by writeback takes a fault per 4 KiB page (see file-map.ts).
 */
export const unmapPages = (mapping: Buffer, at: number, length: number): void => addon.unmapPages(mapping, at, length);
/** minor page faults taken by the calling thread so far */
export const threadMinorFaults = (): number => addon.threadMinorFaults();
/** Whether every page of mapping[at, at+length) is in the page cache (mincore). */
export const residentNow = (mapping: Buffer, at: number, length: number): boolean => addon.residentNow(mapping, at, length);
