#!/bin/bash
# Builds (or finds up to date) the VM image for the nbd.ko tests of one
# Debian generation, a kernel and the client userland of the same release:
#
#   vm/build.sh 6.1    Debian 12: kernel 6.1 (no WRITE_ZEROES in its nbd driver),
#                      the host's own nbd-client 3.24 and mkfs/fsck tools
#   vm/build.sh 6.12   Debian 13: kernel 6.12 (its nbd driver sends WRITE_ZEROES),
#                      nbd-client 3.26 and the mkfs/fsck tools of the Debian 13
#                      client folder (client-tests/trixie/build.sh)
#
# into client-tests/.cache/vm-SERIES/ (gitignored):
#   vmlinux          the uncompressed kernel, booted via PVH
#   initramfs.cpio   busybox, the guest tools with their libraries, and the
#                    kernel modules they need
#   kver, versions   the kernel release, and the guest packages' versions
# The kernel .deb comes from `apt-get download` and is cached in
# client-tests/.cache/: old ABI packages leave the archive, so the name is
# pinned and the cached file kept.  The image is rebuilt only when an input
# changes: this script, vm/init, the kernel package, or the installed
# packages of the host or the Debian 13 folder (tools and libraries are
# copied from there).  Prints the image directory on stdout.
#
# Environment: KERNEL_PKG (the kernel package, default the pinned one below;
# if the archive no longer has it and it is not cached, the current ABI of
# that release's linux-image-amd64 is used instead).

set -euo pipefail
trap 'echo "vm/build.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=$(cd "$VM_DIR/.." && pwd)/.cache
SERIES=${1:-6.1}
log() { echo "vm $SERIES: $*" >&2; }

# The archive the host uses: the first main-archive URI in its apt sources
# (one-line or deb822 format), as trixie/build.sh finds it.
mirror() {
    local m
    m=$(grep -rhoE '(https?://[^ ]+/debian)/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
        grep -v -- '-security' | head -n 1 | tr -d ' ' | sed 's:/$::') || true
    echo "${m:-http://deb.debian.org/debian}"
}

APT=()
case $SERIES in
6.1)
    KERNEL_PKG=${KERNEL_PKG:-linux-image-6.1.0-56-amd64}
    # The host is Debian 12: its own apt sources and its own tools.
    USERLAND=
    ;;
6.12)
    KERNEL_PKG=${KERNEL_PKG:-linux-image-6.12.117+deb13-amd64}
    USERLAND=$("$VM_DIR/../trixie/build.sh")
    # trixie must not enter the host's own sources: a private sources list,
    # package lists and apt cache under .cache/ (an update is ~15 MB, 5 s).
    APTDIR=$CACHE/apt-trixie
    mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial"
    echo "deb $(mirror) trixie main" >"$APTDIR/sources.list"
    APT=(-o "Dir::Etc::sourcelist=$APTDIR/sources.list" -o Dir::Etc::sourceparts=-
        -o "Dir::State::lists=$APTDIR/lists" -o "Dir::Cache=$APTDIR/cache")
    ;;
*)
    log "unknown kernel series (use 6.1 or 6.12)"
    exit 2
    ;;
esac
OUT=$CACHE/vm-$SERIES

# Guest tools besides busybox, from the release's userland: the NBD client,
# the filesystem tools, and the util-linux tools busybox has no full version
# of.  ss (per-connection byte counts for the multi-conn check) is always the
# host's: it measures, it is not under test, and the Debian 13 folder has no
# iproute2.  The host's tools go in last, so that where both have a library
# the release's copy wins (same soname, so an older binary runs with it).
USERLAND_TOOLS=(nbd-client mkfs.ext4 mke2fs e2fsck mkfs.xfs xfs_repair mkfs.btrfs btrfs
    blkdiscard blockdev fstrim)
HOST_TOOLS=(ss)
# Guest tools that neither the host nor the Debian 13 folder installs: taken
# from the release's own .deb (apt-get download, cached in
# .cache/vm-debs-SERIES/), as PACKAGE:TOOL.  mdadm drives the md RAID1 checks.
DEB_TOOLS=(mdadm:mdadm)
# Modules, before their closure (depends= and softdep= of each, resolved
# against the package; built-in ones are left out: 6.12 has virtio_pci built
# in).  The softdeps pull in the crc32c, xxhash64, blake2b and sha256
# providers that ext4, jbd2, libcrc32c and btrfs ask for.  tcp_diag serves ss;
# md_mod and raid1 the md RAID1 checks, virtio_blk their local disk.
GUEST_MODULES=(nbd virtio_pci virtio_net ext4 xfs btrfs tcp_diag md_mod raid1 virtio_blk)

