# shellcheck shell=sh disable=SC3043
# (SC3043: bash and busybox ash both have `local`.)
#
# md RAID1 (the kernel's own mirror) over ramnbd, in the VM guest: losing a
# whole server, and RAM in front of a real disk.  Sourced by suite.sh after
# checks.sh; the host side (two extra ramnbd servers, killed and restarted
# on the guest's request) is vm/raid-servers.sh.
#
#   raid1_checks      md0 = RAID1 of /dev/nbd1 (server a) and /dev/nbd2
#                     (server b), ext4 on it; server b is SIGKILLed in the
#                     middle of an O_DIRECT write: md fails the member, the
#                     write completes, the filesystem works on; server b
#                     comes back empty, the member is added as a new one
#                     (full recovery), every file verifies, a "check" finds
#                     no mismatch, and the recovered member alone holds
#                     everything once the other one is failed.
#   write_mostly_checks   md1 = RAID1 of /dev/nbd3 (server a, export wm) and
#                     the VM's virtio disk marked --write-mostly: reads come
#                     from the RAM member only, writes go to both; server a
#                     is killed and the disk alone holds every file.
#
# Environment: RAID_HOST, RAID_PORT_A, RAID_PORT_B (the two servers, export
# "" and "wm" each), RAID_CTL_PORT (the host's control line), RAID_DISK (an
# empty local disk, /dev/vda), RAID_NBD_TIMEOUT (nbd-client -t),
# RAID_NBD_OPTS (more nbd-client options for the members, e.g. -nonetlink;
# default none), TREE.

RAID_NBD_OPTS=${RAID_NBD_OPTS:-}
RAID_A=/dev/nbd1
RAID_B=/dev/nbd2
RAID_W=/dev/nbd3
RAID_MD=/dev/md0
RAID_WM_MD=/dev/md1

# ------------------------------------------------------- the host's servers

# host_ctl REQUEST...: one request line to the host (kill NAME, start NAME,
# metric NAME SAMPLE); prints the reply after its "ok ".  busybox nc stops
# at the end of its stdin, before the reply: a FIFO held open keeps it
# reading until the host closes the connection.
host_ctl() {
    local fifo="$WORK/ctl.fifo" reply pid
    rm -f "$fifo"
    mkfifo "$fifo"
    nc -w 60 "$RAID_HOST" "$RAID_CTL_PORT" <"$fifo" >"$WORK/ctl.reply" &
    pid=$!
    exec 5>"$fifo"
    echo "$*" >&5
    wait "$pid" || true
    exec 5>&-
    reply=$(cat "$WORK/ctl.reply")
    case $reply in
    "ok "*) echo "${reply#ok }" ;;
    *) die "host: '$*' answered '${reply:-nothing}'" ;;
    esac
}

# ------------------------------------------------------------ nbd devices

sysblk() { echo "/sys/block/${1#/dev/}"; }

nbd_dev_ready() { [ -e "$(sysblk "$1")/pid" ] && [ "$(cat "$(sysblk "$1")/size")" -gt 0 ]; }
nbd_dev_released() { [ ! -e "$(sysblk "$1")/pid" ] && [ "$(cat "$(sysblk "$1")/size")" -eq 0 ]; }

# raid_attach DEV PORT EXPORT: -t makes I/O that a dead server leaves in
# flight fail after RAID_NBD_TIMEOUT seconds (without it the kernel waits for
# ever); new I/O on a dead connection fails at once (nbd-client 3.24 and 3.26
# set no dead-connection timeout, so the kernel waits for no reconnect).
raid_attach() {
    local dev="$1" out
    if [ -n "$3" ]; then set -- "$RAID_HOST" "$2" "$dev" -N "$3"; else set -- "$RAID_HOST" "$2" "$dev"; fi
    # shellcheck disable=SC2086 # RAID_NBD_OPTS is a word list on purpose
    out=$(nbd-client "$@" -t "$RAID_NBD_TIMEOUT" $RAID_NBD_OPTS 2>&1) || die "nbd-client $*: $out"
    wait_until 20 nbd_dev_ready "$dev" || die "$dev not ready 20 s after nbd-client returned"
}

