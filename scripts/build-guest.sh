#!/usr/bin/env bash
# Builds the Linux test guest from Debian trixie packages only (apt-get download
# + dpkg -x with a private apt setup; nothing is installed on the machine):
#   $CACHE/guest/vmlinuz        Debian's linux-image-*-amd64 kernel
#   $CACHE/guest/initramfs.img  busybox-static, nvme-cli, fio (+ their libraries,
#                               heavy optional fio backends replaced by stubs),
#                               the nvme/virtio modules, /init = guest-init.sh
# Idempotent: a second run only checks the stamp (offline-capable).
set -euo pipefail
SCRIPT_VERSION=1
LOG_TAG=build-guest
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
take_lock harness

GDIR=$CACHE/guest
WORK=$GDIR/work
# Modules wanted in the guest (dependencies are resolved from modules.dep);
# missing or built-in ones are skipped.
MODULES=(nvme virtio_pci virtio_blk virtio_console)
# Packages whose files the initramfs draws from (their closure is downloaded).
PACKAGES=(busybox-static nvme-cli fio kmod)
# Shared libraries that fio/nvme link with but that the guest never uses:
# replaced by stub libraries with the same soname and symbol versions.
STUB_RE='^lib(rbd|rados|gfapi|glusterfs|gfrpc|gfxdr|nbd|nfs|ibverbs|rdmacm|pmem|pmem2|curl|rpma)\.so\.'
# Binaries copied into the guest (path inside the unpacked packages).
GUEST_BINS=(usr/bin/busybox usr/sbin/nvme usr/bin/fio)

guest_inputs_hash() {
    cat "$HERE/build-guest.sh" "$HERE/guest-init.sh" "$HERE/lib.sh" | sha256sum | cut -c1-16
}
WANT_STAMP="build-guest v$SCRIPT_VERSION $(guest_inputs_hash)"

if [[ -f $GDIR/stamp && "$(cat "$GDIR/stamp")" == "$WANT_STAMP" && -s $GDIR/vmlinuz && -s $GDIR/initramfs.img ]]; then
    log "up to date: $GDIR/vmlinuz $GDIR/initramfs.img ($(du -h "$GDIR/initramfs.img" | cut -f1))"
    exit 0
fi

need_host_tool apt-get apt-cache dpkg-deb readelf gcc gzip xz sha256sum
[[ -f $HERE/guest-init.sh ]] || die "$HERE/guest-init.sh missing"
apt_private_setup
apt_private_update

# ---------------------------------------------------------------- packages
KPKG=$(papt_cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n $KPKG ]] || die "cannot resolve the kernel package that trixie's linux-image-amd64 depends on"
log "kernel package: $KPKG"
KDEB=$(apt_download_only "$KPKG")
mapfile -t DEBS < <(apt_closure_debs "${PACKAGES[@]}")

