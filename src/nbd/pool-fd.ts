// A socket's descriptor for thread-pool sends (reply-writer.ts). It is a
// duplicate of Node's: Node closes its own when the socket is destroyed, possibly while a pool
// job still uses it, and a closed number is reused by the next open() - a late send would then
// write into some file. The duplicate is closed once the socket has closed and no job holds it.
import type net from 'node:net';
import * as native from '../native/index.js';

export class PoolFd {
  private fd?: number;
  private jobs = 0;
  private socketClosed = false;

  constructor(socket: net.Socket, fd: number) {
    this.fd = native.dupFd(fd);
    socket.once('close', () => {
      this.socketClosed = true;
      this.maybeClose();
    });
  }

  /** false once the socket has closed: use Node's own IO then */
  get usable(): boolean {
    return this.fd !== undefined && !this.socketClosed;
  }

  /** Run a pool job on the descriptor; it stays open until the job settles. */
  async run<T>(job: (fd: number) => Promise<T>): Promise<T> {
    if (this.fd === undefined) throw new Error('socket descriptor already closed');
    this.jobs++;
    try {
      return await job(this.fd);
    } finally {
      this.jobs--;
      this.maybeClose();
    }
  }

  private maybeClose(): void {
    if (this.socketClosed && this.jobs === 0 && this.fd !== undefined) {
      native.closeFile(this.fd);
      this.fd = undefined;
    }
  }
}
