#!/usr/bin/env bash
# `npm start`: build if needed, then serve the default device on the default socket and print the
# QEMU command line that attaches it. Arguments are passed to `serve`; relative paths in them are
# relative to where the user ran npm (INIT_CWD), not to this repository.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
bash scripts/ensure-deps.sh
npm run --silent build
cd "${INIT_CWD:-$repo}"
exec node "$repo/dist/src/bin/nvme-vfio-user.js" serve "$@"
