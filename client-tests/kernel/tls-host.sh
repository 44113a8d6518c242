# shellcheck shell=bash
# The kernel client's TLS checks, host side (vm/run.sh): certificates made
# per run with openssl (the commands of docs/operations.md "TLS"), a second
# ramnbd that requires TLS and verified client certificates, and what its
# log must show once the guest is done (kernel/tls.sh is the guest side).
# Sourced after host.sh (pick_port, port_listening, pass/fail).
#
# The guest reaches the server at GUEST_FWD_IP through qemu's guestfwd, so
# the server certificate names that address and TLS_HOSTNAME, which the
# guest gives nbd-client as -tlshostname (the name it checks the
# certificate against).  The client certificate's CN, TLS_IDENTITY, is what
# the server logs for each verified connection.

TLS_HOSTNAME=nbd.ramnbd.test
TLS_IDENTITY=kernel-guest
# The export the guest attaches over TLS: small, mkfs.ext4 under TCG is quick.
TLS_EXPORT=tls
TLS_SPECS=("tls=256M")
TLS_SERVER_PID=
TLS_PORT=
TLS_LOG=

# tls_certs DIR IP: DIR/server (ca-cert.pem, server-cert.pem, server-key.pem:
# the server's --tls-certificates) and DIR/client (ca-cert.pem,
# client-cert.pem, client-key.pem: what the guest gets).
tls_certs() {
    local dir=$1 ip=$2 ca=$1/ca
    mkdir -p "$ca" "$dir/server" "$dir/client"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$ca/ca-key.pem" -out "$ca/ca-cert.pem" -days 2 -subj "/CN=ramnbd kernel test CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    printf 'subjectAltName=DNS:%s,IP:%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n' \
        "$TLS_HOSTNAME" "$ip" >"$ca/server.ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/server/server-key.pem" -out "$ca/server.csr" -subj "/CN=$TLS_HOSTNAME"
    openssl x509 -req -in "$ca/server.csr" -CA "$ca/ca-cert.pem" -CAkey "$ca/ca-key.pem" \
        -CAcreateserial -out "$dir/server/server-cert.pem" -days 2 -extfile "$ca/server.ext"
    printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n' >"$ca/client.ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/client/client-key.pem" -out "$ca/client.csr" -subj "/CN=$TLS_IDENTITY"
    openssl x509 -req -in "$ca/client.csr" -CA "$ca/ca-cert.pem" -CAkey "$ca/ca-key.pem" \
        -CAcreateserial -out "$dir/client/client-cert.pem" -days 2 -extfile "$ca/client.ext"
    cp "$ca/ca-cert.pem" "$dir/server/"
    cp "$ca/ca-cert.pem" "$dir/client/"
}

tls_server_alive() {
    [[ -n $TLS_SERVER_PID ]] && kill -0 "$TLS_SERVER_PID" 2>/dev/null
}

# tls_server_start DIR: ramnbd --tls require --tls-verify-peer with DIR/server's
# certificates on 127.0.0.1 and a free port, logging to DIR/server.log.
# Not inside `check` (its subshell would lose TLS_SERVER_PID): reports
# tls-server-start itself.  With SERVER_CMD (another server under test) there
# is no TLS server: a FAIL.
tls_server_start() {
    local dir=$1 spec args
    if [[ -n $SERVER_CMD ]]; then
        fail tls-server-start "SERVER_CMD replaces ramnbd: no TLS server (SUITE_PARTS without tls)"
        return 1
    fi
    TLS_PORT=$(pick_port)
    TLS_LOG=$dir/server.log
    args=(--no-config -l "127.0.0.1:$TLS_PORT" --tls require --tls-certificates "$dir/server" --tls-verify-peer)
    for spec in "${TLS_SPECS[@]}"; do args+=(-e "$spec"); done
    echo "server: $RAMNBD_BIN ${args[*]}"
    setsid "$RAMNBD_BIN" "${args[@]}" </dev/null >"$TLS_LOG" 2>&1 &
    TLS_SERVER_PID=$!
    for _ in {1..100}; do
        port_listening "$TLS_PORT" && break
        tls_server_alive || break
        sleep 0.1
    done
    if ! tls_server_alive || ! port_listening "$TLS_PORT" || ! grep -q 'TLS ready mode="require"' "$TLS_LOG"; then
        fail tls-server-start "not listening on 127.0.0.1:$TLS_PORT with 'TLS ready mode=\"require\"' logged"
        tail -n 5 "$TLS_LOG" | sed 's/^/    | /'
        return 1
    fi
    pass tls-server-start "127.0.0.1:$TLS_PORT, pid $TLS_SERVER_PID: $(tls_log_lines 'TLS ready' | head -n 1 | sed 's/^.*INFO //')"
}

