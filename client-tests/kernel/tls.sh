# shellcheck shell=sh disable=SC3043
# (SC3043: bash and busybox ash both have `local`.)
#
# nbd-client over TLS (kernel/tls-host.sh is the host side): a server that
# requires TLS and a verified client certificate.  nbd-client does the TLS
# handshake itself and keeps a user-space relay between nbd.ko's socket and
# the TLS session.  ext4 is made, written, re-attached and verified over TLS;
# an attach without a client certificate must fail.  Sourced by suite.sh
# after nbd.sh (dev_detach, nbd_ready).
#
# Needs TLS_HOST TLS_PORT (the TLS server as this machine reaches it),
# TLS_EXPORT, TLS_HOSTNAME (the name in the server's certificate, given as
# -tlshostname) and TLS_DIR (ca-cert.pem, client-cert.pem, client-key.pem).

# tls_attach [nbd-client option...]: attach TLS_EXPORT over TLS with the
# CA and the name to verify the server by, and the given options (the client
# certificate, or none).
tls_attach() {
    local out
    out=$(nbd-client "$TLS_HOST" "$TLS_PORT" "$NBD_DEV" -N "$TLS_EXPORT" -t "$NBD_TIMEOUT" \
        -cacertfile "$TLS_DIR/ca-cert.pem" -tlshostname "$TLS_HOSTNAME" "$@" 2>&1) ||
        die "nbd-client $TLS_HOST $TLS_PORT $NBD_DEV -N $TLS_EXPORT ... $*: $out"
    wait_until 20 nbd_ready || die "$NBD_DEV not ready 20 s after nbd-client returned"
}

tls_attach_cert() {
    tls_attach -certfile "$TLS_DIR/client-cert.pem" -keyfile "$TLS_DIR/client-key.pem"
}

tls_file=
tls_mnt=

tls_mkfs_write() {
    tls_attach_cert
    note "nbd-client $TLS_HOST $TLS_PORT $NBD_DEV -N $TLS_EXPORT -t $NBD_TIMEOUT -cacertfile $TLS_DIR/ca-cert.pem -tlshostname $TLS_HOSTNAME -certfile $TLS_DIR/client-cert.pem -keyfile $TLS_DIR/client-key.pem"
    [ "$($BLOCKDEV --getsize64 "$NBD_DEV")" -eq $((256 * MIB)) ] ||
        die "size $($BLOCKDEV --getsize64 "$NBD_DEV"), expected 256 MiB"
    mkfs.ext4 -q -F "$NBD_DEV"
    mkdir -p "$tls_mnt"
    mount -t ext4 "$NBD_DEV" "$tls_mnt"
    cp "$tls_file" "$tls_mnt/data"
    sync
    umount "$tls_mnt"
    dev_detach
}

tls_reattach_verify() {
    tls_attach_cert
    drop_caches
    mount -t ext4 "$NBD_DEV" "$tls_mnt"
    expect_hash "the file written over TLS" "$(file_hash "$tls_mnt/data")" "$(file_hash "$tls_file")"
    umount "$tls_mnt"
    e2fsck -fn "$NBD_DEV"
    dev_detach
}

# No client certificate: the server ends the handshake, nbd-client must
# exit non-zero and leave the device unattached.
tls_no_cert() {
    local rc=0 out
    out=$(nbd-client "$TLS_HOST" "$TLS_PORT" "$NBD_DEV" -N "$TLS_EXPORT" -t "$NBD_TIMEOUT" \
        -cacertfile "$TLS_DIR/ca-cert.pem" -tlshostname "$TLS_HOSTNAME" 2>&1) || rc=$?
    note "without -certfile/-keyfile: exit $rc: $(echo "$out" | grep -v '^$' | tail -n 2 | tr '\n' ' ')"
    [ "$rc" -ne 0 ] || die "nbd-client attached without a client certificate: $out"
    sleep 1
    ! dev_is_attached || die "$NBD_DEV is attached after the refused attach"
}

tls_checks() {
    local t0
    t0=$(now_cs)
    tls_file=$(pattern_file tls-data $((4 * MIB)))
    tls_mnt=$WORK/$MNT_SUFFIX
    chain_start
    check tls-ext4-mkfs-write tls_mkfs_write
    check tls-ext4-reattach-verify-fsck tls_reattach_verify
    chain_end
    cleanup_if_failed tls-ext4
    check tls-no-client-cert-refused tls_no_cert
    cleanup_if_failed tls-no-client-cert-refused
    echo "---- tls: $(elapsed_since "$t0")"
}
