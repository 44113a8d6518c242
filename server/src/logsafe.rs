//! Client-supplied text on its way to a log line. A client chooses the bytes of an export name;
//! printed raw, a newline in it writes a forged log line of its own (`ERROR ramnbd: …`), ANSI
//! sequences reach the operator's terminal, and bidi controls reorder what the operator reads.
//! [`Untrusted`] shows such text so that none of that can happen: quoted, one line, bounded,
//! with every byte that is not plain visible text written as an escape.
//!
//! Log such text as a field: `tracing::info!(name = %Untrusted::bytes(data), "…")`.

use std::fmt::{self, Write};

/// How many bytes of the text are shown; longer text is cut (at a character boundary) and its
/// length given after it. The longest NBD string is 4096 bytes; escaped, that would be up to
/// 16 KiB on one line. 256 bytes shown keep a line under about 1 KiB and still show any real
/// export name whole.
pub const SHOWN_BYTES: usize = 256;

/// Text a client (or anyone but this program) chose, shown safely. `Display` writes it in
/// double quotes, as is where it is printable, and otherwise as escapes:
/// * `\\` and `\"` for the quoting characters, so the quotes always end the text;
/// * `\n`, `\r`, `\t`, `\0`, and `\xNN` for the other C0 controls and DEL;
/// * `\u{NN}` for the C1 controls U+0080–U+009F (8-bit escape sequences in some terminals);
/// * `\u{NNNN}` for invisible characters that reorder or hide text: U+061C, U+200B–U+200F,
///   U+2028–U+202E (line and paragraph separators, bidi embeddings and overrides),
///   U+2060–U+2069 (word joiner, invisible operators, bidi isolates) and U+FEFF;
/// * `\xNN` for each byte that is not part of valid UTF-8, so the bytes the client sent can be
///   read back (rather than U+FFFD for all of them).
///
/// Beyond [`SHOWN_BYTES`], the rest is left out and marked: `"aaaa…"... (4096 bytes)`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Untrusted<'a>(&'a [u8]);

impl<'a> Untrusted<'a> {
    /// Raw bytes as received, valid UTF-8 or not.
    pub fn bytes(bytes: &'a [u8]) -> Untrusted<'a> {
        Untrusted(bytes)
    }

    /// Text already decoded (an export name, a configured value).
    pub fn text(text: &'a str) -> Untrusted<'a> {
        Untrusted(text.as_bytes())
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        let mut shown = 0;
        'chunks: for chunk in self.0.utf8_chunks() {
            for ch in chunk.valid().chars() {
                if shown + ch.len_utf8() > SHOWN_BYTES {
                    break 'chunks;
                }
                shown += ch.len_utf8();
                write_char_escaped(f, ch)?;
            }
            for &byte in chunk.invalid() {
                if shown + 1 > SHOWN_BYTES {
                    break 'chunks;
                }
                shown += 1;
                write!(f, "\\x{byte:02x}")?;
            }
        }
        f.write_char('"')?;
        if shown < self.0.len() {
            write!(f, "... ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

fn write_char_escaped(f: &mut fmt::Formatter<'_>, ch: char) -> fmt::Result {
    match ch {
        '\\' => f.write_str("\\\\"),
        '"' => f.write_str("\\\""),
        '\n' => f.write_str("\\n"),
        '\r' => f.write_str("\\r"),
        '\t' => f.write_str("\\t"),
        '\0' => f.write_str("\\0"),
        '\x01'..='\x1f' | '\x7f' => write!(f, "\\x{:02x}", ch as u32),
        '\u{80}'..='\u{9f}' => write!(f, "\\u{{{:x}}}", ch as u32),
        '\u{061c}'
        | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2069}'
        | '\u{feff}' => write!(f, "\\u{{{:x}}}", ch as u32),
        _ => f.write_char(ch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(bytes: &[u8]) -> String {
        Untrusted::bytes(bytes).to_string()
    }

    #[test]
    fn ordinary_names_are_shown_as_they_are() {
        assert_eq!(shown(b"disk"), r#""disk""#);
        assert_eq!(
            Untrusted::text("Ωdisk-β_1.img").to_string(),
            r#""Ωdisk-β_1.img""#
        );
        assert_eq!(Untrusted::text("диск 磁盘").to_string(), r#""диск 磁盘""#);
        assert_eq!(shown(b""), r#""""#);
    }

    #[test]
    fn line_breaks_and_nul_are_escaped() {
        let forged = shown(b"x\nERROR ramnbd: forged\r\n\0");
        assert_eq!(forged, r#""x\nERROR ramnbd: forged\r\n\0""#);
        assert!(!forged.contains(['\n', '\r', '\0']));
        assert_eq!(shown(b"a\tb"), r#""a\tb""#);
    }

    #[test]
    fn terminal_escape_sequences_are_escaped() {
        assert_eq!(shown(b"\x1b[31mred\x1b[0m"), r#""\x1b[31mred\x1b[0m""#);
        assert_eq!(shown(b"\x07\x08\x7f"), r#""\x07\x08\x7f""#);
        // C1 controls: U+009B is CSI on its own in some terminals.
        assert_eq!(Untrusted::text("\u{9b}31m").to_string(), r#""\u{9b}31m""#);
    }

    #[test]
    fn quotes_and_backslashes_cannot_end_the_text_early() {
        assert_eq!(shown(br#"a" b="c\"#), r#""a\" b=\"c\\""#);
    }

    #[test]
    fn invalid_utf8_shows_the_bytes() {
        assert_eq!(shown(b"\xff\xfeok\xc3"), r#""\xff\xfeok\xc3""#);
        // A valid character after invalid bytes is shown as it is.
        assert_eq!(shown(b"\x80\xce\xa9"), r#""\x80Ω""#);
    }

    #[test]
    fn invisible_reordering_characters_are_escaped() {
        let text = "evil\u{202e}gpj.exe\u{2066}\u{2069}\u{200b}\u{2028}\u{feff}\u{61c}";
        assert_eq!(
            Untrusted::text(text).to_string(),
            r#""evil\u{202e}gpj.exe\u{2066}\u{2069}\u{200b}\u{2028}\u{feff}\u{61c}""#
        );
    }

    #[test]
    fn long_text_is_cut_and_its_length_given() {
        let long = vec![b'a'; 4096];
        let text = shown(&long);
        assert_eq!(
            text,
            format!("\"{}\"... (4096 bytes)", "a".repeat(SHOWN_BYTES))
        );
        // Exactly at the limit: nothing is cut.
        assert_eq!(
            shown(&long[..SHOWN_BYTES]),
            format!("\"{}\"", "a".repeat(SHOWN_BYTES))
        );
        // Escapes make the worst line at most 4 characters per byte shown.
        let worst = shown(&[0xffu8; 4096]);
        assert!(worst.len() <= 4 * SHOWN_BYTES + 32, "{} bytes", worst.len());
        assert!(worst.ends_with("\"... (4096 bytes)"));
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        // 255 ASCII bytes then a 2-byte character: it does not fit whole, so it is left out.
        let mut text = "a".repeat(SHOWN_BYTES - 1);
        text.push('Ω');
        assert_eq!(
            Untrusted::text(&text).to_string(),
            format!(
                "\"{}\"... ({} bytes)",
                "a".repeat(SHOWN_BYTES - 1),
                SHOWN_BYTES + 1
            )
        );
    }
}
