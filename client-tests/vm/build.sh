#!/bin/bash
# Builds (or finds up to date) the VM image for the nbd.ko tests:
#   client-tests/.cache/vm-image/vmlinux        uncompressed kernel, booted via PVH
#   client-tests/.cache/vm-image/initramfs.cpio busybox, nbd-client, mkfs/fsck
#                                               tools with their libraries, and
#                                               the kernel modules they need
# from a Debian kernel package fetched with `apt-get download` and cached
# next to it (client-tests/.cache/ is gitignored).  The image is rebuilt only
# when its inputs change: this script, vm/init, the kernel package, or the
# host's installed packages (the tools and libraries are copied from the host).
#
# Environment: KERNEL_PKG (default linux-image-6.1.0-56-amd64; if the archive
# no longer has it and it is not cached, the current ABI of linux-image-amd64
# is used instead).

set -euo pipefail
trap 'echo "vm/build.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=$(cd "$VM_DIR/.." && pwd)/.cache
OUT=$CACHE/vm-image
KERNEL_PKG=${KERNEL_PKG:-linux-image-6.1.0-56-amd64}

# Guest tools besides busybox: the NBD client, the filesystem tools, the
# util-linux tools busybox has no full version of, and ss (per-connection
# byte counters for the multi-conn check).
GUEST_TOOLS=(nbd-client mkfs.ext4 mke2fs e2fsck mkfs.xfs xfs_repair mkfs.btrfs btrfs
    blkdiscard blockdev fstrim ss)
# Modules, before their depends= closure.  Softdeps are not in depends=:
# ext4 and libcrc32c want crypto-crc32c, btrfs also xxhash64 and blake2b-256
# (sha256 is built in).  tcp_diag serves ss.
GUEST_MODULES=(nbd virtio_pci virtio_net ext4 xfs btrfs crc32c_generic crc32c_intel
    xxhash_generic blake2b_generic tcp_diag)

mkdir -p "$CACHE"

# --------------------------------------------------------- kernel package

# cached_deb PACKAGE: the cached .deb of PACKAGE, if any.
cached_deb() {
    compgen -G "$CACHE/$1_*_amd64.deb" | sort -V | tail -n 1 | grep .
}

download_deb() {
    echo "vm: apt-get download $1" >&2
    (cd "$CACHE" && apt-get -q -o APT::Sandbox::User=root download "$1" >&2)
}

find_deb() {
    local deb current
    deb=$(cached_deb "$KERNEL_PKG") && { echo "$deb"; return; }
    if download_deb "$KERNEL_PKG"; then
        cached_deb "$KERNEL_PKG"
        return
    fi
    # Old ABI packages leave the archive; fall back to the current one.
    current=$(apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | tail -n 1)
    if [[ -z $current ]]; then
        echo "vm: cannot find $KERNEL_PKG nor linux-image-amd64's current kernel (apt-get update?)" >&2
        return 1
    fi
    echo "vm: $KERNEL_PKG is not available; using $current (set KERNEL_PKG=$current to pin it)" >&2
    deb=$(cached_deb "$current") && { echo "$deb"; return; }
    download_deb "$current"
    cached_deb "$current"
}

DEB=$(find_deb)

# The stamp covers every input; dpkg's status file changes whenever a host
# package (and so a copied tool or library) is installed or upgraded.
STAMP=$(cat "$VM_DIR/build.sh" "$VM_DIR/init" <(basename "$DEB") \
    <(stat -c %Y /var/lib/dpkg/status) | sha256sum | cut -d' ' -f1)
if [[ -f $OUT/stamp && $(cat "$OUT/stamp") == "$STAMP" ]]; then
    exit 0
fi

echo "vm: building the VM image from $(basename "$DEB")" >&2
T0=$SECONDS
TMP=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
dpkg-deb -x "$DEB" "$TMP/deb"
KVER=$(basename "$(compgen -G "$TMP/deb/boot/vmlinuz-*")")
KVER=${KVER#vmlinuz-}
MODDIR=$TMP/deb/lib/modules/$KVER
mkdir -p "$TMP/out"

# ------------------------------------------------ vmlinux for the PVH boot
# qemu boots an uncompressed ELF vmlinux through its PVH note, skipping the
# bzImage's in-guest decompression (~4.5 s under TCG).  The compressed
# payload sits at (setup_sects+1)*512 + payload_offset, payload_length bytes
# long (setup header fields at 0x1f1 (u8), 0x248 and 0x24c (u32)).
extract_vmlinux() {
    local bz=$1 sects off len
    sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz")
    off=$(od -An -tu4 -j $((0x248)) -N4 "$bz")
    len=$(od -An -tu4 -j $((0x24c)) -N4 "$bz")
    off=$(((sects + 1) * 512 + off))
    [[ $(od -An -tx1 -j "$off" -N4 "$bz" | tr -d ' ') == fd377a58 ]] ||
        { echo "vm: kernel payload is not xz" >&2; return 1; }
    # --single-stream: the payload ends with a 4-byte size trailer.
    dd if="$bz" iflag=skip_bytes,count_bytes skip="$off" count=$((len)) bs=1M status=none |
        xz -dc --single-stream
}
extract_vmlinux "$TMP/deb/boot/vmlinuz-$KVER" >"$TMP/out/vmlinux"
[[ $(head -c 4 "$TMP/out/vmlinux" | od -An -tx1 | tr -d ' ') == 7f454c46 ]] ||
    { echo "vm: extracted vmlinux is not an ELF file" >&2; exit 1; }

# --------------------------------------------------------- initramfs tree
ROOT=$TMP/root
mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib,usr/lib64,dev,proc,sys,tmp,etc,job}
# Merged /usr, so the paths ldd prints (/lib/x86_64-linux-gnu/...,
# /lib64/ld-linux-x86-64.so.2) resolve.
for d in bin sbin lib lib64; do ln -s "usr/$d" "$ROOT/$d"; done

