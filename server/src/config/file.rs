//! The TOML configuration file (`config/ramnbd.toml` is the commented example).
//!
//! toml parses the file into a spanned document ([`DeTable`]), which is converted here key by
//! key against the key lists below: unknown keys, wrong types and bad values are found by this
//! module, so every message and fix is its own, and the file, line, column and key path (such
//! as `export[1].size`) come from toml's spans. Nothing depends on how toml or serde word their
//! errors; only a syntax error shows toml's message as it is.
//!
//! The result is the built-in defaults with the file's values over them. Each value that
//! [`Config::validate`] checks keeps its place in the file as its [`Origin`].

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::value::{
    self, HOST_PORT_FIX, check_host_port, check_log_level, parse_backing, parse_duration,
};
use super::{Config, ConfigError, ExportConfig, FileError, ListenAddr, Origin};
use crate::access::{self, ExportAccess};

/// Where the service looks when `--config` is not given (used only if it exists).
pub const DEFAULT_PATH: &str = "/etc/ramnbd/ramnbd.toml";

// The keys each table allows, in the order that errors list them.
const SECTIONS: &[&str] = &[
    "listen", "export", "memory", "logging", "metrics", "server", "access", "tls",
];
const ACCESS_KEYS: &[&str] = &["allow"];
const LISTEN_KEYS: &[&str] = &["tcp", "unix"];
const EXPORT_KEYS: &[&str] = &[
    "name",
    "size",
    "read-only",
    "description",
    "max-memory",
    "image",
    "save-interval",
    "tls",
    "allow",
    "allow-uid",
    "allow-gid",
    "allow-identity",
];
const MEMORY_KEYS: &[&str] = &["max-memory", "mlock", "hugepages", "backing"];
const LOGGING_KEYS: &[&str] = &["level"];
const TLS_KEYS: &[&str] = &["mode", "certificates", "verify-peer", "psk"];
const METRICS_KEYS: &[&str] = &["listen"];
const SERVER_KEYS: &[&str] = &[
    "max-connections",
    "max-connections-per-client",
    "handshake-timeout",
    "tcp-keepalive",
    "shutdown-grace",
    "save-interval",
];

const SYNTAX_FIX: &str = "fix the TOML syntax there: strings need double quotes, tables are \
                          written [name] and export tables [[export]]";
const UNKNOWN_FIX: &str = "remove the key or correct its spelling (the keys allowed here are \
                           listed above); config/ramnbd.toml documents every key";
const TYPE_FIX: &str = "give the value the type named above: text in double quotes, \
                        true/false, a number, or a list in [ ]";
/// Only exports have keys that must be given.
const MISSING_FIX: &str =
    "add the key: every [[export]] needs a name (\"\" is the default export) and a size";
const SIZE_FIX: &str = "write a size with binary units in quotes, such as \"512M\", \"4G\" or \
                        \"1T\", or a whole number of bytes";
const DURATION_FIX: &str = "write a duration such as \"10s\", \"500ms\" or \"1m30s\", or a \
                            number of seconds";
const BACKING_FIX: &str = "use \"anonymous\" (memory that dies with the process), \"memfd\" \
                           (memory a service manager can keep across restarts) or \"auto\" \
                           (memfd under a service manager, the default)";
const TLS_MODE_FIX: &str = "use \"off\" (no TLS, the default), \"on\" (offered; exports \
                            with tls = \"require\" need it) or \"require\" (every client)";
const EXPORT_TLS_FIX: &str = "use tls = \"require\" (only TLS clients may see and use the \
                              export), or leave the key out";
