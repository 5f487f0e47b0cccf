// Volume names become file names and NBD export names: keep them boring.
// '@' is reserved for snapshot exports (VOLUME@SNAPSHOT).
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export function validateName(kind: string, name: string): string {
  if (typeof name !== 'string' || !NAME.test(name) || name.includes('..')) {
    throw new PoolError(
      'EINVAL',
      `invalid ${kind} name "${name}": use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit`,
    );
  }
  return name;
}

export type PoolErrorCode = 'EINVAL' | 'ENOENT' | 'EEXIST' | 'EBUSY' | 'ENOSPC' | 'ELOCKED';

/** An error the operator caused and can fix; the message says how. */
export class PoolError extends Error {
  constructor(
    readonly code: PoolErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'PoolError';
  }
}

export const MAX_VOLUME_SIZE = 2 ** 46; // 64 TiB: block indexes stay within u32 at 64 KiB blocks

/** A volume size in bytes: positive, a multiple of 512, at most MAX_VOLUME_SIZE. */
export function validateVolumeSize(size: number): number {
  if (!Number.isSafeInteger(size) || size <= 0) throw new PoolError('EINVAL', `volume size must be a positive number of bytes, got ${size}`);
  if (size > MAX_VOLUME_SIZE) throw new PoolError('EINVAL', `volume size ${size} exceeds the maximum of ${MAX_VOLUME_SIZE} bytes`);
  if (size % 512 !== 0) throw new PoolError('EINVAL', `volume size ${size} is not a multiple of 512 bytes`);
  return size;
}
