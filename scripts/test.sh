#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: system packages, the native addon
# and TypeScript build (npm ci), then every vitest test (real NBD clients, QEMU guest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
npm ci --no-audit --no-fund
npx vitest run "$@"
