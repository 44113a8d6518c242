# shellcheck shell=sh disable=SC3043,SC3040
# (SC3043/SC3040: `local` and `set -o pipefail` are not POSIX, but the two
# shells this file runs under, bash on hosts and busybox ash in the VM guest,
# both have them.)
#
# The shared check library: PASS/FAIL reporting, the test data tree, the
# filesystem cycle and the raw block-device checks.  Every path that puts a
# real kernel block device on an NBD export uses it (nbd.ko on a host, nbd.ko
# in the VM guest, nbdfuse + loop on the host); only the attach/detach step
# differs.  The caller defines three hooks:
#
#   dev_attach EXPORT MODE  make EXPORT ("" = the default export) a block
#                           device; MODE is a word list of path-specific
#                           options (nbd-client -b/-C, losetup --sector-size)
#   dev_detach              release it, returning once the kernel let go
#   dev_is_attached         succeed if the device is attached
#   dev_path                print the block device's path
#
# and sets WORK to an empty scratch directory.  The PASS/FAIL tally is
# lib/report.sh's, which the caller sources first.

set -o pipefail

# util-linux tools by absolute path: busybox ash runs its own applet for a
# bare `blkdiscard` or `blockdev` even when /usr/sbin comes first in PATH, and
# the applets lack options used here.
BLKDISCARD=/usr/sbin/blkdiscard
BLOCKDEV=/usr/sbin/blockdev
FSTRIM=/usr/sbin/fstrim

MIB=1048576
CHAIN=
CHAIN_BROKEN=
LAST_FAILED=

# ---------------------------------------------------------------- reporting

# Hundredths of a second since boot: /proc/uptime works the same in busybox
# and on hosts, where `date +%N` might not.
now_cs() {
    local up
    read -r up _ </proc/uptime
    echo "${up%.*}${up#*.}"
}

# elapsed_since CS: seconds since now_cs printed CS, as "12.34 s".
elapsed_since() {
    local d
    d=$(($(now_cs) - $1))
    printf '%d.%02d s\n' $((d / 100)) $((d % 100))
}

# note TEXT: an informational line from inside a check (fd 3 is the real
# stdout there; the check's own output goes to a log shown only on failure).
note() { echo "     $*" >&3; }

# chain_start / chain_end: the checks in between depend on each other; once
# one fails, the rest report FAIL ("not run") instead of running on a broken
# state.
chain_start() { CHAIN=1 CHAIN_BROKEN=; }
chain_end() { CHAIN='' CHAIN_BROKEN=''; }

# check NAME FUNC [ARGS...]: run FUNC in a subshell with errexit on and print
# one PASS/FAIL line with its wall time; on failure, show the tail of its
# output.  Call it as a plain statement: inside `if`, `&&` or `||` the shell
# ignores errexit, also in the subshell, and FUNC would run on after errors.
check() {
    local name="$1" t0 rc had_e=
    shift
    LAST_FAILED=1
    if [ -n "$CHAIN_BROKEN" ]; then
        fail "$name" "not run: $CHAIN_BROKEN failed"
        return 0
    fi
    case $- in *e*) had_e=1 ;; esac
    set +e
    t0=$(now_cs)
    (set -e; "$@") 3>&1 >"$WORK/check.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        pass "$name" "$(elapsed_since "$t0")"
        LAST_FAILED=
    else
        fail "$name" "exit $rc after $(elapsed_since "$t0")"
        tail -n 25 "$WORK/check.log" | sed 's/^/    | /'
        if [ -n "$CHAIN" ] && [ -z "$CHAIN_BROKEN" ]; then CHAIN_BROKEN=$name; fi
    fi
    if [ -n "$had_e" ]; then set -e; fi
    return 0
}

# die MESSAGE: fail the current check with a message in its log.
die() {
    echo "$*" >&2
    exit 1
}

