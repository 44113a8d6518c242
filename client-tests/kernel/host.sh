# shellcheck shell=bash
# Host-side helpers shared by the runners (kernel/run.sh on a host with
# nbd.ko, vm/run.sh, fuse/run.sh): prerequisites with their Debian packages,
# the export plan, and starting/stopping the server under test.  Sourced by
# bash scripts running with `set -euo pipefail`; it brings in lib/report.sh
# (prerequisites, PASS/FAIL tally), lib/ramnbd.sh (the server binary) and
# checks.sh (the checks).
#
# Environment:
#   RAMNBD_BIN   the server binary (default: cargo build --release -p ramnbd)
#   SERVER_CMD   run this bash command instead of ramnbd, with $PORT set to the
#                port it must listen on at 127.0.0.1, e.g. for a negative test:
#                SERVER_CMD='nbdkit -f -p $PORT null 1G' (drops writes), or
#                SERVER_CMD='while nbdkit -f -p $PORT --filter=exitlast memory 8G; do :; done'
#                (forgets everything whenever the last client disconnects).
#                It must serve the export names of the plan below (nbdkit
#                serves any name); the expected sizes are then taken from the
#                server (nbdinfo).  It has no ramnbd metrics, so the checks
#                that read them fail.

KERNEL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SERVER_CMD=${SERVER_CMD:-}

# shellcheck source=../lib/report.sh
. "$KERNEL_DIR/../lib/report.sh"
# shellcheck source=../lib/ramnbd.sh
. "$KERNEL_DIR/../lib/ramnbd.sh"
# shellcheck source=checks.sh
. "$KERNEL_DIR/checks.sh"

# --------------------------------------------------------------- export plan
# One place for the exports every path uses.  The names are passed to the
# test scripts through the environment.
export EXPORT_DEFAULT="" EXPORT_XFS=xfs EXPORT_BTRFS=btrfs EXPORT_RAW=big
# ramnbd's --export specs; the raw export is large enough for the kernel's
# biggest trims (4 GiB - 512 per request); RAM is only used for written data.
PLAN_SPECS=("=1G" "xfs=1G" "btrfs=1G" "big=8G")
PLAN_SIZES=(1073741824 1073741824 1073741824 8589934592)
PLAN_NAMES=("$EXPORT_DEFAULT" "$EXPORT_XFS" "$EXPORT_BTRFS" "$EXPORT_RAW")
# The sizes as the test scripts expect them, set by server_start.
export SIZE_DEFAULT SIZE_XFS SIZE_BTRFS SIZE_RAW

# ------------------------------------------------------------- prerequisites

# need_filesystem_tools: what the shared checks run on a device, wherever it comes from.
need_filesystem_tools() {
    need mkfs.ext4 e2fsprogs
    need e2fsck e2fsprogs
    need mkfs.xfs xfsprogs
    need xfs_repair xfsprogs
    need mkfs.btrfs btrfs-progs
    need btrfs btrfs-progs
    need_file "$BLKDISCARD" util-linux
    need_file "$BLOCKDEV" util-linux
    need_file "$FSTRIM" util-linux
}

# need_server: what starting and probing the server takes; finds (or builds)
# ramnbd unless SERVER_CMD replaces it.
need_server() {
    need nbdinfo libnbd-bin
    need ss iproute2
    need curl curl
    if [[ -z $SERVER_CMD ]]; then
        RAMNBD_BIN=$(ramnbd_bin) || missing "the ramnbd binary (see the message above)"
    fi
}

# ------------------------------------------------------------------- server

SERVER_PID=
SERVER_PORT=
SERVER_LOG=
# ramnbd's Prometheus endpoint (empty with SERVER_CMD).
METRICS_PORT=

port_listening() {
    [[ -n $(ss -Hltn "sport = :$1") ]]
}

# pick_port: a TCP port nothing on this host uses.
pick_port() {
    local port
    for _ in {1..100}; do
        port=$((20000 + RANDOM % 40000))
        if [[ -z $(ss -Htan "sport = :$port") ]]; then
            echo "$port"
            return
        fi
    done
    echo "no free TCP port found" >&2
    return 1
}

