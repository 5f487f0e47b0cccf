// Start a real `snapblock serve` (the built CLI, as a user runs it) on a temp pool.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { procDirtyState } from '../../src/storage/inline-write.js';

export const ROOT = path.resolve(import.meta.dirname, '..', '..');
export const CLI = path.join(ROOT, 'bin', 'snapblock.js');

export function tempDir(prefix: string): string {
  const base = path.join(ROOT, '.cache', 'test-tmp');
  fs.mkdirSync(base, { recursive: true });
  return fs.mkdtempSync(path.join(base, prefix));
}

export interface CliResult {
  status: number;
  stdout: string;
  stderr: string;
}

export function cli(pool: string, args: string[]): CliResult {
  const r = spawnSync(process.execPath, [CLI, '--pool', pool, ...args], { encoding: 'utf8', env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'warn' } });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Like cli() but without blocking the event loop (for tests that watch other processes meanwhile). */
export function cliAsync(pool: string, args: string[]): Promise<CliResult> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CLI, '--pool', pool, ...args], { env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'warn' } });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (c) => (stdout += c));
    p.stderr.on('data', (c) => (stderr += c));
    p.once('exit', (code) => resolve({ status: code ?? -1, stdout, stderr }));
  });
}

export interface RunningServer {
  pool: string;
  port: number;
  socket: string;
  proc: ChildProcess;
  uri(name: string): string;
  cli(args: string[]): CliResult;
  /** SIGTERM and wait; resolves with the exit code */
  stop(): Promise<number | null>;
  kill9(): Promise<void>;
  logs(): string;
}

