// FileMap's guard against SIGBUS: no view past the file's end, a shrink waits for pinned views,
// and writes through the mapping happen only where they can neither wait for the disk nor fault.
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import * as native from '../src/native/index.js';
import { FileMap } from '../src/storage/file-map.js';
import { roomForDirtyPages, tempDir } from './helpers/server.js';

function bytesOf(r: { pieces: Array<Buffer | number> }): Buffer {
  return Buffer.concat(r.pieces.map((p) => (typeof p === 'number' ? Buffer.alloc(p) : p)));
}

describe('FileMap', () => {
  it('maps the file bytes, passes holes through and refuses ranges past the end', async () => {
    const file = path.join(tempDir('filemap-'), 'data');
    const content = Buffer.alloc(16384);
    for (let i = 0; i < content.length; i++) content[i] = (i * 7) & 0xff;
    fs.writeFileSync(file, content);
    const { fd } = native.openFile(file, { direct: false, readOnly: false });
    const map = new FileMap(fd);
    const v = map.view([{ at: 100, len: 5000 }, 300, { at: 12000, len: 4384 }])!;
    expect(bytesOf(v).equals(Buffer.concat([content.subarray(100, 5100), Buffer.alloc(300), content.subarray(12000)]))).toBe(true);
    v.release();
    expect(map.view([{ at: 12000, len: 4385 }])).toBeUndefined();
    // raw(): the file's holes come back as hole pieces, and the range past its end as zeroes
    await native.punchHole(fd, 4096, 4096);
    const r = map.raw(0, 20000)!;
    expect(r.pieces.map((p) => (typeof p === 'number' ? -p : p.length))).toEqual([4096, -4096, 8192, -3616]);
    expect(bytesOf(r).equals(Buffer.concat([content.subarray(0, 4096), Buffer.alloc(4096), content.subarray(8192), Buffer.alloc(3616)]))).toBe(true);
    r.release();
    map.close();
    expect(map.view([{ at: 0, len: 1 }])).toBeUndefined();
    native.closeFile(fd);
  });

  it('a shrink waits until no view is pinned, and no view is given meanwhile', async () => {
    const file = path.join(tempDir('filemap-'), 'data');
    fs.writeFileSync(file, Buffer.alloc(65536, 1));
    const { fd } = native.openFile(file, { direct: false, readOnly: false });
    const map = new FileMap(fd);
    const pinned = map.view([{ at: 0, len: 65536 }])!;
    let shrunk = false;
    const shrinking = map.exclusive(() => {
      fs.ftruncateSync(fd, 4096);
      shrunk = true;
    });
    await new Promise((r) => setTimeout(r, 20));
    expect(shrunk).toBe(false);
    expect(map.view([{ at: 0, len: 4096 }])).toBeUndefined();
    expect(bytesOf(pinned).every((b) => b === 1)).toBe(true); // still safe to read
    pinned.release();
    await shrinking;
    expect(shrunk).toBe(true);
    expect(map.view([{ at: 0, len: 8192 }])).toBeUndefined();
    const v = map.view([{ at: 0, len: 4096 }])!;
    expect(bytesOf(v).every((b) => b === 1)).toBe(true);
    v.release();
    native.closeFile(fd);
  });

  it('released() waits for the views pinned before it, not for those pinned after', async () => {
    const file = path.join(tempDir('filemap-'), 'data');
    fs.writeFileSync(file, Buffer.alloc(65536, 1));
    const { fd } = native.openFile(file, { direct: false, readOnly: false });
    const map = new FileMap(fd);
    const a = map.view([{ at: 0, len: 4096 }])!;
    let done = false;
    const waiting = map.released().then(() => (done = true));
    // a steady stream: a new view is always pinned before the last one goes
    let last = map.view([{ at: 4096, len: 4096 }])!;
    for (let i = 0; i < 5; i++) {
      const next = map.view([{ at: 4096, len: 4096 }])!;
      last.release();
      last = next;
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(done).toBe(false); // a is still pinned
    a.release();
    await waiting;
    expect(done).toBe(true);
    last.release();
    await map.released(); // nothing pinned: at once
    native.closeFile(fd);
  });

  it('places receives only over cached, allocated pages below the end, pinned like views', async () => {
    const file = path.join(tempDir('filemap-'), 'data');
    fs.writeFileSync(file, Buffer.alloc(8 * 4096, 1));
    fs.truncateSync(file, 16 * 4096); // the last 8 pages are a hole
    const { fd } = native.openFile(file, { direct: false, readOnly: false });
    expect(new FileMap(fd).place([{ at: 0, len: 4096 }])).toBeUndefined(); // not opened for it
    const map = new FileMap(fd, true);
    // a hole cached as zeroes still has no block on disk: the kernel's copy could fail for space
    const hole = Buffer.alloc(4096);
    fs.readSync(fd, hole, 0, 4096, 12 * 4096);
    expect(map.place([{ at: 12 * 4096, len: 4096 }])).toBeUndefined();
    expect(map.place([{ at: 7 * 4096, len: 8192 }])).toBeUndefined(); // reaches into the hole
    expect(map.place([{ at: 15 * 4096, len: 8192 }])).toBeUndefined(); // past the end
    const placed = map.place([{ at: 5 * 4096 + 10, len: 100 }, { at: 4096, len: 4096 }])!;
    expect(placed.pieces.map((p) => p.length)).toEqual([100, 4096]);
    placed.pieces[0].fill(2); // as the kernel's recv would
    placed.pieces[1].fill(3);
    let shrunk = false;
    const shrinking = map.exclusive(() => {
      fs.ftruncateSync(fd, 8 * 4096);
      shrunk = true;
    });
    await new Promise((r) => setTimeout(r, 20));
    expect(shrunk).toBe(false); // the placed pieces are pinned
    placed.release();
    await shrinking;
    const expected = Buffer.alloc(8 * 4096, 1).fill(3, 4096, 8192).fill(2, 5 * 4096 + 10, 5 * 4096 + 110);
    expect(fs.readFileSync(file).equals(expected)).toBe(true); // through read(2), not the mapping
    map.close();
    native.closeFile(fd);
  });

  it('placed stores into pages writeback left read-only take a fault per folio, not per page, and lose nothing', async () => {
    const SIZE = 8 * 1024 * 1024;
    const PAGES = SIZE / 4096;
    const file = path.join(tempDir('filemap-'), 'data');
    const { fd } = native.openFile(file, { direct: false, readOnly: false, create: true });
    // Written 64 KiB at a time: folios of up to 64 KiB where the kernel makes large ones (2 MiB
    // folios would be mapped, and made read-only, by the 2 MiB page table entry instead).
    for (let at = 0; at < SIZE; at += 65536) fs.writeSync(fd, Buffer.alloc(65536, 9), 0, 65536, at);
    await native.fdatasync(fd);
    const map = new FileMap(fd, true);
    /** place the whole file, store v into it as the kernel's recv would; the faults that took */
    const store = (v: number): number => {
      const f0 = native.threadMinorFaults();
      const placed = map.place([{ at: 0, len: SIZE }])!;
      for (const piece of placed.pieces) piece.fill(v);
      const faults = native.threadMinorFaults() - f0;
      placed.release();
      return faults;
    };
    const first = store(1); // nothing ready yet: unmapped first, then a fault per folio
    await native.fdatasync(fd); // writeback maps every page read-only again
    const second = store(2); // the chunks look ready: a fault per page, which place() notices
    expect(second).toBeGreaterThanOrEqual(PAGES); // the kernel really left them read-only
    await native.fdatasync(fd);
    const third = store(3); // readiness was forgotten: unmapped first again
    if (first < PAGES / 4) expect(third).toBeLessThan(PAGES / 4);
    else console.warn(`FileMap: ${first} faults for ${PAGES} pages: no large folios here, so unmapping first saves nothing`);
    // Unmapping dirty pages keeps their bytes: unmap half the file again (a shrink's
    // exclusive() forgets readiness) and check the disk itself, with O_DIRECT.
    await map.exclusive(() => undefined);
    map.place([{ at: 0, len: SIZE / 2 }])!.release();
    await native.fdatasync(fd);
    const direct = native.openFile(file, { direct: true, readOnly: true });
    expect(direct.direct).toBe(true);
    const back = native.allocAligned(SIZE);
    expect(await native.pread(direct.fd, back, 0)).toBe(SIZE);
    expect(back.every((b) => b === 3)).toBe(true);
    native.closeFile(direct.fd);
    map.close();
    native.closeFile(fd);
  });

  it('a placed receive overlapping one into freshly unmapped chunks does not blame their faults on its own pages', async () => {
    await roomForDirtyPages(); // background writeback would clean A's pages mid-test
    const KiB = 1024;
    const file = path.join(tempDir('filemap-'), 'data');
    const { fd } = native.openFile(file, { direct: false, readOnly: false, create: true });
    for (let at = 0; at < 8192 * KiB; at += 64 * KiB) fs.writeSync(fd, Buffer.alloc(64 * KiB, 9), 0, 64 * KiB, at);
    const map = new FileMap(fd, true);
    const A = { at: 0, len: 64 * KiB }; // 16 pages: 8 faults would mean "cleaned behind our back"
    const fill = (pieces: Buffer[], v: number): number => {
      const f0 = native.threadMinorFaults();
      for (const piece of pieces) piece.fill(v);
      return native.threadMinorFaults() - f0;
    };
    map.place([A])!.release(); // A is unmapped once and marked ready
    const once = map.place([A])!;
    fill(once.pieces, 1); // A's pages are now mapped writable
    once.release();
    /** A placed again: the faults its stores take (none while it stays marked ready) */
    const storeA = (): number => {
      const p = map.place([A])!;
      const faults = fill(p.pieces, 2);
      p.release();
      return faults;
    };
    expect(storeA()).toBe(0);
    // A placed first, then a fresh 4 MiB range that unmaps and faults while A is pinned.
    const a = map.place([A])!;
    const b = map.place([{ at: 2048 * KiB, len: 4096 * KiB }])!;
    expect(fill(b.pieces, 3)).toBeGreaterThanOrEqual(8);
    fill(a.pieces, 3);
    b.release();
    a.release();
    expect(storeA()).toBe(0);
    // A fresh range pinned first, then A.
    const c = map.place([{ at: 6144 * KiB, len: 2048 * KiB }])!;
    const a2 = map.place([A])!;
    expect(fill(c.pieces, 4)).toBeGreaterThanOrEqual(8);
    fill(a2.pieces, 4);
    a2.release();
    c.release();
    expect(storeA()).toBe(0);
    map.close();
    native.closeFile(fd);
  });

  it('writes through the mapping only to cached pages below the end, and not during a shrink', async () => {
    const file = path.join(tempDir('filemap-'), 'data');
    fs.writeFileSync(file, Buffer.alloc(8 * 4096, 1));
    fs.truncateSync(file, 16 * 4096); // the last 8 pages are a hole, not in the page cache
    const { fd } = native.openFile(file, { direct: false, readOnly: false });
    expect(new FileMap(fd).write(0, Buffer.alloc(4096, 2))).toBe(false); // not opened for it
    const map = new FileMap(fd, true);
    expect(map.write(4096, Buffer.alloc(8192, 2))).toBe(true);
    expect(map.write(100, Buffer.alloc(10, 3))).toBe(true); // any alignment: it is a copy
    expect(map.write(12 * 4096, Buffer.alloc(4096, 4))).toBe(false); // hole: not cached
    expect(map.write(15 * 4096, Buffer.alloc(8192, 4))).toBe(false); // past the end
    let inside: boolean | undefined;
    await map.exclusive(() => (inside = map.write(0, Buffer.alloc(4096, 5))));
    expect(inside).toBe(false);
    const expected = Buffer.alloc(16 * 4096);
    expected.fill(1, 0, 8 * 4096).fill(2, 4096, 3 * 4096).fill(3, 100, 110);
    expect(fs.readFileSync(file).equals(expected)).toBe(true); // through read(2), not the mapping
    map.close();
    native.closeFile(fd);
  });

  it('a write across the 1 GiB seam between two mappings lands whole', () => {
    const file = path.join(tempDir('filemap-'), 'data');
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, 2 * 1024 ** 3);
    const { fd } = native.openFile(file, { direct: false, readOnly: false });
    const at = 1024 ** 3 - 8192;
    fs.writeSync(fd, Buffer.alloc(16384, 1), 0, 16384, at); // cached pages
    const map = new FileMap(fd, true);
    const data = Buffer.alloc(16384);
    for (let i = 0; i < data.length; i++) data[i] = (i * 13) & 0xff;
    expect(map.write(at, data)).toBe(true);
    const back = Buffer.alloc(16384);
    fs.readSync(fd, back, 0, back.length, at);
    expect(back.equals(data)).toBe(true);
    map.close();
    native.closeFile(fd);
  });

  // A store into a shared mapping that needs a block on a full filesystem raises SIGBUS; the
  // kernel-side copy must turn that into "not written" so the caller's pwrite reports ENOSPC.
  const root = process.getuid?.() === 0;
  it.skipIf(!root && !process.env.CI)('a write the filesystem has no room for fails without killing the process', async () => {
    const dir = tempDir('filemap-full-');
    const img = path.join(dir, 'fs.img');
    const mnt = path.join(dir, 'mnt');
    fs.mkdirSync(mnt);
    fs.writeFileSync(img, Buffer.alloc(0));
    fs.truncateSync(img, 8 * 1024 * 1024);
    const sh = (cmd: string, args: string[]) => {
      const r = spawnSync(cmd, args, { encoding: 'utf8' });
      expect(r.status, `${cmd} ${args.join(' ')}: ${r.stderr}`).toBe(0);
    };
    sh('mkfs.ext4', ['-q', '-F', img]);
    sh('mount', ['-o', 'loop', img, mnt]);
    try {
      const file = path.join(mnt, 'data');
      fs.writeFileSync(file, Buffer.alloc(0));
      fs.truncateSync(file, 1024 * 1024); // sparse
      const { fd } = native.openFile(file, { direct: false, readOnly: false });
      // Read the hole so its pages are cached (as zeroes) and pass the residency check.
      fs.readSync(fd, Buffer.alloc(1024 * 1024), 0, 1024 * 1024, 0);
      // Fill the filesystem.
      const filler = fs.openSync(path.join(mnt, 'filler'), 'w');
      const chunk = Buffer.alloc(64 * 1024, 9);
      try {
        for (;;) fs.writeSync(filler, chunk);
      } catch (err) {
        expect((err as NodeJS.ErrnoException).code).toBe('ENOSPC');
      }
      fs.fsyncSync(filler);
      fs.closeSync(filler);
      // The kernel-side copy itself comes back short instead of raising SIGBUS.
      const mapping = native.mapFile(fd, 0, 1024 * 1024, true);
      expect(native.residentNow(mapping, 0, 1024 * 1024)).toBe(true);
      expect(native.copyIntoMapping(mapping, 0, Buffer.alloc(1024 * 1024, 7))).toBeLessThan(1024 * 1024);
      const map = new FileMap(fd, true);
      expect(map.write(0, Buffer.alloc(1024 * 1024, 7))).toBe(false);
      await expect(native.pwrite(fd, Buffer.alloc(1024 * 1024, 7), 0)).rejects.toThrow(/ENOSPC/);
      map.close();
      native.closeFile(fd);
    } finally {
      // Lazy: the mappings above keep the filesystem busy until they are garbage collected.
      const u = spawnSync('umount', ['-l', mnt], { encoding: 'utf8' });
      expect(u.status, `umount: ${u.stderr}`).toBe(0);
    }
  });
});
