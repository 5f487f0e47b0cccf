// Attacks on the NBD protocol layer (issue 16): plaintext injected across STARTTLS, and
// clients that never read their replies, in transmission and in negotiation. Each attack is
// made with raw sockets; what it did is judged by independent clients (nbdsh over TLS) and by
// the server's own resident memory (/proc/PID/status).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { makeCerts, type Certs } from './helpers/certs.js';
import { closed, readExactly, rawConnect, request } from './helpers/raw-nbd.js';
import { nbdsh, startServer, tempDir, type RunningServer } from './helpers/server.js';

const IHAVEOPT = 0x49484156454f5054n;
const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const OPT_STARTTLS = 5;
const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const REP_ACK = 1;
const CMD_READ = 0;
const CMD_WRITE = 1;
const EINVAL = 22;
const MiB = 1024 * 1024;
/**
 * Growth of the server's resident memory one flooding client may cause. With the bounds per
 * connection (session.ts, handshake.ts) it measured 2-22 MiB; the old code grew by 133-250 MiB
 * under the same floods. 64 MiB leaves room for V8's lazily collected garbage.
 */
const RSS_GROWTH_LIMIT = 64 * MiB;
/**
 * The same for ten flooding clients at once. What the bounds let them hold is small (the
 * server's heap after a full GC at the end of such a flood: 17.3 MB, as before it), but they
 * made it process ~3.3M requests within seconds, and the peak RSS also holds V8's garbage:
 * its young generation alone grows to 48 MiB at that allocation rate (with
 * --max-semi-space-size=1 the same flood measured +55 MiB). Measured +81 to +113 MiB. The old
 * code grew by 1.2 GiB in 15 s, and dies of heap exhaustion given the time.
 */
const RSS_GROWTH_LIMIT_TEN = 256 * MiB;

function option(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(IHAVEOPT, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

/** The data of an INFO/GO option for one export, asking for no particular information. */
function goData(exportName: string): Buffer {
  const name = Buffer.from(exportName);
  const d = Buffer.alloc(4 + name.length + 2);
  d.writeUInt32BE(name.length, 0);
  name.copy(d, 4);
  return d;
}

/** Read option replies until the ACK (or an error) for `opt`; returns the reply types seen. */
async function optionReplies(s: net.Socket, opt: number): Promise<number[]> {
  const types: number[] = [];
  for (;;) {
    const h = await readExactly(s, 20);
    expect(h.readBigUInt64BE(0)).toBe(OPTION_REPLY_MAGIC);
    expect(h.readUInt32BE(8)).toBe(opt);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    if (len) await readExactly(s, len);
    types.push(type);
    if (type === REP_ACK || type >= 0x80000000) return types;
  }
}

/** Everything `s` delivers within `ms` (the socket is left paused afterwards). */
function bytesWithin(s: net.Socket, ms: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const got: Buffer[] = [];
    const onData = (c: Buffer) => got.push(c);
    s.on('data', onData);
    s.resume();
    setTimeout(() => {
      s.off('data', onData);
      s.pause();
      resolve(Buffer.concat(got));
    }, ms);
  });
}

function vmRssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]) * 1024;
}

interface FloodResult {
  /** messages handed to the socket (all of them reach the server once it reads again) */
  sent: number;
  /** highest server RSS seen during the flood and the settling time after it */
  peakRss: number;
  ms: number;
}

/**
 * Send `total` fixed-size messages, `perChunk` at a time, without ever reading. A chunk is
 * written only once the previous one has left (drain), so the client holds at most one; the
 * flood ends at `total`, at `deadlineMs`, or once the server has taken nothing for `stallMs`
 * (it stopped reading: that is the defence). The server's RSS is sampled all along.
 */
async function flood(s: net.Socket, pid: number, total: number, perChunk: number, message: (i: number, into: Buffer, at: number) => void, size: number, opts = { deadlineMs: 15_000, stallMs: 2_000, settleMs: 1_000 }): Promise<FloodResult> {
  const t0 = Date.now();
  let peakRss = vmRssBytes(pid);
  const sampler = setInterval(() => (peakRss = Math.max(peakRss, vmRssBytes(pid))), 100);
  let sent = 0;
  try {
    while (sent < total && Date.now() - t0 < opts.deadlineMs) {
      const n = Math.min(perChunk, total - sent);
      const chunk = Buffer.allocUnsafe(n * size);
      for (let i = 0; i < n; i++) message(sent + i, chunk, i * size);
      sent += n;
      if (s.write(chunk)) continue;
      const drained = await new Promise<boolean>((resolve) => {
        const t = setTimeout(() => resolve(false), opts.stallMs);
        s.once('drain', () => {
          clearTimeout(t);
          resolve(true);
        });
      });
      if (!drained) break;
    }
    await new Promise((r) => setTimeout(r, opts.settleMs));
    peakRss = Math.max(peakRss, vmRssBytes(pid));
  } finally {
    clearInterval(sampler);
  }
  return { sent, peakRss, ms: Date.now() - t0 };
}