# wait_until SECONDS CMD [ARGS...]: poll CMD every 0.1 s until it succeeds.
wait_until() {
    local tries=$(($1 * 10))
    shift
    while ! "$@"; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        sleep 0.1
    done
}

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# reattach EXPORT MODE: detach and attach again, then drop the page cache, so
# that the next reads come from what the server stored.
reattach() {
    dev_detach
    dev_attach "$1" "$2"
    drop_caches
}

# ---------------------------------------------------------------- test data

# make_tree DIR: the data written to every filesystem: more than 50 MiB of
# random content as a few large files, a few hundred small ones of varied,
# mostly unaligned sizes in nested directories, and an empty file.  Writes
# DIR.sha256 (checksums) and DIR.files (the sorted list of regular files).
make_tree() {
    local dir="$1" i size
    for i in 0 1 2 3 4 5 6 7 8 9; do
        mkdir -p "$dir/small/d$i/e0" "$dir/small/d$i/e1" "$dir/small/d$i/e2"
    done
    head -c $((24 * MIB)) /dev/urandom >"$dir/large-24m"
    head -c $((16 * MIB)) /dev/urandom >"$dir/large-16m"
    head -c $((10 * MIB + 4097)) /dev/urandom >"$dir/large-10m-odd"
    : >"$dir/empty"
    i=0
    while [ "$i" -lt 300 ]; do
        # Sizes from 1 byte to 16 KiB, spread by a multiplicative hash.
        size=$(((i * 2654435761) % 16384 + 1))
        head -c "$size" /dev/urandom >"$dir/small/d$((i % 10))/e$((i % 3))/f$i"
        i=$((i + 1))
    done
    # C collation: the list is made on the host and compared in the guest.
    (cd "$dir" && find . -type f | LC_ALL=C sort) >"$dir.files"
    (cd "$dir" && xargs sha256sum <"$dir.files") >"$dir.sha256"
    [ "$(du -sm "$dir" | cut -f1)" -ge 50 ] || die "tree under 50 MiB"
}

# verify_tree DIR TREE: DIR holds exactly TREE's files with TREE's contents.
verify_tree() {
    local dir="$1" tree="$2" bad
    (cd "$dir" && find . -type f | LC_ALL=C sort) >"$WORK/found.files"
    if ! cmp -s "$tree.files" "$WORK/found.files"; then
        diff "$tree.files" "$WORK/found.files" | head -n 20 >&2 || true
        die "file list differs: $(wc -l <"$WORK/found.files") files, expected $(wc -l <"$tree.files")"
    fi
    if ! (cd "$dir" && sha256sum -c "$tree.sha256") >"$WORK/sha.out" 2>&1; then
        bad=$(grep -cv ': OK$' "$WORK/sha.out")
        grep -v ': OK$' "$WORK/sha.out" | head -n 20 >&2 || true
        die "$bad of $(wc -l <"$tree.sha256") checksums differ"
    fi
    note "$(wc -l <"$tree.files") files verified"
}

# ---------------------------------------------------------- filesystem cycle

MNT_SUFFIX=mnt

fs_mkfs() {
    case $1 in
    ext4) mkfs.ext4 -q -F "$2" ;;
    xfs) mkfs.xfs -q -f "$2" ;;
    btrfs) mkfs.btrfs -q -f "$2" ;;
    *) die "unknown filesystem $1" ;;
    esac
}

fs_fsck() {
    case $1 in
    ext4) e2fsck -fn "$2" ;;
    xfs) xfs_repair -n "$2" ;;
    btrfs) btrfs check --readonly "$2" ;;
    esac
}

# The cycle's steps; each runs as one check.  Arguments: FS EXPORT MODE TREE.
step_mkfs() {
    dev_attach "$2" "$3"
    fs_mkfs "$1" "$(dev_path)"
}

step_write() {
    local mnt="$WORK/$MNT_SUFFIX"
    mkdir -p "$mnt"
    mount -t "$1" "$(dev_path)" "$mnt"
    cp -R "$4" "$mnt/data"
    sync
    umount "$mnt"
    dev_detach
}

