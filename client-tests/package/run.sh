#!/bin/bash
# The Debian package and what ships in it, on the host:
#   cargo deb -p ramnbd (installs cargo-deb if missing) -> lintian: no errors -> the file list
#   (binary, units, conffile, man pages, completions, docs, alert rules) -> its units pass
#   systemd-analyze verify -> its man pages render without warnings -> promtool check rules
#   and promtool test rules on the alert rules.
# The package itself is installed, used and purged in the systemd VM (systemd-vm/run.sh).
#
#   client-tests/package/run.sh
#
# Leaves target/debian/ramnbd_VERSION-1_amd64.deb; prints PASS/FAIL lines, lintian's output,
# and "N passed, N failed".
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=../lib/report.sh
. "$HERE/../lib/report.sh"
cd "$REPO"

need lintian lintian
need promtool prometheus
need systemd-analyze systemd
need man man-db
need dpkg-deb dpkg
if ! prereqs_ok; then
    summary
    exit 1
fi
if ! cargo deb --version >/dev/null 2>&1; then
    echo "package: installing cargo-deb"
    start=$SECONDS
    cargo install cargo-deb --locked || { fail cargo-deb "cargo install cargo-deb failed"; summary; exit 1; }
    echo "package: cargo-deb installed in $((SECONDS - start)) s"
fi

rm -f target/debian/ramnbd_*.deb
if cargo deb -p ramnbd --locked; then
    pass "cargo deb -p ramnbd" "$(cd target/debian && ls ramnbd_*.deb)"
else
    fail "cargo deb -p ramnbd"
    summary
    exit 1
fi
DEB=$(ls target/debian/ramnbd_*.deb)
echo "package: $DEB, $(du -k "$DEB" | cut -f1) KiB"

# lintian: errors fail. The warnings kept (and why) are in docs/operations.md, "Packaging".
echo "---- lintian $DEB ----"
lintian --fail-on error "$DEB" 2>&1 | grep -v "running with root privileges" | tee /tmp/lintian.$$
rc=${PIPESTATUS[0]}
echo "---- end of lintian (exit $rc) ----"
if ((rc == 0)) && ! grep -q "^E:" /tmp/lintian.$$; then
    pass "lintian: no errors" "$(grep -c "^W:" /tmp/lintian.$$) warnings"
else
    fail "lintian: errors (above)"
fi
rm -f /tmp/lintian.$$

CONTENTS=$(dpkg-deb -c "$DEB" | awk '{ print $6 }' | sed 's|^\./|/|')
missing_files=
for f in /usr/bin/ramnbd /lib/systemd/system/ramnbd.service /lib/systemd/system/ramnbd.socket \
    /lib/systemd/system/ramnbd-attach@.service /lib/systemd/system/ramnbd-attach-persist@.service \
    /lib/systemd/system/ramnbd-mkfs@.service /etc/ramnbd/ramnbd.toml \
    /usr/share/man/man8/ramnbd.8.gz /usr/share/man/man5/ramnbd.toml.5.gz \
    /usr/share/bash-completion/completions/ramnbd /usr/share/zsh/vendor-completions/_ramnbd \
    /usr/share/fish/vendor_completions.d/ramnbd.fish /usr/share/doc/ramnbd/copyright \
    /usr/share/doc/ramnbd/changelog.Debian.gz /usr/share/doc/ramnbd/operations.md \
    /usr/share/doc/ramnbd/examples/prometheus/ramnbd-rules.yml; do
    grep -qxF "$f" <<<"$CONTENTS" || missing_files+=" $f"
done
if [[ -z $missing_files ]]; then
    pass "the package holds the binary, units, conffile, man pages, completions, docs, rules"
else
    fail "the package lacks:$missing_files"
fi
if [[ $(dpkg-deb -f "$DEB" Depends) == "libc6 "* ]] &&
    dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles | grep -qx /etc/ramnbd/ramnbd.toml; then
    pass "Depends: only libc6; /etc/ramnbd/ramnbd.toml is a conffile"
else
    fail "control: Depends $(dpkg-deb -f "$DEB" Depends); conffiles $(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles)"
fi

X=$(mktemp -d)
trap 'rm -rf "$X"' EXIT
dpkg-deb -x "$DEB" "$X"
# verify resolves ExecStart= paths: the packaged binary stands in for /usr/bin/ramnbd.
mkdir -p "$X/units"
for unit in "$X"/lib/systemd/system/*; do
    sed "s|ExecStart=/usr/bin/ramnbd|ExecStart=$X/usr/bin/ramnbd|" "$unit" >"$X/units/$(basename "$unit")"
done
if out=$(cd "$X/units" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no \
    ./ramnbd.socket ./ramnbd.service ./ramnbd-attach@nbd0.service \
    ./ramnbd-attach-persist@nbd1.service ./ramnbd-mkfs@nbd0.service 2>&1) && [[ -z $out ]]; then
    pass "systemd-analyze verify: the packaged units"
else
    fail "systemd-analyze verify: the packaged units" "$out"
fi
if [[ $("$X/usr/bin/ramnbd" --version) =~ ^ramnbd\ [0-9.]+\ \(commit\ [0-9a-f]{12}(-dirty)?\)$ ]]; then
    pass "ramnbd --version names the commit" "$("$X/usr/bin/ramnbd" --version)"
else
    fail "ramnbd --version names the commit" "$("$X/usr/bin/ramnbd" --version)"
fi
for page in man8/ramnbd.8.gz man5/ramnbd.toml.5.gz; do
    # man's warnings (groff -ww) go to stderr: none allowed.
    warnings=$(MANWIDTH=80 man --warnings -l "$X/usr/share/man/$page" 2>&1 >"$X/page.txt")
    if [[ -z $warnings ]] && grep -q "ramnbd" "$X/page.txt" && (($(wc -l <"$X/page.txt") > 40)); then
        pass "man page $page renders without warnings" "$(wc -l <"$X/page.txt") lines"
    else
        fail "man page $page" "$warnings"
    fi
done

echo "---- promtool ----"
if (cd config/prometheus && promtool check rules ramnbd-rules.yml); then
    pass "promtool check rules ramnbd-rules.yml"
else
    fail "promtool check rules ramnbd-rules.yml"
fi
if (cd config/prometheus && promtool test rules ramnbd-rules.test.yml); then
    pass "promtool test rules: every alert fires on its recorded series, and only there"
else
    fail "promtool test rules ramnbd-rules.test.yml"
fi
summary
