#!/bin/sh
# The test job inside the VM, run by vm-job.service with systemd as PID 1. It installs ramnbd
# from its Debian package (apt, offline), then drives the real units: socket activation, Type=notify,
# attach (nbd-client), mkfs + mount, data, stop in order, re-attach, clean stop. Prints one
# PASS/FAIL line per check, the journal of the units, and exits with the number of failures.
S=/etc/sdvm
# pass, fail, summary: the tally every test script shares (client-tests/lib/report.sh).
# shellcheck source=../../lib/report.sh # (in the guest: /etc/sdvm/lib/report.sh)
. "$S/lib/report.sh"
export SYSTEMD_PAGER= SYSTEMD_COLORS=0 LC_ALL=C
T0=$(cut -d' ' -f1 /proc/uptime)

stamp() { awk -v t0="$T0" '{ printf "%5.1fs", $1 - t0 }' /proc/uptime; }
# check DESCRIPTION COMMAND...: PASS if the command succeeds; on failure show its output.
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
# since_cursor: a cursor for the journal as it is now.
since_cursor() { journalctl -n 0 --show-cursor -o cat | sed -n 's/^-- cursor: //p'; }
# journal_order FILE FIRST SECOND: in FILE (journal lines), FIRST appears before SECOND.
journal_order() {
    a=$(grep -n -m1 -F -- "$2" "$1" | cut -d: -f1)
    b=$(grep -n -m1 -F -- "$3" "$1" | cut -d: -f1)
    echo "'$2' at line ${a:-none}, '$3' at line ${b:-none}"
    [ -n "$a" ] && [ -n "$b" ] && [ "$a" -lt "$b" ]
}
service_running() { systemctl is-active --quiet ramnbd.service; }
# now_ms: wall-clock milliseconds (this is sh: no $EPOCHREALTIME).
now_ms() { echo $(($(date +%s%N) / 1000000)); }
# metric NAME{LABELS}: its value from the server's /metrics endpoint (bash's /dev/tcp).
cat >/tmp/metric <<'SCRIPT'
#!/bin/bash
exec 3<>/dev/tcp/127.0.0.1/9109 || exit 1
printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
tr -d '\r' <&3 | awk -v s="$1" '$1 == s { print $2 }'
SCRIPT
chmod 755 /tmp/metric
# writer TARGET BLOCKS STOPFILE [ACKED]: rewrites 4 KiB blocks of TARGET in turn with O_DIRECT
# (each write returns once the server has replied) until STOPFILE exists. Each block says
# which block and which write it is; a shadow copy in /run gets every write that succeeded
# (compare it with TARGET afterwards). A failed write is retried until it succeeds; if the
# last one failed, its block may hold either contents: /run/writer.unsure names it.
# ACKED, if given, gets the number of each write that succeeded, once it has (with dsync: the
# kernel also flushed). Prints "writes= errors= max_ms=": max_ms is the longest single write
# (failed or not), the longest pause the writer saw.
cat >/tmp/writer <<'SCRIPT'
#!/bin/bash
target=$1 blocks=$2 stop=$3 acked=${4:-}
shadow=/run/writer.shadow flags=direct
[ -n "$acked" ] && flags=direct,dsync && : >"$acked"
rm -f /run/writer.unsure
i=0 errors=0 max=0 failed=0
while [ ! -e "$stop" ]; do
    b=$((i % blocks))
    printf '%-4095s\n' "block $b write $i" >/run/writer.block
    t0=${EPOCHREALTIME/./}
    if dd if=/run/writer.block of="$target" bs=4096 seek=$b count=1 oflag=$flags conv=notrunc \
        status=none 2>>/run/writer.err; then
        t1=${EPOCHREALTIME/./}
        dd if=/run/writer.block of=$shadow bs=4096 seek=$b count=1 conv=notrunc status=none
        [ -n "$acked" ] && echo "$i" >>"$acked"
        i=$((i + 1)) failed=0
    else
        t1=${EPOCHREALTIME/./}
        errors=$((errors + 1)) failed=1
        sleep 0.05
    fi
    [ $((t1 - t0)) -gt $max ] && max=$((t1 - t0))
