#!/usr/bin/env node
// The backup sidecar's commands (backup, export-diff, import-diff) start through
// dist/cli/sidecar.js, which does not load the server's modules; all else through main.js.
const args = process.argv.slice(2);
let i = 0;
while (i < args.length && args[i].startsWith('-')) i += /^--(pool|log-level)$/.test(args[i]) ? 2 : 1;
await import(['backup', 'export-diff', 'import-diff'].includes(args[i]) ? '../dist/cli/sidecar.js' : '../dist/cli/main.js');
