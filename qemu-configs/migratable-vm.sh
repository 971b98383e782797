#!/usr/bin/env bash
# A VM that `nvme-vfio-user migrate` can move: its NVMe drive is a provisioned secondary (see the
# README, "Provisioning a secondary controller"), and QMP listens where the orchestrator can reach it.
#
# Source:       QMP=/run/vm1/src.qmp SOCK=/tmp/nvu-a/vm1.sock ./migratable-vm.sh
# Destination:  QMP=/run/vm1/dst.qmp SOCK=/tmp/nvu-b/vm1.sock INCOMING=1 ./migratable-vm.sh
#               (same options: it waits paused, -incoming defer -S, for the migration stream)
# Then:         nvme-vfio-user migrate --source-qmp unix:/run/vm1/src.qmp --source-control /tmp/nvu-a/control.sock \
#                 --target-qmp unix:/run/vm1/dst.qmp --target-control /tmp/nvu-b/control.sock --uri tcp:127.0.0.1:49152
# For another host, QMP on TCP: QMP=tcp:ADDR:PORT (the orchestrator takes tcp:ADDR:PORT too).
set -euo pipefail
QEMU=${QEMU:-qemu-system-x86_64}
SOCK=${SOCK:?the socket of the exported secondary}
QMP=${QMP:?where QMP listens (a path, or tcp:ADDR:PORT)}
MEM=${MEM:-1G}
ACCEL=${ACCEL:-tcg}   # kvm where /dev/kvm really runs Linux guests; the same on both sides
case "$QMP" in tcp:*) qmp="$QMP,server=on,wait=off" ;; *) qmp="unix:$QMP,server=on,wait=off" ;; esac
exec "$QEMU" \
  -machine q35,memory-backend=mem -accel "$ACCEL" -cpu max -smp 2 -m "$MEM" \
  -object memory-backend-memfd,id=mem,size="$MEM",share=on \
  -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$SOCK\",\"type\":\"unix\"}}" \
  -qmp "$qmp" -nographic -serial mon:stdio \
  ${INCOMING:+-incoming defer -S} \
  ${KERNEL:+-kernel "$KERNEL"} ${INITRD:+-initrd "$INITRD"} ${APPEND:+-append "$APPEND"} \
  ${EXTRA:-}
