// Hostile and broken clients: they lose their own connection at most, never others' data.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import net from 'node:net';
import { spawn } from 'node:child_process';
import { lastNumberPrinted, nbdsh, run, startServer, type RunningServer } from './helpers/server.js';
import { closed, rawConnect as rawConnectTo, readExactly, request } from './helpers/raw-nbd.js';

let srv: RunningServer;
beforeAll(async () => {
  srv = await startServer({ volumes: { vol: '16M' } });
});
afterAll(async () => {
  expect(await srv.stop()).toBe(0);
});

const rawConnect = (exportName = 'vol') => rawConnectTo(srv.port, exportName);
const healthy = () => nbdsh(srv.uri('vol'), "h.pwrite(b'\\x42' * 4096, 0); print(h.pread(4096, 0) == b'\\x42' * 4096)").trim();

describe('malformed frames', () => {
  it('bad request magic closes only that connection', async () => {
    const s = await rawConnect();
    s.write(request(0, 0n, 512, 1n, 0, 0xdeadbeef));
    expect(await closed(s)).toBe(true);
    expect(healthy()).toBe('True');
  });

  it('garbage during negotiation closes only that connection', async () => {
    const s = net.connect(srv.port, '127.0.0.1');
    await readExactly(s, 18);
    s.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    expect(await closed(s)).toBe(true);
    expect(healthy()).toBe('True');
  });

  it('a truncated frame followed by hang-up leaves the server healthy', async () => {
    const s = await rawConnect();
    s.write(request(1, 0n, 65536).subarray(0, 28));
    s.write(Buffer.alloc(1000, 7)); // 1000 of 65536 payload bytes
    s.destroy();
    expect(healthy()).toBe('True');
    // the partial write was never applied: its range was a hole, so the payload was being
    // received into a buffer (over cached, allocated pages it lands in place as it arrives,
    // like a torn disk write: in-place-writes.test.ts)
    expect(nbdsh(srv.uri('vol'), 'print(h.pread(1000, 4096) == bytes(1000))').trim()).toBe('True');
  });

  it('an unknown command gets EINVAL and the connection keeps working', async () => {
    const s = await rawConnect();
    s.write(request(42, 0n, 0, 7n));
    const reply = await readExactly(s, 16);
    expect(reply.readUInt32BE(0)).toBe(0x67446698);
    expect(reply.readUInt32BE(4)).toBe(22);
    expect(reply.readBigUInt64BE(8)).toBe(7n);
    s.write(request(0, 0n, 4096, 8n));
    const ok = await readExactly(s, 16 + 4096);
    expect(ok.readUInt32BE(4)).toBe(0);
    expect(ok.readBigUInt64BE(8)).toBe(8n);
    s.destroy();
  });

  it('an option with an absurd length drops that client', async () => {
    const s = net.connect(srv.port, '127.0.0.1');
    await readExactly(s, 18);
    const o = Buffer.alloc(20);
    o.writeUInt32BE(1, 0);
    o.writeBigUInt64BE(0x49484156454f5054n, 4);
    o.writeUInt32BE(3, 12);
    o.writeUInt32BE(0xffffffff, 16);
    s.write(o);
    expect(await closed(s)).toBe(true);
    expect(healthy()).toBe('True');
  });
});

