//! TLS for NBD (`NBD_OPT_STARTTLS`): the server's mode, its X.509 credentials, and the TLS
//! handshake that upgrades a connection in the middle of the option phase.
//!
//! The stack is rustls with the *ring* provider (DESIGN.md, "TLS"). Credentials come from a
//! directory in the layout nbdkit and qemu use: `server-cert.pem` (the server's certificate,
//! then any intermediates), `server-key.pem` (its private key) and, to verify clients
//! (`--tls-verify-peer`), `ca-cert.pem` (the CAs client certificates must chain to).
//! [`Credentials::reload`] reads the directory again (SIGHUP): connections already in TLS keep
//! the session they have; new handshakes get the new certificates; a directory that fails to
//! load leaves the old ones in use.
//!
//! A verified client's identity is its certificate's subject common name (CN): what per-export
//! `allow-identity` rules match.
//!
//! External pre-shared keys (`--tls-psk`, the `identity:hexkey` file of nbdkit, qemu and libnbd,
//! which GnuTLS implements) are not supported: rustls implements only resumption PSKs, with no
//! API for external ones (rustls issue 174), so `--tls-psk` is refused at start
//! ([`PSK_UNSUPPORTED`]).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The server certificate (and intermediates, in order), in the credentials directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server certificate's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The CA certificates that client certificates must chain to (`--tls-verify-peer`).
pub const CA_CERT: &str = "ca-cert.pem";

/// Why `--tls-psk` is refused: the start-up error and the documentation say the same.
pub const PSK_UNSUPPORTED: &str = "TLS with pre-shared keys is not supported: ramnbd's TLS \
     stack (rustls) has no external-PSK support (only session resumption), so the \
     identity:hexkey files of nbdkit, qemu and libnbd cannot be served; use X.509 \
     certificates (--tls-certificates DIR, with --tls-verify-peer to authenticate clients). \
     Serving PSK would take a second, OpenSSL- or GnuTLS-backed acceptor for STARTTLS";

/// How the server treats TLS (`--tls`, `[tls] mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused with `ERR_POLICY`.
    #[default]
    Off,
    /// TLS offered: clients may use STARTTLS; exports with `tls=require` need it.
    On,
    /// TLS required: before STARTTLS, every option but ABORT is refused with `ERR_TLS_REQD`.
    Require,
}

impl TlsMode {
    pub fn parse(text: &str) -> Result<TlsMode, String> {
        match text {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            _ => Err("expected off, on or require".to_owned()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }
}

/// The TLS settings of one server, for every session: cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    pub mode: TlsMode,
    /// The credentials; `None` when the mode is off (or, in tests, [`Tls::without_credentials`]).
    pub credentials: Option<Arc<Credentials>>,
}

impl Tls {
    /// No TLS.
    pub fn off() -> Tls {
        Tls::default()
    }

    /// TLS in `mode` (not off) with `credentials`.
    pub fn new(mode: TlsMode, credentials: Arc<Credentials>) -> Tls {
        Tls {
            mode,
            credentials: (mode != TlsMode::Off).then_some(credentials),
        }
    }

