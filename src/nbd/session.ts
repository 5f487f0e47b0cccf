// Transmission phase of one connection: decode requests as bytes arrive, hand each
// to the export's block layer at once (many in flight, replies in completion order),
// and encode replies. Memory per connection is bounded: past MAX_QUEUED requests in
// flight or unsent reply buffers, or maxInflightBytes of either (counted with a cost per
// entry), we stop reading the socket until work completes and the client reads.
import type net from 'node:net';
import type { Logger } from 'pino';
import type { BlockLayer, InPlaceWrite, MappedRange } from '../block/layer.js';
import type { Negotiated } from './handshake.js';
import type { MetaContextSource } from './exports.js';
import { ByteQueue } from './byte-queue.js';
import { AllocationFlag, BASE_ALLOCATION, Cmd, CmdFlag, NbdErr, REQUEST_MAGIC, ReplyFlag, ReplyType, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC } from './constants.js';
import { nbdErrno } from './errors.js';
import { ioBuffer, recycle } from '../block/io-buffers.js';
import { DirectSocket } from './direct-socket.js';
import { POOL_SEND_MIN, ReplyWriter } from './reply-writer.js';

export interface SessionConfig {
  maxPayload: number;
  maxInflightBytes: number;
  log: Logger;
}

const HEADER = 28;
/** reads at least this long are checked for holes and answered with OFFSET_HOLE chunks */
const SPARSE_READ_MIN = 64 * 1024;
const MAX_DESCRIPTORS = 64 * 1024;
/** write payloads at least this long are received straight into their own buffer */
const DIRECT_PAYLOAD_MIN = 64 * 1024;
/**
 * Requests in flight, and reply buffers not yet handed to the kernel, that one connection may
 * hold before its socket stops being read. Far above any real client's queue depth (the Linux
 * client: 128 per connection): only a client that does not read its replies reaches it.
 */
const MAX_QUEUED = 4096;
/**
 * Memory a queued reply buffer costs beyond its bytes (Buffer object, Node's write-queue
 * entry): measured ~210-250 B (1M unread 16-byte replies grew the server 205-253 MiB).
 */
const REPLY_ENTRY_COST = 256;
/** Memory a request in flight costs beyond its payload (request, promise, closures): an estimate. */
const REQUEST_COST = 1024;
/** holes of a mapped read that must travel as data */
const ZEROES = Buffer.alloc(1024 * 1024);

const ALLOWED_FLAGS: Record<number, number> = {
  [Cmd.READ]: CmdFlag.FUA | CmdFlag.DF,
  [Cmd.WRITE]: CmdFlag.FUA,
  [Cmd.DISC]: 0,
  [Cmd.FLUSH]: CmdFlag.FUA,
  [Cmd.TRIM]: CmdFlag.FUA,
  [Cmd.CACHE]: CmdFlag.FUA,
  [Cmd.WRITE_ZEROES]: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
  [Cmd.BLOCK_STATUS]: CmdFlag.FUA | CmdFlag.REQ_ONE,
};

interface Request {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
}

class ProtocolViolation extends Error {}

export class Session {
  private readonly socket: net.Socket;
  private readonly out: ReplyWriter;
  /** set for plaintext connections: reads go into buffers we choose (see direct-socket.ts) */
  private readonly direct?: DirectSocket;
  private receiving = false; // a large payload is being received straight into its buffer
  private placing?: InPlaceWrite; // ... and that buffer is the volume's own pages
  private discarding = false; // shutting down: incoming bytes are dropped
  private readonly layer: BlockLayer;
  private readonly queue: ByteQueue;
  private readonly contexts: Array<{ id: number; source: MetaContextSource }> = [];
  private pending?: Request; // header parsed, payload not yet complete
  private drainLeft = 0; // bytes of a rejected payload still to discard
  private drained?: () => void; // the rejection reply, sent once the payload is gone
  private inflight = 0;
  private inflightBytes = 0;
  private throttled = false;
  private stopping = false;
  private closed = false;
  private idleWaiters: Array<() => void> = [];
  /** logged when the connection ends */
  readonly stats = { requests: 0, mappedReads: 0, inPlaceWrites: 0 };
  readonly done: Promise<void>;

