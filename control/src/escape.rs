//! Text that goes into line-based output (tap-ctl's lines, tapback's xenstore values and log)
//! made unable to forge a line or a field: control characters (a newline, a carriage return,
//! an escape sequence), bytes that are not UTF-8 and the backslash itself are written as
//! `\xNN` (`\u{NNNN}` for control characters beyond one byte), so an image name from xenstore
//! holding "\npid=1 minor=0" prints as one field.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::fmt::Write;
use std::os::unix::ffi::OsStrExt;

/// Whether `c` must be escaped.
fn needs(c: char) -> bool {
    c.is_control() || c == '\\'
}

fn push(out: &mut String, c: char) {
    if needs(c) {
        let n = c as u32;
        let _ = if n <= 0xff {
            write!(out, "\\x{n:02x}")
        } else {
            write!(out, "\\u{{{n:04x}}}")
        };
    } else {
        out.push(c);
    }
}

/// `s` with control characters and backslashes escaped (borrowed if nothing needs it).
pub fn text(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        push(&mut out, c);
    }
    Cow::Owned(out)
}

/// The bytes of `s` (a path, say) as escaped text: invalid UTF-8 bytes as `\xNN`.
pub fn bytes(s: &[u8]) -> Cow<'_, str> {
    if let Ok(t) = std::str::from_utf8(s) {
        return text(t);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for chunk in s.utf8_chunks() {
        for c in chunk.valid().chars() {
            push(&mut out, c);
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    Cow::Owned(out)
}

/// A path (or any OS string) as escaped text.
pub fn os(s: &OsStr) -> Cow<'_, str> {
    bytes(s.as_bytes())
}

/// `s` cut down to its first line, escaped: what a one-line value (an error key) may hold.
pub fn line(s: &str) -> String {
    text(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_untouched() {
        assert!(matches!(text("aio:/var/lib/x y.img"), Cow::Borrowed(_)));
        assert_eq!(text("é, ü"), "é, ü");
    }

    #[test]
    fn forged_lines_and_fields_are_escaped() {
        assert_eq!(
            text("/x.img\npid=1 minor=0 state=0 args=aio:/y"),
            "/x.img\\x0apid=1 minor=0 state=0 args=aio:/y"
        );
        assert_eq!(text("a\rb\tc\x1b[31m"), "a\\x0db\\x09c\\x1b[31m");
        assert_eq!(text("back\\slash"), "back\\x5cslash");
        assert_eq!(text("\u{85}next\u{7f}"), "\\x85next\\x7f");
        assert_eq!(bytes(b"bad\xff\xfe/\n"), "bad\\xff\\xfe/\\x0a");
        assert_eq!(os(OsStr::from_bytes(b"/a\nb")), "/a\\x0ab");
        assert!(!line("one\ntwo\r\n").contains('\n'));
    }
}
