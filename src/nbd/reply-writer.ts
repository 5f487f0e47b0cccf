// The write side of one NBD connection. Small replies go through Node's stream, corked until
// the end of the tick so replies completed together leave in one writev; the replies to large
// writes (sendSoon) stay corked until the loop has handled every socket that was readable, so
// the acknowledgements of payloads that arrived together leave in one send: each send on
// loopback also pays for delivering it to the client and waking it (~50 µs here). A reply with a large
// body is sent from the thread pool instead (native.sendBuffers): the kernel's TCP send path
// costs ~0.2 ms per MiB here, and on the JS thread it would serialise every connection's
// large replies behind one core. While such a send runs it owns the socket, so later replies
// wait here, in order; it starts only once Node's own queue is empty.
import type net from 'node:net';
import * as native from '../native/index.js';
import type { PoolFd } from './pool-fd.js';

/** replies whose buffers add up to at least this are sent from the thread pool */
export const POOL_SEND_MIN = Number(process.env.SNAPBLOCK_POOL_SEND_MIN ?? 256 * 1024);
/** a pool send waits this long in all for room in the socket, then leaves the rest to Node */
const POOL_SEND_TIMEOUT_MS = 200;

interface Reply {
  bufs: Buffer[];
  bytes: number;
  /** called once the reply has been sent, or dropped because the connection is gone */
  after?: () => void;
}

export class ReplyWriter {
  /** replies waiting behind a pool send (or for Node's queue to empty before one) */
  private readonly held: Reply[] = [];
  private heldBytes = 0;
  private poolBusy = false;
  private waitingDrain = false;
  private corked = false;
  private closed = false;
  private idleWaiters: Array<() => void> = [];
  /** buffers handed to Node's stream whose writes have not completed yet */
  private streamed = 0;
  /** Called as queued replies leave, while set: the session's back-pressure waits on it. */
  onLeft?: () => void;
  /** the write callback of every buffer (one shared function: no allocation per reply) */
  private readonly wrote = (): void => {
    this.streamed--;
    this.onLeft?.();
  };

  /** pool: the socket's descriptor where pool sends are possible (plaintext), else undefined */
  constructor(
    private readonly socket: net.Socket,
    private readonly pool: PoolFd | undefined,
  ) {
    socket.once('close', () => {
      this.closed = true;
      for (const r of this.held.splice(0)) r.after?.();
      this.heldBytes = 0;
      this.settle();
      this.onLeft?.();
    });
  }

  /** whether large replies go through the thread pool (plaintext connections) */
  get pooled(): boolean {
    return POOL_SEND_MIN > 0 && this.pool?.usable === true;
  }

  /** bytes accepted but not yet handed to the kernel */
  get pendingBytes(): number {
    return this.socket.writableLength + this.heldBytes;
  }

  /**
   * Buffers and replies accepted but not yet handed to the kernel. Each costs memory beyond
   * its bytes (a Buffer object, an entry in Node's write queue), which for small replies is
   * most of it: the session bounds this count as well as pendingBytes.
   */
  get pendingEntries(): number {
    return this.streamed + this.held.length;
  }

  send(bufs: Buffer[], after?: () => void): void {
    let bytes = 0;
    for (const b of bufs) bytes += b.length;
    const reply: Reply = { bufs, bytes, after };
    if (this.closed) return after?.();
    if (this.mustWait) {
      this.held.push(reply);
      this.heldBytes += bytes;
      return;
    }
    this.dispatch(reply);
  }

  /**
   * A small reply that may wait for the rest of this turn of the event loop, to leave with the
   * others completed in it (the reply to a large write: its payload took far longer to arrive).
   */
  sendSoon(bufs: Buffer[]): void {
    if (!this.closed && !this.mustWait) this.corkUntil(setImmediate);
    this.send(bufs);
  }

  /** Resolves once every reply given so far has left (or the connection is gone). */
  flushed(): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** a new reply must queue behind a pool send, a wait for Node's queue to drain, or held replies */
  private get mustWait(): boolean {
    return this.poolBusy || this.waitingDrain || this.held.length > 0;
  }

  private isIdle(): boolean {
    return this.closed || !this.mustWait;
  }

  private settle(): void {
    if (this.isIdle()) for (const w of this.idleWaiters.splice(0)) w();
  }

  /** Send now: through the pool if large and possible, else through Node's stream. */
  private dispatch(reply: Reply): void {
    if (this.pooled && reply.bytes >= POOL_SEND_MIN) {
      this.flushCork();
      if (this.socket.writableLength > 0) {
        // Node still holds earlier bytes: they go first.
        this.held.unshift(reply);
        this.heldBytes += reply.bytes;
        this.waitingDrain = true;
        this.socket.once('drain', () => {
          this.waitingDrain = false;
          this.release();
        });
        return;
      }
      return this.poolSend(reply);
    }
    this.streamWrite(reply.bufs, reply.after);
  }

  private streamWrite(bufs: Buffer[], after?: () => void): void {
    this.corkUntil(process.nextTick);
    for (let i = 0; i < bufs.length; i++) {
      this.streamed++;
      if (i === bufs.length - 1 && after) {
        this.socket.write(bufs[i], () => {
          this.wrote();
          after();
        });
      } else this.socket.write(bufs[i], this.wrote);
    }
  }

  /** Cork the stream, unless it is already, until `later` runs the flush. */
  private corkUntil(later: (flush: () => void) => void): void {
    if (this.corked) return;
    this.corked = true;
    this.socket.cork();
    later(() => this.flushCork());
  }

  private flushCork(): void {
    if (!this.corked) return;
    this.corked = false;
    this.socket.uncork();
  }

  private poolSend(reply: Reply): void {
    this.poolBusy = true;
    this.pool!.run((fd) => native.sendBuffers(fd, reply.bufs, POOL_SEND_TIMEOUT_MS)).then(
      (sent) => {
        this.poolBusy = false;
        if (sent < reply.bytes && !this.closed) {
          // A slow reader: the rest goes through Node's stream, which waits for room itself.
          this.streamWrite(rest(reply.bufs, sent), reply.after);
        } else reply.after?.();
        this.release();
      },
      (err: Error) => {
        this.poolBusy = false;
        reply.after?.();
        this.socket.destroy(err);
        this.settle();
      },
    );
  }

  /**
   * Let the held replies go, in order. They leave together, as one pool send when they add up
   * to a large one: a pool send's round trip through the event loop would otherwise leave the
   * socket idle between every two replies of a busy connection.
   */
  private release(): void {
    if (this.held.length && !this.poolBusy && !this.waitingDrain && !this.closed) {
      const batch = this.held.splice(0);
      this.heldBytes = 0;
      if (batch.length === 1) this.dispatch(batch[0]);
      else {
        const bufs: Buffer[] = [];
        let bytes = 0;
        for (const r of batch) {
          for (const b of r.bufs) bufs.push(b);
          bytes += r.bytes;
        }
        this.dispatch({ bufs, bytes, after: () => batch.forEach((r) => r.after?.()) });
      }
    }
    this.settle();
    this.onLeft?.();
  }
}

/** The buffers after the first `skip` bytes. */
function rest(bufs: Buffer[], skip: number): Buffer[] {
  const out: Buffer[] = [];
  for (const b of bufs) {
    if (skip >= b.length) skip -= b.length;
    else {
      out.push(skip ? b.subarray(skip) : b);
      skip = 0;
    }
  }
  return out;
}
