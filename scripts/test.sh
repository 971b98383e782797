#!/usr/bin/env bash
# The project's whole test suite: unit, integration (real sockets) and end-to-end (real QEMU 11 +
# a real Linux guest). Installs what it needs into ~/.cache/nvme-vfio-user on the first run.
# Extra arguments go to vitest (e.g. a file filter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
echo "[test] QEMU and guest harness" >&2
bash scripts/setup-qemu.sh >&2
bash scripts/build-guest.sh >&2
bash scripts/ensure-tools.sh
echo "[test] typecheck" >&2
npx tsc -p tsconfig.json --noEmit
npx tsc -p tsconfig.tests.json
report=$(mktemp)
trap 'rm -f "$report"' EXIT
status=0
npx vitest run --reporter=default --reporter=json --outputFile="$report" "$@" || status=$?
# One plain closing line, counted from vitest's own report.
node -e '
const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
const skipped = r.numPendingTests + r.numTodoTests;
console.log(`${r.numPassedTests} passed, ${r.numFailedTests} failed` + (skipped ? `, ${skipped} skipped` : ""));
if (r.numTotalTests === 0) { console.error("no tests ran"); process.exit(1); }
' "$report" || status=1
exit $status
