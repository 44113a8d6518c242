//! The TOML configuration file (`config/ramnbd.toml` is the commented example).
//!
//! The file is deserialized with serde (`deny_unknown_fields` everywhere), keeping the source
//! span of every value that is checked after parsing, so that every error names the file, the
//! line, the key (as a path such as `export[1].size`) and how to fix it. Errors from serde
//! itself carry a span too; the key path is then found by walking a spanned parse of the same
//! text ([`toml::de::DeTable`]).
//!
//! The result is a [`Config`](super::Config) with the built-in defaults for everything the file
//! leaves out; command-line flags are applied on top of it by the caller.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{
    Config, ConfigError, ExportConfig, FileError, ListenAddr, MemoryConfig, parse_duration,
    parse_size,
};

/// Where the service looks when `--config` is not given (used only if it exists).
pub const DEFAULT_PATH: &str = "/etc/ramnbd/ramnbd.toml";

/// Separates an error message from its fix inside serde custom errors.
const FIX: &str = "\nfix: ";

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    listen: Option<ListenSection>,
    #[serde(rename = "export")]
    exports: Vec<ExportSection>,
    memory: MemorySection,
    logging: LoggingSection,
    metrics: MetricsSection,
    server: ServerSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ListenSection {
    tcp: Vec<Spanned<String>>,
    unix: Vec<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ExportSection {
    name: Spanned<String>,
    size: Size,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    description: String,
    #[serde(default)]
    max_memory: Option<Size>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
struct MemorySection {
    max_memory: Option<Size>,
    mlock: bool,
    hugepages: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LoggingSection {
    level: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct MetricsSection {
    listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
struct ServerSection {
    max_connections: Option<Spanned<usize>>,
    shutdown_grace: Option<GraceTime>,
}

/// A size: a whole number of bytes, or a string with binary units ("512M", "4G").
#[derive(Debug, Clone, Copy)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        const HINT: &str = "write a size with binary units in quotes, such as \"512M\", \"4G\" \
                            or \"1T\", or a whole number of bytes";
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size such as \"4G\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("bad size {v}: negative{FIX}{HINT}"))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Size, E> {
                Err(E::custom(format!(
                    "bad size {v}: not a whole number{FIX}{HINT}"
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                match parse_size(v, "size") {
                    Ok(size) => Ok(Size(size)),
                    Err(ConfigError::Size { reason, .. }) => {
                        Err(E::custom(format!("bad size {v:?}: {reason}{FIX}{HINT}")))
                    }
                    Err(other) => Err(E::custom(other)),
                }
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration: "10s", "500ms", "2m", or a number of seconds.
#[derive(Debug, Clone, Copy)]
struct GraceTime(Duration);

impl<'de> Deserialize<'de> for GraceTime {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        const HINT: &str = "write a duration such as \"10s\", \"500ms\" or \"2m\", or a number \
                            of seconds";
        impl Visitor<'_> for DurationVisitor {
            type Value = GraceTime;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration such as \"10s\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<GraceTime, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<GraceTime, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<GraceTime, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GraceTime, E> {
                parse_duration(v)
                    .map(GraceTime)
                    .map_err(|reason| E::custom(format!("bad duration {v:?}: {reason}{FIX}{HINT}")))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// Reads and validates `path`. The result has the built-in defaults for everything the file
/// does not set.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and validates `text`, the contents of `path` (used in messages only).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let source = Source { path, text };
    // A spanned parse first: it reports syntax errors, and maps later errors to key paths.
    let doc = DeTable::parse(text).map_err(|err| source.toml_error(None, &err))?;
    let file: FileConfig =
        toml::from_str(text).map_err(|err| source.toml_error(Some(doc.get_ref()), &err))?;
    source.convert(file)
}

/// The file's name and text, for error messages.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    /// 1-based line and column of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        (line, column)
    }

    fn error(&self, span: Range<usize>, key: &str, message: &str, fix: &str) -> ConfigError {
        let (line, column) = self.position(span.start);
        let excerpt = self.text.lines().nth(line - 1).unwrap_or("").to_owned();
        ConfigError::File(Box::new(FileError {
            path: self.path.to_owned(),
            line,
            column,
            key: key.to_owned(),
            message: message.to_owned(),
            excerpt,
            fix: fix.to_owned(),
        }))
    }

    /// Turns a toml/serde error into one that names the line and the key.
    fn toml_error(&self, doc: Option<&DeTable<'_>>, err: &toml::de::Error) -> ConfigError {
        let raw = err.message().trim_end();
        let (message, fix) = match raw.split_once(FIX) {
            Some((message, fix)) => (message.to_owned(), fix.to_owned()),
            None => (raw.to_owned(), fix_for(raw, doc.is_none())),
        };
        let span = err.span().unwrap_or(0..0);
        let mut key = doc
            .and_then(|doc| key_at(doc, span.start))
            .unwrap_or_default();
        // An error about a whole `[[name]]` table points at its header: number it.
        let spanned = self.text.get(span.clone()).unwrap_or("");
        if let Some(name) = spanned
            .strip_prefix("[[")
            .and_then(|s| s.strip_suffix("]]"))
        {
            let index = self.text[..span.start].matches(spanned).count();
            key = format!("{}[{index}]", name.trim());
        }
        // A missing key has no span of its own: name it after its table.
        if let Some(field) = between(&message, "missing field `", "`") {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(field);
        }
        if key.is_empty() {
            key = "(syntax)".to_owned();
        }
        self.error(span, &key, &message, &fix)
    }

    fn convert(&self, file: FileConfig) -> Result<Config, ConfigError> {
        let mut config = Config::builtin();

        if !file.exports.is_empty() {
            config.exports.clear();
        }
        for (i, export) in file.exports.iter().enumerate() {
            let name = export.name.get_ref();
            let key = format!("export[{i}].name");
            if name.len() > crate::proto::consts::MAX_STRING {
                return Err(self.error(
                    export.name.span(),
                    &key,
                    "export names are at most 4096 bytes",
                    "use a shorter name",
                ));
            }
            if let Some(first) = file.exports[..i].iter().find(|e| e.name.get_ref() == name) {
                let (first_line, _) = self.position(first.name.span().start);
                return Err(self.error(
                    export.name.span(),
                    &key,
                    &format!("export name {name:?} is used twice (first at line {first_line})"),
                    "give every [[export]] its own name (\"\" is the default export)",
                ));
            }
            config.exports.push(ExportConfig {
                name: name.clone(),
                size: export.size.0,
                read_only: export.read_only,
                description: export.description.clone(),
                max_memory: export.max_memory.map(|s| s.0),
            });
        }

        if let Some(listen) = &file.listen {
            config.listen.clear();
            for (i, addr) in listen.tcp.iter().enumerate() {
                let key = format!("listen.tcp[{i}]");
                check_host_port(addr.get_ref())
                    .map_err(|reason| self.error(addr.span(), &key, &reason, HOST_PORT_FIX))?;
                if let Some(first) = listen.tcp[..i]
                    .iter()
                    .find(|a| tcp_collide(a.get_ref(), addr.get_ref()))
                {
                    let (first_line, _) = self.position(first.span().start);
                    return Err(self.error(
                        addr.span(),
                        &key,
                        &format!(
                            "{:?} collides with {:?} (line {first_line}): both cannot be bound",
                            addr.get_ref(),
                            first.get_ref()
                        ),
                        "listen on each address and port once; 0.0.0.0 and [::] already \
                         cover every address of their port",
                    ));
                }
                config.listen.push(ListenAddr::Tcp(addr.get_ref().clone()));
            }
            for (i, path) in listen.unix.iter().enumerate() {
                let key = format!("listen.unix[{i}]");
                if path.get_ref().as_os_str().is_empty() {
                    return Err(self.error(
                        path.span(),
                        &key,
                        "empty socket path",
                        "give the socket's path, such as \"/run/ramnbd/ramnbd.sock\"",
                    ));
                }
                if let Some(first) = listen.unix[..i]
                    .iter()
                    .find(|p| p.get_ref() == path.get_ref())
                {
                    let (first_line, _) = self.position(first.span().start);
                    return Err(self.error(
                        path.span(),
                        &key,
                        &format!(
                            "socket {} is listed twice (first at line {first_line})",
                            path.get_ref().display()
                        ),
                        "list each Unix socket path once",
                    ));
                }
                config.listen.push(ListenAddr::Unix(path.get_ref().clone()));
            }
            if config.listen.is_empty() {
                return Err(self.error(
                    self.section_span("listen"),
                    "listen",
                    "[listen] has no tcp or unix entries, so there is nowhere to serve",
                    "add tcp = [\"127.0.0.1:10809\"] or unix = [\"/run/ramnbd/ramnbd.sock\"], \
                     or remove [listen] for the default 127.0.0.1:10809",
                ));
            }
        }

        config.memory = MemoryConfig {
            max_memory: file.memory.max_memory.map(|s| s.0),
            mlock: file.memory.mlock,
            hugepages: file.memory.hugepages,
        };

        if let Some(level) = &file.logging.level {
            super::check_log_level(level.get_ref()).map_err(|reason| {
                self.error(
                    level.span(),
                    "logging.level",
                    &reason,
                    "use error, warn, info, debug or trace, or a RUST_LOG-style filter such \
                     as \"info,ramnbd=debug\"",
                )
            })?;
            config.log_level = Some(level.get_ref().clone());
        }

        if let Some(metrics) = &file.metrics.listen {
            check_host_port(metrics.get_ref()).map_err(|reason| {
                self.error(metrics.span(), "metrics.listen", &reason, HOST_PORT_FIX)
            })?;
            let nbd = config.listen.iter().find_map(|l| match l {
                ListenAddr::Tcp(addr) if tcp_collide(addr, metrics.get_ref()) => Some(addr),
                _ => None,
            });
            if let Some(nbd) = nbd {
                return Err(self.error(
                    metrics.span(),
                    "metrics.listen",
                    &format!(
                        "the metrics address {:?} collides with the NBD listener {nbd:?}",
                        metrics.get_ref()
                    ),
                    "give metrics a port of its own, such as \"127.0.0.1:9109\"",
                ));
            }
            config.metrics = Some(metrics.get_ref().clone());
        }

        if let Some(max) = &file.server.max_connections {
            if *max.get_ref() == 0 {
                return Err(self.error(
                    max.span(),
                    "server.max-connections",
                    "must be at least 1",
                    "set a positive number of connections, such as 1024",
                ));
            }
            config.max_connections = *max.get_ref();
        }
        if let Some(grace) = file.server.shutdown_grace {
            config.shutdown_grace = grace.0;
        }
        config.source = Some(self.path.to_owned());
        Ok(config)
    }

    /// The span of a `[name]` table header, for errors about a whole section.
    fn section_span(&self, name: &str) -> Range<usize> {
        let header = format!("[{name}]");
        match self.text.find(&header) {
            Some(at) => at..at + header.len(),
            None => 0..0,
        }
    }
}

const HOST_PORT_FIX: &str = "write HOST:PORT in quotes, such as \"127.0.0.1:10809\", \
                             \"[::1]:10809\" or \"0.0.0.0:10809\"";

/// Checks the shape of `HOST:PORT` (the host is resolved only when binding).
pub(super) fn check_host_port(text: &str) -> Result<(), String> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} has no port"));
    };
    if host.is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "{text:?}: port {port:?} is not a number from 0 to 65535"
        ));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!("{text:?}: an IPv6 host must be in brackets"));
    }
    Ok(())
}