export async function startServer(opts: { pool?: string; args?: string[]; volumes?: Record<string, string> } = {}): Promise<RunningServer> {
  const pool = opts.pool ?? tempDir('pool-');
  for (const [name, size] of Object.entries(opts.volumes ?? {})) {
    const r = cli(pool, ['volume', 'create', name, size]);
    if (r.status !== 0) throw new Error(`volume create failed: ${r.stderr}`);
  }
  const socket = path.join(pool, 'nbd.sock');
  const proc = spawn(process.execPath, [CLI, '--pool', pool, 'serve', '--listen', '127.0.0.1:0', '--socket', socket, ...(opts.args ?? [])], {
    env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  proc.stdout!.on('data', (c) => (log += c));
  const port = await new Promise<number>((resolve, reject) => {
    const onData = (c: Buffer) => {
      log += c;
      for (const line of log.split('\n')) {
        if (!line.includes('snapblock serving')) continue;
        const m = /nbd:\/\/[^:]+:(\d+)/.exec(line);
        if (m) {
          proc.stderr!.off('data', onData);
          proc.stderr!.on('data', (d) => (log += d));
          return resolve(Number(m[1]));
        }
      }
    };
    proc.stderr!.on('data', onData);
    proc.once('exit', (code) => reject(new Error(`snapblock serve exited with ${code}:\n${log}`)));
    setTimeout(() => reject(new Error(`snapblock serve did not start:\n${log}`)), 20_000);
  });
  return serverHandle({ pool, port, socket, proc, uri: (name) => `nbd://127.0.0.1:${port}/${name}`, logs: () => log });
}

/** The RunningServer of a started `snapblock serve` process. */
export function serverHandle(o: Pick<RunningServer, 'pool' | 'port' | 'socket' | 'proc' | 'uri' | 'logs'>): RunningServer {
  const { proc } = o;
  const exited = new Promise<number | null>((resolve) => {
    if (proc.exitCode !== null) resolve(proc.exitCode);
    else proc.once('exit', (code) => resolve(code));
  });
  return {
    ...o,
    cli: (args) => cli(o.pool, args),
    stop: async () => {
      if (proc.exitCode === null) proc.kill('SIGTERM');
      return exited;
    },
    kill9: async () => {
      proc.kill('SIGKILL');
      await exited;
    },
  };
}

/** Run a real client tool; Debian's python3 first on PATH so nbdsh finds the nbd module. */
export function run(cmd: string, args: string[], input?: string): CliResult {
  const r = spawnSync(cmd, args, {
    encoding: 'utf8',
    input,
    env: { ...process.env, PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH}` },
    maxBuffer: 256 * 1024 * 1024,
    timeout: 300_000,
  });
  return { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: (r.stderr ?? '') + (r.error ? String(r.error) : '') };
}

/** Run an nbdsh script (Python, with `h` connected to uri) and return stdout; throws with stderr on failure. */
export function nbdsh(uri: string | undefined, script: string): string {
  const r = run('nbdsh', uri ? ['-u', uri, '-c', script] : ['-c', script]);
  if (r.status !== 0) throw new Error(`nbdsh failed (${r.status}):\n${r.stderr}\n${r.stdout}`);
  return r.stdout;
}

/** Poll f every 100 ms until it holds; throws naming `what` after `ms`. */
export async function until(what: string, f: () => boolean | Promise<boolean>, ms = 30_000): Promise<void> {
  const t0 = Date.now();
  while (!(await f())) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Run a CLI command that must succeed and return its stdout; a failure names the command and its stderr. */
export function cliOk(pool: string, args: string[]): string {
  const r = cli(pool, args);
  if (r.status !== 0) throw new Error(`snapblock ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return r.stdout;
}

/** sha256 (hex) of a whole export, read through libnbd in 8 MiB pieces. */
export function exportSha256(uri: string): string {
  return nbdsh(
    uri,
    `
import hashlib
m = hashlib.sha256(); size = h.get_size(); off = 0
while off < size:
    n = min(8 << 20, size - off); m.update(h.pread(n, off)); off += n
print(m.hexdigest())
`,
  ).trim();
}

/**
 * Run qemu-io commands against an NBD URI (read-only for a snapshot export, VOL@SNAP); throws
 * unless it exits 0 with no pattern mismatch or error in its output.
 */
export function qemuIo(uri: string, ...cmds: string[]): void {
  const readOnly = uri.includes('@') ? ['-r'] : []; // snapshot exports are read-only
  const q = run('qemu-io', [...readOnly, '-f', 'raw', uri, ...cmds.flatMap((c) => ['-c', c])]);
  if (q.status !== 0) throw new Error(`qemu-io exited ${q.status}:\n${q.stderr}${q.stdout}`);
  if (/Pattern verification failed|failed|error/i.test(q.stdout)) throw new Error(`qemu-io reported a failure:\n${q.stdout}`);
}

/** What `snapblock serve` logged for each ended connection to an export (session.ts stats), in order. */
export function endedSessions(logs: string, exportName: string): Array<{ requests: number; mappedReads: number; inPlaceWrites: number }> {
  const out = [];
  for (const line of logs.split('\n')) {
    if (!line.includes('"NBD client disconnected"')) continue;
    const o = JSON.parse(line) as { export?: string; requests: number; mappedReads: number; inPlaceWrites: number };
    if (o.export === exportName) out.push(o);
  }
  return out;
}

/**
 * Wait until the host's dirty page cache is well under the budget below which the server
 * receives payloads in place (inline-write.ts dirtyRoom), writing back what other processes
 * dirtied: tests that count in-place writes must not depend on what else the machine did.
 */
export async function roomForDirtyPages(timeoutMs = 60_000): Promise<void> {
  const sample = procDirtyState();
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const { dirty, budget } = sample();
    if (dirty < budget / 2) return;
    if (Date.now() > deadline) throw new Error(`the dirty page cache stays at ${dirty} bytes, over half the in-place budget of ${budget}`);
    spawnSync('sync');
    await new Promise((r) => setTimeout(r, 100));
  }
}

export const osTmp = os.tmpdir();

/** Follow a child's stdout line by line and report the last number it printed. */
export function lastNumberPrinted(stream: NodeJS.ReadableStream): () => number {
  let last = -1;
  let partial = '';
  stream.on('data', (c: Buffer) => {
    const lines = (partial + c.toString()).split('\n');
    partial = lines.pop() ?? '';
    for (const l of lines) if (/^\d+$/.test(l.trim())) last = Number(l.trim());
  });
  return () => last;
}
