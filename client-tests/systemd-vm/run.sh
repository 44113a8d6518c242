#!/bin/bash
# The real-systemd test: boots Debian bookworm with systemd as PID 1 in a qemu TCG VM, installs
# ramnbd there from its Debian package (apt-get install ./ramnbd_*.deb), and drives the units as an operator would (guest/job.sh):
# ramnbd.socket -> socket-activated Type=notify ramnbd.service -> ramnbd-attach@nbd0 ->
# ramnbd-mkfs@nbd0 -> mnt-ramdisk.mount, data, restarts and an upgrade under a writer (the fd
# store) and a package upgrade, ordered stop, re-attach, clean stop, kill -9 under a writer; the
# package's man page, a warning in the journal with its fields, apt-get purge. Then boots twice more
# with a persistent disk for images across a reboot (guest/snapshot.sh).
#
#   client-tests/systemd-vm/run.sh
#
# Prints the guest's PASS/FAIL lines, a journal excerpt, and "N passed, N failed"; exits 0
# only if every check passed and the VM shut down cleanly. No qemu outlives it.
#
# Environment:
#   SDVM_DEB       the package to test (default: target/debian/ramnbd_*.deb, which
#                  client-tests/package/run.sh or `cargo deb -p ramnbd` builds)
#   SDVM_TIMEOUT   hard limit for each VM boot in seconds (default 480)
#   SDVM_KEEP_LOG  keep the console log here (default: client-tests/.cache/systemd-vm/console.log)
# Needs root, qemu-system-x86, debootstrap, busybox-static (also for cpio), e2fsprogs; a missing
# one is a FAIL. The image is built on first use (see image.sh) and cached. The VM itself is
# lib/vm.sh's.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=../lib/report.sh
. "$HERE/../lib/report.sh"
# shellcheck source=../lib/ramnbd.sh
. "$HERE/../lib/ramnbd.sh"
# shellcheck source=../lib/vm.sh
. "$HERE/../lib/vm.sh"
OUT=$REPO/client-tests/.cache/systemd-vm
LIMIT=${SDVM_TIMEOUT:-480}
LOG=${SDVM_KEEP_LOG:-$OUT/console.log}
T0=$SECONDS
say() { echo "systemd-vm: $*"; }

need_root "debootstrap, chroot, mknod"
need_vm
need debootstrap debootstrap
need mkfs.ext4 e2fsprogs
need dpkg-deb dpkg
need xz xz-utils
DEB=${SDVM_DEB:-$(compgen -G "$REPO/target/debian/ramnbd_*_amd64.deb" | head -n 1)}
[[ -n $DEB && -f $DEB ]] || missing "the Debian package target/debian/ramnbd_*.deb (run client-tests/package/run.sh or cargo deb -p ramnbd)"
if ! prereqs_ok; then
    summary
    exit 1
fi

# ------------------------------------------------------------------ the image
if ! "$HERE/image.sh"; then
    fail systemd-vm-image "systemd-vm/image.sh failed"
    summary
    exit 1
fi
say "image ready after $((SECONDS - T0)) s"

# ------------------------------------------------------------------ the job archive
RUN=$(mktemp -d "$OUT/run.XXXXXX")
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    vm_stop
    rm -rf "$RUN"
    exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

JOB=$RUN/job
mkdir -p "$JOB/sdvm/lib"
cp "$HERE/guest/job.sh" "$JOB/sdvm/job.sh"
cp "$HERE/../lib/report.sh" "$JOB/sdvm/lib/"
say "package $(basename "$DEB")"
cp "$DEB" "$JOB/sdvm/ramnbd.deb"
vm_initrd "$OUT/initramfs.gz" "$JOB" "$RUN/initrd"

# ------------------------------------------------------------------ boot
# Units and generators that cost boot time and play no part in the test.
MASK="dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount sys-kernel-tracing.mount
sys-fs-fuse-connections.mount sys-kernel-config.mount proc-sys-fs-binfmt_misc.automount
systemd-binfmt.service kmod-static-nodes.service systemd-tmpfiles-setup-dev.service
modprobe@dm_mod.service modprobe@configfs.service modprobe@fuse.service modprobe@loop.service
modprobe@drm.service modprobe@efi_pstore.service systemd-random-seed.service
systemd-journal-flush.service systemd-sysusers.service systemd-update-utmp.service
systemd-remount-fs.service"
APPEND="console=ttyS0 panic=-1 oops=panic mitigations=off quiet systemd.unit=vm-job.target"
APPEND+=" systemd.firstboot=off systemd.log_color=0 net.ifnames=0 fsck.mode=skip"
for unit in $MASK; do APPEND+=" systemd.mask=$unit"; done

