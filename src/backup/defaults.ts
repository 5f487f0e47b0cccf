// Defaults the command line needs before it loads the backup engine.
export const DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024;
export const DEFAULT_CONCURRENCY = 8;
