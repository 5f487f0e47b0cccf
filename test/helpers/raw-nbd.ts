// A hand-driven NBD client for tests that need what no real client does on purpose:
// malformed frames, a payload cut short, a stall half way through a request.
import net from 'node:net';

/** Open a raw TCP connection and complete a minimal EXPORT_NAME handshake. */
export async function rawConnect(port: number, exportName: string): Promise<net.Socket> {
  const s = net.connect(port, '127.0.0.1');
  await new Promise((r) => s.once('connect', r));
  await readExactly(s, 18);
  const name = Buffer.from(exportName);
  const opt = Buffer.alloc(4 + 16 + name.length);
  opt.writeUInt32BE(3, 0); // FIXED_NEWSTYLE | NO_ZEROES
  opt.writeBigUInt64BE(0x49484156454f5054n, 4);
  opt.writeUInt32BE(1, 12); // EXPORT_NAME
  opt.writeUInt32BE(name.length, 16);
  name.copy(opt, 20);
  s.write(opt);
  await readExactly(s, 10);
  return s;
}

export function readExactly(s: net.Socket, n: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    let buf = Buffer.alloc(0);
    const onData = (c: Buffer) => {
      buf = Buffer.concat([buf, c]);
      if (buf.length >= n) {
        s.off('data', onData);
        s.pause();
        if (buf.length > n) s.unshift(buf.subarray(n));
        resolve(buf.subarray(0, n));
      }
    };
    s.on('data', onData);
    s.resume();
    s.once('close', () => reject(new Error('closed')));
  });
}

export function closed(s: net.Socket, ms = 5000): Promise<boolean> {
  return new Promise((resolve) => {
    if (s.destroyed) return resolve(true);
    const t = setTimeout(() => resolve(false), ms);
    s.once('close', () => {
      clearTimeout(t);
      resolve(true);
    });
    s.resume();
  });
}

export function request(type: number, offset: bigint, length: number, cookie = 1n, flags = 0, magic = 0x25609513): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(magic, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeBigUInt64BE(offset, 16);
  h.writeUInt32BE(length, 24);
  return h;
}
