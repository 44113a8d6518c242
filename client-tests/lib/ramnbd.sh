# shellcheck shell=bash
# The one way the test scripts find the server under test, the same rule as
# the Rust harness (client-tests/src/server.rs): RAMNBD_BIN if set, else a
# fresh `cargo build --release -p ramnbd`, so that a script never runs a
# stale binary.  Sourced by bash scripts.

RAMNBD_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# ramnbd_bin: print the path of the ramnbd binary, building it if RAMNBD_BIN
# is unset (cargo's output goes to stderr).  Fails with a message saying what
# to fix.
ramnbd_bin() {
    local bin
    if [[ -n ${RAMNBD_BIN:-} ]]; then
        [[ -f $RAMNBD_BIN && -x $RAMNBD_BIN ]] ||
            { echo "RAMNBD_BIN=$RAMNBD_BIN is not an executable file" >&2; return 1; }
        echo "$RAMNBD_BIN"
        return
    fi
    command -v cargo >/dev/null ||
        { echo "cargo not found (install Rust from https://rustup.rs, or set RAMNBD_BIN)" >&2; return 1; }
    echo "cargo build --release -p ramnbd (set RAMNBD_BIN to use a built binary)" >&2
    (cd "$RAMNBD_REPO" && cargo build --release -q -p ramnbd --bin ramnbd >&2) ||
        { echo "cargo build --release -p ramnbd failed" >&2; return 1; }
    # CARGO_TARGET_DIR may be relative to the workspace, or absolute.
    bin=${CARGO_TARGET_DIR:-target}
    [[ $bin == /* ]] || bin=$RAMNBD_REPO/$bin
    bin=$bin/release/ramnbd
    [[ -x $bin ]] || { echo "cargo built ramnbd but $bin is missing" >&2; return 1; }
    echo "$bin"
}