  constructor(
    private readonly neg: Negotiated,
    private readonly cfg: SessionConfig,
  ) {
    this.layer = neg.opened.layer;
    this.queue = neg.leftover;
    this.direct = DirectSocket.adopt(neg.socket, this.queue, {
      onBytes: (view) => {
        if (this.discarding) return;
        this.queue.push(view);
        this.pump();
        // The view's memory is reused by the next read: keep a copy of what is still queued.
        if (this.queue.length) {
          const rest = Buffer.allocUnsafe(this.queue.length);
          this.queue.takeInto(rest, 0, rest.length);
          this.queue.push(rest);
        }
      },
    });
    this.socket = this.direct?.socket ?? neg.socket;
    this.out = new ReplyWriter(this.socket, this.direct?.pool);
    for (const [id, name] of neg.metaContexts) {
      const source = name === BASE_ALLOCATION ? this.allocationContext() : neg.opened.metaContexts?.find((m) => m.name === name);
      if (source) this.contexts.push({ id, source });
    }
    this.done = new Promise((resolve) => {
      this.socket.once('close', () => {
        this.closed = true;
        // A payload that was landing in place stops part way; the write ends unacknowledged.
        void this.placing?.finish(false);
        this.placing = undefined;
        this.settleIfIdle();
        resolve();
      });
    });
    this.socket.on('error', (err) => cfg.log.debug({ err: err.message }, 'nbd socket error'));
    this.socket.on('data', (chunk: Buffer) => {
      this.queue.push(chunk);
      this.pump();
    });
    this.socket.on('end', () => this.stop());
    this.socket.resume();
    this.pump();
  }

  /** Stop reading new requests, finish the ones in flight (including one whose payload is arriving), then close. */
  async stop(): Promise<void> {
    if (!this.stopping) {
      this.stopping = true;
      if (!this.pending && this.drainLeft === 0) this.socket.pause();
      await this.idle();
      if (!this.closed) {
        // A client that never reads its replies must not hold shutdown hostage.
        setTimeout(() => this.socket.destroy(), 5000).unref();
        await this.out.flushed();
      }
      if (!this.closed) {
        // Keep reading (and discarding) so the client's FIN is seen and 'close' fires.
        this.discarding = true;
        this.socket.removeAllListeners('data');
        this.socket.on('data', () => {});
        this.socket.resume();
        this.socket.end();
      }
    }
    await this.done;
  }

  private isIdle(): boolean {
    // A request still arriving counts as in flight, unless its sender is gone.
    return this.inflight === 0 && (this.closed || (!this.pending && this.drainLeft === 0));
  }

