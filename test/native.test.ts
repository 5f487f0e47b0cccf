import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as native from '../src/native/index.js';

const KiB = 1024;
const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const hasShm = fs.existsSync('/dev/shm');

let ext4Dir: string; // under /work (ext4): O_DIRECT works
let tmpDir: string; // os.tmpdir()
let shmDir: string | undefined; // tmpfs
const openFds = new Set<number>();

beforeAll(() => {
  const cacheBase = path.join(repoRoot, '.cache', 'test-tmp');
  fs.mkdirSync(cacheBase, { recursive: true });
  ext4Dir = fs.mkdtempSync(path.join(cacheBase, 'native-'));
  tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapblock-native-'));
  if (hasShm) shmDir = fs.mkdtempSync('/dev/shm/snapblock-native-');
});

afterAll(() => {
  for (const fd of openFds) native.closeFile(fd);
  for (const dir of [ext4Dir, tmpDir, shmDir]) if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

let seq = 0;
function open(dir: string, o: Partial<native.OpenOptions> = {}): native.OpenedFile & { file: string } {
  const file = path.join(dir, `f${seq++}`);
  const f = native.openFile(file, { direct: false, readOnly: false, create: true, ...o });
  openFds.add(f.fd);
  return { ...f, file };
}

function close(fd: number): void {
  openFds.delete(fd);
  native.closeFile(fd);
}

/** Deterministic non-zero pattern. */
function pattern(length: number, seed = 1): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed * 2654435761;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = (x >>> 16) | 1;
  }
  return b;
}

function alignedCopy(src: Buffer, alignment = 4096): Buffer {
  const b = native.allocAligned(src.length, alignment);
  src.copy(b);
  return b;
}

/** extents are contiguous, ordered and cover exactly [from, to) */
function expectCovering(ex: native.Extent[], from: number, to: number): void {
  let at = from;
  for (const e of ex) {
    expect(e.offset).toBe(at);
    expect(e.length).toBeGreaterThan(0);
    at += e.length;
  }
  expect(at).toBe(ex.length ? to : from);
}

describe('allocAligned', () => {
  it('returns zero-filled buffers of the requested size', () => {
    const b = native.allocAligned(64 * KiB, 4096);
    expect(b.length).toBe(64 * KiB);
    expect(b.every((v) => v === 0)).toBe(true);
    expect(native.allocAligned(0).length).toBe(0);
    expect(native.allocAligned(100, 512).length).toBe(100);
  });

  it('rejects bad alignments and sizes with TypeError', () => {
    expect(() => native.allocAligned(4096, 3000)).toThrow(TypeError);
    expect(() => native.allocAligned(-1)).toThrow(TypeError);
    expect(() => native.allocAligned(1.5)).toThrow(TypeError);
  });
});

describe('open / close', () => {
  it('uses O_DIRECT on ext4 and really enforces its alignment', async () => {
    const f = open(ext4Dir, { direct: true });
    expect(f.direct).toBe(true);
    const align = native.directAlignment(f.fd);
    expect(align).toBeGreaterThanOrEqual(512);
    expect(align & (align - 1)).toBe(0);
    // a 100-byte write cannot be done with O_DIRECT
    await expect(native.pwrite(f.fd, Buffer.alloc(100), 0)).rejects.toMatchObject({ code: 'EINVAL' });
    close(f.fd);
  });

  it('falls back to buffered IO where the filesystem refuses O_DIRECT', () => {
    // procfs has no direct IO: open(O_DIRECT) fails with EINVAL, the addon retries without it
    const f = native.openFile('/proc/self/stat', { direct: true, readOnly: true });
    expect(f.direct).toBe(false);
    native.closeFile(f.fd);
  });

  it('opens read-only, and creates only when asked', () => {
    const f = open(tmpDir);
    close(f.fd);
    const ro = native.openFile(f.file, { direct: false, readOnly: true });
    expect(ro.direct).toBe(false);
    native.closeFile(ro.fd);
    expect(fs.statSync(f.file).mode & 0o777).toBe(0o600);
  });

  it('close of a bad fd throws EBADF', () => {
    const f = open(tmpDir);
    close(f.fd);
    expect(() => native.closeFile(f.fd)).toThrow(expect.objectContaining({ code: 'EBADF', errno: -os.constants.errno.EBADF }));
  });

  it('dupFd gives a second descriptor of the same open file that outlives the first', async () => {
    const f = open(tmpDir);
    await native.pwrite(f.fd, Buffer.from('shared'), 0);
    const copy = native.dupFd(f.fd);
    expect(copy).not.toBe(f.fd);
    close(f.fd);
    const buf = Buffer.alloc(6);
    expect(await native.pread(copy, buf, 0)).toBe(6);
    expect(buf.toString()).toBe('shared');
    native.closeFile(copy);
    expect(() => native.dupFd(copy)).toThrow(expect.objectContaining({ code: 'EBADF' }));
  });
});

