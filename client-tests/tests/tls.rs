//! TLS (NBD_OPT_STARTTLS): libnbd and qemu over TLS with both client generations, the
//! refusals (client certificates missing, from another CA, expired; plaintext options against
//! `--tls require`; exports that require TLS), STARTTLS's own errors, the configuration errors,
//! and certificates reloaded on SIGHUP under a live TLS connection.
//!
//! Certificates are made per test with the `openssl` command line, with the commands the
//! operator's guide (docs/operations.md, "TLS") gives, in the layout nbdkit and qemu use.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ramnbd_client_tests::clients::PYTHON;
use ramnbd_client_tests::proto::*;
use ramnbd_client_tests::server::ramnbd_bin;
use ramnbd_client_tests::tools::{require_tool, run_ok, write_random_file};
use ramnbd_client_tests::{Clients, MIB, RawClient, Server, both_generations};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tempfile::TempDir;

const LOG_WAIT: Duration = Duration::from_secs(20);

/// A test PKI under /tmp (Debian 13's clients see only /tmp): a CA, a server certificate for
/// localhost and 127.0.0.1, and client directories in libnbd's and qemu's layout
/// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        require_tool("openssl", "openssl");
        let dir = tempfile::Builder::new()
            .prefix("ramnbd-tls-")
            .tempdir_in("/tmp")
            .expect("temporary directory");
        let pki = Pki { dir };
        let ca = pki.path("ca");
        let other_ca = pki.path("other-ca");
        make_ca(&ca, "ramnbd test CA");
        make_ca(&other_ca, "another CA");
        let server = pki.path("server");
        fs::create_dir_all(&server).unwrap();
        fs::copy(ca.join("ca-cert.pem"), server.join("ca-cert.pem")).unwrap();
        issue_server(&ca, &server, "1");
        // Client directories: each trusts our CA for the server, and holds its own certificate.
        for (name, signer, cn, days) in [
            ("client", &ca, "alice", "30"),
            ("foreign", &other_ca, "mallory", "30"),
            ("expired", &ca, "alice", "-1"),
        ] {
            let dir = pki.path(name);
            fs::create_dir_all(&dir).unwrap();
            fs::copy(ca.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
            issue(
                signer,
                cn,
                &dir.join("client-key.pem"),
                &dir.join("client-cert.pem"),
                CLIENT_EXT,
                days,
            );
        }
        let anonymous = pki.path("anonymous");
        fs::create_dir_all(&anonymous).unwrap();
        fs::copy(ca.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn shown(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

const SERVER_EXT: &str = "subjectAltName=DNS:localhost,IP:127.0.0.1\n\
                          extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n\
                          keyUsage=digitalSignature,keyEncipherment\n";
const CLIENT_EXT: &str = "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n\
                          keyUsage=digitalSignature,keyEncipherment\n";

fn openssl(args: &[&str]) {
    run_ok("openssl", args);
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn make_ca(dir: &Path, cn: &str) {
    fs::create_dir_all(dir).unwrap();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        p(&dir.join("ca-key.pem")),
        "-out",
        p(&dir.join("ca-cert.pem")),
        "-days",
        "3650",
        "-subj",
        &format!("/CN={cn}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
}

/// A key and a certificate for `cn` signed by the CA in `ca`, valid for `days` (-1: expired).
fn issue(ca: &Path, cn: &str, key: &Path, cert: &Path, ext: &str, days: &str) {
    let csr = cert.with_extension("csr");
    let ext_file = cert.with_extension("ext");
    fs::write(&ext_file, ext).unwrap();
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        p(key),
        "-out",
        p(&csr),
        "-subj",
        &format!("/CN={cn}"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        p(&csr),
        "-CA",
        p(&ca.join("ca-cert.pem")),
        "-CAkey",
        p(&ca.join("ca-key.pem")),
        "-CAcreateserial",
        "-CAserial",
        p(&ca.join("ca-cert.srl")),
        "-out",
        p(cert),
        "-days",
        days,
        "-extfile",
        p(&ext_file),
    ]);
    fs::remove_file(csr).unwrap();
    fs::remove_file(ext_file).unwrap();
}

/// A server certificate and key in `dir` (written aside, then renamed into place, as an
/// operator's tool would); `tag` tells generations apart in file names.
fn issue_server(ca: &Path, dir: &Path, tag: &str) {
    let key = dir.join(format!("new-key-{tag}.pem"));
    let cert = dir.join(format!("new-cert-{tag}.pem"));
    issue(ca, "localhost", &key, &cert, SERVER_EXT, "30");
    fs::rename(&key, dir.join("server-key.pem")).unwrap();
    fs::rename(&cert, dir.join("server-cert.pem")).unwrap();
}

fn nbds_tcp(server: &Server, export: &str, client_dir: &Path) -> String {
    format!(
        "nbds://{}/{export}?tls-certificates={}",
        server.tcp_addr(),
        client_dir.display()
    )
}

fn nbds_unix(server: &Server, export: &str, client_dir: &Path) -> String {
    format!(
        "nbds+unix:///{export}?socket={}&tls-certificates={}",
        server.unix_path().display(),
        client_dir.display()
    )
}

/// The `n`th log line (from 1) that contains `needle`, once the server has written it.
fn nth_log_line(server: &Server, needle: &str, n: usize) -> String {
    let deadline = std::time::Instant::now() + LOG_WAIT;
    loop {
        let text = server.stderr_text();
        if let Some(line) = text.lines().filter(|line| line.contains(needle)).nth(n - 1) {
            // Collected for the report: every refusal's line.
            eprintln!("server log: {line}");
            return line.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {n}th log line with {needle:?} within {LOG_WAIT:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first log line that contains `needle`.
fn log_line(server: &Server, needle: &str) -> String {
    nth_log_line(server, needle, 1)
}

const READ_BACK: &str = r#"
import os, sys, nbd
write_uri, read_uri = sys.argv[1], sys.argv[2]
data = os.urandom(1 << 20)
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(write_uri)
assert h.get_tls_negotiated(), "TLS not negotiated"
h.pwrite(data, 3 << 20)
h.flush()
h.shutdown()
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(read_uri)
assert h.get_tls_negotiated(), "TLS not negotiated"
got = h.pread(len(data), 3 << 20)
assert got == data, "read back differs"
assert h.pread(4096, 0) == bytes(4096), "unwritten data is not zero"
h.shutdown()
print("ok")
"#;

fn libnbd_reads_and_writes_over_tls(clients: Clients) {
    let pki = Pki::new();
    let server = Server::start(&[
        "-e",
        "disk=64M",
        "--tls",
        "require",
        "--tls-certificates",
        &pki.shown("server"),
        "--tls-verify-peer",
    ]);
    let client = pki.path("client");
    let info = clients.run_ok("nbdinfo", &["--json", &nbds_tcp(&server, "disk", &client)]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo JSON");
    assert_eq!(info["TLS"], true, "{info:#}");
    assert_eq!(info["exports"][0]["export-size"], 64 * MIB, "{info:#}");
    // Written over TCP, read back over the Unix socket: both through TLS.
    let tcp = nbds_tcp(&server, "disk", &client);
    let unix = nbds_unix(&server, "disk", &client);
    clients.python_ok(READ_BACK, &[&tcp, &unix], "ok");
    clients.python_ok(READ_BACK, &[&unix, &tcp], "ok");
    // nbdinfo's and the scripts' four: five connections, each TLS as alice.
    nth_log_line(&server, "connection closed", 5);
    let log = server.stderr_text();
    let established = log
        .lines()
        .filter(|l| l.contains("TLS established") && l.contains("identity=\"alice\""))
        .count();
    assert_eq!(established, 5, "five TLS connections as alice:\n{log}");
    assert!(log.contains("tls=true"), "{log}");
    assert!(
        !log.contains("tls=false"),
        "every connection used TLS:\n{log}"
    );
    clients.assert_headers(&server);
}
both_generations!(libnbd_reads_and_writes_over_tls);

/// qemu-io and qemu-img with `tls-creds-x509`: returns (success, output).
fn qemu(clients: Clients, program: &str, args: &[&str]) -> (bool, String) {
    clients.run_qemu(program, args)
}

fn qemu_reads_and_writes_over_tls(clients: Clients) {
    let pki = Pki::new();
    let server = Server::start(&[
        "-e",
        "qdisk=8M",
        "--tls",
        "require",
        "--tls-certificates",
        &pki.shown("server"),
        "--tls-verify-peer",
    ]);
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.shown("client")
    );
    let port = server.tcp_addr().port().to_string();
    let nbd = format!("driver=nbd,host=127.0.0.1,port={port},export=qdisk,tls-creds=tls0");
    let (ok, out) = qemu(
        clients,
        "qemu-io",
        &[
            "--object",
            &creds,
            "--image-opts",
            &nbd,
            "-c",
            "write -P 0x5c 0 1M",
            "-c",
            "read -P 0x5c 0 1M",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "flush",
        ],
    );
    assert!(ok, "qemu-io over TLS failed:\n{out}");
    assert_eq!(out.matches("wrote ").count(), 1, "{out}");
    assert_eq!(out.matches("read ").count(), 2, "{out}");
    // The negative control: a wrong pattern fails, so the reads above compared real data.
    let (ok, out) = qemu(
        clients,
        "qemu-io",
        &[
            "--object",
            &creds,
            "--image-opts",
            &nbd,
            "-c",
            "read -P 0x5d 0 64k",
        ],
    );
    assert!(!ok && out.contains("Pattern verification failed"), "{out}");

    let source = pki.path("source.img");
    write_random_file(&source, 7, 8 * MIB);
    let file = format!("driver=file,filename={}", source.display());
    let (ok, out) = qemu(
        clients,
        "qemu-img",
        &[
            "convert",
            "-n",
            "--object",
            &creds,
            "-f",
            "raw",
            "--target-image-opts",
            p(&source),
            &nbd,
        ],
    );
    assert!(ok, "qemu-img convert over TLS failed:\n{out}");
    let (ok, out) = qemu(
        clients,
        "qemu-img",
        &["compare", "--object", &creds, "--image-opts", &file, &nbd],
    );
    assert!(ok && out.contains("Images are identical"), "{out}");
    let log = server.stderr_text();
    assert!(
        log.contains("TLS established") && log.contains("identity=\"alice\""),
        "{log}"
    );
    clients.assert_headers(&server);
}
both_generations!(qemu_reads_and_writes_over_tls);

#[test]
fn bad_client_certificates_are_refused() {
    let pki = Pki::new();
    let server = Server::start(&[
        "-e",
        "disk=16M",
        "--tls",
        "require",
        "--tls-certificates",
        &pki.shown("server"),
        "--tls-verify-peer",
    ]);
    // GnuTLS sends no certificate when its issuer is not among the CAs the server names in
    // its certificate request, so libnbd with the foreign certificate presents none.
    for (dir, cause, nth) in [
        ("anonymous", "peer sent no certificates", 1),
        ("foreign", "peer sent no certificates", 2),
        ("expired", "invalid peer certificate: Expired", 1),
    ] {
        let output =
            Clients::Debian12.run("nbdinfo", &[&nbds_tcp(&server, "disk", &pki.path(dir))]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!(
            "nbdinfo with the {dir} client certificate: {}",
            stderr.trim()
        );
        assert!(!output.status.success(), "{dir}: nbdinfo succeeded");
        assert!(
            output.stdout.is_empty(),
            "{dir}: nothing about the export may be shown"
        );
        assert!(
            stderr.contains("gnutls_handshake") || stderr.contains("TLS"),
            "{dir}: the client reports a failed TLS handshake: {stderr}"
        );
        let line = nth_log_line(&server, cause, nth);
        assert!(line.contains("TLS handshake failed, closing"), "{line}");
    }
    // rustls sends its certificate whatever the server asks for: the server checks it.
    for (dir, cause, nth) in [
        ("foreign", "invalid peer certificate: UnknownIssuer", 1),
        ("expired", "invalid peer certificate: Expired", 2),
    ] {
        let config = tls_client(&pki.path("ca"), Some(&pki.path(dir)));
        let seen = refused_after_starttls(&server, config);
        eprintln!("a rustls client with the {dir} client certificate sees: {seen}");
        assert!(seen.contains("received fatal alert"), "{dir}: {seen}");
        let line = nth_log_line(&server, cause, nth);
        assert!(line.contains("TLS handshake failed, closing"), "{line}");
    }
    assert!(!server.stderr_text().contains("transmission started"));
    // The good certificate still works on the same server.
    Clients::Debian12.run_ok(
        "nbdinfo",
        &[&nbds_tcp(&server, "disk", &pki.path("client"))],
    );
}

/// Greeting and client flags on a raw connection.
fn raw_start(server: &Server) -> RawClient {
    let mut raw = RawClient::connect(&server.tcp());
    let greeting = raw.read_greeting();
    assert_eq!(greeting.flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    raw.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    raw
}

/// The exact bytes of an option error reply.
fn error_reply(option: u32, rep: u32, message: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&option.to_be_bytes());
    bytes.extend_from_slice(&rep.to_be_bytes());
    bytes.extend_from_slice(&(message.len() as u32).to_be_bytes());
    bytes.extend_from_slice(message.as_bytes());
    bytes
}

#[test]
fn plaintext_options_against_require_get_tls_reqd() {
    let pki = Pki::new();
    let server = Server::start(&[
        "-e",
        "disk=16M",
        "--tls",
        "require",
        "--tls-certificates",
        &pki.shown("server"),
    ]);
    const REQD: &str = "TLS is required: send STARTTLS first";
    let mut raw = raw_start(&server);
    let info = ramnbd_client_tests::client::handshake::info_payload("disk", &[]);
    for (option, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, info.clone()),
        (OPT_GO, info.clone()),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_EXTENDED_HEADERS, Vec::new()),
        (OPT_LIST_META_CONTEXT, Vec::new()),
        (99, Vec::new()),
    ] {
        raw.send_option(option, &data);
        let expected = error_reply(option, REP_ERR_TLS_REQD, REQD);
        assert_eq!(raw.recv_exact(expected.len()), expected, "option {option}");
    }
    // STARTTLS with data is malformed, and says so.
    raw.send_option(OPT_STARTTLS, b"x");
    let expected = error_reply(OPT_STARTTLS, REP_ERR_INVALID, "STARTTLS takes no data");
    assert_eq!(raw.recv_exact(expected.len()), expected);
    // EXPORT_NAME has no error reply: the connection closes.
    raw.send_option(OPT_EXPORT_NAME, b"disk");
    raw.expect_closed(Duration::from_secs(10))
        .expect("closed without a byte");
    log_line(&server, "TLS required: option before STARTTLS refused");
    log_line(
        &server,
        "TLS required: EXPORT_NAME before STARTTLS, closing",
    );
    // ABORT is answered as ever.
    let mut raw = raw_start(&server);
    assert_eq!(raw.opt_abort().rep, REP_ACK);

    // libnbd told not to use TLS sees the refusal and connects to nothing.
    let output = Clients::Debian12.run("nbdinfo", &[&server.tcp_uri("disk")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "nbdinfo nbd:// (no TLS) against --tls require: {}",
        stderr.trim()
    );
    assert!(!output.status.success(), "{stderr}");
    // libnbd 1.14 reports ERR_TLS_REQD to GO as "Operation not supported".
    assert!(
        stderr.contains("server replied with error to opt_go request"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.contains("export-size"),
        "nothing about the export: {stdout}"
    );
    log_line(&server, "op=\"GO\"");
    assert!(!server.stderr_text().contains("transmission started"));
}

#[test]
fn exports_that_require_tls_are_hidden_and_refused_before_starttls() {
    let pki = Pki::new();
    let server = Server::start(&[
        "-e",
        "open=16M",
        "-e",
        "secret=16M,tls=require",
        "--tls",
        "on",
        "--tls-certificates",
        &pki.shown("server"),
    ]);
    let mut raw = raw_start(&server);
    let listed = raw.opt_list().expect("LIST");
    let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["open"], "the TLS export is hidden before TLS");
    let refused = raw.opt_info("secret", &[]).expect_err("INFO secret");
    assert_eq!(refused.rep, REP_ERR_TLS_REQD, "{refused:?}");
    let refused = raw.opt_go("secret", &[]).expect_err("GO secret");
    assert_eq!(refused.rep, REP_ERR_TLS_REQD, "{refused:?}");
    raw.opt_info("open", &[]).expect("INFO open without TLS");
    raw.send_option(OPT_EXPORT_NAME, b"secret");
    raw.expect_closed(Duration::from_secs(10))
        .expect("closed without a byte");
    log_line(&server, "export requires TLS: refused before STARTTLS");
    log_line(&server, "export requires TLS, closing");

    // Plaintext for the open export, TLS for both (the client directory has no certificate:
    // the server does not verify peers here).
    Clients::Debian12.run_ok("nbdinfo", &[&server.tcp_uri("open")]);
    let anonymous = pki.path("anonymous");
    let list = Clients::Debian12.run_ok(
        "nbdinfo",
        &["--list", "--json", &nbds_tcp(&server, "", &anonymous)],
    );
    assert!(
        list.contains("\"secret\"") && list.contains("\"open\""),
        "{list}"
    );
    Clients::Debian12.run_ok("nbdinfo", &[&nbds_unix(&server, "secret", &anonymous)]);
}

/// A rustls client that trusts `ca` and, if given, presents `client` (a client directory).
fn tls_client(ca: &Path, client: Option<&Path>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca.join("ca-cert.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(dir) => {
            let chain = CertificateDer::pem_file_iter(dir.join("client-cert.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn send_option(stream: &mut impl Write, option: u32, data: &[u8]) {
    let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
    bytes.extend_from_slice(&option.to_be_bytes());
    bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(data);
    stream.write_all(&bytes).unwrap();
    stream.flush().unwrap();
}

/// One option reply: (option, type, data).
fn read_reply(stream: &mut impl Read) -> (u32, u32, Vec<u8>) {
    let mut header = [0u8; 20];
    stream.read_exact(&mut header).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap());
    assert_eq!(
        u64::from_be_bytes(header[..8].try_into().unwrap()),
        OPTION_REPLY_MAGIC
    );
    let mut data = vec![0; be32(16) as usize];
    stream.read_exact(&mut data).unwrap();
    (be32(8), be32(12), data)
}

/// Connects, negotiates `before` (options answered with ACK), STARTTLS, then the TLS handshake.
fn starttls(server: &Server, config: Arc<rustls::ClientConfig>, before: &[u32]) -> Tls {
    let mut tcp = TcpStream::connect(server.tcp_addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    tcp.read_exact(&mut greeting).unwrap();
    tcp.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    for &option in before {
        send_option(&mut tcp, option, &[]);
        assert_eq!(read_reply(&mut tcp).1, REP_ACK, "option {option}");
    }
    send_option(&mut tcp, OPT_STARTTLS, &[]);
    assert_eq!(read_reply(&mut tcp), (OPT_STARTTLS, REP_ACK, Vec::new()));
    let name = ServerName::try_from("localhost").unwrap();
    let connection = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    tls
}

/// STARTTLS and a TLS handshake that the server refuses: what the client sees, the error of
/// its handshake or (TLS 1.3: the server judges the client's certificate after the client's
/// side is done) of its first read.
fn refused_after_starttls(server: &Server, config: Arc<rustls::ClientConfig>) -> String {
    let mut tcp = TcpStream::connect(server.tcp_addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    tcp.read_exact(&mut greeting).unwrap();
    tcp.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    send_option(&mut tcp, OPT_STARTTLS, &[]);
    assert_eq!(read_reply(&mut tcp), (OPT_STARTTLS, REP_ACK, Vec::new()));
    let name = ServerName::try_from("localhost").unwrap();
    let connection = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    while tls.conn.is_handshaking() {
        if let Err(err) = tls.conn.complete_io(&mut tls.sock) {
            return err.to_string();
        }
    }
    send_option(&mut tls, OPT_LIST, &[]);
    let mut byte = [0u8; 1];
    match tls.read(&mut byte) {
        Ok(n) => panic!("the server answered ({n} bytes) a refused client"),
        Err(err) => err.to_string(),
    }
}

/// The certificate the server presents to a new TLS connection.
fn presented_certificate(server: &Server, pki: &Pki) -> Vec<u8> {
    let tls = starttls(server, tls_client(&pki.path("ca"), None), &[]);
    let chain = tls.conn.peer_certificates().expect("a server certificate");
    chain[0].to_vec()
}

fn pem_der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

#[test]
fn starttls_errors_and_state_after_tls() {
    let pki = Pki::new();
    // TLS off: STARTTLS is refused with ERR_POLICY, never ERR_TLS_REQD.
    let plain = Server::start(&["-e", "disk=16M"]);
    let mut raw = raw_start(&plain);
    let reply = raw.option_single(OPT_STARTTLS, &[]);
    assert_eq!(reply.rep, REP_ERR_POLICY, "{reply:?}");

    let server = Server::start(&[
        "-e",
        "disk=16M",
        "--tls",
        "on",
        "--tls-certificates",
        &pki.shown("server"),
    ]);
    // Structured replies before STARTTLS are forgotten by it: SET_META_CONTEXT then needs them
    // negotiated again.
    let mut tls = starttls(
        &server,
        tls_client(&pki.path("ca"), None),
        &[OPT_STRUCTURED_REPLY],
    );
    let meta =
        ramnbd_client_tests::client::handshake::meta_context_payload("disk", &["base:allocation"]);
    send_option(&mut tls, OPT_SET_META_CONTEXT, &meta);
    let (option, rep, data) = read_reply(&mut tls);
    assert_eq!((option, rep), (OPT_SET_META_CONTEXT, REP_ERR_INVALID));
    assert_eq!(data, b"negotiate structured replies first");
    // STARTTLS over TLS.
    send_option(&mut tls, OPT_STARTTLS, &[]);
    let (option, rep, data) = read_reply(&mut tls);
    assert_eq!((option, rep), (OPT_STARTTLS, REP_ERR_INVALID));
    assert_eq!(data, b"TLS is already established");
    log_line(&server, "STARTTLS over TLS refused");
    // The connection goes on: structured replies, then the meta context, then GO.
    send_option(&mut tls, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(read_reply(&mut tls).1, REP_ACK);
    send_option(&mut tls, OPT_SET_META_CONTEXT, &meta);
    assert_eq!(read_reply(&mut tls).1, REP_META_CONTEXT);
    assert_eq!(read_reply(&mut tls).1, REP_ACK);
    send_option(&mut tls, OPT_ABORT, &[]);
    assert_eq!(read_reply(&mut tls).1, REP_ACK);
    // The certificate served is the configured one.
    assert_eq!(
        presented_certificate(&server, &pki),
        pem_der(&pki.path("server/server-cert.pem"))
    );
}

#[test]
fn configuration_errors_name_the_fix() {
    let pki = Pki::new();
    let server_dir = pki.shown("server");
    let empty = pki.path("empty");
    fs::create_dir_all(&empty).unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--tls-psk", "/tmp/keys.psk"],
            "TLS with pre-shared keys is not supported",
        ),
        (&["--tls", "on"], "needs a certificates directory"),
        (&["--tls", "maybe"], "expected off, on or require"),
        (
            &["--tls-certificates", &server_dir],
            "is given but TLS is off",
        ),
        (
            &["-e", "a=1M,tls=require"],
            "requires TLS (tls=require) but TLS is off",
        ),
        (
            &["--tls", "require", "--tls-certificates", p(&empty)],
            "server-cert.pem: cannot read certificates",
        ),
    ];
    for (args, expected) in cases {
        let output = Command::new(ramnbd_bin())
            .arg("--no-config")
            .args(args)
            .args(["-l", "127.0.0.1:0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} started");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        eprintln!("ramnbd {}: {}", args.join(" "), stderr.trim());
    }
    // A key that is not the certificate's.
    let mismatched = pki.path("mismatched");
    fs::create_dir_all(&mismatched).unwrap();
    fs::copy(
        pki.path("server/server-cert.pem"),
        mismatched.join("server-cert.pem"),
    )
    .unwrap();
    fs::copy(
        pki.path("client/client-key.pem"),
        mismatched.join("server-key.pem"),
    )
    .unwrap();
    let output = Command::new(ramnbd_bin())
        .args(["--no-config", "--tls", "on", "--tls-certificates"])
        .arg(&mismatched)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("server-key.pem: cannot be used with server-cert.pem"),
        "{stderr}"
    );
}

/// A long-lived libnbd connection: writes, says "connected", waits for a line on stdin, then
/// reads back what it wrote and says "ok".
const LONG_LIVED: &str = r#"
import os, sys, nbd
data = os.urandom(256 << 10)
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
assert h.get_tls_negotiated()
h.pwrite(data, 0)
print("connected", flush=True)
sys.stdin.readline()
assert h.pread(len(data), 0) == data, "read back differs"
h.pwrite(data, 1 << 20)
assert h.pread(len(data), 1 << 20) == data
h.shutdown()
print("ok", flush=True)
"#;

#[test]
fn sighup_reloads_certificates_without_dropping_connections() {
    let pki = Pki::new();
    let dir = pki.path("server");
    let mut server = Server::start(&[
        "-e",
        "disk=16M",
        "--tls",
        "require",
        "--tls-certificates",
        p(&dir),
        "--tls-verify-peer",
    ]);
    let first = pem_der(&dir.join("server-cert.pem"));
    let client = pki.path("client");
    let config = tls_client(&pki.path("ca"), Some(&client));
    let presented = |server: &Server| {
        let tls = starttls(server, Arc::clone(&config), &[]);
        tls.conn.peer_certificates().expect("certificate")[0].to_vec()
    };
    assert_eq!(presented(&server), first);

    let mut long_lived = Clients::Debian12
        .command(PYTHON)
        .arg("-c")
        .arg(LONG_LIVED)
        .arg(nbds_tcp(&server, "disk", &client))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(long_lived.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "connected");

    // A new certificate and key, then SIGHUP.
    issue_server(&pki.path("ca"), &dir, "2");
    let second = pem_der(&dir.join("server-cert.pem"));
    assert_ne!(first, second);
    server.signal(rustix::process::Signal::HUP);
    log_line(&server, "TLS certificates reloaded");
    assert_eq!(
        presented(&server),
        second,
        "a new connection sees the new certificate"
    );
    Clients::Debian12.run_ok("nbdinfo", &[&nbds_tcp(&server, "disk", &client)]);

    // A broken key: the reload is refused, naming the file, and the last good one stays.
    fs::write(dir.join("server-key.pem"), "not a key\n").unwrap();
    server.signal(rustix::process::Signal::HUP);
    let line = log_line(&server, "TLS certificates not reloaded");
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains(&format!("{}", dir.join("server-key.pem").display())),
        "{line}"
    );
    assert_eq!(presented(&server), second);

    // The connection made before both reloads still works.
    writeln!(long_lived.stdin.as_mut().unwrap()).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "ok");
    assert!(long_lived.wait().unwrap().success());
    assert!(server.is_running());
    let log = server.stderr_text();
    assert!(!log.contains("connection dropped"), "{log}");
}

#[test]
fn the_handshake_deadline_covers_the_tls_handshake() {
    let pki = Pki::new();
    let server = Server::start(&[
        "-e",
        "disk=16M",
        "--tls",
        "require",
        "--tls-certificates",
        &pki.shown("server"),
        "--handshake-timeout",
        "2s",
    ]);
    // STARTTLS acknowledged, then no ClientHello: the deadline closes the connection.
    let mut raw = raw_start(&server);
    let ack = raw.option_single(OPT_STARTTLS, &[]);
    assert_eq!(ack.rep, REP_ACK, "{ack:?}");
    let started = std::time::Instant::now();
    raw.expect_closed(Duration::from_secs(30))
        .expect("closed without a byte");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "closed before the deadline: {waited:?}"
    );
    // A client that does its TLS handshake in time is served meanwhile and after.
    Clients::Debian12.run_ok(
        "nbdinfo",
        &[&nbds_tcp(&server, "disk", &pki.path("client"))],
    );
}

#[test]
fn allow_identity_matches_the_verified_certificate_cn() {
    let pki = Pki::new();
    let server = Server::start(&[
        "-e",
        "alices=16M,allow-identity=alice",
        "-e",
        "bobs=16M,allow-identity=bob",
        "--tls",
        "require",
        "--tls-certificates",
        &pki.shown("server"),
        "--tls-verify-peer",
    ]);
    let client = pki.path("client");
    // alice sees and uses her export only.
    let list = Clients::Debian12.run_ok(
        "nbdinfo",
        &["--list", "--json", &nbds_tcp(&server, "", &client)],
    );
    assert!(list.contains("\"alices\""), "{list}");
    assert!(
        !list.contains("\"bobs\""),
        "bob's export listed for alice: {list}"
    );
    Clients::Debian12.run_ok("nbdinfo", &[&nbds_unix(&server, "alices", &client)]);
    let output = Clients::Debian12.run("nbdinfo", &[&nbds_tcp(&server, "bobs", &client)]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("nbdinfo as alice for bob's export: {}", stderr.trim());
    assert!(!output.status.success(), "{stderr}");
    let line = log_line(&server, "refused by the export's access rules");
    assert!(
        line.contains("identity \"alice\"") && line.contains("bobs"),
        "{line}"
    );
}

/// argv: the nbds URI. A WRITE and a READ awaited, then 8 WRITEs and 8 READs of 4 KiB sent
/// without reading their replies; says so and waits for a line on stdin (the test hands the
/// server over before sending it). Then every reply must arrive, the connection must be
/// closed, and a new TLS connection must read back what the old one wrote.
const TLS_THROUGH_HAND_OVER: &str = r#"
import signal, sys, nbd
signal.alarm(120)
uri = sys.argv[1]

def connect():
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    assert h.get_tls_negotiated(), "TLS not negotiated"
    return h

def fill(i):
    return bytes([i + 1]) * 4096

h = connect()
h.pwrite(b"\x5a" * 4096, 0)
assert h.pread(4096, 0) == b"\x5a" * 4096
writes = [h.aio_pwrite(fill(i), (i + 1) * 65536) for i in range(8)]
reads = []
for i in range(8):
    buf = nbd.Buffer(4096)
    reads.append((buf, h.aio_pread(buf, 0)))
print("in flight", h.aio_in_flight(), flush=True)
sys.stdin.readline()
while h.aio_in_flight() > 0:
    h.poll(-1)
for cookie in writes:
    assert h.aio_command_completed(cookie)
for buf, cookie in reads:
    assert h.aio_command_completed(cookie)
    assert buf.to_bytearray() == b"\x5a" * 4096
print("every reply arrived", flush=True)
try:
    h.pread(4096, 0)
    sys.exit("the old server kept the TLS connection open")
except nbd.Error as err:
    print("closed:", err, flush=True)
h = connect()
for i in range(8):
    assert h.pread(4096, (i + 1) * 65536) == fill(i), "WRITE %d lost" % i
h.shutdown()
print("new TLS connection OK")
"#;

/// argv: the nbd URI. A plaintext connection: a WRITE and a READ, then (after a line on stdin)
/// the same data read and another WRITE and READ, on the connection the new server adopted.
const PLAIN_THROUGH_HAND_OVER: &str = r#"
import signal, sys, nbd
signal.alarm(120)
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert not h.get_tls_negotiated()
h.pwrite(b"\xa5" * 4096, 1 << 20)
assert h.pread(4096, 1 << 20) == b"\xa5" * 4096
print("ready", flush=True)
sys.stdin.readline()
assert h.pread(4096, 1 << 20) == b"\xa5" * 4096
h.pwrite(b"\x3c" * 4096, 2 << 20)
assert h.pread(4096, 2 << 20) == b"\x3c" * 4096
h.shutdown()
print("plain OK")
"#;

/// What the in-process servers of one test log: a subscriber for every thread of its runtime.
#[derive(Clone, Default)]
struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn runtime(&self) -> tokio::runtime::Runtime {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let dispatch = tracing::Dispatch::new(subscriber);
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .on_thread_start(move || {
                // For the thread's life, which is the runtime's.
                std::mem::forget(tracing::dispatcher::set_default(&dispatch));
            })
            .build()
            .unwrap()
    }
}

/// Requests counted by a server's metrics (each when its reply was completely written).
fn requests(metrics: &Arc<ramnbd::metrics::Metrics>) -> u64 {
    metrics
        .render()
        .lines()
        .filter(|line| line.starts_with("ramnbd_requests_total{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// A hand-over (the binary's first SIGTERM with the fd store in use; here two in-process
/// servers, as in handover.rs, sharing one listening socket as the fd store passes it on)
/// with a TLS and a plaintext libnbd connection open: the TLS one cannot move (its keys live
/// in the old process), so its requests are answered, it is closed and logged; the plaintext
/// one is handed over; the new server serves new TLS connections on the same socket.
fn tls_connections_are_closed_not_handed_over(clients: Clients) {
    use ramnbd::config::ExportConfig;
    use ramnbd::export::Exports;
    use ramnbd::metrics::Metrics;
    use ramnbd::server::{self, Listener, ServeOptions};
    use ramnbd::shutdown::{Phase, Shutdown};
    use ramnbd::tls::{Credentials, Tls, TlsMode};

    let pki = Pki::new();
    let log = CapturedLog::default();
    let runtime = log.runtime();
    let credentials = Arc::new(Credentials::load(&pki.path("server"), false).unwrap());
    let config = ExportConfig {
        name: "disk".to_owned(),
        size: 64 * MIB,
        ..Default::default()
    };
    let exports = Arc::new(Exports::new(&[config]).unwrap());
    let options = |metrics| ServeOptions {
        max_connections: 8,
        max_connections_per_client: 0,
        handshake_timeout: None,
        tcp_keepalive: None,
        allow: Vec::new(),
        shutdown_grace: Duration::from_secs(30),
        metrics: Some(metrics),
        tls: Tls::new(TlsMode::On, Arc::clone(&credentials)),
    };
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let port = socket.local_addr().unwrap().port();
    let listener = |socket: &std::net::TcpListener| {
        let _entered = runtime.enter();
        Listener::Tcp(tokio::net::TcpListener::from_std(socket.try_clone().unwrap()).unwrap())
    };
    let old_metrics = Metrics::new(Arc::clone(&exports));
    let old = Shutdown::new();
    let first = runtime.spawn(server::serve(
        vec![listener(&socket)],
        Arc::clone(&exports),
        options(Arc::clone(&old_metrics)),
        old.clone(),
    ));

    let spawn = |script: &str, uri: String| {
        let mut child = clients
            .command(PYTHON)
            .arg("-c")
            .arg(script)
            .arg(uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        (child, stdout)
    };
    let first_line = |stdout: &mut BufReader<std::process::ChildStdout>| {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line
    };
    let tls_uri = format!(
        "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
        pki.shown("anonymous")
    );
    let (mut tls_child, mut tls_out) = spawn(TLS_THROUGH_HAND_OVER, tls_uri);
    let line = first_line(&mut tls_out);
    assert_eq!(line, "in flight 16\n");
    let (mut plain_child, mut plain_out) = spawn(
        PLAIN_THROUGH_HAND_OVER,
        format!("nbd://127.0.0.1:{port}/disk"),
    );
    assert_eq!(first_line(&mut plain_out), "ready\n");
    // Every request has reached the old server and been answered (its replies wait unread
    // in the socket) before the hand-over: TLS 2 + 16, plaintext 2.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while requests(&old_metrics) < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 20 requests answered",
            requests(&old_metrics)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    old.hand_over();
    let handed_over = runtime.block_on(first).unwrap();
    assert_eq!(handed_over.len(), 1, "the plaintext connection only");
    let text = log.text();
    let closed: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("TLS connection closed, not handed over"))
        .collect();
    assert_eq!(closed.len(), 1, "{text}");
    eprintln!("server log: {}", closed[0]);

    // The restart's pause, then the new process: the adopted connection and the same socket.
    std::thread::sleep(Duration::from_millis(200));
    let new_metrics = Metrics::new(Arc::clone(&exports));
    let new = Shutdown::new();
    let second = runtime.spawn(server::serve_adopting(
        vec![listener(&socket)],
        handed_over,
        Arc::clone(&exports),
        options(Arc::clone(&new_metrics)),
        new.clone(),
    ));
    for child in [&mut tls_child, &mut plain_child] {
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }
    let status = tls_child.wait().unwrap();
    let rest: Vec<String> = tls_out.lines().map(Result::unwrap).collect();
    eprintln!("TLS client: {rest:?}");
    assert!(status.success(), "the TLS client failed: {rest:?}");
    assert_eq!(
        rest.first().map(String::as_str),
        Some("every reply arrived")
    );
    assert_eq!(
        rest.last().map(String::as_str),
        Some("new TLS connection OK")
    );
    let status = plain_child.wait().unwrap();
    let rest: Vec<String> = plain_out.lines().map(Result::unwrap).collect();
    assert!(status.success(), "the plaintext client failed: {rest:?}");
    assert_eq!(rest, ["plain OK"]);
    new.advance(Phase::Stopping);
    assert!(runtime.block_on(second).unwrap().is_empty());

    let (before, after) = (requests(&old_metrics), requests(&new_metrics));
    eprintln!("requests answered before the hand-over: {before}, after: {after}");
    assert_eq!(before, 20, "none answered twice, none after the hand-over");
    // Plaintext: READ, WRITE, READ on the adopted connection; TLS: 8 READs on a new one.
    assert_eq!(after, 11);
    // The TLS connection on each server.
    let text = log.text();
    let tls_sessions = text
        .lines()
        .filter(|line| line.contains("transmission started") && line.contains("tls=true"))
        .count();
    assert_eq!(tls_sessions, 2, "{text}");
}
both_generations!(tls_connections_are_closed_not_handed_over);
