// Cached live writes of cow and mirror volumes go in through the data file's mapping
// (file-map.ts write, inline-write.ts writeAtMapped). Judged by qemu-io and nbdsh through NBD,
// and by the data file itself read with read(2): across the 1 GiB seam between two mappings,
// page-aligned and odd writes, and a snapshot that must keep what a mapped write replaced.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cli, nbdsh, qemuIo, startServer, tempDir, type RunningServer } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const MODES = ['cow', 'mirror'] as const;
const START = GiB - MiB; // the 2 MiB region under test straddles the seam at 1 GiB
let pool: string;
let srv: RunningServer;

/** the region's bytes before the server starts, written to the raw data file: its pages are then cached */
const FILL = 0x11;
/** [offset, length, byte] NBD writes, in order; the first is across the two mappings */
const WRITES: Array<[number, number, number]> = [
  [GiB - 4 * KiB, 8 * KiB, 0x22],
  [START + 12 * KiB, 4 * KiB, 0x33],
  [GiB + 64 * KiB, 512 * KiB, 0x44],
  [START + 100, 1000, 0x55], // not page-aligned: the inline gate sends it to pwrite
];

function expectedRegion(): Buffer {
  const b = Buffer.alloc(2 * MiB, FILL);
  for (const [at, len, byte] of WRITES) b.fill(byte, at - START, at - START + len);
  return b;
}

const dataFile = (mode: string) => path.join(pool, 'volumes', mode, 'data');

beforeAll(async () => {
  pool = tempDir('mapped-writes-');
  for (const mode of MODES) {
    const r = cli(pool, ['volume', 'create', mode, '2G', '--snapshot-mode', mode]);
    expect(r.status, r.stderr).toBe(0);
    // Cached pages, and no slow first write in the server: an inline write slower than 2 ms
    // sends the writes of the next second to the pool (inline-write.ts), off the mapping.
    const fd = fs.openSync(dataFile(mode), 'r+');
    fs.writeSync(fd, Buffer.alloc(2 * MiB, FILL), 0, 2 * MiB, START);
    fs.fsyncSync(fd); // allocated blocks: the first store into each folio is cheap
    fs.closeSync(fd);
  }
  srv = await startServer({ pool });
});

afterAll(async () => {
  expect(await srv.stop()).toBe(0);
  // These tests must have used the mapping: the server reports how its data writes went.
  // Each volume's first write must have; later ones may have been sent to the pool.
  const m = /"dataWrites":\{[^}]*"mapped":(\d+)/.exec(srv.logs());
  expect(m, 'no dataWrites line in the server log').not.toBeNull();
  expect(Number(m![1])).toBeGreaterThanOrEqual(MODES.length);
});

describe.each(MODES)('%s volume', (mode) => {
  it('writes over cached pages read back byte for byte through NBD and from the data file', async () => {
    // A slow write closes the inline gate for a second (inline-write.ts); start with it open,
    // so that at least this volume's first write goes through the mapping.
    await new Promise((r) => setTimeout(r, 1100));
    for (const [at, len, byte] of WRITES) qemuIo(srv.uri(mode), `write -P ${byte} ${at} ${len}`, 'flush');
    const out = nbdsh(srv.uri(mode), `
import hashlib
print(hashlib.sha256(h.pread(${2 * MiB}, ${START})).hexdigest())
`);
    const want = expectedRegion();
    expect(out.trim()).toBe(createHash('sha256').update(want).digest('hex'));
    // The file itself, through read(2): the mapping wrote the same page cache the file reads.
    const fd = fs.openSync(dataFile(mode), 'r');
    const got = Buffer.alloc(2 * MiB);
    fs.readSync(fd, got, 0, got.length, START);
    fs.closeSync(fd);
    expect(got.equals(want)).toBe(true);
  });

  it('a snapshot keeps the bytes a mapped write then replaced', () => {
    if (mode === 'mirror') {
      // a mirror-mode snapshot splits off a synced mirror; writes then go to both files
      const a = srv.cli(['mirror', 'attach', mode, '--wait']);
      expect(a.status, a.stderr).toBe(0);
    }
    const r = srv.cli(['snapshot', 'create', mode, 's1']);
    expect(r.status, r.stderr).toBe(0);
    qemuIo(srv.uri(mode), `write -P 0x66 ${GiB + 64 * KiB} 4k`, `write -P 0x77 ${GiB - 4 * KiB} 8k`, 'flush');
    qemuIo(srv.uri(mode), `read -P 0x66 ${GiB + 64 * KiB} 4k`, `read -P 0x44 ${GiB + 68 * KiB} 508k`, `read -P 0x77 ${GiB - 4 * KiB} 8k`);
    qemuIo(srv.uri(`${mode}@s1`), `read -P 0x44 ${GiB + 64 * KiB} 512k`, `read -P 0x22 ${GiB - 4 * KiB} 8k`);
  });
});
