//! Validated server configuration, built from the configuration file (see [`file`]) and the
//! command line, whose flags override the file: [`Config::load`].

pub mod file;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::Cli;

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
        "bad export {spec:?}: {reason} (expected NAME=SIZE[,ro][,max-memory=SIZE][,description=TEXT])"
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    pub description: String,
    /// Cap on the RAM this export may hold, on top of the global cap.
    pub max_memory: Option<u64>,
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
    /// HOST:PORT of the Prometheus `/metrics` endpoint; `None`: no metrics (the default).
    pub metrics: Option<String>,
    /// The configuration file this came from, if any.
    pub source: Option<PathBuf>,
}

/// The built-in default grace period for a stopping server.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
            }],
            listen: vec![ListenAddr::Tcp(DEFAULT_LISTEN.to_owned())],
            memory: MemoryConfig::default(),
            log_level: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_connections: 1024,
            metrics: None,
            source: None,
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

    /// The file (if any, see [`Config::file_for`]) with the command-line flags on top.
    pub fn load(cli: Cli) -> Result<Config, ConfigError> {
        let base = match Config::file_for(&cli) {
            Some(path) => file::load(&path)?,
            None => Config::builtin(),
        };
        base.apply_cli(cli)
    }

    /// Applies command-line flags over `self`. Export flags (`--size`, `--export`) replace the
    /// file's exports, listener flags (`--listen`, `--unix`) its listeners; `--read-only`,
    /// `--mlock` and `--hugepages` switch on; every other flag replaces the file's value.
    pub fn apply_cli(mut self, cli: Cli) -> Result<Config, ConfigError> {
        if !cli.exports.is_empty() {
            let exports = cli
                .exports
                .iter()
                .map(|spec| parse_export(spec))
                .collect::<Result<Vec<_>, _>>()?;
            for (i, export) in exports.iter().enumerate() {
                if exports[..i].iter().any(|e| e.name == export.name) {
                    return Err(ConfigError::DuplicateExport(export.name.clone()));
                }
            }
            self.exports = exports;
        } else if let Some(text) = &cli.size {
            let mut export = Config::builtin().exports.remove(0);
            export.size = parse_size(text, "--size")?;
            self.exports = vec![export];
        }
        if cli.read_only {
            self.exports.iter_mut().for_each(|e| e.read_only = true);
        }
        if !cli.listen.is_empty() || !cli.unix.is_empty() {
            for (i, addr) in cli.listen.iter().enumerate() {
                file::check_host_port(addr).map_err(|reason| ConfigError::Flag {
                    flag: "--listen",
                    value: addr.clone(),
                    reason,
                })?;
                if let Some(first) = cli.listen[..i].iter().find(|a| file::tcp_collide(a, addr)) {
                    return Err(ConfigError::Flag {
                        flag: "--listen",
                        value: addr.clone(),
                        reason: format!("collides with --listen {first:?}; give each address once"),
                    });
                }
            }
            for (i, path) in cli.unix.iter().enumerate() {
                if cli.unix[..i].contains(path) {
                    return Err(ConfigError::Flag {
                        flag: "--unix",
                        value: path.display().to_string(),
                        reason: "given twice".to_owned(),
                    });
                }
            }
            self.listen = cli.listen.into_iter().map(ListenAddr::Tcp).collect();
            self.listen
                .extend(cli.unix.into_iter().map(ListenAddr::Unix));
        }
        if let Some(text) = &cli.max_memory {
            self.memory.max_memory = Some(parse_size(text, "--max-memory")?);
        }
        self.memory.mlock |= cli.mlock;
        self.memory.hugepages |= cli.hugepages;
        if let Some(level) = cli.log_level {
            check_log_level(&level).map_err(|reason| ConfigError::Flag {
                flag: "--log-level",
                value: level.clone(),
                reason,
            })?;
            self.log_level = Some(level);
        }
        if let Some(text) = &cli.shutdown_grace {
            self.shutdown_grace = parse_duration(text).map_err(|reason| ConfigError::Flag {
                flag: "--shutdown-grace",
                value: text.clone(),
                reason,
            })?;
        }
        if let Some(addr) = cli.metrics {
            file::check_host_port(&addr).map_err(|reason| ConfigError::Flag {
                flag: "--metrics",
                value: addr.clone(),
                reason,
            })?;
            self.metrics = Some(addr);
        }
        if let Some(metrics) = &self.metrics {
            let clash = self.listen.iter().find_map(|l| match l {
                ListenAddr::Tcp(addr) if file::tcp_collide(addr, metrics) => Some(addr),
                _ => None,
            });
            if let Some(addr) = clash {
                return Err(ConfigError::Flag {
                    flag: "--metrics",
                    value: metrics.clone(),
                    reason: format!(
                        "collides with the NBD listener {addr:?}; give metrics its own port"
                    ),
                });
            }
        }
        Ok(self)
    }

    /// One line for logs and `--check-config`: the exports with their sizes.
    pub fn describe_exports(&self) -> String {
        self.exports
            .iter()
            .map(|e| {
                format!(
                    "{:?} {}{}",
                    e.name,
                    format_size(e.size),
                    if e.read_only { " ro" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The command line alone, over the built-in defaults (no configuration file).
impl TryFrom<Cli> for Config {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Self, ConfigError> {
        Config::builtin().apply_cli(cli)
    }
}

/// `1 GiB`, `512 MiB`, `1000 B`: the largest binary unit that divides the size exactly.
pub fn format_size(size: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = size;
    let mut unit = 0;
    while value >= 1024 && value.is_multiple_of(1024) && unit + 1 < UNITS.len() {
        value /= 1024;
        unit += 1;
    }
    format!("{value} {}", UNITS[unit])
}

/// Parses a duration: "10s", "500ms", "2m", "1.5s", or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| "expected a number with a unit: ms, s or m".to_owned())?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        other => return Err(format!("unknown unit {other:?}; use ms, s or m")),
    };
    Duration::try_from_secs_f64(number * scale)
        .ok()
        .filter(|d| *d <= Duration::from_secs(24 * 3600))
        .ok_or_else(|| "out of range (at most a day)".to_owned())
}

/// Checks a log level or `RUST_LOG`-style filter.
pub fn check_log_level(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|err| format!("not a log level or filter: {err}"))
}

/// Parses a size with binary units ("4G" = 4 GiB). Zero is refused: an export needs bytes.
pub fn parse_size(text: &str, what: &str) -> Result<u64, ConfigError> {
    let err = |reason: String| ConfigError::Size {
        what: what.to_owned(),
        value: text.to_owned(),
        reason,
    };
    let size = parse_size::Config::new()
        .with_binary()
        .parse_size(text.trim())
        .map_err(|e| err(e.to_string()))?;
    if size == 0 {
        return Err(err("size must be greater than zero".to_owned()));
    }
    if usize::try_from(size).is_err() || size > i64::MAX as u64 {
        return Err(err("larger than this machine can address".to_owned()));
    }
    Ok(size)
}

/// Parses `NAME=SIZE[,ro][,max-memory=SIZE][,description=TEXT]`.
pub fn parse_export(spec: &str) -> Result<ExportConfig, ConfigError> {
    let bad = |reason: &str| ConfigError::ExportSpec {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| bad("missing '=' after the name"))?;
    if name.len() > crate::proto::consts::MAX_STRING {
        return Err(bad("names are at most 4096 bytes"));
    }
    // The description may contain commas, so it ends the spec.
    let (options, description) = match rest.find(",description=") {
        Some(at) => (&rest[..at], rest[at + ",description=".len()..].to_owned()),
        None => (rest, String::new()),
    };
    let mut parts = options.split(',');
    let size_text = parts.next().unwrap_or_default();
    if size_text.is_empty() {
        return Err(bad("missing size"));
    }
    let size = parse_size(size_text, &format!("export {name:?}"))?;
    let mut read_only = false;
    let mut max_memory = None;
    for option in parts {
        match option.split_once('=') {
            None if option == "ro" => read_only = true,
            None if option == "rw" => read_only = false,
            Some(("max-memory", value)) => {
                max_memory = Some(parse_size(
                    value,
                    &format!("max-memory of export {name:?}"),
                )?);
            }
            _ => return Err(bad(&format!("unknown option {option:?}"))),
        }
    }
    Ok(ExportConfig {
        name: name.to_owned(),
        size,
        read_only,
        description,
        max_memory,
    })
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
}
