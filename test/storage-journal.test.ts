// The metadata journal on its own: preallocated tail, torn batches, epochs.
import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { Journal, Kind } from '../src/storage/journal.js';
import { tempDir } from './helpers/server.js';

describe('Journal', () => {
  it('commits over preallocated zeroes; replay stops there and a reopened journal appends after the last batch', async () => {
    const file = path.join(tempDir('journal-'), 'journal');
    const { journal } = Journal.open(file, 7);
    journal.append(Kind.MAP, 1, 2, 3);
    await journal.commit(journal.take());
    // the file is written ahead of the batch (zeroes), so later commits change no file size
    const size = fs.statSync(file).size;
    expect(size).toBeGreaterThanOrEqual(1024 * 1024);
    journal.append(Kind.FREE, 9);
    journal.appendMeta({ op: 'x' });
    await journal.commit(journal.take());
    expect(fs.statSync(file).size).toBe(size);
    journal.close();

    const again = Journal.open(file, 7);
    expect(again.records.map((r) => [r.k, r.a])).toEqual([
      [Kind.MAP, 1],
      [Kind.FREE, 9],
      [Kind.META, 0],
    ]);
    again.journal.append(Kind.MAP, 4, 5, 6);
    await again.journal.commit(again.journal.take());
    again.journal.close();
    expect(Journal.open(file, 7).records.map((r) => r.a)).toEqual([1, 9, 0, 4]);
  });

  it('a torn batch in the preallocated area ends replay; a reset starts the new epoch empty', async () => {
    const file = path.join(tempDir('journal-'), 'journal');
    const { journal } = Journal.open(file, 1);
    journal.append(Kind.MAP, 1, 1, 1);
    await journal.commit(journal.take());
    journal.append(Kind.MAP, 2, 2, 2);
    await journal.commit(journal.take());
    // tear the second batch: flip a payload byte (16-byte file header + 16 + 17 for the first batch, then its header)
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.from([0xee]), 0, 1, 16 + 16 + 17 + 16 + 3);
    fs.closeSync(fd);
    expect(Journal.open(file, 1).records.map((r) => r.a)).toEqual([1]);
    const j2 = Journal.open(file, 1).journal;
    await j2.reset(2);
    j2.close();
    expect(Journal.open(file, 2).records).toEqual([]);
    expect(Journal.open(file, 1).records).toEqual([]); // a stale epoch is not replayed
  });
});
