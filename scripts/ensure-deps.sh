#!/usr/bin/env bash
# Installs npm dependencies and builds the native addon when they are missing or stale.
# Idempotent and quiet when everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=node_modules/.nvu-deps-stamp
want=$(sha256sum package.json package-lock.json | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[deps] npm ci (builds the native addon with cmake-js)" >&2
  npm ci --no-audit --no-fund >&2
  echo "$want" > "$stamp"
fi
if [ ! -f build/native/Release/vfio_native.node ] || [ -n "$(find native -newer build/native/Release/vfio_native.node -type f | head -n1)" ]; then
  echo "[deps] building the native addon" >&2
  npm run --silent build:native >&2
fi
