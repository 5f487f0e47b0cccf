// End-to-end block-device checks against ANY NBD server, from vitest.
//
// runGuest   -> scripts/guest/run.sh: a QEMU guest (Debian kernel, TCG) whose
//               real nbd driver + nbd-client attach the export (this host has no
//               nbd module), then mkfs/mount/verify, fio, or read-only verify.
// nbdfuseFs  -> scripts/nbdfuse-fs.sh: nbdfuse -> loop -> ext4 on this host.
// startNbdkit -> a peer server (nbdkit) to prove the harness itself works.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export const ROOT = path.resolve(import.meta.dirname, '..', '..');
const GUEST_RUN = path.join(ROOT, 'scripts', 'guest', 'run.sh');
const GUEST_BUILD = path.join(ROOT, 'scripts', 'guest', 'build.sh');
const NBDFUSE_FS = path.join(ROOT, 'scripts', 'nbdfuse-fs.sh');
const LOG_DIR = path.join(ROOT, '.cache', 'guest-logs');

export type GuestScenario = 'fs' | 'verify-ro' | 'verify-rw' | 'fio' | 'persist';

export interface GuestOptions {
  port: number;
  exportName: string;
  /** nbd-client -C: TCP connections (default 1) */
  connections?: number;
  scenario: GuestScenario;
  /** whole run, including boot; default 180 s (TCG is slow, hosts are noisy) */
  timeoutMs?: number;
  /** extra guest settings (see the defaults block of scripts/guest/init.sh),
   *  e.g. { CHECKSUMS: sums } for verify-ro, { FIO_SIZE: '16M' }, { FSCK: '0' } */
  extra?: Record<string, string>;
  /** server host as seen from this machine; default 127.0.0.1 */
  host?: string;
  /** called with each line of the guest console as it appears (\r removed),
   *  e.g. to act on a marker line while the guest runs */
  onConsoleLine?: (line: string) => void;
}

export interface GuestResult {
  ok: boolean;
  /** run.sh output followed by the guest serial console */
  log: string;
  /** "sha256  path" lines the fs scenario recorded (feed to verify-ro as CHECKSUMS) */
  sums: string;
  /** the result line, e.g. "SNAPBLOCK-GUEST FAIL checksum mismatch" */
  result: string;
}

interface Exec {
  code: number | null;
  signal: NodeJS.Signals | null;
  output: string;
  timedOut: boolean;
}

// Run a script, collecting stdout+stderr; SIGTERM then SIGKILL its process
// group when the deadline passes (the scripts clean up on SIGTERM).
function execScript(cmd: string, args: string[], timeoutMs: number, env: NodeJS.ProcessEnv = {}): Promise<Exec> {
  return new Promise((resolve) => {
    const child: ChildProcess = spawn(cmd, args, {
      cwd: ROOT,
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true, // own process group, so qemu/nbdfuse children are reachable
    });
    let output = '';
    child.stdout!.on('data', (c) => (output += c));
    child.stderr!.on('data', (c) => (output += c));
    let timedOut = false;
    const killGroup = (sig: NodeJS.Signals) => {
      try {
        if (child.pid) process.kill(-child.pid, sig);
      } catch {
        /* already gone */
      }
    };
    const timer = setTimeout(() => {
      timedOut = true;
      killGroup('SIGTERM');
      setTimeout(() => killGroup('SIGKILL'), 10_000).unref();
    }, timeoutMs);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, output, timedOut });
    });
  });
}

/** Build (or reuse) the guest kernel + initramfs; cold ~20 s, cached ~1 s. */
export async function ensureGuestBuilt(timeoutMs = 600_000): Promise<string> {
  const r = await execScript('bash', [GUEST_BUILD], timeoutMs);
  const dir = r.output.trim().split('\n').pop() ?? '';
  if (r.code !== 0 || !fs.existsSync(path.join(dir, 'manifest.txt'))) {
    throw new Error(`scripts/guest/build.sh failed (exit ${r.code}):\n${r.output}`);
  }
  return dir;
}

