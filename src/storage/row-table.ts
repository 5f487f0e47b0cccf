// The live pointer table of a redirect-on-write volume: per logical block, the physical
// pointer (0 unallocated, 0xFFFFFFFF deliberately zero, else physical + 1) and the
// generation it was born in. A block whose pointer and birth are both 0 is absent.
//
// Memory and checkpoints follow the blocks mapped, not the regions touched. The volume is
// cut into pages of PAGE_ENTRIES blocks, and a page is held in one of two forms:
//  - sparse: its entries live in one hash map shared by all sparse pages (DeltaMap,
//    24–48 bytes per entry). A page with one block written costs one entry, not the 32 KiB
//    a dense page takes: 65,536 writes 16 MiB apart once took 2 GiB here.
//  - dense: one Uint32Array of PAGE_ENTRIES pointers then PAGE_ENTRIES births, indexed
//    directly. A page becomes dense once it holds more than DENSE_AT entries, where the map
//    would cost about as much; it stays dense until the volume is reopened.
// Per page the table keeps one Int32Array slot (4 bytes per 16 MiB of volume at 4 KiB
// blocks): the page's entry count while sparse, or its dense array's index. Lookups stay
// O(1): a dense page is one more array load than before; a sparse page with no entries
// needs no hashing at all.

import type { ChunkedArray, CheckpointReader } from './checkpoint.js';
import { DeltaMap } from './delta-map.js';

export const PAGE_SHIFT = 12;
export const PAGE_ENTRIES = 1 << PAGE_SHIFT; // 4096 blocks: 16 MiB of volume at 4 KiB blocks
const MASK = PAGE_ENTRIES - 1;
/** entries past which a page is held dense: 1024 map entries take about a dense page's 32 KiB */
export const DENSE_AT = PAGE_ENTRIES / 4;
/** u32s of a page stored dense in a checkpoint (its index + pointers + births); stored so only when its entries as (block, pointer, birth) triples would take more */
const DENSE_RECORD = 1 + 2 * PAGE_ENTRIES;
/** entries per chunk handed to the checkpoint writer */
const CHUNK_ENTRIES = 16384;

export class PointerTable {
  /** per page: >= 0 the number of its entries in `sparse`; < 0 the page is dense[~state] */
  private state: Int32Array;
  private sparse = new DeltaMap();
  private dense: Uint32Array[] = [];
  /** the page each dense array holds */
  private densePage: number[] = [];
  /** per dense array, an upper bound of its births: lets bornAfter() skip pages untouched since a generation */
  private denseMaxBirth: number[] = [];

  constructor(private n: number) {
    this.state = new Int32Array(Math.ceil(n / PAGE_ENTRIES));
  }

  /** number of logical blocks */
  get length(): number {
    return this.n;
  }

  ptr(l: number): number {
    const s = this.state[l >>> PAGE_SHIFT];
    if (s < 0) return this.dense[~s][l & MASK];
    if (!(s > 0)) return 0;
    const k = this.sparse.slotOf(l);
    return k < 0 ? 0 : this.sparse.ptrAt(k);
  }

  birth(l: number): number {
    const s = this.state[l >>> PAGE_SHIFT];
    if (s < 0) return this.dense[~s][PAGE_ENTRIES + (l & MASK)];
    if (!(s > 0)) return 0;
    const k = this.sparse.slotOf(l);
    return k < 0 ? 0 : this.sparse.birthAt(k);
  }

  set(l: number, ptr: number, birth: number): void {
    const i = l >>> PAGE_SHIFT;
    const s = this.state[i];
    if (s < 0) {
      const d = ~s;
      const p = this.dense[d];
      p[l & MASK] = ptr;
      p[PAGE_ENTRIES + (l & MASK)] = birth;
      if (birth > this.denseMaxBirth[d]) this.denseMaxBirth[d] = birth;
    } else if (ptr === 0 && birth === 0) {
      if (s > 0 && this.sparse.delete(l)) this.state[i] = s - 1;
    } else if (this.sparse.put(l, ptr, birth)) {
      if (s + 1 > DENSE_AT) this.makeDense(i);
      else this.state[i] = s + 1;
    }
  }

