//! Log entries for the systemd journal. Under systemd, stderr is a stream to the journal
//! (`JOURNAL_STREAM` names its device and inode), where text lines all land at one priority
//! with the fields flattened into the text. When stderr is that stream, `ramnbd` sends each
//! event to the journal's native socket instead: the level as `PRIORITY`, the text as
//! `MESSAGE`, and every field of the event and of the spans it is in as a field of its own
//! (`EXPORT`, `PEER`, `COMMAND`, `CAUSE`, ...), so that `journalctl -u ramnbd -p warning`
//! and `journalctl EXPORT=scratch` select what they should.
//!
//! `MESSAGE` is the terminal line without its time and level (`conn{peer=… export="a"}:
//! text key=value`), so `journalctl -o cat` reads as before. Values are written as the fields
//! format them: client-supplied text arrives already escaped by [`crate::logsafe::Untrusted`]
//! (one line, quoted); in a journal field the quotes around such a value are dropped
//! (`EXPORT=scratch`), its escapes kept. Entries are length-framed, so no value can forge a
//! field or an entry.

use std::fmt::{self, Write as _};
use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The journal's socket for native entries (systemd.journal-fields(7), "native protocol").
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// Whether stderr is the journal: `JOURNAL_STREAM` ("DEV:INODE") names stderr's file. A
/// variable inherited by a child whose stderr goes elsewhere (a terminal, a pipe) does not
/// count: that output stays text.
pub fn stderr_is_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some_and(|value| names_file(&value, std::io::stderr()))
}

/// Whether `value` ("DEV:INODE", as in `JOURNAL_STREAM`) names the file open as `fd`.
fn names_file(value: &std::ffi::OsStr, fd: impl std::os::fd::AsFd) -> bool {
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse(), ino.parse()) else {
        return false;
    };
    match rustix::fs::fstat(fd) {
        Ok(stat) => stat.st_dev == dev && stat.st_ino == ino,
        Err(_) => false,
    }
}

/// Set when the server starts to stop: see [`stream_from_now_on`].
static STREAM_ONLY: AtomicBool = AtomicBool::new(false);

/// From now on, entries go to stderr (the journal's stream) as `<PRIORITY>MESSAGE` lines
/// instead of native entries. journald finds a native entry's unit from the sender's cgroup
/// when it reads the datagram; an entry sent just before the process exits (the stop and
/// hand-over lines) may be read after it is gone, and then has no `_SYSTEMD_UNIT` and is
/// missing from `journalctl -u ramnbd`. A stream is attributed when it is opened, so its lines
/// keep their unit. They keep their priority (`SyslogLevelPrefix=`, on by default) and lose
/// only their own fields. Called on the first stop signal.
pub fn stream_from_now_on() {
    STREAM_ONLY.store(true, Ordering::Relaxed);
}

/// Writes each buffer as one datagram to the journal's socket: one entry per `write`.
#[derive(Debug)]
pub struct JournalSocket(UnixDatagram);

impl JournalSocket {
    pub fn connect() -> io::Result<JournalSocket> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(SOCKET)?;
        Ok(JournalSocket(socket))
    }
}

