// A snapshot's delta (logical block → the physical block it owns, and that block's birth
// generation) as an open-addressing hash table in three typed arrays. A JS Map of small
// objects cost ~69 bytes per entry (17 MB of RAM per GiB of snapshot-owned 4 KiB blocks);
// this costs 12 bytes per slot at a load of at most 1/2, so 24–48 bytes per entry, and
// gives the garbage collector nothing to trace. Linear probing, backward-shift deletion.

export interface DeltaEntry {
  /** physical pointer as the live table stores it (UNALLOCATED, ZERO, or physical + 1) */
  p: number;
  birth: number;
}

/** never a logical block number: row volumes hold at most 0xfffffffe blocks */
const EMPTY = 0xffffffff;
const MIN_CAPACITY = 16;

export class DeltaMap {
  private blocks!: Uint32Array;
  private ptrs!: Uint32Array;
  private births!: Uint32Array;
  private shift!: number;
  private count = 0;
  /** bounds of the keys ever set since the map was last empty (a delete does not shrink them) */
  private lowest = EMPTY;
  private highest = -1;

  constructor() {
    this.allocate(MIN_CAPACITY);
  }

  /** empty arrays of `capacity` slots (a power of two) */
  private allocate(capacity: number): void {
    this.blocks = new Uint32Array(capacity).fill(EMPTY);
    this.ptrs = new Uint32Array(capacity);
    this.births = new Uint32Array(capacity);
    this.shift = 32 - Math.log2(capacity);
    this.count = 0;
  }

  get size(): number {
    return this.count;
  }

  /**
   * Whether some key may lie in [first, last]: false is certain. A snapshot read asks this once
   * per request, so that of a thousand snapshots only the deltas near the range are probed per block.
   */
  mayHoldAny(first: number, last: number): boolean {
    return this.count > 0 && this.lowest <= last && this.highest >= first;
  }

  private home(l: number): number {
    return Math.imul(l, 0x9e3779b1) >>> this.shift;
  }

  /** slot of l, or -1; read it with ptrAt / birthAt (no object per lookup on the read path) */
  slotOf(l: number): number {
    const mask = this.blocks.length - 1;
    for (let i = this.home(l); ; i = (i + 1) & mask) {
      const k = this.blocks[i];
      if (k === l) return i;
      if (k === EMPTY) return -1;
    }
  }

  /** slots, for walking the map a slot at a time (keyAt) */
  get capacity(): number {
    return this.blocks.length;
  }

  /** the block in a slot, or -1 for an empty slot */
  keyAt(slot: number): number {
    const l = this.blocks[slot];
    return l === EMPTY ? -1 : l;
  }

  ptrAt(slot: number): number {
    return this.ptrs[slot];
  }

  birthAt(slot: number): number {
    return this.births[slot];
  }

  has(l: number): boolean {
    return this.slotOf(l) >= 0;
  }

  set(l: number, e: DeltaEntry): this {
    this.put(l, e.p, e.birth);
    return this;
  }

  /** set() without an entry object (the pointer table's write path); true if l was not present */
  put(l: number, p: number, birth: number): boolean {
    if (l === EMPTY) throw new RangeError(`block ${l} cannot be a delta key`);
    if ((this.count + 1) * 2 > this.blocks.length) this.rehash(this.blocks.length * 2);
    const mask = this.blocks.length - 1;
    let i = this.home(l);
    while (this.blocks[i] !== EMPTY && this.blocks[i] !== l) i = (i + 1) & mask;
    const added = this.blocks[i] === EMPTY;
    if (added) {
      this.blocks[i] = l;
      this.count++;
      if (l < this.lowest) this.lowest = l;
      if (l > this.highest) this.highest = l;
    }
    this.ptrs[i] = p;
    this.births[i] = birth;
    return added;
  }

  delete(l: number): boolean {
    let i = this.slotOf(l);
    if (i < 0) return false;
    const mask = this.blocks.length - 1;
    // Backward shift: pull later entries of the probe run into the hole so lookups never stop early.
    for (let j = (i + 1) & mask; this.blocks[j] !== EMPTY; j = (j + 1) & mask) {
      const h = this.home(this.blocks[j]);
      // entry j may move to i if its home is not in the cyclic range (i, j]
      if (i <= j ? h <= i || h > j : h <= i && h > j) {
        this.blocks[i] = this.blocks[j];
        this.ptrs[i] = this.ptrs[j];
        this.births[i] = this.births[j];
        i = j;
      }
    }
    this.blocks[i] = EMPTY;
    this.count--;
    if (this.count === 0) {
      this.lowest = EMPTY;
      this.highest = -1;
    }
    if (this.blocks.length > MIN_CAPACITY && this.count * 8 < this.blocks.length) this.rehash(this.blocks.length / 2);
    return true;
  }

  /** the blocks present; the map must not change during the iteration */
  *keys(): Generator<number> {
    for (let i = 0; i < this.blocks.length; i++) if (this.blocks[i] !== EMPTY) yield this.blocks[i];
  }

  /** [block, entry] pairs; the map must not change during the iteration */
  *[Symbol.iterator](): Generator<[number, DeltaEntry]> {
    const { blocks, ptrs, births } = this;
    for (let i = 0; i < blocks.length; i++) if (blocks[i] !== EMPTY) yield [blocks[i], { p: ptrs[i], birth: births[i] }];
  }

  /** Calls fn for every entry, with no object per entry; the map must not change meanwhile. */
  forEach(fn: (l: number, p: number, birth: number) => void): void {
    const { blocks, ptrs, births } = this;
    for (let i = 0; i < blocks.length; i++) if (blocks[i] !== EMPTY) fn(blocks[i], ptrs[i], births[i]);
  }

  /** bytes held */
  get bytes(): number {
    return this.blocks.byteLength * 3;
  }

  private rehash(capacity: number): void {
    const { blocks: keys, ptrs, births } = this;
    this.allocate(capacity);
    const mask = capacity - 1;
    for (let k = 0; k < keys.length; k++) {
      const l = keys[k];
      if (l === EMPTY) continue;
      let i = this.home(l);
      while (this.blocks[i] !== EMPTY) i = (i + 1) & mask;
      this.blocks[i] = l;
      this.ptrs[i] = ptrs[k];
      this.births[i] = births[k];
      this.count++;
    }
  }
}
