// Large WRITE payloads received straight into the data file's cached pages
// (BlockLayer.writeInPlace): judged by qemu-io and nbdsh through NBD, by the data file itself
// read with read(2) (cow and mirror keep the image as it is), and by what the server says it
// did. Also: a snapshot keeps what an in-place overwrite replaced; a sender that hangs up or
// stalls part way through a payload holds no snapshot back.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { cliAsync, endedSessions, nbdsh, qemuIo, roomForDirtyPages, startServer, tempDir, type RunningServer } from './helpers/server.js';
import { closed, rawConnect, readExactly, request } from './helpers/raw-nbd.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const MODES = ['cow', 'row', 'mirror'] as const;
const START = GiB - MiB; // the 2 MiB region under test straddles the 1 GiB seam between two mappings
const FILL = 0x11;
/** [offset, length, byte]: each longer than what one read brings, so received directly */
const WRITES: Array<[number, number, number]> = [
  [GiB - 512 * KiB, MiB, 0x22], // across the seam: two pieces
  [START + 100, 300_000, 0x33], // neither page-aligned nor a page multiple
  [GiB + 256 * KiB, 256 * KiB, 0x44],
];
let pool: string;
let srv: RunningServer;

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

function readRegion(uri: string): Buffer {
  const hex = nbdsh(uri, `print(h.pread(${2 * MiB}, ${START}).hex())`).trim();
  return Buffer.from(hex, 'hex');
}

/** in-place writes the server reported, once it has logged `connections` ended connections of that export (it logs after the client has gone) */
async function inPlaceWritesAfter(exportName: string, connections: number): Promise<number> {
  const ended = () => endedSessions(srv.logs(), exportName);
  for (let i = 0; i < 200 && ended().length < connections; i++) await new Promise((r) => setTimeout(r, 25));
  expect(ended().length).toBe(connections);
  return ended().reduce((n, c) => n + c.inPlaceWrites, 0);
}

/** what each volume's region must read as, kept up to date by the tests in order */
const expected: Record<string, Buffer> = {};
const connections: Record<string, number> = { cow: 0, row: 0, mirror: 0 };

beforeAll(async () => {
  pool = tempDir('in-place-');
  srv = await startServer({ pool });
  for (const mode of MODES) {
    const r = srv.cli(['volume', 'create', mode, '2G', '--snapshot-mode', mode]);
    expect(r.status, r.stderr).toBe(0);
    // Written through the server: allocated (row: blocks of its own) and in the page cache.
    qemuIo(srv.uri(mode), `write -P ${FILL} ${START} ${2 * MiB}`, 'flush');
    connections[mode]++;
  }
}, 60_000);

afterAll(async () => {
  expect(await srv.stop()).toBe(0);
});

// Past its dirty budget the server receives into buffers instead (correct, but not under test here).
beforeEach(() => roomForDirtyPages(), 90_000);

describe.each(MODES)('%s volume', (mode) => {
  it('payloads land in place and read back byte for byte through NBD and from the data file', async () => {
    expected[mode] = Buffer.alloc(2 * MiB, FILL);
    for (const [at, len, byte] of WRITES) expected[mode].fill(byte, at - START, at - START + len);
    const before = await inPlaceWritesAfter(mode, connections[mode]);
    // the last with FUA: acknowledged once durable (the in-place write's finish flushes)
    WRITES.forEach(([at, len, byte], i) => qemuIo(srv.uri(mode), `write ${i === WRITES.length - 1 ? '-f ' : ''}-P ${byte} ${at} ${len}`, 'flush'));
    connections[mode] += WRITES.length;
    expect(await inPlaceWritesAfter(mode, connections[mode])).toBe(before + WRITES.length);
    expect(sha(readRegion(srv.uri(mode)))).toBe(sha(expected[mode]));
    connections[mode]++;
    if (mode !== 'row') {
      const fd = fs.openSync(path.join(pool, 'volumes', mode, 'data'), 'r');
      const got = Buffer.alloc(2 * MiB);
      fs.readSync(fd, got, 0, got.length, START);
      fs.closeSync(fd);
      expect(sha(got)).toBe(sha(expected[mode]));
    }
  });

  it('a snapshot keeps what an overwrite replaced: the first overwrite is not in place, the next is', async () => {
    if (mode === 'mirror') {
      // a mirror-mode snapshot splits off a synced mirror; while one is attached, nothing goes in place
      const a = await cliAsync(pool, ['mirror', 'attach', mode, '--wait']);
      expect(a.status, a.stderr).toBe(0);
    }
    const r = await cliAsync(pool, ['snapshot', 'create', mode, 's1']);
    expect(r.status, r.stderr).toBe(0);
    const before = await inPlaceWritesAfter(mode, connections[mode]);
    // shared with s1: copied out (cow), redirected (row), recorded as changed (mirror) first
    qemuIo(srv.uri(mode), `write -P 0x66 ${GiB - 512 * KiB} ${MiB}`, 'flush');
    // the same blocks, now the live volume's own
    qemuIo(srv.uri(mode), `write -P 0x77 ${GiB - 384 * KiB} ${256 * KiB}`, 'flush');
    connections[mode] += 2;
    expect(await inPlaceWritesAfter(mode, connections[mode])).toBe(before + 1);
    const live = Buffer.from(expected[mode]);
    live.fill(0x66, GiB - 512 * KiB - START, GiB + 512 * KiB - START);
    live.fill(0x77, GiB - 384 * KiB - START, GiB - 128 * KiB - START);
    expect(sha(readRegion(srv.uri(mode)))).toBe(sha(live));
    expect(sha(readRegion(srv.uri(`${mode}@s1`)))).toBe(sha(expected[mode]));
    connections[mode]++;
    expected[mode] = live;
  });
});