const LOG_FIX: &str = "use error, warn, info, debug or trace, or a RUST_LOG-style filter such \
                       as \"info,ramnbd=debug\"";

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
    let doc = DeTable::parse(text).map_err(|err| {
        let span = err.span().unwrap_or(0..0);
        source.error(span, "(syntax)", err.message().trim_end(), SYNTAX_FIX)
    })?;
    let doc = DeValue::Table(doc.into_inner());
    let root = Item {
        source,
        key: String::new(),
        span: 0..0,
        value: &doc,
    };
    let root = root.table(SECTIONS)?;
    let mut config = Config::builtin();
    config.source = Some(path.to_owned());

    if let Some(listen) = root.get("listen") {
        let section = listen.table(LISTEN_KEYS)?;
        let mut listeners = Vec::new();
        for addr in section.array("tcp")? {
            let text = addr.string()?;
            check_host_port(text).map_err(|reason| addr.error(&reason, HOST_PORT_FIX))?;
            listeners.push((ListenAddr::Tcp(text.to_owned()), addr.origin()));
        }
        for path in section.array("unix")? {
            listeners.push((ListenAddr::Unix(path.string()?.into()), path.origin()));
        }
        config.set_listen(listeners, listen.origin());
    }

    if let Some(exports) = root.get("export") {
        if let DeValue::Table(_) = exports.value {
            let message = "a single [export] table: exports are a list of [[export]] tables";
            return Err(exports.error(message, "write [[export]], in double brackets"));
        }
        let exports = exports.array()?;
        let exports = exports.iter().map(export).collect::<Result<Vec<_>, _>>()?;
        // An empty list keeps the default export, as leaving the key out does.
        if !exports.is_empty() {
            config.set_exports(exports);
        }
    }

    if let Some(memory) = root.get("memory") {
        let memory = memory.table(MEMORY_KEYS)?;
        config.memory.max_memory = memory.optional("max-memory", Item::size)?;
        config.memory.mlock = memory.optional("mlock", Item::boolean)?.unwrap_or(false);
        config.memory.hugepages = memory
            .optional("hugepages", Item::boolean)?
            .unwrap_or(false);
        if let Some(backing) = memory.get("backing") {
            let text = backing.string()?;
            config.memory.backing =
                parse_backing(text).map_err(|reason| backing.error(&reason, BACKING_FIX))?;
        }
    }

    if let Some(logging) = root.get("logging")
        && let Some(level) = logging.table(LOGGING_KEYS)?.get("level")
    {
        let text = level.string()?;
        check_log_level(text).map_err(|reason| level.error(&reason, LOG_FIX))?;
        config.log_level = Some(text.to_owned());
    }

    if let Some(metrics) = root.get("metrics")
        && let Some(addr) = metrics.table(METRICS_KEYS)?.get("listen")
    {
        let text = addr.string()?;
        check_host_port(text).map_err(|reason| addr.error(&reason, HOST_PORT_FIX))?;
        config.set_metrics(text.to_owned(), addr.origin());
    }

    if let Some(server) = root.get("server") {
        let server = server.table(SERVER_KEYS)?;
        if let Some(max) = server.optional("max-connections", Item::count)? {
            config.max_connections = max;
        }
        if let Some(max) = server.optional("max-connections-per-client", Item::count_or_zero)? {
            config.max_connections_per_client = max;
        }
        if let Some(timeout) = server.optional("handshake-timeout", Item::duration)? {
            config.handshake_timeout = timeout;
        }
        if let Some(idle) = server.optional("tcp-keepalive", Item::duration)? {
            config.tcp_keepalive = idle;
        }
        if let Some(grace) = server.optional("shutdown-grace", Item::duration)? {
            config.shutdown_grace = grace;
        }
        config.save_interval = server.optional("save-interval", Item::duration)?;
    }
    if let Some(tls) = root.get("tls") {
        let tls = tls.table(TLS_KEYS)?;
        if let Some(mode) = tls.get("mode") {
            let text = mode.string()?;
            let parsed = crate::tls::TlsMode::parse(text)
                .map_err(|reason| mode.error(&reason, TLS_MODE_FIX))?;
            config.set_tls_mode(parsed, mode.origin());
        }
        if let Some(dir) = tls.get("certificates") {
            let path =
                dir.path("give the certificates directory's path, such as \"/etc/ramnbd/tls\"")?;
            config.set_tls_certificates(path, dir.origin());
        }
        if let Some(verify) = tls.get("verify-peer") {
            let value = verify.boolean()?;
            config.set_tls_verify_peer(value, verify.origin());
        }
        if let Some(psk) = tls.get("psk") {
            let path = psk.path("give the PSK file's path")?;
            config.set_tls_psk(path, psk.origin());
        }
    }
    if let Some(access) = root.get("access") {
        let access = access.table(ACCESS_KEYS)?;
        if let Some(allow) = access.get("allow") {
            config.allow = allow.list(Item::network)?;
        }
    }
    config.validate()?;
    Ok(config)
}

