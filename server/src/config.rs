//! Validated server configuration: the built-in defaults, the configuration file over them (see
//! [`file`]), the command-line flags over that (see [`Config::apply_cli`]): [`Config::load`].
//!
//! Each source turns its text into typed values; [`Config::validate`] then checks the rules
//! between values, whichever source gave them. Each value that it may refuse keeps its
//! [`Origin`], a place in the file or a flag, so that the error points where the operator has
//! to change it.

pub mod file;
mod flags;
mod value;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use flags::parse_export;
pub use value::{check_log_level, format_size, parse_backing, parse_duration, parse_size};

use ipnet::IpNet;

use crate::access::ExportAccess;
use crate::cli::Cli;
use crate::proto::consts::MAX_STRING;
use crate::ramdisk::BackingKind;
use crate::tls::{PSK_UNSUPPORTED, TlsMode};
use value::tcp_collide;

/// The default listener: loopback only, the IANA NBD port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
/// The default export's size: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("bad size {value:?} for {what}: {reason} (use binary units, e.g. 512M, 4G, 1T)")]
    Size {
        what: String,
        value: String,
        reason: String,
    },
    #[error(
        "bad export {spec:?}: {reason} (expected NAME=SIZE[,ro][,max-memory=SIZE][,image=PATH][,save-interval=DURATION][,tls=require][,allow=CIDR][,allow-uid=UID][,allow-gid=GID][,allow-identity=NAME][,description=TEXT])"
    )]
    ExportSpec { spec: String, reason: String },
    #[error("export name {0:?} is given twice; export names must be unique")]
    DuplicateExport(String),
    /// An error in the configuration file, with where it is and how to fix it.
    #[error("{0}")]
    File(Box<FileError>),
    #[error("cannot read the config file {path}: {source}", path = path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A bad command-line value (the file's are reported as [`ConfigError::File`]).
    #[error("{flag} {value:?}: {reason}")]
    Flag {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

/// Where a configuration file is wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    /// The key's path, such as `export[1].size`.
    pub key: String,
    pub message: String,
    /// The offending line of the file.
    pub excerpt: String,
    pub fix: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let FileError {
            path,
            line,
            column,
            key,
            message,
            excerpt,
            fix,
        } = self;
        write!(
            f,
            "{}:{line}:{column}: {key}: {message}\n  {line} | {excerpt}\n  fix: {fix}",
            path.display()
        )
    }
}

/// One export as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportConfig {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    pub description: String,
    /// Cap on the RAM this export may hold, on top of the global cap.
    pub max_memory: Option<u64>,
    /// The file the export is loaded from at start and saved to (see `crate::image`).
    pub image: Option<PathBuf>,
    /// How often the image is saved, over [`Config::save_interval`]; zero: never periodically.
    pub save_interval: Option<Duration>,
    /// Only clients that have started TLS may see or use it (`tls=require`).
    pub tls_required: bool,
    /// Who may see and use the export (see [`crate::access`]).
    pub access: ExportAccess,
}

/// Server-wide memory policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Cap on the RAM all exports together may hold.
    pub max_memory: Option<u64>,
    /// Lock pages in RAM as they fault in.
    pub mlock: bool,
    /// Ask for transparent huge pages.
    pub hugepages: bool,
    /// Where export bytes live.
    pub backing: BackingChoice,
}

/// The `backing` setting: where export bytes live (DESIGN.md, "Backing memory").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackingChoice {
    /// Private anonymous memory: gone with the process.
    Anonymous,
    /// A memfd, which a service manager's file-descriptor store can keep across a restart.
    Memfd,
    /// A memfd when running under a service manager that may keep it (`NOTIFY_SOCKET` is
    /// set), anonymous memory otherwise: outside one nothing can keep a memfd alive anyway.
    #[default]
    Auto,
}

impl BackingChoice {
    /// The backing to use, given the process environment (`var` looks a variable up).
    pub fn resolve(self, var: impl Fn(&str) -> Option<std::ffi::OsString>) -> BackingKind {
        match self {
            BackingChoice::Anonymous => BackingKind::Anonymous,
            BackingChoice::Memfd => BackingKind::Memfd,
            BackingChoice::Auto if var("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty()) => {
                BackingKind::Memfd
            }
            BackingChoice::Auto => BackingKind::Anonymous,
        }
    }
}

