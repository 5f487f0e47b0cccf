// How every snapblock entry point ends on failure, so both (main.ts, sidecar.ts) exit alike.

/** yargs .fail(): a thrown Error is a failed operation (exit 1); anything else is a malformed command (exit 2). */
export function failCommand(msg: string | undefined, err: Error | undefined): never {
  if (err instanceof Error && err.name !== 'YError') {
    process.stderr.write(`snapblock: ${err.message}\n`);
    process.exit(1);
  }
  process.stderr.write(`snapblock: ${msg ?? String(err)}\nRun with --help for usage.\n`);
  process.exit(2);
}

/** Top-level rejection of an entry point. */
export function failRun(err: Error): never {
  process.stderr.write(`snapblock: ${err.message}\n`);
  process.exit(1);
}