# copy_path PATH: copy PATH into ROOT at the same place, following its
# symlink chain (each link and the final file).
copy_path() {
    local p=$1 target
    while [[ -L $p ]]; do
        target=$(readlink "$p")
        mkdir -p "$ROOT$(dirname "$p")"
        [[ -e $ROOT$p || -L $ROOT$p ]] || ln -s "$target" "$ROOT$p"
        [[ $target == /* ]] || target=$(dirname "$p")/$target
        p=$target
    done
    mkdir -p "$ROOT$(dirname "$p")"
    [[ -e $ROOT$p ]] || cp "$p" "$ROOT$p"
}

declare -A LIBS=()
for tool in "${GUEST_TOOLS[@]}"; do
    path=$(PATH=/usr/sbin:/usr/bin command -v "$tool") ||
        { echo "vm: $tool not found on the host" >&2; exit 1; }
    copy_path "$path"
    while read -r lib; do LIBS[$lib]=1; done < <(ldd "$path" |
        awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
done
# glibc dlopen()s libgcc_s for pthread cancellation (xfsprogs and
# btrfs-progs are threaded); ldd does not show it.
LIBS[$(ldconfig -p | awk '/libgcc_s\.so\.1 .*x86-64/ { lib = $NF } END { print lib }')]=1
for lib in "${!LIBS[@]}"; do copy_path "$lib"; done
# mke2fs's feature defaults.
cp /etc/mke2fs.conf "$ROOT/etc/"

# busybox for everything else; its applet links go only where no real tool
# was copied.
cp /bin/busybox "$ROOT/usr/bin/busybox"
while read -r applet; do
    [[ -e $ROOT/$applet || -L $ROOT/$applet ]] || ln -s /usr/bin/busybox "$ROOT/$applet"
done < <("$ROOT/usr/bin/busybox" --list-full)

cp "$VM_DIR/init" "$ROOT/init"
chmod 755 "$ROOT/init"
mknod "$ROOT/dev/console" c 5 1

# ----------------------------------------------------------------- modules
declare -A KO=() WANT=()
while read -r ko; do
    name=$(basename "$ko" .ko)
    KO[${name//-/_}]=$ko
done < <(find "$MODDIR/kernel" -name '*.ko')
[[ ${#KO[@]} -gt 0 ]] || { echo "vm: no uncompressed .ko modules in $(basename "$DEB")" >&2; exit 1; }

add_module() {
    local m=${1//-/_} dep
    [[ -z ${WANT[$m]:-} ]] || return 0
    [[ -n ${KO[$m]:-} ]] || { echo "vm: module $m not in $(basename "$DEB")" >&2; exit 1; }
    WANT[$m]=1
    for dep in $(tr '\0' '\n' <"${KO[$m]}" | sed -n 's/^depends=//p' | tr ',' ' '); do
        add_module "$dep"
    done
}
for m in "${GUEST_MODULES[@]}"; do add_module "$m"; done
for m in "${!WANT[@]}"; do
    dest=$ROOT/usr/lib/modules/$KVER/${KO[$m]#"$MODDIR"/}
    mkdir -p "$(dirname "$dest")"
    cp "${KO[$m]}" "$dest"
done
cp "$MODDIR/modules.builtin" "$ROOT/usr/lib/modules/$KVER/"
# The package has no modules.dep (depmod runs in its postinst).  Modules
# call request_module("crypto-crc32c") through /sbin/modprobe, which needs
# modules.dep and modules.alias.
"$ROOT/usr/bin/busybox" depmod -b "$ROOT" "$KVER"

(cd "$ROOT" && find . | LC_ALL=C sort | "$ROOT/usr/bin/busybox" cpio -o -H newc 2>/dev/null) \
    >"$TMP/out/initramfs.cpio"
echo "$KVER" >"$TMP/out/kver"
echo "$STAMP" >"$TMP/out/stamp"
rm -rf "$OUT"
mv "$TMP/out" "$OUT"
echo "vm: image for $KVER built in $((SECONDS - T0)) s: ${#WANT[@]} modules, initramfs $(($(stat -c %s "$OUT/initramfs.cpio") / 1048576)) MiB" >&2