raid_detach() {
    local out
    out=$(nbd-client -d "$1" 2>&1) || die "nbd-client -d $1: $out"
    wait_until 20 nbd_dev_released "$1" || die "$1 still attached 20 s after nbd-client -d"
}

# dev_stat DEV FIELD: a counter of /sys/block/DEV/stat (3: sectors read,
# 7: sectors written).
dev_stat() { awk -v f="$2" '{ print $f }' "$(sysblk "$1")/stat"; }

# ------------------------------------------------------------------- md

md_attr() { cat "$(sysblk "$1")/md/$2"; }
md_degraded() { [ "$(md_attr "$1" degraded)" -ge 1 ]; }
md_whole() { [ "$(md_attr "$1" degraded)" -eq 0 ] && [ "$(md_attr "$1" sync_action)" = idle ]; }
md_idle() { [ "$(md_attr "$1" sync_action)" = idle ]; }
member_state() { md_attr "$1" "dev-${2#/dev/}/state"; }
# member_has MD DEV FLAG: DEV's state in MD lists FLAG ("faulty",
# "write_mostly").  (A `| grep -q` could make the reader die of SIGPIPE,
# which pipefail turns into a failure.)
member_has() {
    case ,$(member_state "$1" "$2"), in *,"$3",*) return 0 ;; esac
    return 1
}
member_faulty() { member_has "$1" "$2" faulty; }

# mdstat MD: the member map of /proc/mdstat, e.g. "[UU]" or "[U_]".
mdstat() {
    sed -n "/^${1#/dev/} :/{n;p;}" /proc/mdstat | grep -o '\[[U_]*\]$'
}

# cs_to_s CENTISECONDS: "12.34 s".
cs_to_s() { printf '%d.%02d s' $(($1 / 100)) $(($1 % 100)); }

# ------------------------------------------------------------- test data

RAID_MNT_DIR=raid-mnt
RAID_SUMS=raid.sha256

# raid_copy DEST NAME...: copy TREE/NAME (files or directories) into the mounted
# array under "DEST/NAME" and add their checksums (from TREE.sha256) to the
# list; DEST is the first argument.
raid_copy() {
    local dest="$1" name
    shift
    mkdir -p "$WORK/$RAID_MNT_DIR/$dest"
    for name in "$@"; do
        mkdir -p "$(dirname "$WORK/$RAID_MNT_DIR/$dest/$name")"
        cp -R "$TREE/$name" "$WORK/$RAID_MNT_DIR/$dest/$name"
        grep -E "  \./$name(/|\$)" "$TREE.sha256" |
            sed "s|  \./$name|  ./$dest/$name|" >>"$WORK/$RAID_SUMS"
    done
}

# raid_verify: every file copied so far reads back with its checksum, after
# the page cache is dropped (so the reads reach the members).
raid_verify() {
    local n
    drop_caches
    n=$(wc -l <"$WORK/$RAID_SUMS")
    if ! (cd "$WORK/$RAID_MNT_DIR" && sha256sum -c "$WORK/$RAID_SUMS") >"$WORK/raid-sha.out" 2>&1; then
        grep -v ': OK$' "$WORK/raid-sha.out" | head -n 20 >&2 || true
        die "$(grep -cv ': OK$' "$WORK/raid-sha.out") of $n files differ"
    fi
    note "$n files verified"
}

raid_mount() {
    mkdir -p "$WORK/$RAID_MNT_DIR"
    mount -t ext4 "$1" "$WORK/$RAID_MNT_DIR"
}

raid_mdadm_create() {
    # --assume-clean: both members read as zeroes (a fresh export, a new
    # sparse disk), so they are in sync already; the "check" below proves it.
    mdadm --create "$@" --run --level=1 --raid-devices=2 --metadata=1.2 \
        --bitmap=internal --assume-clean
}

# ---------------------------------------------------- RAID1 of two servers