rm -rf "$WORK" "$GDIR/stamp"
mkdir -p "$WORK"
PKGROOT=$WORK/pkgroot KROOT=$WORK/kroot STAGE=$WORK/initramfs
# Only the wanted packages and shared-library packages matter (the closure also
# holds python3, perl, systemd... pulled in by fio's and nvme-cli's dependencies).
UNPACK=() REST=()
for d in "${DEBS[@]}"; do
    p=${d##*/}; p=${p%%_*}
    if printf '%s\n' "${PACKAGES[@]}" | grep -qxF "$p" \
        || [[ $p == zlib1g ]] || [[ $p == lib* && ! $p =~ ^lib(python|perl|systemd-shared|sqlite|db5|gnutls|ncurses|readline|pam-|apt-pkg|debconf|semanage|sepol|gdbm|tasn|p11|unistring|idn2|hogweed|nettle|gmp|ffi|expat|mpdec|lzma|bz2|krb|k5crypto|gssapi) ]]; then
        UNPACK+=("$d")
    else
        REST+=("$d")
    fi
done
log "unpacking ${#UNPACK[@]} of ${#DEBS[@]} packages"
unpack_debs "$PKGROOT" "${UNPACK[@]}"
log "unpacking the kernel"
mkdir -p "$KROOT"
# Only the kernel image and the module tree are needed.
dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$KROOT" --wildcards './boot/vmlinuz-*' '*/lib/modules/*' \
    || die "unpacking $KDEB failed"
merge_usr "$KROOT"
KIMG=$(ls "$KROOT"/boot/vmlinuz-* 2>/dev/null | head -n1)
[[ -n $KIMG ]] || die "no vmlinuz in $KDEB"
KVER=${KIMG##*/vmlinuz-}
MODDIR=$KROOT/usr/lib/modules/$KVER
[[ -d $MODDIR ]] || die "no module tree for $KVER in $KDEB"

PLIB=$PKGROOT/usr/lib/x86_64-linux-gnu
PLD=$PLIB/ld-linux-x86-64.so.2
[[ -e $PLD ]] || die "no dynamic loader in the unpacked packages"
# Run a binary of the unpacked packages with their own loader and libraries.
prun() { local argv0=$1 bin=$2; shift 2; "$PLD" --library-path "$PLIB" --argv0 "$argv0" "$bin" "$@"; }

# ---------------------------------------------------------------- modules
log "depmod $KVER"
prun depmod "$PKGROOT/usr/bin/kmod" -b "$KROOT/usr" "$KVER" 2>/dev/null \
    || prun depmod "$PKGROOT/usr/bin/kmod" -b "$KROOT" "$KVER" \
    || die "depmod failed"
[[ -s $MODDIR/modules.dep ]] || die "depmod produced no modules.dep"

declare -A SEEN=()
LOAD_ORDER=()
add_module() { # relative path from modules.dep, then its deps first
    local rel=$1
    [[ -n ${SEEN[$rel]:-} ]] && return 0
    SEEN[$rel]=1
    local deps d
    deps=$(awk -v m="$rel:" '$1 == m { $1=""; print; exit }' "$MODDIR/modules.dep")
    local arr=($deps) i
    # modules.dep lists the transitive dependencies; load them last-first.
    for (( i=${#arr[@]}-1; i>=0; i-- )); do add_module "${arr[i]}"; done
    LOAD_ORDER+=("$rel")
}
for m in "${MODULES[@]}"; do
    pat=${m//_/[-_]}
    rel=$(grep -E "(^|/)${pat}\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep" | head -n1 | cut -d: -f1 || true)
    if [[ -z $rel ]]; then
        if grep -qE "(^|/)${pat}\.ko$" "$MODDIR/modules.builtin" 2>/dev/null; then
            log "module $m is built into the kernel"
        else
            log "module $m not found in $KVER (skipped)"
        fi
        continue
    fi
    add_module "$rel"
done
log "modules (load order): $(for r in "${LOAD_ORDER[@]}"; do b=${r##*/}; printf '%s ' "${b%%.ko*}"; done)"

mkdir -p "$STAGE"/usr/{bin,sbin,lib/x86_64-linux-gnu,lib64} "$STAGE"/{etc,proc,sys,dev,tmp,run,root,mnt,nvtest}
for d in bin sbin lib lib64; do ln -s "usr/$d" "$STAGE/$d"; done
GMOD=$STAGE/usr/lib/modules/$KVER
mkdir -p "$GMOD"
: > "$GMOD/load-order"
for rel in "${LOAD_ORDER[@]}"; do
    out=${rel%.xz}; out=${out%.zst}; out=${out%.gz}
    mkdir -p "$GMOD/$(dirname "$out")"
    case $rel in
        *.xz)  xz -dc "$MODDIR/$rel" > "$GMOD/$out" ;;
        *.zst) zstd -qdc "$MODDIR/$rel" > "$GMOD/$out" ;;
        *.gz)  gzip -dc "$MODDIR/$rel" > "$GMOD/$out" ;;
        *)     cp "$MODDIR/$rel" "$GMOD/$out" ;;
    esac
    echo "$out" >> "$GMOD/load-order"
done
cp "$MODDIR"/modules.builtin "$MODDIR"/modules.order "$GMOD/" 2>/dev/null || true
[[ -f $MODDIR/modules.builtin.modinfo ]] && cp "$MODDIR/modules.builtin.modinfo" "$GMOD/"
prun depmod "$PKGROOT/usr/bin/kmod" -b "$STAGE/usr" "$KVER" 2>/dev/null || prun depmod "$PKGROOT/usr/bin/kmod" -b "$STAGE" "$KVER" \
    || die "depmod of the guest module tree failed"

# ---------------------------------------------------------------- binaries + libraries
# Resolve ELF NEEDED entries recursively inside the unpacked packages only.
find_lib() { # soname -> path inside PKGROOT
    local so=$1 d
    for d in "$PLIB" "$PKGROOT/usr/lib" "$PKGROOT/usr/lib/x86_64-linux-gnu/ceph"; do
        [[ -e $d/$so ]] && { echo "$d/$so"; return 0; }
    done
    return 1
}
declare -A NEEDED_CACHE=()
needed() {
    [[ -n ${NEEDED_CACHE[$1]+x} ]] || NEEDED_CACHE[$1]=$(readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    [[ -z ${NEEDED_CACHE[$1]} ]] || printf '%s\n' "${NEEDED_CACHE[$1]}"
}

declare -A LIBS=() STUBS=()
QUEUE=()
for b in "${GUEST_BINS[@]}"; do
    [[ -f $PKGROOT/$b ]] || die "$b missing from the unpacked packages"
    install -D -m 0755 "$PKGROOT/$b" "$STAGE/$b"
    QUEUE+=("$PKGROOT/$b")
done
while (( ${#QUEUE[@]} )); do
    f=${QUEUE[0]}; QUEUE=("${QUEUE[@]:1}")
    needed "$f" >/dev/null
    for so in ${NEEDED_CACHE[$f]}; do
        [[ -n ${LIBS[$so]:-} || -n ${STUBS[$so]:-} ]] && continue
        if ! p=$(find_lib "$so") && (( ${#REST[@]} )); then
            log "$so not found in the library packages: unpacking the other ${#REST[@]}"
            unpack_debs "$PKGROOT" "${REST[@]}"
            REST=()
        fi
        p=$(find_lib "$so") || die "library $so (needed by ${f#"$PKGROOT"/}) is not in the unpacked packages"
        if [[ $so =~ $STUB_RE ]]; then
            STUBS[$so]=$p
        else
            LIBS[$so]=$p
            QUEUE+=("$p")
        fi
    done
done
for so in "${!LIBS[@]}"; do
    cp -L "${LIBS[$so]}" "$STAGE/usr/lib/x86_64-linux-gnu/$so"
done
cp -L "$PLD" "$STAGE/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
ln -sf ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$STAGE/usr/lib64/ld-linux-x86-64.so.2"
ln -sf ../sbin/nvme "$STAGE/usr/bin/nvme"
ln -sf busybox "$STAGE/usr/bin/sh"
log "libraries: ${!LIBS[*]}"

# Stub libraries: for each stubbed soname, define exactly the symbols that the
# shipped binaries import from it (taken from the real library's dynamic symbol
# table, with their versions), plus every version node they require.
SDIR=$WORK/stubs
mkdir -p "$SDIR"
for so in "${!STUBS[@]}"; do
    real=${STUBS[$so]}
    users=()
    for u in "${GUEST_BINS[@]/#/$PKGROOT/}" "${LIBS[@]}"; do
        [[ $'\n'${NEEDED_CACHE[$u]:-}$'\n' == *$'\n'"$so"$'\n'* ]] && users+=("$u")
    done
    # Version nodes required from this soname.
    vers=$(for u in "${users[@]}"; do
        readelf -V -W "$u" | awk -v so="$so" '
            /File:/ { cur = ($0 ~ ("File: " so "( |$)")) }
            cur && /Name:/ { for (i=1;i<=NF;i++) if ($i=="Name:") print $(i+1) }'
    done | sort -u)
    # Undefined imports (name[@version]) of the users.
    imports=$(for u in "${users[@]}"; do
        readelf --dyn-syms -W "$u" | awk '$7=="UND" && $8!="" { n=$8; sub(/ \(.*/,"",n); print n }'
    done | sort -u)
    # Defined symbols of the real library: name type size (version stripped).
    defs=$(readelf --dyn-syms -W "$real" | awk '$7!="UND" && $7!="Ndx" && $8!="" && ($4=="FUNC"||$4=="OBJECT"||$4=="IFUNC"||$4=="NOTYPE") {
            n=$8; sub(/@.*/,"",n); print n, $4, $3 }' | sort -u -k1,1)
    c=$SDIR/${so}.c map=$SDIR/${so}.map
    printf '%s\n' "$vers" > "$SDIR/$so.vers"
    printf '%s\n' "$imports" > "$SDIR/$so.imports"
    printf '%s\n' "$defs" > "$SDIR/$so.defs"
    # One pass: C definitions for the imports the real library defines, and a
    # version script with every required version node.
    awk -v cfile="$c" -v mapfile="$map" '
        FILENAME ~ /\.vers$/    { if ($1 != "") { vers[$1] = 1; order[++nv] = $1 } ; next }
        FILENAME ~ /\.defs$/    { if ($1 != "") { type[$1] = $2; size[$1] = $3 } ; next }
        FILENAME ~ /\.imports$/ {
            if ($1 == "") next
            name = $1; ver = ""
            if (index(name, "@")) { ver = substr(name, index(name, "@") + 1); name = substr(name, 1, index(name, "@") - 1) }
            if (ver != "" && !(ver in vers)) next
            if (!(name in type) || (name in done)) next
            done[name] = 1
            if (type[name] == "OBJECT") {
                sz = size[name] + 0; if (sz <= 0) sz = 8
                printf "char %s[%d] __attribute__((aligned(16)));\n", name, sz > cfile
            } else {
                printf "void %s(void) { __builtin_trap(); }\n", name > cfile
            }
            key = (ver != "") ? ver : order[1]
            syms[key] = syms[key] name "; "
        }
        END {
            printf "" > cfile
            for (i = 1; i <= nv; i++) {
                v = order[i]
                if (syms[v] != "") printf "%s { global: %s };\n", v, syms[v] > mapfile
                else printf "%s { };\n", v > mapfile
            }
        }' "$SDIR/$so.vers" "$SDIR/$so.defs" "$SDIR/$so.imports"
    if [[ -n $vers ]]; then
        vsarg=(-Wl,--version-script="$map")
    else
        vsarg=()
    fi
    echo "/* stub for $so */" >> "$c"
    gcc -shared -fPIC -nostdlib -O0 -o "$STAGE/usr/lib/x86_64-linux-gnu/$so" -Wl,-soname,"$so" "${vsarg[@]}" "$c" \
        || die "building the stub $so failed"
done
log "stubs: ${!STUBS[*]}"

install -m 0755 "$HERE/guest-init.sh" "$STAGE/init"
echo "$KVER" > "$STAGE/etc/nvtest-kernel"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$STAGE/etc/passwd"
printf 'root:x:0:\n' > "$STAGE/etc/group"

# Quick sanity check on the host: the guest binaries must resolve with the
# guest's own loader and libraries (catches a missing library or stub symbol).
for b in usr/sbin/nvme usr/bin/fio; do
    "$STAGE/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$STAGE/usr/lib/x86_64-linux-gnu" \
        "$STAGE/$b" --version >/dev/null 2>"$WORK/check.err" \
        || { cat "$WORK/check.err" >&2; die "$b does not run with the guest's libraries"; }
done

# ---------------------------------------------------------------- images
log "writing initramfs"
BB=$PKGROOT/usr/bin/busybox
( cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | "$BB" cpio -o -H newc 2>/dev/null ) | gzip -6n > "$GDIR/initramfs.img.tmp"
cp "$KIMG" "$GDIR/vmlinuz.tmp"
mv "$GDIR/vmlinuz.tmp" "$GDIR/vmlinuz"
mv "$GDIR/initramfs.img.tmp" "$GDIR/initramfs.img"
echo "$KVER" > "$GDIR/kernel-version"
# Keep the small staging tree for inspection; drop the big unpacked trees.
rm -rf "$KROOT" "$PKGROOT" "$SDIR"
echo "$WANT_STAMP" > "$GDIR/stamp"
log "ready: kernel $KVER ($(du -h "$GDIR/vmlinuz" | cut -f1)), initramfs $(du -h "$GDIR/initramfs.img" | cut -f1)"
