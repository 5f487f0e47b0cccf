// Shared by the storage unit tests: deterministic data, a seeded RNG, and an in-memory
// model of what the live volume and each snapshot must read.
import { expect } from 'vitest';
import type { Volume } from '../../src/storage/volume.js';

export function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761) >>> 0;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = (x >>> 16) | 1;
  }
  return b;
}

export function rng(seed: number): (n: number) => number {
  let x = seed >>> 0;
  return (n) => {
    x = (x * 1664525 + 1013904223) >>> 0;
    return Math.floor((x / 2 ** 32) * n);
  };
}

/** The live volume as it should read, plus the expected image of every snapshot. */
export class Model {
  live: Buffer;
  snaps = new Map<string, Buffer>();
  constructor(size: number) {
    this.live = Buffer.alloc(size);
  }
  write(off: number, data: Buffer): void {
    data.copy(this.live, off);
  }
  zero(off: number, len: number): void {
    this.live.fill(0, off, off + len);
  }
  snap(name: string): void {
    this.snaps.set(name, Buffer.from(this.live));
  }
}

export async function verify(v: Volume, m: Model): Promise<void> {
  expect((await v.read(0, v.size)).equals(m.live)).toBe(true);
  for (const [name, img] of m.snaps) {
    const layer = v.snapshotLayer(name);
    expect(layer.size).toBe(img.length);
    const got = await layer.read(0, img.length);
    expect(got.equals(img), `snapshot ${name}`).toBe(true);
  }
  expect(await v.check()).toEqual([]);
}
