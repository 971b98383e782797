#!/usr/bin/env bash
# `npm run soak -- N`: the live-migration end-to-end test with N hops (default 200) instead of CI's
# 5: a VM under verified I/O moves between two QEMU processes N times.
set -euo pipefail
cd "$(dirname "$0")/.."
hops=${1:-200}
[[ $hops =~ ^[0-9]+$ ]] && (( hops > 0 )) || { echo "soak: hops must be a positive number, got '$hops'" >&2; exit 2; }
bash scripts/ensure-deps.sh
bash scripts/setup-qemu.sh >&2
bash scripts/build-guest.sh >&2
NVU_MIGRATION_HOPS=$hops exec npx vitest run test/e2e/live-migration.test.ts -t "MSI-X migrates back and forth" --testTimeout=0 --hookTimeout=0
