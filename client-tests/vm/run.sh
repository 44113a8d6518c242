#!/bin/bash
# The nbd.ko tests for hosts without nbd.ko: boots a Debian kernel under
# qemu TCG with a small initramfs (vm/build.sh) and runs kernel/suite.sh in
# the guest against a server running on this host.  One boot runs the whole
# plan; the host prints the guest's PASS/FAIL lines as they come, then checks
# what the server saw of it (its metrics).  The md RAID1 checks
# (kernel/raid.sh) get two more servers, which the guest kills and restarts
# through a control line (vm/raid-servers.sh), and an empty virtio disk.
# The TLS checks (kernel/tls.sh) get one more server, which requires TLS and
# client certificates made for this run (kernel/tls-host.sh).
#
# Usage: client-tests/vm/run.sh [6.1|6.12]
#   6.1 (default)  Debian 12: kernel 6.1, nbd-client 3.24, the host's mkfs/fsck tools
#   6.12           Debian 13: kernel 6.12, whose nbd driver sends WRITE_ZEROES,
#                  nbd-client 3.26 and mkfs/fsck tools from the Debian 13 folder
# Environment: RAMNBD_BIN, SERVER_CMD (see kernel/host.sh); KERNEL_PKG (see
# vm/build.sh); VM_TIMEOUT (hard limit for the VM in seconds, default 600);
# VM_CPUS (default 4: the multi-conn check needs one CPU per connection,
# since blk-mq maps CPUs to the connections' hardware queues);
# RAID_NBD_TIMEOUT, RAID_NBD_OPTS, SUITE_PARTS (see kernel/README.md).
# Prints one PASS/FAIL line per check and "N passed, N failed" last; exits
# non-zero if anything failed, with the guest's exit status if it had one.
# The VM, its network (a guestfwd per server, one for the control line) and
# its clean-up are lib/vm.sh's.

set -euo pipefail
VM_T0_S=$SECONDS
VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../kernel/host.sh
. "$VM_DIR/../kernel/host.sh"
# shellcheck source=../lib/vm.sh
. "$VM_DIR/../lib/vm.sh"
# shellcheck source=raid-servers.sh
. "$VM_DIR/raid-servers.sh"
# shellcheck source=../kernel/tls-host.sh
. "$VM_DIR/../kernel/tls-host.sh"
SERIES=${1:-6.1}
VM_TIMEOUT=${VM_TIMEOUT:-600}
VM_CPUS=${VM_CPUS:-4}
# The RAID members' nbd-client -t: how long I/O left in flight on a dead
# server waits before it fails and md drops the member (kernel/raid.sh).
RAID_NBD_TIMEOUT=${RAID_NBD_TIMEOUT:-5}
RAID_NBD_OPTS=${RAID_NBD_OPTS:-}
SUITE_PARTS=${SUITE_PARTS:-nbd tls raid}
has_part() { [[ " $SUITE_PARTS " == *" $1 "* ]]; }

need_root "mknod for the initramfs, chroot"
need_vm
need apt-get apt
need dpkg-deb dpkg
need xz xz-utils
need openssl openssl
case $SERIES in
6.1)
    # The guest gets the host's own client and filesystem tools.
    need nbd-client nbd-client
    need_filesystem_tools
    ;;
6.12)
    # Debian 13's kernel is zstd-compressed; its tools come from the Debian
    # 13 folder, which trixie/build.sh debootstraps if it is not there yet.
    need zstd zstd
    need debootstrap debootstrap
    ;;
*)
    missing "a kernel series this script knows: 6.1 or 6.12, not '$SERIES'"
    ;;
esac
need_server

WORK=$(mktemp -d /tmp/ramnbd-vm.XXXXXX)

# cleanup: on every exit path, leave no qemu (nor its socat relays) and no
# server behind.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    vm_stop
    raid_servers_stop >/dev/null
    tls_server_stop >/dev/null
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
if ! IMAGE=$("$VM_DIR/build.sh" "$SERIES"); then
    fail vm-image "vm/build.sh $SERIES failed"
    summary
    exit 1
fi
BUILD_S=$((SECONDS - T))
KVER=$(cat "$IMAGE/kver")
NBD_CLIENT_VERSION=$(sed -n 's/^nbd-client //p' "$IMAGE/versions")

if ! server_start "$WORK"; then
    summary
    exit 1
fi

