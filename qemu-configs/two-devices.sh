#!/usr/bin/env bash
# Two vfio-user devices, one per server socket. Start both servers first:
#   nvme-vfio-user serve --socket /tmp/nvme-vfio-user/ctrl0.sock &
#   nvme-vfio-user serve --socket /tmp/nvme-vfio-user/ctrl1.sock &
set -euo pipefail
QEMU=${QEMU:-qemu-system-x86_64}
SOCK0=${SOCK0:-/tmp/nvme-vfio-user/ctrl0.sock}
SOCK1=${SOCK1:-/tmp/nvme-vfio-user/ctrl1.sock}
MEM=${MEM:-1G}
ACCEL=${ACCEL:-tcg}
exec "$QEMU" \
  -machine q35,memory-backend=mem -accel "$ACCEL" -cpu max -smp 2 -m "$MEM" \
  -object memory-backend-memfd,id=mem,size="$MEM",share=on \
  -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$SOCK0\",\"type\":\"unix\"}}" \
  -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$SOCK1\",\"type\":\"unix\"}}" \
  -nographic -serial mon:stdio \
  ${KERNEL:+-kernel "$KERNEL"} ${INITRD:+-initrd "$INITRD"} ${APPEND:+-append "$APPEND"} \
  ${EXTRA:-}
