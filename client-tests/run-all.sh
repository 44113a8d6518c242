#!/usr/bin/env bash
# The whole test suite, as the README's second set-up command and CI run it:
#   lint -> build -> Debian 13 client folder -> Rust unit and integration tests (raw client, nbd
#   crate, and libnbd, qemu, fio of both Debian 12 and Debian 13) -> fuzzing, 30 s per target
#   -> filesystems over nbdfuse + loop -> the kernel's nbd-client in a VM, twice: Debian 12's
#   kernel 6.1 with nbd-client 3.24, and Debian 13's 6.12 (which sends WRITE_ZEROES) with
#   nbd-client 3.26 -> the Debian package (lintian, man pages, promtool) -> systemd in a VM,
#   which installs and purges the package.
# Installs missing Debian packages first. A missing prerequisite is a failure, never a skip.
# The last line is the total: "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

passed=0
failed=0
failed_steps=()
step_times=()

# Runs one step, echoing its output, and adds its counts to the totals: cargo's "test result:"
# lines summed, or a script's last "N passed, N failed" line (its total; earlier such lines are
# sub-totals, e.g. the guest's inside a VM run). A step that exits non-zero without counting a
# failure still counts as one.
step() {
    local name=$1
    shift
    echo
    echo "=== $name: $*"
    local log start rc
    log=$(mktemp)
    start=$SECONDS
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local p f
    read -r p f < <(awk '
        /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
        /^[0-9]+ passed, [0-9]+ failed/ { last_p = $1; last_f = $3 }
        END { print p + last_p, f + last_f }' "$log")
    rm -f "$log"
    if ((rc != 0 && f == 0)); then
        f=1
    fi
    passed=$((passed + p))
    failed=$((failed + f))
    ((rc == 0)) || failed_steps+=("$name")
    echo "=== $name: exit $rc, $p passed, $f failed, $((SECONDS - start))s"
    step_times+=("$name $((SECONDS - start))s")
}

client-tests/install-deps.sh || { echo "installing dependencies failed"; echo "0 passed, 1 failed"; exit 1; }

step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets --locked -- -D warnings
step build cargo build --release --locked -p ramnbd
# Debian 13's clients (libnbd 1.22, qemu 10.0, fio 3.39, nbdkit 1.42, nbd-client 3.26), built once
# and cached in client-tests/.cache: every libnbd, qemu and fio test runs with both generations.
step trixie-clients client-tests/trixie/build.sh
# The integration tests and the scripts all drive this one optimised binary.
export RAMNBD_BIN=$repo/target/release/ramnbd
step cargo-test cargo test --workspace --locked
# The network-facing decoders and a whole session under libFuzzer, 30 s per target (the seed
# corpus in fuzz/corpus first); installs cargo-fuzz if it is missing.
step fuzz bash fuzz/run.sh 30
step fuse client-tests/fuse/run.sh
# The Debian package (cargo deb; installs cargo-deb if missing), lintian, its contents, the
# man pages, and promtool on the alert rules; the systemd VM installs this package.
step package client-tests/package/run.sh
step kernel-vm-6.1 client-tests/vm/run.sh 6.1
step kernel-vm-6.12 client-tests/vm/run.sh 6.12
step systemd-vm client-tests/systemd-vm/run.sh

echo
echo "step times: $(printf '%s, ' "${step_times[@]}" | sed 's/, $//'); total ${SECONDS}s"
if ((${#failed_steps[@]})); then
    echo "failed steps: ${failed_steps[*]}"
fi
echo "$passed passed, $failed failed"
((failed == 0))