describe('read / write', () => {
  it('round-trips aligned buffers with O_DIRECT on ext4', async () => {
    const f = open(ext4Dir, { direct: true });
    expect(f.direct).toBe(true);
    const data = pattern(256 * KiB);
    await native.pwrite(f.fd, alignedCopy(data), 4096);
    const back = native.allocAligned(256 * KiB);
    expect(await native.pread(f.fd, back, 4096)).toBe(256 * KiB);
    expect(back.equals(data)).toBe(true);
    // the buffered view of the file agrees
    expect(fs.readFileSync(f.file).subarray(4096).equals(data)).toBe(true);
    expect(fs.readFileSync(f.file).subarray(0, 4096).every((v) => v === 0)).toBe(true);
    close(f.fd);
  });

  it.skipIf(!hasShm)('round-trips on tmpfs whether or not O_DIRECT is accepted there', async () => {
    // Before Linux 6.6 tmpfs refuses O_DIRECT (direct:false); newer kernels accept it as a no-op.
    const f = open(shmDir!, { direct: true });
    expect(typeof f.direct).toBe('boolean');
    const data = pattern(64 * KiB, 2);
    await native.pwrite(f.fd, alignedCopy(data), 8192);
    const back = native.allocAligned(64 * KiB);
    expect(await native.pread(f.fd, back, 8192)).toBe(64 * KiB);
    expect(back.equals(data)).toBe(true);
    close(f.fd);
  });

  it('round-trips unaligned buffered IO', async () => {
    const f = open(tmpDir);
    const data = pattern(12345, 3);
    await native.pwrite(f.fd, data, 777);
    const back = Buffer.alloc(12345);
    expect(await native.pread(f.fd, back, 777)).toBe(12345);
    expect(back.equals(data)).toBe(true);
    close(f.fd);
  });

  it('does vectored IO, including more buffers than IOV_MAX', async () => {
    const f = open(tmpDir);
    const parts = [pattern(1000, 4), Buffer.alloc(0), pattern(5000, 5), pattern(1, 6), pattern(4096, 7)];
    const whole = Buffer.concat(parts);
    await native.pwritev(f.fd, parts, 100);
    const outs = [Buffer.alloc(3000), Buffer.alloc(0), Buffer.alloc(7097)];
    expect(await native.preadv(f.fd, outs, 100)).toBe(whole.length);
    expect(Buffer.concat(outs).equals(whole)).toBe(true);

    const many = Array.from({ length: 1500 }, (_, i) => pattern(7, i + 10));
    await native.pwritev(f.fd, many, 0);
    const manyBack = Array.from({ length: 1500 }, () => Buffer.alloc(7));
    expect(await native.preadv(f.fd, manyBack, 0)).toBe(1500 * 7);
    expect(Buffer.concat(manyBack).equals(Buffer.concat(many))).toBe(true);
    close(f.fd);
  });

  it('writes with dsync (FUA), plain and vectored', async () => {
    const f = open(ext4Dir);
    const a = pattern(8192, 8);
    const b = pattern(3000, 9);
    await native.pwrite(f.fd, a, 0, true);
    await native.pwritev(f.fd, [b, a], 8192, true);
    await native.fdatasync(f.fd);
    expect(fs.readFileSync(f.file).equals(Buffer.concat([a, b, a]))).toBe(true);
    close(f.fd);
  });

  it('returns short reads only at EOF', async () => {
    const f = open(tmpDir);
    await native.pwrite(f.fd, pattern(1000, 11), 0);
    const buf = Buffer.alloc(4096, 0xee);
    expect(await native.pread(f.fd, buf, 0)).toBe(1000);
    expect(buf.subarray(1000).every((v) => v === 0xee)).toBe(true);
    expect(await native.pread(f.fd, buf, 1000)).toBe(0);
    expect(await native.pread(f.fd, buf, 1 << 30)).toBe(0);
    expect(await native.preadv(f.fd, [Buffer.alloc(600), Buffer.alloc(600)], 100)).toBe(900);
    close(f.fd);
  });

  it('serves many concurrent requests', async () => {
    const f = open(tmpDir);
    const blocks = Array.from({ length: 64 }, (_, i) => pattern(4096, 100 + i));
    await Promise.all(blocks.map((b, i) => native.pwrite(f.fd, b, i * 4096)));
    const back = await Promise.all(
      blocks.map(async (_, i) => {
        const buf = Buffer.alloc(4096);
        await native.pread(f.fd, buf, i * 4096);
        return buf;
      }),
    );
    back.forEach((b, i) => expect(b.equals(blocks[i])).toBe(true));
    close(f.fd);
  });

  it('preadNowait returns cached data synchronously', async () => {
    const f = open(tmpDir);
    const data = pattern(8192, 12);
    await native.pwrite(f.fd, data, 4096);
    const buf = Buffer.alloc(8192);
    expect(native.preadNowait(f.fd, buf, 4096)).toBe(8192);
    expect(buf.equals(data)).toBe(true);
    // short at EOF, 0 past it
    expect(native.preadNowait(f.fd, Buffer.alloc(8192), 8192)).toBe(4096);
    expect(native.preadNowait(f.fd, Buffer.alloc(10), 1 << 20)).toBe(0);
    close(f.fd);
  });
});

