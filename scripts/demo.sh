#!/usr/bin/env bash
# Build snapblock, create a 1 GiB demo volume in the embedded pool ./data, and serve it
# on nbd://127.0.0.1:10809/demo until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f build/Release/snapblock_native.node && -d dist ]] || npm ci --no-audit --no-fund
node bin/snapblock.js volume info demo >/dev/null 2>&1 || node bin/snapblock.js volume create demo 1G
echo "serving: try  nbdinfo nbd://127.0.0.1:10809/demo   (Ctrl-C stops)"
exec node bin/snapblock.js serve --listen 127.0.0.1:10809