# show_job: the console, live, from the job's first line to its exit status.
show_job() { relabel_summary guest | sed -u -n '/^systemd-vm job:/,/^VM-EXIT-STATUS=/p'; }

say "booting $(cat "$OUT/kver") (limit ${LIMIT} s)"
# snapshot=on: the image is opened read-only; guest writes go to a temporary file.
VM_CPUS=2 VM_MEM=1536 VM_CONSOLE_FILTER=show_job \
    vm_run "$LOG" "$LIMIT" "$OUT/vmlinux" "$RUN/initrd" "$APPEND" \
    -drive "file=$OUT/rootfs.img,format=raw,if=none,id=root,snapshot=on" \
    -device virtio-blk-pci,drive=root

# ------------------------------------------------------------------ results
status=$(vm_guest_status "$LOG")
if vm_timed_out; then
    fail vm-run "the VM ran past ${LIMIT} s and was killed; console log: $LOG"
elif ! add_child_counts "$LOG" || [[ -z $status ]]; then
    fail vm-run "the job did not finish (qemu exit $VM_RC); last console lines:"
    tr -d '\r' <"$LOG" | tail -n 25
fi
# The job left socket, server, attach and mount up: the poweroff must take them down in order
# (unmount, detach, stop the server), so the kernel never loses the device's server.
SHUTDOWN_PART=$(tr -d '\r' <"$LOG" | sed -n '/^POWEROFF-WITH-STACK-UP/,$p')
if [[ -z $SHUTDOWN_PART ]]; then
    fail poweroff-in-order "the job did not leave the stack up for the poweroff"
elif grep -E "I/O error, dev nbd|Dead connection|Receive control failed|EXT4-fs \(nbd[0-9]+\): I/O error|FAILED" <<<"$SHUTDOWN_PART"; then
    fail poweroff-in-order "the poweroff stopped the ramnbd stack out of order (errors above)"
else
    pass poweroff-in-order "with the file system mounted: unmount, detach, server stop in order (no nbd I/O error)"
fi
if tr -d '\r' <"$LOG" | grep -q '^SHUTDOWN-REACHED'; then
    pass clean-poweroff "every unit stopped and file systems unmounted (systemd-shutdown ran)"
else
    fail clean-poweroff "the VM did not reach systemd-shutdown"
fi
say "VM ran ${VM_SECONDS} s; console log: $LOG"

# ------------------------------------------------------------------ images across a reboot
# guest/snapshot.sh, booted twice with one persistent disk (the guest's /var/lib/private):
# what the first boot's server saved, the second boot's server loads.
cp "$HERE/guest/snapshot.sh" "$JOB/sdvm/job.sh"
vm_initrd "$OUT/initramfs.gz" "$JOB" "$RUN/initrd"
truncate -s 1G "$RUN/state.img"
for boot in 1 2; do
    say "booting again for images across a reboot ($boot of 2)"
    VM_CPUS=2 VM_MEM=1536 VM_CONSOLE_FILTER=show_job \
        vm_run "$LOG.image$boot" "$LIMIT" "$OUT/vmlinux" "$RUN/initrd" "$APPEND" \
        -drive "file=$OUT/rootfs.img,format=raw,if=none,id=root,snapshot=on" \
        -device virtio-blk-pci,drive=root \
        -drive "file=$RUN/state.img,format=raw,if=none,id=state" -device virtio-blk-pci,drive=state
    if vm_timed_out || ! add_child_counts "$LOG.image$boot"; then
        fail "image-boot-$boot" "the job did not finish (qemu exit $VM_RC); console log: $LOG.image$boot"
    fi
    say "VM ran ${VM_SECONDS} s"
done
say "whole run $((SECONDS - T0)) s"
summary