# The md RAID1 checks' two servers (vm/raid-servers.sh), the guest's control
# line to them, and an empty disk for the write-mostly mirror.
raid_servers_init "$WORK/raid"
raid_servers_up() {
    local n
    for n in $RAID_SERVER_NAMES; do raid_server_start "$n" >&3 || die "server $n did not start"; done
    truncate -s 128M "$WORK/raid-disk.img"
}
check raid-servers-start raid_servers_up
RAID_CTL_PORT=$(pick_port)

# The TLS server: certificates for the address the guest connects to, the
# client's half for the guest.
if has_part tls; then
    check tls-certificates tls_certs "$WORK/tls" "$GUEST_FWD_IP"
    tls_server_start "$WORK/tls" || true
fi
RAID_CTL_CMD="bash $VM_DIR/raid-servers.sh serve $WORK/raid"
[[ $RAID_CTL_CMD != *,* ]] || fail raid-control "a comma in '$RAID_CTL_CMD' (qemu's option separator)"

# The job: the suite with its libraries (the repository's layout, so that
# they find each other), the test data and their environment, appended to
# the cached initramfs.
JOB=$WORK/job/job
mkdir -p "$JOB/kernel" "$JOB/lib"
check data-tree make_tree "$JOB/tree"
cp "$KERNEL_DIR"/{suite.sh,checks.sh,nbd.sh,raid.sh,tls.sh} "$JOB/kernel/"
if [[ -n $TLS_PORT ]]; then cp -R "$WORK/tls/client" "$JOB/tls"; fi
cp "$KERNEL_DIR/../lib/report.sh" "$JOB/lib/"
# shellcheck disable=SC2034 # read through ${!v} below
NBD_HOST=$GUEST_FWD_IP NBD_PORT=$SERVER_PORT NBD_DEV=/dev/nbd0 TREE=/job/tree SUITE_WORK=/tmp/suite
TLS_HOST=$GUEST_FWD_IP TLS_DIR=/job/tls
RAID_HOST=$GUEST_FWD_IP RAID_PORT_A=$(raid_port a) RAID_PORT_B=$(raid_port b) RAID_DISK=/dev/vda
for v in NBD_HOST NBD_PORT NBD_DEV TREE SUITE_WORK EXPORT_XFS EXPORT_BTRFS EXPORT_RAW \
    SIZE_DEFAULT SIZE_XFS SIZE_BTRFS SIZE_RAW SUITE_PARTS \
    TLS_HOST TLS_PORT TLS_EXPORT TLS_HOSTNAME TLS_DIR \
    RAID_HOST RAID_PORT_A RAID_PORT_B RAID_CTL_PORT RAID_DISK RAID_NBD_TIMEOUT RAID_NBD_OPTS; do
    printf 'export %s=%q\n' "$v" "${!v}"
done >"$JOB/env"
vm_initrd "$IMAGE/initramfs.cpio" "$WORK/job" "$WORK/initrd"

# ss -ltn opens no connection; a guest connecting to a port where nothing
# listens would still "connect" (slirp accepts) and then fail obscurely.
port_listening "$SERVER_PORT" || { fail vm-boot "server port $SERVER_PORT is not listening"; summary; exit 1; }

# The raw export's write_zeroes counters before the boot, to see them grow.
WZ_BEFORE=$(metric "ramnbd_requests_total{export=\"$EXPORT_RAW\",command=\"write_zeroes\"}" 2>/dev/null) || WZ_BEFORE=
WZ_BYTES_BEFORE=$(metric "ramnbd_request_bytes_total{export=\"$EXPORT_RAW\",command=\"write_zeroes\"}" 2>/dev/null) || WZ_BYTES_BEFORE=

echo "vm: kernel $KVER, nbd-client $NBD_CLIENT_VERSION ($(grep -v '^nbd-client ' "$IMAGE/versions" | tr '\n' ',' | sed 's/,$//; s/,/, /g'))"
echo "vm: $VM_CPUS vCPUs (TCG), server 127.0.0.1:$SERVER_PORT as $GUEST_FWD_IP:$SERVER_PORT, limit $VM_TIMEOUT s"
VM_FWD_PORT="$SERVER_PORT $RAID_PORT_A $RAID_PORT_B${TLS_PORT:+ $TLS_PORT}" VM_FWD_CMD_PORT=$RAID_CTL_PORT VM_FWD_CMD=$RAID_CTL_CMD \
    VM_MEM=1024 VM_CONSOLE_FILTER="relabel_summary guest" \
    vm_run "$WORK/console.log" "$VM_TIMEOUT" "$IMAGE/vmlinux" "$WORK/initrd" \
    "console=ttyS0 panic=-1 oops=panic quiet mitigations=off" \
    -drive "file=$WORK/raid-disk.img,format=raw,if=virtio"

