#!/usr/bin/env bash
# `npm run soak -- N`: the live-migration end-to-end test with N hops (default 200) instead of CI's
# 5: a VM under verified I/O moves between two QEMU processes N times. The whole log goes to
# bench/results/soak.log and a summary of every hop's figures to bench/results/soak.md.
set -euo pipefail
cd "$(dirname "$0")/.."
hops=${1:-200}
[[ $hops =~ ^[0-9]+$ ]] && (( hops > 0 )) || { echo "soak: hops must be a positive number, got '$hops'" >&2; exit 2; }
bash scripts/ensure-deps.sh
bash scripts/setup-qemu.sh >&2
bash scripts/build-guest.sh >&2
mkdir -p bench/results
log=bench/results/soak.log
status=0
NVU_MIGRATION_HOPS=$hops npx vitest run test/e2e/live-migration.test.ts -t "MSI-X migrates back and forth" \
  --testTimeout=0 --hookTimeout=0 2>&1 | tee "$log" || status=$?
node scripts/soak-summary.mjs "$log" "$hops" "$status" > bench/results/soak.md
cat bench/results/soak.md
exit "$status"
