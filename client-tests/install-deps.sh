#!/usr/bin/env bash
# Installs the Debian 12 packages the test suite needs. Idempotent and quick when everything is
# already there (one dpkg query); needs root (or sudo) only when something is missing.
#
#   nbd-client              the kernel's NBD client (used inside the test VM)
#   libnbd-bin              nbdinfo, nbdcopy, nbdsh, nbdfuse
#   python3-libnbd          libnbd's Python binding, for /usr/bin/python3
#   qemu-utils              qemu-io, qemu-img
#   qemu-system-x86         TCG VMs for the kernel and systemd tests
#   busybox-static          the VM's initramfs userland
#   fio                     fio's nbd engine (verify runs and benchmarks)
#   fuse3                   nbdfuse's FUSE mounts on the host
#   e2fsprogs xfsprogs btrfs-progs   the filesystems under test
#   socat                   the per-connection relay behind qemu's guestfwd
#   curl                    reading the server's Prometheus metrics in the VM runs
#   nbdkit                  the comparison server in benchmarks
#   debootstrap             the systemd test VM's root filesystem
#   cpio xz-utils zstd      building initramfs images, unpacking kernel packages and modules
#                           (Debian 13's kernel is zstd-compressed, its modules .ko.xz)
#   procps util-linux mount iproute2   pgrep/ps, losetup/blkdiscard/prlimit/setpriv, mount, ss
#   systemd                 systemd-analyze verify and systemd-socket-activate (unit tests)
#   binutils                strip, to shrink the binary copied into the systemd VM
#   openssl                 the TLS tests' CA, server and client certificates (tls.rs, the kernel VM's tls part)
#   lintian                 checks the Debian package (client-tests/package/run.sh)
#   prometheus              promtool: checks and unit-tests the alert rules (it also installs
#                           Prometheus itself, which its package starts where systemd runs)
#   man-db                  renders the man pages the package ships
set -euo pipefail

packages=(nbd-client libnbd-bin python3-libnbd qemu-utils qemu-system-x86 busybox-static fio
          fuse3 e2fsprogs xfsprogs btrfs-progs socat nbdkit debootstrap cpio xz-utils zstd
          procps util-linux mount iproute2 systemd binutils curl lintian prometheus man-db openssl)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == installed ]] || missing+=("$pkg")
done
# qemu-system-x86 needs the qemu-utils of its own release; a newer qemu-utils from elsewhere
# (some images carry a backport) blocks its installation, so both come from bookworm together.
if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
    others=()
    for pkg in "${missing[@]}"; do
        [[ $pkg == qemu-utils || $pkg == qemu-system-x86 ]] || others+=("$pkg")
    done
    missing=("${others[@]}" qemu-utils/bookworm qemu-system-x86/bookworm)
fi
if ((${#missing[@]} == 0)); then
    exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=()
((EUID == 0)) || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}" >/dev/null