step_verify() {
    local mnt="$WORK/$MNT_SUFFIX"
    dev_attach "$2" "$3"
    drop_caches
    mount -t "$1" "$(dev_path)" "$mnt"
    verify_tree "$mnt/data" "$4"
}

step_fstrim() {
    local out
    out=$($FSTRIM -v "$WORK/$MNT_SUFFIX")
    note "fstrim: ${out#*: }"
}

step_fsck() {
    umount "$WORK/$MNT_SUFFIX"
    fs_fsck "$1" "$(dev_path)"
    dev_detach
}

# cleanup_dev: after a failed check, unmount and detach whatever it left so
# that the next test starts clean.
cleanup_dev() {
    local mnt="$WORK/$MNT_SUFFIX"
    if grep -q " $mnt " /proc/mounts; then umount "$mnt"; fi
    if dev_is_attached; then dev_detach; fi
}

# cleanup_if_failed NAME: run cleanup_dev as check NAME-cleanup if the last
# check failed.
cleanup_if_failed() {
    if [ -n "$LAST_FAILED" ]; then check "$1-cleanup" cleanup_dev; fi
}

# fs_cycle FS EXPORT MODE TREE: mkfs, mount, write TREE, sync, unmount,
# detach, re-attach, drop caches, mount, verify every checksum and the file
# count, fstrim, unmount, fsck.  Checks are named FS-STEP; the whole cycle's
# time is printed after them.
fs_cycle() {
    local fs="$1" t0
    t0=$(now_cs)
    chain_start
    check "$fs-mkfs" step_mkfs "$@"
    check "$fs-write" step_write "$@"
    check "$fs-reattach-verify" step_verify "$@"
    check "$fs-fstrim" step_fstrim "$@"
    check "$fs-fsck" step_fsck "$@"
    chain_end
    cleanup_if_failed "$fs"
    echo "---- $fs: $(elapsed_since "$t0")"
}

# ------------------------------------------------------- raw device checks

# pattern_file NAME BYTES: a random file under WORK, printed as its path.
pattern_file() {
    head -c "$2" /dev/urandom >"$WORK/$1"
    echo "$WORK/$1"
}

# write_at DEV OFFSET FILE / read_hash DEV OFFSET BYTES: raw I/O at byte
# offsets (multiples of 4096).
write_at() {
    dd if="$3" of="$1" bs=4096 seek=$(($2 / 4096)) conv=notrunc,fsync 2>/dev/null
}

read_hash() {
    dd if="$1" bs=4096 skip=$(($2 / 4096)) count=$(($3 / 4096)) 2>/dev/null |
        sha256sum | cut -d' ' -f1
}

file_hash() { sha256sum <"$1" | cut -d' ' -f1; }
zero_hash() { head -c "$1" /dev/zero | sha256sum | cut -d' ' -f1; }

# expect_hash WHAT GOT WANT
expect_hash() {
    [ "$2" = "$3" ] || die "$1: read back sha256 $2, expected $3"
}

dev_size() { $BLOCKDEV --getsize64 "$(dev_path)"; }

# Raw checks on an export of at least 1 GiB.  Each writes, re-attaches and
# reads back, so it sees what the server stored, not the page cache.
RAW_RANGE_OFF=$((64 * MIB))
RAW_ZERO_OFF=$((256 * MIB))

raw_edges() {
    local size end first last
    dev_attach "$1" "$2"
    size=$(dev_size)
    [ $((size % 4096)) -eq 0 ] || die "size $size is not a multiple of 4096"
    end=$((size - MIB))
    first=$(pattern_file first "$MIB")
    last=$(pattern_file last "$MIB")
    write_at "$(dev_path)" 0 "$first"
    write_at "$(dev_path)" "$end" "$last"
    reattach "$1" "$2"
    expect_hash "first MiB" "$(read_hash "$(dev_path)" 0 "$MIB")" "$(file_hash "$first")"
    expect_hash "last MiB" "$(read_hash "$(dev_path)" "$end" "$MIB")" "$(file_hash "$last")"
    dev_detach
}