/// One `[[export]]` table, with the place of its name (what validation checks).
fn export(item: &Item<'_>) -> Result<(ExportConfig, Origin), ConfigError> {
    let table = item.table(EXPORT_KEYS)?;
    let name = table.require("name")?;
    let export = ExportConfig {
        name: name.string()?.to_owned(),
        size: table.require("size")?.size()?,
        read_only: table.optional("read-only", Item::boolean)?.unwrap_or(false),
        description: table
            .optional("description", Item::string)?
            .unwrap_or("")
            .to_owned(),
        max_memory: table.optional("max-memory", Item::size)?,
        image: table.optional("image", Item::image_path)?,
        save_interval: table.optional("save-interval", Item::duration)?,
        tls_required: match table.get("tls") {
            None => false,
            Some(tls) => match tls.string()? {
                "require" => true,
                other => {
                    let message =
                        format!("tls {other:?}: the only per-export setting is \"require\"");
                    return Err(tls.error(&message, EXPORT_TLS_FIX));
                }
            },
        },
        access: ExportAccess {
            networks: table.list("allow", Item::network)?,
            uids: table.list("allow-uid", Item::id)?,
            gids: table.list("allow-gid", Item::id)?,
            identities: table.list("allow-identity", Item::identity)?,
        },
    };
    Ok((export, name.origin()))
}

/// The file's name and text, for error messages.
#[derive(Clone, Copy)]
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    /// Where `span` starts, as an error still without its message and fix.
    fn place(&self, span: Range<usize>, key: &str) -> FileError {
        let before = self.text.get(..span.start).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        FileError {
            path: self.path.to_owned(),
            line,
            column,
            key: key.to_owned(),
            message: String::new(),
            excerpt: self.text.lines().nth(line - 1).unwrap_or("").to_owned(),
            fix: String::new(),
        }
    }

    fn error(&self, span: Range<usize>, key: &str, message: &str, fix: &str) -> ConfigError {
        ConfigError::File(Box::new(FileError {
            message: message.to_owned(),
            fix: fix.to_owned(),
            ..self.place(span, key)
        }))
    }
}

/// `name` under the key path `parent`.
fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// A table of the file whose keys are all known: [`Item::table`].
struct Table<'a> {
    at: Item<'a>,
    entries: &'a DeTable<'a>,
}

impl<'a> Table<'a> {
    fn get(&self, name: &str) -> Option<Item<'a>> {
        let value = self.entries.get(name)?;
        Some(self.at.child(join(&self.at.key, name), value))
    }

    /// A key that must be given; a missing one is reported at the table's header.
    fn require(&self, name: &str) -> Result<Item<'a>, ConfigError> {
        self.get(name).ok_or_else(|| {
            let message = format!("missing field `{name}`");
            let key = join(&self.at.key, name);
            self.at
                .source
                .error(self.at.span.clone(), &key, &message, MISSING_FIX)
        })
    }

    fn optional<T>(
        &self,
        name: &str,
        convert: impl FnOnce(&Item<'a>) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        self.get(name).map(|item| convert(&item)).transpose()
    }

    /// A key that takes one value or a list of them; none when it is not given.
    fn list<T>(
        &self,
        name: &str,
        convert: impl Fn(&Item<'a>) -> Result<T, ConfigError>,
    ) -> Result<Vec<T>, ConfigError> {
        Ok(self
            .optional(name, |item| item.list(convert))?
            .unwrap_or_default())
    }

    /// The items of the array `name`; none when it is not given.
    fn array(&self, name: &str) -> Result<Vec<Item<'a>>, ConfigError> {
        Ok(self.optional(name, Item::array)?.unwrap_or_default())
    }
}

/// A value of the file, with its key path (`export[1].size`) and span.
#[derive(Clone)]
struct Item<'a> {
    source: Source<'a>,
    key: String,
    span: Range<usize>,
    value: &'a DeValue<'a>,
}

