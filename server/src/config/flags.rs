//! Command-line flags over a [`Config`]: each flag's text becomes a typed value here, and the
//! flags that set a value record themselves as its [`Origin`], so that
//! [`Config::validate`] names the flag when that value is wrong.

use super::value::{check_host_port, check_log_level, parse_backing, parse_duration, parse_size};
use super::{Config, ConfigError, ExportConfig, ListenAddr, Origin};
use crate::access::{self, ExportAccess};
use crate::cli::Cli;
use crate::tls::TlsMode;

impl Config {
    /// Applies command-line flags over `self`, then validates the result. Export flags
    /// (`--size`, `--export`) replace the file's exports, listener flags (`--listen`, `--unix`)
    /// its listeners; `--read-only`, `--mlock` and `--hugepages` switch on; every other flag
    /// replaces the file's value.
    pub fn apply_cli(mut self, cli: Cli) -> Result<Config, ConfigError> {
        self.merge_flags(cli)?;
        self.validate()?;
        Ok(self)
    }

    fn merge_flags(&mut self, cli: Cli) -> Result<(), ConfigError> {
        if !cli.exports.is_empty() {
            let exports = cli.exports.iter().map(|spec| parse_export(spec));
            let exports = exports.collect::<Result<Vec<_>, _>>()?;
            self.set_exports(exports.into_iter().map(|e| (e, Origin::Flag("--export"))));
        } else if let Some(text) = &cli.size {
            let mut export = Config::builtin().exports.remove(0);
            export.size = parse_size(text, "--size")?;
            self.set_exports([(export, Origin::Flag("--size"))]);
        }
        if cli.read_only {
            self.exports.iter_mut().for_each(|e| e.read_only = true);
        }
        if !cli.listen.is_empty() || !cli.unix.is_empty() {
            for addr in &cli.listen {
                check_host_port(addr).map_err(|reason| flag_error("--listen", addr, reason))?;
            }
            let tcp = cli.listen.into_iter().map(ListenAddr::Tcp);
            let tcp = tcp.map(|addr| (addr, Origin::Flag("--listen")));
            let unix = cli.unix.into_iter().map(ListenAddr::Unix);
            let unix = unix.map(|path| (path, Origin::Flag("--unix")));
            self.set_listen(tcp.chain(unix), Origin::Flag("--listen"));
        }
        if let Some(text) = &cli.max_memory {
            self.memory.max_memory = Some(parse_size(text, "--max-memory")?);
        }
        self.memory.mlock |= cli.mlock;
        self.memory.hugepages |= cli.hugepages;
        if let Some(text) = &cli.backing {
            self.memory.backing =
                parse_backing(text).map_err(|reason| flag_error("--backing", text, reason))?;
        }
        if let Some(level) = cli.log_level {
            check_log_level(&level).map_err(|reason| flag_error("--log-level", &level, reason))?;
            self.log_level = Some(level);
        }
        if let Some(text) = &cli.shutdown_grace {
            self.shutdown_grace = parse_duration(text)
                .map_err(|reason| flag_error("--shutdown-grace", text, reason))?;
        }
        if let Some(text) = &cli.handshake_timeout {
            self.handshake_timeout = parse_duration(text)
                .map_err(|reason| flag_error("--handshake-timeout", text, reason))?;
        }
        if let Some(text) = &cli.tcp_keepalive {
            self.tcp_keepalive = parse_duration(text)
                .map_err(|reason| flag_error("--tcp-keepalive", text, reason))?;
        }
        if let Some(text) = &cli.max_connections {
            self.max_connections = match text.trim().parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    let reason = "expected a whole number of at least 1, such as 1024";
                    return Err(flag_error("--max-connections", text, reason.to_owned()));
                }
            };
        }
        if let Some(text) = &cli.max_connections_per_client {
            self.max_connections_per_client = text.trim().parse::<usize>().map_err(|_| {
                let reason = "expected a whole number, such as 16, or 0 for no limit";
                flag_error("--max-connections-per-client", text, reason.to_owned())
            })?;
        }
        if let Some(path) = cli.image {
            let Some(export) = self.exports.iter_mut().find(|e| e.name.is_empty()) else {
                return Err(flag_error(
                    "--image",
                    &path.display().to_string(),
                    "there is no default export (\"\") to give it to; give the exports their \
                     images with image=PATH in --export, or in the config file"
                        .to_owned(),
                ));
            };
            export.image = Some(path);
        }
        if let Some(text) = &cli.save_interval {
            let interval = parse_duration(text)
                .map_err(|reason| flag_error("--save-interval", text, reason))?;
            self.save_interval = Some(interval);
        }
        if let Some(text) = &cli.tls {
            let mode = TlsMode::parse(text).map_err(|reason| flag_error("--tls", text, reason))?;
            self.set_tls_mode(mode, Origin::Flag("--tls"));
        }
        if let Some(dir) = cli.tls_certificates {
            self.set_tls_certificates(dir, Origin::Flag("--tls-certificates"));
        }
        if cli.tls_verify_peer {
            self.set_tls_verify_peer(true, Origin::Flag("--tls-verify-peer"));
        }
        if let Some(file) = cli.tls_psk {
            self.set_tls_psk(file, Origin::Flag("--tls-psk"));
        }
        if !cli.allow.is_empty() {
            self.allow = cli
                .allow
                .iter()
                .map(|text| {
                    access::parse_network(text).map_err(|reason| {
                        flag_error(
                            "--allow",
                            text,
                            format!("{reason}; {}", access::NETWORK_FIX),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(addr) = cli.metrics {
            check_host_port(&addr).map_err(|reason| flag_error("--metrics", &addr, reason))?;
            self.set_metrics(addr, Origin::Flag("--metrics"));
        }
        Ok(())
    }
}

/// The command line alone, over the built-in defaults (no configuration file).
impl TryFrom<Cli> for Config {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Self, ConfigError> {
        Config::builtin().apply_cli(cli)
    }
}

fn flag_error(flag: &'static str, value: &str, reason: String) -> ConfigError {
    ConfigError::Flag {
        flag,
        value: value.to_owned(),
        reason,
    }
}

/// Parses `NAME=SIZE[,ro][,max-memory=SIZE][,image=PATH][,save-interval=DURATION]
/// [,tls=require][,allow=CIDR]...[,allow-uid=UID]...[,allow-gid=GID]...[,allow-identity=NAME]...
/// [,description=TEXT]`. The access options repeat; see [`crate::access`].
pub fn parse_export(spec: &str) -> Result<ExportConfig, ConfigError> {
    let bad = |reason: &str| ConfigError::ExportSpec {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| bad("missing '=' after the name"))?;
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
    let mut image = None;
    let mut save_interval = None;
    let mut tls_required = false;
    let mut access = ExportAccess::default();
    for option in parts {
        match option.split_once('=') {
            None if option == "ro" => read_only = true,
            None if option == "rw" => read_only = false,
            Some(("max-memory", value)) => {
                let what = format!("max-memory of export {name:?}");
                max_memory = Some(parse_size(value, &what)?);
            }
            Some(("image", "")) => return Err(bad("image= needs a file path")),
            Some(("image", path)) => image = Some(path.into()),
            Some(("save-interval", value)) => {
                let interval = parse_duration(value)
                    .map_err(|reason| bad(&format!("save-interval {value:?}: {reason}")))?;
                save_interval = Some(interval);
            }
            Some(("tls", "require")) => tls_required = true,
            Some(("tls", value)) => {
                return Err(bad(&format!(
                    "tls={value:?}: the only per-export TLS setting is tls=require"
                )));
            }
            Some(("allow", value)) => access.networks.push(
                access::parse_network(value)
                    .map_err(|reason| bad(&format!("allow={value}: {reason}")))?,
            ),
            Some(("allow-uid", value)) => access.uids.push(
                access::parse_id(value)
                    .map_err(|reason| bad(&format!("allow-uid={value}: {reason}")))?,
            ),
            Some(("allow-gid", value)) => access.gids.push(
                access::parse_id(value)
                    .map_err(|reason| bad(&format!("allow-gid={value}: {reason}")))?,
            ),
            Some(("allow-identity", value)) => {
                access::check_identity(value)
                    .map_err(|reason| bad(&format!("allow-identity: {reason}")))?;
                access.identities.push(value.to_owned());
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
        image,
        save_interval,
        tls_required,
        access,
    })
}
