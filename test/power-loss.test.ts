// After a power loss, everything before a completed FLUSH survives and nothing else needs to
// (docs/FORMAT.md, "Two crash rules"). A real power cut is out of reach here, so the journal is
// left as one would find it after a reboot: the server is killed with unflushed writes, then
// the boot id in its volatile batches is replaced by another kernel's. The volume must then
// drop those batches (their data may never have reached the disk), read the flushed data
// byte for byte, read the unflushed range as it was before (not another block's data), pass
// `check`, and never revive the dropped batches on a later open.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import { cli, nbdsh, startServer, tempDir, type RunningServer } from './helpers/server.js';

const MIB = 1024 * 1024;
const VOLATILE_MAGIC = 0x4a564f4c; // 'JVOL'

let srv: RunningServer | undefined;
afterEach(async () => {
  await srv?.stop();
  srv = undefined;
});

/** Rewrite every volatile batch of a journal as if an earlier boot had written it; how many there were. */
function fromAnotherBoot(journal: string): number {
  const b = fs.readFileSync(journal);
  let n = 0;
  for (let pos = 16; pos + 16 <= b.length && b.readUInt32LE(pos) !== 0; pos += 16 + b.readUInt32LE(pos + 4)) {
    if (b.readUInt32LE(pos) !== VOLATILE_MAGIC) continue;
    const payload = b.subarray(pos + 16, pos + 16 + b.readUInt32LE(pos + 4));
    payload.fill(0x5a, 0, 16);
    b.writeUInt32LE(zlib.crc32(payload), pos + 8);
    n++;
  }
  fs.writeFileSync(journal, b);
  return n;
}

/** Write 8 MiB of 0xAA at 0 and FLUSH, then 8 MiB of 0xBB at 64 MiB with no flush; kill the server while still connected. */
async function flushedThenUnflushedThenKill(server: RunningServer): Promise<void> {
  const script = `
import sys, time
h.pwrite(b'\\xaa' * ${8 * MIB}, 0)
h.flush()
h.pwrite(b'\\xbb' * ${8 * MIB}, ${64 * MIB})
print('acked'); sys.stdout.flush()
time.sleep(60)`;
  const client = spawn('nbdsh', ['-u', server.uri('v'), '-c', script], { env: { ...process.env, PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH}` } });
  await new Promise<void>((resolve, reject) => {
    let out = '';
    client.stdout.on('data', (c) => {
      out += c;
      if (out.includes('acked')) resolve();
    });
    client.once('exit', (code) => reject(new Error(`nbdsh exited ${code}`)));
  });
  await server.kill9();
  client.kill('SIGKILL');
}

describe('after a (simulated) power loss only flushed writes count', () => {
  it('row: unflushed allocations are dropped, flushed data reads back, check passes, nothing revives later', { timeout: 120_000 }, async () => {
    const pool = tempDir('powerloss-');
    expect(cli(pool, ['volume', 'create', 'v', '128M']).status).toBe(0);
    srv = await startServer({ pool });
    await flushedThenUnflushedThenKill(srv);
    srv = undefined;
    const journal = path.join(pool, 'volumes', fs.readdirSync(path.join(pool, 'volumes'))[0], 'journal');
    expect(fromAnotherBoot(journal)).toBeGreaterThan(0);

    srv = await startServer({ pool });
    const read = `print(h.pread(${8 * MIB}, 0) == b'\\xaa' * ${8 * MIB}, h.pread(${8 * MIB}, ${64 * MIB}) == bytes(${8 * MIB}))`;
    expect(nbdsh(srv.uri('v'), read).trim()).toBe('True True');
    expect(srv.cli(['check']).status).toBe(0);
    // a later write, flush and reopen must not bring the dropped batches back
    nbdsh(srv.uri('v'), `h.pwrite(b'\\xcc' * 4096, ${100 * MIB}); h.flush()`);
    await srv.stop();
    srv = await startServer({ pool });
    expect(nbdsh(srv.uri('v'), read).trim()).toBe('True True');
    expect(srv.cli(['check']).status).toBe(0);
  });
});
