// The live pointer table of a redirect-on-write volume: per logical block, the physical
// pointer (0 unallocated, 0xFFFFFFFF deliberately zero, else physical + 1) and the
// generation it was born in. Kept in pages of PAGE_ENTRIES blocks that exist only once
// something in them was written, so memory and checkpoints grow with the data a thin
// volume holds, not with its provisioned size (64 GiB at 4 KiB blocks would be 16 Mi
// entries, 128 MiB, as flat arrays). A page is one Uint32Array: PAGE_ENTRIES pointers,
// then PAGE_ENTRIES births.

export const PAGE_SHIFT = 12;
export const PAGE_ENTRIES = 1 << PAGE_SHIFT; // 4096 blocks: 16 MiB of volume at 4 KiB blocks
const MASK = PAGE_ENTRIES - 1;

export class PointerTable {
  private pages: Array<Uint32Array | undefined>;
  /** per page, an upper bound of its births: lets bornAfter() skip pages untouched since a generation */
  private maxBirth: number[];

  constructor(private n: number) {
    this.pages = new Array(Math.ceil(n / PAGE_ENTRIES));
    this.maxBirth = new Array<number>(this.pages.length).fill(0);
  }

  /** number of logical blocks */
  get length(): number {
    return this.n;
  }

  ptr(l: number): number {
    const p = this.pages[l >>> PAGE_SHIFT];
    return p === undefined ? 0 : p[l & MASK];
  }

  birth(l: number): number {
    const p = this.pages[l >>> PAGE_SHIFT];
    return p === undefined ? 0 : p[PAGE_ENTRIES + (l & MASK)];
  }

  set(l: number, ptr: number, birth: number): void {
    let p = this.pages[l >>> PAGE_SHIFT];
    if (p === undefined) {
      if (ptr === 0 && birth === 0) return;
      p = this.pages[l >>> PAGE_SHIFT] = new Uint32Array(2 * PAGE_ENTRIES);
    }
    p[l & MASK] = ptr;
    p[PAGE_ENTRIES + (l & MASK)] = birth;
    if (birth > this.maxBirth[l >>> PAGE_SHIFT]) this.maxBirth[l >>> PAGE_SHIFT] = birth;
  }

  /** Grow to n blocks (shrinking is done by clearing entries; the length stays). */
  grow(n: number): void {
    if (n <= this.n) return;
    this.n = n;
    const pages = Math.ceil(n / PAGE_ENTRIES);
    while (this.maxBirth.length < pages) this.maxBirth.push(0);
    this.pages.length = pages;
  }

  /** Calls fn for every block born after generation gen (skipping whole pages born no later). */
  bornAfter(gen: number, fn: (l: number) => void): void {
    for (let i = 0; i < this.pages.length; i++) {
      const p = this.pages[i];
      if (p === undefined || this.maxBirth[i] <= gen) continue;
      const base = i * PAGE_ENTRIES;
      const end = Math.min(PAGE_ENTRIES, this.n - base);
      for (let j = 0; j < end; j++) if (p[PAGE_ENTRIES + j] > gen) fn(base + j);
    }
  }

  /** Calls fn for every block of an existing page (blocks of absent pages are all 0/0). */
  forEach(fn: (l: number, ptr: number, birth: number) => void): void {
    for (let i = 0; i < this.pages.length; i++) {
      const p = this.pages[i];
      if (p === undefined) continue;
      const base = i * PAGE_ENTRIES;
      const end = Math.min(PAGE_ENTRIES, this.n - base);
      for (let j = 0; j < end; j++) fn(base + j, p[j], p[PAGE_ENTRIES + j]);
    }
  }

  /** Blocks with a nonzero pointer or birth, in order. */
  *entries(): Generator<[number, number, number]> {
    for (let i = 0; i < this.pages.length; i++) {
      const p = this.pages[i];
      if (p === undefined) continue;
      const base = i * PAGE_ENTRIES;
      const end = Math.min(PAGE_ENTRIES, this.n - base);
      for (let j = 0; j < end; j++) if (p[j] !== 0 || p[PAGE_ENTRIES + j] !== 0) yield [base + j, p[j], p[PAGE_ENTRIES + j]];
    }
  }

  get pageCount(): number {
    let k = 0;
    for (const p of this.pages) if (p !== undefined) k++;
    return k;
  }

  /** bytes the table holds in memory */
  get bytes(): number {
    return this.pageCount * 2 * PAGE_ENTRIES * 4 + this.pages.length * 8;
  }

  /** Checkpoint form (row format 2): the indexes of the pages present, then their pointers, then their births. */
  encode(): { pages: Uint32Array; map: Uint32Array; birth: Uint32Array } {
    const idx: number[] = [];
    this.pages.forEach((p, i) => {
      if (p !== undefined && p.some((x) => x !== 0)) idx.push(i);
    });
    const map = new Uint32Array(idx.length * PAGE_ENTRIES);
    const birth = new Uint32Array(idx.length * PAGE_ENTRIES);
    idx.forEach((i, k) => {
      const p = this.pages[i]!;
      map.set(p.subarray(0, PAGE_ENTRIES), k * PAGE_ENTRIES);
      birth.set(p.subarray(PAGE_ENTRIES), k * PAGE_ENTRIES);
    });
    return { pages: Uint32Array.from(idx), map, birth };
  }

  static decode(n: number, pages: Uint32Array, map: Uint32Array, birth: Uint32Array): PointerTable {
    const t = new PointerTable(n);
    if (map.length !== pages.length * PAGE_ENTRIES || birth.length !== map.length) throw new Error(`pointer table: ${pages.length} pages but ${map.length} pointers and ${birth.length} births`);
    pages.forEach((i, k) => {
      if (i >= t.pages.length) throw new Error(`pointer table: page ${i} lies past the volume's ${t.pages.length} pages`);
      const p = new Uint32Array(2 * PAGE_ENTRIES);
      p.set(map.subarray(k * PAGE_ENTRIES, (k + 1) * PAGE_ENTRIES), 0);
      p.set(birth.subarray(k * PAGE_ENTRIES, (k + 1) * PAGE_ENTRIES), PAGE_ENTRIES);
      t.pages[i] = p;
      t.maxBirth[i] = p.subarray(PAGE_ENTRIES).reduce((m, x) => (x > m ? x : m), 0);
    });
    return t;
  }

  /** Row format 1 kept flat arrays of one entry per block. */
  static fromFlat(n: number, map: Uint32Array, birth: Uint32Array): PointerTable {
    const t = new PointerTable(Math.max(n, map.length));
    for (let l = 0; l < map.length; l++) if (map[l] !== 0 || birth[l] !== 0) t.set(l, map[l], birth[l]);
    return t;
  }
}
