// The metadata journal on its own: preallocated tail, torn batches, epochs, volatile batches
// (kept after a process crash in the same boot, dropped after a reboot unless committed).
import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { Journal, Kind, currentBootId } from '../src/storage/journal.js';
import { tempDir } from './helpers/server.js';

const OTHER_BOOT = Buffer.alloc(16, 0xab);

describe('Journal', () => {
  it('commits over preallocated zeroes; replay stops there and a reopened journal appends after the last batch', async () => {
    const file = path.join(tempDir('journal-'), 'journal');
    const { journal } = Journal.open(file, 7);
    journal.append(Kind.MAP, 1, 2, 3);
    await journal.commit(journal.seal());
    // the file is written ahead of the batch (zeroes), so later commits change no file size
    const size = fs.statSync(file).size;
    expect(size).toBeGreaterThanOrEqual(1024 * 1024);
    journal.append(Kind.FREE, 9);
    journal.appendMeta({ op: 'x' });
    await journal.commit(journal.seal());
    expect(fs.statSync(file).size).toBe(size);
    journal.close();

    const again = Journal.open(file, 7, OTHER_BOOT); // committed batches count after a reboot too
    expect(again.records.map((r) => [r.k, r.a])).toEqual([
      [Kind.MAP, 1],
      [Kind.FREE, 9],
      [Kind.META, 0],
    ]);
    again.journal.append(Kind.MAP, 4, 5, 6);
    await again.journal.commit(again.journal.seal());
    again.journal.close();
    expect(Journal.open(file, 7).records.map((r) => r.a)).toEqual([1, 9, 0, 4]);
  });

  it('a torn batch ends replay; a reset starts the new epoch empty', async () => {
    const file = path.join(tempDir('journal-'), 'journal');
    const { journal } = Journal.open(file, 1);
    journal.append(Kind.MAP, 1, 1, 1);
    await journal.commit(journal.seal());
    const firstEnd = journalEnd(file);
    journal.append(Kind.MAP, 2, 2, 2);
    await journal.commit(journal.seal());
    // tear the second volatile batch: flip a byte of its payload (past its 16-byte header and boot id)
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.from([0xee]), 0, 1, firstEnd + 16 + 16 + 3);
    fs.closeSync(fd);
    expect(Journal.open(file, 1).records.map((r) => r.a)).toEqual([1]);
    const j2 = Journal.open(file, 1).journal;
    await j2.reset(2);
    j2.close();
    expect(Journal.open(file, 2).records).toEqual([]);
    expect(Journal.open(file, 1).records).toEqual([]); // a stale epoch is not replayed
  });

  it('persisted records survive a process crash in the same boot; after a reboot only committed ones count', async () => {
    const file = path.join(tempDir('journal-'), 'journal');
    const { journal } = Journal.open(file, 3);
    journal.append(Kind.MAP, 1, 1, 1);
    await journal.commit(journal.seal());
    journal.append(Kind.MAP, 2, 2, 2);
    const mark = journal.seal(); // a flush seals here, then syncs data
    journal.append(Kind.MAP, 3, 3, 3);
    journal.persist(); // a write acknowledged while that flush runs
    await journal.commit(mark);
    journal.append(Kind.MAP, 4, 4, 4);
    journal.persist();
    journal.append(Kind.MAP, 5, 5, 5); // appended, never persisted: its operation was not acknowledged
    // no close: the process is "killed" here

    const sameBoot = Journal.open(file, 3, currentBootId());
    expect(sameBoot.records.map((r) => r.a)).toEqual([1, 2, 3, 4]);
    expect(sameBoot.discarded).toBe(0);
    sameBoot.journal.close();

    const rebooted = Journal.open(file, 3, OTHER_BOOT);
    // 3 was persisted before the commit of mark 2 was written but after its seal: not covered by it
    expect(rebooted.records.map((r) => r.a)).toEqual([1, 2]);
    expect(rebooted.discarded).toBe(2);
    rebooted.journal.close();
    journal.close();
  });

  it('a commit after volatile batches larger than it keeps in memory syncs the whole file', async () => {
    const file = path.join(tempDir('journal-'), 'journal');
    const { journal } = Journal.open(file, 1);
    // ~6 MiB of records, persisted in small batches: past the preallocated zeroes and the in-memory keep
    for (let i = 0; i < 360_000; i++) {
      journal.append(Kind.MAP, i, i + 1, 1);
      if (i % 100 === 99) journal.persist();
    }
    await journal.commit(journal.seal());
    journal.close();
    const after = Journal.open(file, 1, OTHER_BOOT);
    expect(after.records.length).toBe(360_000);
    expect(after.records[359_999].a).toBe(359_999);
    after.journal.close();
  });
});

/** Offset just past the last batch: where the preallocated zeroes begin. */
function journalEnd(file: string): number {
  const b = fs.readFileSync(file);
  let pos = 16;
  while (pos + 16 <= b.length && b.readUInt32LE(pos) !== 0) pos += 16 + b.readUInt32LE(pos + 4);
  return pos;
}
