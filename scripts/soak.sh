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
# -t is a regular expression over "describe > it" names: the MSI-X VM's hops, whatever its title says between.
NVU_MIGRATION_HOPS=$hops npx vitest run test/e2e/live-migration.test.ts -t "with MSI-X .* migrates back and forth" \
  --testTimeout=0 --hookTimeout=0 2>&1 | tee "$log" || status=$?
# The summary judges too: fewer hops or rounds than asked (a filter that matched no test) fail the soak.
verdict=0
node scripts/soak-summary.mjs "$log" "$hops" "$status" > bench/results/soak.md || verdict=$?
cat bench/results/soak.md
(( status != 0 )) || status=$verdict
exit "$status"
