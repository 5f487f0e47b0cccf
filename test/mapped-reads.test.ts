// Large reads leave from a mapping of the volume's data file, written to the socket by the
// thread pool (file-map.ts, reply-writer.ts). Judged by libnbd (nbdsh) and qemu-io: holes as
// OFFSET_HOLE chunks or as zeroes, the 1 GiB seam between two mappings, all three techniques,
// and a client that stops reading while big replies are on their way.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cli, nbdsh, run, startServer, tempDir, type RunningServer } from './helpers/server.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const MODES = ['cow', 'row', 'mirror'] as const;
let srv: RunningServer;

// Around the 1 GiB seam: 256 KiB of 0x5a, a 384 KiB hole, 384 KiB of 0xa5 (read as one 1 MiB request).
const START = GiB - 512 * 1024;
const expected = `bytes([0x5a]) * 262144 + bytes(393216) + bytes([0xa5]) * 393216`;

beforeAll(async () => {
  const pool = tempDir('mapped-');
  for (const mode of MODES) {
    const r = cli(pool, ['volume', 'create', mode, '2G', '--snapshot-mode', mode]);
    expect(r.status, r.stderr).toBe(0);
  }
  srv = await startServer({ pool });
  for (const mode of MODES) {
    const q = run('qemu-io', ['-f', 'raw', srv.uri(mode), '-c', `write -P 0x5a ${START} 256k`, '-c', `write -P 0xa5 ${GiB + 128 * 1024} 384k`, '-c', 'flush']);
    expect(q.status, q.stderr + q.stdout).toBe(0);
  }
});

afterAll(async () => {
  expect(await srv.stop()).toBe(0);
  // The server counts replies that left from a mapping: these tests must have used that path.
  const mapped = [...srv.logs().matchAll(/"mappedReads":(\d+)/g)].reduce((n, m) => n + Number(m[1]), 0);
  expect(mapped).toBeGreaterThan(20);
});

describe.each(MODES)('%s volume', (mode) => {
  it('a structured read across the seam: data chunks, the hole as an OFFSET_HOLE chunk', () => {
    const out = nbdsh(srv.uri(mode), `
import nbd
kinds = []
def chunk(sub, off, status, err):
    kinds.append((status, off - ${START}, len(sub)))
    return 0
buf = h.pread_structured(${MiB}, ${START}, chunk)
print(buf == ${expected})
print(sorted(kinds))
`);
    const [same, kinds] = out.trim().split('\n');
    expect(same).toBe('True');
    // libnbd reports data chunks as READ_DATA (1) and holes as READ_HOLE (2), by offset
    expect(kinds).toBe('[(1, 0, 262144), (1, 655360, 393216), (2, 262144, 393216)]');
  });

  it('DF and plain (non-structured) reads carry the hole as zeroes', () => {
    const df = nbdsh(srv.uri(mode), `
import nbd
n = []
buf = h.pread_structured(${MiB}, ${START}, lambda sub, off, status, err: n.append(status) or 0, nbd.CMD_FLAG_DF)
print(buf == ${expected}, n)
`);
    expect(df.trim()).toBe('True [1]');
    const simple = nbdsh(undefined, `
h.set_request_structured_replies(False)
h.connect_uri("${srv.uri(mode)}")
print(h.get_structured_replies_negotiated(), h.pread(${MiB}, ${START}) == ${expected})
`);
    expect(simple.trim()).toBe('False True');
  });

  it('qemu-io reads the same bytes in large and odd-sized requests', () => {
    const q = run('qemu-io', [
      '-f', 'raw', srv.uri(mode),
      '-c', `read -P 0x5a ${START} 256k`,
      '-c', `read -P 0 ${START + 256 * 1024} 384k`,
      '-c', `read -P 0xa5 ${GiB + 128 * 1024} 384k`,
      '-c', `read -P 0xa5 ${GiB + 128 * 1024 + 1} 393215`,
      '-c', `read -P 0 ${GiB + 512 * 1024} 2M`,
    ]);
    expect(q.status, q.stderr + q.stdout).toBe(0);
    expect(q.stdout).not.toMatch(/Pattern verification failed/);
  });
});

describe('a client that stops reading', () => {
  it('gets every byte of 48 pipelined 1 MiB replies after a 1.5 s pause', () => {
    const out = nbdsh(srv.uri('row'), `
import nbd, time
for i in range(48):
    h.pwrite(bytes([i + 1]) * ${MiB}, ${64 * MiB} + i * ${MiB})
reads = []
for i in range(48):
    b = nbd.Buffer(${MiB})
    reads.append((i, b, h.aio_pread(b, ${64 * MiB} + i * ${MiB})))
time.sleep(1.5)   # replies pile up: the pool sends run out of socket room and time
while h.aio_in_flight() > 0:
    h.poll(-1)
print(sum(1 for (i, b, c) in reads if b.to_bytearray() != bytearray(bytes([i + 1]) * ${MiB})))
`);
    expect(out.trim()).toBe('0');
  });
});
