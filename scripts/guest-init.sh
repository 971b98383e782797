#!/bin/sh
# /init of the test guest's initramfs (busybox sh). Built in by build-guest.sh.
#
#  - mounts proc, sys, devtmpfs, devpts, tmpfs on /tmp and /run
#  - loads the modules listed in /lib/modules/$(uname -r)/load-order
#  - waits (bounded) for the NVMe / virtio-blk PCI functions' devices
#  - runs the test script: /nvtest/script.sh (from an appended cpio) or the
#    base64 text of `nvtest.script=` on the kernel command line
#  - prints @@NVTEST-BEGIN@@, the script's output, @@NVTEST-EXIT <rc>@@ on the
#    console (ttyS0), kernel warnings after that, then powers off.
# Kernel parameters read from /proc/cmdline:
#   nvtest.script=<base64>   the script (when no /nvtest/script.sh)
#   nvtest.wait=<seconds>    device wait bound (default 15)
#   nvtest.dmesg=all|warn|none   kernel log printed after the exit marker (default warn)
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s /usr/bin 2>/dev/null
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu
export HOME=/root TERM=dumb
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm 2>/dev/null

# busybox has no lspci: a minimal one from sysfs (slot class vendor:device [driver]).
if [ ! -e /usr/bin/lspci ]; then
    cat > /usr/bin/lspci <<'LSPCI'
#!/bin/sh
for d in /sys/bus/pci/devices/*; do
    drv=""
    [ -e "$d/driver" ] && drv=" [$(basename "$(readlink "$d/driver")")]"
    c=$(cat "$d/class"); v=$(cat "$d/vendor"); p=$(cat "$d/device")
    echo "${d##*/} ${c#0x} ${v#0x}:${p#0x}$drv"
done
LSPCI
    chmod +x /usr/bin/lspci
fi

CON=/dev/ttyS0
[ -c "$CON" ] || CON=/dev/console
exec 0</dev/null >"$CON" 2>&1

say() { echo "nvtest-init: $*"; }

finish() {
    sync
    poweroff -f
    # poweroff should not return; panic=-1 + -no-reboot end QEMU if it does.
    exit "${1:-0}"
}

CMDLINE=$(cat /proc/cmdline)
param() { # value of key=... on the kernel command line
    for w in $CMDLINE; do
        case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

# Quiet console while the script runs: kernel messages would interleave with
# its output. Warnings are printed after the exit marker instead.
dmesg -n 1 2>/dev/null

KVER=$(uname -r)
if [ -f "/lib/modules/$KVER/load-order" ]; then
    while read -r m; do
        [ -n "$m" ] || continue
        name=${m##*/}; name=${name%.ko}
        # insmod does not read the kernel command line as modprobe does: hand it the module's
        # own `module.param=value` words (e.g. nvme_core.io_timeout=5).
        key=$(echo "$name" | tr - _)
        opts=""
        for w in $CMDLINE; do
            case "$w" in "$key".*=*|"$name".*=*) opts="$opts ${w#*.}" ;; esac
        done
        # Already loaded (or built in)? insmod then fails harmlessly.
        insmod "/lib/modules/$KVER/$m" $opts 2>/tmp/insmod.err || {
            grep -q 'File exists' /tmp/insmod.err || say "insmod $name failed: $(cat /tmp/insmod.err)"
        }
    done < "/lib/modules/$KVER/load-order"
fi

# Wait for the devices of NVMe (class 010802) and virtio-blk functions.
WAIT=$(param nvtest.wait || echo 15)
devices_ready() {
    for d in /sys/bus/pci/devices/*; do
        [ -e "$d/class" ] || continue
        cls=$(cat "$d/class")
        case "$cls" in
        0x010802)
            [ -e "$d/driver" ] || return 1
            ctrl=$(ls -d "$d"/nvme/nvme* 2>/dev/null | head -n1)
            [ -n "$ctrl" ] || return 1
            st=$(cat "$ctrl/state" 2>/dev/null)
            case "$st" in
            live)
                c=${ctrl##*/}
                [ -c "/dev/$c" ] || return 1
                # Namespaces are scanned after the controller goes live: give
                # a controller without namespaces a short grace period.
                if ! ls -d "$ctrl"/nvme*n* >/dev/null 2>&1 && ! ls -d /sys/block/"$c"n* >/dev/null 2>&1; then
                    [ "$ELAPSED" -ge "$((LIVE_AT + 2))" ] || { [ "$LIVE_AT" -eq 0 ] && LIVE_AT=$ELAPSED; return 1; }
                fi
                for b in /sys/block/"$c"n*; do
                    [ -e "$b" ] || continue
                    [ -b "/dev/${b##*/}" ] || return 1
                done ;;
            dead|deleting|deleting*) ;;
            *) return 1 ;;
            esac ;;
        *)
            ven=$(cat "$d/vendor"); dev=$(cat "$d/device")
            if [ "$ven" = 0x1af4 ] && { [ "$dev" = 0x1001 ] || [ "$dev" = 0x1042 ]; }; then
                ls -d "$d"/virtio*/block/* >/dev/null 2>&1 || return 1
            fi ;;
        esac
    done
    return 0
}
ELAPSED=0 LIVE_AT=0
TICKS=$((WAIT * 10))
i=0
while ! devices_ready; do
    i=$((i + 1))
    ELAPSED=$((i / 10))
    if [ "$i" -ge "$TICKS" ]; then
        say "timed out after ${WAIT}s waiting for NVMe/virtio block devices"
        break
    fi
    sleep 0.1
done

# The script: an appended cpio wins over the command line.
SCRIPT=/nvtest/script.sh
if [ ! -s "$SCRIPT" ]; then
    mkdir -p /nvtest
    if B64=$(param nvtest.script); then
        echo "$B64" | base64 -d > "$SCRIPT" 2>/tmp/b64.err || say "bad base64 in nvtest.script: $(cat /tmp/b64.err)"
    else
        say "no script (nvtest.script= or /nvtest/script.sh)"
        : > "$SCRIPT"
    fi
fi

cd /root
echo "@@NVTEST-BEGIN@@"
sh "$SCRIPT" </dev/null 2>&1
RC=$?
echo "@@NVTEST-EXIT $RC@@"

case "$(param nvtest.dmesg || echo warn)" in
all)  dmesg ;;
none) ;;
*)    dmesg -r 2>/dev/null | grep '^<[0-4]>' ;;
esac
finish "$RC"