server_alive() {
    [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null
}

# export_uri NAME
export_uri() { echo "nbd://127.0.0.1:$SERVER_PORT/$1"; }

# server_start DIR: start the server on 127.0.0.1 and a free port (ramnbd
# also serves its metrics on another one), logging to DIR/server.log; wait
# until it answers; set SIZE_*.
server_start() {
    local dir=$1 i sizes=()
    SERVER_PORT=$(pick_port)
    SERVER_LOG=$dir/server.log
    METRICS_PORT=
    if [[ -n $SERVER_CMD ]]; then
        echo "server: $SERVER_CMD (PORT=$SERVER_PORT)"
        PORT=$SERVER_PORT setsid bash -c "$SERVER_CMD" </dev/null >"$SERVER_LOG" 2>&1 &
    else
        # --no-config: a host's /etc/ramnbd/ramnbd.toml must not add exports or listeners.
        for _ in 1 2 3; do
            METRICS_PORT=$(pick_port)
            [[ $METRICS_PORT == "$SERVER_PORT" ]] || break
        done
        local args=(--no-config -l "127.0.0.1:$SERVER_PORT" --metrics "127.0.0.1:$METRICS_PORT")
        for i in "${PLAN_SPECS[@]}"; do args+=(-e "$i"); done
        echo "server: $RAMNBD_BIN ${args[*]}"
        setsid "$RAMNBD_BIN" "${args[@]}" </dev/null >"$SERVER_LOG" 2>&1 &
    fi
    # setsid: the server leads its own process group, which server_stop
    # signals as a whole (SERVER_CMD may be a wrapper), and a Ctrl-C reaches
    # only this script, whose trap stops the server.
    SERVER_PID=$!
    for _ in {1..100}; do
        port_listening "$SERVER_PORT" && port_listening "${METRICS_PORT:-$SERVER_PORT}" && break
        server_alive || break
        sleep 0.1
    done
    if ! server_alive || ! port_listening "$SERVER_PORT" || ! port_listening "${METRICS_PORT:-$SERVER_PORT}"; then
        fail server-start "not listening on 127.0.0.1:$SERVER_PORT${METRICS_PORT:+ and :$METRICS_PORT (metrics)}"
        server_stop >/dev/null
        return 1
    fi
    for i in "${!PLAN_NAMES[@]}"; do
        if ! sizes[i]=$(nbdinfo --size "$(export_uri "${PLAN_NAMES[i]}")" 2>>"$SERVER_LOG.nbdinfo"); then
            fail server-start "nbdinfo cannot open export '${PLAN_NAMES[i]}'"
            cat "$SERVER_LOG.nbdinfo"
            server_stop >/dev/null
            return 1
        fi
        if [[ -z $SERVER_CMD && ${sizes[i]} -ne ${PLAN_SIZES[i]} ]]; then
            fail server-start "export '${PLAN_NAMES[i]}' has size ${sizes[i]}, configured ${PLAN_SIZES[i]}"
            server_stop >/dev/null
            return 1
        fi
    done
    SIZE_DEFAULT=${sizes[0]} SIZE_XFS=${sizes[1]} SIZE_BTRFS=${sizes[2]} SIZE_RAW=${sizes[3]}
    pass server-start "127.0.0.1:$SERVER_PORT, pid $SERVER_PID"
}

# metric 'NAME{LABELS}': the value of one sample of ramnbd's /metrics, e.g.
# 'ramnbd_requests_total{export="big",command="write_zeroes"}'; 0 when it is
# not listed (ramnbd lists only the commands an export has received).  Fails
# when there is no endpoint to read.
metric() {
    local text
    [[ -n $METRICS_PORT ]] || { echo "no ramnbd metrics endpoint (SERVER_CMD is not ramnbd)" >&2; return 1; }
    text=$(curl -fsS --max-time 10 "http://127.0.0.1:$METRICS_PORT/metrics") || return 1
    awk -v s="$1" '$1 == s { v = $2 } END { print v + 0 }' <<<"$text"
}

server_log_tail() {
    echo "---- server log (last 30 lines)"
    tail -n 30 "$SERVER_LOG" | sed 's/^/    | /'
}

# server_stop: SIGTERM must end the server with exit status 0 within 10 s.
# Reports server-stop (and shows the log tail on failure), unless the server
# was never started or is already stopped.
server_stop() {
    local rc=0
    [[ -n $SERVER_PID ]] || return 0
    if ! server_alive; then
        wait "$SERVER_PID" || rc=$?
        fail server-stop "server had already exited (status $rc)"
        server_log_tail
    else
        kill -TERM -- "-$SERVER_PID"
        for _ in {1..100}; do
            server_alive || break
            sleep 0.1
        done
        if server_alive; then
            kill -KILL -- "-$SERVER_PID"
            wait "$SERVER_PID" || true
            fail server-stop "still running 10 s after SIGTERM"
            server_log_tail
        else
            wait "$SERVER_PID" || rc=$?
            if [[ $rc -eq 0 ]]; then
                pass server-stop "SIGTERM, exit 0"
            else
                fail server-stop "exit status $rc after SIGTERM"
                server_log_tail
            fi
        fi
    fi
    # Whatever else a SERVER_CMD wrapper left in the group.
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
