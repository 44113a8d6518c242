#!/bin/bash
# The md RAID1 checks' servers on this host: two ramnbd processes ("a" and
# "b", each on its own port) besides the suite's main server, which the guest
# kills and restarts mid-run.  Two uses:
#
#   sourced by vm/run.sh     raid_servers_init DIR, raid_server_start NAME,
#                            raid_servers_stop (at the end: SIGTERM)
#   bash raid-servers.sh serve DIR
#                            the guest's control line: qemu runs this for each
#                            guest connection to the control port (guestfwd
#                            cmd:), stdin and stdout being the connection.  It
#                            reads one request line, acts, answers one line
#                            ("ok ..." or "error ...") and exits:
#                              kill NAME    SIGKILL the server, by the PID this
#                                           file recorded; returns once it is gone
#                              start NAME   start it again, same port, empty RAM
#                              metric NAME SAMPLE   a value of its /metrics
#
# State lives in DIR: env (ports, binary), NAME.pid, NAME.log.  A server
# started by `serve` is not vm/run.sh's child (qemu's relay starts it), so
# only the PID file ties it to the run; raid_servers_stop ends it.

RAID_SERVER_NAMES="a b"
# Every RAID server serves the same plan: the RAID1 member, and the write-mostly
# pair's RAM half (on "a").  Small, so that a full resync takes seconds under TCG.
RAID_SPECS=("=64M" "wm=64M")

# raid_servers_init DIR: pick the ports and write DIR/env for `serve`.
# Needs host.sh's pick_port; RAMNBD_BIN or SERVER_CMD.
raid_servers_init() {
    local dir=$1 n
    mkdir -p "$dir"
    {
        printf 'RAMNBD_BIN=%q\nSERVER_CMD=%q\n' "${RAMNBD_BIN:-}" "$SERVER_CMD"
        for n in $RAID_SERVER_NAMES; do
            printf 'PORT_%s=%q\nMETRICS_%s=%q\n' "$n" "$(pick_port)" "$n" "$(pick_port)"
        done
    } >"$dir/env"
    RAID_DIR=$dir
}

raid_env() {
    # shellcheck source=/dev/null # written by raid_servers_init
    . "$RAID_DIR/env"
}

raid_port() { raid_env && eval "echo \$PORT_$1"; }
raid_metrics_port() { raid_env && eval "echo \$METRICS_$1"; }

raid_pid() { cat "$RAID_DIR/$1.pid" 2>/dev/null || true; }

# pid_alive PID: running and not a zombie (a server started by `serve` is
# reaped by whoever inherits it, maybe late).
pid_alive() {
    [[ -n $1 ]] && kill -0 "$1" 2>/dev/null &&
        [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

raid_listening() { [[ -n $(ss -Hltn "sport = :$1") ]]; }

# raid_server_start NAME: start server NAME on its port (and its metrics
# port), wait until both listen.  Prints a one-line outcome; fails if it
# does not come up.
raid_server_start() {
    local name=$1 port metrics pid spec args
    raid_env
    port=$(raid_port "$name") metrics=$(raid_metrics_port "$name")
    [[ -n $port ]] || { echo "error: no server $name"; return 1; }
    if pid_alive "$(raid_pid "$name")"; then
        echo "error: server $name already runs (pid $(raid_pid "$name"))"
        return 1
    fi
    if [[ -n $SERVER_CMD ]]; then
        PORT=$port setsid bash -c "$SERVER_CMD" </dev/null >>"$RAID_DIR/$name.log" 2>&1 &
        metrics=$port
    else
        args=(--no-config -l "127.0.0.1:$port" --metrics "127.0.0.1:$metrics")
        for spec in "${RAID_SPECS[@]}"; do args+=(-e "$spec"); done
        echo "---- start: $RAMNBD_BIN ${args[*]}" >>"$RAID_DIR/$name.log"
        setsid "$RAMNBD_BIN" "${args[@]}" </dev/null >>"$RAID_DIR/$name.log" 2>&1 &
    fi
    pid=$!
    echo "$pid" >"$RAID_DIR/$name.pid"
    for _ in {1..100}; do
        raid_listening "$port" && raid_listening "$metrics" && break
        pid_alive "$pid" || break
        sleep 0.1
    done
    if ! raid_listening "$port" || ! raid_listening "$metrics"; then
        echo "error: server $name (pid $pid) is not listening on 127.0.0.1:$port"
        return 1
    fi
    echo "ok server $name pid $pid on 127.0.0.1:$port"
}

# raid_server_kill NAME: SIGKILL NAME's process group (its PID leads it:
# setsid), wait until it is gone and its port closed.
raid_server_kill() {
    local name=$1 pid port
    pid=$(raid_pid "$name") port=$(raid_port "$name")
    pid_alive "$pid" || { echo "error: server $name is not running"; return 1; }
    kill -KILL -- "-$pid"
    for _ in {1..100}; do
        ! pid_alive "$pid" && ! raid_listening "$port" && break
        sleep 0.05
    done
    if pid_alive "$pid" || raid_listening "$port"; then
        echo "error: server $name (pid $pid) survived SIGKILL"
        return 1
    fi
    echo "ok server $name pid $pid killed (SIGKILL)"
}

# raid_servers_stop: SIGTERM every RAID server still running; one PASS/FAIL
# line (report.sh) for all: each must be gone within 10 s.
raid_servers_stop() {
    local n pid left=() stopped=()
    [[ -n ${RAID_DIR:-} ]] || return 0
    for n in $RAID_SERVER_NAMES; do
        pid=$(raid_pid "$n")
        pid_alive "$pid" || continue
        kill -TERM -- "-$pid"
        stopped+=("$n")
    done
    ((${#stopped[@]})) || return 0
    for _ in {1..100}; do
        left=()
        for n in "${stopped[@]}"; do pid_alive "$(raid_pid "$n")" && left+=("$n"); done
        ((${#left[@]})) || break
        sleep 0.1
    done
    for n in "${left[@]}"; do kill -KILL -- "-$(raid_pid "$n")" 2>/dev/null || true; done
    if ((${#left[@]})); then
        fail raid-servers-stop "still running 10 s after SIGTERM: ${left[*]}"
    else
        pass raid-servers-stop "SIGTERM: ${stopped[*]} gone"
    fi
    rm -f "$RAID_DIR"/*.pid
}

# serve DIR: one request from the guest (see the top).
raid_serve() {
    local cmd name rest
    RAID_DIR=$1
    read -r cmd name rest || exit 0
    echo "---- guest request: $cmd $name $rest" >>"$RAID_DIR/control.log"
    case $cmd in
    start) raid_server_start "$name" ;;
    kill) raid_server_kill "$name" ;;
    metric)
        curl -fsS --max-time 10 "http://127.0.0.1:$(raid_metrics_port "$name")/metrics" |
            awk -v s="$rest" '$1 == s { v = $2 } END { print "ok " v + 0 }'
        ;;
    *) echo "error: unknown request '$cmd'" ;;
    esac 2>>"$RAID_DIR/control.log" | tee -a "$RAID_DIR/control.log"
}

if [[ ${BASH_SOURCE[0]} == "$0" && ${1:-} == serve ]]; then
    raid_serve "$2"
fi
