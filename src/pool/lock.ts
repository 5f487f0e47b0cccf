// One process owns a pool at a time: a LOCK file holding the owner's pid.
// A lock left by a dead process is taken over.
import fs from 'node:fs';
import { PoolError } from './names.js';

export class PoolLock {
  private constructor(private readonly file: string) {}

  static acquire(file: string): PoolLock {
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const fd = fs.openSync(file, 'wx', 0o600);
        fs.writeSync(fd, `${process.pid}\n`);
        fs.closeSync(fd);
        return new PoolLock(file);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        const pid = Number(fs.readFileSync(file, 'utf8').trim());
        if (pid && pid !== process.pid && isAlive(pid)) {
          throw new PoolError('ELOCKED', `pool is in use by process ${pid} (lock ${file}); use the running server, or stop it first`);
        }
        fs.rmSync(file, { force: true });
      }
    }
    throw new PoolError('ELOCKED', `could not lock pool (${file})`);
  }

  release(): void {
    try {
      if (Number(fs.readFileSync(this.file, 'utf8').trim()) === process.pid) fs.rmSync(this.file);
    } catch {
      /* already gone */
    }
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