impl io::Write for JournalSocket {
    fn write(&mut self, entry: &[u8]) -> io::Result<usize> {
        // A native entry starts with its PRIORITY field; a stream line with `<`.
        if entry.first() == Some(&b'<') {
            io::Write::write_all(&mut io::stderr(), entry)?;
        } else {
            self.0.send(entry)?;
        }
        Ok(entry.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The layer that turns events into journal entries, written through `writer` (one
/// `write_all` per entry: a [`JournalSocket`], or a non-blocking queue in front of one).
#[derive(Debug)]
pub struct JournalLayer<W> {
    writer: W,
}

impl<W> JournalLayer<W> {
    pub fn new(writer: W) -> Self {
        JournalLayer { writer }
    }
}

/// A span's fields as recorded, kept in the span's extensions.
#[derive(Debug, Default)]
struct SpanFields(Vec<(&'static str, String)>);

impl<S, W> Layer<S> for JournalLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        span.extensions_mut().insert(SpanFields(fields.fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        values.record(&mut fields);
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(known)) = extensions.get_mut::<SpanFields>() {
            for (name, value) in fields.fields {
                match known.iter_mut().find(|(n, _)| *n == name) {
                    Some(slot) => slot.1 = value,
                    None => known.push((name, value)),
                }
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut text = String::new();
        // Span fields, outermost first; an inner span's field of the same name wins.
        let mut fields: Vec<(&'static str, String)> = Vec::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(SpanFields(span_fields)) = extensions.get::<SpanFields>() else {
                    continue;
                };
                let shown: Vec<String> = span_fields
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect();
                let _ = write!(text, "{}{{{}}}: ", span.name(), shown.join(" "));
                for (name, value) in span_fields {
                    fields.retain(|(n, _)| n != name);
                    fields.push((name, value.clone()));
                }
            }
        }
        let mut own = Fields::default();
        event.record(&mut own);
        text.push_str(&own.message);
        for (name, value) in &own.fields {
            let _ = write!(text, " {name}={value}");
        }
        for (name, value) in own.fields {
            fields.retain(|(n, _)| *n != name);
            fields.push((name, value));
        }

        if STREAM_ONLY.load(Ordering::Relaxed) {
            // One line per entry: a newline (possible only in server-made text; client text is
            // escaped) must not start a line of its own.
            let line = format!(
                "<{}>{}\n",
                priority(meta.level()),
                text.replace('\n', "\\n")
            );
            let _ = io::Write::write_all(&mut self.writer.make_writer(), line.as_bytes());
            return;
        }
        let mut entry = Vec::with_capacity(256 + text.len());
        put(&mut entry, "PRIORITY", priority(meta.level()));
        put(&mut entry, "SYSLOG_IDENTIFIER", "ramnbd");
        put(&mut entry, "MESSAGE", &text);
        put(&mut entry, "TARGET", meta.target());
        if let Some(file) = meta.file() {
            put(&mut entry, "CODE_FILE", file);
        }
        if let Some(line) = meta.line() {
            put(&mut entry, "CODE_LINE", &line.to_string());
        }
        for (name, value) in &fields {
            if let Some(key) = field_name(name) {
                put(&mut entry, &key, unquoted(value));
            }
        }
        let _ = io::Write::write_all(&mut self.writer.make_writer(), &entry);
    }
}

/// syslog priorities: error 3, warning 4, info 6, debug and trace 7.
fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "6",
        _ => "7",
    }
}

/// A journal field name from a tracing field name: upper case, `[A-Z0-9_]`, not starting
/// with `_` or a digit (those are the journal's own), and not one of the fields every entry
/// has (those get `F_` in front).
fn field_name(name: &str) -> Option<String> {
    let key: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' => c.to_ascii_uppercase(),
            'A'..='Z' | '0'..='9' => c,
            _ => '_',
        })
        .collect();
    let key = key.trim_start_matches('_');
    if key.is_empty() {
        return None;
    }
    let reserved = matches!(
        key,
        "PRIORITY" | "SYSLOG_IDENTIFIER" | "MESSAGE" | "TARGET" | "CODE_FILE" | "CODE_LINE"
            // The journal's ERRNO is a number; ours is text ("no space left (ENOSPC)").
            | "ERRNO"
    ) || key.starts_with(|c: char| c.is_ascii_digit());
    Some(if reserved {
        format!("F_{key}")
    } else {
        key.to_owned()
    })
}

/// `"text"` as `text`: a value quoted whole (a string, or escaped client text) loses the
/// quotes in its own journal field; its escapes stay.
fn unquoted(value: &str) -> &str {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) if !inner.is_empty() || value.len() == 2 => inner,
        _ => value,
    }
}

/// One field in the native protocol: `NAME=value\n`, or, for a value with a newline,
/// `NAME\n` + its length (64-bit little-endian) + the value + `\n`.
fn put(entry: &mut Vec<u8>, name: &str, value: &str) {
    entry.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        entry.push(b'\n');
        entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        entry.push(b'=');
    }
    entry.extend_from_slice(value.as_bytes());
    entry.push(b'\n');
}

