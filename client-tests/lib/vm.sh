# shellcheck shell=bash disable=SC2034,SC2054
# (SC2034: VM_RC and VM_SECONDS are for the caller; SC2054: the commas are
# inside qemu option values.)
# The one qemu launcher of the test VMs (vm/run.sh: the kernel client;
# systemd-vm/run.sh: systemd as PID 1).  Sourced by bash scripts that also
# source report.sh.  It assembles the qemu-system command, runs it under a
# hard timeout with the console in a log file (optionally shown live), adds
# the one network path a guest may have, appends the job archive to an
# initramfs, and stops the VM on every exit path: the caller's EXIT trap must
# call vm_stop (INT and TERM traps should `exit`, which runs it).
#
# Facts behind the choices (TCG only: KVM cannot boot these kernels here):
# - -kernel is an uncompressed vmlinux, booted through its PVH note: ~4.5 s
#   faster than letting the guest decompress a bzImage under TCG.
# - timeout(1) puts qemu in its own process group, so a Ctrl-C on the
#   terminal reaches only the script; vm_stop passes it on.
# - Network: qemu user networking with restrict=on (no route out, no DNS),
#   a guestfwd of GUEST_FWD_IP:PORT to 127.0.0.1:PORT per server port.  It
#   must be the cmd: form: one relay per guest connection (the chardev form shares a
#   single connection between all of them, which breaks reconnects and
#   multi-conn).  The relay's stderr also goes to the guest's socket, so it
#   must be quiet (socat -lf /dev/null).

GUEST_FWD_IP=10.0.2.100
VM_PID=
VM_TAIL_PID=
VM_RC=
VM_SECONDS=

# need_vm: the launcher's prerequisites (both VMs' initramfs is busybox-static).
need_vm() {
    need qemu-system-x86_64 qemu-system-x86
    need timeout coreutils
    need socat socat
    need_file /bin/busybox busybox-static
    # Debian's dynamic busybox package installs the same path.
    if [[ -e /bin/busybox ]] && ldd /bin/busybox >/dev/null 2>&1; then
        missing "a static /bin/busybox (apt-get install busybox-static)"
    fi
}

# vm_initrd BASE JOBDIR OUT: OUT = the initramfs BASE followed by a newc cpio
# of JOBDIR's contents.  The second archive must start at a 4-byte aligned
# offset of the whole initrd (the kernel skips the NUL padding); otherwise:
# "Initramfs unpacking failed: invalid magic at start of compressed archive".
vm_initrd() {
    local base=$1 jobdir=$2 out=$3 pad
    cp "$base" "$out"
    pad=$(((4 - $(stat -c %s "$out") % 4) % 4))
    head -c "$pad" /dev/zero >>"$out"
    (cd "$jobdir" && find . -mindepth 1 | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) >>"$out"
}

# vm_run LOG LIMIT KERNEL INITRD APPEND [QEMU_ARG...]: boot, wait for qemu to
# exit (the guest powers off; -no-reboot turns a panic into an exit too) or
# for LIMIT seconds, and set VM_RC (qemu's exit status; 124 or 137: the hard
# timeout) and VM_SECONDS.  Environment:
#   VM_CPUS (default 2), VM_MEM (MiB, default 1024)
#   VM_FWD_PORT         add the NIC and the guestfwd GUEST_FWD_IP:PORT -> 127.0.0.1:PORT
#                       (a space-separated list: one guestfwd per port)
#   VM_FWD_CMD_PORT, VM_FWD_CMD   with VM_FWD_PORT: each guest connection to
#                       GUEST_FWD_IP:VM_FWD_CMD_PORT runs the shell command VM_FWD_CMD
#                       on this host, its stdin and stdout (and stderr) being the
#                       connection; the command must not contain commas (qemu's
#                       option separator)
#   VM_CONSOLE_FILTER   a command that shows the console live (its stdin); unset: not shown
vm_run() {
    local log=$1 limit=$2 kernel=$3 initrd=$4 append=$5 t0=$SECONDS
    shift 5
    local args=(-nodefaults -no-user-config -no-reboot
        -accel tcg,thread=multi -cpu max -smp "${VM_CPUS:-2}" -m "${VM_MEM:-1024}"
        -display none -serial stdio -monitor none
        -kernel "$kernel" -initrd "$initrd" -append "$append")
    if [[ -n ${VM_FWD_PORT:-} ]]; then
        local netdev=user,id=n0,restrict=on,ipv6=off port
        for port in $VM_FWD_PORT; do
            netdev+=",guestfwd=tcp:$GUEST_FWD_IP:$port-cmd:socat -lf /dev/null - TCP:127.0.0.1:$port"
        done
        if [[ -n ${VM_FWD_CMD_PORT:-} ]]; then
            netdev+=",guestfwd=tcp:$GUEST_FWD_IP:$VM_FWD_CMD_PORT-cmd:$VM_FWD_CMD"
        fi
        # romfile=: no iPXE option ROM needed.
        args+=(-netdev "$netdev" -device virtio-net-pci,netdev=n0,romfile=)
    fi
    timeout -k 10 "$limit" qemu-system-x86_64 "${args[@]}" "$@" </dev/null >"$log" 2>&1 &
    VM_PID=$!
    if [[ -n ${VM_CONSOLE_FILTER:-} ]]; then
        tail -n +1 -F --pid="$VM_PID" "$log" 2>/dev/null | $VM_CONSOLE_FILTER &
        VM_TAIL_PID=$!
    fi
    VM_RC=0
    wait "$VM_PID" || VM_RC=$?
    VM_PID=
    if [[ -n $VM_TAIL_PID ]]; then
        wait "$VM_TAIL_PID" || true
        VM_TAIL_PID=
    fi
    VM_SECONDS=$((SECONDS - t0))
}

# vm_timed_out: the last vm_run hit its LIMIT.
vm_timed_out() { [[ $VM_RC -eq 124 || $VM_RC -eq 137 ]]; }

# vm_guest_status LOG: the guest job's exit status (its last
# VM-EXIT-STATUS=N console line); empty if it never got that far.
vm_guest_status() {
    tr -d '\r' <"$1" | sed -n 's/^VM-EXIT-STATUS=\([0-9]*\)$/\1/p' | tail -n 1
}

# vm_stop: for the caller's EXIT trap; ends a running VM and its console view.
vm_stop() {
    if [[ -n $VM_PID ]]; then
        # timeout(1) passes the TERM on to qemu (whose exit ends the relays) and waits for it.
        kill -TERM "$VM_PID" 2>/dev/null || true
        wait "$VM_PID" 2>/dev/null || true
        VM_PID=
    fi
    if [[ -n $VM_TAIL_PID ]]; then
        kill "$VM_TAIL_PID" 2>/dev/null || true
        wait "$VM_TAIL_PID" 2>/dev/null || true
        VM_TAIL_PID=
    fi
}