/// A place to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// HOST:PORT, resolved when binding.
    Tcp(String),
    Unix(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub exports: Vec<ExportConfig>,
    pub listen: Vec<ListenAddr>,
    pub memory: MemoryConfig,
    pub log_level: Option<String>,
    /// How long a stopping server waits for connections to finish.
    pub shutdown_grace: Duration,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Connections one client address may hold at once (TCP: by IP); 0: no per-client cap.
    pub max_connections_per_client: usize,
    /// How long a connection may take to reach the transmission phase; zero: no deadline.
    pub handshake_timeout: Duration,
    /// Idle time before TCP keepalive probes start on accepted connections; zero: off.
    pub tcp_keepalive: Duration,
    /// HOST:PORT of the Prometheus `/metrics` endpoint; `None`: no metrics (the default).
    pub metrics: Option<String>,
    /// How often exports with an image save it, unless they set their own; `None` or zero:
    /// only on stop and SIGHUP.
    pub save_interval: Option<Duration>,
    /// TLS (STARTTLS): mode and credentials.
    pub tls: TlsConfig,
    /// The client networks that may connect over TCP at all; empty: any.
    pub allow: Vec<IpNet>,
    /// The configuration file this came from, if any.
    pub source: Option<PathBuf>,
    /// Where the values that [`Config::validate`] checks came from.
    origins: Origins,
}

/// Where the values that [`Config::validate`] checks came from: one entry per export (for its
/// name) and per listener, in the order of `exports` and `listen`. A missing entry is the
/// built-in default.
#[derive(Debug, Clone, Default)]
struct Origins {
    exports: Vec<Origin>,
    listen: Vec<Origin>,
    /// Where the listeners were given as a whole, for an empty list.
    listen_section: Origin,
    metrics: Origin,
    tls_mode: Origin,
    tls_certificates: Origin,
    tls_verify_peer: Origin,
    tls_psk: Origin,
}

/// The TLS settings (see [`crate::tls`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    pub mode: TlsMode,
    /// The credentials directory: `server-cert.pem`, `server-key.pem`, `ca-cert.pem`.
    pub certificates: Option<PathBuf>,
    /// Require client certificates, verified against `ca-cert.pem`.
    pub verify_peer: bool,
    /// A PSK file: refused (see [`crate::tls::PSK_UNSUPPORTED`]); kept to say so.
    pub psk: Option<PathBuf>,
}

/// Where a value came from, so that an error about it points there.
#[derive(Debug, Clone, Default)]
enum Origin {
    /// The built-in defaults.
    #[default]
    Default,
    /// A place in the configuration file: the error there, still without message and fix.
    File(Box<FileError>),
    /// A command-line flag.
    Flag(&'static str),
}

impl Origin {
    /// An error about `value`, given here, that `problem` says what is wrong with and `fix` how
    /// to fix. In the file, `subject` introduces the value ("the metrics address \"…\""); a
    /// flag's message starts with the flag and the value themselves.
    fn error(&self, value: &str, subject: &str, problem: &str, fix: &str) -> ConfigError {
        // The defaults are valid and are replaced as a whole, so the value reported is never
        // one of them; should it be, the error still says what is wrong.
        let flag = match self {
            Origin::File(place) => {
                return ConfigError::File(Box::new(FileError {
                    message: format!("{subject} {problem}"),
                    fix: fix.to_owned(),
                    ..(**place).clone()
                }));
            }
            Origin::Flag(flag) => flag,
            Origin::Default => "the built-in default",
        };
        ConfigError::Flag {
            flag,
            value: value.to_owned(),
            reason: format!("{problem}; {fix}"),
        }
    }

    /// Names `value`, given here, in an error about another value.
    fn mention(&self, value: &str) -> String {
        match self {
            Origin::File(place) => format!("{value:?} (line {})", place.line),
            Origin::Flag(flag) => format!("{flag} {value:?}"),
            Origin::Default => format!("{value:?} (the default)"),
        }
    }
}

/// The built-in default grace period for a stopping server.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The built-in handshake deadline: ample for any real client (they negotiate in
/// milliseconds), short enough that connections that send nothing are soon closed.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The built-in per-client cap: 0, none. One address may be a NAT gateway or a host with many
/// legitimate clients (a kernel client opens one connection per queue), so a cap is a choice
/// for the operator who knows the clients.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 0;

/// The built-in TCP keepalive idle time: a peer that vanished (power loss, cut link) is found
/// and its connection closed after this plus the kernel's probes (9 × 75 s by default).
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);

