// Progress of a long backup/restore/verify: a cli-progress bar with throughput and
// ETA when stderr is a TTY, one JSON line per second otherwise (for logs and tools).
// cli-progress (and its string-width dependency) is loaded only for a bar: ~80 ms of
// start-up that a cron job writing JSON lines does not need.
import { createRequire } from 'node:module';
import type cliProgressNs from 'cli-progress';

const require = createRequire(import.meta.url);

export interface Progress {
  /** bytes of work known so far */
  setTotal(total: number): void;
  add(bytes: number): void;
  stop(): void;
}

export type ProgressMode = 'auto' | 'bar' | 'json' | 'none';

const MiB = 1024 * 1024;

export function createProgress(op: string, mode: ProgressMode = 'auto', stream: NodeJS.WriteStream = process.stderr): Progress {
  if (mode === 'auto') mode = stream.isTTY ? 'bar' : 'json';
  let total = 0;
  let done = 0;
  const t0 = Date.now();
  const rate = () => done / Math.max(0.001, (Date.now() - t0) / 1000);
  if (mode === 'none') return { setTotal: (t) => void (total = t), add: (b) => void (done += b), stop: () => {} };
  if (mode === 'bar') {
    const cliProgress = require('cli-progress') as typeof cliProgressNs;
    const bar = new cliProgress.SingleBar(
      { format: `${op} [{bar}] {percentage}% | {doneMiB}/{totalMiB} MiB | {speed} MiB/s | ETA {eta_formatted}`, stream, fps: 5, hideCursor: true, etaBuffer: 50 },
      cliProgress.Presets.shades_classic,
    );
    bar.start(1, 0, { doneMiB: '0', totalMiB: '0', speed: '0' });
    const payload = () => ({ doneMiB: (done / MiB).toFixed(0), totalMiB: (total / MiB).toFixed(0), speed: (rate() / MiB).toFixed(1) });
    return {
      setTotal: (t) => {
        total = t;
        bar.setTotal(Math.max(1, t));
        bar.update(done, payload());
      },
      add: (b) => {
        done += b;
        bar.update(done, payload());
      },
      stop: () => bar.stop(),
    };
  }
  let last = 0;
  const emit = (final: boolean) => {
    const now = Date.now();
    if (!final && now - last < 1000) return;
    last = now;
    const r = rate();
    const line = {
      progress: op,
      done,
      total,
      percent: total ? Math.round((done / total) * 1000) / 10 : 0,
      bytesPerSecond: Math.round(r),
      etaSeconds: total && r > 0 ? Math.round((total - done) / r) : null,
      elapsedSeconds: Math.round((now - t0) / 100) / 10,
      ...(final ? { final: true } : {}),
    };
    stream.write(JSON.stringify(line) + '\n');
  };
  return {
    setTotal: (t) => void (total = t),
    add: (b) => {
      done += b;
      emit(false);
    },
    stop: () => emit(true),
  };
}