done
[ $failed = 1 ] && echo "$b" >/run/writer.unsure && cp /run/writer.block /run/writer.unsure.block
echo "writes=$i errors=$errors max_ms=$((max / 1000))"
SCRIPT
# same_blocks A B N: the N 4 KiB blocks of A and B are the same, except that the block the
# writer was unsure of may instead hold its last (failed) write.
cat >/tmp/same_blocks <<'SCRIPT'
#!/bin/bash
unsure=$(cat /run/writer.unsure 2>/dev/null)
for ((b = 0; b < $3; b++)); do
    cmp -s <(dd if="$1" bs=4096 skip=$b count=1 status=none) <(dd if="$2" bs=4096 skip=$b count=1 status=none) && continue
    if [ "$b" = "$unsure" ] && cmp -s <(dd if="$1" bs=4096 skip=$b count=1 status=none) /run/writer.unsure.block; then
        continue
    fi
    echo "block $b differs: $(dd if="$1" bs=4096 skip=$b count=1 status=none | head -c 40) / expected $(dd if="$2" bs=4096 skip=$b count=1 status=none | head -c 40)"
    exit 1
done
SCRIPT
chmod 755 /tmp/same_blocks
chmod 755 /tmp/writer

echo "systemd-vm job: $(systemctl --version | head -n1), kernel $(uname -r)"
# PID 1 logs notification messages (READY=1, STOPPING=1) at debug level only.
systemd-analyze log-level debug

# /tmp/install_package DEB: apt-get install of a local .deb, offline (its dependencies are in
# the image).
cat >/tmp/install_package <<'SCRIPT'
#!/bin/sh
DEBIAN_FRONTEND=noninteractive exec apt-get install -y -q "$1" </dev/null
SCRIPT
chmod 755 /tmp/install_package
cp "$S/ramnbd.deb" /tmp/ramnbd.deb
check "apt-get install ./ramnbd_*.deb (offline): binary, units, config, man pages" \
    sh -c 'cd /tmp && /tmp/install_package ./ramnbd.deb && dpkg -s ramnbd | grep -qx "Status: install ok installed"'
check "nothing enabled or started by the install (a RAM disk starts empty: the operator decides)" \
    sh -c '! systemctl is-enabled --quiet ramnbd.socket && ! systemctl is-active --quiet ramnbd.socket'
check "man 8 ramnbd and man 5 ramnbd.toml render" \
    sh -c 'MANWIDTH=80 man 8 ramnbd 2>&1 | tee /tmp/man8.txt | grep -q -- "--max-connections-per-client" &&
           MANWIDTH=80 man 5 ramnbd.toml 2>&1 | grep -q "shutdown-grace" && head -n 12 /tmp/man8.txt'
check "the example mount unit from the package's docs, in /etc/systemd/system" \
    sh -c 'cp /usr/share/doc/ramnbd/examples/mnt-ramdisk.mount /etc/systemd/system/ && systemctl daemon-reload'
check "ramnbd --check-config accepts the installed /etc/ramnbd/ramnbd.toml" \
    /usr/bin/ramnbd --check-config /etc/ramnbd/ramnbd.toml
check "turn on metrics in /etc/ramnbd/ramnbd.toml" \
    sh -c 'sed -i "s|^# listen = \"127.0.0.1:9109\"|listen = \"127.0.0.1:9109\"|" /etc/ramnbd/ramnbd.toml &&
           /usr/bin/ramnbd --check-config /etc/ramnbd/ramnbd.toml | grep -q "metrics: 127.0.0.1:9109"'
check "systemctl enable --now ramnbd.socket" systemctl enable --now ramnbd.socket
check "PID 1 listens on 127.0.0.1:10809 and /run/ramnbd/ramnbd.sock" \
    sh -c 'ss -Hltn "sport = 10809" | grep -q 127.0.0.1:10809 && test -S /run/ramnbd/ramnbd.sock'
check "ramnbd.service is not running before the first client" sh -c '! systemctl is-active --quiet ramnbd.service'