impl<'a> Item<'a> {
    fn child(&self, key: String, value: &'a Spanned<DeValue<'a>>) -> Item<'a> {
        Item {
            source: self.source,
            key,
            span: value.span(),
            value: value.get_ref(),
        }
    }

    fn error(&self, message: &str, fix: &str) -> ConfigError {
        self.source
            .error(self.span.clone(), &self.key, message, fix)
    }

    /// Where this value is, for errors found when the whole configuration is validated.
    fn origin(&self) -> Origin {
        Origin::File(Box::new(self.source.place(self.span.clone(), &self.key)))
    }

    /// Refuses a value of the wrong type, in the words serde uses, which operators may know.
    fn wrong_type(&self, expected: &str) -> ConfigError {
        let found = match self.value {
            DeValue::String(s) => format!("string {s:?}"),
            DeValue::Integer(i) => format!("integer `{i}`"),
            DeValue::Float(f) => format!("floating point `{f}`"),
            DeValue::Boolean(b) => format!("boolean `{b}`"),
            DeValue::Datetime(d) => format!("datetime `{d}`"),
            DeValue::Array(_) => "array".to_owned(),
            DeValue::Table(_) => "table".to_owned(),
        };
        self.error(
            &format!("invalid type: {found}, expected {expected}"),
            TYPE_FIX,
        )
    }

    fn string(&self) -> Result<&'a str, ConfigError> {
        match self.value {
            DeValue::String(s) => Ok(s),
            _ => Err(self.wrong_type("a string")),
        }
    }

    fn boolean(&self) -> Result<bool, ConfigError> {
        match self.value {
            DeValue::Boolean(b) => Ok(*b),
            _ => Err(self.wrong_type("a boolean")),
        }
    }

    /// An integer's value, `None` for other types. One outside i64, which TOML does not allow
    /// but toml parses, is refused.
    fn integer(&self, fix: &str) -> Result<Option<i64>, ConfigError> {
        let DeValue::Integer(i) = self.value else {
            return Ok(None);
        };
        let value = i64::from_str_radix(i.as_str(), i.radix());
        value
            .map(Some)
            .map_err(|_| self.error(&format!("{i} is out of range"), fix))
    }

    fn array(&self) -> Result<Vec<Item<'a>>, ConfigError> {
        let DeValue::Array(items) = self.value else {
            return Err(self.wrong_type("an array"));
        };
        let item = |(i, value)| self.child(format!("{}[{i}]", self.key), value);
        Ok(items.iter().enumerate().map(item).collect())
    }

    /// This table, refused at the first key in the file (not in toml's order) that `allowed`
    /// does not list.
    fn table(&self, allowed: &[&str]) -> Result<Table<'a>, ConfigError> {
        let DeValue::Table(entries) = self.value else {
            return Err(self.wrong_type("a table"));
        };
        let unknown = entries
            .keys()
            .filter(|k| !allowed.contains(&k.get_ref().as_ref()));
        if let Some(first) = unknown.min_by_key(|k| k.span().start) {
            let names: Vec<String> = allowed.iter().map(|k| format!("`{k}`")).collect();
            let expected = match names.as_slice() {
                [one] => format!("expected {one}"),
                _ => format!("expected one of {}", names.join(", ")),
            };
            let message = format!("unknown field `{}`, {expected}", first.get_ref());
            let key = join(&self.key, first.get_ref());
            return Err(self.source.error(first.span(), &key, &message, UNKNOWN_FIX));
        }
        let at = self.clone();
        Ok(Table { at, entries })
    }

    /// A size: a string with binary units ("512M", "4G") or a whole number of bytes.
    fn size(&self) -> Result<u64, ConfigError> {
        let bad = |shown: String, reason: &str| {
            self.error(&format!("bad size {shown}: {reason}"), SIZE_FIX)
        };
        let text = match (self.value, self.integer(SIZE_FIX)?) {
            (DeValue::String(s), _) => s.to_string(),
            (_, Some(n)) if n < 0 => return Err(bad(n.to_string(), "negative")),
            (_, Some(n)) => n.to_string(),
            (DeValue::Float(f), _) => return Err(bad(f.to_string(), "not a whole number")),
            _ => return Err(self.wrong_type("a size such as \"4G\" or a number of bytes")),
        };
        value::size(&text).map_err(|reason| bad(format!("{text:?}"), &reason))
    }

    /// A duration: "10s", "500ms", "1m30s", or a number of seconds.
    fn duration(&self) -> Result<Duration, ConfigError> {
        let text = match (self.value, self.integer(DURATION_FIX)?) {
            (DeValue::String(s), _) => s.to_string(),
            (_, Some(n)) => n.to_string(),
            (DeValue::Float(f), _) => f.to_string(),
            _ => return Err(self.wrong_type("a duration such as \"10s\"")),
        };
        parse_duration(&text)
            .map_err(|reason| self.error(&format!("bad duration {text:?}: {reason}"), DURATION_FIX))
    }

    /// An image file's path: a non-empty string.
    fn image_path(&self) -> Result<std::path::PathBuf, ConfigError> {
        self.path("give the image file's path, such as \"/var/lib/ramnbd/disk.img\"")
    }

    /// A path: a non-empty string; `fix` says what to give when it is empty.
    fn path(&self, fix: &str) -> Result<std::path::PathBuf, ConfigError> {
        match self.string()? {
            "" => Err(self.error("is empty", fix)),
            path => Ok(path.into()),
        }
    }

    /// One value, or each of a list of them.
    fn list<T>(
        &self,
        convert: impl Fn(&Item<'a>) -> Result<T, ConfigError>,
    ) -> Result<Vec<T>, ConfigError> {
        match self.value {
            DeValue::Array(_) => self.array()?.iter().map(convert).collect(),
            _ => Ok(vec![convert(self)?]),
        }
    }

    /// A client network: CIDR text or one address.
    fn network(&self) -> Result<IpNet, ConfigError> {
        let text = self.string()?;
        access::parse_network(text).map_err(|reason| {
            self.error(
                &format!("bad network {text:?}: {reason}"),
                access::NETWORK_FIX,
            )
        })
    }

    /// A numeric uid or gid.
    fn id(&self) -> Result<u32, ConfigError> {
        let fix = "give the numeric id, such as 0 or 1000 (`id -u NAME` prints a user's, \
                   `getent group NAME` a group's)";
        if let DeValue::String(text) = self.value {
            let message = format!("{text:?} is not a numeric uid or gid");
            return access::parse_id(text).map_err(|_| self.error(&message, fix));
        }
        match self.integer(fix)? {
            None => Err(self.wrong_type("a numeric uid or gid")),
            Some(n) => {
                u32::try_from(n).map_err(|_| self.error(&format!("{n} is not a uid or gid"), fix))
            }
        }
    }

    /// A TLS identity: a client certificate's subject CN.
    fn identity(&self) -> Result<String, ConfigError> {
        let text = self.string()?;
        access::check_identity(text).map_err(|reason| {
            self.error(
                &reason,
                "give the subject CN of the client certificate to admit",
            )
        })?;
        Ok(text.to_owned())
    }

    /// A whole number of at least 1.
    fn count(&self) -> Result<usize, ConfigError> {
        let fix = "set a positive number of connections, such as 1024";
        match self.integer(fix)? {
            None => Err(self.wrong_type("a whole number")),
            Some(n) if n < 1 => Err(self.error("must be at least 1", fix)),
            Some(n) => {
                usize::try_from(n).map_err(|_| self.error(&format!("{n} is out of range"), fix))
            }
        }
    }

    /// A whole number of at least 0 (0: no limit).
    fn count_or_zero(&self) -> Result<usize, ConfigError> {
        let fix = "set a number of connections, such as 16, or 0 for no limit";
        match self.integer(fix)? {
            None => Err(self.wrong_type("a whole number")),
            Some(n) if n < 0 => Err(self.error("must not be negative", fix)),
            Some(n) => {
                usize::try_from(n).map_err(|_| self.error(&format!("{n} is out of range"), fix))
            }
        }
    }
}

#[cfg(test)]
mod tests;
