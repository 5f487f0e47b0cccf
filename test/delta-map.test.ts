// DeltaMap against a plain Map model: random sets, overwrites and deletes (deletes exercise
// backward shifting across wrapped probe runs, growth and shrinking).
import { describe, it, expect } from 'vitest';
import { DeltaMap } from '../src/storage/delta-map.js';

/** the entry at l, or undefined, through the slot API the read path uses */
function entry(m: DeltaMap, l: number) {
  const k = m.slotOf(l);
  return k < 0 ? undefined : { p: m.ptrAt(k), birth: m.birthAt(k) };
}

function rng(seed: number) {
  let x = seed >>> 0;
  return () => ((x = (Math.imul(x, 1664525) + 1013904223) >>> 0) / 2 ** 32);
}

describe('DeltaMap', () => {
  it('behaves like a Map of {p, birth} under random operations', () => {
    const r = rng(42);
    const m = new DeltaMap();
    const model = new Map<number, { p: number; birth: number }>();
    for (let step = 0; step < 60_000; step++) {
      // a small key space forces collisions and long probe runs; some huge keys too
      const l = r() < 0.9 ? Math.floor(r() * 3000) : 0xfffffffe - Math.floor(r() * 50);
      const op = r();
      if (op < 0.55) {
        const e = { p: Math.floor(r() * 2 ** 32), birth: Math.floor(r() * 1000) };
        m.set(l, e);
        model.set(l, e);
      } else if (op < 0.95 || step > 50_000) {
        expect(m.delete(l)).toBe(model.delete(l));
      } else {
        expect(entry(m, l)).toEqual(model.get(l));
      }
      if (step % 5000 === 0 || step === 59_999) {
        expect(m.size).toBe(model.size);
        for (const [k, v] of model) expect(entry(m, k)).toEqual(v);
        const seen = new Map([...m]);
        expect(seen).toEqual(model);
        expect(new Set(m.keys())).toEqual(new Set(model.keys()));
      }
    }
    // mostly deleted by now: the table shrank with it
    expect(m.bytes).toBeLessThan(16 * 12 * Math.max(16, model.size));
  });

  it('holds a million entries in far less than a Map would', () => {
    const m = new DeltaMap();
    for (let l = 0; l < 1_000_000; l++) m.set(l * 7, { p: l + 1, birth: 3 });
    expect(m.size).toBe(1_000_000);
    expect(entry(m, 7 * 123_456)).toEqual({ p: 123_457, birth: 3 });
    expect(m.has(5)).toBe(false);
    expect(m.bytes / m.size).toBeLessThanOrEqual(48);
    let n = 0;
    for (const [l, e] of m) if (e.p === l / 7 + 1 && e.birth === 3) n++;
    expect(n).toBe(1_000_000);
    for (let l = 0; l < 1_000_000; l++) m.delete(l * 7);
    expect(m.size).toBe(0);
    expect(entry(m, 0)).toBeUndefined();
  });

  it('refuses the one value that marks an empty slot', () => {
    expect(() => new DeltaMap().set(0xffffffff, { p: 1, birth: 1 })).toThrow(RangeError);
  });

  it('mayHoldAny: never false for a range holding a key, false for an empty map and ranges outside the keys', () => {
    const m = new DeltaMap();
    expect(m.mayHoldAny(0, 0xfffffffe)).toBe(false);
    for (const l of [100, 5000, 70000]) m.set(l, { p: 1, birth: 1 });
    expect(m.mayHoldAny(100, 100)).toBe(true);
    expect(m.mayHoldAny(4000, 6000)).toBe(true);
    expect(m.mayHoldAny(70000, 80000)).toBe(true);
    expect(m.mayHoldAny(0, 99)).toBe(false);
    expect(m.mayHoldAny(70001, 90000)).toBe(false);
    for (let l = 200; l < 300; l++) m.set(l, { p: 2, birth: 1 }); // growth keeps the bounds
    m.delete(70000);
    expect(m.mayHoldAny(250, 250)).toBe(true);
    for (const l of [...m.keys()]) m.delete(l);
    expect(m.mayHoldAny(0, 0xfffffffe)).toBe(false);
  });
});