# The mount pulls in ramnbd-mkfs@nbd0 -> ramnbd-attach@nbd0 -> (first connection) ramnbd.service.
check "systemctl start mnt-ramdisk.mount (attach, mkfs, mount)" systemctl start mnt-ramdisk.mount
check "ramnbd.service was started by the socket and is active" service_running
check "ramnbd serves the 2 inherited sockets and binds nothing itself" \
    sh -c 'journalctl -b -u ramnbd.service -o cat | grep "socket activation: serving the inherited sockets" | grep -q "sockets=2"'
check "READY=1 and STATUS= reached PID 1 from ramnbd's main PID" \
    sh -c 'journalctl -b -o cat | grep "ramnbd.service: Got notification message" | grep -q "READY=1"'
check "STATUS= names the export and its size" \
    sh -c 'systemctl show -P StatusText ramnbd.service | tee /dev/stderr | grep -qF "serving 1 export (\"scratch\" 4 GiB)"'
check "the service runs as a dynamic user, not root" \
    sh -c 'u=$(ps -o user= -p "$(systemctl show -P MainPID ramnbd.service)"); echo "user $u"; [ "$u" != root ]'
check "its only capability is CAP_SYS_RESOURCE" \
    sh -c 'pid=$(systemctl show -P MainPID ramnbd.service); [ "$pid" -gt 0 ] &&
           grep -E "^Cap(Eff|Bnd)" /proc/$pid/status &&
           [ "$(awk "/^CapEff/ { print \$2 }" /proc/$pid/status)" = 0000000001000000 ] &&
           [ "$(awk "/^CapBnd/ { print \$2 }" /proc/$pid/status)" = 0000000001000000 ]'
check "/dev/nbd0 is attached with 4 KiB blocks" \
    sh -c 'test -e /sys/block/nbd0/pid && [ "$(cat /sys/block/nbd0/queue/logical_block_size)" = 4096 ]'
check "/mnt/ramdisk is an ext4 file system on /dev/nbd0" \
    sh -c 'findmnt -n -o SOURCE,FSTYPE /mnt/ramdisk | tee /dev/stderr | grep -q "/dev/nbd0 *ext4"'

check "write 16 MiB and sync" \
    sh -c 'dd if=/dev/urandom of=/mnt/ramdisk/data bs=1M count=16 status=none && sync && sha256sum /mnt/ramdisk/data >/tmp/data.sha256'
check "read it back through the kernel after dropping caches" \
    sh -c 'echo 3 >/proc/sys/vm/drop_caches && sha256sum -c /tmp/data.sha256'
check "metrics: the sandboxed server counts writes and sees its resident RAM (mincore allowed)" \
    sh -c 'w=$(/tmp/metric "ramnbd_requests_total{export=\"scratch\",command=\"write\"}");
           r=$(/tmp/metric "ramnbd_export_resident_bytes{export=\"scratch\"}");
           a=$(/tmp/metric "ramnbd_export_allocated_bytes{export=\"scratch\"}");
           echo "writes=$w resident=$r allocated=$a";
           [ "${w:-0}" -gt 0 ] && [ "${r:-0}" -ge 16777216 ] && [ "${a:-0}" -ge 16777216 ]'

# Restarts and an upgrade under a writer: the server hands every connection over to the fd
# store and the next process resumes it, so the kernel sees a pause, not a disconnect.
check "a 1 MiB file for the writer, written and synced" \
    sh -c 'dd if=/dev/zero of=/mnt/ramdisk/w bs=1M count=1 status=none && sync && cp /mnt/ramdisk/w /run/writer.shadow'