export async function runGuest(opts: GuestOptions): Promise<GuestResult> {
  const timeoutMs = opts.timeoutMs ?? 180_000;
  fs.mkdirSync(LOG_DIR, { recursive: true });
  const stamp = `${Date.now()}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
  const consoleLog = path.join(LOG_DIR, `vitest-${opts.scenario}-p${opts.port}-${stamp}.log`);
  const sumsFile = path.join(os.tmpdir(), `snapblock-sums-${stamp}.txt`);
  const args = [
    GUEST_RUN,
    '--host', opts.host ?? '127.0.0.1',
    '--port', String(opts.port),
    '--export', opts.exportName,
    '--conns', String(opts.connections ?? 1),
    '--scenario', opts.scenario,
    // run.sh's own timeout fires first so it can report; ours is a backstop.
    '--timeout', String(Math.max(10, Math.floor(timeoutMs / 1000) - 10)),
    '--log', consoleLog,
    '--sums-out', sumsFile,
  ];
  for (const [k, v] of Object.entries(opts.extra ?? {})) args.push('--set', `${k}=${v}`);

  const follow = opts.onConsoleLine ? followFile(consoleLog, opts.onConsoleLine) : undefined;
  const r = await execScript('bash', args, timeoutMs);
  follow?.stop();
  const guestConsole = fs.existsSync(consoleLog) ? fs.readFileSync(consoleLog, 'utf8').replace(/\r/g, '') : '(no console log)';
  let sums = '';
  try {
    sums = fs.readFileSync(sumsFile, 'utf8');
    fs.rmSync(sumsFile);
  } catch {
    /* no sums (not an fs run, or it failed early) */
  }
  const result = /SNAPBLOCK-GUEST (PASS|FAIL[^\n]*)/.exec(guestConsole)?.[0] ?? (r.timedOut ? 'SNAPBLOCK-GUEST FAIL harness timeout' : 'SNAPBLOCK-GUEST FAIL no result line');
  const ok = r.code === 0 && result === 'SNAPBLOCK-GUEST PASS';
  const log = `${r.output}${r.timedOut ? `\n[runGuest: killed after ${timeoutMs} ms]` : ''}\n---- guest console (${consoleLog})\n${guestConsole}`;
  return { ok, log, sums, result };
}

// Call onLine for every complete line appended to a file (which may not exist
// yet), polling every 100 ms; stop() reads what is left, once.
function followFile(file: string, onLine: (line: string) => void): { stop(): void } {
  let offset = 0;
  let partial = '';
  const poll = (final: boolean) => {
    let text = partial;
    try {
      const fd = fs.openSync(file, 'r');
      try {
        const size = fs.fstatSync(fd).size;
        if (size > offset) {
          const chunk = Buffer.alloc(size - offset);
          offset += fs.readSync(fd, chunk, 0, chunk.length, offset);
          text += chunk.toString('utf8');
        }
      } finally {
        fs.closeSync(fd);
      }
    } catch {
      /* not created yet */
    }
    const lines = text.split('\n');
    partial = final ? '' : (lines.pop() ?? '');
    for (const line of lines) onLine(line.replace(/\r/g, ''));
  };
  const timer = setInterval(() => poll(false), 100);
  return {
    stop() {
      clearInterval(timer);
      poll(true);
    },
  };
}

export async function nbdfuseFs(host: string, port: number, exportName: string, timeoutMs = 120_000): Promise<{ ok: boolean; log: string }> {
  const r = await execScript('bash', [NBDFUSE_FS, host, String(port), exportName], timeoutMs);
  const ok = r.code === 0 && /^NBDFUSE-FS PASS/m.test(r.output);
  return { ok, log: r.output + (r.timedOut ? `\n[nbdfuseFs: killed after ${timeoutMs} ms]` : '') };
}

/** Why the nbdfuse path cannot run here, or null. It needs root (losetup,
 *  mount) and /dev/fuse. In CI (env CI set) this throws instead: there the
 *  e2e tests must run, never silently skip. */
export function nbdfuseSkipReason(): string | null {
  let reason: string | null = null;
  if (process.getuid?.() !== 0) reason = 'not root (nbdfuse-fs needs losetup and mount)';
  else if (!fs.existsSync('/dev/fuse')) reason = '/dev/fuse is missing';
  if (reason && process.env.CI) throw new Error(`e2e nbdfuse test cannot run in CI: ${reason}`);
  return reason;
}

/** Fail fast with a clear message when a tool is not installed. */
export function requireTools(tools: string[]): void {
  const missing = tools.filter((t) => spawnSync('sh', ['-c', `command -v "$0"`, t]).status !== 0);
  if (missing.length) throw new Error(`missing tools: ${missing.join(', ')} (see .ci/run for the apt-get install line)`);
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect({ host: '127.0.0.1', port });
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

export interface Nbdkit {
  port: number;
  stop(): Promise<void>;
  logs(): string;
}

/** nbdkit -f -p PORT -i 127.0.0.1 <pluginArgs>, e.g. ['memory', '1G']. */
export async function startNbdkit(pluginArgs: string[]): Promise<Nbdkit> {
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const proc = spawn('nbdkit', ['-f', '-p', String(port), '-i', '127.0.0.1', ...pluginArgs], { stdio: ['ignore', 'pipe', 'pipe'] });
    let log = '';
    proc.stdout!.on('data', (c) => (log += c));
    proc.stderr!.on('data', (c) => (log += c));
    const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
    const failed: { error?: Error } = {};
    proc.once('error', (e) => (failed.error = e));
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline && proc.exitCode === null && !failed.error) {
      if (await canConnect(port)) {
        return {
          port,
          logs: () => log,
          stop: async () => {
            if (proc.exitCode === null) proc.kill('SIGTERM');
            await exited;
          },
        };
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    if (failed.error) throw new Error(`cannot start nbdkit: ${failed.error.message}`);
    proc.kill('SIGKILL');
    await exited;
    // Lost the race for the port to someone else: try another one.
    if (attempt >= 3) throw new Error(`nbdkit did not start on port ${port}:\n${log}`);
  }
}
