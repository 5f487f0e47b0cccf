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

/**
 * Give a buffer from ioBuffer back once nothing references it any more. Buffers that did
 * not come from ioBuffer (or were already given back) are ignored, so callers need not know.
 */
export function recycle(view: Buffer): void {
  const backing = issued.get(view);
  if (!backing) return;
  issued.delete(view);
  if (idleBytes + backing.length > MAX_IDLE_BYTES) return;
  let list = idle.get(backing.length);
  if (!list) idle.set(backing.length, (list = []));
  list.push(backing);
  idleBytes += backing.length;
}