/// Field values as the terminal format shows them: text in quotes (`Debug`), `%` fields as
/// `Display`, `?` fields as `Debug`.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.fields.push((field.name(), format!("{value:?}")));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.fields.push((field.name(), format!("{value:?}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// Collects the entries written, for the tests.
    #[derive(Clone, Default)]
    struct Entries(Arc<Mutex<Vec<Vec<u8>>>>);

    impl io::Write for Entries {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Entries {
        type Writer = Entries;
        fn make_writer(&'w self) -> Entries {
            self.clone()
        }
    }

    /// Parses a native-protocol entry back into (name, value) pairs.
    fn parse(mut entry: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut fields = Vec::new();
        while !entry.is_empty() {
            let end = entry.iter().position(|&b| b == b'\n' || b == b'=').unwrap();
            let name = String::from_utf8(entry[..end].to_vec()).unwrap();
            if entry[end] == b'=' {
                let rest = &entry[end + 1..];
                let nl = rest.iter().position(|&b| b == b'\n').unwrap();
                fields.push((name, rest[..nl].to_vec()));
                entry = &rest[nl + 1..];
            } else {
                let len = u64::from_le_bytes(entry[end + 1..end + 9].try_into().unwrap());
                let start = end + 9;
                let value = entry[start..start + len as usize].to_vec();
                assert_eq!(entry[start + len as usize], b'\n');
                fields.push((name, value));
                entry = &entry[start + len as usize + 1..];
            }
        }
        fields
    }

    fn value<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn an_event_in_a_connection_span_carries_priority_and_fields() {
        let entries = Entries::default();
        let subscriber = tracing_subscriber::registry().with(JournalLayer::new(entries.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "conn",
                peer = %"127.0.0.1:5000",
                export = tracing::field::Empty
            );
            let _in = span.enter();
            span.record(
                "export",
                tracing::field::display(crate::logsafe::Untrusted::text("disk")),
            );
            tracing::warn!(command = "write", offset = 4096u64, "memory cap reached");
            // A client's name with a newline: escaped in the message and the field, so
            // neither a forged line nor a forged field.
            tracing::info!(
                name = %crate::logsafe::Untrusted::text("a\nPRIORITY=0"),
                "unknown export"
            );
        });
        let entries = entries.0.lock().unwrap();
        assert_eq!(entries.len(), 2);
        let first = parse(&entries[0]);
        assert_eq!(value(&first, "PRIORITY"), Some("4"));
        assert_eq!(value(&first, "EXPORT"), Some("disk"));
        assert_eq!(value(&first, "PEER"), Some("127.0.0.1:5000"));
        assert_eq!(value(&first, "COMMAND"), Some("write"));
        assert_eq!(value(&first, "OFFSET"), Some("4096"));
        assert_eq!(value(&first, "SYSLOG_IDENTIFIER"), Some("ramnbd"));
        assert_eq!(
            value(&first, "MESSAGE"),
            Some(
                "conn{peer=127.0.0.1:5000 export=\"disk\"}: memory cap reached \
                 command=\"write\" offset=4096"
            )
        );
        let second = parse(&entries[1]);
        assert_eq!(value(&second, "PRIORITY"), Some("6"));
        assert_eq!(value(&second, "NAME"), Some("a\\nPRIORITY=0"));
        assert_eq!(second.iter().filter(|(n, _)| n == "PRIORITY").count(), 1);
        assert!(!value(&second, "MESSAGE").unwrap().contains('\n'));
    }

    #[test]
    fn field_names_fit_the_journal() {
        assert_eq!(field_name("fd_name").as_deref(), Some("FD_NAME"));
        assert_eq!(field_name("read-only").as_deref(), Some("READ_ONLY"));
        assert_eq!(field_name("message").as_deref(), Some("F_MESSAGE"));
        assert_eq!(field_name("priority").as_deref(), Some("F_PRIORITY"));
        assert_eq!(field_name("errno").as_deref(), Some("F_ERRNO"));
        assert_eq!(field_name("_x").as_deref(), Some("X"));
        assert_eq!(field_name("2x").as_deref(), Some("F_2X"));
        assert_eq!(field_name("__"), None);
    }

    #[test]
    fn multi_line_values_are_length_framed() {
        let mut entry = Vec::new();
        put(&mut entry, "MESSAGE", "a\nb");
        assert_eq!(entry, b"MESSAGE\n\x03\0\0\0\0\0\0\0a\nb\n");
    }

    #[test]
    fn journal_stream_must_name_the_file_itself() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let stat = rustix::fs::fstat(&file).unwrap();
        let (dev, ino) = (stat.st_dev, stat.st_ino);
        let named = |v: String| names_file(std::ffi::OsStr::new(&v), &file);
        assert!(named(format!("{dev}:{ino}")));
        assert!(!named(format!("{dev}:{}", ino + 1)));
        assert!(!named(format!("{}:{ino}", dev + 1)));
        assert!(!named(format!("{dev}")));
        assert!(!named(String::new()));
    }
}