describe('slow and vanished clients', () => {
  it('a client that never reads its replies does not stall others', async () => {
    const s = await rawConnect();
    s.pause();
    // 256 x 1 MiB reads: far more than socket buffers hold.
    const burst = Buffer.concat(Array.from({ length: 256 }, (_, i) => request(0, 0n, 1 << 20, BigInt(i))));
    s.write(burst);
    await new Promise((r) => setTimeout(r, 500));
    const t0 = Date.now();
    expect(healthy()).toBe('True');
    expect(Date.now() - t0).toBeLessThan(10_000);
    s.destroy();
  });

  it('requests cut at arbitrary points are reassembled exactly (small and large payloads)', async () => {
    // Payload sizes either side of the 64 KiB point where payloads are received straight into
    // their own buffer; fragments from 1 byte to 150 KB, so headers, payloads and whole
    // requests share or straddle reads in every way. nbdsh is the judge of what landed.
    const sizes = [1, 4096, 65535, 65536, 65537, (1 << 20) + 3, 200_000, 28, 131_072];
    const base = 8 * 1024 * 1024;
    const writes: Array<{ offset: number; data: Buffer }> = [];
    let at = base;
    for (const n of sizes) {
      writes.push({ offset: at, data: crypto.randomBytes(n) });
      at += n + 4093; // disjoint, unaligned
    }
    const stream = Buffer.concat(writes.flatMap((w, i) => [request(1, BigInt(w.offset), w.data.length, BigInt(i + 1)), w.data]));
    const s = await rawConnect();
    const replies = readExactly(s, 16 * writes.length);
    let rnd = 7;
    for (let pos = 0; pos < stream.length; ) {
      rnd = (rnd * 1103515245 + 12345) % 2147483648;
      const n = [1, 3, 27, 29, 4096, 65536, 150_000][rnd % 7];
      s.write(stream.subarray(pos, pos + n));
      pos += n;
      if (rnd % 3 === 0) await new Promise((r) => setImmediate(r));
    }
    const got = await replies;
    const cookies = new Set<number>();
    for (let i = 0; i < writes.length; i++) {
      expect(got.readUInt32BE(i * 16)).toBe(0x67446698);
      expect(got.readUInt32BE(i * 16 + 4)).toBe(0); // no error
      cookies.add(Number(got.readBigUInt64BE(i * 16 + 8)));
    }
    expect(cookies.size).toBe(writes.length);
    s.destroy();
    const script = writes.map((w) => `print(hashlib.sha256(h.pread(${w.data.length}, ${w.offset})).hexdigest())`).join('\n');
    const hashes = nbdsh(srv.uri('vol'), `import hashlib\n${script}`).trim().split('\n');
    expect(hashes).toEqual(writes.map((w) => crypto.createHash('sha256').update(w.data).digest('hex')));
  });

  it('a client stuck in negotiation does not block others', async () => {
    const s = net.connect(srv.port, '127.0.0.1');
    await readExactly(s, 18);
    expect(healthy()).toBe('True');
    s.destroy();
  });
});

describe('shutdown', () => {
  it('SIGTERM finishes in-flight requests, flushes and exits 0; acknowledged data survives', async () => {
    const own = await startServer({ volumes: { d: '64M' } });
    // A client writing continuously when SIGTERM lands.
    const writer = spawn(
      'nbdsh',
      ['-u', own.uri('d'), '-c', `
import sys
i = 0
try:
    while True:
        h.pwrite(bytes([i % 251 + 1]) * 65536, (i % 1024) * 65536)
        i += 1
        print(i, flush=True)
except Exception as e:
    print('stopped', e, file=sys.stderr)
`],
      { env: { ...process.env, PATH: `/usr/bin:${process.env.PATH}` } },
    );
    const writerExited = new Promise((r) => writer.once('exit', r));
    const ackedNow = lastNumberPrinted(writer.stdout);
    for (let i = 0; i < 600 && ackedNow() < 20; i++) await new Promise((r) => setTimeout(r, 50));
    expect(await own.stop()).toBe(0);
    await writerExited;
    const acked = ackedNow();
    expect(acked).toBeGreaterThan(10);
    expect(own.logs()).toMatch(/stopped cleanly/);
    // Restart on the same pool; every acknowledged write is there.
    const again = await startServer({ pool: own.pool });
    // Slot j holds the last acknowledged write to it; the one write in flight at shutdown may or may not have landed.
    const out = nbdsh(again.uri('d'), `
acked = ${acked}
def val(i): return bytes([i % 251 + 1]) * 65536
ok = True
for j in range(min(acked + 1, 1024)):
    got = h.pread(65536, j * 65536)
    last = j + 1024 * ((acked - 1 - j) // 1024) if j <= acked - 1 else None
    allowed = [val(last)] if last is not None else [bytes(65536)]
    if (acked - j) % 1024 == 0: allowed.append(val(acked))
    ok = ok and got in allowed
print(ok)
`);
    expect(out.trim()).toBe('True');
    await again.stop();
  });
});

describe('many connections', () => {
  it('serves 16 concurrent clients on different exports', async () => {
    srv.cli(['volume', 'create', 'other', '8M']);
    const jobs = Array.from({ length: 16 }, (_, i) =>
      new Promise<number>((resolve) => {
        const name = i % 2 ? 'other' : 'vol';
        const p = spawn('qemu-io', ['-f', 'raw', srv.uri(name), '-c', `write -P ${i + 1} ${(i + 8) * 65536} 64k`, '-c', `read -P ${i + 1} ${(i + 8) * 65536} 64k`]);
        p.once('exit', (code) => resolve(code ?? -1));
      }),
    );
    expect(await Promise.all(jobs)).toEqual(Array(16).fill(0));
    expect(run('nbdinfo', ['--list', `nbd://127.0.0.1:${srv.port}`]).stdout).toMatch(/other/);
  });
});
