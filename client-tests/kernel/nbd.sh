# shellcheck shell=sh disable=SC3043
# (SC3043: bash and busybox ash both have `local`.)
#
# Attaching exports with the kernel's nbd driver (nbd-client + nbd.ko): the
# dev_* hooks of checks.sh, and the checks of the attach modes themselves.
# Runs on a host with nbd.ko and in the VM guest.
#
# Needs NBD_HOST, NBD_PORT (the server as this machine reaches it), NBD_DEV
# (a free /dev/nbdX) and NBD_TIMEOUT (seconds before the kernel fails a
# request with an I/O error instead of waiting forever on a hung server).

NBD_NAME=${NBD_DEV#/dev/}

dev_path() { echo "$NBD_DEV"; }

dev_is_attached() { [ -e "/sys/block/$NBD_NAME/pid" ]; }

nbd_released() {
    ! dev_is_attached && [ "$(cat "/sys/block/$NBD_NAME/size")" -eq 0 ]
}

nbd_ready() {
    dev_is_attached && [ "$(cat "/sys/block/$NBD_NAME/size")" -gt 0 ]
}

# dev_attach EXPORT MODE: "" attaches the default export without -N (the
# way `nbd-client HOST PORT DEV` is usually written); MODE adds nbd-client
# options such as "-b 4096" or "-C 4".
dev_attach() {
    set -- "$1" "$2" "$NBD_HOST" "$NBD_PORT" "$NBD_DEV" -t "$NBD_TIMEOUT"
    if [ -n "$1" ]; then set -- "$@" -N "$1"; fi
    local mode="$2" out
    shift 2
    # Its chatter ("Negotiation: ..size = ...") only matters when it fails.
    # shellcheck disable=SC2086 # MODE is a word list on purpose
    out=$(nbd-client "$@" $mode 2>&1) || die "nbd-client $* $mode: $out"
    wait_until 20 nbd_ready || die "$NBD_DEV not ready 20 s after nbd-client returned"
}

# dev_detach: `nbd-client -d` returns before the kernel has torn the device
# down; wait until the pid file is gone and the size is 0, as reusing the
# device earlier fails.
dev_detach() {
    local out
    out=$(nbd-client -d "$NBD_DEV" 2>&1) || die "nbd-client -d $NBD_DEV: $out"
    wait_until 20 nbd_released || die "$NBD_DEV still attached 20 s after nbd-client -d"
}

# nbd_sockets: one line per established TCP connection to the server, with
# ss's info fields (bytes_acked, bytes_received, ...).  ss needs the
# tcp_diag module, which it loads on demand.
nbd_sockets() {
    ss -tinH state established dst "$NBD_HOST:$NBD_PORT" | awk '
        /^[0-9]/ { if (sock != "") print sock; sock = $0; next }
        { sock = sock " " $0 }
        END { if (sock != "") print sock }'
}

no_sockets() { [ -z "$(nbd_sockets)" ]; }

# field NAME LINE: the value of ss's NAME:VALUE field in LINE (0 if absent).
field() {
    echo "$2" | tr ' ' '\n' | sed -n "s/^$1://p" | grep . || echo 0
}

# check_flags: the transmission flags the kernel got from the server
# (debugfs shows them as "Hex: 0x..."): FLUSH, FUA, TRIM and CAN_MULTI_CONN
# must be there, READ_ONLY must not.
check_flags() {
    local hex
    hex=$(sed -n 's/^Hex: //p' "/sys/kernel/debug/nbd/$NBD_NAME/flags")
    note "transmission flags $hex"
    # HAS_FLAGS 0x1, SEND_FLUSH 0x4, SEND_FUA 0x8, SEND_TRIM 0x20, CAN_MULTI_CONN 0x100
    [ $((hex & 0x12d)) -eq $((0x12d)) ] || die "flags $hex lack one of 0x12d"
    [ $((hex & 0x2)) -eq 0 ] || die "flags $hex say read-only"
}

# check_multiconn_io N: all N connections carry I/O.  blk-mq gives each
# connection one hardware queue and maps CPUs to queues
# (/sys/block/nbdX/mq/Q/cpu_list); an O_DIRECT reader pinned to a CPU of each
# queue must make every socket receive its data.
check_multiconn_io() {
    local want="$1" q cpu n=0 line got min=$((4 * 1048576))
    for q in "/sys/block/$NBD_NAME/mq/"*; do
        cpu=$(cut -d, -f1 "$q/cpu_list" | cut -d- -f1)
        [ -n "$cpu" ] || die "hardware queue ${q##*/} has no CPU: boot with as many CPUs as connections"
        taskset -c "$cpu" dd if="$NBD_DEV" of=/dev/null bs=65536 count=128 \
            skip=$((n * 1024)) iflag=direct 2>/dev/null &
        n=$((n + 1))
    done
    wait
    [ "$n" -eq "$want" ] || die "$n hardware queues, expected $want"
    nbd_sockets >"$WORK/sockets"
    while read -r line; do
        got=$(field bytes_received "$line")
        note "connection $(echo "$line" | awk '{print $3}'): bytes_received $got, bytes_acked $(field bytes_acked "$line")"
        [ "$got" -ge "$min" ] || die "a connection received only $got bytes"
    done <"$WORK/sockets"
}

# attach_mode EXPORT MODE SIZE: attach, check size and mode-specific
# properties, detach, check the kernel released the device.
attach_mode() {
    local bs conns
    dev_attach "$1" "$2"
    [ "$($BLOCKDEV --getsize64 "$NBD_DEV")" -eq "$3" ] ||
        die "size $($BLOCKDEV --getsize64 "$NBD_DEV"), expected $3"
    bs=$(echo "$2" | sed -n 's/.*-b \([0-9]*\).*/\1/p')
    [ "$($BLOCKDEV --getss "$NBD_DEV")" -eq "${bs:-512}" ] ||
        die "logical block size $($BLOCKDEV --getss "$NBD_DEV"), expected ${bs:-512}"
    conns=$(echo "$2" | sed -n 's/.*-C \([0-9]*\).*/\1/p')
    [ "$(nbd_sockets | wc -l)" -eq "${conns:-1}" ] ||
        die "$(nbd_sockets | wc -l) connections to the server, expected ${conns:-1}"
    check_flags
    if [ -n "$conns" ]; then check_multiconn_io "$conns"; fi
    dev_detach
    wait_until 5 no_sockets || die "connections still open 5 s after detach"
}
