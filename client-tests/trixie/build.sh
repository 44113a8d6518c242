#!/usr/bin/env bash
# Builds (once, then reuses) the Debian 13 "trixie" client folder: a debootstrapped root with
# the newer generation of every NBD client the tests drive, so that each libnbd, qemu and fio
# test runs against both generations (Debian 12's on the host, Debian 13's in here):
#
#   libnbd-bin python3-libnbd   libnbd 1.22: nbdinfo, nbdcopy, nbdsh; extended headers
#   qemu-utils                  qemu 10.0: qemu-io, qemu-img; extended headers
#   fio                         fio 3.39, whose nbd engine links libnbd 1.22
#   nbdkit                      nbdkit 1.42, the second comparison server in benchmarks
#   nbd-client e2fsprogs xfsprogs btrfs-progs   the guest userland of the Debian 13 kernel VM
#   file                        nbdinfo runs it to describe an export's content
#
# Output: client-tests/.cache/trixie/root (about 450 MiB), with a stamp file naming the package
# list; a changed list rebuilds it. Commands run in it through client-tests/trixie/run.
# Needs root (debootstrap, chroot). Prints the root's path on stdout.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=$(cd "$HERE/.." && pwd)/.cache/trixie
ROOT=$CACHE/root
PACKAGES=libnbd-bin,python3-libnbd,qemu-utils,fio,nbdkit,nbd-client,e2fsprogs,xfsprogs,btrfs-progs,file
STAMP="packages=$PACKAGES"

log() { echo "trixie: $*" >&2; }

if [[ -f $ROOT/.ramnbd-stamp && $(<"$ROOT/.ramnbd-stamp") == "$STAMP" ]]; then
    echo "$ROOT"
    exit 0
fi
((EUID == 0)) || { log "building the Debian 13 client folder needs root (debootstrap)"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap missing: apt-get install debootstrap"; exit 1; }

# The archive the host itself uses: the first deb.debian.org-style URI of the main archive in its
# apt sources (one-line or deb822 format).
mirror=$(grep -rhoE '(https?://[^ ]+/debian)/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
    grep -v -- '-security' | head -n 1 | tr -d ' ' | sed 's:/$::') || true
[[ -n $mirror ]] || mirror=http://deb.debian.org/debian
log "debootstrap trixie from $mirror (about a minute)"

mkdir -p "$CACHE"
tmp=$(mktemp -d "$CACHE/build.XXXXXX")
cleanup() {
    # debootstrap mounts proc and sys inside the target; never leave them behind.
    for m in proc sys dev/pts dev; do umount -l "$tmp/root/$m" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
mkdir -p "$CACHE/debs"
debootstrap --variant=minbase --arch=amd64 --cache-dir="$CACHE/debs" \
    --include="$PACKAGES" trixie "$tmp/root" "$mirror" >"$tmp/debootstrap.log" 2>&1 || {
    tail -n 30 "$tmp/debootstrap.log" >&2
    log "debootstrap failed"
    exit 1
}
for m in proc sys dev/pts dev; do umount -l "$tmp/root/$m" 2>/dev/null || true; done
chroot "$tmp/root" apt-get clean
echo "$STAMP" >"$tmp/root/.ramnbd-stamp"
rm -rf "$ROOT"
mv "$tmp/root" "$ROOT"
log "built $ROOT: $(chroot "$ROOT" nbdinfo --version | head -n 1), $(chroot "$ROOT" qemu-img --version | head -n 1)"
echo "$ROOT"