describe('a payload cut short (cow)', () => {
  /** Make [START, START+1 MiB) the live volume's own again (a snapshot shares it) and cached. */
  function overwrite(byte: number): void {
    qemuIo(srv.uri('cow'), `write -P ${byte} ${START} ${MiB}`, 'flush');
    expected.cow.fill(byte, 0, MiB);
  }

  /** a WRITE of 1 MiB of 0x99 at START, of which only `sent` bytes are sent */
  async function partialWrite(sent: number) {
    const s = await rawConnect(srv.port, 'cow');
    s.write(request(1, BigInt(START), MiB));
    s.write(Buffer.alloc(sent, 0x99));
    await new Promise((r) => setTimeout(r, 300)); // the server has them all
    return s;
  }

  /** Landed in place as they came: the bytes sent, then exactly what the region held before. */
  function expectTorn(got: Buffer, sent: number): void {
    expect(got.subarray(0, sent).equals(Buffer.alloc(sent, 0x99))).toBe(true);
    expect(got.subarray(sent).equals(expected.cow.subarray(sent))).toBe(true);
  }

  it('a sender that hangs up part way releases the write at once: a snapshot does not wait', async () => {
    overwrite(0x55);
    const s = await partialWrite(100 * KiB);
    s.destroy();
    const t0 = Date.now();
    const r = await cliAsync(pool, ['snapshot', 'create', 'cow', 'after-hangup']);
    expect(r.status, r.stderr).toBe(0);
    expect(Date.now() - t0).toBeLessThan(4000);
    const got = readRegion(srv.uri('cow'));
    expectTorn(got, 100 * KiB);
    expect(readRegion(srv.uri('cow@after-hangup')).equals(got)).toBe(true);
    expected.cow = got;
  });

  it('a slow sender is waited for: the snapshot holds the whole write, the connection stays', async () => {
    overwrite(0x57);
    const s = await partialWrite(100 * KiB);
    const t0 = Date.now();
    const snapshot = cliAsync(pool, ['snapshot', 'create', 'cow', 'slow-writer']);
    // 64 KiB a second for 7 s: longer than the snapshot's 5 s patience, but never idle that long
    let sent = 100 * KiB;
    for (let i = 0; i < 7; i++) {
      await new Promise((r) => setTimeout(r, 1000));
      s.write(Buffer.alloc(64 * KiB, 0x99));
      sent += 64 * KiB;
    }
    const reply = readExactly(s, 16);
    s.write(Buffer.alloc(MiB - sent, 0x99));
    const r = await snapshot;
    expect(r.status, r.stderr).toBe(0);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(7000);
    const rep = await reply;
    expect(rep.readUInt32BE(0)).toBe(0x67446698);
    expect(rep.readUInt32BE(4)).toBe(0); // no error
    expect(rep.readBigUInt64BE(8)).toBe(1n);
    expect(s.destroyed).toBe(false);
    s.destroy();
    expected.cow.fill(0x99, 0, MiB);
    expect(sha(readRegion(srv.uri('cow')))).toBe(sha(expected.cow));
    expect(sha(readRegion(srv.uri('cow@slow-writer')))).toBe(sha(expected.cow));
  }, 30_000);

  it('a sender that stalls part way is disconnected once a snapshot has waited 5 s for it', async () => {
    overwrite(0x56);
    const s = await partialWrite(200 * KiB);
    const t0 = Date.now();
    const r = await cliAsync(pool, ['snapshot', 'create', 'cow', 'after-stall']);
    const waited = Date.now() - t0;
    expect(r.status, r.stderr).toBe(0);
    expect(waited).toBeGreaterThanOrEqual(4500);
    expect(waited).toBeLessThan(15_000);
    expect(await closed(s, 1000)).toBe(true);
    expect(srv.logs()).toContain('its WRITE payload stopped arriving while a snapshot waited for it');
    const got = readRegion(srv.uri('cow'));
    expectTorn(got, 200 * KiB);
    expect(readRegion(srv.uri('cow@after-stall')).equals(got)).toBe(true);
    // and the volume takes writes as before
    qemuIo(srv.uri('cow'), `write -P 0x12 ${START} ${MiB}`, `read -P 0x12 ${START} ${MiB}`);
  }, 30_000);
});