# restart_round N WHAT [COMMAND...]: the writer runs while ramnbd.service is restarted (by
# COMMAND, default systemctl restart); one line of figures.
restart_round() {
    n_round=$1
    what=$2
    shift 2
    [ $# -gt 0 ] || set -- systemctl restart ramnbd.service
    cursor=$(since_cursor)
    old_pid=$(systemctl show -P MainPID ramnbd.service)
    rm -f /run/writer.stop
    /tmp/writer /mnt/ramdisk/w 256 /run/writer.stop >/run/writer.out 2>&1 &
    wpid=$!
    sleep 0.5
    t0=$(now_ms)
    "$@" >/run/restart.out 2>&1
    t1=$(now_ms)
    sleep 0.5
    touch /run/writer.stop
    wait $wpid
    new_pid=$(systemctl show -P MainPID ramnbd.service)
    journalctl --after-cursor="$cursor" -u ramnbd.service -o cat >/run/round.txt
    # journald writes what it is sent asynchronously: give the resumed session's line a moment.
    grep -q "transmission resumed" /run/round.txt ||
        { sleep 1; journalctl --after-cursor="$cursor" -u ramnbd.service -o cat >/run/round.txt; }
    handed=$(grep -o "handed over [0-9]* connections with [0-9]* bytes pending" /run/round.txt | head -n 1)
    adopted=$(grep -c "adopted stored disk" /run/round.txt)
    resumed=$(grep -c "transmission resumed" /run/round.txt)
    echo "restart $n_round ($what): pid $old_pid -> $new_pid, systemctl restart $((t1 - t0)) ms; ${handed:-nothing handed over}; disks adopted $adopted, connections resumed $resumed; writer $(cat /run/writer.out)" | tee -a /tmp/restarts.txt
    [ "$new_pid" != "$old_pid" ] && [ -n "$handed" ] && [ "$adopted" -ge 1 ] && [ "$resumed" -ge 1 ] &&
        grep -q " errors=0 " /run/writer.out
}
: >/tmp/restarts.txt
dmesg -C
for i in 1 2 3 4 5; do
    check "restart $i under the writer: connection handed over and resumed, no write failed" restart_round $i restart
done
# The upgrade: a package of a different binary (the same build with bytes appended: another
# file, another checksum, as a new release would be) and a higher version, installed with apt
# under the writer: prerm leaves the server running, postinst try-restarts it.
check "build an upgrade package (version +upgrade, the binary changed)" \
    sh -c 'rm -rf /tmp/up && dpkg-deb -R /tmp/ramnbd.deb /tmp/up && rm -rf /tmp/up/usr/lib/debug &&
           printf "upgrade" >>/tmp/up/usr/bin/ramnbd && cp /tmp/up/usr/bin/ramnbd /tmp/ramnbd.new &&
           sed -i "s/^Version: .*/&+upgrade/" /tmp/up/DEBIAN/control &&
           dpkg-deb -Zgzip -z1 -b /tmp/up /tmp/ramnbd-upgrade.deb >/dev/null'
check "restart 6: apt-get install of the upgrade under the writer: handed over, no write failed" \
    restart_round 6 "package upgrade" sh -c 'cd /tmp && /tmp/install_package ./ramnbd-upgrade.deb'
check "the upgrade is installed" sh -c 'dpkg-query -W -f="\${Version}\n" ramnbd | grep -q "+upgrade$"'
echo "---- restarts ----"
cat /tmp/restarts.txt
check "the writer's data reads back from the device after dropping caches" \
    sh -c 'echo 3 >/proc/sys/vm/drop_caches && cmp /mnt/ramdisk/w /run/writer.shadow'
check "the 16 MiB file written before the restarts is intact" \
    sh -c 'echo 3 >/proc/sys/vm/drop_caches && sha256sum -c /tmp/data.sha256'
check "no I/O error or dead connection in dmesg during the restarts" \
    sh -c 'dmesg | grep -E "nbd|EXT4|I/O error|blk_update" | tee /dev/stderr | grep -E "I/O error|Dead connection|Receive control failed|shutting down" && exit 1; exit 0'
check "the running server is the upgraded binary" \
    sh -c 'pid=$(systemctl show -P MainPID ramnbd.service); cmp /proc/$pid/exe /tmp/ramnbd.new'
check "six restarts in the journal, each adopting the disk; NRestarts=0 (no automatic restart)" \
    sh -c 'a=$(journalctl -b -u ramnbd.service -o cat | grep -c "adopted stored disk"); r=$(systemctl show -P NRestarts ramnbd.service);
           echo "adopted=$a NRestarts=$r"; [ "$a" -eq 6 ] && [ "$r" -eq 0 ]'

check "systemctl stop mnt-ramdisk.mount" systemctl stop mnt-ramdisk.mount
check "fsck -n: the file system is clean after the restarts" fsck.ext4 -n -f /dev/nbd0
check "systemctl stop ramnbd-attach@nbd0.service (nbd-client -d)" systemctl stop ramnbd-attach@nbd0.service
check "/dev/nbd0 is detached" sh -c '! test -e /sys/block/nbd0/pid'
check "the server keeps running with no client" service_running

check "re-attach and re-mount: mkfs leaves the existing file system alone" systemctl start mnt-ramdisk.mount
check "the data survived the detach (same server, same RAM)" sh -c 'sha256sum -c /tmp/data.sha256'
check "journal: systemd-makefs saw the file system and skipped mkfs" \
    sh -c 'journalctl -b -o cat | grep -q "/dev/nbd0.* is not empty"'

# Mount at boot: the mount is WantedBy=remote-fs.target; starting that target is what boot does.
check "systemctl stop mnt-ramdisk.mount ramnbd-attach@nbd0.service" \
    systemctl stop mnt-ramdisk.mount ramnbd-attach@nbd0.service
check "systemctl enable mnt-ramdisk.mount" systemctl enable mnt-ramdisk.mount
check "starting remote-fs.target (as at boot) mounts /mnt/ramdisk" \
    sh -c 'systemctl start remote-fs.target && findmnt /mnt/ramdisk >/dev/null && sha256sum -c /tmp/data.sha256'

# Stopping everything in one transaction, as shutdown does (shutdown.target conflicts with
# every unit): the ordering (After=) must unmount, then detach, then stop the server. Note:
# `systemctl stop A B C` is not one transaction (one job per unit, each may start at once).
mkdir -p /run/systemd/system
cat >/run/systemd/system/sdvm-stop.target <<'UNIT'
[Unit]
Description=Stop the ramnbd stack in one transaction, like shutdown.target
Conflicts=ramnbd.socket ramnbd.service ramnbd-attach@nbd0.service ramnbd-mkfs@nbd0.service mnt-ramdisk.mount
UNIT
systemctl daemon-reload
CURSOR=$(since_cursor)
check "one transaction stops server, socket, attach, mkfs and mount" \
    systemctl start sdvm-stop.target
# journald writes what it is sent asynchronously: wait for the transaction's last message.
n=0
until journalctl --after-cursor="$CURSOR" -o cat | grep -q "Closed ramnbd.socket" || [ $n -ge 50 ]; do
    sleep 0.1
    n=$((n + 1))
done
journalctl --after-cursor="$CURSOR" -o short-monotonic --no-pager >/tmp/stop.txt
journalctl --after-cursor="$CURSOR" -o short-monotonic --no-pager -p info >/tmp/stop-info.txt
dmesg | grep -E "nbd|EXT4|JBD2|I/O error" >/tmp/dmesg.txt || true
check "stop order: unmount before nbd-client -d" \
    journal_order /tmp/stop.txt "Unmounted mnt-ramdisk.mount" "Executing: /usr/sbin/nbd-client -d /dev/nbd0"
# Compare two lines of PID 1: journald writes lines from different senders (PID 1's datagrams,
# the server's stdout stream) in the order it reads them, which on a loaded VM is not the order
# they were sent ("SIGTERM received" from the server came before PID 1's "Stopping
# ramnbd.service", which PID 1 logs right after sending that SIGTERM).
check "stop order: nbd-client -d finished before the server got SIGTERM" \
    journal_order /tmp/stop.txt "ramnbd-attach@nbd0.service: Deactivated successfully" "Stopping ramnbd.service"
check "no I/O error on /dev/nbd0 (the device never lost its server)" \
    sh -c '! grep -E "I/O error|Dead connection|Receive control failed" /tmp/dmesg.txt'
echo "---- the combined stop, from the journal ----"
grep -E "ramnbd|nbd0|mnt-ramdisk" /tmp/stop-info.txt | head -n 40 | cut -c1-180
echo "---- kernel messages about nbd0 ----"
tail -n 20 /tmp/dmesg.txt
check "STOPPING=1 reached PID 1" \
    sh -c 'journalctl -b -o cat | grep "ramnbd.service: Got notification message" | grep -q "STOPPING=1"'
check "ramnbd exited 0 after a clean stop" \
    sh -c 'systemctl show -p ExecMainStatus -p ExecMainCode -p Result ramnbd.service >/tmp/show.txt; cat /tmp/show.txt; grep -qx ExecMainCode=1 /tmp/show.txt && grep -qx ExecMainStatus=0 /tmp/show.txt && grep -qx Result=success /tmp/show.txt'
check "journal: the server said it stopped" \
    sh -c 'journalctl -b -u ramnbd.service -o cat | grep -q "stopped"'
check "ramnbd made itself an I/O flusher (no \"not an I/O flusher\" in the journal)" \
    sh -c '! journalctl -b -u ramnbd.service -o cat | grep "not an I/O flusher"'
check "journal: no warnings or errors from ramnbd" \
    sh -c '! journalctl -b -u ramnbd.service -o cat -p warning | grep -v "^-- " | grep .'

# Socket activation again: a new client gets a fresh (empty) disk.
check "systemctl start ramnbd.socket; a new attach starts a fresh server" \
    sh -c 'systemctl start ramnbd.socket && systemctl start ramnbd-attach@nbd0.service && systemctl is-active --quiet ramnbd.service'
check "after a stop the disk is empty (systemctl stop released the fd store; restarts keep it)" \
    sh -c '[ -z "$(blkid -p /dev/nbd0)" ]'

# A crash: SIGKILL while a writer writes to the raw device (O_DIRECT + dsync, each write
# logged once acknowledged). PID 1 restarts ramnbd (Restart=on-failure), which adopts the disk
# from the fd store; the persist-mode client reconnects. Every acknowledged write must read
# back.
check "attach with the reconnecting client (ramnbd-attach-persist@nbd0: nbd-client -nonetlink -persist)" \
    sh -c 'systemctl stop ramnbd-attach@nbd0.service && systemctl start ramnbd-attach-persist@nbd0.service &&
           n=0; until [ -e /sys/block/nbd0/pid ] || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done; test -e /sys/block/nbd0/pid'
crash_round() {
    cursor=$(since_cursor)
    old_pid=$(systemctl show -P MainPID ramnbd.service)
    dmesg -C
    rm -f /run/writer.stop
    dd if=/dev/zero of=/run/writer.shadow bs=4096 count=64 status=none
    /tmp/writer /dev/nbd0 64 /run/writer.stop /run/acked >/run/writer.out 2>&1 &
    wpid=$!
    sleep 1.5
    before=$(wc -l </run/acked)
    systemctl kill -s SIGKILL ramnbd.service
    t0=$(now_ms)
    n=0
    until { pid=$(systemctl show -P MainPID ramnbd.service); [ "$pid" != 0 ] && [ "$pid" != "$old_pid" ] && service_running; } || [ $n -ge 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    t1=$(now_ms)
    # The writer keeps going until it has had 5 more acknowledged writes (the client has
    # reconnected), or 20 s.
    n=0
    until [ "$(wc -l </run/acked)" -ge $((before + 5)) ] || [ $n -ge 200 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    touch /run/writer.stop
    wait $wpid
    echo "kill -9: pid $old_pid -> $pid after $((t1 - t0)) ms; acknowledged before the kill: $before, in all: $(wc -l </run/acked); writer $(cat /run/writer.out)" | tee /tmp/crash.txt
    journalctl --after-cursor="$cursor" -u ramnbd.service -o cat | grep -E "adopted stored disk|Main process exited|Scheduled restart" | tee -a /tmp/crash.txt
    [ "$pid" != "$old_pid" ] && [ "$(wc -l </run/acked)" -ge $((before + 5)) ]
}
check "SIGKILL during writes: PID 1 restarts ramnbd and the client reconnects" crash_round
check "NRestarts=1 and the journal says the disk was adopted after the kill" \
    sh -c 'r=$(systemctl show -P NRestarts ramnbd.service); echo "NRestarts=$r"; [ "$r" -eq 1 ] && grep -q "adopted stored disk" /tmp/crash.txt'
# Block b holds the last acknowledged write to it: the shadow has every acknowledged write.
check "every acknowledged write reads back after the restart (64 blocks, O_DIRECT)" \
    sh -c 'dd if=/dev/nbd0 of=/run/readback bs=4096 count=64 iflag=direct status=none && /tmp/same_blocks /run/readback /run/writer.shadow 64'
echo "---- the crash ----"
cat /tmp/crash.txt
echo "---- what the kernel saw during the crash ----"
dmesg | grep -E "nbd|I/O error|blk_update" | head -n 20 | tee /tmp/crash-dmesg.txt
echo "I/O errors in dmesg: $(grep -c "I/O error" /tmp/crash-dmesg.txt)"
check "systemctl stop ramnbd-attach-persist@nbd0.service (nbd-client -d)" \
    sh -c 'systemctl stop ramnbd-attach-persist@nbd0.service && ! test -e /sys/block/nbd0/pid'
check "systemctl stop ramnbd.service ramnbd.socket" \
    systemctl stop ramnbd.service ramnbd.socket

# The package as an operator uses it: a memory cap, the socket enabled, the packaged attach
# unit, a file system; a warning provoked (writes over the cap) and read back from the journal
# with its priority and fields; then apt-get purge with all of it running and enabled.
echo "---- the package: enable, attach, file system, a warning in the journal, purge ----"
check "a memory cap of 96 MiB in /etc/ramnbd/ramnbd.toml ([memory] max-memory)" \
    sh -c 'sed -i "s|^# max-memory = \"16G\" .*|max-memory = \"96M\"|" /etc/ramnbd/ramnbd.toml &&
           grep -qx "max-memory = \"96M\"" /etc/ramnbd/ramnbd.toml && /usr/bin/ramnbd --check-config >/dev/null'
check "systemctl enable --now ramnbd.socket" \
    sh -c 'systemctl enable --now ramnbd.socket && systemctl is-enabled --quiet ramnbd.socket'
check "attach with the packaged unit: systemctl start ramnbd-attach@nbd0.service" \
    sh -c 'systemctl start ramnbd-attach@nbd0.service && test -e /sys/block/nbd0/pid'
check "mkfs.ext4, mount, write 8 MiB, unmount, drop caches, mount, read it back" \
    sh -c 'mkfs.ext4 -q -F -J size=8 -E lazy_itable_init=1,lazy_journal_init=1 /dev/nbd0 && mkdir -p /mnt/pkg &&
           mount -o noinit_itable /dev/nbd0 /mnt/pkg && dd if=/dev/urandom of=/mnt/pkg/data bs=1M count=8 status=none &&
           sync && sha256sum /mnt/pkg/data >/tmp/pkg.sha && umount /mnt/pkg && echo 3 >/proc/sys/vm/drop_caches &&
           mount -o noinit_itable /dev/nbd0 /mnt/pkg && sha256sum -c /tmp/pkg.sha && umount /mnt/pkg'
check "provoke a warning: raw writes past the 96 MiB cap fail (ENOSPC to the server, EIO to dd)" \
    sh -c 'if dd if=/dev/urandom of=/dev/nbd0 bs=1M count=128 seek=2048 oflag=direct status=none 2>/tmp/dd.err; then
               echo "128 MiB written past a 96 MiB cap"; exit 1; fi; cat /tmp/dd.err'
# journal_warning: the warning, at priority 4 with its fields, from journalctl -u ramnbd -p warning.
journal_warning() {
    n=0
    until journalctl -u ramnbd -p warning -b -o verbose >/tmp/warn.txt 2>&1 &&
        grep -q "memory cap reached" /tmp/warn.txt || [ $n -ge 20 ]; do
        sleep 1
        n=$((n + 1))
    done
    grep -E "^    (PRIORITY|MESSAGE|EXPORT|PEER|COMMAND|F_ERRNO|OFFSET|SYSLOG_IDENTIFIER)=" /tmp/warn.txt | cut -c1-200
    if grep -q "memory cap reached" /tmp/warn.txt && grep -qx "    PRIORITY=4" /tmp/warn.txt &&
        grep -qx "    EXPORT=scratch" /tmp/warn.txt && grep -qx "    COMMAND=write" /tmp/warn.txt &&
        grep -q "^    PEER=." /tmp/warn.txt && grep -qx "    SYSLOG_IDENTIFIER=ramnbd" /tmp/warn.txt; then
        return 0
    fi
    echo "dd: $(cat /tmp/dd.err)"
    head -n 5 /tmp/warn.txt
    journalctl -u ramnbd -b -o verbose | grep -E "^    (PRIORITY|MESSAGE)=" | tail -n 10 | cut -c1-200
    return 1
}
check "journalctl -u ramnbd -p warning: the warning with PRIORITY=4, EXPORT, PEER, COMMAND" journal_warning
echo "---- the warning, journalctl -u ramnbd -p warning -o verbose ----"
grep -E "^    (PRIORITY|SYSLOG_IDENTIFIER|MESSAGE|TARGET|PEER|EXPORT|COMMAND|F_ERRNO|OFFSET)=" /tmp/warn.txt | cut -c1-240
# (The boot had no warning before: "journal: no warnings or errors from ramnbd" above.)
check "journalctl EXPORT=scratch -p warning selects it; once for the connection, not per write" \
    sh -c 'journalctl EXPORT=scratch -p warning -b -o cat | tee /dev/stderr >/tmp/exp.txt;
           [ "$(grep -c "memory cap reached" /tmp/exp.txt)" -eq 1 ]'
check "journalctl -p info still has the info lines (priority 6), not as warnings" \
    sh -c 'journalctl -u ramnbd -p info..info -b -o cat | grep -q "export ready" &&
           ! journalctl -u ramnbd -p warning -b -o cat | grep -q "export ready"'
check "apt-get purge ramnbd with the socket enabled, the server running and nbd0 attached" \
    sh -c 'systemctl is-active --quiet ramnbd.service && DEBIAN_FRONTEND=noninteractive apt-get purge -y -q ramnbd </dev/null'
check "after the purge: nothing runs, nbd0 is detached, no unit file or enablement link is left" \
    sh -c '! systemctl is-active --quiet ramnbd.service && ! systemctl is-active --quiet ramnbd.socket &&
           ! test -e /sys/block/nbd0/pid && [ -z "$(systemctl list-unit-files --no-legend "ramnbd*")" ] &&
           left=$(find /etc/systemd /lib/systemd/system /usr/lib/systemd/system /run/systemd/system -name "ramnbd*");
           echo "${left:-no unit left}"; [ -z "$left" ]'
check "after the purge: no user, no file (config, state, runtime, binary, docs), dpkg knows none" \
    sh -c '! getent passwd ramnbd && ! dpkg -L ramnbd >/dev/null 2>&1 &&
           for f in /etc/ramnbd /var/lib/ramnbd /var/lib/private/ramnbd /run/ramnbd /usr/bin/ramnbd \
               /usr/share/doc/ramnbd /usr/share/man/man8/ramnbd.8.gz /usr/share/bash-completion/completions/ramnbd; do
               if [ -e "$f" ] || [ -L "$f" ]; then echo "left behind: $f"; exit 1; fi
           done'
check "install the package again (a fresh install after the purge)" \
    sh -c 'cd /tmp && /tmp/install_package ./ramnbd.deb && test -f /etc/ramnbd/ramnbd.toml &&
           ! grep -q "^max-memory" /etc/ramnbd/ramnbd.toml'

# Leave the whole stack up for the poweroff: the host checks that the shutdown stopped it in
# order (no I/O error on nbd0 on the console before SHUTDOWN-REACHED).
check "mount again for the poweroff (socket, server, attach, mkfs, mount)" \
    sh -c 'systemctl start ramnbd.socket mnt-ramdisk.mount && findmnt /mnt/ramdisk >/dev/null'
echo "POWEROFF-WITH-STACK-UP"

echo "---- journal of the units (ramnbd, attach, mkfs, mount) ----"
journalctl -b -o short-monotonic --no-pager -p info \
    -u ramnbd.socket -u ramnbd.service -u ramnbd-attach@nbd0.service -u ramnbd-mkfs@nbd0.service \
    -u mnt-ramdisk.mount -u ramnbd-attach-persist@nbd0.service | tail -n 70 | cut -c1-200
echo "---- notification messages seen by PID 1 ----"
journalctl -b -o cat --no-pager | grep "ramnbd.service: Got notification message" | cut -c1-200
echo "---- end of journal ----"
summary
exit "$FAILED"