/** Collect exactly n bytes from a socket that was never read until now, within ms. */
function collect(s: net.Socket, n: number, ms: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const out = Buffer.allocUnsafe(n);
    let at = 0;
    const t = setTimeout(() => reject(new Error(`only ${at} of ${n} reply bytes within ${ms} ms`)), ms);
    s.on('data', (c: Buffer) => {
      c.copy(out, at, 0, Math.min(c.length, n - at));
      at += c.length;
      if (at >= n) {
        clearTimeout(t);
        resolve(out);
      }
    });
    s.once('close', () => reject(new Error(`connection closed after ${at} of ${n} reply bytes`)));
    s.resume();
  });
}

let certs: Certs;
beforeAll(() => {
  certs = makeCerts(tempDir('certs-'));
});

describe('STARTTLS (class of CVE-2021-3716)', () => {
  let srv: RunningServer;
  beforeAll(async () => {
    srv = await startServer({ volumes: { b: '1M' }, args: ['--tls', 'require', '--tls-cert', certs.serverCert, '--tls-key', certs.serverKey, '--tls-ca', certs.ca] });
  });
  afterAll(async () => {
    expect(await srv.stop()).toBe(0);
  });

  const readOverTls = (length: number, offset: number) =>
    nbdsh(
      undefined,
      `h.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_certificates(${JSON.stringify(certs.dir)})\nh.set_export_name('b')\nh.connect_tcp('127.0.0.1', '${srv.port}')\n` +
        `import sys; sys.stdout.write(h.pread(${length}, ${offset}).hex())`,
    );

  it('plaintext sent with STARTTLS is discarded, not obeyed after the upgrade', async () => {
    const s = net.connect(srv.port, '127.0.0.1');
    s.setNoDelay(true);
    await new Promise((r) => s.once('connect', r));
    await readExactly(s, 18);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(3, 0); // FIXED_NEWSTYLE | NO_ZEROES
    s.write(flags);
    // One segment: STARTTLS, then a GO and a 4 KiB WRITE at offset 0 an attacker on the path
    // appended in plaintext, hoping the server keeps them and acts on them under TLS.
    const injected = Buffer.alloc(4096, 0xee);
    s.write(Buffer.concat([option(OPT_STARTTLS), option(OPT_GO, goData('b')), request(CMD_WRITE, 0n, 4096, 1n), injected]));
    const ack = await readExactly(s, 20);
    expect(ack.readBigUInt64BE(0)).toBe(OPTION_REPLY_MAGIC);
    expect(ack.readUInt32BE(8)).toBe(OPT_STARTTLS);
    expect(ack.readUInt32BE(12)).toBe(REP_ACK);

    const secure = tls.connect({ socket: s, ca: fs.readFileSync(certs.ca), cert: fs.readFileSync(path.join(certs.dir, 'client-cert.pem')), key: fs.readFileSync(path.join(certs.dir, 'client-key.pem')), servername: 'localhost' });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', reject);
    });
    // Nothing was asked under TLS yet: any reply now answers the injected GO.
    const unasked = await bytesWithin(secure, 1000);
    expect(unasked.length, `unasked reply under TLS: ${unasked.subarray(0, 64).toString('hex')}`).toBe(0);

    // The connection itself goes on: a GO and a WRITE asked under TLS are served.
    secure.write(option(OPT_GO, goData('b')));
    expect((await optionReplies(secure, OPT_GO)).at(-1)).toBe(REP_ACK);
    secure.write(Buffer.concat([request(CMD_WRITE, 4096n, 4096, 2n), Buffer.alloc(4096, 0x11)]));
    const reply = await readExactly(secure, 16);
    expect(reply.readUInt32BE(0)).toBe(SIMPLE_REPLY_MAGIC);
    expect(reply.readUInt32BE(4)).toBe(0);
    expect(reply.readBigUInt64BE(8)).toBe(2n);
    secure.destroy();

    // Judged by libnbd: the injected WRITE never landed, the one asked under TLS did.
    expect(readOverTls(4096, 0)).toBe('00'.repeat(4096));
    expect(readOverTls(4096, 4096)).toBe('11'.repeat(4096));
  });
});

