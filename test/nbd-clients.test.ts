// snapblock serve judged by independent NBD clients: libnbd (nbdinfo, nbdsh, nbdcopy) and qemu-io.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { nbdsh, run, startServer, tempDir, type RunningServer } from './helpers/server.js';

const MiB = 1024 * 1024;
let srv: RunningServer;

beforeAll(async () => {
  srv = await startServer({ volumes: { alpha: '64M', beta: '16M', gamma: '8M' } });
});
afterAll(async () => {
  expect(await srv.stop()).toBe(0);
});

describe('nbdinfo', () => {
  it('--list shows every volume as an export with its size', () => {
    const r = run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${srv.port}`]);
    expect(r.status, r.stderr).toBe(0);
    const info = JSON.parse(r.stdout);
    const sizes = Object.fromEntries(info.exports.map((e: { 'export-name': string; 'export-size': number }) => [e['export-name'], e['export-size']]));
    expect(sizes).toEqual({ alpha: 64 * MiB, beta: 16 * MiB, gamma: 8 * MiB });
  });

  it('--json reports exactly the implemented capabilities and block sizes', () => {
    const r = run('nbdinfo', ['--json', srv.uri('alpha')]);
    expect(r.status, r.stderr).toBe(0);
    const e = JSON.parse(r.stdout).exports[0];
    expect(JSON.parse(r.stdout).protocol).toBe('newstyle-fixed');
    expect(e['export-size']).toBe(64 * MiB);
    expect(e['is_read_only']).toBe(false);
    for (const cap of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_multi_conn', 'can_cache', 'can_df']) expect(e[cap], cap).toBe(true);
    expect(e['block_size_minimum']).toBe(1);
    expect(e['block_size_preferred']).toBe(4096);
    expect(e['block_size_maximum']).toBe(32 * MiB);
    expect(e.contexts).toContain('base:allocation');
  });

  it('--map shows data and holes after writes, trims and zeroes', () => {
    const q = run('qemu-io', ['-f', 'raw', srv.uri('gamma'), '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 4M 1M', '-c', 'discard 0 512k', '-c', 'flush']);
    expect(q.status, q.stderr + q.stdout).toBe(0);
    const r = run('nbdinfo', ['--map', '--json', srv.uri('gamma')]);
    expect(r.status, r.stderr).toBe(0);
    const map = JSON.parse(r.stdout).map((m: { offset: number; length: number; type: number }) => [m.offset, m.length, m.type]);
    expect(map).toEqual([
      [0, 512 * 1024, 3],
      [512 * 1024, 512 * 1024, 0],
      [1 * MiB, 3 * MiB, 3],
      [4 * MiB, 1 * MiB, 0],
      [5 * MiB, 3 * MiB, 3],
    ]);
    const t = run('nbdinfo', ['--map', '--totals', srv.uri('gamma')]);
    expect(t.stdout).toMatch(/1572864\s+18\.8%?\s+0\s+data/);
  });

  it('serves the same volumes on the Unix socket', () => {
    const r = run('nbdinfo', ['--size', `nbd+unix:///beta?socket=${srv.socket}`]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(String(16 * MiB));
  });

  it('an unknown export is refused cleanly', () => {
    const r = run('nbdinfo', [srv.uri('nope')]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/unknown|not found|nope/i);
  });
});

describe('qemu-io patterns', () => {
  it('write -P / read -P / write -z / discard / flush round-trip', () => {
    const r = run('qemu-io', [
      '-f', 'raw', srv.uri('alpha'),
      '-c', 'write -P 0xab 0 64k',
      '-c', 'write -P 0xcd 1M 3M',
      '-c', 'write -P 0xef 7 1000',
      '-c', 'read -P 0xab 0 7',
      '-c', 'read -P 0xef 7 1000',
      '-c', 'read -P 0xab 1007 64529',
      '-c', 'read -P 0xcd 1M 3M',
      '-c', 'write -z 2M 64k',
      '-c', 'read -P 0 2M 64k',
      '-c', 'read -P 0xcd 3M 1M',
      '-c', 'write -z -u 1M 64k',
      '-c', 'read -P 0 1M 64k',
      '-c', 'discard 0 64k',
      '-c', 'flush',
      '-c', 'write -f -P 0x5a 60M 4k',
      '-c', 'read -P 0x5a 60M 4k',
    ]);
    expect(r.status, r.stderr + r.stdout).toBe(0);
    expect(r.stdout).not.toMatch(/Pattern verification failed|error|failed/i);
  });
});