raid1_create() {
    raid_attach "$RAID_A" "$RAID_PORT_A" ""
    raid_attach "$RAID_B" "$RAID_PORT_B" ""
    raid_mdadm_create "$RAID_MD" "$RAID_A" "$RAID_B"
    mkfs.ext4 -q -F "$RAID_MD"
    raid_mount "$RAID_MD"
    : >"$WORK/$RAID_SUMS"
    # A few dozen small files (each a few round trips under TCG) and, below,
    # 26 MiB in two large ones.
    raid_copy before small/d0 small/d1
    sync
    [ "$(mdstat "$RAID_MD")" = "[UU]" ] || die "md0 is $(mdstat "$RAID_MD"), not [UU]"
    note "md0 $(md_attr "$RAID_MD" component_size) KiB per member, $(mdstat "$RAID_MD"), bitmap $(md_attr "$RAID_MD" bitmap/location)"
}

# The kill: an O_DIRECT writer of 16 MiB (each 128 KiB write waits for both
# members) is running when server b dies; the kill returns once the process
# is gone.
raid1_kill_mid_write() {
    local writer size t_kill t_deg rc=0
    dd if="$TREE/large-16m" of="$WORK/$RAID_MNT_DIR/mid-write" bs=131072 oflag=direct \
        2>"$WORK/dd.err" &
    writer=$!
    wait_until 30 file_reached "$WORK/$RAID_MNT_DIR/mid-write" "$MIB" ||
        die "the writer did not get going"
    note "host: $(host_ctl kill b)"
    t_kill=$(now_cs)
    size=$(stat -c %s "$WORK/$RAID_MNT_DIR/mid-write")
    [ "$size" -lt $((16 * MIB)) ] || die "the write had finished before the kill: nothing was in the middle"
    note "the writer had written $((size / 1024)) KiB of 16384 when server b died"
    wait_until 120 md_degraded "$RAID_MD" || die "md0 not degraded 120 s after the kill"
    t_deg=$(now_cs)
    note "kill -> md0 degraded: $(cs_to_s $((t_deg - t_kill))) (nbd-client -t $RAID_NBD_TIMEOUT)"
    wait "$writer" || rc=$?
    [ "$rc" -eq 0 ] || die "the write failed (dd exit $rc: $(cat "$WORK/dd.err"))"
    note "the write completed $(elapsed_since "$t_kill") after the kill"
    grep -E '  \./large-16m$' "$TREE.sha256" | sed 's|  \./large-16m|  ./mid-write|' >>"$WORK/$RAID_SUMS"
    [ "$(mdstat "$RAID_MD")" = "[U_]" ] || die "md0 is $(mdstat "$RAID_MD"), expected [U_]"
    member_faulty "$RAID_MD" "$RAID_B" || die "nbd2 is '$(member_state "$RAID_MD" "$RAID_B")', not faulty"
    note "md0 $(mdstat "$RAID_MD"), nbd2 $(member_state "$RAID_MD" "$RAID_B")"
    dmesg | grep -E 'nbd2: (Receive|Dead|Connection)|md0: Disk failure' | sed 's/^/       kernel: /' >&3
}

file_reached() { [ -f "$1" ] && [ "$(stat -c %s "$1")" -ge "$2" ]; }

raid1_degraded_works() {
    raid_copy after large-10m-odd
    sync
    raid_verify
    [ "$(mdstat "$RAID_MD")" = "[U_]" ] || die "md0 is $(mdstat "$RAID_MD"), expected [U_]"
}