  /** Moves page i's entries from the map into a dense array of its own. */
  private makeDense(i: number): void {
    const page = new Uint32Array(2 * PAGE_ENTRIES);
    let maxBirth = 0;
    const base = i * PAGE_ENTRIES;
    // the page's entries: DENSE_AT counted plus the one just added (stop once all are found: a sequential fill finds them first)
    for (let j = 0, left = DENSE_AT + 1; j < PAGE_ENTRIES && left > 0; j++) {
      const k = this.sparse.slotOf(base + j);
      if (k < 0) continue;
      left--;
      page[j] = this.sparse.ptrAt(k);
      page[PAGE_ENTRIES + j] = this.sparse.birthAt(k);
      if (page[PAGE_ENTRIES + j] > maxBirth) maxBirth = page[PAGE_ENTRIES + j];
      this.sparse.delete(base + j);
    }
    this.adoptDense(i, page, maxBirth);
  }

  private adoptDense(i: number, page: Uint32Array, maxBirth: number): void {
    this.state[i] = ~this.dense.length;
    this.dense.push(page);
    this.densePage.push(i);
    this.denseMaxBirth.push(maxBirth);
  }

  /** Grow to n blocks (shrinking is done by clearing entries; the length stays). */
  grow(n: number): void {
    if (n <= this.n) return;
    this.n = n;
    const state = new Int32Array(Math.ceil(n / PAGE_ENTRIES));
    state.set(this.state);
    this.state = state;
  }

  /** Calls fn for every block born after generation gen, in no particular order (skipping dense pages born no later). */
  bornAfter(gen: number, fn: (l: number) => void): void {
    this.sparse.forEach((l, _p, birth) => {
      if (birth > gen) fn(l);
    });
    for (let d = 0; d < this.dense.length; d++) {
      if (this.denseMaxBirth[d] <= gen) continue;
      const p = this.dense[d];
      const base = this.densePage[d] * PAGE_ENTRIES;
      for (let j = 0; j < PAGE_ENTRIES; j++) if (p[PAGE_ENTRIES + j] > gen) fn(base + j);
    }
  }

  /** Calls fn for every present block (nonzero pointer or birth), in no particular order; the table must not change meanwhile. */
  forEachEntry(fn: (l: number, ptr: number, birth: number) => void): void {
    this.sparse.forEach(fn);
    for (let d = 0; d < this.dense.length; d++) {
      const p = this.dense[d];
      const base = this.densePage[d] * PAGE_ENTRIES;
      for (let j = 0; j < PAGE_ENTRIES; j++) if (p[j] !== 0 || p[PAGE_ENTRIES + j] !== 0) fn(base + j, p[j], p[PAGE_ENTRIES + j]);
    }
  }

  /** [block, pointer, birth] of every present block, in no particular order; collected first, so the caller may change the table meanwhile. */
  *entries(): Generator<[number, number, number]> {
    const all: Array<[number, number, number]> = [];
    this.forEachEntry((l, p, b) => all.push([l, p, b]));
    yield* all;
  }

  /** number of present blocks */
  get size(): number {
    let k = this.sparse.size;
    for (const p of this.dense) k += presentIn(p);
    return k;
  }

  /** bytes the table holds in memory (typed arrays; a few dozen bytes of objects per dense page besides) */
  get bytes(): number {
    return this.state.byteLength + this.sparse.bytes + this.dense.length * (2 * PAGE_ENTRIES * 4 + 16);
  }

