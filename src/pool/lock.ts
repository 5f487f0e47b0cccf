// One process owns a pool at a time: a LOCK file holding the owner's pid.
// A lock left by a dead process is taken over.
//
// On a full filesystem the pid cannot be written into a file (a data block is needed),
// yet that is exactly when an operator must be able to delete a volume to free space.
// Then the lock is a symlink whose target is the pid: a short symlink lives in the inode
// (ext4) or in kernel memory (tmpfs) and needs no data block. Readers accept both forms.
import fs from 'node:fs';
import { PoolError } from './names.js';

export class PoolLock {
  private constructor(private readonly file: string) {}

  static acquire(file: string): PoolLock {
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        createLockFile(file, process.pid);
        return new PoolLock(file);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        const pid = readLockPid(file);
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
      if (readLockPid(this.file) === process.pid) fs.rmSync(this.file);
    } catch {
      /* already gone */
    }
  }
}

/** Create the lock exclusively (EEXIST if it exists): a file holding the pid, or a symlink to it when no data block is left. */
function createLockFile(file: string, pid: number): void {
  const fd = fs.openSync(file, 'wx', 0o600);
  try {
    fs.writeSync(fd, `${pid}\n`);
  } catch (err) {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
    if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
    fs.symlinkSync(String(pid), file); // EEXIST if another process won the race meanwhile
    return;
  }
  fs.closeSync(fd);
}

/** The pid in a lock file or lock symlink; 0 when it holds none (a torn lock). */
function readLockPid(file: string): number {
  const text = fs.lstatSync(file).isSymbolicLink() ? fs.readlinkSync(file) : fs.readFileSync(file, 'utf8');
  return Number(text.trim()) || 0;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
