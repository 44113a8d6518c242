//! Typed values that the file and the command line share: sizes, durations, `HOST:PORT`
//! addresses and log filters. Each parser says in its own words why a text is not a value of
//! its type; the caller adds where the text came from and, for the file, how to fix it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::{BackingChoice, ConfigError};

/// The longest shutdown grace period: far past any service manager's stop timeout.
const MAX_GRACE: Duration = Duration::from_secs(24 * 3600);

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

/// Parses a size with binary units ("4G" = 4 GiB) for `what` (a flag, or an export given by
/// one). Zero is refused: an export needs bytes.
pub fn parse_size(text: &str, what: &str) -> Result<u64, ConfigError> {
    size(text).map_err(|reason| ConfigError::Size {
        what: what.to_owned(),
        value: text.to_owned(),
        reason,
    })
}

/// [`parse_size`], with only the reason for refusing `text`.
pub(super) fn size(text: &str) -> Result<u64, String> {
    let size = parse_size::Config::new()
        .with_binary()
        .parse_size(text.trim())
        .map_err(|e| e.to_string())?;
    if size == 0 {
        return Err("size must be greater than zero".to_owned());
    }
    if usize::try_from(size).is_err() || size > i64::MAX as u64 {
        return Err("larger than this machine can address".to_owned());
    }
    Ok(size)
}

/// Parses a duration: humantime's "10s", "500ms", "1m30s" or "1.5s", or a plain number of
/// seconds ("1.5"), at most a day.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    use humantime::DurationError;
    let text = text.trim();
    let duration = match text.parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds).map_err(|_| out_of_range())?,
        Err(_) => humantime::parse_duration(text).map_err(|err| match err {
            DurationError::UnknownUnit { unit, .. } if !unit.is_empty() => {
                format!("unknown unit {unit:?}; use ms, s, m or h")
            }
            DurationError::NumberOverflow => out_of_range(),
            _ => "expected a number with a unit, such as 10s, 500ms or 1m30s".to_owned(),
        })?,
    };
    if duration > MAX_GRACE {
        return Err(out_of_range());
    }
    Ok(duration)
}

fn out_of_range() -> String {
    "out of range (at most a day)".to_owned()
}

/// Parses the `backing` setting.
pub fn parse_backing(text: &str) -> Result<BackingChoice, String> {
    match text {
        "anonymous" => Ok(BackingChoice::Anonymous),
        "memfd" => Ok(BackingChoice::Memfd),
        "auto" => Ok(BackingChoice::Auto),
        _ => Err(format!(
            "unknown backing {text:?}; expected \"anonymous\", \"memfd\" or \"auto\""
        )),
    }
}

/// Checks a log level or `RUST_LOG`-style filter.
pub fn check_log_level(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|err| format!("not a log level or filter: {err}"))
}

/// How to write `HOST:PORT`, for the file's errors.
pub(super) const HOST_PORT_FIX: &str = "write HOST:PORT in quotes, such as \"127.0.0.1:10809\", \
                                        \"[::1]:10809\" or \"0.0.0.0:10809\"";

/// Checks the shape of `HOST:PORT`. The host may be a name: it is resolved only when binding.
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
