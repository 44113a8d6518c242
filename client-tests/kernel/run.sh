#!/bin/bash
# Front door of the kernel-client tests (nbd-client + nbd.ko, filesystems on
# the NBD device).  On a host with the nbd driver it runs kernel/suite.sh
# directly against a server it starts on 127.0.0.1; otherwise it hands over
# to the VM runner (vm/run.sh), which runs the same suite in a guest.  As root.
#
# Usage: client-tests/kernel/run.sh
# Environment: RAMNBD_BIN, SERVER_CMD (see host.sh); NBD_DEV (default: the
# first free /dev/nbdX); NBD_TIMEOUT (see suite.sh).
# Prints one PASS/FAIL line per check and "N passed, N failed" last; exits
# non-zero if anything failed.

set -euo pipefail
RUN_T0_S=$SECONDS
KDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ ! -e /sys/module/nbd ]] && ! modprobe nbd 2>/dev/null; then
    echo "kernel: this host has no nbd driver (no /sys/module/nbd, modprobe nbd failed): using the VM runner"
    exec "$KDIR/../vm/run.sh" "$@"
fi

# shellcheck source=host.sh
. "$KDIR/host.sh"
need_root "nbd devices and mounts"
need nbd-client nbd-client
need_filesystem_tools
need taskset util-linux
need_server

if [[ -z ${NBD_DEV:-} ]]; then
    for d in /sys/block/nbd*; do
        if [[ ! -e $d/pid && $(cat "$d/size") -eq 0 ]]; then
            NBD_DEV=/dev/${d##*/}
            break
        fi
    done
fi
[[ -n ${NBD_DEV:-} ]] || missing "a free /dev/nbdX (all are attached)"
export NBD_DEV NBD_HOST=127.0.0.1

WORK=$(mktemp -d /tmp/ramnbd-kernel.XXXXXX)
export SUITE_WORK=$WORK/suite TREE=$WORK/tree

# release_device: a suite that died or was interrupted can leave the test
# filesystem mounted and the device attached (it was free when picked).
release_device() {
    if grep -q " $SUITE_WORK/$MNT_SUFFIX " /proc/mounts; then umount "$SUITE_WORK/$MNT_SUFFIX" || true; fi
    if [[ -n ${NBD_DEV:-} && -e /sys/block/${NBD_DEV#/dev/}/pid ]]; then
        nbd-client -d "$NBD_DEV" || true
    fi
}

# cleanup: on every exit path, leave no mount, attached device or server behind.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    release_device
    server_stop >/dev/null
    if ! grep -q " $WORK/" /proc/mounts; then rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! prereqs_ok || ! server_start "$WORK"; then
    summary
    exit 1
fi
check data-tree make_tree "$TREE"

export NBD_PORT=$SERVER_PORT
bash "$KDIR/suite.sh" 2>&1 | tee "$WORK/suite.log" | relabel_summary suite || true
add_child_counts "$WORK/suite.log" || fail suite "no summary from kernel/suite.sh"
release_device
server_stop

echo "---- kernel run: $((SECONDS - RUN_T0_S)) s"
summary