  private idle(): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private pump(): void {
    try {
      while (!this.throttled) {
        if (this.drainLeft > 0) {
          this.drainLeft -= this.queue.skip(this.drainLeft);
          if (this.drainLeft > 0) return;
          // Clients expect no reply before they finished sending the request.
          this.drained?.();
          this.drained = undefined;
          this.settleIfIdle();
          continue;
        }
        if (this.pending) {
          const req = this.pending;
          if (this.receiving) return;
          if (this.queue.length < req.length) {
            if (this.direct && req.length >= DIRECT_PAYLOAD_MIN) this.receiveDirect(req);
            return;
          }
          this.pending = undefined;
          this.dispatch(req, this.takePayload(req.length));
          continue;
        }
        if (this.stopping) {
          this.socket.pause();
          this.settleIfIdle();
          return;
        }
        if (this.holdsMore(1)) {
          // Too much queued (most often: the client is not reading its replies): take no
          // new request until work completes and it reads. Checked here, between requests,
          // so that a request whose payload is arriving is never left half received.
          this.throttle();
          return;
        }
        if (this.queue.length < HEADER) return;
        const h = this.queue.take(HEADER);
        if (h.readUInt32BE(0) !== REQUEST_MAGIC) throw new ProtocolViolation(`bad request magic 0x${h.readUInt32BE(0).toString(16)}`);
        const req: Request = {
          flags: h.readUInt16BE(4),
          type: h.readUInt16BE(6),
          cookieHi: h.readUInt32BE(8),
          cookieLo: h.readUInt32BE(12),
          offset: h.readUInt32BE(16) * 0x100000000 + h.readUInt32BE(20),
          length: h.readUInt32BE(24),
        };
        if (req.type === Cmd.WRITE) {
          const problem = this.rejectWrite(req);
          if (problem) {
            // The payload is on the wire whatever we think of it: discard it to stay in sync.
            if (req.length === 0) this.replySimple(req, problem);
            else {
              this.drainLeft = req.length;
              this.drained = () => this.replySimple(req, problem);
            }
            continue;
          }
          this.pending = req;
          continue;
        }
        if (req.type === Cmd.DISC) {
          void this.stop();
          return;
        }
        this.dispatch(req, undefined);
      }
    } catch (err) {
      this.cfg.log.warn({ err: (err as Error).message, remote: this.socket.remoteAddress }, 'closing NBD connection on protocol violation');
      this.socket.destroy();
    }
  }

  /** A payload the request may keep: in direct mode queued bytes live in a reused buffer. */
  private takePayload(n: number): Buffer {
    if (!this.direct) return this.queue.take(n);
    const payload = ioBuffer(n);
    this.queue.takeInto(payload, 0, n);
    return payload;
  }

  /**
   * Receive the rest of a large WRITE payload with no copy through the queue: into the
   * volume's cached pages where the layer can take it there (writeInPlace), else into a buffer.
   */
  private receiveDirect(req: Request): void {
    const began = performance.now();
    const place = this.layer.writeInPlace?.(req.offset, req.length, (idleMs) => {
      if (this.direct!.targetIdleMs(began) >= idleMs) this.abandonPlaced(req);
    });
    const pieces = place?.pieces ?? [ioBuffer(req.length)];
    const have = this.queue.length;
    for (let at = 0, i = 0; at < have; i++) {
      const n = Math.min(pieces[i].length, have - at);
      this.queue.takeInto(pieces[i], 0, n);
      at += n;
    }
    this.receiving = true;
    this.placing = place;
    this.direct!.receiveInto(pieces, have, HEADER, () => {
      this.receiving = false;
      this.pending = undefined;
      this.placing = undefined;
      this.dispatch(req, place ?? pieces[0]);
      this.pump();
    });
  }

  /** A payload landing in place made no progress while a snapshot waited for it. */
  private abandonPlaced(req: Request): void {
    this.cfg.log.warn({ offset: req.offset, length: req.length, remote: this.socket.remoteAddress }, 'closing NBD connection: its WRITE payload stopped arriving while a snapshot waited for it');
    this.socket.destroy();
  }

  private rejectWrite(req: Request): number {
    if (req.flags & ~ALLOWED_FLAGS[Cmd.WRITE]) return NbdErr.EINVAL;
    if (req.length > this.cfg.maxPayload) return NbdErr.EINVAL;
    if (this.layer.caps.readOnly) return NbdErr.EPERM;
    if (req.offset + req.length > this.layer.size) return NbdErr.ENOSPC;
    return 0;
  }

