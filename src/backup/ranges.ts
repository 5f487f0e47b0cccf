// Sorted, non-overlapping [offset, length] range lists and the chunk planner.
import type { Range } from './manifest.js';

export function intersect(a: Range[], b: Range[]): Range[] {
  const out: Range[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length && j < b.length) {
    const s = Math.max(a[i][0], b[j][0]);
    const e = Math.min(a[i][0] + a[i][1], b[j][0] + b[j][1]);
    if (s < e) out.push([s, e - s]);
    if (a[i][0] + a[i][1] < b[j][0] + b[j][1]) i++;
    else j++;
  }
  return out;
}

/** a minus b */
export function subtract(a: Range[], b: Range[]): Range[] {
  const out: Range[] = [];
  let j = 0;
  for (const [o, l] of a) {
    let s = o;
    const e = o + l;
    while (j < b.length && b[j][0] + b[j][1] <= s) j++;
    let k = j;
    while (s < e) {
      const r = b[k];
      if (!r || r[0] >= e) {
        out.push([s, e - s]);
        break;
      }
      if (r[0] > s) out.push([s, r[0] - s]);
      s = Math.max(s, r[0] + r[1]);
      k++;
    }
  }
  return out;
}

export function total(r: Range[]): number {
  return r.reduce((n, x) => n + x[1], 0);
}

/**
 * Cut data ranges into pieces that never cross a chunkSize boundary, and join
 * pieces of the same chunk cell separated by at most `gap` bytes (reading a small
 * gap costs less than another object).
 */
export function planPieces(data: Range[], chunkSize: number, gap: number): Range[] {
  const out: Range[] = [];
  for (const [o, l] of data) {
    let at = o;
    const end = o + l;
    while (at < end) {
      const cellEnd = (Math.floor(at / chunkSize) + 1) * chunkSize;
      const e = Math.min(end, cellEnd);
      const last = out[out.length - 1];
      if (last && Math.floor(last[0] / chunkSize) === Math.floor(at / chunkSize) && at - (last[0] + last[1]) <= gap) last[1] = e - last[0];
      else out.push([at, e - at]);
      at = e;
    }
  }
  return out;
}
