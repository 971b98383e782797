#!/usr/bin/env bash
# System tools the end-to-end tests use beyond Node and the project's own QEMU: iproute2 (network
# namespaces for the cross-host migration test). Installed from Debian's apt only when missing.
set -euo pipefail
if ! command -v ip >/dev/null 2>&1; then
  echo "[tools] installing iproute2 (network namespaces for the cross-host migration test)" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "[tools] iproute2 is missing and this user cannot install it: run 'apt-get install iproute2' as root" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get -qq update >&2
  DEBIAN_FRONTEND=noninteractive apt-get -qq install -y iproute2 >&2
fi