mkdir -p "$CACHE"

# --------------------------------------------------------- kernel package

# cached_deb PACKAGE: the cached .deb of PACKAGE, if any.
cached_deb() {
    compgen -G "$CACHE/$1_*_amd64.deb" | sort -V | tail -n 1 | grep .
}

apt_update() {
    ((${#APT[@]})) || return 1 # the host's lists are install-deps.sh's business
    log "apt-get update (private trixie lists)"
    apt-get -q "${APT[@]}" -o APT::Sandbox::User=root update >&2
}

# download_deb PACKAGE [DIR]: apt-get download into DIR (default .cache/).
download_deb() {
    local dir=${2:-$CACHE}
    log "apt-get download $1"
    mkdir -p "$dir"
    (cd "$dir" && apt-get -q "${APT[@]}" -o APT::Sandbox::User=root download "$1" >&2) ||
        { apt_update && (cd "$dir" && apt-get -q "${APT[@]}" -o APT::Sandbox::User=root download "$1" >&2); }
}

# guest_deb PACKAGE: the release's .deb of PACKAGE, downloaded once into a
# folder of this series (6.1 and 6.12 want different versions).
GUEST_DEBS=$CACHE/vm-debs-$SERIES
guest_deb() {
    compgen -G "$GUEST_DEBS/$1_*_amd64.deb" | sort -V | tail -n 1 | grep . && return
    download_deb "$1" "$GUEST_DEBS" || { log "cannot download $1"; return 1; }
    compgen -G "$GUEST_DEBS/$1_*_amd64.deb" | sort -V | tail -n 1 | grep .
}

find_deb() {
    local deb current
    deb=$(cached_deb "$KERNEL_PKG") && { echo "$deb"; return; }
    if download_deb "$KERNEL_PKG"; then
        cached_deb "$KERNEL_PKG"
        return
    fi
    # Old ABI packages leave the archive; fall back to the current one.
    current=$(apt-cache "${APT[@]}" depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | tail -n 1)
    if [[ -z $current ]]; then
        log "cannot find $KERNEL_PKG nor linux-image-amd64's current kernel (apt-get update?)"
        return 1
    fi
    log "$KERNEL_PKG is not available; using $current (set KERNEL_PKG=$current to pin it)"
    deb=$(cached_deb "$current") && { echo "$deb"; return; }
    download_deb "$current"
    cached_deb "$current"
}

DEB=$(find_deb)
TOOL_DEBS=()
for t in "${DEB_TOOLS[@]}"; do TOOL_DEBS+=("$(guest_deb "${t%%:*}")"); done

# The stamp covers every input; a dpkg status file changes whenever a package
# (and so a copied tool or library) is installed or upgraded.
STAMP=$(cat "$VM_DIR/build.sh" "$VM_DIR/init" <(basename -a "$DEB" "${TOOL_DEBS[@]}") \
    <(stat -c %Y /var/lib/dpkg/status "$USERLAND/var/lib/dpkg/status") | sha256sum | cut -d' ' -f1)
if [[ -f $OUT/stamp && $(cat "$OUT/stamp") == "$STAMP" ]]; then
    echo "$OUT"
    exit 0
fi

log "building the VM image from $(basename "$DEB")${USERLAND:+ with the userland of $USERLAND}"
T0=$SECONDS
TMP=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
dpkg-deb -x "$DEB" "$TMP/deb"
KVER=$(basename "$(compgen -G "$TMP/deb/boot/vmlinuz-*")")
KVER=${KVER#vmlinuz-}
# bookworm ships /lib/modules, trixie /usr/lib/modules.
MODDIR=$TMP/deb/lib/modules/$KVER
[[ -d $MODDIR ]] || MODDIR=$TMP/deb/usr/lib/modules/$KVER
mkdir -p "$TMP/out"

# ------------------------------------------------ vmlinux for the PVH boot
# qemu boots an uncompressed ELF vmlinux through its PVH note, skipping the
# bzImage's in-guest decompression (~4.5 s under TCG).  The compressed
# payload sits at (setup_sects+1)*512 + payload_offset, payload_length bytes
# long (setup header fields at 0x1f1 (u8), 0x248 and 0x24c (u32)); its last
# 4 bytes are the uncompressed size, not part of the stream.  Debian 12
# compresses it with xz, Debian 13 with zstd.
extract_vmlinux() {
    local bz=$1 sects off len magic
    sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz")
    off=$(od -An -tu4 -j $((0x248)) -N4 "$bz")
    len=$(od -An -tu4 -j $((0x24c)) -N4 "$bz")
    off=$(((sects + 1) * 512 + off))
    magic=$(od -An -tx1 -j "$off" -N4 "$bz" | tr -d ' ')
    case $magic in
    fd377a58) set -- xz -dc ;;
    28b52ffd) set -- zstd -dcq ;;
    1f8b*) set -- gzip -dc ;;
    *) log "kernel payload: unknown compression (magic $magic)"; return 1 ;;
    esac
    dd if="$bz" iflag=skip_bytes,count_bytes skip="$off" count=$((len - 4)) bs=1M status=none | "$@"
}
extract_vmlinux "$TMP/deb/boot/vmlinuz-$KVER" >"$TMP/out/vmlinux"
[[ $(head -c 4 "$TMP/out/vmlinux" | od -An -tx1 | tr -d ' ') == 7f454c46 ]] ||
    { log "extracted vmlinux is not an ELF file"; exit 1; }

