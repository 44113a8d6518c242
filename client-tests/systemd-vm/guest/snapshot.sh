#!/bin/sh
# Images across a reboot, inside the VM with systemd as PID 1. run.sh boots this job twice
# with one persistent disk (/dev/vdb) mounted at /var/lib/private, where StateDirectory=ramnbd
# of the DynamicUser= service lives, so /var/lib/ramnbd/scratch.img survives the reboot.
#   boot 1: install, give the export an image (the example config's commented line), attach,
#           mkfs, mount, write data; `systemctl reload` (SIGHUP) while a writer writes: the
#           image must be a file system e2fsck can recover, as after a power cut; stop the
#           stack (the save on stop).
#   boot 2: install again (the root disk is a fresh snapshot), start the stack: the server
#           loads the image before it is ready, mkfs finds the file system, the data are there.
# Prints PASS/FAIL lines and exits with the number of failures.
S=/etc/sdvm
# shellcheck source=../../lib/report.sh # (in the guest: /etc/sdvm/lib/report.sh)
. "$S/lib/report.sh"
export SYSTEMD_PAGER= SYSTEMD_COLORS=0 LC_ALL=C
T0=$(cut -d' ' -f1 /proc/uptime)
stamp() { awk -v t0="$T0" '{ printf "%5.1fs", $1 - t0 }' /proc/uptime; }
check() {
    desc=$1
    shift
    if "$@" >/tmp/check.out 2>&1; then
        pass "$desc" "$(stamp)"
    else
        fail "$desc" "exit $?: $*; $(stamp)"
        tail -n 15 /tmp/check.out | sed 's/^/    | /'
    fi
}
# wait_journal TEXT: up to 60 s for a line of ramnbd.service's journal (this boot) with TEXT.
wait_journal() {
    n=0
    until journalctl -b -u ramnbd.service -o cat | grep -F -- "$1"; do
        [ $n -ge 600 ] && return 1
        sleep 0.1
        n=$((n + 1))
    done
}
# wait_saved REASON: up to 60 s for the "saved image" line of a save for REASON.
wait_saved() {
    n=0
    until journalctl -b -u ramnbd.service -o cat | grep "saved image" | grep -F "reason=\"$1\""; do
        [ $n -ge 600 ] && return 1
        sleep 0.1
        n=$((n + 1))
    done
}
STATE=/var/lib/private
IMAGE=/var/lib/ramnbd/scratch.img

if blkid -p /dev/vdb >/dev/null 2>&1; then BOOT=2; else BOOT=1; fi
echo "systemd-vm job: images across a reboot, boot $BOOT, kernel $(uname -r)"
[ $BOOT = 1 ] && mkfs.ext4 -q -L sdvm-state /dev/vdb
check "mount the persistent disk at $STATE" \
    sh -c "mkdir -p $STATE && mount /dev/vdb $STATE && chmod 700 $STATE"
check "apt-get install ./ramnbd_*.deb (offline); the example mount unit from its docs" \
    sh -c 'cp "$0/ramnbd.deb" /tmp/ && cd /tmp &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -q ./ramnbd.deb </dev/null &&
           cp /usr/share/doc/ramnbd/examples/mnt-ramdisk.mount /etc/systemd/system/' "$S"
# The unit ships StateDirectory=ramnbd and ExecReload= (SIGHUP): only the image is configured.
check "give the export the image of the example config's commented line" \
    sh -c "sed -i 's|^# image = \"$IMAGE\"|image = \"$IMAGE\"|' /etc/ramnbd/ramnbd.toml &&
           /usr/bin/ramnbd --check-config /etc/ramnbd/ramnbd.toml | tee /dev/stderr | grep -qF 'image $IMAGE'"
systemctl daemon-reload

