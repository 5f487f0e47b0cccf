// The recycled IO buffers the async replication queue relies on (src/block/io-buffers.ts):
// retain() keeps a payload past its owner's recycle() without a copy, and a size class no
// longer in use does not keep the sizes in use from being recycled.
import { describe, expect, it } from 'vitest';
import { ioBuffer, recycle, retain } from '../src/block/io-buffers.js';

const KiB = 1024;
const MiB = 1024 * KiB;

describe('io-buffers: retain and recycling across size classes', () => {
  it('a retained buffer goes back to the pool only after its last holder recycles it', () => {
    const a = ioBuffer(256 * KiB);
    expect(retain(a)).toBe(true);
    recycle(a); // the owner (NBD session) is done: the queue still holds it
    const b = ioBuffer(256 * KiB);
    expect(b.buffer).not.toBe(a.buffer);
    recycle(a); // shipped: now it is reusable
    const c = ioBuffer(256 * KiB);
    expect(c.buffer).toBe(a.buffer);
    recycle(b);
    recycle(c);
    expect(retain(Buffer.alloc(256 * KiB))).toBe(false); // not from the pool: copy it instead
    expect(retain(ioBuffer(4 * KiB))).toBe(false); // small: not pooled
  });

  it('idle buffers of an unused size make room for the size in use', () => {
    // Fill the idle budget (64 MiB) with 1 MiB buffers...
    const big = Array.from({ length: 64 }, () => ioBuffer(MiB));
    for (const b of big) recycle(b);
    // ...then use 256 KiB buffers: they are recycled and reused, not allocated afresh.
    const x = ioBuffer(256 * KiB);
    recycle(x);
    const y = ioBuffer(256 * KiB);
    expect(y.buffer).toBe(x.buffer);
    recycle(y);
  });
});
