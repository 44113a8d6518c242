#!/bin/bash
# Builds (or finds up to date) the image for the real-systemd VM test:
#   client-tests/.cache/systemd-vm/rootfs.img     ext4: Debian bookworm minbase with systemd,
#                                                  udev, kmod, dbus, nbd-client, e2fsprogs, and
#                                                  the kernel modules the test needs
#   client-tests/.cache/systemd-vm/initramfs.gz   busybox: mount the root disk, switch_root
#                                                  to /lib/systemd/systemd
#   client-tests/.cache/systemd-vm/vmlinux        the kernel: Debian 12's 6.1, from
#                                                  client-tests/vm/build.sh 6.1
# Each part is rebuilt only when its inputs change (stamps). The Debian packages debootstrap
# downloads are cached in client-tests/.cache/systemd-vm/debs.
#
# Host needs: debootstrap, busybox-static, e2fsprogs, and what client-tests/vm/build.sh needs.
# Run as root (debootstrap, chroot, mknod).

set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=$(cd "$HERE/.." && pwd)/.cache
OUT=$CACHE/systemd-vm
mkdir -p "$OUT/debs"
log() { echo "systemd-vm: $*" >&2; }

# Packages in the guest, and why each is there:
#   udev       dev-nbd0.device, which a .mount unit on /dev/nbd0 waits for, exists only through udev
#   kmod       libkmod (in systemd and udevd) needs modules.dep.bin/modules.alias.bin, which
#              busybox's depmod does not write ("Failed to find module 'autofs4'" without it)
#   dbus       systemd-run --wait and busctl need the bus ("Failed to connect to bus" without it);
#              systemctl does not (as root it uses /run/systemd/private)
#   nbd-client, e2fsprogs   the attach and mkfs units under test
#   procps, iproute2        ps/pgrep and ss for the job's checks
#   man-db                  `man 8 ramnbd` from the installed package (man-db pulls in groff)
# The ramnbd package is installed from its .deb with apt, offline: its Depends (libc6) and
# Recommends (nbd-client) are all here.
PACKAGES=systemd,systemd-sysv,udev,kmod,dbus,nbd-client,e2fsprogs,procps,iproute2,man-db
# Kernel modules in the root file system (their depends= closure is added), and in the
# initramfs (enough to mount the root disk).
ROOT_MODULES=(nbd ext4 crc32c_generic crc32c_intel autofs4 virtio_pci virtio_blk)
INITRD_MODULES=(virtio_pci virtio_blk ext4 crc32c_generic crc32c_intel)

# ------------------------------------------------------------------ kernel
# client-tests/vm/build.sh fetches the Debian 12 kernel package (cached) and extracts the
# uncompressed vmlinux that qemu boots through PVH; the guest is bookworm, so its 6.1 kernel.
VMIMG=$("$HERE/../vm/build.sh" 6.1)
KVER=$(cat "$VMIMG/kver")
DEB=$(compgen -G "$CACHE/linux-image-${KVER}_*_amd64.deb" | head -n 1) ||
    { log "no cached kernel package for $KVER in $CACHE"; exit 1; }

