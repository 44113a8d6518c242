#!/bin/sh
# Installs ramnbd as a system service: the binary, the systemd units, the example
# configuration (unless one is there already) and the operator's documentation.
#
#   systemd/install.sh [--bin PATH] [--prefix /usr/local] [--sysconfdir /etc]
#                      [--unitdir /etc/systemd/system] [--destdir DIR] [--no-reload]
#
# --bin      the ramnbd binary to install (default: target/release/ramnbd, built with
#            `cargo build --release -p ramnbd`; or ~/.cargo/bin/ramnbd after
#            `cargo install --path server`)
# --prefix   the binary goes to PREFIX/bin; the units' ExecStart= is rewritten to match
# --destdir  stage everything under DIR (for packaging); nothing is reloaded then
#
# Afterwards:  systemctl enable --now ramnbd.socket     (see docs/operations.md)
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BIN=$REPO/target/release/ramnbd
PREFIX=/usr/local
SYSCONFDIR=/etc
UNITDIR=/etc/systemd/system
DESTDIR=
RELOAD=yes

while [ $# -gt 0 ]; do
    case $1 in
    --bin) BIN=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --sysconfdir) SYSCONFDIR=$2; shift 2 ;;
    --unitdir) UNITDIR=$2; shift 2 ;;
    --destdir) DESTDIR=$2; RELOAD=no; shift 2 ;;
    --no-reload) RELOAD=no; shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ ! -x "$BIN" ]; then
    echo "install.sh: no ramnbd binary at $BIN: run 'cargo build --release -p ramnbd' or give --bin" >&2
    exit 1
fi
# Refuse to install a configuration the binary would reject.
"$BIN" --check-config "$HERE/../config/ramnbd.toml" >/dev/null

echo "installing $BIN as $DESTDIR$PREFIX/bin/ramnbd"
install -D -m 0755 "$BIN" "$DESTDIR$PREFIX/bin/ramnbd"

mkdir -p "$DESTDIR$UNITDIR"
for unit in ramnbd.service ramnbd.socket ramnbd-attach@.service ramnbd-attach-persist@.service \
    ramnbd-mkfs@.service \
    mnt-ramdisk.mount; do
    # The units name /usr/local/bin/ramnbd; point them at the installed binary.
    sed "s|/usr/local/bin/ramnbd|$PREFIX/bin/ramnbd|g" "$HERE/$unit" >"$DESTDIR$UNITDIR/$unit.tmp"
    chmod 0644 "$DESTDIR$UNITDIR/$unit.tmp"
    mv "$DESTDIR$UNITDIR/$unit.tmp" "$DESTDIR$UNITDIR/$unit"
    echo "installed $DESTDIR$UNITDIR/$unit"
done

CONF=$DESTDIR$SYSCONFDIR/ramnbd/ramnbd.toml
if [ -e "$CONF" ]; then
    echo "kept the existing $CONF (the example is in $HERE/../config/ramnbd.toml)"
else
    install -D -m 0644 "$HERE/../config/ramnbd.toml" "$CONF"
    echo "installed $CONF"
fi
if [ -f "$REPO/docs/operations.md" ]; then
    install -D -m 0644 "$REPO/docs/operations.md" "$DESTDIR$PREFIX/share/doc/ramnbd/operations.md"
fi

if [ "$RELOAD" = yes ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "systemd reloaded. Next: systemctl enable --now ramnbd.socket"
else
    echo "not reloading systemd. Next: systemctl daemon-reload && systemctl enable --now ramnbd.socket"
fi
