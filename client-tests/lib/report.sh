# shellcheck shell=sh disable=SC3043
# (SC3043: `local` is not POSIX, but bash, busybox ash and dash all have it.)
#
# The one reporting library of the test scripts: prerequisites (a missing one
# is a FAIL naming what to install, never a skip, with or without CI=true),
# the PASS/FAIL tally and the closing "N passed, N failed" line that
# run-all.sh and CI read.  Sourced by the host runners (bash) and by the test
# jobs inside the VMs (busybox ash in the kernel VM, dash in the systemd VM),
# so it is plain POSIX sh.

PASSED=0
FAILED=0
MISSING=

# pass NAME [DETAIL] / fail NAME [DETAIL]: one result line, counted.
pass() { PASSED=$((PASSED + 1)); echo "PASS $1${2:+  ($2)}"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $1${2:+  ($2)}"; }

# summary: the closing line; returns non-zero if anything failed.
summary() {
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
}

# ------------------------------------------------------------- prerequisites

# missing TEXT: record a prerequisite that is not there, saying how to get it.
missing() {
    MISSING="$MISSING$1
"
}

# need COMMAND PACKAGE / need_file PATH PACKAGE: record COMMAND (PATH) as
# missing, with the Debian package that provides it.
need() { command -v "$1" >/dev/null 2>&1 || missing "$1 (apt-get install $2)"; }
need_file() { [ -e "$1" ] || missing "$1 (apt-get install $2)"; }

# need_root WHY
need_root() { [ "$(id -u)" -eq 0 ] || missing "root (run as root: $1)"; }

# prereqs_ok: one FAIL line per missing prerequisite; fails if there was any.
prereqs_ok() {
    local m
    while IFS= read -r m; do
        if [ -n "$m" ]; then fail "prerequisite $m"; fi
    done <<EOF
$MISSING
EOF
    [ -z "$MISSING" ]
}

# ----------------------------------------------------- a child run's output

# relabel_summary NAME: filter for a child's live output (the CRs of a serial
# console dropped).  Its "N passed, N failed" line becomes "---- NAME: ...",
# so that the runner's own closing line is the only such line CI reads.
relabel_summary() {
    sed -u "s/\r\$//; s/^\([0-9]* passed, [0-9]* failed\)\$/---- $1: \1/"
}

# add_child_counts FILE: add the counts of the last summary line in FILE (a
# child's output) to this tally; fails if FILE has none.
add_child_counts() {
    local line failed
    line=$(tr -d '\r' <"$1" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n 1)
    [ -n "$line" ] || return 1
    failed=${line#*passed, }
    PASSED=$((PASSED + ${line%% passed*}))
    FAILED=$((FAILED + ${failed%% failed}))
}
