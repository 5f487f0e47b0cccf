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