describe('clients that never read their replies', () => {
  let srv: RunningServer;
  let pid: number;
  beforeAll(async () => {
    srv = await startServer({ volumes: { v: '1M' } });
    pid = srv.proc.pid!;
  });
  afterAll(async () => {
    expect(await srv.stop()).toBe(0);
  });

  const healthy = () => nbdsh(srv.uri('v'), "h.pwrite(b'\\x5a' * 4096, 8192); print(h.pread(4096, 8192) == b'\\x5a' * 4096)").trim();

  it('1M pipelined READs past the end, replies unread: bounded memory, others served, replies in order', async () => {
    expect(healthy()).toBe('True'); // also warms the server up before the baseline
    const baseline = vmRssBytes(pid);
    const s = await rawConnect(srv.port, 'v');
    s.pause();
    const total = 1_000_000;
    const past = request(CMD_READ, 2n * BigInt(MiB), 512); // the export is 1 MiB
    const f = await flood(s, pid, total, 16_384, (i, into, at) => {
      past.copy(into, at);
      into.writeBigUInt64BE(BigInt(i + 1), at + 8); // cookie: position in the stream, from 1
    }, 28);
    const growth = f.peakRss - baseline;
    console.log(`transmission flood: ${f.sent} requests sent in ${f.ms} ms; server RSS ${(baseline / MiB).toFixed(1)} -> peak ${(f.peakRss / MiB).toFixed(1)} MiB (+${(growth / MiB).toFixed(1)})`);
    expect(growth).toBeLessThan(RSS_GROWTH_LIMIT);

    const t0 = Date.now();
    expect(healthy()).toBe('True');
    expect(Date.now() - t0).toBeLessThan(5_000);

    // Now the flooder reads: one EINVAL reply per request it sent, in the order sent.
    const replies = await collect(s, f.sent * 16, 30_000);
    for (let i = 0; i < f.sent; i++) {
      const at = i * 16;
      if (replies.readUInt32BE(at) !== SIMPLE_REPLY_MAGIC || replies.readUInt32BE(at + 4) !== EINVAL || replies.readBigUInt64BE(at + 8) !== BigInt(i + 1)) {
        throw new Error(`reply ${i} is wrong: ${replies.subarray(at, at + 16).toString('hex')}`);
      }
    }
    s.destroy();
  }, 60_000);

  it('1M options during negotiation, replies unread: bounded memory, others served, replies in order', async () => {
    const baseline = vmRssBytes(pid);
    const s = net.connect(srv.port, '127.0.0.1');
    await new Promise((r) => s.once('connect', r));
    await readExactly(s, 18);
    s.pause();
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(3, 0);
    s.write(flags);
    const structured = option(OPT_STRUCTURED_REPLY);
    const f = await flood(s, pid, 1_000_000, 16_384, (_i, into, at) => structured.copy(into, at), 16, { deadlineMs: 12_000, stallMs: 2_000, settleMs: 1_000 });
    const growth = f.peakRss - baseline;
    console.log(`negotiation flood: ${f.sent} options sent in ${f.ms} ms; server RSS ${(baseline / MiB).toFixed(1)} -> peak ${(f.peakRss / MiB).toFixed(1)} MiB (+${(growth / MiB).toFixed(1)})`);
    expect(growth).toBeLessThan(RSS_GROWTH_LIMIT);

    const t0 = Date.now();
    expect(healthy()).toBe('True');
    expect(Date.now() - t0).toBeLessThan(5_000);

    // Within the 30 s negotiation timeout, the flooder reads: one ACK per option, in order.
    const replies = await collect(s, f.sent * 20, 10_000);
    for (let i = 0; i < f.sent; i++) {
      const at = i * 20;
      if (replies.readBigUInt64BE(at) !== OPTION_REPLY_MAGIC || replies.readUInt32BE(at + 8) !== OPT_STRUCTURED_REPLY || replies.readUInt32BE(at + 12) !== REP_ACK || replies.readUInt32BE(at + 16) !== 0) {
        throw new Error(`reply ${i} is wrong: ${replies.subarray(at, at + 20).toString('hex')}`);
      }
    }
    s.destroy();
  }, 60_000);
});