describe('space management', () => {
  it('punchHole reads back as zeroes and shows up as a hole', async () => {
    const f = open(ext4Dir);
    const data = pattern(192 * KiB, 13);
    await native.pwrite(f.fd, data, 0);
    await native.fdatasync(f.fd);
    await native.punchHole(f.fd, 64 * KiB, 64 * KiB);
    expect(fs.fstatSync(f.fd).size).toBe(192 * KiB); // KEEP_SIZE
    const back = Buffer.alloc(192 * KiB);
    expect(await native.pread(f.fd, back, 0)).toBe(192 * KiB);
    expect(back.subarray(0, 64 * KiB).equals(data.subarray(0, 64 * KiB))).toBe(true);
    expect(back.subarray(64 * KiB, 128 * KiB).every((v) => v === 0)).toBe(true);
    expect(back.subarray(128 * KiB).equals(data.subarray(128 * KiB))).toBe(true);
    expect(await native.extents(f.fd, 0, 192 * KiB)).toEqual([
      { offset: 0, length: 64 * KiB, data: true },
      { offset: 64 * KiB, length: 64 * KiB, data: false },
      { offset: 128 * KiB, length: 64 * KiB, data: true },
    ]);
    await native.punchHole(f.fd, 0, 0); // empty range: no-op
    close(f.fd);
  });

  it('zeroRange zeroes without changing the size', async () => {
    const f = open(ext4Dir);
    const data = pattern(64 * KiB, 14);
    await native.pwrite(f.fd, data, 0);
    await native.zeroRange(f.fd, 1000, 20000);
    expect(fs.fstatSync(f.fd).size).toBe(64 * KiB);
    const back = Buffer.alloc(64 * KiB);
    await native.pread(f.fd, back, 0);
    const expected = Buffer.from(data);
    expected.fill(0, 1000, 21000);
    expect(back.equals(expected)).toBe(true);
    close(f.fd);
  });

  it.skipIf(!hasShm)('zeroRange rejects with EOPNOTSUPP on tmpfs', async () => {
    const f = open(shmDir!);
    await native.pwrite(f.fd, pattern(8192, 15), 0);
    await expect(native.zeroRange(f.fd, 0, 4096)).rejects.toMatchObject({
      code: 'EOPNOTSUPP',
      errno: -os.constants.errno.EOPNOTSUPP,
      syscall: 'fallocate',
    });
    close(f.fd);
  });

  it('maps a sparse file with a data island in the middle', async () => {
    const f = open(ext4Dir);
    fs.ftruncateSync(f.fd, 1024 * KiB);
    await native.pwrite(f.fd, pattern(64 * KiB, 16), 512 * KiB);
    const all = await native.extents(f.fd, 0, 1024 * KiB);
    expect(all).toEqual([
      { offset: 0, length: 512 * KiB, data: false },
      { offset: 512 * KiB, length: 64 * KiB, data: true },
      { offset: 576 * KiB, length: 448 * KiB, data: false },
    ]);
    // clipped to the file size, and to the requested window
    expect(await native.extents(f.fd, 0, 4096 * KiB)).toEqual(all);
    const mid = await native.extents(f.fd, 500 * KiB, 100 * KiB);
    expectCovering(mid, 500 * KiB, 600 * KiB);
    expect(mid).toEqual([
      { offset: 500 * KiB, length: 12 * KiB, data: false },
      { offset: 512 * KiB, length: 64 * KiB, data: true },
      { offset: 576 * KiB, length: 24 * KiB, data: false },
    ]);
    expect(await native.extents(f.fd, 520 * KiB, 8 * KiB)).toEqual([{ offset: 520 * KiB, length: 8 * KiB, data: true }]);
    expect(await native.extents(f.fd, 2048 * KiB, 4096)).toEqual([]);
    expect(await native.extents(f.fd, 0, 0)).toEqual([]);
    close(f.fd);
  });

  it('maps a fully sparse and a fully written file', async () => {
    const f = open(tmpDir);
    fs.ftruncateSync(f.fd, 300 * KiB);
    expect(await native.extents(f.fd, 0, 300 * KiB)).toEqual([{ offset: 0, length: 300 * KiB, data: false }]);
    await native.pwrite(f.fd, pattern(300 * KiB, 17), 0);
    expect(await native.extents(f.fd, 0, 300 * KiB)).toEqual([{ offset: 0, length: 300 * KiB, data: true }]);
    close(f.fd);
  });
});