# --------------------------------------------------------- initramfs tree
ROOT=$TMP/root
mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib,usr/lib64,dev,proc,sys,tmp,etc,job}
# Merged /usr, so the paths ldd prints (/lib/x86_64-linux-gnu/...,
# /lib64/ld-linux-x86-64.so.2) resolve.
for d in bin sbin lib lib64; do ln -s "usr/$d" "$ROOT/$d"; done

# in_root SRC CMD...: run CMD in the file tree SRC ("" = the host), so that
# PATH lookups, ldd and ldconfig answer for that tree (its own loader and
# libraries), not the host's.
in_root() {
    local src=$1
    shift
    chroot "${src:-/}" /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

# copy_path SRC PATH: copy SRC's PATH into ROOT at the same place, following
# its symlink chain (each link and the real file).  What ROOT already has is
# kept.
copy_path() {
    local src=$1 p=$2 target
    while [[ -L $src$p ]]; do
        [[ ! -e $ROOT$p && ! -L $ROOT$p ]] || return 0
        target=$(readlink "$src$p")
        mkdir -p "$ROOT$(dirname "$p")"
        ln -s "$target" "$ROOT$p"
        [[ $target == /* ]] || target=$(dirname "$p")/$target
        p=$target
    done
    [[ ! -e $ROOT$p ]] || return 0
    mkdir -p "$ROOT$(dirname "$p")"
    cp "$src$p" "$ROOT$p"
}

# copy_tools SRC TOOL...: each tool and the libraries its ldd lists, from SRC.
copy_tools() {
    local src=$1 tool path lib
    shift
    for tool in "$@"; do
        path=$(in_root "$src" sh -c "command -v $tool") ||
            { log "$tool not found in ${src:-the host}"; exit 1; }
        copy_path "$src" "$path"
        for lib in $(in_root "$src" ldd "$path" |
            awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
            copy_path "$src" "$lib"
        done
    done
    # glibc dlopen()s libgcc_s for pthread cancellation (xfsprogs and
    # btrfs-progs are threaded); ldd does not show it.
    lib=$(in_root "$src" ldconfig -p | awk '/libgcc_s\.so\.1 .*x86-64/ { lib = $NF } END { print lib }')
    [[ -n $lib ]] || { log "no libgcc_s.so.1 in ${src:-the host}"; exit 1; }
    copy_path "$src" "$lib"
}
# copy_deb_tool SRC DEB TOOL: TOOL from the package file DEB (in /sbin in
# Debian 12, /usr/sbin in 13: merged /usr has both), with the libraries it
# needs from SRC ("" = the host): the tree's own loader lists them,
# searching the tree's library folder first.
copy_deb_tool() {
    local src=$1 deb=$2 tool=$3 x p lib list
    x=$TMP/deb-$(basename "$deb")
    dpkg-deb -x "$deb" "$x"
    for p in {/usr,}/{sbin,bin}/"$tool" ""; do [[ -z $p || -f $x$p ]] && break; done
    [[ -n $p ]] || { log "no $tool in $(basename "$deb")"; exit 1; }
    cp "$x$p" "$ROOT/usr/sbin/$tool"
    if [[ -z $src ]]; then
        list=$(ldd "$x$p")
    else
        list=$("$src/lib64/ld-linux-x86-64.so.2" --library-path "$src/usr/lib/x86_64-linux-gnu" --list "$x$p")
    fi
    for lib in $(awk '$2 == "=>" && $3 ~ /^\// { print $3 }' <<<"$list"); do
        [[ -z $src || $lib == "$src"/* ]] || { log "$tool needs $lib, which is not in $src"; exit 1; }
        copy_path "$src" "${lib#"$src"}"
    done
}
copy_tools "$USERLAND" "${USERLAND_TOOLS[@]}"
for i in "${!DEB_TOOLS[@]}"; do copy_deb_tool "$USERLAND" "${TOOL_DEBS[i]}" "${DEB_TOOLS[i]#*:}"; done
copy_tools "" "${HOST_TOOLS[@]}"
# mke2fs's feature defaults, from the same release as mke2fs.
cp "$USERLAND/etc/mke2fs.conf" "$ROOT/etc/"
dpkg-query --admindir="$USERLAND/var/lib/dpkg" -W -f '${Package} ${Version}\n' \
    nbd-client e2fsprogs xfsprogs btrfs-progs util-linux >"$TMP/out/versions"
for deb in "${TOOL_DEBS[@]}"; do
    dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb" >>"$TMP/out/versions"
done

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
# Debian 12 ships plain .ko files, Debian 13 .ko.xz; they go into the
# initramfs decompressed, which busybox's depmod and modprobe read.
ko_cat() {
    case $1 in
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -dcq "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
    esac
}
# ko_field FILE FIELD: the values of one .modinfo field, one per line.
ko_field() { ko_cat "$1" | tr '\0' '\n' | sed -n "s/^$2=//p"; }

declare -A KO=() BUILTIN=() ALIAS=() WANT=()
while read -r ko; do
    name=$(basename "$ko")
    name=${name%%.ko*}
    KO[${name//-/_}]=$ko
done < <(find "$MODDIR/kernel" -name '*.ko' -o -name '*.ko.*')
while read -r ko; do
    name=$(basename "$ko" .ko)
    BUILTIN[${name//-/_}]=1
done <"$MODDIR/modules.builtin"
# Built-in aliases ("sha256_generic.alias=sha256") satisfy a softdep too.
# Only plain names matter here (not "pci:v00001AF4d*" and the like).
while read -r name; do BUILTIN[$name]=1; done < <(tr '\0' '\n' <"$MODDIR/modules.builtin.modinfo" |
    sed -n 's/^[^.]*\.alias=\([A-Za-z0-9_-]*\)$/\1/p')

# Softdeps name algorithms ("crypto-crc32c", "xxhash64"), which the crypto
# and library modules declare as aliases.  Reading every module's .modinfo
# would take ~40 s with .ko.xz; these directories take ~1 s.
load_aliases() {
    local ko a name
    ((${#ALIAS[@]} == 0)) || return 0
    while read -r ko; do
        name=$(basename "$ko")
        name=${name%%.ko*}
        for a in $(ko_field "$ko" alias | grep -E '^[A-Za-z0-9_-]+$'); do
            ALIAS[$a]+="${name//-/_} "
        done
    done < <(find "$MODDIR"/kernel/{crypto,arch/x86/crypto,lib} -name '*.ko*')
}

add_module() {
    local m=${1//-/_} dep
    [[ -z ${WANT[$m]:-} && -z ${BUILTIN[$m]:-} ]] || return 0
    [[ -n ${KO[$m]:-} ]] || { log "module $m not in $(basename "$DEB")"; exit 1; }
    WANT[$m]=1
    for dep in $(ko_field "${KO[$m]}" depends | tr ',' ' '); do
        add_module "$dep"
    done
    # "pre: crypto-crc32c" or "pre: a b post: c": every name after a "pre:"/"post:".
    for dep in $(ko_field "${KO[$m]}" softdep | tr ' ' '\n' | grep -v ':$'); do
        add_softdep "$m" "$dep"
    done
}

add_softdep() {
    local dep=$2 p
    if [[ -n ${KO[${dep//-/_}]:-} ]]; then
        add_module "$dep"
        return
    fi
    load_aliases
    if [[ -n ${ALIAS[$dep]:-} ]]; then
        for p in ${ALIAS[$dep]}; do add_module "$p"; done
    elif [[ -z ${BUILTIN[$dep]:-} ]]; then
        log "softdep $dep of $1: no module in $(basename "$DEB") or built-in provides it"
        exit 1
    fi
}

for m in "${GUEST_MODULES[@]}"; do add_module "$m"; done
for m in "${!WANT[@]}"; do
    rel=${KO[$m]#"$MODDIR"/}
    dest=$ROOT/usr/lib/modules/$KVER/${rel%.ko*}.ko
    mkdir -p "$(dirname "$dest")"
    ko_cat "${KO[$m]}" >"$dest"
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
log "image for $KVER built in $((SECONDS - T0)) s: ${#WANT[@]} modules ($(printf '%s\n' "${!WANT[@]}" | sort | tr '\n' ' ')), initramfs $(($(stat -c %s "$OUT/initramfs.cpio") / 1048576)) MiB"
echo "$OUT"