# ------------------------------------------------ what the server received
# The guest's raw-write-zeroes check zeroes 4 MiB of the raw export with
# BLKZEROOUT.  6.12's nbd driver sends that as WRITE_ZEROES; 6.1's driver has
# no WRITE_ZEROES, so its block layer writes zeroes with plain WRITEs and no
# export may ever receive one.  Only meaningful if the guest ran the check.
ZEROED=$((4 * MIB))
# wz KIND EXPORT: the server's write_zeroes counter KIND (requests,
# request_bytes, request_errors) for EXPORT.
wz() { metric "ramnbd_$1_total{export=\"$2\",command=\"write_zeroes\"}"; }
write_zeroes_counts() {
    local e
    for e in "${PLAN_NAMES[@]}"; do
        note "export '$e': write_zeroes requests $(wz requests "$e"), bytes $(wz request_bytes "$e"), errors $(wz request_errors "$e")"
    done
}
# (grep reads the file itself: behind `tr |`, grep -q's early exit could
# kill tr with SIGPIPE, which pipefail turns into a failure.)
guest_zeroed() {
    grep -q '^PASS raw-write-zeroes' "$WORK/console.log" ||
        die "the guest's raw-write-zeroes check did not pass, so there is nothing to compare"
}
server_got_write_zeroes() {
    local n bytes errors
    guest_zeroed
    write_zeroes_counts
    n=$(wz requests "$EXPORT_RAW")
    bytes=$(wz request_bytes "$EXPORT_RAW")
    errors=$(wz request_errors "$EXPORT_RAW")
    [ -n "$WZ_BEFORE" ] || die "the counters could not be read before the boot"
    note "raw export: write_zeroes requests $WZ_BEFORE -> $n, bytes $WZ_BYTES_BEFORE -> $bytes"
    [ "$n" -gt "$WZ_BEFORE" ] || die "the raw export received no WRITE_ZEROES: the 6.12 kernel should have sent them"
    [ "$errors" -eq 0 ] || die "$errors WRITE_ZEROES failed"
    [ $((bytes - WZ_BYTES_BEFORE)) -eq "$ZEROED" ] ||
        die "WRITE_ZEROES covered $((bytes - WZ_BYTES_BEFORE)) bytes of the raw export, the guest zeroed $ZEROED"
}
server_got_no_write_zeroes() {
    local e n
    guest_zeroed
    write_zeroes_counts
    for e in "${PLAN_NAMES[@]}"; do
        n=$(wz requests "$e")
        [ "$n" -eq 0 ] || die "export '$e' received $n WRITE_ZEROES from a kernel that has none"
    done
}
if has_part tls; then
    check tls-server-log tls_server_saw_guest "$WORK/console.log"
fi
if has_part nbd; then
    case $SERIES in
    6.1) check server-write-zeroes-never-sent server_got_no_write_zeroes ;;
    6.12) check server-write-zeroes-received server_got_write_zeroes ;;
    esac
fi

raid_servers_stop
tls_server_stop
server_stop

guest_status=$(vm_guest_status "$WORK/console.log")
if vm_timed_out; then
    fail vm-run "hard timeout: the VM ran for $VM_TIMEOUT s"
elif ! add_child_counts "$WORK/console.log"; then
    fail vm-run "no summary from the guest (qemu exit $VM_RC, guest status ${guest_status:-none})"
elif [[ -z $guest_status ]]; then
    fail vm-run "qemu exited with $VM_RC and no guest exit status (kernel panic or oops?)"
fi
if [[ $FAILED -gt 0 ]]; then
    server_log_tail
    if [[ -n $TLS_LOG && -f $TLS_LOG ]]; then
        echo "---- TLS server log (last 20 lines)"
        tail -n 20 "$TLS_LOG" | sed 's/^/    | /'
    fi
fi

echo "---- vm run, kernel $KVER, nbd-client $NBD_CLIENT_VERSION: $((SECONDS - VM_T0_S)) s (image $BUILD_S s, VM $VM_SECONDS s)"
if ! summary; then
    # The guest's own exit status where it has one, else 1.
    [[ ${guest_status:-0} -ne 0 ]] && exit "$guest_status"
    exit 1
fi
