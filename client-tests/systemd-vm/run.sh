#!/bin/bash
# The real-systemd test: boots Debian bookworm with systemd as PID 1 in a qemu TCG VM, installs
# ramnbd there with systemd/install.sh, and drives the units as an operator would (guest/job.sh):
# ramnbd.socket -> socket-activated Type=notify ramnbd.service -> ramnbd-attach@nbd0 ->
# ramnbd-mkfs@nbd0 -> mnt-ramdisk.mount, data, ordered stop, re-attach, clean stop.
#
#   client-tests/systemd-vm/run.sh
#
# Prints the guest's PASS/FAIL lines, a journal excerpt, and "N passed, N failed"; exits 0
# only if every check passed and the VM shut down cleanly. No qemu outlives it.
#
# Environment:
#   RAMNBD_BIN     the ramnbd binary to test (default: cargo build --release -p ramnbd)
#   SDVM_TIMEOUT   hard limit for the VM in seconds (default 240)
#   SDVM_KEEP_LOG  keep the console log here (default: client-tests/.cache/systemd-vm/console.log)
# Needs root, qemu-system-x86, debootstrap, busybox-static, e2fsprogs, iproute2, cpio-free
# (busybox provides cpio); the image is built on first use (see image.sh) and cached.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=$REPO/client-tests/.cache/systemd-vm
LIMIT=${SDVM_TIMEOUT:-240}
LOG=${SDVM_KEEP_LOG:-$OUT/console.log}
T0=$SECONDS
say() { echo "systemd-vm: $*"; }

[[ $(id -u) == 0 ]] || { say "must run as root (debootstrap, chroot, mknod)"; exit 2; }
for tool in qemu-system-x86_64 debootstrap busybox mkfs.ext4 timeout; do
    command -v "$tool" >/dev/null || { say "$tool is missing (apt-get install qemu-system-x86 debootstrap busybox-static e2fsprogs)"; exit 2; }
done

# ------------------------------------------------------------------ the binary
if [[ -n ${RAMNBD_BIN:-} ]]; then
    BIN=$RAMNBD_BIN
else
    say "cargo build --release -p ramnbd"
    (cd "$REPO" && cargo build --release -q -p ramnbd)
    BIN=$REPO/target/release/ramnbd
fi
[[ -x $BIN ]] || { say "no ramnbd binary at $BIN"; exit 2; }

# ------------------------------------------------------------------ the image
"$HERE/image.sh"
say "image ready after $((SECONDS - T0)) s"

# ------------------------------------------------------------------ the job archive
RUN=$(mktemp -d "$OUT/run.XXXXXX")
QEMU_PID=
cleanup() {
    if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

JOB=$RUN/job
mkdir -p "$JOB/sdvm/systemd" "$JOB/sdvm/config" "$JOB/sdvm/docs"
cp "$HERE/guest/job.sh" "$JOB/sdvm/job.sh"
strip -o "$JOB/sdvm/ramnbd" "$BIN" 2>/dev/null || cp "$BIN" "$JOB/sdvm/ramnbd"
cp "$REPO"/systemd/* "$JOB/sdvm/systemd/"
cp "$REPO/config/ramnbd.toml" "$JOB/sdvm/config/"
cp "$REPO/docs/operations.md" "$JOB/sdvm/docs/" 2>/dev/null || true
(cd "$JOB" && find sdvm | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) >"$RUN/job.cpio"
# The job archive goes after the gzip one, at a 4-byte-aligned offset (the kernel skips NULs).
cp "$OUT/initramfs.gz" "$RUN/initrd"
pad=$(( (4 - $(stat -c %s "$RUN/initrd") % 4) % 4 ))
head -c "$pad" /dev/zero >>"$RUN/initrd"
cat "$RUN/job.cpio" >>"$RUN/initrd"

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

say "booting (limit ${LIMIT} s)"
BOOT=$SECONDS
# snapshot=on: the image is opened read-only; guest writes go to a temporary file.
timeout -k 10 "$LIMIT" qemu-system-x86_64 -nodefaults -no-user-config -no-reboot \
    -accel tcg,thread=multi -cpu max -smp 2 -m 1536 -display none -serial stdio -monitor none \
    -kernel "$OUT/vmlinux" -initrd "$RUN/initrd" -append "$APPEND" \
    -drive "file=$OUT/rootfs.img,format=raw,if=none,id=root,snapshot=on" \
    -device virtio-blk-pci,drive=root \
    </dev/null >"$LOG" 2>&1 &
QEMU_PID=$!
set +e
wait "$QEMU_PID"
QEMU_RC=$?
set -e
QEMU_PID=
VM_SECONDS=$((SECONDS - BOOT))

# ------------------------------------------------------------------ results
tr -d '\r' <"$LOG" | sed -n '/^systemd-vm job:/,/^VM-EXIT-STATUS=/p'
passed=$(tr -d '\r' <"$LOG" | grep -c '^PASS: ' || true)
failed=$(tr -d '\r' <"$LOG" | grep -c '^FAIL: ' || true)
status=$(tr -d '\r' <"$LOG" | sed -n 's/^VM-EXIT-STATUS=\([0-9]*\)$/\1/p' | tail -n 1)
if [[ $QEMU_RC == 124 || $QEMU_RC == 137 ]]; then
    say "FAIL: the VM ran past ${LIMIT} s and was killed; console log: $LOG"
    failed=$((failed + 1))
elif [[ -z $status ]]; then
    say "FAIL: the job did not finish (qemu exit $QEMU_RC); last console lines:"
    tr -d '\r' <"$LOG" | tail -n 25
    failed=$((failed + 1))
fi
# The job left socket, server, attach and mount up: the poweroff must take them down in order
# (unmount, detach, stop the server), so the kernel never loses the device's server.
SHUTDOWN_PART=$(tr -d '\r' <"$LOG" | sed -n '/^POWEROFF-WITH-STACK-UP/,$p')
if [[ -z $SHUTDOWN_PART ]]; then
    echo "FAIL: the job did not leave the stack up for the poweroff"
    failed=$((failed + 1))
elif grep -E "I/O error, dev nbd|Dead connection|Receive control failed|EXT4-fs \(nbd[0-9]+\): I/O error|FAILED" <<<"$SHUTDOWN_PART"; then
    echo "FAIL: the poweroff stopped the ramnbd stack out of order (errors above)"
    failed=$((failed + 1))
else
    echo "PASS: poweroff with the file system mounted: unmount, detach, server stop in order (no nbd I/O error)"
    passed=$((passed + 1))
fi
if tr -d '\r' <"$LOG" | grep -q '^SHUTDOWN-REACHED'; then
    echo "PASS: clean poweroff: every unit stopped and file systems unmounted (systemd-shutdown ran)"
    passed=$((passed + 1))
else
    echo "FAIL: the VM did not reach systemd-shutdown"
    failed=$((failed + 1))
fi
say "VM ran ${VM_SECONDS} s; whole run $((SECONDS - T0)) s; console log: $LOG"
echo "$passed passed, $failed failed"
[[ $failed == 0 && $passed -gt 0 ]]
