//! Validated server configuration, built from the command line.

use std::path::PathBuf;
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
}

impl TryFrom<Cli> for Config {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Self, ConfigError> {
        let mut exports = if cli.exports.is_empty() {
            let size = match &cli.size {
                Some(text) => parse_size(text, "--size")?,
                None => DEFAULT_SIZE,
            };
            vec![ExportConfig {
                name: String::new(),
                size,
                read_only: false,
                description: String::new(),
                max_memory: None,
            }]
        } else {
            cli.exports
                .iter()
                .map(|spec| parse_export(spec))
                .collect::<Result<Vec<_>, _>>()?
        };
        for (i, export) in exports.iter().enumerate() {
            if exports[..i].iter().any(|e| e.name == export.name) {
                return Err(ConfigError::DuplicateExport(export.name.clone()));
            }
        }
        if cli.read_only {
            exports.iter_mut().for_each(|e| e.read_only = true);
        }
        let mut listen: Vec<ListenAddr> = cli.listen.into_iter().map(ListenAddr::Tcp).collect();
        listen.extend(cli.unix.into_iter().map(ListenAddr::Unix));
        if listen.is_empty() {
            listen.push(ListenAddr::Tcp(DEFAULT_LISTEN.to_owned()));
        }
        let memory = MemoryConfig {
            max_memory: cli
                .max_memory
                .as_deref()
                .map(|t| parse_size(t, "--max-memory"))
                .transpose()?,
            mlock: cli.mlock,
            hugepages: cli.hugepages,
        };
        Ok(Config {
            exports,
            listen,
            memory,
            log_level: cli.log_level,
            shutdown_grace: Duration::from_secs(10),
            max_connections: 1024,
        })
    }
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
