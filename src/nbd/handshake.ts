// Fixed-newstyle negotiation: everything between accept() and the first request.
import type net from 'node:net';
import tls from 'node:tls';
import type { Logger } from 'pino';
import { ByteQueue } from './byte-queue.js';
import type { ExportProvider, OpenedExport } from './exports.js';
import {
  BASE_ALLOCATION,
  ClientFlag,
  HandshakeFlag,
  IHAVEOPT,
  Info,
  MAX_OPTION_LENGTH,
  MAX_STRING,
  NBDMAGIC,
  Opt,
  OPTION_REPLY_MAGIC,
  Rep,
  TxFlag,
} from './constants.js';

export interface TlsPolicy {
  context: tls.SecureContext;
  /** refuse everything but STARTTLS until TLS is up */
  required: boolean;
  /** demand a client certificate signed by the configured CA */
  verifyClients?: boolean;
}

export interface HandshakeConfig {
  exports: ExportProvider;
  tls?: TlsPolicy;
  maxPayload: number;
  preferredBlockSize: number;
  isShuttingDown(): boolean;
  /** called as each complete option arrives (the server's idle deadline restarts) */
  onOption?(): void;
  log: Logger;
}

export interface Negotiated {
  socket: net.Socket;
  opened: OpenedExport;
  structured: boolean;
  /** context id -> name of each selected metadata context */
  metaContexts: Map<number, string>;
  /** bytes the client sent after its last option (requests pipelined early) */
  leftover: ByteQueue;
  tls: boolean;
}

/** Thrown to end negotiation by closing the connection. */
export class HangUp extends Error {}

/**
 * The client's bytes during negotiation, pulled: the socket flows only while read() waits
 * for bytes, so what we hold is what one option needs plus one socket read. A client that
 * floods options whose replies it does not read therefore fills its own socket buffers,
 * not our memory (the option loop also waits for written replies to drain).
 */
class SocketReader {
  readonly queue = new ByteQueue();
  private wake?: () => void;
  private ended = false;
  private readonly onData = (c: Buffer) => {
    this.queue.push(c);
    this.wake?.();
  };
  private readonly onEnd = () => {
    this.ended = true;
    this.wake?.();
  };

  constructor(public socket: net.Socket) {
    this.attach(socket);
  }

  attach(socket: net.Socket): void {
    this.socket = socket;
    this.ended = false;
    socket.on('data', this.onData).on('end', this.onEnd).on('close', this.onEnd).on('error', this.onEnd);
    socket.pause(); // adding a 'data' listener made it flow; read() lets it flow while it waits
  }

  detach(): void {
    this.socket.off('data', this.onData).off('end', this.onEnd).off('close', this.onEnd).off('error', this.onEnd);
  }

  async read(n: number): Promise<Buffer> {
    while (this.queue.length < n) {
      if (this.ended) throw new HangUp('client closed the connection during negotiation');
      this.socket.resume();
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = undefined;
    }
    this.socket.pause();
    return this.queue.take(n);
  }

  /**
   * Drop every byte received so far: what is queued here and what the (detached, paused)
   * socket still buffers. Returns how many bytes were dropped.
   */
  discardReceived(): number {
    let dropped = this.queue.skip(this.queue.length);
    for (let c = this.socket.read() as Buffer | null; c; c = this.socket.read() as Buffer | null) dropped += c.length;
    return dropped;
  }
}

/** Resolves once the socket has written out what it buffered; a closed socket ends negotiation. */
function writesDrained(socket: net.Socket): Promise<void> {
  if (!socket.writableNeedDrain) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const onDrain = () => {
      socket.off('close', onClose);
      resolve();
    };
    const onClose = () => {
      socket.off('drain', onDrain);
      reject(new HangUp('client closed the connection while its option replies were unread'));
    };
    socket.once('drain', onDrain).once('close', onClose);
  });
}