# ------------------------------------------------------------ debootstrap
MIRROR=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
MIRROR=${MIRROR:-$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BASE_STAMP=$(echo "bookworm minbase $PACKAGES" | sha256sum | cut -d' ' -f1)
if [[ ! -f $OUT/base.stamp || $(cat "$OUT/base.stamp") != "$BASE_STAMP" ]]; then
    log "debootstrap bookworm ($PACKAGES) from $MIRROR"
    T0=$SECONDS
    rm -rf "$OUT/base.new"
    cleanup_mounts() {
        # debootstrap mounts /proc and /sys in the target; never leave them behind.
        local m
        for m in $(awk -v d="$OUT/base.new" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r); do
            umount -l "$m" || true
        done
    }
    trap cleanup_mounts EXIT
    debootstrap --variant=minbase --arch=amd64 --cache-dir="$OUT/debs" \
        --include="$PACKAGES" bookworm "$OUT/base.new" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 ||
        { tail -n 30 "$OUT/debootstrap.log" >&2; log "debootstrap failed (log: $OUT/debootstrap.log)"; exit 1; }
    chroot "$OUT/base.new" apt-get clean
    cleanup_mounts
    trap - EXIT
    rm -rf "$OUT/base"
    mv "$OUT/base.new" "$OUT/base"
    echo "$BASE_STAMP" >"$OUT/base.stamp"
    rm -f "$OUT/image.stamp"
    log "debootstrap done in $((SECONDS - T0)) s"
fi

# ------------------------------------------------------------ image + initramfs
IMAGE_STAMP=$(cat "$HERE/image.sh" "$HERE/init" "$OUT/base.stamp" <(basename "$DEB") |
    sha256sum | cut -d' ' -f1)
if [[ -f $OUT/image.stamp && $(cat "$OUT/image.stamp") == "$IMAGE_STAMP" &&
      -f $OUT/rootfs.img && -f $OUT/initramfs.gz ]]; then
    exit 0
fi
log "building the root image and initramfs for $KVER"
T0=$SECONDS
TMP=$(mktemp -d "$OUT/build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# The modules, from the kernel package (bookworm: uncompressed .ko under /lib/modules).
dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$TMP" "./lib/modules/$KVER"
MODDIR=$TMP/lib/modules/$KVER
declare -A KO=()
while read -r ko; do
    name=$(basename "$ko" .ko)
    KO[${name//-/_}]=$ko
done < <(find "$MODDIR/kernel" -name '*.ko')

# closure MODULE...: the modules and everything they depend on (depends= in .modinfo).
closure() {
    local -A want=()
    local queue=("$@") m dep
    while ((${#queue[@]})); do
        m=${queue[0]//-/_}
        queue=("${queue[@]:1}")
        [[ -z ${want[$m]:-} ]] || continue
        [[ -n ${KO[$m]:-} ]] || { log "module $m not in $(basename "$DEB")"; exit 1; }
        want[$m]=1
        for dep in $(tr '\0' '\n' <"${KO[$m]}" | sed -n 's/^depends=//p' | tr ',' ' '); do
            queue+=("$dep")
        done
    done
    printf '%s\n' "${!want[@]}"
}
# install_modules ROOT MODULE...: copy the closure into ROOT/usr/lib/modules/KVER.
install_modules() {
    local root=$1 m dest
    shift
    for m in $(closure "$@"); do
        dest=$root/usr/lib/modules/$KVER/${KO[$m]#"$MODDIR"/}
        mkdir -p "$(dirname "$dest")"
        cp "${KO[$m]}" "$dest"
    done
    cp "$MODDIR"/modules.builtin* "$MODDIR/modules.order" "$root/usr/lib/modules/$KVER/"
}

# --- the root file system: a copy of the debootstrap tree plus modules and configuration.
ROOT=$TMP/root
cp -a "$OUT/base" "$ROOT"
install_modules "$ROOT" "${ROOT_MODULES[@]}"
# The image's own kmod writes the binary indexes that libkmod (udev, systemd) needs.
chroot "$ROOT" depmod "$KVER"

echo sdvm >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 sdvm\n::1 localhost\n' >"$ROOT/etc/hosts"
echo '# no static file systems: the root is mounted by the initramfs' >"$ROOT/etc/fstab"
mkdir -p "$ROOT/etc/systemd/journald.conf.d" "$ROOT/etc/systemd/system.conf.d" \
    "$ROOT/etc/systemd/system-generators" "$ROOT/usr/lib/systemd/system-shutdown" \
    "$ROOT/usr/local/sbin"
# Room for the whole run: with PID 1 at debug level the default (10% of /run) rotates and
# vacuums files mid-run, and a cursor into a vacuumed file matches nothing.
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=128M\nRuntimeMaxFileSize=64M\n' \
    >"$ROOT/etc/systemd/journald.conf.d/volatile.conf"
printf '[Manager]\nDefaultTimeoutStartSec=60s\nDefaultTimeoutStopSec=20s\nDefaultDeviceTimeoutSec=30s\n' \
    >"$ROOT/etc/systemd/system.conf.d/timeouts.conf"
# man-db rebuilds its index on every package install and removal (a trigger that costs tens of
# seconds under TCG); `man 8 ramnbd` finds the page without it.
rm -f "$ROOT/var/lib/man-db/auto-update"
# dpkg syncs every file it unpacks; the image is a throw-away snapshot, so skip that.
echo force-unsafe-io >"$ROOT/etc/dpkg/dpkg.cfg.d/sdvm-unsafe-io"
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer systemd-pstore.service getty@tty1.service \
    systemd-timesyncd.service; do
    ln -sf /dev/null "$ROOT/etc/systemd/system/$unit"
done
for gen in cryptsetup getty gpt-auto hibernate-resume integritysetup rc-local run \
    system-update sysv veritysetup; do
    ln -sf /dev/null "$ROOT/etc/systemd/system-generators/systemd-$gen-generator"
done

# The job plumbing: vm-job.target pulls in vm-job.service, which runs /etc/sdvm/job.sh (put
# there by the initramfs from the job archive) on the console and powers off.
cat >"$ROOT/etc/systemd/system/vm-job.target" <<'UNIT'
[Unit]
Description=Test job
Requires=basic.target
Wants=vm-job.service
After=basic.target
AllowIsolate=yes
UNIT
cat >"$ROOT/etc/systemd/system/vm-job.service" <<'UNIT'
[Unit]
Description=Test job (/etc/sdvm/job.sh)
After=basic.target

[Service]
# simple: the boot counts as finished once the job runs.
Type=simple
ExecStart=/usr/local/sbin/sdvm-job
StandardInput=null
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
TTYReset=no
TTYVHangup=no
KillMode=process
UNIT
cat >"$ROOT/usr/local/sbin/sdvm-job" <<'SCRIPT'
#!/bin/sh
sh /etc/sdvm/job.sh
rc=$?
sync
echo "VM-EXIT-STATUS=$rc"
systemctl --no-block start poweroff.target --job-mode=replace-irreversibly
SCRIPT
cat >"$ROOT/usr/lib/systemd/system-shutdown/sdvm-marker" <<'SCRIPT'
#!/bin/sh
echo "SHUTDOWN-REACHED" >/dev/console
SCRIPT
chmod 755 "$ROOT/usr/local/sbin/sdvm-job" "$ROOT/usr/lib/systemd/system-shutdown/sdvm-marker"

SIZE_MB=$(( $(du -sm "$ROOT" | cut -f1) * 5 / 4 + 128 ))
# mkfs.ext4 -d prints the files it copies on stdout even with -q.
mkfs.ext4 -q -F -L sdvm-root -m 0 -E lazy_itable_init=0,lazy_journal_init=0 \
    -d "$ROOT" "$TMP/rootfs.img" "${SIZE_MB}M" >/dev/null

# --- the initramfs: busybox, the modules to mount the root disk, and /init.
IRD=$TMP/initrd
mkdir -p "$IRD"/{usr/bin,usr/sbin,usr/lib,dev,proc,sys,newroot}
for d in bin sbin lib; do ln -s "usr/$d" "$IRD/$d"; done
cp /bin/busybox "$IRD/usr/bin/busybox"
while read -r applet; do
    [[ -e $IRD/$applet || -L $IRD/$applet ]] || ln -s /usr/bin/busybox "$IRD/$applet"
done < <("$IRD/usr/bin/busybox" --list-full)
install_modules "$IRD" "${INITRD_MODULES[@]}"
"$IRD/usr/bin/busybox" depmod -b "$IRD" "$KVER"
cp "$HERE/init" "$IRD/init"
chmod 755 "$IRD/init"
mknod "$IRD/dev/console" c 5 1
(cd "$IRD" && find . | LC_ALL=C sort | "$IRD/usr/bin/busybox" cpio -o -H newc 2>/dev/null) |
    gzip -1 >"$TMP/initramfs.gz"

mv "$TMP/rootfs.img" "$OUT/rootfs.img"
mv "$TMP/initramfs.gz" "$OUT/initramfs.gz"
cp "$VMIMG/vmlinux" "$OUT/vmlinux"
echo "$KVER" >"$OUT/kver"
echo "$IMAGE_STAMP" >"$OUT/image.stamp"
log "image built in $((SECONDS - T0)) s: rootfs $(du -m --apparent-size "$OUT/rootfs.img" | cut -f1) MiB"