  /** Validate a non-WRITE request; returns an NBD errno or 0. */
  private validate(req: Request): number {
    const allowed = ALLOWED_FLAGS[req.type];
    if (allowed === undefined) return NbdErr.EINVAL;
    if (req.flags & ~allowed) return NbdErr.EINVAL;
    const size = this.layer.size;
    const caps = this.layer.caps;
    switch (req.type) {
      case Cmd.READ:
        if (req.flags & CmdFlag.DF && !this.neg.structured) return NbdErr.EINVAL;
        if (req.length > this.cfg.maxPayload) return req.flags & CmdFlag.DF ? NbdErr.EOVERFLOW : NbdErr.EINVAL;
        return req.offset + req.length > size ? NbdErr.EINVAL : 0;
      case Cmd.FLUSH:
        return 0;
      case Cmd.TRIM:
        if (caps.readOnly) return NbdErr.EPERM;
        return req.offset + req.length > size ? NbdErr.EINVAL : 0;
      case Cmd.WRITE_ZEROES:
        if (caps.readOnly) return NbdErr.EPERM;
        if (req.flags & CmdFlag.FAST_ZERO && !caps.fastZero) return NbdErr.ENOTSUP;
        return req.offset + req.length > size ? NbdErr.ENOSPC : 0;
      case Cmd.CACHE:
        return req.offset + req.length > size ? NbdErr.EINVAL : 0;
      case Cmd.BLOCK_STATUS:
        if (this.contexts.length === 0) return NbdErr.EINVAL;
        if (req.length === 0) return NbdErr.EINVAL;
        return req.offset + req.length > size ? NbdErr.EINVAL : 0;
      default:
        return NbdErr.EINVAL;
    }
  }

  /** payload: a WRITE's bytes, in a buffer or already landed in place */
  private dispatch(req: Request, payload: Buffer | InPlaceWrite | undefined): void {
    const err = payload ? 0 : this.validate(req);
    if (err) {
      if (req.type === Cmd.READ && this.neg.structured) this.replyError(req, err, 'invalid request');
      else this.replySimple(req, err);
      return;
    }
    // Memory this request holds until it completes (bytes landed in place hold none of ours).
    const bytes = req.type === Cmd.READ ? req.length : payload instanceof Buffer ? payload.length : req.type === Cmd.BLOCK_STATUS ? this.blockStatusReplyBound(req) : 0;
    this.stats.requests++;
    this.begin(bytes);
    this.execute(req, payload).then(
      () => {
        // Layers are done with a write payload once it succeeded (the BlockLayer contract).
        if (payload instanceof Buffer) recycle(payload);
        this.end(bytes);
      },
      (e: unknown) => {
        this.cfg.log.warn({ err: (e as Error).message, type: req.type, offset: req.offset, length: req.length }, 'NBD request failed');
        if (this.neg.structured && (req.type === Cmd.READ || req.type === Cmd.BLOCK_STATUS)) this.replyError(req, nbdErrno(e), (e as Error).message);
        else this.replySimple(req, nbdErrno(e));
        this.end(bytes);
      },
    );
  }

  private async execute(req: Request, payload: Buffer | InPlaceWrite | undefined): Promise<void> {
    const fua = (req.flags & CmdFlag.FUA) !== 0 && !this.layer.caps.readOnly;
    const L = this.layer;
    switch (req.type) {
      case Cmd.READ:
        return this.read(req);
      case Cmd.WRITE:
        if (payload instanceof Buffer) await L.write(req.offset, payload, { fua });
        else {
          this.stats.inPlaceWrites++;
          await (payload as InPlaceWrite).finish(true, { fua });
        }
        return this.replySimple(req, 0, req.length >= DIRECT_PAYLOAD_MIN);
      case Cmd.FLUSH:
        await L.flush();
        return this.replySimple(req, 0);
      case Cmd.TRIM:
        if (req.length) await L.trim(req.offset, req.length, { fua });
        else if (fua) await L.flush();
        return this.replySimple(req, 0);
      case Cmd.WRITE_ZEROES:
        if (req.length) {
          await L.zero(req.offset, req.length, {
            fua,
            mayTrim: (req.flags & CmdFlag.NO_HOLE) === 0,
            fast: (req.flags & CmdFlag.FAST_ZERO) !== 0,
          });
        } else if (fua) await L.flush();
        return this.replySimple(req, 0);
      case Cmd.CACHE:
        if (req.length) await L.cache(req.offset, req.length);
        return this.replySimple(req, 0);
      case Cmd.BLOCK_STATUS:
        return this.blockStatus(req);
    }
  }