export async function negotiate(raw: net.Socket, cfg: HandshakeConfig): Promise<Negotiated> {
  const reader = new SocketReader(raw);
  let socket: net.Socket = raw;
  let isTls = false;
  let structured = false;
  let selected: { exportName: string; names: string[] } | undefined;
  let noZeroes = false;

  const send = (buf: Buffer) => socket.write(buf);
  const reply = (opt: number, type: number, data: Buffer = Buffer.alloc(0)) => {
    const h = Buffer.allocUnsafe(20);
    h.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(type >>> 0, 12);
    h.writeUInt32BE(data.length, 16);
    send(data.length ? Buffer.concat([h, data]) : h);
  };
  const replyError = (opt: number, type: number, message: string) => reply(opt, type, Buffer.from(message));

  const greeting = Buffer.allocUnsafe(18);
  greeting.writeBigUInt64BE(NBDMAGIC, 0);
  greeting.writeBigUInt64BE(IHAVEOPT, 8);
  greeting.writeUInt16BE(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES, 16);
  send(greeting);

  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  if (clientFlags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)) throw new HangUp(`unknown client flags 0x${clientFlags.toString(16)}`);
  noZeroes = (clientFlags & ClientFlag.NO_ZEROES) !== 0;

  for (;;) {
    // A client that does not read its option replies gets no more of them: we stop reading
    // its options (the socket stays paused) until what we wrote has left (issue 16).
    await writesDrained(socket);
    const head = await reader.read(16);
    if (head.readBigUInt64BE(0) !== IHAVEOPT) throw new HangUp('bad option magic');
    const opt = head.readUInt32BE(8);
    const len = head.readUInt32BE(12);
    if (len > MAX_OPTION_LENGTH) throw new HangUp(`option ${opt} length ${len} exceeds ${MAX_OPTION_LENGTH}`);
    const data = await reader.read(len);
    cfg.onOption?.();
    cfg.log.debug({ opt, len }, 'nbd option');

    if (cfg.isShuttingDown() && opt !== Opt.ABORT) {
      if (opt === Opt.EXPORT_NAME) throw new HangUp('server shutting down');
      replyError(opt, Rep.ERR_SHUTDOWN, 'server is shutting down');
      continue;
    }
    if (cfg.tls?.required && !isTls && opt !== Opt.STARTTLS && opt !== Opt.ABORT) {
      if (opt === Opt.EXPORT_NAME) throw new HangUp('TLS required before EXPORT_NAME');
      replyError(opt, Rep.ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
      continue;
    }

    switch (opt) {
      case Opt.ABORT:
        reply(opt, Rep.ACK);
        throw new HangUp('client aborted negotiation');

      case Opt.STARTTLS: {
        if (len !== 0) { replyError(opt, Rep.ERR_INVALID, 'STARTTLS takes no data'); break; }
        if (!cfg.tls) { replyError(opt, Rep.ERR_UNSUP, 'TLS is not configured on this server'); break; }
        if (isTls) { replyError(opt, Rep.ERR_INVALID, 'TLS is already active'); break; }
        reply(opt, Rep.ACK);
        reader.detach();
        // Bytes that came after the STARTTLS option and before the TLS handshake are
        // plaintext anyone on the path could have injected (class of CVE-2021-3716): they
        // are discarded, as nbdkit does, never read as options or requests under TLS.
        // (A client must wait for this ACK before sending more; bytes it sends later go to
        // the TLS layer, where plaintext fails the handshake and ends the connection.)
        const injected = reader.discardReceived();
        if (injected) cfg.log.warn({ bytes: injected }, 'discarded plaintext sent after STARTTLS');
        socket = await upgradeToTls(raw, cfg.tls);
        reader.attach(socket);
        isTls = true;
        // Negotiation restarts its state under TLS.
        structured = false;
        selected = undefined;
        break;
      }

      case Opt.LIST: {
        if (len !== 0) { replyError(opt, Rep.ERR_INVALID, 'LIST takes no data'); break; }
        for (const e of await cfg.exports.list()) {
          const name = Buffer.from(e.name);
          const b = Buffer.allocUnsafe(4 + name.length);
          b.writeUInt32BE(name.length, 0);
          name.copy(b, 4);
          reply(opt, Rep.SERVER, b);
        }
        reply(opt, Rep.ACK);
        break;
      }

      case Opt.STRUCTURED_REPLY:
        if (len !== 0) { replyError(opt, Rep.ERR_INVALID, 'STRUCTURED_REPLY takes no data'); break; }
        structured = true;
        reply(opt, Rep.ACK);
        break;

      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT: {
        if (!structured) { replyError(opt, Rep.ERR_INVALID, 'negotiate STRUCTURED_REPLY first'); break; }
        const req = parseMetaContextRequest(data);
        if (!req) { replyError(opt, Rep.ERR_INVALID, 'malformed meta context request'); break; }
        const opened = await cfg.exports.open(req.exportName);
        if (!opened) { replyError(opt, Rep.ERR_UNKNOWN, `no export named "${req.exportName}"`); break; }
        const available = [BASE_ALLOCATION, ...(opened.metaContexts ?? []).map((m) => m.name)];
        await opened.release();
        const names = matchContexts(available, req.queries, opt === Opt.LIST_META_CONTEXT);
        names.forEach((name, i) => {
          const n = Buffer.from(name);
          const b = Buffer.allocUnsafe(4 + n.length);
          b.writeUInt32BE(i + 1, 0); // ids: position in the selection, from 1
          n.copy(b, 4);
          reply(opt, Rep.META_CONTEXT, b);
        });
        if (opt === Opt.SET_META_CONTEXT) selected = { exportName: req.exportName, names };
        reply(opt, Rep.ACK);
        break;
      }

      case Opt.EXPORT_NAME: {
        const name = data.toString('utf8');
        const opened = await cfg.exports.open(name);
        if (!opened) throw new HangUp(`EXPORT_NAME: no export named "${name}"`);
        const b = Buffer.alloc(noZeroes ? 10 : 134);
        b.writeBigUInt64BE(BigInt(opened.layer.size), 0);
        b.writeUInt16BE(transmissionFlags(opened, structured), 8);
        send(b);
        return finish(opened);
      }

      case Opt.INFO:
      case Opt.GO: {
        const req = parseInfoRequest(data);
        if (!req) { replyError(opt, Rep.ERR_INVALID, 'malformed INFO/GO request'); break; }
        const opened = await cfg.exports.open(req.name);
        if (!opened) { replyError(opt, Rep.ERR_UNKNOWN, `no export named "${req.name}"`); break; }
        const infoExport = Buffer.allocUnsafe(12);
        infoExport.writeUInt16BE(Info.EXPORT, 0);
        infoExport.writeBigUInt64BE(BigInt(opened.layer.size), 2);
        infoExport.writeUInt16BE(transmissionFlags(opened, structured), 10);
        reply(opt, Rep.INFO, infoExport);
        // Block size is always sent: our constraints hold whether or not the client asked.
        const bs = Buffer.allocUnsafe(14);
        bs.writeUInt16BE(Info.BLOCK_SIZE, 0);
        bs.writeUInt32BE(1, 2);
        bs.writeUInt32BE(cfg.preferredBlockSize, 6);
        bs.writeUInt32BE(cfg.maxPayload, 10);
        reply(opt, Rep.INFO, bs);
        if (req.infos.includes(Info.NAME)) reply(opt, Rep.INFO, Buffer.concat([u16(Info.NAME), Buffer.from(opened.name)]));
        if (req.infos.includes(Info.DESCRIPTION) && opened.description) {
          reply(opt, Rep.INFO, Buffer.concat([u16(Info.DESCRIPTION), Buffer.from(opened.description)]));
        }
        reply(opt, Rep.ACK);
        if (opt === Opt.INFO) { await opened.release(); break; }
        return finish(opened);
      }

      default:
        replyError(opt, Rep.ERR_UNSUP, `option ${opt} is not supported`);
    }
  }

  function finish(opened: OpenedExport): Negotiated {
    reader.detach();
    const metaContexts = new Map<number, string>();
    if (selected && selected.exportName === opened.name) selected.names.forEach((n, i) => metaContexts.set(i + 1, n));
    return { socket, opened, structured, metaContexts, leftover: reader.queue, tls: isTls };
  }
}

