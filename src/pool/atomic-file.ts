// Replace a small file so that a crash leaves either the old or the new content:
// write a temp file, fsync it, rename over the target, fsync the directory.
import fs from 'node:fs';
import path from 'node:path';

/** The temp files writeFileAtomic uses: FILE.tmp-PID (what `check --repair` recognises as debris). */
export const ATOMIC_TMP = /\.tmp-\d+$/;

export function writeFileAtomic(file: string, data: string | Buffer): void {
  replaceFileAtomic(file, (fd) => fs.writeFileSync(fd, data));
}

/** Like writeFileAtomic, for content written piece by piece by write(fd); a throw leaves the old file and no temp file. */
export function replaceFileAtomic(file: string, write: (fd: number) => void): void {
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      write(fd);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
  } catch (err) {
    // A failed write (ENOSPC, EIO) must not leave its half-written temp file behind:
    // on a full filesystem that is the very space the next attempt needs.
    fs.rmSync(tmp, { force: true });
    throw err;
  }
  fsyncDir(path.dirname(file));
}

export function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