  private async read(req: Request): Promise<void> {
    const L = this.layer;
    if (req.length === 0) {
      if (this.neg.structured) return this.sendChunk(req, ReplyFlag.DONE, ReplyType.NONE, 0);
      return this.send(simpleHeader(req, 0));
    }
    const sparse = this.neg.structured && req.length >= SPARSE_READ_MIN && !(req.flags & CmdFlag.DF) && L.caps.extents;
    // Reads that the pool would send anyway leave from the layer's mapped memory, where it offers that.
    if (req.length >= POOL_SEND_MIN && L.readMapped && this.out.pooled) {
      const mapped = L.readMapped(req.offset, req.length);
      if (mapped) return this.sendMapped(req, mapped, sparse);
    }
    if (!sparse) {
      const data = await L.read(req.offset, req.length);
      if (!this.neg.structured) return this.send(simpleHeader(req, 0), data, data);
      return this.sendData(req, req.offset, data, ReplyFlag.DONE);
    }
    // Holes travel as 12-byte OFFSET_HOLE chunks. The whole range is read while its extents
    // are looked up (holes read as zeroes cheaply): one wait instead of two in a row.
    const reading = L.read(req.offset, req.length);
    reading.catch(() => {}); // awaited below; an extents failure must not leave it unhandled
    const end = req.offset + req.length;
    const chunks: Array<{ offset: number; length: number; hole: boolean }> = [];
    for (let at = req.offset; at < end; ) {
      const ex = await L.extents(at, end - at);
      if (!ex.length) throw new Error('block layer returned no extents');
      for (const e of ex) {
        const len = Math.min(e.length, end - e.offset);
        const last = chunks[chunks.length - 1];
        if (last && last.hole === e.zero) last.length += len;
        else chunks.push({ offset: e.offset, length: len, hole: e.zero });
        at = e.offset + len;
        if (at >= end) break;
      }
    }
    const data = await reading;
    let lastData = -1;
    chunks.forEach((c, i) => (lastData = c.hole ? lastData : i));
    chunks.forEach((c, i) => {
      const flags = i === chunks.length - 1 ? ReplyFlag.DONE : 0;
      if (c.hole) return this.sendHole(req, c.offset, c.length, flags);
      // Pieces of one buffer: it is recycled once the last of them has been sent.
      const piece = data.subarray(c.offset - req.offset, c.offset - req.offset + c.length);
      this.sendData(req, c.offset, piece, flags, i === lastData ? data : undefined);
    });
    if (lastData < 0) recycle(data);
  }

  /**
   * A large read straight from the layer's mapped file memory: the thread pool writes it to
   * the socket (reply-writer.ts), with no copy into a buffer of ours first. Holes go as
   * OFFSET_HOLE chunks where the reply may be sparse, else as zeroes.
   */
  private sendMapped(req: Request, mapped: MappedRange, sparse: boolean): void {
    const pieces = mapped.pieces;
    this.stats.mappedReads++;
    if (!sparse) {
      const bufs = [this.neg.structured ? dataHeader(req, req.offset, req.length, ReplyFlag.DONE) : simpleHeader(req, 0)];
      for (const p of pieces) {
        if (typeof p !== 'number') bufs.push(p);
        else for (let left = p; left > 0; left -= ZEROES.length) bufs.push(left >= ZEROES.length ? ZEROES : ZEROES.subarray(0, left));
      }
      return this.out.send(bufs, mapped.release);
    }
    // Runs of bytes become data chunks; the views are released once the last one has left.
    let lastData = -1;
    pieces.forEach((p, i) => (lastData = typeof p === 'number' ? lastData : i));
    let at = req.offset;
    for (let i = 0; i < pieces.length; ) {
      const start = at;
      if (typeof pieces[i] === 'number') {
        while (i < pieces.length && typeof pieces[i] === 'number') at += pieces[i++] as number;
        this.sendHole(req, start, at - start, i === pieces.length ? ReplyFlag.DONE : 0);
        continue;
      }
      const bufs: Buffer[] = [];
      let last = false;
      while (i < pieces.length && typeof pieces[i] !== 'number') {
        const b = pieces[i] as Buffer;
        bufs.push(b);
        at += b.length;
        last ||= i === lastData;
        i++;
      }
      bufs.unshift(dataHeader(req, start, at - start, i === pieces.length ? ReplyFlag.DONE : 0));
      this.out.send(bufs, last ? mapped.release : undefined);
    }
    if (lastData < 0) mapped.release();
  }