if [ $BOOT = 1 ]; then
    check "start socket, server, attach, mkfs, mount" \
        sh -c 'systemctl start ramnbd.socket mnt-ramdisk.mount && findmnt /mnt/ramdisk >/dev/null'
    check "journal: no image yet, the export starts empty" wait_journal "no image yet"
    check "write 32 MiB and sync; keep the checksum on the persistent disk" \
        sh -c "dd if=/dev/urandom of=/mnt/ramdisk/data bs=1M count=32 status=none && sync &&
               sha256sum /mnt/ramdisk/data >$STATE/data.sha256"
    # A writer through the file system while the image is saved: direct writes reach the
    # device at once, and the journal commits every 100 ms.
    (
        i=0
        while [ ! -e /tmp/stop-writer ]; do
            dd if=/dev/urandom of=/mnt/ramdisk/churn bs=64k count=64 seek=$((i % 4 * 64)) \
                oflag=direct conv=notrunc status=none
            echo "$i" >>/mnt/ramdisk/log
            i=$((i + 1))
        done
    ) &
    sleep 2
    check "systemctl reload ramnbd.service (SIGHUP) while the writer writes" \
        systemctl reload ramnbd.service
    check "journal: the reload saved the image" wait_saved SIGHUP
    check "the writer was still writing after the save" \
        sh -c 'a=$(wc -l </mnt/ramdisk/log); sleep 1; b=$(wc -l </mnt/ramdisk/log); echo "$a -> $b"; [ "$b" -gt "$a" ]'
    journalctl -b -u ramnbd.service -o cat | grep "saved image" | cut -c1-220
    # Like after a power cut: replaying the journal must leave a file system without errors.
    check "the reloaded image is one moment of the file system: e2fsck finds no error" \
        sh -c "cp --sparse=always $IMAGE $STATE/reload.img &&
               { e2fsck -E journal_only -y $STATE/reload.img; [ \$? -le 1 ]; } &&
               e2fsck -fn $STATE/reload.img; rc=\$?; rm -f $STATE/reload.img; [ \$rc = 0 ]"
    touch /tmp/stop-writer
    wait
    check "stop mount, attach, server and socket (the server saves on stop)" \
        systemctl stop mnt-ramdisk.mount ramnbd-attach@nbd0.service ramnbd.service ramnbd.socket
    check "journal: the image was saved on stop" wait_saved stop
    check "the image is a sparse file of the export's 4 GiB" \
        sh -c "ls -ls $IMAGE; [ \$(stat -c %s $IMAGE) = 4294967296 ] &&
               [ \$(( \$(stat -c %b $IMAGE) * 512 )) -lt 1073741824 ]"
    check "ramnbd exited 0" \
        sh -c 'systemctl show -p ExecMainStatus -p Result ramnbd.service | tee /dev/stderr | grep -qx ExecMainStatus=0'
else
    check "start socket, server, attach, mount: the server loads the image" \
        sh -c 'systemctl start ramnbd.socket mnt-ramdisk.mount && findmnt /mnt/ramdisk >/dev/null'
    check "journal: the image was loaded before the server was ready" \
        sh -c 'journalctl -b -u ramnbd.service -o cat | tee /tmp/j.txt | grep "loaded image" &&
               [ $(grep -n -m1 "loaded image" /tmp/j.txt | cut -d: -f1) -lt $(grep -n -m1 "listening on\|socket activation" /tmp/j.txt | cut -d: -f1) ]'
    check "mkfs left the file system alone" \
        sh -c 'journalctl -b -o cat | grep -q "/dev/nbd0.* is not empty"'
    check "the data written before the reboot are there" sha256sum -c "$STATE/data.sha256"
    check "stop mount, attach, server and socket" \
        systemctl stop mnt-ramdisk.mount ramnbd-attach@nbd0.service ramnbd.service ramnbd.socket
    check "journal: no warnings or errors from ramnbd" \
        sh -c '! journalctl -b -u ramnbd.service -o cat -p warning | grep -v "^-- " | grep .'
fi
echo "---- journal of ramnbd.service ----"
journalctl -b -u ramnbd.service -o cat --no-pager | tail -n 25 | cut -c1-200
sync
umount "$STATE"
summary
exit "$FAILED"
