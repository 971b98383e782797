#!/usr/bin/env bash
# `npm start`: build if needed, then serve the default device on the default socket and print the
# QEMU command line that attaches it. Arguments are passed to `serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
npx tsc -p tsconfig.json
exec node dist/src/cli.js serve "$@"