  private async blockStatus(req: Request): Promise<void> {
    const results = await Promise.all(this.contexts.map((c) => c.source.descriptors(req.offset, req.length)));
    results.forEach((descs, i) => {
      let list = descs;
      if (req.flags & CmdFlag.REQ_ONE) list = list.slice(0, 1);
      else if (list.length > MAX_DESCRIPTORS) list = list.slice(0, MAX_DESCRIPTORS);
      const p = Buffer.allocUnsafe(4 + list.length * 8);
      p.writeUInt32BE(this.contexts[i].id, 0);
      let total = 0;
      list.forEach((d, j) => {
        const len = Math.min(d.length, req.length - total);
        p.writeUInt32BE(len, 4 + j * 8);
        p.writeUInt32BE(d.flags >>> 0, 8 + j * 8);
        total += len;
      });
      this.sendChunk(req, i === results.length - 1 ? ReplyFlag.DONE : 0, ReplyType.BLOCK_STATUS, p.length, p);
    });
  }

  /** The most a BLOCK_STATUS reply can take: every context's descriptors, at most one per 512-byte sector. */
  private blockStatusReplyBound(req: Request): number {
    return this.contexts.length * (20 + 4 + 8 * Math.min(MAX_DESCRIPTORS, Math.ceil(req.length / 512)));
  }

  private allocationContext(): MetaContextSource {
    return {
      name: BASE_ALLOCATION,
      descriptors: async (offset, length) => {
        const ex = await this.layer.extents(offset, length);
        const out: Array<{ length: number; flags: number }> = [];
        for (const e of ex) {
          const flags = (e.hole ? AllocationFlag.HOLE : 0) | (e.zero ? AllocationFlag.ZERO : 0);
          const last = out[out.length - 1];
          if (last && last.flags === flags) last.length += e.length;
          else out.push({ length: e.length, flags });
        }
        return out;
      },
    };
  }

  // ---- reply encoding ----

  /** soon: the reply to a large write, which may leave with the others of this loop turn (ReplyWriter.sendSoon) */
  private replySimple(req: Request, error: number, soon = false): void {
    if (!soon) this.send(simpleHeader(req, error));
    else if (!this.closed) this.out.sendSoon([simpleHeader(req, error)]);
  }

  private sendHole(req: Request, offset: number, length: number, flags: number): void {
    const p = Buffer.allocUnsafe(12);
    writeU64(p, 0, offset);
    p.writeUInt32BE(length, 8);
    this.sendChunk(req, flags, ReplyType.OFFSET_HOLE, 12, p);
  }

  private replyError(req: Request, error: number, message: string): void {
    const msg = Buffer.from(message.slice(0, 1024));
    const p = Buffer.allocUnsafe(6 + msg.length);
    p.writeUInt32BE(error, 0);
    p.writeUInt16BE(msg.length, 4);
    msg.copy(p, 6);
    this.sendChunk(req, ReplyFlag.DONE, ReplyType.ERROR, p.length, p);
  }

  /** whole: the buffer `data` is part of, recycled once sent (default: data itself) */
  private sendData(req: Request, offset: number, data: Buffer, flags: number, whole: Buffer | undefined = data): void {
    this.send(dataHeader(req, offset, data.length, flags), data, whole);
  }