# The server is back with empty RAM: the member comes back as a new device
# (--add), never --re-add: a re-add with the bitmap copies only the regions
# written while it was out, which on an empty member leaves the rest zeroes.
raid1_replace() {
    local out w0 w1 t0 size
    mdadm --manage "$RAID_MD" --remove "$RAID_B"
    raid_detach "$RAID_B"
    note "host: $(host_ctl start b)"
    raid_attach "$RAID_B" "$RAID_PORT_B" ""
    if out=$(mdadm --examine "$RAID_B" 2>&1); then
        die "the restarted server's export still has an md superblock: $out"
    fi
    note "nbd2 after the restart: ${out##*: }"
    if out=$(mdadm --manage "$RAID_MD" --re-add "$RAID_B" 2>&1); then
        die "mdadm re-added an empty member: $out"
    fi
    note "re-add refused: $(echo "$out" | tail -n 1)"
    w0=$(dev_stat "$RAID_B" 7)
    t0=$(now_cs)
    mdadm --manage "$RAID_MD" --add "$RAID_B"
    wait_until 300 md_whole "$RAID_MD" || die "md0 not rebuilt 300 s after --add: $(cat /proc/mdstat)"
    w1=$(dev_stat "$RAID_B" 7)
    size=$(($(md_attr "$RAID_MD" component_size) * 1024))
    note "recovery: $((size / MIB)) MiB per member in $(elapsed_since "$t0"), nbd2 received $(((w1 - w0) * 512 / MIB)) MiB of writes"
    [ $(((w1 - w0) * 512)) -ge "$size" ] ||
        die "nbd2 received $(((w1 - w0) * 512)) bytes, less than a member ($size): not a full recovery"
    [ "$(mdstat "$RAID_MD")" = "[UU]" ] || die "md0 is $(mdstat "$RAID_MD"), not [UU]"
}

raid1_check_mismatch() {
    local t0 n
    t0=$(now_cs)
    echo check >"$(sysblk "$RAID_MD")/md/sync_action"
    wait_until 300 md_idle "$RAID_MD" || die "check still running after 300 s"
    [ "$(md_attr "$RAID_MD" last_sync_action)" = check ] ||
        die "the last sync action was $(md_attr "$RAID_MD" last_sync_action), not check"
    n=$(md_attr "$RAID_MD" mismatch_cnt)
    note "check of both members: $(elapsed_since "$t0"), mismatch_cnt $n"
    [ "$n" -eq 0 ] || die "mismatch_cnt $n"
}

# The recovered member alone: fail the other one, drop the cache, read
# every file (written before, during and after the loss of server b).
raid1_recovered_alone() {
    mdadm --manage "$RAID_MD" --fail "$RAID_A"
    [ "$(mdstat "$RAID_MD")" = "[_U]" ] || die "md0 is $(mdstat "$RAID_MD"), expected [_U]"
    raid_verify
    umount "$WORK/$RAID_MNT_DIR"
    e2fsck -fn "$RAID_MD" >&2
    mdadm --stop "$RAID_MD"
    raid_detach "$RAID_A"
    raid_detach "$RAID_B"
}

raid1_cleanup() {
    if grep -q " $WORK/$RAID_MNT_DIR " /proc/mounts; then umount -l "$WORK/$RAID_MNT_DIR"; fi
    for md in "$RAID_MD" "$RAID_WM_MD"; do
        if [ -e "$(sysblk "$md")/md" ]; then mdadm --stop "$md"; fi
    done
    for d in "$RAID_A" "$RAID_B" "$RAID_W"; do
        if [ -e "$(sysblk "$d")/pid" ]; then nbd-client -d "$d"; fi
    done
}

raid1_checks() {
    local t0
    t0=$(now_cs)
    modprobe -a raid1 virtio_blk
    # The dead member's I/O errors stay in dmesg (the checks quote the
    # telling lines) instead of flooding the console between the results.
    dmesg -n 1
    # md throttles a resync to speed_limit_min whenever it sees other I/O;
    # nothing else runs here, so let it go at full speed.
    echo 1000000 >/proc/sys/dev/raid/speed_limit_min
    # mdadm keeps its map of running arrays in /run/mdadm.
    mkdir -p /run/mdadm
    chain_start
    check raid1-create raid1_create
    check raid1-kill-server-mid-write raid1_kill_mid_write
    check raid1-degraded-fs-works raid1_degraded_works
    check raid1-restart-add-recover raid1_replace
    check raid1-check-mismatch-cnt raid1_check_mismatch
    check raid1-recovered-member-alone raid1_recovered_alone
    chain_end
    if [ -n "$LAST_FAILED" ]; then check raid1-cleanup raid1_cleanup; fi
    echo "---- raid1: $(elapsed_since "$t0")"
}

# ------------------------------------------- RAM in front of a real disk

