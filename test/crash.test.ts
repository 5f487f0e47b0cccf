// Crash consistency under kill -9, judged by an independent client (libnbd's Python via
// nbdsh): bench/crash-stress.mjs with a few iterations per snapshot technique. Every
// iteration writes (unaligned, FLUSH, FUA, WRITE_ZEROES) over 3 connections while snapshots
// are created and deleted, kills the server at a random moment, restarts it and checks
// durable writes, snapshot contents and `snapblock check` (see the header of the script).
// CRASH_STRESS_SEED / CRASH_STRESS_ITERATIONS override the defaults; a failure prints the
// script's report, with the seed and iteration to reproduce.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, tempDir } from './helpers/server.js';

const SEED = process.env.CRASH_STRESS_SEED ?? '20261125';
const ITERATIONS = process.env.CRASH_STRESS_ITERATIONS ?? '3';

function crashStress(mode: string): Promise<{ code: number | null; out: string; summary: any }> {
  const dir = tempDir(`crash-${mode}-`);
  const json = path.join(dir, 'summary.json');
  return new Promise((resolve) => {
    const p = spawn(
      process.execPath,
      // row at its default block size (4 KiB: every 4 KiB write to a shared block is a whole-block redirect);
      // mirror runs longer before the kill: its creates wait for a mirror sync first
      [path.join(ROOT, 'bench', 'crash-stress.mjs'), '--modes', mode, ...(mode === 'row' ? ['--block-size', '4K'] : []), '--iterations', ITERATIONS, '--seed', SEED, '--max-run', mode === 'mirror' ? '2500' : '1200', '--dir', dir, '--json', json],
      { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH}` } },
    );
    let out = '';
    p.stdout.on('data', (c) => (out += c));
    p.stderr.on('data', (c) => (out += c));
    p.once('close', (code) => {
      let summary: any;
      try {
        summary = JSON.parse(fs.readFileSync(json, 'utf8'));
      } catch {
        summary = undefined;
      }
      // Pools are kept by the script only after a failure (for post-mortem); otherwise nothing is left.
      if (code === 0) fs.rmSync(dir, { recursive: true, force: true });
      resolve({ code, out, summary });
    });
  });
}

describe('crash consistency: kill -9 during writes, flushes and snapshot operations', () => {
  for (const mode of ['row', 'cow', 'mirror']) {
    it(`${mode}: acknowledged-and-flushed writes, snapshots and check survive kill -9`, { timeout: 600_000 }, async () => {
      const r = await crashStress(mode);
      const m = r.summary?.modes?.[0];
      expect(r.code, r.out).toBe(0);
      expect(m?.passed, r.out).toBe(Number(ITERATIONS));
      // the run did what it claims: writes were acknowledged and made durable, snapshots were taken
      expect(m.stats.durable, r.out).toBeGreaterThan(0);
      expect(m.stats.snapshotsVerified + m.stats.snapCreates, r.out).toBeGreaterThan(0);
    });
  }
});