# tls_log_lines NEEDLE: the TLS server's log lines with NEEDLE (the ANSI
# colours, if any, removed).
tls_log_lines() {
    sed 's/\x1b\[[0-9;]*m//g' "$TLS_LOG" | grep -F -- "$1" || true
}

# tls_server_saw_guest: the guest's TLS connections as the server logged
# them.  Each attach is one connection (kernel/tls.sh attaches twice with
# the certificate): each must have been TLS 1.2 or 1.3 with the client certificate's
# identity, and the handshake of the attach without a certificate must have
# failed for want of one; every transmission phase the server logged ran
# over TLS (its "transmission started ... tls=true").  Only meaningful if the guest's checks ran.
tls_server_saw_guest() {
    local ok failed plain
    grep -q '^PASS tls-no-client-cert-refused' "$1" ||
        die "the guest's tls checks did not all run, nothing to compare"
    ok=$(tls_log_lines "TLS established" | grep -cF "identity=\"$TLS_IDENTITY\"" || true)
    failed=$(tls_log_lines "TLS handshake failed" | grep -cF "peer sent no certificates" || true)
    plain=$(tls_log_lines "TLS required: option before STARTTLS refused" | wc -l)
    echo "     $(tls_log_lines "TLS established" | tail -n 1 | sed 's/^.*INFO //')" >&3
    echo "     $(tls_log_lines "TLS handshake failed" | tail -n 1 | sed 's/^.*\(WARN\|INFO\) //')" >&3
    echo "     TLS sessions with identity \"$TLS_IDENTITY\": $ok; handshakes failed without a certificate: $failed; plaintext options refused: $plain" >&3
    [[ $ok -ge 2 ]] || die "$ok verified TLS sessions logged, the guest attached twice with its certificate"
    [[ $(tls_log_lines "TLS established" | grep -vcF "identity=\"$TLS_IDENTITY\"" || true) -eq 0 ]] ||
        die "a TLS session without the guest's identity"
    # nbd-client 3.24 (GnuTLS 3.7) negotiates TLS 1.2; rustls offers 1.2 and 1.3.
    [[ $(tls_log_lines "TLS established" | grep -vcE 'version=TLSv1_[23] ' || true) -eq 0 ]] ||
        die "a session with a TLS version other than 1.2 or 1.3"
    [[ $failed -ge 1 ]] || die "no 'TLS handshake failed ... peer sent no certificates' line"
    [[ $plain -eq 0 ]] || die "$plain options came before STARTTLS: some attach was not TLS"
    # Every transmission phase, as the server logs it, ran inside TLS.
    [[ $(tls_log_lines "transmission started" | grep -cF 'tls=true' || true) -ge "$ok" ]] ||
        die "fewer transmissions with tls=true than TLS sessions"
    [[ $(tls_log_lines "transmission started" | grep -vcF 'tls=true' || true) -eq 0 ]] ||
        die "a transmission without TLS"
}

# tls_server_stop: SIGTERM must end it with exit status 0 within 10 s;
# reports tls-server-stop (not inside `check`, like tls_server_start).
tls_server_stop() {
    local rc=0
    [[ -n $TLS_SERVER_PID ]] || return 0
    if ! tls_server_alive; then
        wait "$TLS_SERVER_PID" || rc=$?
        fail tls-server-stop "the TLS server had already exited (status $rc)"
    else
        kill -TERM -- "-$TLS_SERVER_PID"
        for _ in {1..100}; do
            tls_server_alive || break
            sleep 0.1
        done
        if tls_server_alive; then
            kill -KILL -- "-$TLS_SERVER_PID"
            wait "$TLS_SERVER_PID" || true
            fail tls-server-stop "still running 10 s after SIGTERM"
        else
            wait "$TLS_SERVER_PID" || rc=$?
            if [[ $rc -eq 0 ]]; then pass tls-server-stop "SIGTERM, exit 0"; else fail tls-server-stop "exit status $rc after SIGTERM"; fi
        fi
    fi
    kill -KILL -- "-$TLS_SERVER_PID" 2>/dev/null || true
    TLS_SERVER_PID=
}