describe('ten clients flooding at once', () => {
  it('the server survives with bounded memory, serves others, and SIGTERM is not held hostage', async () => {
    const srv = await startServer({ volumes: { v: '1M' } });
    const pid = srv.proc.pid!;
    try {
      expect(nbdsh(srv.uri('v'), "h.pwrite(b'\\x5a' * 4096, 0); print(h.pread(4096, 0) == b'\\x5a' * 4096)").trim()).toBe('True');
      const baseline = vmRssBytes(pid);
      const clients = await Promise.all(Array.from({ length: 10 }, () => rawConnect(srv.port, 'v')));
      for (const s of clients) s.on('error', () => {}); // reset when the server shuts down
      const past = request(CMD_READ, 2n * BigInt(MiB), 512);
      const floods = await Promise.all(
        clients.map((s) => {
          s.pause();
          return flood(s, pid, 1_000_000, 16_384, (_i, into, at) => past.copy(into, at), 28, { deadlineMs: 20_000, stallMs: 2_000, settleMs: 500 });
        }),
      );
      const peak = Math.max(...floods.map((f) => f.peakRss));
      console.log(`10 flooders: ${floods.map((f) => f.sent).join(', ')} requests sent; server RSS ${(baseline / MiB).toFixed(1)} -> peak ${(peak / MiB).toFixed(1)} MiB (+${((peak - baseline) / MiB).toFixed(1)})`);
      expect(srv.proc.exitCode).toBe(null);
      expect(peak - baseline).toBeLessThan(RSS_GROWTH_LIMIT_TEN);
      expect(nbdsh(srv.uri('v'), 'print(h.pread(4096, 0) == b"\\x5a" * 4096)').trim()).toBe('True');
      // The flooders are still connected and still not reading: shutdown gives up on them
      // after its 5 s grace, it does not wait for them forever.
      const t0 = Date.now();
      expect(await srv.stop()).toBe(0);
      expect(Date.now() - t0).toBeLessThan(15_000);
      for (const s of clients) s.destroy();
    } finally {
      await srv.kill9();
    }
  }, 60_000);
});

describe('the NBD Unix socket', () => {
  /** Start a server under umask 000 (the worst case), with extra serve arguments; the socket's permission bits. */
  async function socketModeUnderUmask0(args: string[]): Promise<{ mode: number; srv: RunningServer }> {
    const old = process.umask(0); // the child inherits it
    let srv: RunningServer;
    try {
      srv = await startServer({ volumes: { s: '4M' }, args });
    } finally {
      process.umask(old);
    }
    return { mode: fs.statSync(srv.socket).mode & 0o777, srv };
  }

  it('is created 0600 whatever the umask, and serves its owner', async () => {
    const { mode, srv } = await socketModeUnderUmask0([]);
    try {
      expect(mode.toString(8)).toBe('600');
      expect(nbdsh(`nbd+unix:///s?socket=${srv.socket}`, 'print(h.get_size())').trim()).toBe(String(4 * 1024 * 1024));
    } finally {
      await srv.stop();
    }
  });

  it('--socket-mode 660 lets the group in, nothing more', async () => {
    const { mode, srv } = await socketModeUnderUmask0(['--socket-mode', '660']);
    await srv.stop();
    expect(mode.toString(8)).toBe('660');
  });
});

describe('the negotiation deadline restarts with each option', () => {
  let srv: RunningServer;
  beforeAll(async () => {
    srv = await startServer({ volumes: { n: '4M' }, args: ['--handshake-timeout', '2'] });
  });
  afterAll(async () => {
    await srv.stop();
  });

  /** Connect, read the greeting, send the client flags (fixed newstyle, no zeroes). */
  async function greeted(): Promise<net.Socket> {
    const s = net.connect(srv.port, '127.0.0.1');
    await new Promise((r) => s.once('connect', r));
    await readExactly(s, 18);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(3, 0);
    s.write(flags);
    return s;
  }

  it('a client sending an option every second negotiates past the 2 s deadline, then transmits', { timeout: 20_000 }, async () => {
    const s = await greeted();
    for (let i = 0; i < 5; i++) {
      s.write(option(OPT_STRUCTURED_REPLY));
      const r = await readExactly(s, 20);
      expect(r.readBigUInt64BE(0)).toBe(OPTION_REPLY_MAGIC);
      expect(r.readUInt32BE(12)).toBe(REP_ACK);
      await new Promise((r) => setTimeout(r, 1000));
    }
    // 5 s in, beyond the deadline as a whole: EXPORT_NAME still works, and so does a READ
    s.write(option(1, Buffer.from('n')));
    const info = await readExactly(s, 10);
    expect(info.readBigUInt64BE(0)).toBe(4n * 1024n * 1024n);
    s.write(request(0, 0n, 4096));
    expect((await readExactly(s, 4)).readUInt32BE(0)).toBe(0x668e33ef); // a structured reply chunk
    s.destroy();
  });

  it('a client silent for longer than the deadline is dropped', async () => {
    const t0 = Date.now();
    const s = await greeted();
    expect(await closed(s, 8000)).toBe(true);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1900);
  });
});
