// Recycled buffers for large reads. A fresh 1 MiB allocation pays a page fault per 4 KiB
// page on first touch (~630 µs/MiB measured on this kind of VM, against ~47 µs to fill a
// reused buffer), which dominated large sequential reads. Layers take read buffers from
// here; whoever finally consumes one (the NBD session, once the socket has sent it) gives
// it back. A buffer that is never given back is simply garbage collected.

/** Below this, Buffer.allocUnsafe's own slab pool is cheaper. */
const MIN_POOLED = 64 * 1024;
/** Idle pooled bytes kept at most, across all size classes. */
const MAX_IDLE_BYTES = 64 * 1024 * 1024;

const idle = new Map<number, Buffer[]>(); // size class -> free backing buffers
let idleBytes = 0;
/** the views handed out and not yet given back, with the backing buffer each came from */
const issued = new WeakMap<Buffer, Buffer>();

function sizeClass(length: number): number {
  return 2 ** Math.ceil(Math.log2(length));
}

/** A buffer of exactly `length` bytes with undefined contents. */
export function ioBuffer(length: number): Buffer {
  if (length < MIN_POOLED) return Buffer.allocUnsafe(length);
  const cls = sizeClass(length);
  const reused = idle.get(cls)?.pop();
  if (reused) idleBytes -= cls;
  const backing = reused ?? Buffer.allocUnsafeSlow(cls);
  const view = backing.subarray(0, length);
  issued.set(view, backing);
  return view;
}

/** extra holders of an issued view (retain): recycle gives it back once the last lets go */
const holders = new WeakMap<Buffer, number>();

/**
 * Keep a buffer from ioBuffer after its owner recycles it (the owner's recycle() then only
 * drops the owner's hold): true if `view` is such a buffer, which the caller must then
 * recycle() itself once done with it. False for any other buffer (the caller must copy it
 * if it needs the bytes after the owner is done with them).
 */
export function retain(view: Buffer): boolean {
  if (!issued.has(view)) return false;
  holders.set(view, (holders.get(view) ?? 0) + 1);
  return true;
}

/**
 * Give a buffer from ioBuffer back once nothing references it any more. Buffers that did
 * not come from ioBuffer (or were already given back) are ignored, so callers need not know.
 */
export function recycle(view: Buffer): void {
  const backing = issued.get(view);
  if (!backing) return;
  const held = holders.get(view);
  if (held) {
    if (held > 1) holders.set(view, held - 1);
    else holders.delete(view);
    return;
  }
  issued.delete(view);
  // Over the budget, idle buffers of other sizes make room: a size no longer in use (e.g.
  // 1 MiB writes, then 256 KiB ones) must not keep the sizes in use from being recycled,
  // which would make every one of them a fresh allocation (page faults, GC).
  while (idleBytes + backing.length > MAX_IDLE_BYTES && evictOther(backing.length));
  if (idleBytes + backing.length > MAX_IDLE_BYTES) return;
  let list = idle.get(backing.length);
  if (!list) idle.set(backing.length, (list = []));
  list.push(backing);
  idleBytes += backing.length;
}

/** Drop one idle buffer of the size class holding the most idle bytes, other than `keep`. */
function evictOther(keep: number): boolean {
  let victim: Buffer[] | undefined;
  let most = 0;
  for (const [cls, list] of idle) {
    if (cls !== keep && list.length * cls > most) {
      most = list.length * cls;
      victim = list;
    }
  }
  const dropped = victim?.pop();
  if (!dropped) return false;
  idleBytes -= dropped.length;
  return true;
}
