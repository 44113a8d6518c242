#!/bin/sh
# shellcheck shell=sh
# The kernel-client test plan: nbd-client + nbd.ko against a running server.
# Runs under bash on a host that has nbd.ko (kernel/run.sh starts it) and
# under busybox sh inside the VM guest (vm/run.sh, which copies this folder
# and lib/ into the guest with the same layout).  As root.
#
# Environment: NBD_HOST NBD_PORT (where this machine reaches the server),
# NBD_DEV (a free /dev/nbdX), SUITE_WORK (a scratch directory),
# EXPORT_{XFS,BTRFS,RAW} and SIZE_{DEFAULT,XFS,BTRFS,RAW} (from host.sh),
# TREE (the test data, made on the host by checks.sh's make_tree: random
# data is slow to make in an emulated guest), optionally NBD_TIMEOUT.
# The md RAID1 checks (raid.sh) run where the runner provides their servers
# and control line (RAID_CTL_PORT and the rest, see raid.sh): the VM.
# nbd-client over TLS (tls.sh) runs where the runner starts a TLS server and
# gives its certificates (TLS_PORT and the rest, see tls.sh): the VM.
# SUITE_PARTS picks parts (default "nbd tls raid"; "raid" alone is quicker when
# working on those).
# Prints one PASS/FAIL line per check and "N passed, N failed" last; exits
# non-zero if anything failed.

set -u
SUITE_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib/report.sh
. "$SUITE_DIR/../lib/report.sh"
# shellcheck source=checks.sh
. "$SUITE_DIR/checks.sh"

: "${NBD_HOST:?} ${NBD_PORT:?} ${NBD_DEV:?} ${SUITE_WORK:?} ${TREE:?}"
: "${EXPORT_XFS:?} ${EXPORT_BTRFS:?} ${EXPORT_RAW:?}"
: "${SIZE_DEFAULT:?} ${SIZE_XFS:?} ${SIZE_BTRFS:?} ${SIZE_RAW:?}"
# A hung server fails requests after this long instead of hanging the run
# (without -t the kernel waits forever).
NBD_TIMEOUT=${NBD_TIMEOUT:-60}
SUITE_PARTS=${SUITE_PARTS:-nbd tls raid}
RAID_CTL_PORT=${RAID_CTL_PORT:-}
TLS_PORT=${TLS_PORT:-}
has_part() { case " $SUITE_PARTS " in *" $1 "*) return 0 ;; esac; return 1; }

[ -e /sys/module/nbd ] || modprobe nbd
# The transmission flags are only visible in debugfs.
grep -q ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs debugfs /sys/kernel/debug

# shellcheck source=nbd.sh
. "$SUITE_DIR/nbd.sh"

WORK=$SUITE_WORK
mkdir -p "$WORK"
echo "kernel $(uname -r), $(nproc) CPUs, server $NBD_HOST:$NBD_PORT, device $NBD_DEV"
echo "$(nbd-client -V 2>&1 | head -n 1); $(mkfs.ext4 -V 2>&1 | head -n 1);" \
    "$(mkfs.xfs -V 2>&1 | head -n 1); $(mkfs.btrfs -V 2>&1 | head -n 1)"
SUITE_T0=$(now_cs)

if has_part nbd; then
    check attach-default attach_mode "" "" "$SIZE_DEFAULT"
    cleanup_if_failed attach-default
    check attach-named attach_mode "$EXPORT_XFS" "" "$SIZE_XFS"
    cleanup_if_failed attach-named
    check attach-bs4096 attach_mode "$EXPORT_XFS" "-b 4096" "$SIZE_XFS"
    cleanup_if_failed attach-bs4096
    check attach-multiconn4 attach_mode "$EXPORT_BTRFS" "-C 4" "$SIZE_BTRFS"
    cleanup_if_failed attach-multiconn4

    raw_checks "$EXPORT_RAW" ""

    # One attach mode per filesystem, so each mode also carries a full workload.
    fs_cycle ext4 "" "" "$TREE"
    fs_cycle xfs "$EXPORT_XFS" "-b 4096" "$TREE"
    fs_cycle btrfs "$EXPORT_BTRFS" "-C 4" "$TREE"
fi

if has_part tls && [ -n "$TLS_PORT" ]; then
    # shellcheck source=tls.sh
    . "$SUITE_DIR/tls.sh"
    echo "nbd-client over TLS: $TLS_HOST:$TLS_PORT, export '$TLS_EXPORT', certificates $TLS_DIR, -tlshostname $TLS_HOSTNAME"
    tls_checks
fi

if has_part raid && [ -n "$RAID_CTL_PORT" ]; then
    # shellcheck source=raid.sh
    . "$SUITE_DIR/raid.sh"
    echo "$(mdadm -V 2>&1 | head -n 1); nbd-client -t $RAID_NBD_TIMEOUT ${RAID_NBD_OPTS:-} on the RAID members"
    raid1_checks
    write_mostly_checks
fi

echo "---- suite: $(elapsed_since "$SUITE_T0")"
if [ "$FAILED" -gt 0 ]; then
    echo "---- kernel log (nbd, block and filesystem lines, routine attach/detach lines left out)"
    dmesg | grep -E "nbd|I/O error|EXT4-fs|XFS|BTRFS|blk_|md|raid1" |
        grep -vE "NBD_DISCONNECT|Disconnected due to user request|shutting down sockets|detected capacity change" |
        tail -n 40 | sed 's/^/    | /'
fi
summary
