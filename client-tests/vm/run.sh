#!/bin/bash
# The nbd.ko tests for hosts without nbd.ko: boots a Debian kernel under
# qemu TCG with a small initramfs (vm/build.sh) and runs kernel/suite.sh in
# the guest against a server running on this host.  One boot runs the whole
# plan; the host prints the guest's PASS/FAIL lines as they come.
#
# Usage: client-tests/vm/run.sh
# Environment: RAMNBD_BIN, SERVER_CMD (see kernel/host.sh); KERNEL_PKG (see
# vm/build.sh); VM_TIMEOUT (hard limit for the VM in seconds, default 600);
# VM_CPUS (default 4: the multi-conn check needs one CPU per connection,
# since blk-mq maps CPUs to the connections' hardware queues).
# Prints one PASS/FAIL line per check and "N passed, N failed" last; exits
# non-zero if anything failed, with the guest's exit status if it had one.
#
# Network rule: qemu user networking with restrict=on, and the only way out
# of the guest is a guestfwd of 10.0.2.100:PORT to the server.  It uses the
# cmd: form, which starts one quiet socat relay per guest connection (the
# chardev form shares a single connection between all of them, which breaks
# reconnects and multi-conn).

set -euo pipefail
VM_T0_S=$SECONDS
VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../kernel/host.sh
. "$VM_DIR/../kernel/host.sh"
VM_TIMEOUT=${VM_TIMEOUT:-600}
VM_CPUS=${VM_CPUS:-4}
GUEST_FWD_IP=10.0.2.100

need qemu-system-x86_64 qemu-system-x86
need socat socat
need_file /bin/busybox busybox-static
need nbd-client nbd-client
need_filesystem_tools
need apt-get apt
need dpkg-deb dpkg
need xz xz-utils
need_server
# The initramfs needs busybox-static's binary; Debian's dynamic busybox
# package installs the same path.
if [[ -e /bin/busybox ]] && ldd /bin/busybox >/dev/null 2>&1; then
    MISSING+=("a static /bin/busybox (apt-get install busybox-static)")
fi

WORK=$(mktemp -d /tmp/ramnbd-vm.XXXXXX)
QEMU_PID=
TAIL_PID=

# cleanup: on every exit path, leave no qemu (nor its socat relays) and no
# server behind.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $QEMU_PID ]]; then
        # timeout(1) passes the TERM on to qemu and waits for it.
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    if [[ -n $TAIL_PID ]]; then
        kill "$TAIL_PID" 2>/dev/null || true
        wait "$TAIL_PID" 2>/dev/null || true
    fi
    server_stop >/dev/null
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! prereqs_ok; then
    summary
    exit 1
fi

T=$SECONDS
if ! "$VM_DIR/build.sh"; then
    fail vm-image "vm/build.sh failed"
    summary
    exit 1
fi
IMAGE=$(cd "$VM_DIR/../.cache/vm-image" && pwd)
BUILD_S=$((SECONDS - T))

if ! server_start "$WORK"; then
    summary
    exit 1
fi

# The job: the suite and its libraries, the test data and their environment,
# as a second (uncompressed) cpio archive appended to the cached initramfs.
# It must start at a 4-byte aligned offset of the whole initrd.
mkdir -p "$WORK/job/job"
check data-tree make_tree "$WORK/job/job/tree"
cp "$KERNEL_DIR"/{suite.sh,checks.sh,nbd.sh} "$WORK/job/job/"
# shellcheck disable=SC2034 # read through ${!v} below
NBD_HOST=$GUEST_FWD_IP NBD_PORT=$SERVER_PORT NBD_DEV=/dev/nbd0 TREE=/job/tree SUITE_WORK=/tmp/suite
for v in NBD_HOST NBD_PORT NBD_DEV TREE SUITE_WORK EXPORT_XFS EXPORT_BTRFS EXPORT_RAW \
    SIZE_DEFAULT SIZE_XFS SIZE_BTRFS SIZE_RAW; do
    printf 'export %s=%q\n' "$v" "${!v}"
done >"$WORK/job/job/env"
(cd "$WORK/job" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) >"$WORK/job.cpio"
cp "$IMAGE/initramfs.cpio" "$WORK/initrd"
pad=$(((4 - $(stat -c %s "$WORK/initrd") % 4) % 4))
head -c "$pad" /dev/zero >>"$WORK/initrd"
cat "$WORK/job.cpio" >>"$WORK/initrd"

# ss -ltn opens no connection; a guest connecting to a port where nothing
# listens would still "connect" (slirp accepts) and then fail obscurely.
port_listening "$SERVER_PORT" || { fail vm-boot "server port $SERVER_PORT is not listening"; summary; exit 1; }

echo "vm: kernel $(cat "$IMAGE/kver"), $VM_CPUS vCPUs (TCG), server 127.0.0.1:$SERVER_PORT as $GUEST_FWD_IP:$SERVER_PORT, limit $VM_TIMEOUT s"
T=$SECONDS
timeout -k 10 "$VM_TIMEOUT" qemu-system-x86_64 \
    -nodefaults -no-user-config -no-reboot \
    -accel tcg,thread=multi -cpu max -smp "$VM_CPUS" -m 1024 \
    -display none -serial stdio -monitor none \
    -kernel "$IMAGE/vmlinux" -initrd "$WORK/initrd" \
    -append "console=ttyS0 panic=-1 oops=panic quiet mitigations=off" \
    -netdev "user,id=n0,restrict=on,ipv6=off,guestfwd=tcp:$GUEST_FWD_IP:$SERVER_PORT-cmd:socat -lf /dev/null - TCP:127.0.0.1:$SERVER_PORT" \
    -device virtio-net-pci,netdev=n0,romfile= \
    </dev/null >"$WORK/console.log" 2>&1 &
QEMU_PID=$!
# The guest's output, live.
tail -n +1 -F --pid="$QEMU_PID" "$WORK/console.log" 2>/dev/null | relabel_summary guest &
TAIL_PID=$!
qemu_rc=0
wait "$QEMU_PID" || qemu_rc=$?
QEMU_PID=
wait "$TAIL_PID" || true
TAIL_PID=
VM_S=$((SECONDS - T))

server_stop

guest_status=$(sed -n 's/^VM-EXIT-STATUS=\([0-9]*\).*/\1/p' "$WORK/console.log" | tail -n 1)
if [[ $qemu_rc -eq 124 || $qemu_rc -eq 137 ]]; then
    fail vm-run "hard timeout: the VM ran for $VM_TIMEOUT s"
elif ! add_child_counts "$WORK/console.log"; then
    fail vm-run "no summary from the guest (qemu exit $qemu_rc, guest status ${guest_status:-none})"
elif [[ -z $guest_status ]]; then
    fail vm-run "qemu exited with $qemu_rc and no guest exit status (kernel panic or oops?)"
fi
if [[ $FAILED -gt 0 ]]; then server_log_tail; fi

echo "---- vm run: $((SECONDS - VM_T0_S)) s (image $BUILD_S s, VM $VM_S s)"
if ! summary; then
    # The guest's own exit status where it has one, else 1.
    [[ ${guest_status:-0} -ne 0 ]] && exit "$guest_status"
    exit 1
fi