wm_create() {
    wait_until 10 test -b "$RAID_DISK" || die "no $RAID_DISK (the VM's disk)"
    raid_attach "$RAID_W" "$RAID_PORT_A" wm
    [ "$($BLOCKDEV --getsize64 "$RAID_DISK")" -ge "$($BLOCKDEV --getsize64 "$RAID_W")" ] ||
        die "$RAID_DISK is smaller than the export"
    raid_mdadm_create "$RAID_WM_MD" "$RAID_W" --write-mostly "$RAID_DISK"
    member_has "$RAID_WM_MD" "$RAID_DISK" write_mostly ||
        die "${RAID_DISK#/dev/} is '$(member_state "$RAID_WM_MD" "$RAID_DISK")', not write_mostly"
    mkfs.ext4 -q -F "$RAID_WM_MD"
    raid_mount "$RAID_WM_MD"
    : >"$WORK/$RAID_SUMS"
    WM_W0=$(dev_stat "$RAID_W" 7) WM_D0=$(dev_stat "$RAID_DISK" 7)
    raid_copy data large-10m-odd small/d0 small/d1
    sync
    note "writes during the copy: nbd3 $((($(dev_stat "$RAID_W" 7) - WM_W0) / 2048)) MiB, ${RAID_DISK#/dev/} $((($(dev_stat "$RAID_DISK" 7) - WM_D0) / 2048)) MiB"
    [ $(($(dev_stat "$RAID_DISK" 7) - WM_D0)) -ge $((10 * 2048)) ] ||
        die "the disk received less than the 10 MiB written"
}

wm_reads_from_ram() {
    local r0 d0 r d m
    r0=$(dev_stat "$RAID_W" 3) d0=$(dev_stat "$RAID_DISK" 3)
    raid_verify
    r=$((($(dev_stat "$RAID_W" 3) - r0) * 512)) d=$((($(dev_stat "$RAID_DISK" 3) - d0) * 512))
    note "reads for the verify: nbd3 (ramnbd) $((r / 1024)) KiB, ${RAID_DISK#/dev/} (write-mostly disk) $((d / 1024)) KiB"
    [ "$d" -eq 0 ] || die "the write-mostly disk served $d bytes of reads"
    [ "$r" -ge $((10 * MIB)) ] || die "ramnbd served only $r bytes of reads"
    # The server's side: everything nbd3 read since it was attached.
    m=$(host_ctl metric a 'ramnbd_request_bytes_total{export="wm",command="read"}')
    note "ramnbd's own count for export wm: $((m / 1024)) KiB read since the attach"
    [ "$m" -ge "$r" ] || die "ramnbd counted $m bytes read, the guest read $r from nbd3"
}

wm_server_killed() {
    local t_kill t_deg d0 d
    note "host: $(host_ctl kill a)"
    t_kill=$(now_cs)
    raid_copy after small/d2
    sync
    wait_until 120 md_degraded "$RAID_WM_MD" || die "md1 not degraded 120 s after the kill"
    t_deg=$(now_cs)
    note "kill -> md1 degraded: $(cs_to_s $((t_deg - t_kill))), md1 $(mdstat "$RAID_WM_MD")"
    member_faulty "$RAID_WM_MD" "$RAID_W" || die "nbd3 is '$(member_state "$RAID_WM_MD" "$RAID_W")', not faulty"
    d0=$(dev_stat "$RAID_DISK" 3)
    raid_verify
    d=$((($(dev_stat "$RAID_DISK" 3) - d0) * 512))
    note "the disk alone served $((d / 1024)) KiB of reads"
    [ "$d" -ge $((10 * MIB)) ] || die "the disk served only $d bytes: where did the files come from?"
    umount "$WORK/$RAID_MNT_DIR"
    e2fsck -fn "$RAID_WM_MD" >&2
    mdadm --stop "$RAID_WM_MD"
    raid_detach "$RAID_W"
}

write_mostly_checks() {
    local t0
    t0=$(now_cs)
    chain_start
    check raid1-write-mostly-create wm_create
    check raid1-write-mostly-reads-from-ram wm_reads_from_ram
    check raid1-write-mostly-ram-server-killed wm_server_killed
    chain_end
    if [ -n "$LAST_FAILED" ]; then check raid1-write-mostly-cleanup raid1_cleanup; fi
    echo "---- raid1 write-mostly: $(elapsed_since "$t0")"
}
