//! `parallax-master` (the extent master and its operator commands) and `stripe-img` (create
//! and inspect striped disks): thin front ends over the `stripe` crate.

pub mod img;
pub mod master;

use std::ffi::OsString;

/// Parses a command line with clap; on error prints one line `tool: ...` (help and version
/// as clap prints them) and returns the exit status to use.
fn parse<P: clap::Parser, I, T>(tool: &str, args: I) -> Result<P, i32>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    P::try_parse_from(args).map_err(|e| crate::cli::clap_exit(tool, &e, None))
}

/// Parses `args` (the first is the program name) as `P`, runs `run` on it and returns the exit
/// status: the one of [`parse`] on a bad command line, else the one of [`finish`].
fn main_for<P: clap::Parser, I, T>(
    tool: &str,
    args: I,
    run: impl FnOnce(&P) -> anyhow::Result<()>,
) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match parse::<P, I, T>(tool, args) {
        Ok(cli) => finish(tool, run(&cli)),
        Err(code) => code,
    }
}

/// Runs `f` and turns an error into `tool: message` and exit status 1.
fn finish(tool: &str, r: anyhow::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{tool}: {}", crate::tapctl::one_line(&e));
            1
        }
    }
}

/// A byte size argument (`4k`, `64M`, `1G`).
fn size_arg(s: &str) -> Result<u64, String> {
    crate::tdbench::util::parse_size(s)
}
