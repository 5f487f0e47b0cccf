// A process crash is not a power loss (docs/FORMAT.md): every write acknowledged to a
// client must read back after the server is killed with SIGKILL, flushed or not, because
// the host's page cache survives the process. Judged by libnbd (nbdsh): 64 × 1 MiB writes
// with every reply received and no FLUSH, kill -9, restart, read every byte back.
import { spawn } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { cli, nbdsh, startServer, tempDir, type RunningServer } from './helpers/server.js';

const MIB = 1024 * 1024;
const WRITES = 64;

let srv: RunningServer | undefined;
afterEach(async () => {
  await srv?.stop();
  srv = undefined;
});

/** Python for nbdsh: block(i, seed) is the i-th of 64 distinct 1 MiB patterns of a seed. */
const PATTERN = `
def block(i, seed):
    return bytes([(i * 7 + seed + j) % 251 for j in range(251)]) * (${MIB} // 251) + bytes([(i + seed) % 256]) * (${MIB} % 251)
`;

/**
 * Write all 64 blocks of each seed in turn (at most 16 in flight), wait for every reply, no
 * FLUSH; then, still connected (a disconnect flushes), kill the server with SIGKILL. Resolves
 * with how many writes were acknowledged.
 */
async function writeUnflushedThenKill(server: RunningServer, seeds: number[], stride: number): Promise<number> {
  const script = `${PATTERN}
import sys, time
ok = 0
for seed in [${seeds.join(', ')}]:
    bufs = [nbd.Buffer.from_bytearray(bytearray(block(i, seed))) for i in range(${WRITES})]
    cookies = []
    for i in range(${WRITES}):
        while h.aio_in_flight() >= 16:
            h.poll(-1)
        cookies.append(h.aio_pwrite(bufs[i], i * ${stride * MIB}))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    ok = sum(1 for c in cookies if h.aio_command_completed(c))
print('acked', ok)
sys.stdout.flush()
time.sleep(60)`;
  const client = spawn('nbdsh', ['-u', server.uri('v'), '-c', script], { env: { ...process.env, PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH}` } });
  let out = '';
  let err = '';
  client.stderr.on('data', (c) => (err += c));
  const acked = await new Promise<number>((resolve, reject) => {
    client.stdout.on('data', (c) => {
      out += c;
      const m = /acked (\d+)/.exec(out);
      if (m) resolve(Number(m[1]));
    });
    client.once('exit', (code) => reject(new Error(`nbdsh exited ${code} before its writes were acknowledged:\n${err}`)));
  });
  await server.kill9();
  client.kill('SIGKILL');
  return acked;
}

/** How many of the 64 blocks read back exactly. */
function blocksIntact(uri: string, seed: number, stride: number): number {
  const out = nbdsh(
    uri,
    `${PATTERN}
print(sum(1 for i in range(${WRITES}) if h.pread(${MIB}, i * ${stride * MIB}) == block(i, ${seed})))`,
  );
  return Number(out.trim());
}

describe('kill -9 keeps every acknowledged write (no FLUSH)', () => {
  for (const mode of ['row', 'cow', 'mirror']) {
    it(`${mode}: 64 × 1 MiB fresh writes, kill -9, restart: 64/64 read back`, { timeout: 120_000 }, async () => {
      const pool = tempDir(`pcrash-${mode}-`);
      expect(cli(pool, ['volume', 'create', 'v', '256M', '--snapshot-mode', mode]).status).toBe(0);
      srv = await startServer({ pool });
      // 4 MiB apart: every write allocates (row), nothing is contiguous with what came before
      expect(await writeUnflushedThenKill(srv, [1], 4)).toBe(WRITES);
      srv = await startServer({ pool });
      expect(blocksIntact(srv.uri('v'), 1, 4)).toBe(WRITES);
      expect(srv.cli(['check']).status).toBe(0);
    });

    it(`${mode}: overwrites after a snapshot and in place, kill -9, restart: 64/64 read back`, { timeout: 120_000 }, async () => {
      const pool = tempDir(`pcrash-ow-${mode}-`);
      expect(cli(pool, ['volume', 'create', 'v', '128M', '--snapshot-mode', mode]).status).toBe(0);
      srv = await startServer({ pool });
      nbdsh(srv.uri('v'), `${PATTERN}\nfor i in range(${WRITES}):\n    h.pwrite(block(i, 1), i * ${MIB})\nh.flush()`);
      if (mode !== 'mirror') expect(srv.cli(['snapshot', 'create', 'v', 's1']).status).toBe(0);
      // first writes after the snapshot: redirects (row), copies into the reserve (cow); then
      // overwrites of blocks the volume owns by then: the in-place receive path where it applies
      expect(await writeUnflushedThenKill(srv, [2, 3], 1)).toBe(WRITES);
      srv = await startServer({ pool });
      expect(blocksIntact(srv.uri('v'), 3, 1)).toBe(WRITES);
      if (mode !== 'mirror') expect(blocksIntact(srv.uri('v@s1'), 1, 1)).toBe(WRITES);
      expect(srv.cli(['check']).status).toBe(0);
    });
  }
});
