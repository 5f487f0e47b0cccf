// The inline-write gate: which buffered writes may run on the JS thread. The policy is tested
// with an injected memory state and clock; the real twin below uses /proc and a real file.
import { describe, it, expect, afterAll } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import * as native from '../src/native/index.js';
import { InlineWriteGate, INLINE_MAX, inlineWrites, procDirtyState, writeAt, writevAt, type DirtyState } from '../src/storage/inline-write.js';

const KiB = 1024;

function fakeGate(state: DirtyState, enabled = true) {
  const clock = { t: 1000 };
  const box = { state, samples: 0 };
  const gate = new InlineWriteGate(
    enabled,
    () => {
      box.samples++;
      return box.state;
    },
    () => clock.t,
  );
  return { gate, clock, box };
}

describe('InlineWriteGate policy', () => {
  it('allows whole pages up to INLINE_MAX under the dirty budget, nothing else', () => {
    const { gate } = fakeGate({ dirty: 10, budget: 100 });
    expect(gate.allows(0, 4 * KiB)).toBe(true);
    expect(gate.allows(8 * KiB, INLINE_MAX)).toBe(true);
    expect(gate.allows(0, INLINE_MAX + 4 * KiB)).toBe(false);
    expect(gate.allows(512, 4 * KiB)).toBe(false); // would read-modify-write a partial page
    expect(gate.allows(0, 4 * KiB + 512)).toBe(false);
    expect(gate.allows(0, 512)).toBe(false);
  });

  it('refuses at or over the budget, and re-reads the memory state at most every 20 ms', () => {
    const { gate, clock, box } = fakeGate({ dirty: 10, budget: 100 });
    expect(gate.allows(0, 4 * KiB)).toBe(true);
    box.state = { dirty: 100, budget: 100 };
    clock.t += 5;
    expect(gate.allows(0, 4 * KiB)).toBe(true); // not re-sampled yet
    expect(box.samples).toBe(1);
    clock.t += 20;
    expect(gate.allows(0, 4 * KiB)).toBe(false);
    expect(box.samples).toBe(2);
    box.state = { dirty: 99, budget: 100 };
    clock.t += 20;
    expect(gate.allows(0, 4 * KiB)).toBe(true);
  });

  it('dirtyRoom (asked before a payload is received in place) is the dirty budget alone: any length, any alignment, even while the gate is closed', () => {
    const { gate, clock, box } = fakeGate({ dirty: 10, budget: 100 });
    expect(gate.dirtyRoom()).toBe(true);
    gate.took(30); // closes allows(), not dirtyRoom()
    expect(gate.allows(0, 4 * KiB)).toBe(false);
    expect(gate.dirtyRoom()).toBe(true);
    box.state = { dirty: 100, budget: 100 };
    clock.t += 20;
    expect(gate.dirtyRoom()).toBe(false);
  });

  it('a slow inline write closes the gate for a second', () => {
    const { gate, clock } = fakeGate({ dirty: 0, budget: 100 });
    gate.took(1.5);
    gate.took(5, 10); // a mapped write may take longer (first store into a clean folio)
    expect(gate.allows(0, 4 * KiB)).toBe(true);
    gate.took(30);
    expect(gate.stats.slow).toBe(1);
    expect(gate.allows(0, 4 * KiB)).toBe(false);
    clock.t += 999;
    expect(gate.allows(0, 4 * KiB)).toBe(false);
    clock.t += 2;
    expect(gate.allows(0, 4 * KiB)).toBe(true);
  });

  it('an unreadable memory state or a disabled gate never allows', () => {
    const broken = new InlineWriteGate(true, () => {
      throw new Error('no /proc');
    });
    expect(broken.allows(0, 4 * KiB)).toBe(false);
    expect(fakeGate({ dirty: 0, budget: 100 }, false).gate.allows(0, 4 * KiB)).toBe(false);
  });
});

describe('inline writes on a real file (real twin)', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapblock-inline-'));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('reads this machine\'s dirty state from /proc', () => {
    const s = procDirtyState()();
    expect(s.dirty).toBeGreaterThanOrEqual(0);
    expect(s.budget).toBeGreaterThan(1024 * KiB); // at least a MiB of headroom on any real machine
  });

  it('aligned writes run inline when memory allows, unaligned ones on the pool; bytes land either way', async () => {
    const file = path.join(dir, 'data');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 8 * 1024 * KiB);
    const { fd } = native.openFile(file, { direct: false, readOnly: false });
    try {
      const expected = Buffer.alloc(8 * 1024 * KiB);
      const put = (b: Buffer, at: number) => b.copy(expected, at);
      const mayInline = procDirtyState()().dirty < procDirtyState()().budget;
      const before = { ...inlineWrites.stats };

      const a = crypto.randomBytes(64 * KiB);
      await writeAt(fd, a, 128 * KiB);
      put(a, 128 * KiB);
      const parts = [crypto.randomBytes(4 * KiB), crypto.randomBytes(12 * KiB), crypto.randomBytes(1024 * KiB)];
      await writevAt(fd, parts, 1024 * KiB);
      put(Buffer.concat(parts), 1024 * KiB);
      const odd = crypto.randomBytes(3000);
      await writeAt(fd, odd, 5 * 1024 * KiB + 100);
      put(odd, 5 * 1024 * KiB + 100);
      const oddv = [crypto.randomBytes(100), crypto.randomBytes(4 * KiB)];
      await writevAt(fd, oddv, 6 * 1024 * KiB);
      put(Buffer.concat(oddv), 6 * 1024 * KiB);

      expect(inlineWrites.stats.pool - before.pool).toBeGreaterThanOrEqual(2); // the two unaligned ones
      if (mayInline) expect(inlineWrites.stats.inline - before.inline).toBe(2);
      expect(fs.readFileSync(file).equals(expected)).toBe(true);
    } finally {
      native.closeFile(fd);
    }
  });

  it('an inline write error rejects like a pooled one (EBADF on a read-only fd)', async () => {
    const file = path.join(dir, 'ro');
    fs.writeFileSync(file, Buffer.alloc(64 * KiB));
    const { fd } = native.openFile(file, { direct: false, readOnly: true });
    try {
      await expect(writeAt(fd, Buffer.alloc(4 * KiB), 0)).rejects.toMatchObject({ code: 'EBADF' });
      await expect(writeAt(fd, Buffer.alloc(100), 7)).rejects.toMatchObject({ code: 'EBADF' });
    } finally {
      native.closeFile(fd);
    }
  });
});
