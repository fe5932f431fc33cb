//! Reporting: an error as one line, an IO error in words, output to a pipe that may close.

use std::io::{ErrorKind, Write};

/// An error and its causes as one line (`{e:#}`, e.g. anyhow's `outer: inner`), line breaks
/// inside any of them folded.
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    let s = format!("{e:#}");
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// An IO error in words, without the `(os error N)` suffix.
pub fn io_msg(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Writes `text` to stdout. A closed pipe (`tap-ctl list | head -1`) is not an error; another
/// failure is an IO error saying so, as the caller's error type (`anyhow::Error` in a tool).
pub fn emit<E: From<std::io::Error>>(text: &str) -> Result<(), E> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(E::from(std::io::Error::new(
            e.kind(),
            format!("cannot write to standard output: {}", io_msg(&e)),
        ))),
    }
}

/// Parses `args` (the first is the program name) as `P` and runs `run` on it; returns the
/// exit status: clap's on a bad command line ([`crate::clap_exit`]), 1 with one line
/// `tool: message` on stderr if `run` fails, else 0.
pub fn main_for<P, I, T, E>(tool: &str, args: I, run: impl FnOnce(&P) -> Result<(), E>) -> i32
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
    E: std::fmt::Display,
{
    let cli = match P::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => return crate::clap_exit(tool, &e, None),
    };
    match run(&cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{tool}: {}", one_line(&e));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_one_line() {
        struct Chain;
        impl std::fmt::Display for Chain {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(if f.alternate() {
                    "outer: first\nsecond"
                } else {
                    "outer"
                })
            }
        }
        assert_eq!(one_line(&Chain), "outer: first second");
        // ENOENT.
        let io = std::io::Error::from_raw_os_error(2);
        assert_eq!(io_msg(&io), "No such file or directory");
    }
}