# zero_middle EXPORT MODE OFFSET BLKDISCARD_OPTION...: write 8 MiB of random
# data at OFFSET, clear the middle 4 MiB with blkdiscard (plain: a discard;
# -z: BLKZEROOUT), re-attach: the middle reads as zeroes, the 2 MiB on each
# side survive.  Notes the device's limits for both ways of clearing.
zero_middle() {
    local export="$1" mode="$2" off="$3" pat want queue
    shift 3
    dev_attach "$export" "$mode"
    queue=/sys/class/block/$(basename "$(dev_path)")/queue
    note "discard_max_bytes $(cat "$queue/discard_max_bytes"), write_zeroes_max_bytes $(cat "$queue/write_zeroes_max_bytes")"
    pat=$(pattern_file range $((8 * MIB)))
    write_at "$(dev_path)" "$off" "$pat"
    $BLKDISCARD "$@" -o $((off + 2 * MIB)) -l $((4 * MIB)) "$(dev_path)"
    reattach "$export" "$mode"
    cp "$pat" "$WORK/range.want"
    dd if=/dev/zero of="$WORK/range.want" bs="$MIB" seek=2 count=4 conv=notrunc 2>/dev/null
    want=$(file_hash "$WORK/range.want")
    expect_hash "8 MiB around the cleared range" \
        "$(read_hash "$(dev_path)" "$off" $((8 * MIB)))" "$want"
    dev_detach
}

raw_discard_range() { zero_middle "$1" "$2" "$RAW_RANGE_OFF"; }

# raw_write_zeroes: BLKZEROOUT ("zero it, keep it allocated").  A kernel
# whose block driver can offload it (nbd.ko from 6.12 on: write_zeroes_max_bytes
# > 0) sends WRITE_ZEROES with NO_HOLE; otherwise (6.1) the block layer writes
# pages of zeroes.  Either way the data must come out right; which of the two
# reached the server, the runner reads from the server's metrics.
raw_write_zeroes() {
    zero_middle "$1" "$2" "$RAW_ZERO_OFF" -z
}

# raw_discard_all: discard the whole device (the kernel splits it into
# requests of up to discard_max_bytes: 4 GiB - 512 for nbd.ko), then every
# range written by the checks above reads back as zeroes.
raw_discard_all() {
    local size max zero
    dev_attach "$1" "$2"
    size=$(dev_size)
    max=$(cat "/sys/class/block/$(basename "$(dev_path)")/queue/discard_max_bytes")
    note "device $size bytes, discard_max_bytes $max"
    [ "$size" -ge 1073741824 ] || die "export is under 1 GiB: no 1 GiB trim possible"
    [ "$max" -ge 1073741824 ] || die "discard_max_bytes $max < 1 GiB"
    $BLKDISCARD "$(dev_path)"
    reattach "$1" "$2"
    zero=$(zero_hash "$MIB")
    expect_hash "first MiB" "$(read_hash "$(dev_path)" 0 "$MIB")" "$zero"
    expect_hash "last MiB" "$(read_hash "$(dev_path)" $((size - MIB)) "$MIB")" "$zero"
    expect_hash "8 MiB at 64 MiB" "$(read_hash "$(dev_path)" "$RAW_RANGE_OFF" $((8 * MIB)))" \
        "$(zero_hash $((8 * MIB)))"
    expect_hash "8 MiB at 256 MiB" "$(read_hash "$(dev_path)" "$RAW_ZERO_OFF" $((8 * MIB)))" \
        "$(zero_hash $((8 * MIB)))"
    dev_detach
}

# raw_checks EXPORT MODE: independent checks, each cleaned up after a failure.
raw_checks() {
    check raw-write-read-edges raw_edges "$@"
    cleanup_if_failed raw-write-read-edges
    check raw-discard-range raw_discard_range "$@"
    cleanup_if_failed raw-discard-range
    check raw-write-zeroes raw_write_zeroes "$@"
    cleanup_if_failed raw-write-zeroes
    check raw-discard-whole-device raw_discard_all "$@"
    cleanup_if_failed raw-discard-whole-device
}