describe('errors', () => {
  it('pread on a closed fd rejects with EBADF', async () => {
    const f = open(tmpDir);
    close(f.fd);
    const err = await native.pread(f.fd, Buffer.alloc(10), 0).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Error);
    expect(err).toMatchObject({ code: 'EBADF', errno: -os.constants.errno.EBADF, syscall: 'pread' });
    expect((err as Error).message).toBe('EBADF: bad file descriptor, pread');
    await expect(native.fdatasync(f.fd)).rejects.toMatchObject({ code: 'EBADF', syscall: 'fdatasync' });
    await expect(native.extents(f.fd, 0, 10)).rejects.toMatchObject({ code: 'EBADF' });
    expect(() => native.preadNowait(f.fd, Buffer.alloc(10), 0)).toThrow(expect.objectContaining({ code: 'EBADF' }));
  });

  it('open of a missing file without create throws ENOENT', () => {
    const missing = path.join(tmpDir, 'does-not-exist');
    let err: unknown;
    try {
      native.openFile(missing, { direct: true, readOnly: false });
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ code: 'ENOENT', errno: -os.constants.errno.ENOENT, syscall: 'open', path: missing });
    expect(fs.existsSync(missing)).toBe(false);
  });

  it('writes to a read-only fd reject with EBADF', async () => {
    const f = open(tmpDir);
    close(f.fd);
    const ro = native.openFile(f.file, { direct: false, readOnly: true });
    openFds.add(ro.fd);
    await expect(native.pwrite(ro.fd, Buffer.alloc(10), 0)).rejects.toMatchObject({
      code: 'EBADF',
      errno: -os.constants.errno.EBADF,
      syscall: 'pwrite',
    });
    await expect(native.pwritev(ro.fd, [Buffer.alloc(10)], 0, true)).rejects.toMatchObject({ code: 'EBADF' });
    await expect(native.punchHole(ro.fd, 0, 4096)).rejects.toMatchObject({ code: 'EBADF', syscall: 'fallocate' });
    close(ro.fd);
  });

  it('throws TypeError synchronously on invalid arguments', () => {
    const buf = Buffer.alloc(8);
    const bad = native as unknown as Record<string, (...a: unknown[]) => unknown>;
    expect(() => bad.pread(-1, buf, 0)).toThrow(TypeError);
    expect(() => bad.pread(0, 'nope', 0)).toThrow(TypeError);
    expect(() => bad.pread(0, buf, -1)).toThrow(TypeError);
    expect(() => bad.pread(0, buf, 2 ** 53)).toThrow(TypeError);
    expect(() => bad.pread(0, buf, 1.5)).toThrow(TypeError);
    expect(() => bad.pwritev(0, [buf, 'x'], 0)).toThrow(TypeError);
    expect(() => bad.pwritev(0, buf, 0)).toThrow(TypeError);
    expect(() => bad.punchHole(0, 0, -5)).toThrow(TypeError);
    expect(() => bad.openFile(42, { direct: false, readOnly: true })).toThrow(TypeError);
  });
});
