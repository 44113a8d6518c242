#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS (default 60), one after another.
#
#   fuzz/run.sh [SECONDS]
#
# Needs cargo-fuzz, which it installs if missing (`cargo install cargo-fuzz --locked`: about
# two minutes on a 2-core machine), and nightly or, failing that, stable (see below).
# Building the targets takes about three minutes more the first time.
#
# Inputs the fuzzer finds go to fuzz/generated/<target>/ (not committed); the seeds in
# fuzz/corpus/<target>/ are read, never written. Prints the executions per target and exits
# non-zero on any crash, timeout or leak, naming the reproducer libFuzzer wrote under
# fuzz/artifacts/<target>/. Reproduce one, in fuzz/, with
#   cargo +nightly fuzz run -a <target> artifacts/<target>/<file>
# or, for the session target, natively on stable:
#   cargo run --release --example replay -- artifacts/session/<file>
set -euo pipefail

seconds=${1:-60}
cd "$(dirname "$0")"

# cargo-fuzz passes -Z flags (sanitizer, coverage) to rustc: nightly if the machine has it,
# else the stable toolchain with RUSTC_BOOTSTRAP, which accepts them (machines without
# network access to toolchains may have only stable).
if cargo +nightly --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    echo "run.sh: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1"
    toolchain=()
    export RUSTC_BOOTSTRAP=1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz"
    start=$SECONDS
    cargo install cargo-fuzz --locked
    echo "run.sh: cargo-fuzz installed in $((SECONDS - start)) s"
fi

# -a: debug assertions and overflow checks in the server code too.
cargo "${toolchain[@]}" fuzz build -a

# Per target: the longest input. Sessions stay small so each run is fast; the option parser
# needs room for a 4096-byte name, and so does a suspended session's state.
declare -A max_len=([request_decoder]=256 [option_parser]=8192 [session]=16384
                  [suspended_state]=8192 [negotiation_tls]=8192)
mkdir -p logs
failed=()
targets=(request_decoder option_parser session suspended_state negotiation_tls)
for target in "${targets[@]}"; do
    mkdir -p "generated/$target"
    log="logs/$target.log"
    echo "run.sh: $target for ${seconds}s (log: fuzz/$log)"
    status=0
    # -timeout: an input that takes this long is a hang and is reported as one.
    cargo "${toolchain[@]}" fuzz run -a "$target" "generated/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len="${max_len[$target]}" -timeout=30 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    last=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE)' "$log" | tail -1 || true)
    echo "run.sh: $target: ${execs:-?} executions; ${last:-no stats}"
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        echo "run.sh: $target FAILED (exit $status):"
        grep -E 'panicked|ERROR:|SUMMARY|Test unit written to|artifact' "$log" | head -20 || true
    fi
done

# The suite's tally: a target passes when its run found nothing.
echo "$((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
if [ ${#failed[@]} -ne 0 ]; then
    echo "run.sh: failures in: ${failed[*]}" >&2
    exit 1
fi
