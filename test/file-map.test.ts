// FileMap's guard against SIGBUS: no view past the file's end, and a shrink waits for pinned views.
import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import * as native from '../src/native/index.js';
import { FileMap } from '../src/storage/file-map.js';
import { tempDir } from './helpers/server.js';

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
});
