#!/bin/bash
# Filesystems on an NBD export without nbd.ko: nbdfuse shows the export as a
# file, losetup turns that into a block device, and the shared checks
# (kernel/checks.sh) run mkfs/mount/verify/fstrim/fsck for ext4, xfs and
# btrfs plus the raw-device checks on it.  Fast, and runs on any host with
# FUSE and loop devices.  As root.
#
# Usage: client-tests/fuse/run.sh
# Environment: RAMNBD_BIN, SERVER_CMD (see kernel/host.sh).
# Prints one PASS/FAIL line per check and "N passed, N failed" last; exits
# non-zero if anything failed.

set -euo pipefail
FUSE_T0_S=$SECONDS
# shellcheck source=../kernel/host.sh
. "$(dirname "${BASH_SOURCE[0]}")/../kernel/host.sh"

need_root "FUSE and loop devices, mounts"
need nbdfuse libnbd-bin
need fusermount3 fuse3
need losetup mount
need mountpoint util-linux
need_filesystem_tools
need_file /dev/fuse "fuse3, and a kernel with FUSE: modprobe fuse"
need_server

WORK=$(mktemp -d /tmp/ramnbd-fuse.XXXXXX)
FUSE_DIR=$WORK/fuse

# --------------------------------------------------- attach hooks for checks.sh
# MODE uses nbd-client's vocabulary, so the matrix matches the nbd.ko runs:
# "-b N" becomes the loop device's sector size, "-C N" nbdfuse's connections.

dev_path() { cat "$WORK/loopdev"; }

dev_is_attached() { [[ -s $WORK/loopdev ]] || mountpoint -q "$FUSE_DIR"; }

dev_attach() {
    local mode=$2 bs conns
    bs=$(sed -n 's/.*-b \([0-9]*\).*/\1/p' <<<"$mode")
    conns=$(sed -n 's/.*-C \([0-9]*\).*/\1/p' <<<"$mode")
    mkdir -p "$FUSE_DIR"
    rm -f "$WORK/nbdfuse.pid"
    # nbdfuse outlives the check, so it gets a log of its own rather than the
    # check's output (a reader of an inherited pipe would wait for it).
    nbdfuse -P "$WORK/nbdfuse.pid" ${conns:+-C "$conns"} "$FUSE_DIR/disk" \
        "$(export_uri "$1")" </dev/null >>"$WORK/nbdfuse.log" 2>&1 3>&- &
    # -P writes the pid file once the file is ready to use.
    wait_until 20 test -s "$WORK/nbdfuse.pid" || die "nbdfuse not ready: $(tail -n 5 "$WORK/nbdfuse.log")"
    losetup -f --show ${bs:+-b "$bs"} "$FUSE_DIR/disk" >"$WORK/loopdev"
}

loop_released() { [[ ! -e /sys/block/$1/loop ]]; }

nbdfuse_gone() { [[ ! -s $WORK/nbdfuse.pid ]] || ! kill -0 "$(cat "$WORK/nbdfuse.pid")" 2>/dev/null; }

# dev_detach: also undoes a half-done dev_attach (FUSE mounted, no loop).
dev_detach() {
    local loop
    if [[ -s $WORK/loopdev ]]; then
        loop=$(dev_path)
        losetup -d "$loop"
        wait_until 20 loop_released "${loop#/dev/}" || die "$loop still bound"
        : >"$WORK/loopdev"
    fi
    # The unmount makes nbdfuse flush and close its NBD connections, then exit.
    if mountpoint -q "$FUSE_DIR"; then fusermount3 -u "$FUSE_DIR"; fi
    wait_until 20 nbdfuse_gone || die "nbdfuse still running after fusermount3 -u"
}

# cleanup: on every exit path, leave no mount, loop device, FUSE mount,
# nbdfuse or server behind.
cleanup() {
    local rc=$? loop
    trap - EXIT INT TERM
    if grep -q " $WORK/$MNT_SUFFIX " /proc/mounts; then umount "$WORK/$MNT_SUFFIX" || true; fi
    if [[ -d $FUSE_DIR ]]; then
        for loop in $(losetup -j "$FUSE_DIR/disk" -O NAME -n 2>/dev/null); do
            losetup -d "$loop" || true
        done
        if mountpoint -q "$FUSE_DIR"; then fusermount3 -u "$FUSE_DIR" || true; fi
        if ! nbdfuse_gone; then kill "$(cat "$WORK/nbdfuse.pid")" || true; fi
    fi
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

check data-tree make_tree "$WORK/tree"
raw_checks "$EXPORT_RAW" ""
fs_cycle ext4 "$EXPORT_DEFAULT" "" "$WORK/tree"
fs_cycle xfs "$EXPORT_XFS" "-b 4096" "$WORK/tree"
fs_cycle btrfs "$EXPORT_BTRFS" "-C 4" "$WORK/tree"
server_stop

echo "---- fuse run: $((SECONDS - FUSE_T0_S)) s"
summary
