// Issue 15 item 2: the Linux kernel's own NBD client, with ext4 on /dev/nbd0 in a QEMU guest,
// keeps its data when `snapblock serve` is killed with SIGKILL in the middle of a write load
// and started again on the same port: the kernel holds its IO, reconnects, resends what was
// in flight, the guest keeps writing; then e2fsck -fn is clean and every file whose write
// had completed (fsynced before the kill, acknowledged by O_DIRECT around it, written after
// the reconnect) reads back byte for byte (sha256) over a fresh connection.
//
// Reconnect: Debian 12's nbd-client 3.24 has no working persist mode (netlink: -persist is
// ignored; ioctl: the kernel's NBD_DO_IT returns 0 on a dead connection and 3.24 quits), so
// the guest runs nbd-persist next to it (scripts/guest/nbd-persist.c): the kernel's
// dead-connection timeout + NBD_CMD_LINK_DEAD + NBD_CMD_RECONFIGURE, as nbd 3.27's -persist.
// The scenario itself is scenario_persist in scripts/guest/init.sh.
//
// SNAPBLOCK_PERSIST_CLI=/path/to/bin/snapblock.js runs the same test against another build
// of the server, by hand. Against 09bddc3 (before a7d163d made acknowledged but unflushed
// writes survive kill -9 on row volumes) row failed 3 runs out of 3: 2 or 4 of the writer's
// O_DIRECT files, acknowledged before the kill, read back wrong; cow and mirror pass there too.
import { spawn, spawnSync } from 'node:child_process';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ensureGuestBuilt, freePort, runGuest } from './helpers/guest.js';
import { CLI as OUR_CLI, endedSessions, serverHandle, tempDir, type RunningServer } from './helpers/server.js';

const CLI = process.env.SNAPBLOCK_PERSIST_CLI || OUR_CLI;
/** how long the server stays dead: the guest's reconnect attempts meanwhile must fail and retry */
const DOWN_MS = 2000;

function cli(pool: string, args: string[]) {
  const r = spawnSync(process.execPath, [CLI, '--pool', pool, ...args], { encoding: 'utf8', env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'warn' } });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** `snapblock serve` on a fixed port (a restart must come back where the guest's forwarder points). */
async function serve(pool: string, port: number): Promise<RunningServer> {
  for (let attempt = 0; ; attempt++) {
    const proc = spawn(process.execPath, [CLI, '--pool', pool, 'serve', '--listen', `127.0.0.1:${port}`], {
      env: { ...process.env, SNAPBLOCK_LOG_LEVEL: 'info' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let log = '';
    const up = await new Promise<boolean>((resolve) => {
      const onData = (c: Buffer) => {
        log += c;
        if (log.includes('snapblock serving')) resolve(true);
      };
      proc.stdout!.on('data', onData);
      proc.stderr!.on('data', onData);
      proc.once('exit', () => resolve(false));
      setTimeout(() => resolve(false), 20_000).unref();
    });
    if (up) return serverHandle({ pool, port, socket: '', proc, uri: (name) => `nbd://127.0.0.1:${port}/${name}`, logs: () => log });
    proc.kill('SIGKILL');
    // e.g. the port not yet free again right after the kill: retry a few times
    if (attempt >= 5) throw new Error(`snapblock serve did not start on port ${port}:\n${log}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

const servers: RunningServer[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) if (s.proc.exitCode === null && s.proc.signalCode === null) await s.stop();
});

beforeAll(async () => {
  await ensureGuestBuilt();
}, 900_000);

const show = (r: { ok: boolean; log: string; result?: string }) => (r.ok ? '' : `${r.result ?? ''}\n${r.log.slice(-6000)}`);

describe('kernel nbd client (QEMU guest): kill -9 of the server mid-load, restart, reconnect', () => {
  for (const mode of ['row', 'cow', 'mirror']) {
    it(`${mode}: ext4 keeps every completed write, e2fsck -fn clean`, { timeout: 300_000 }, async () => {
      const pool = tempDir(`persist-${mode}-`);
      const created = cli(pool, ['volume', 'create', 'v', '256M', '--snapshot-mode', mode]);
      expect(created.status, created.stderr).toBe(0);
      const port = await freePort();
      const first = await serve(pool, port);
      servers.push(first);

      let restarted: Promise<RunningServer> | undefined;
      let killedAt = 0;
      const r = await runGuest({
        port,
        exportName: 'v',
        scenario: 'persist',
        timeoutMs: 240_000, // ~45-75 s here
        // -t 15: in-flight requests of the dead connection are resent on the new one when
        // they time out, so this bounds the stall after the reconnect (TCG is slow: not less)
        extra: { NBD_TIMEOUT: '15' },
        onConsoleLine: (line) => {
          if (restarted || !line.startsWith('SNAPBLOCK-PERSIST kill-now')) return;
          restarted = (async () => {
            await first.kill9();
            killedAt = Date.now();
            await new Promise((res) => setTimeout(res, DOWN_MS));
            const second = await serve(pool, port);
            servers.push(second);
            return second;
          })();
          restarted.catch(() => {}); // awaited below
        },
      });
      expect(restarted, `the guest never asked for the kill\n${show(r)}`).toBeDefined();
      const second = await restarted!;
      expect(r.ok, show(r)).toBe(true);

      // It was a real kill of a server with the guest connected, mid-load.
      expect(killedAt).toBeGreaterThan(0);
      expect(first.proc.signalCode).toBe('SIGKILL');
      expect(first.logs()).toContain('"NBD client connected"');
      expect(endedSessions(first.logs(), 'v')).toHaveLength(0); // it never saw its client go
      // The guest's kernel reconnected to the restarted server and carried on.
      expect(r.log).toMatch(/nbd-persist \[[\d.]+\]: nbd0: reconnected/);
      expect(r.log).toContain('block nbd0: reconnected socket');
      const stats = /SNAPBLOCK-PERSIST files before=(\d+) writer=(\d+) writer-at-reconnect=(\d+) after=(\d+)/.exec(r.log);
      expect(stats, r.log.slice(-4000)).not.toBeNull();
      const [before, writer, atReconnect, after] = stats!.slice(1).map(Number);
      expect(writer).toBeGreaterThanOrEqual(atReconnect + 4);
      // every one of them was checked by sha256 after a detach and a fresh attach
      expect(r.sums.split('\n').filter(Boolean)).toHaveLength(before + writer + after);

      expect(await second.stop()).toBe(0);
      // the reconnection and the final attach both went to the restarted server
      expect(endedSessions(second.logs(), 'v').length).toBeGreaterThanOrEqual(2);
      const check = cli(pool, ['--json', 'check']);
      expect(JSON.parse(check.stdout).ok, check.stdout + check.stderr).toBe(true);
    });
  }
});
