// Incoming bytes from a socket, as a queue of chunks. take() is zero-copy when the
// bytes lie in one chunk, which is the common case for request headers and small writes;
// otherwise it copies into a recycled IO buffer (see io-buffers.ts).
import { ioBuffer } from '../block/io-buffers.js';

export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // read position inside chunks[0]
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** the first n bytes without consuming them; n <= length */
  peek(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = ioBuffer(n);
    let copied = 0;
    let pos = this.head;
    for (const c of this.chunks) {
      const k = Math.min(n - copied, c.length - pos);
      c.copy(out, copied, pos, pos + k);
      copied += k;
      pos = 0;
      if (copied === n) break;
    }
    return out;
  }

  /** consume and return the first n bytes; n <= length */
  take(n: number): Buffer {
    const out = this.peek(n);
    this.skip(n);
    return out;
  }

  /** consume the first n bytes (n <= length) by copying them into target at offset */
  takeInto(target: Buffer, offset: number, n: number): void {
    let copied = 0;
    let pos = this.head;
    for (const c of this.chunks) {
      const k = Math.min(n - copied, c.length - pos);
      c.copy(target, offset + copied, pos, pos + k);
      copied += k;
      pos = 0;
      if (copied === n) break;
    }
    this.skip(n);
  }

  /** consume up to n bytes, returning how many were dropped */
  skip(n: number): number {
    let left = Math.min(n, this.length);
    const dropped = left;
    while (left > 0) {
      const first = this.chunks[0];
      const avail = first.length - this.head;
      if (avail > left) {
        this.head += left;
        break;
      }
      left -= avail;
      this.chunks.shift();
      this.head = 0;
    }
    this.length -= dropped;
    return dropped;
  }
}