  /** Structural invariants (for `check`): the page states agree with the map's entries, and every entry lies inside the volume. */
  verify(): string[] {
    const problems: string[] = [];
    const counted = new Int32Array(this.state.length);
    this.sparse.forEach((l) => {
      const i = l >>> PAGE_SHIFT;
      if (l >= this.n) problems.push(`pointer table: block ${l} lies past the volume's ${this.n} blocks`);
      else if (this.state[i] < 0) problems.push(`pointer table: block ${l} is in the sparse map but its page ${i} is dense`);
      else counted[i]++;
    });
    for (let i = 0; i < this.state.length; i++) {
      const s = this.state[i];
      if (s >= 0 && s !== counted[i]) problems.push(`pointer table: page ${i} counts ${s} entries but the map holds ${counted[i]}`);
      if (s < 0 && this.densePage[~s] !== i) problems.push(`pointer table: page ${i} names dense array ${~s}, which holds page ${this.densePage[~s]}`);
    }
    for (let d = 0; d < this.dense.length; d++) {
      const p = this.dense[d];
      const base = this.densePage[d] * PAGE_ENTRIES;
      for (let j = Math.max(0, this.n - base); j < PAGE_ENTRIES; j++) if (p[j] !== 0 || p[PAGE_ENTRIES + j] !== 0) problems.push(`pointer table: block ${base + j} lies past the volume's ${this.n} blocks`);
      for (let j = 0; j < PAGE_ENTRIES; j++) if (p[PAGE_ENTRIES + j] > this.denseMaxBirth[d]) problems.push(`pointer table: block ${base + j} born after its page's recorded latest birth`);
    }
    return problems;
  }

  // ---- checkpoint (row format 3; docs/FORMAT.md) ----

  /**
   * Checkpoint arrays, produced while the file is written, so nothing the size of the table
   * is built: `pages` the indexes of the pages stored dense (ascending), `dense` their
   * pointers then births (2 × PAGE_ENTRIES each, the in-memory page itself), `entries` every
   * other present block as (block, pointer, birth) triples. A page is stored dense only when
   * that is smaller than its triples. The table must not change until the file is written.
   */
  checkpointArrays(): { pages: Uint32Array; dense: ChunkedArray; entries: ChunkedArray } {
    const storedDense: number[] = [];
    const asTriples: number[] = [];
    let triples = this.sparse.size;
    for (let d = 0; d < this.dense.length; d++) {
      const present = presentIn(this.dense[d]);
      if (3 * present > DENSE_RECORD) storedDense.push(d);
      else if (present > 0) {
        asTriples.push(d);
        triples += present;
      }
    }
    storedDense.sort((a, b) => this.densePage[a] - this.densePage[b]);
    const dense = this.dense;
    return {
      pages: Uint32Array.from(storedDense, (d) => this.densePage[d]),
      dense: { length: storedDense.length * 2 * PAGE_ENTRIES, chunks: () => storedDense.map((d) => dense[d]) },
      entries: { length: 3 * triples, chunks: () => this.tripleChunks(asTriples) },
    };
  }

  /** the map's entries and those of the given dense arrays as (block, pointer, birth), CHUNK_ENTRIES triples at a time */
  private *tripleChunks(denseArrays: number[]): Generator<Uint32Array> {
    const chunk = new Uint32Array(3 * CHUNK_ENTRIES);
    let k = 0;
    for (let slot = 0; slot < this.sparse.capacity; slot++) {
      const l = this.sparse.keyAt(slot);
      if (l < 0) continue;
      chunk[k++] = l;
      chunk[k++] = this.sparse.ptrAt(slot);
      chunk[k++] = this.sparse.birthAt(slot);
      if (k === chunk.length) {
        yield chunk; // written out before the generator resumes
        k = 0;
      }
    }
    for (const d of denseArrays) {
      const p = this.dense[d];
      const base = this.densePage[d] * PAGE_ENTRIES;
      for (let j = 0; j < PAGE_ENTRIES; j++) {
        if (p[j] === 0 && p[PAGE_ENTRIES + j] === 0) continue;
        chunk[k++] = base + j;
        chunk[k++] = p[j];
        chunk[k++] = p[PAGE_ENTRIES + j];
        if (k === chunk.length) {
          yield chunk;
          k = 0;
        }
      }
    }
    if (k > 0) yield chunk.subarray(0, k);
  }