describe('nbdsh', () => {
  it('structured reads: data chunks for data, OFFSET_HOLE for unallocated ranges', () => {
    const out = nbdsh(srv.uri('beta'), `
import nbd
h.pwrite(b'\\x5a' * 65536, 1048576)
chunks = []
def cb(user, buf, offset, status, error):
    chunks.append((status, offset, len(buf), bytes(buf).count(0) == len(buf)))
    return 0
buf = h.pread_structured(4 * 1048576, 0, lambda buf, offset, status, error: cb(None, buf, offset, status, error))
assert buf[1048576:1048576+65536] == b'\\x5a' * 65536
assert buf[:1048576] == bytes(1048576) and buf[1048576+65536:] == bytes(4*1048576 - 1048576 - 65536)
print(sorted(chunks))
`);
    const chunks = JSON.parse(out.trim().replace(/\(/g, '[').replace(/\)/g, ']').replace(/True/g, 'true').replace(/False/g, 'false'));
    // status 1 = OFFSET_DATA, 2 = OFFSET_HOLE
    expect(chunks).toEqual([
      [1, 1048576, 65536, false],
      [2, 0, 1048576, true],
      [2, 1048576 + 65536, 4 * 1048576 - 1048576 - 65536, true],
    ]);
  });

  it('block status follows write, trim and zero', () => {
    const out = nbdsh(undefined, `
import nbd
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(${JSON.stringify(srv.uri('beta'))})
def status():
    ext = []
    def cb(meta, offset, entries, err):
        if meta == nbd.CONTEXT_BASE_ALLOCATION:
            ext.extend(entries)
        return 0
    h.block_status(8 * 1048576, 0, cb)
    return ext
h.pwrite(b'\\x01' * 1048576, 4 * 1048576)
a = status()
h.trim(1048576, 4 * 1048576)
b = status()
h.pwrite(b'\\x02' * 1048576, 6 * 1048576)
h.zero(1048576, 6 * 1048576)
c = status()
h.zero(65536, 6 * 1048576 + 65536, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 6 * 1048576 + 65536) == bytes(65536)
print(a); print(b); print(c)
`);
    const [a, b, c] = out.trim().split('\n').map((l) => JSON.parse(l));
    expect(a).toEqual([1048576, 3, 65536, 0, 4 * 1048576 - 1048576 - 65536, 3, 1048576, 0, 3 * 1048576, 3]);
    expect(b).toEqual([1048576, 3, 65536, 0, 8 * 1048576 - 1048576 - 65536, 3]);
    // after zeroing, the zeroed range reads back as zero (reported as hole+zero)
    expect(c.slice(-2)[1]).toBe(3);
  });

  it('out-of-range and invalid requests get the spec errors and the connection keeps working', () => {
    const out = nbdsh(undefined, `
import nbd
h.set_strict_mode(0)
h.connect_uri(${JSON.stringify(srv.uri('beta'))})
size = h.get_size()
results = []
def expect_err(name, fn, errno):
    try:
        fn()
        results.append(name + ':no-error')
    except nbd.Error as e:
        results.append(name + ':' + str(e.errno))
import errno as E
expect_err('read-past-end', lambda: h.pread(4096, size - 1024), E.EINVAL)
expect_err('write-past-end', lambda: h.pwrite(b'x' * 4096, size - 1024), E.ENOSPC)
expect_err('zero-past-end', lambda: h.zero(4096, size), E.ENOSPC)
expect_err('trim-past-end', lambda: h.trim(4096, size), E.EINVAL)
expect_err('status-past-end', lambda: h.block_status(4096, size, lambda *a: 0), E.EINVAL)
expect_err('oversized-write', lambda: h.pwrite(b'y' * (40 * 1048576), 0), E.EINVAL)
expect_err('oversized-read', lambda: h.pread(40 * 1048576, 0), E.EINVAL)
expect_err('bad-flag', lambda: h.pwrite(b'z' * 512, 0, nbd.CMD_FLAG_REQ_ONE), E.EINVAL)
h.pwrite(b'\\x33' * 4096, 8192)
assert h.pread(4096, 8192) == b'\\x33' * 4096
print(' '.join(results))
`);
    expect(out.trim().split(' ')).toEqual([
      'read-past-end:EINVAL',
      'write-past-end:ENOSPC',
      'zero-past-end:ENOSPC',
      'trim-past-end:EINVAL',
      'status-past-end:EINVAL',
      'oversized-write:EINVAL',
      'oversized-read:EINVAL',
      'bad-flag:EINVAL',
    ]);
  });

  it('hundreds of pipelined requests complete with correct data', () => {
    const out = nbdsh(srv.uri('alpha'), `
import nbd, hashlib
N = 600
bufs = []
for i in range(N):
    data = hashlib.sha256(str(i).encode()).digest() * 128   # 4 KiB
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), 8 * 1048576 + i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
reads = []
for i in range(N):
    b = nbd.Buffer(4096)
    reads.append((i, b, h.aio_pread(b, 8 * 1048576 + i * 4096)))
peak = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
bad = [i for (i, b, c) in reads if b.to_bytearray() != bytearray(hashlib.sha256(str(i).encode()).digest() * 128)]
h.flush()
print(peak, len(bad))
`);
    const [peak, bad] = out.trim().split(' ').map(Number);
    expect(bad).toBe(0);
    expect(peak).toBeGreaterThan(100);
  });

  it('read-only flags and FUA are honoured by the server', () => {
    const out = nbdsh(srv.uri('alpha'), `
import nbd
h.pwrite(b'\\x77' * 8192, 0, nbd.CMD_FLAG_FUA)
print(h.pread_structured(8192, 0, lambda *a: 0, nbd.CMD_FLAG_DF) == b'\\x77' * 8192, h.is_read_only())
`);
    expect(out.trim()).toBe('True False');
  });
});

describe('nbdcopy', () => {
  it('round-trips a file byte for byte, in and out, with several connections', () => {
    const dir = tempDir('copy-');
    const src = path.join(dir, 'src.img');
    const back = path.join(dir, 'back.img');
    const data = Buffer.alloc(16 * MiB);
    crypto.randomFillSync(data.subarray(0, 5 * MiB));
    crypto.randomFillSync(data.subarray(9 * MiB, 16 * MiB - 4096));
    fs.writeFileSync(src, data);
    const up = run('nbdcopy', ['-C', '4', src, srv.uri('beta')]);
    expect(up.status, up.stderr).toBe(0);
    const down = run('nbdcopy', [srv.uri('beta'), back]);
    expect(down.status, down.stderr).toBe(0);
    expect(fs.readFileSync(back).equals(data)).toBe(true);
    fs.rmSync(dir, { recursive: true });
  });
});
