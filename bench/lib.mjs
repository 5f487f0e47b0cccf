// Small helpers the bench scripts share. Sizes are parsed by the product's own parser
// (dist/pool/size.js), so "4k", "1.5G", "64G" mean here what they mean on the CLI.
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const { parseSize } = await import(path.join(ROOT, 'dist/pool/size.js'));

/** "a, b,c" -> ['a', 'b', 'c'] */
export const list = (v) => String(v).split(',').map((x) => x.trim()).filter(Boolean);

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Calls onArg(arg, value) for each command-line argument; value() consumes the next one. */
export function eachArg(argv, onArg) {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    onArg(a, () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    });
  }
}
