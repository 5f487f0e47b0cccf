// Listeners and connection lifecycle: accept, negotiate, run a Session, release.
import net from 'node:net';
import fs from 'node:fs';
import type { Logger } from 'pino';
import { negotiate, HangUp, type TlsPolicy } from './handshake.js';
import { Session } from './session.js';
import type { ExportProvider } from './exports.js';

export interface NbdServerOptions {
  exports: ExportProvider;
  log: Logger;
  tls?: TlsPolicy;
  /** largest READ/WRITE payload accepted (advertised as the maximum block size) */
  maxPayload?: number;
  /** per-connection budget of request payloads and unsent replies before reading pauses */
  maxInflightBytes?: number;
  /**
   * a negotiating client that sends no complete option for this long is dropped (default 30 s);
   * the clock restarts with each option, so listing thousands of exports one INFO at a time
   * works, and the whole negotiation is capped at NEGOTIATION_CAP_MS
   */
  handshakeTimeoutMs?: number;
}

export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
/** no negotiation, however busy, holds a connection in the handshake longer than this */
const NEGOTIATION_CAP_MS = 10 * 60 * 1000;

export class NbdServer {
  private readonly listeners: net.Server[] = [];
  private readonly sessions = new Set<Session>();
  private readonly handshaking = new Set<net.Socket>();
  /** each connection's whole life, from accept to export release */
  private readonly lifetimes = new Set<Promise<void>>();
  private shuttingDown = false;
  private readonly maxPayload: number;

  constructor(private readonly opts: NbdServerOptions) {
    this.maxPayload = opts.maxPayload ?? DEFAULT_MAX_PAYLOAD;
  }

  get connectionCount(): number {
    return this.sessions.size + this.handshaking.size;
  }

  listenTcp(host: string, port: number): Promise<net.AddressInfo> {
    return this.listen({ host, port }).then((s) => s.address() as net.AddressInfo);
  }

  /**
   * Serve on a Unix socket with exactly `mode` (default 0600: only this user), whatever the
   * process umask: the socket is created under a umask that grants no more than `mode` from
   * its first instant, then set to `mode`.
   */
  async listenUnix(path: string, mode = 0o600): Promise<void> {
    fs.rmSync(path, { force: true });
    const old = process.umask(0o777 & ~mode);
    try {
      await this.listen({ path });
    } finally {
      process.umask(old);
    }
    fs.chmodSync(path, mode);
  }

  private listen(where: net.ListenOptions): Promise<net.Server> {
    const server = net.createServer({ noDelay: true, pauseOnConnect: false }, (s) => {
      const life = this.accept(s);
      this.lifetimes.add(life);
      void life.finally(() => this.lifetimes.delete(life));
    });
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(where, () => {
        server.off('error', reject);
        server.on('error', (err) => this.opts.log.error({ err }, 'NBD listener error'));
        this.listeners.push(server);
        resolve(server);
      });
    });
  }

  private async accept(socket: net.Socket): Promise<void> {
    const log = this.opts.log.child({ remote: socket.remoteAddress ?? 'unix', port: socket.remotePort });
    if (this.shuttingDown) return void socket.destroy();
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 30_000);
    this.handshaking.add(socket);
    const drop = (why: string) => () => {
      log.warn(why);
      socket.destroy();
    };
    const idle = setTimeout(drop('dropping client that sent no option in time during negotiation'), this.opts.handshakeTimeoutMs ?? 30_000);
    const cap = setTimeout(drop(`dropping client still negotiating after ${NEGOTIATION_CAP_MS / 1000} s`), NEGOTIATION_CAP_MS);
    const timer = { clear: () => (clearTimeout(idle), clearTimeout(cap)) };
    socket.on('error', () => {});
    try {
      const neg = await negotiate(socket, {
        exports: this.opts.exports,
        tls: this.opts.tls,
        maxPayload: this.maxPayload,
        preferredBlockSize: 4096,
        isShuttingDown: () => this.shuttingDown,
        onOption: () => idle.refresh(),
        log,
      });
      timer.clear();
      this.handshaking.delete(socket);
      log.info({ export: neg.opened.name, structured: neg.structured, tls: neg.tls }, 'NBD client connected');
      const session = new Session(neg, {
        maxPayload: this.maxPayload,
        maxInflightBytes: this.opts.maxInflightBytes ?? 64 * 1024 * 1024,
        log: log.child({ export: neg.opened.name }),
      });
      this.sessions.add(session);
      await session.done;
      this.sessions.delete(session);
      await neg.opened.release();
      log.info({ export: neg.opened.name, ...session.stats }, 'NBD client disconnected');
    } catch (err) {
      timer.clear();
      this.handshaking.delete(socket);
      if (err instanceof HangUp) log.info({ reason: err.message }, 'NBD negotiation ended');
      else log.error({ err }, 'NBD negotiation failed');
      socket.destroy();
    }
  }

  /** Stop accepting, let in-flight requests finish, close every connection. */
  async close(): Promise<void> {
    this.shuttingDown = true;
    // net.Server.close() only calls back once every connection has ended, so the
    // sessions are stopped while the listeners wait.
    const listenersClosed = Promise.all(this.listeners.map((l) => new Promise<void>((r) => l.close(() => r()))));
    for (const s of this.handshaking) s.destroy();
    await Promise.all([...this.sessions].map((s) => s.stop()));
    await Promise.all(this.lifetimes);
    await listenersClosed;
  }
}