  private sendChunk(req: Request, flags: number, type: number, length: number, payload?: Buffer): void {
    this.send(chunkHeader(req, flags, type, length, 0), payload);
  }

  /** recycleAfter: read data nobody else holds, reused once body has been sent. */
  private send(head: Buffer, body?: Buffer, recycleAfter?: Buffer): void {
    if (this.closed) return;
    this.out.send(body && body.length ? [head, body] : [head], recycleAfter ? () => recycle(recycleAfter) : undefined);
  }

  // ---- back-pressure ----
  // Two sides are bounded, each by count and by bytes: requests in flight (payload or read
  // length, plus REQUEST_COST each) and replies not yet handed to the kernel (their bytes plus
  // REPLY_ENTRY_COST per buffer). Counting bytes alone let 1M unread 16-byte error replies
  // (16 MB of bytes) cost 250 MiB of heap (issue 16). Past either bound the socket is not
  // read; reading resumes once both sides are under half, so a client that drains its
  // replies gets going again before its queue is empty. All plain integer arithmetic.

  /** whether requests in flight or unsent replies exceed `share` of their bounds */
  private holdsMore(share: number): boolean {
    const maxBytes = this.cfg.maxInflightBytes * share;
    const maxEntries = MAX_QUEUED * share;
    const replies = this.out.pendingEntries;
    return (
      this.inflight > maxEntries ||
      replies > maxEntries ||
      this.inflightBytes + this.inflight * REQUEST_COST > maxBytes ||
      this.out.pendingBytes + replies * REPLY_ENTRY_COST > maxBytes
    );
  }

  private begin(bytes: number): void {
    this.inflight++;
    this.inflightBytes += bytes;
  }

  private end(bytes: number): void {
    this.inflight--;
    this.inflightBytes -= bytes;
    this.settleIfIdle();
    if (this.throttled) this.resumeIfRoom();
  }

  private settleIfIdle(): void {
    if (this.isIdle()) for (const w of this.idleWaiters.splice(0)) w();
  }

  /** Stop reading the socket; requests completing and replies leaving call resumeIfRoom. */
  private throttle(): void {
    this.throttled = true;
    this.socket.pause();
    this.out.onLeft = this.resumeIfRoom;
  }

  private readonly resumeIfRoom = (): void => {
    // A connection that is gone stays throttled: what it left queued is not worth running.
    if (this.throttled && !this.socket.destroyed && !this.holdsMore(0.5)) this.unthrottle();
  };

  private unthrottle(): void {
    if (!this.throttled) return;
    this.throttled = false;
    this.out.onLeft = undefined;
    this.socket.resume();
    this.pump();
  }
}

/** Header of one structured reply chunk (exported for bench/micro.mjs). */
export function chunkHeader(req: Pick<Request, 'cookieHi' | 'cookieLo'>, flags: number, type: number, length: number, extra: number): Buffer {
  const h = Buffer.allocUnsafe(20 + extra);
  h.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(req.cookieHi, 8);
  h.writeUInt32BE(req.cookieLo, 12);
  h.writeUInt32BE(length, 16);
  return h;
}

/** Header of a simple reply. */
function simpleHeader(req: Pick<Request, 'cookieHi' | 'cookieLo'>, error: number): Buffer {
  const h = Buffer.allocUnsafe(16);
  h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(error, 4);
  h.writeUInt32BE(req.cookieHi, 8);
  h.writeUInt32BE(req.cookieLo, 12);
  return h;
}

/** Header of an OFFSET_DATA chunk carrying `length` bytes read at `offset`. */
function dataHeader(req: Pick<Request, 'cookieHi' | 'cookieLo'>, offset: number, length: number, flags: number): Buffer {
  const h = chunkHeader(req, flags, ReplyType.OFFSET_DATA, 8 + length, 8);
  writeU64(h, 20, offset);
  return h;
}

function writeU64(b: Buffer, pos: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000), pos);
  b.writeUInt32BE(v >>> 0, pos + 4);
}
