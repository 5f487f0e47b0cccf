// Map errors from the block layers (BlockError codes, host errno names) to NBD error numbers.
import { NbdErr } from './constants.js';

const byCode: Record<string, number> = {
  EPERM: NbdErr.EPERM,
  EROFS: NbdErr.EPERM,
  EACCES: NbdErr.EPERM,
  EIO: NbdErr.EIO,
  ENOMEM: NbdErr.ENOMEM,
  EINVAL: NbdErr.EINVAL,
  ENOSPC: NbdErr.ENOSPC,
  EDQUOT: NbdErr.ENOSPC,
  EFBIG: NbdErr.ENOSPC,
  EOVERFLOW: NbdErr.EOVERFLOW,
  ENOTSUP: NbdErr.ENOTSUP,
  EOPNOTSUPP: NbdErr.ENOTSUP,
  ESHUTDOWN: NbdErr.ESHUTDOWN,
};

export function nbdErrno(err: unknown): number {
  const code = (err as { code?: unknown })?.code;
  return (typeof code === 'string' && byCode[code]) || NbdErr.EIO;
}