function transmissionFlags(opened: OpenedExport, structured: boolean): number {
  const c = opened.layer.caps;
  let f = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH;
  if (c.readOnly) f |= TxFlag.READ_ONLY;
  if (c.fua && !c.readOnly) f |= TxFlag.SEND_FUA;
  if (c.trim && !c.readOnly) f |= TxFlag.SEND_TRIM;
  if (c.zero && !c.readOnly) f |= TxFlag.SEND_WRITE_ZEROES;
  if (c.fastZero && c.zero && !c.readOnly) f |= TxFlag.SEND_FAST_ZERO;
  if (structured) f |= TxFlag.SEND_DF;
  if (c.multiConn) f |= TxFlag.CAN_MULTI_CONN;
  if (c.cache) f |= TxFlag.SEND_CACHE;
  return f;
}

function u16(v: number): Buffer {
  const b = Buffer.allocUnsafe(2);
  b.writeUInt16BE(v, 0);
  return b;
}

function parseInfoRequest(data: Buffer): { name: string; infos: number[] } | undefined {
  if (data.length < 6) return undefined;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING || 4 + nameLen + 2 > data.length) return undefined;
  const name = data.toString('utf8', 4, 4 + nameLen);
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 4 + nameLen + 2 + count * 2) return undefined;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(4 + nameLen + 2 + i * 2));
  return { name, infos };
}

function parseMetaContextRequest(data: Buffer): { exportName: string; queries: string[] } | undefined {
  if (data.length < 8) return undefined;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING || 4 + nameLen + 4 > data.length) return undefined;
  const exportName = data.toString('utf8', 4, 4 + nameLen);
  let pos = 4 + nameLen;
  const count = data.readUInt32BE(pos);
  pos += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.length) return undefined;
    const qLen = data.readUInt32BE(pos);
    pos += 4;
    if (qLen > MAX_STRING || pos + qLen > data.length) return undefined;
    queries.push(data.toString('utf8', pos, pos + qLen));
    pos += qLen;
  }
  return pos === data.length ? { exportName, queries } : undefined;
}

/** Which of the available contexts a list of queries names. LIST with no query means all. */
function matchContexts(available: string[], queries: string[], isList: boolean): string[] {
  if (queries.length === 0) return isList ? available : [];
  const out = new Set<string>();
  for (const q of queries) {
    for (const name of available) {
      const ns = name.slice(0, name.indexOf(':') + 1);
      if (q === name || (isList && q === ns)) out.add(name);
    }
  }
  return [...out];
}

function upgradeToTls(raw: net.Socket, policy: TlsPolicy): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const verify = policy.verifyClients ?? false;
    const secure = new tls.TLSSocket(raw, { isServer: true, secureContext: policy.context, requestCert: verify, rejectUnauthorized: verify });
    secure.once('secure', () => resolve(secure));
    secure.once('error', (err) => reject(new HangUp(`TLS handshake failed: ${err.message}`)));
    // A peer that hangs up mid-handshake may raise no error at all.
    secure.once('close', () => reject(new HangUp('client closed the connection during the TLS handshake')));
  });
}