/// Whether two TCP listeners would fight over one port: the same port (not 0) and the same
/// address, or a wildcard that covers the other (`[::]` is dual-stack on Linux by default).
/// Host names are compared as text; they are resolved only when binding.
pub(super) fn tcp_collide(a: &str, b: &str) -> bool {
    if a == b && !a.ends_with(":0") {
        return true;
    }
    let (Ok(a), Ok(b)) = (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) else {
        return false;
    };
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let covers =
        |wild: IpAddr, other: IpAddr| wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4());
    a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip())
}

/// A fix for toml's and serde's own messages.
fn fix_for(message: &str, syntax: bool) -> String {
    if syntax {
        return "fix the TOML syntax there: strings need double quotes, tables are written \
                [name] and export tables [[export]]"
            .to_owned();
    }
    if message.starts_with("unknown field") {
        return "remove the key or correct its spelling (the keys allowed here are listed \
                above); config/ramnbd.toml documents every key"
            .to_owned();
    }
    if message.starts_with("missing field") {
        return "add the key: every [[export]] needs a name (\"\" is the default export) and \
                a size"
            .to_owned();
    }
    if message.starts_with("invalid type") {
        return "give the value the type named above: text in double quotes, true/false, a \
                number, or a list in [ ]"
            .to_owned();
    }
    "see config/ramnbd.toml for the keys and values allowed".to_owned()
}

fn between<'t>(text: &'t str, start: &str, end: &str) -> Option<&'t str> {
    let rest = &text[text.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// The dotted path (`export[1].size`) of the key or value that contains byte `offset`.
fn key_at(doc: &DeTable<'_>, offset: usize) -> Option<String> {
    fn in_table(table: &DeTable<'_>, offset: usize, path: &mut String) -> bool {
        for (key, value) in table {
            let len = path.len();
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(key.get_ref());
            if in_value(value, offset, path) || key.span().contains(&offset) {
                return true;
            }
            path.truncate(len);
        }
        false
    }
    fn in_value(value: &Spanned<DeValue<'_>>, offset: usize, path: &mut String) -> bool {
        match value.get_ref() {
            DeValue::Table(table) => in_table(table, offset, path),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    let _ = write!(path, "[{i}]");
                    if in_value(item, offset, path) {
                        return true;
                    }
                    path.truncate(len);
                }
                value.span().contains(&offset)
            }
            _ => value.span().contains(&offset),
        }
    }
    let mut path = String::new();
    in_table(doc, offset, &mut path).then_some(path)
}

#[cfg(test)]
mod tests;