  /** Reads the arrays checkpointArrays() wrote (row format 3). */
  static read(n: number, r: CheckpointReader<unknown>): PointerTable {
    const t = new PointerTable(n);
    const pages = t.checkPages(r.take(r.begin('pages')));
    const entries = r.begin('dense');
    if (entries !== pages.length * 2 * PAGE_ENTRIES) throw new Error(`pointer table: ${pages.length} dense pages but ${entries} dense entries`);
    for (const i of pages) {
      const page = r.take(2 * PAGE_ENTRIES);
      t.adoptDense(i, page, maxOf(page.subarray(PAGE_ENTRIES)));
    }
    r.begin('entries');
    r.takeRecords(3, (c) => {
      for (let k = 0; k < c.length; k += 3) {
        if (c[k] >= n) throw new Error(`pointer table: block ${c[k]} lies past the volume's ${n} blocks`);
        t.set(c[k], c[k + 1], c[k + 2]);
      }
    });
    return t;
  }

  /** Row format 2: `pages`, then `map` and `birth` of PAGE_ENTRIES entries per page listed; sparse pages are converted as they are read. */
  static readFormat2(n: number, r: CheckpointReader<unknown>): PointerTable {
    const t = new PointerTable(n);
    const pages = t.checkPages(r.take(r.begin('pages')));
    const want = pages.length * PAGE_ENTRIES;
    if (r.begin('map') !== want) throw new Error(`pointer table: ${pages.length} pages but the map array is not ${want} entries`);
    // pointers of every page first (the file's order), births after: the pages are held whole meanwhile
    const held = Array.from(pages, () => {
      const page = new Uint32Array(2 * PAGE_ENTRIES);
      page.set(r.take(PAGE_ENTRIES));
      return page;
    });
    if (r.begin('birth') !== want) throw new Error(`pointer table: ${pages.length} pages but the birth array is not ${want} entries`);
    pages.forEach((i, k) => {
      const page = held[k];
      page.set(r.take(PAGE_ENTRIES), PAGE_ENTRIES);
      if (presentIn(page) > DENSE_AT) t.adoptDense(i, page, maxOf(page.subarray(PAGE_ENTRIES)));
      else for (let j = 0; j < PAGE_ENTRIES; j++) if (page[j] !== 0 || page[PAGE_ENTRIES + j] !== 0) t.set(i * PAGE_ENTRIES + j, page[j], page[PAGE_ENTRIES + j]);
      held[k] = EMPTY_PAGE; // converted: let the dense copy go
    });
    return t;
  }

  /** Row format 1 kept flat arrays of one entry per block. */
  static fromFlat(n: number, map: Uint32Array, birth: Uint32Array): PointerTable {
    const t = new PointerTable(Math.max(n, map.length));
    for (let l = 0; l < map.length; l++) if (map[l] !== 0 || birth[l] !== 0) t.set(l, map[l], birth[l]);
    return t;
  }

  /** page indexes a checkpoint lists: ascending (so each once), inside the volume */
  private checkPages(pages: Uint32Array): Uint32Array {
    pages.forEach((i, k) => {
      if (i >= this.state.length) throw new Error(`pointer table: page ${i} lies past the volume's ${this.state.length} pages`);
      if (k > 0 && i <= pages[k - 1]) throw new Error(`pointer table: pages not in ascending order (${pages[k - 1]}, then ${i})`);
    });
    return pages;
  }
}

const EMPTY_PAGE = new Uint32Array(0);

/** number of present blocks in a dense page */
function presentIn(page: Uint32Array): number {
  let k = 0;
  for (let j = 0; j < PAGE_ENTRIES; j++) if (page[j] !== 0 || page[PAGE_ENTRIES + j] !== 0) k++;
  return k;
}

function maxOf(a: Uint32Array): number {
  let m = 0;
  for (let j = 0; j < a.length; j++) if (a[j] > m) m = a[j];
  return m;
}
