// Receiving into buffers we choose. By default Node reads a socket into a fresh 64 KiB
// buffer per read; on this kind of VM the first touch of fresh pages costs ~20 µs per 4 KiB
// page, which made 1 MiB writes cost ~2 ms of CPU each (nbdkit: ~0.4 ms). A plaintext
// connection is therefore re-adopted, once negotiation is over, as a socket with Node's
// `onread` option: small reads land in one reused scratch buffer, and a large WRITE payload
// is received straight into its own (recycled) buffer, like nbdkit's recv into the request.
// TLS connections keep the ordinary stream path (decryption allocates anyway).
import net from 'node:net';
import tls from 'node:tls';
import * as native from '../native/index.js';
import type { ByteQueue } from './byte-queue.js';
import { PoolFd } from './pool-fd.js';

const SCRATCH = 64 * 1024;

export interface DirectReceiver {
  /** bytes that landed in the scratch buffer; valid only during the call */
  onBytes(view: Buffer): void;
}

export class DirectSocket {
  readonly socket: net.Socket;
  /** the descriptor for thread-pool sends (reply-writer.ts) */
  readonly pool: PoolFd;
  private readonly scratch = Buffer.allocUnsafeSlow(SCRATCH);
  /** where the next reads go: pieces[index] from byte filled on, then the following pieces */
  private target?: { pieces: Buffer[]; index: number; filled: number; thenAtMost: number; done: () => void };
  /** how much the next read into scratch may take (see receiveInto's `thenAtMost`) */
  private scratchRead = SCRATCH;
  /** when bytes last landed in a target (performance.now()), to tell a stalled sender from a slow one */
  private lastTargetAt = 0;

  private constructor(
    fd: number,
    private readonly receiver: DirectReceiver,
  ) {
    // `onread` is honoured by the Socket constructor (Node >= 12) though @types/node only
    // declares it for connect().
    const options: net.SocketConstructorOpts & Pick<net.TcpSocketConnectOpts, 'onread'> = {
      fd,
      readable: true,
      writable: true,
      onread: {
        // Asked for again after every read: the next read goes where this points.
        buffer: () => (this.target ? this.target.pieces[this.target.index].subarray(this.target.filled) : this.scratch.subarray(0, this.scratchRead)),
        callback: (n: number, buf: Uint8Array) => {
          this.received(n, buf.buffer === this.scratch.buffer && buf.byteOffset === this.scratch.byteOffset);
          return true; // keep reading; back-pressure pauses the socket itself
        },
      },
    };
    this.socket = new net.Socket(options);
    this.pool = new PoolFd(this.socket, fd);
  }

  private received(n: number, inScratch: boolean): void {
    let rest = inScratch ? this.scratch.subarray(0, n) : undefined;
    if (inScratch) this.scratchRead = SCRATCH;
    const t = this.target;
    if (t) {
      if (rest) {
        // The read was already aimed at scratch when the target was set: move its share over.
        while (rest.length && t.index < t.pieces.length) {
          const piece = t.pieces[t.index];
          const k = Math.min(rest.length, piece.length - t.filled);
          rest.copy(piece, t.filled, 0, k);
          rest = rest.subarray(k);
          this.advance(t, k);
        }
      } else this.advance(t, n);
      this.lastTargetAt = performance.now();
      if (t.index === t.pieces.length) {
        this.target = undefined;
        this.scratchRead = t.thenAtMost;
        t.done();
      }
    }
    if (rest?.length) this.receiver.onBytes(rest);
  }

  private advance(t: NonNullable<DirectSocket['target']>, n: number): void {
    t.filled += n;
    while (t.index < t.pieces.length && t.filled >= t.pieces[t.index].length) {
      t.filled -= t.pieces[t.index].length;
      t.index++;
    }
  }

  /**
   * Take over a plaintext socket after negotiation, or undefined where that is not possible
   * (TLS, no file descriptor). Bytes Node had already buffered are appended to `queue`.
   */
  static adopt(old: net.Socket, queue: ByteQueue, receiver: DirectReceiver): DirectSocket | undefined {
    if (old instanceof tls.TLSSocket) return undefined;
    const fd = (old as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
    if (typeof fd !== 'number' || fd < 0) return undefined;
    old.pause();
    for (let chunk = old.read() as Buffer | null; chunk; chunk = old.read() as Buffer | null) queue.push(chunk);
    const direct = new DirectSocket(native.dupFd(fd), receiver);
    // Closing our original handle leaves the connection open through the duplicate.
    old.removeAllListeners('data');
    old.destroy();
    return direct;
  }

  /** ms since bytes last landed in a target, or since `since` if that is later */
  targetIdleMs(since: number): number {
    return performance.now() - Math.max(since, this.lastTargetAt);
  }

  /**
   * Receive the next bytes of the stream straight into pieces, in order, after the first
   * `filled` bytes of them (which arrived earlier); done() once all are full. The read after
   * that takes at most `thenAtMost` bytes (the next request's header): a large payload after
   * it then lands whole in its own target, not partly in scratch to be copied over.
   */
  receiveInto(pieces: Buffer[], filled: number, thenAtMost: number, done: () => void): void {
    const t = { pieces, index: 0, filled: 0, thenAtMost, done };
    this.advance(t, filled);
    if (t.index === pieces.length) return done();
    this.target = t;
  }
}