impl Config {
    /// The configuration with no file and no flags: one 1 GiB export named "" on
    /// 127.0.0.1:10809.
    pub fn builtin() -> Config {
        Config {
            exports: vec![ExportConfig {
                name: String::new(),
                size: DEFAULT_SIZE,
                read_only: false,
                description: String::new(),
                max_memory: None,
                image: None,
                save_interval: None,
                tls_required: false,
                access: ExportAccess::default(),
            }],
            listen: vec![ListenAddr::Tcp(DEFAULT_LISTEN.to_owned())],
            memory: MemoryConfig::default(),
            log_level: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_connections: 1024,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            tcp_keepalive: DEFAULT_TCP_KEEPALIVE,
            metrics: None,
            save_interval: None,
            tls: TlsConfig::default(),
            allow: Vec::new(),
            source: None,
            origins: Origins::default(),
        }
    }

    /// The configuration file to read: `--config FILE`, else the default path if that file
    /// exists (and `--no-config` is not given), else none.
    pub fn file_for(cli: &Cli) -> Option<PathBuf> {
        if let Some(path) = &cli.config {
            return Some(path.clone());
        }
        let default = Path::new(file::DEFAULT_PATH);
        (!cli.no_config && default.exists()).then(|| default.to_owned())
    }

    /// The file (if any, see [`Config::file_for`]) with the command-line flags on top. The file
    /// must be valid on its own, as `--check-config FILE` and a service without flags see it,
    /// and so must the result with the flags.
    pub fn load(cli: Cli) -> Result<Config, ConfigError> {
        let base = match Config::file_for(&cli) {
            Some(path) => file::load(&path)?,
            None => Config::builtin(),
        };
        base.apply_cli(cli)
    }

