// The one interface every block layer implements. Layers stack: a filter holds the
// layer below it and passes calls down, the way nbdkit filters stack over plugins.
// Offsets and lengths are in bytes and have already been range-checked by the caller
// (the protocol edge); layers may trust them.

export type BlockErrorCode = 'EIO' | 'ENOSPC' | 'EINVAL' | 'EPERM' | 'ENOTSUP' | 'EOVERFLOW' | 'ESHUTDOWN' | 'ENOMEM';

/** An error a layer reports on purpose; its code travels to the NBD client. */
export class BlockError extends Error {
  constructor(
    readonly code: BlockErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'BlockError';
  }
}

export interface WriteFlags {
  /** force unit access: durable before the promise resolves */
  fua?: boolean;
}

export interface ZeroFlags extends WriteFlags {
  /** the range may be deallocated (NBD: NO_HOLE not set) */
  mayTrim?: boolean;
  /** fail with ENOTSUP rather than zero slowly (NBD: FAST_ZERO) */
  fast?: boolean;
}

export interface Extent {
  offset: number;
  length: number;
  /** unallocated: reading it costs nothing and returns zeroes */
  hole: boolean;
  /** reads as zeroes */
  zero: boolean;
}

export interface Capabilities {
  readOnly: boolean;
  /** flush on one connection covers writes completed on every other connection */
  multiConn: boolean;
  trim: boolean;
  zero: boolean;
  fastZero: boolean;
  fua: boolean;
  cache: boolean;
  extents: boolean;
}

/** A range of a layer as views of mapped file memory (BlockLayer.readMapped). */
export interface MappedRange {
  /** the range in order: bytes (valid to read until release()), or the length of a hole that reads as zeroes */
  pieces: Array<Buffer | number>;
  release(): void;
}

/** A WRITE being received straight into its final place (BlockLayer.writeInPlace). */
export interface InPlaceWrite {
  /** where the payload goes, in order: views of the data file's cached pages */
  pieces: Buffer[];
  /**
   * Ends the write: every payload byte has landed (complete) or the sender went away part way
   * (then the range holds some new and some old bytes, as after a torn disk write, and was
   * never acknowledged). With fua, resolves once the write is durable.
   */
  finish(complete: boolean, flags?: WriteFlags): Promise<void>;
}

export interface BlockLayer {
  readonly size: number;
  readonly caps: Capabilities;
  /** The returned buffer belongs to the caller, who may hand it to io-buffers' recycle(). */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Once the returned promise resolves, `data` belongs to the caller again (it may be reused
   * for another request): a layer that needs the bytes later must copy them.
   */
  write(offset: number, data: Buffer, flags?: WriteFlags): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number, flags?: WriteFlags): Promise<void>;
  zero(offset: number, length: number, flags?: ZeroFlags): Promise<void>;
  /** contiguous, ordered extents starting at offset; may cover less than length but at least one byte */
  extents(offset: number, length: number): Promise<Extent[]>;
  /**
   * Optional: [offset, offset+length) as pinned views of mapped file memory, for replies that
   * leave without first being copied into a buffer; undefined where this layer cannot give
   * them (the caller then uses read). The bytes are read when the caller reads the views, so
   * a layer offers this only where nothing but a write to this same range changes them.
   */
  readMapped?(offset: number, length: number): MappedRange | undefined;
  /**
   * Optional: a WRITE of [offset, offset+length) received by the caller straight into the
   * place its bytes end up, with no buffer in between (one copy fewer), or undefined where
   * this layer cannot take it so now (the caller then receives into a buffer and calls write).
   * Until finish() the write counts as in flight, so a snapshot waits for it. While something
   * waits, the layer calls `waited(idleMs)` every idleMs; if no payload byte arrived in the
   * last idleMs, the caller must stop receiving (close the connection) and call finish(false):
   * a stalled sender holds no snapshot back for long, a slow one is waited for.
   */
  writeInPlace?(offset: number, length: number, waited: (idleMs: number) => void): InPlaceWrite | undefined;
  /** prefetch hint */
  cache(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}