    /// Options judged by `mode` with no credentials behind it: STARTTLS is acknowledged and
    /// the connection then closed. For tests and fuzzing of the option phase before TLS.
    pub fn without_credentials(mode: TlsMode) -> Tls {
        Tls {
            mode,
            credentials: None,
        }
    }
}

/// A credentials directory that cannot be used, naming the file and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}; {fix}", path.display())]
pub struct CredentialsError {
    pub path: PathBuf,
    pub problem: String,
    pub fix: String,
}

/// The server's TLS configuration, loaded from a credentials directory and replaced whole on
/// [`Credentials::reload`].
#[derive(Debug)]
pub struct Credentials {
    dir: PathBuf,
    verify_peer: bool,
    current: RwLock<Arc<ServerConfig>>,
}

impl Credentials {
    /// Loads `dir`; with `verify_peer`, clients must present a certificate that chains to
    /// `ca-cert.pem`.
    pub fn load(dir: &Path, verify_peer: bool) -> Result<Credentials, CredentialsError> {
        let config = server_config(dir, verify_peer)?;
        Ok(Credentials {
            dir: dir.to_owned(),
            verify_peer,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the directory again. On success new handshakes use what it holds now; on error
    /// nothing changes (the error says which file is wrong).
    pub fn reload(&self) -> Result<(), CredentialsError> {
        let config = server_config(&self.dir, self.verify_peer)?;
        *self.current.write().expect("never poisoned") = Arc::new(config);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }

    /// The configuration for a new handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().expect("never poisoned"))
    }
}

fn server_config(dir: &Path, verify_peer: bool) -> Result<ServerConfig, CredentialsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert_path = dir.join(SERVER_CERT);
    let key_path = dir.join(SERVER_KEY);
    let chain = read_certificates(&cert_path, "the server's certificate")?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|err| CredentialsError {
        path: key_path.clone(),
        problem: format!("cannot read a private key: {}", pem_problem(&err)),
        fix: "put the server certificate's private key there, in PEM (BEGIN PRIVATE KEY, \
              BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY), readable by the server"
            .to_owned(),
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = if verify_peer {
        let ca_path = dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        for cert in read_certificates(&ca_path, "the CA certificate")? {
            roots.add(cert).map_err(|err| CredentialsError {
                path: ca_path.clone(),
                problem: format!("a certificate there is not a usable CA: {err}"),
                fix: "put the PEM certificates of the CAs that sign client certificates there"
                    .to_owned(),
            })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|err| CredentialsError {
                path: ca_path.clone(),
                problem: format!("cannot verify clients with these CAs: {err}"),
                fix: "put the PEM certificates of the CAs that sign client certificates there"
                    .to_owned(),
            })?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|err| CredentialsError {
            path: key_path,
            problem: format!("cannot be used with {SERVER_CERT}: {err}"),
            fix: format!(
                "the key must be the private key of the first certificate in {SERVER_CERT} \
                 (compare `openssl x509 -noout -pubkey -in {SERVER_CERT}` with `openssl pkey \
                 -pubout -in {SERVER_KEY}`)"
            ),
        })?;
    // No session tickets: NBD clients connect once and stay; resumption would only add state.
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Every certificate in a PEM file; at least one.
fn read_certificates(
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, CredentialsError> {
    let error = |problem: String| CredentialsError {
        path: path.to_owned(),
        problem,
        fix: format!("put {what} there in PEM (BEGIN CERTIFICATE), readable by the server"),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| error(format!("cannot read certificates: {}", pem_problem(&err))))?;
    if certs.is_empty() {
        return Err(error("holds no certificate".to_owned()));
    }
    Ok(certs)
}

fn pem_problem(err: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match err {
        Error::NoItemsFound => "no PEM item of that kind found".to_owned(),
        Error::Io(err) => err.to_string(),
        other => format!("{other:?}"),
    }
}

/// What the TLS handshake established: logged, and the identity handed to access control.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Established {
    pub version: String,
    pub cipher: String,
    /// The verified client certificate's subject CN; `None` without a client certificate (or
    /// one without a CN).
    pub identity: Option<String>,
}

impl Established {
    pub fn of(connection: &rustls::ServerConnection) -> Established {
        let version = connection
            .protocol_version()
            .map_or_else(String::new, |v| format!("{v:?}"));
        let cipher = connection
            .negotiated_cipher_suite()
            .map_or_else(String::new, |s| format!("{:?}", s.suite()));
        let identity = connection
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| common_name(cert));
        Established {
            version,
            cipher,
            identity,
        }
    }
}

/// The subject common name of a DER certificate, if it has one that is text.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// A connection's two halves as one stream, to run the TLS handshake over (and TLS after it).
#[derive(Debug)]
pub struct Joined<R, W> {
    pub reader: R,
    pub writer: W,
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Joined<R, W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Joined<R, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.writer.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}