    /// Checks what no single value shows: export names unique and at most 4096 bytes, at
    /// least one listener, no two listeners (nor metrics and a listener) on one address, no Unix
    /// socket twice. Sizes, durations, addresses and log filters were checked as they were
    /// read. The error points at the value to change, in the file or on the command line.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_exports()?;
        self.check_listeners()?;
        self.check_metrics()?;
        self.check_tls()
    }

    /// TLS needs credentials, credentials need TLS, PSK is refused, and an export that requires
    /// TLS needs a server that offers it.
    fn check_tls(&self) -> Result<(), ConfigError> {
        let tls = &self.tls;
        let origins = &self.origins;
        if let Some(psk) = &tls.psk {
            let shown = psk.display().to_string();
            let subject = format!("the PSK file {shown}");
            return Err(origins
                .tls_psk
                .error(&shown, &subject, "cannot be used", PSK_UNSUPPORTED));
        }
        let mode = tls.mode.as_str();
        match (&tls.certificates, tls.mode) {
            (None, TlsMode::On | TlsMode::Require) => {
                return Err(origins.tls_mode.error(
                    mode,
                    &format!("tls mode {mode:?}"),
                    "needs a certificates directory",
                    "give one with --tls-certificates DIR or `certificates = \"DIR\"` in [tls] \
                     (holding ca-cert.pem, server-cert.pem and server-key.pem), or set tls off",
                ));
            }
            (Some(dir), TlsMode::Off) => {
                let shown = dir.display().to_string();
                return Err(origins.tls_certificates.error(
                    &shown,
                    &format!("the certificates directory {shown}"),
                    "is given but TLS is off",
                    "set --tls on or require (`mode = \"on\"` in [tls]), or remove it",
                ));
            }
            _ => {}
        }
        if tls.verify_peer && tls.mode == TlsMode::Off {
            return Err(origins.tls_verify_peer.error(
                "true",
                "verify-peer",
                "is set but TLS is off",
                "set --tls on or require (`mode = \"on\"` in [tls]), or remove it",
            ));
        }
        if tls.mode == TlsMode::Off {
            let origin = |i| self.origins.exports.get(i).unwrap_or(&Origin::Default);
            if let Some((i, export)) = self
                .exports
                .iter()
                .enumerate()
                .find(|(_, e)| e.tls_required)
            {
                let name = &export.name;
                return Err(origin(i).error(
                    name,
                    &format!("export {name:?}"),
                    "requires TLS (tls=require) but TLS is off",
                    "set --tls on or require with --tls-certificates DIR (or [tls] in the \
                     file), or drop tls=require from the export",
                ));
            }
        }
        Ok(())
    }

    fn check_exports(&self) -> Result<(), ConfigError> {
        let origin = |i| self.origins.exports.get(i).unwrap_or(&Origin::Default);
        for (i, export) in self.exports.iter().enumerate() {
            let name = &export.name;
            if name.len() > MAX_STRING {
                let problem = "is longer than the 4096 bytes NBD allows";
                return Err(origin(i).error(
                    name,
                    "the export name",
                    problem,
                    "use a shorter name",
                ));
            }
            if let Some(image) = &export.image
                && let Some(first) = self.exports[..i]
                    .iter()
                    .find(|e| e.image.as_ref() == Some(image))
            {
                let shown = image.display().to_string();
                let problem = format!(
                    "is also the image of export {:?}: two exports cannot share one file",
                    first.name
                );
                return Err(origin(i).error(
                    &shown,
                    &format!("the image {shown} of export {name:?}"),
                    &problem,
                    "give every export an image file of its own",
                ));
            }
            if let Some(first) = self.exports[..i].iter().position(|e| e.name == *name) {
                let Origin::File(first) = origin(first) else {
                    return Err(ConfigError::DuplicateExport(name.clone()));
                };
                return Err(origin(i).error(
                    name,
                    &format!("export name {name:?}"),
                    &format!("is used twice (first at line {})", first.line),
                    "give every [[export]] its own name (\"\" is the default export)",
                ));
            }
        }
        Ok(())
    }

    /// The listeners, each with where it was given.
    fn listeners(&self) -> impl Iterator<Item = (&ListenAddr, &Origin)> {
        let origins = self
            .origins
            .listen
            .iter()
            .chain(std::iter::repeat(&Origin::Default));
        self.listen.iter().zip(origins)
    }

    fn check_listeners(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(self.origins.listen_section.error(
                "",
                "[listen]",
                "has no tcp or unix entries, so there is nowhere to serve",
                "add tcp = [\"127.0.0.1:10809\"] or unix = [\"/run/ramnbd/ramnbd.sock\"], or \
                 remove [listen] for the default 127.0.0.1:10809",
            ));
        }
        for (i, (listener, at)) in self.listeners().enumerate() {
            let mut earlier = self.listeners().take(i);
            match listener {
                ListenAddr::Tcp(addr) => {
                    let clash = earlier.find_map(|(other, first_at)| match other {
                        ListenAddr::Tcp(first) if tcp_collide(first, addr) => {
                            Some((first, first_at))
                        }
                        _ => None,
                    });
                    if let Some((first, first_at)) = clash {
                        let problem = format!(
                            "collides with {}: both cannot be bound",
                            first_at.mention(first)
                        );
                        return Err(at.error(
                            addr,
                            &format!("{addr:?}"),
                            &problem,
                            "listen on each address and port once; 0.0.0.0 and [::] already \
                             cover every address of their port",
                        ));
                    }
                }
                ListenAddr::Unix(path) => {
                    let shown = path.display().to_string();
                    if shown.is_empty() {
                        let fix = "give the socket's path, such as \"/run/ramnbd/ramnbd.sock\"";
                        return Err(at.error("", "the socket path", "is empty", fix));
                    }
                    if let Some((_, first_at)) = earlier.find(|(other, _)| *other == listener) {
                        // The file lists its sockets; flags are given.
                        let problem = match first_at {
                            Origin::File(first) => {
                                format!("is listed twice (first at line {})", first.line)
                            }
                            _ => "is given twice".to_owned(),
                        };
                        let fix = "list each Unix socket path once";
                        return Err(at.error(&shown, &format!("socket {shown}"), &problem, fix));
                    }
                }
            }
        }
        Ok(())
    }

    fn check_metrics(&self) -> Result<(), ConfigError> {
        let Some(metrics) = &self.metrics else {
            return Ok(());
        };
        let clash = self.listeners().find_map(|(listener, at)| match listener {
            ListenAddr::Tcp(addr) if tcp_collide(addr, metrics) => Some((addr, at)),
            _ => None,
        });
        let Some((nbd, nbd_at)) = clash else {
            return Ok(());
        };
        let subject = format!("the metrics address {metrics:?}");
        let problem = format!("collides with the NBD listener {}", nbd_at.mention(nbd));
        Err(match (&self.origins.metrics, nbd_at) {
            // The file alone was valid: the listener flags made it clash, so the fix belongs on
            // the command line too.
            (Origin::File(place), Origin::Flag(_)) => {
                let fix = format!(
                    "give metrics a port of its own with --metrics, which overrides \
                     metrics.listen at {}:{}",
                    place.path.display(),
                    place.line
                );
                Origin::Flag("--metrics").error(metrics, &subject, &problem, &fix)
            }
            (at, _) => {
                let fix = "give metrics a port of its own, such as \"127.0.0.1:9109\"";
                at.error(metrics, &subject, &problem, fix)
            }
        })
    }

    /// Replaces the exports, each with where it was given.
    fn set_exports(&mut self, exports: impl IntoIterator<Item = (ExportConfig, Origin)>) {
        (self.exports, self.origins.exports) = exports.into_iter().unzip();
    }

    /// Replaces the listeners, each with where it was given; `section` gave them as a whole.
    fn set_listen(
        &mut self,
        listen: impl IntoIterator<Item = (ListenAddr, Origin)>,
        section: Origin,
    ) {
        (self.listen, self.origins.listen) = listen.into_iter().unzip();
        self.origins.listen_section = section;
    }

    fn set_tls_mode(&mut self, mode: TlsMode, origin: Origin) {
        self.tls.mode = mode;
        self.origins.tls_mode = origin;
    }

    fn set_tls_certificates(&mut self, dir: PathBuf, origin: Origin) {
        self.tls.certificates = Some(dir);
        self.origins.tls_certificates = origin;
    }

    fn set_tls_verify_peer(&mut self, verify: bool, origin: Origin) {
        self.tls.verify_peer = verify;
        self.origins.tls_verify_peer = origin;
    }

    fn set_tls_psk(&mut self, file: PathBuf, origin: Origin) {
        self.tls.psk = Some(file);
        self.origins.tls_psk = origin;
    }

    fn set_metrics(&mut self, addr: String, origin: Origin) {
        self.metrics = Some(addr);
        self.origins.metrics = origin;
    }

    /// One line for logs and `--check-config`: the exports with their sizes.
    pub fn describe_exports(&self) -> String {
        self.exports
            .iter()
            .map(|e| {
                let image = e
                    .image
                    .as_ref()
                    .map_or_else(String::new, |path| format!(" image {}", path.display()));
                format!(
                    "{:?} {}{}{}{image}",
                    e.name,
                    format_size(e.size),
                    if e.read_only { " ro" } else { "" },
                    if e.tls_required { " tls=require" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["ramnbd"];
        argv.extend_from_slice(args);
        Config::try_from(Cli::try_parse_from(argv).unwrap())
    }

    #[test]
    fn no_arguments_is_one_gib_default_export_on_loopback() {
        let c = config(&[]).unwrap();
        assert_eq!(
            c.exports,
            vec![ExportConfig {
                name: String::new(),
                size: 1 << 30,
                read_only: false,
                description: String::new(),
                max_memory: None,
                image: None,
                save_interval: None,
                tls_required: false,
                access: ExportAccess::default(),
            }]
        );
        assert_eq!(c.listen, vec![ListenAddr::Tcp("127.0.0.1:10809".into())]);
    }

    #[test]
    fn sizes_are_binary() {
        assert_eq!(config(&["-s", "4G"]).unwrap().exports[0].size, 4 << 30);
        assert_eq!(parse_size("1T", "x").unwrap(), 1 << 40);
        assert_eq!(parse_size("512M", "x").unwrap(), 512 << 20);
        assert_eq!(parse_size("1000", "x").unwrap(), 1000);
        let err = parse_size("0", "--size").unwrap_err().to_string();
        assert!(
            err.contains("--size") && err.contains("greater than zero"),
            "{err}"
        );
        assert!(parse_size("12Q", "x").is_err());
        assert!(parse_size("16E", "x").is_err());
    }

    #[test]
    fn export_specs() {
        let e = parse_export("iso=4G,ro,description=install media, v2").unwrap();
        assert_eq!(e.name, "iso");
        assert_eq!(e.size, 4 << 30);
        assert!(e.read_only);
        assert_eq!(e.description, "install media, v2");
        assert_eq!(parse_export("=1M").unwrap().name, "");
        assert!(parse_export("noequals").is_err());
        assert!(parse_export("a=").is_err());
        assert!(parse_export("a=1G,bogus").is_err());
        assert_eq!(
            parse_export("a=1G,max-memory=256M").unwrap().max_memory,
            Some(256 << 20)
        );
        assert!(parse_export("a=1G,max-memory=lots").is_err());
    }

    #[test]
    fn exports_replace_the_default_and_must_be_unique() {
        let c = config(&["-e", "a=1M", "-e", "b=2M", "--read-only"]).unwrap();
        assert_eq!(c.exports.len(), 2);
        assert!(c.exports.iter().all(|e| e.read_only));
        let err = config(&["-e", "a=1M", "-e", "a=2M"]).unwrap_err();
        assert!(matches!(err, ConfigError::DuplicateExport(name) if name == "a"));
    }

    #[test]
    fn access_flags() {
        let c = config(&[
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "::ffff:192.0.2.1",
            "-e",
            "a=1M,allow=10.1.0.0/16,allow=10.2.0.0/16,allow-uid=0,allow-gid=6,allow-identity=c1",
        ])
        .unwrap();
        let shown: Vec<String> = c.allow.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.0.2.1/32"]);
        let access = &c.exports[0].access;
        assert_eq!(access.networks.len(), 2);
        assert_eq!(
            (access.uids.as_slice(), access.gids.as_slice()),
            (&[0][..], &[6][..])
        );
        assert_eq!(access.identities, ["c1"]);
        let err = config(&["--allow", "10.0.0.1/8"]).unwrap_err().to_string();
        assert!(
            err.starts_with("--allow \"10.0.0.1/8\": has host bits set"),
            "{err}"
        );
        let err = config(&["-e", "a=1M,allow-uid=root"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow-uid=root: not a numeric id"), "{err}");
        assert!(config(&["-e", "a=1M,allow-identity="]).is_err());
    }

    #[test]
    fn listeners_replace_the_default() {
        let c = config(&["-u", "/tmp/s", "-l", "[::1]:0"]).unwrap();
        assert_eq!(
            c.listen,
            vec![
                ListenAddr::Tcp("[::1]:0".into()),
                ListenAddr::Unix("/tmp/s".into())
            ]
        );
    }

    #[test]
    fn tls_settings_and_their_rules() {
        let e = parse_export("s=1M,tls=require").unwrap();
        assert!(e.tls_required);
        let err = parse_export("s=1M,tls=on").unwrap_err().to_string();
        assert!(err.contains("tls=require"), "{err}");
        let c = config(&[
            "--tls",
            "require",
            "--tls-certificates",
            "/etc/x",
            "--tls-verify-peer",
        ])
        .unwrap();
        assert_eq!(c.tls.mode, TlsMode::Require);
        assert_eq!(c.tls.certificates.as_deref(), Some(Path::new("/etc/x")));
        assert!(c.tls.verify_peer);
        for (args, expected) in [
            (&["--tls", "on"][..], "needs a certificates directory"),
            (&["--tls-certificates", "/etc/x"], "is given but TLS is off"),
            (&["--tls-verify-peer"], "is set but TLS is off"),
            (
                &["-e", "a=1M,tls=require"],
                "requires TLS (tls=require) but TLS is off",
            ),
            (&["--tls-psk", "/k"], "not supported"),
            (&["--tls", "yes"], "expected off, on or require"),
        ] {
            let err = config(args).unwrap_err().to_string();
            assert!(err.contains(expected), "{args:?}: {err}");
        }
        let path = Path::new("/etc/ramnbd/ramnbd.toml");
        let text = "[tls]\nmode = \"on\"\ncertificates = \"/etc/tls\"\n\n\
                    [[export]]\nname = \"s\"\nsize = \"1M\"\ntls = \"require\"\n";
        let c = file::parse(path, text).unwrap();
        assert_eq!(c.tls.mode, TlsMode::On);
        assert!(c.exports[0].tls_required);
        let err = file::parse(path, "[tls]\nmode = \"on\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2:8: tls.mode") && err.contains("certificates"),
            "{err}"
        );
        let err = file::parse(path, "[tls]\npsk = \"/k\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls.psk") && err.contains("OpenSSL"), "{err}");
    }
}
