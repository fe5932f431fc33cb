//! `parallax-img`: create, inspect, snapshot, clone, check and measure Parallax images.
//!
//! One module for the command line and what the verbs share ([`main_with`], progress on
//! stderr, formatting), [`verbs`] for the image verbs and [`bench`] for the measurements.
//! Every failure is one line, `parallax-img: <what went wrong>`, on stderr; the exit status is 0
//! on success, 1 when something failed (for `check`: it found problems), and 2 when the
//! command line itself is wrong or `check` could not check (the image is in use, unreadable,
//! or not an image).

pub mod bench;
pub mod verbs;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};

const LONG_ABOUT: &str = "\
Create, inspect, snapshot, clone, check and measure Parallax images.

A Parallax image is one file (or block device) holding volumes of one virtual size: writable
disks and read-only snapshots, sharing their blocks. A snapshot or a clone costs one 4 KiB node,
whatever the disk size; blocks are copied only when one side writes them. The first disk of an
image is called 'base'.

Volumes are named as PATH@VOLUME; PATH alone means PATH@base. tapdisk serves them as
parallax:PATH or parallax:PATH@VOLUME (snapshots read-only).

An image open for writing (by tapdisk or by a command here) is locked: commands that change it
wait for nothing and fail with 'in use by another process'; commands that only read share it
with other readers.";

const EXAMPLES: &str = "\
Examples:
  parallax-img create vm1.plx --size 20G            # a 20 GiB disk 'base' with 4 KiB blocks
  parallax-img snapshot vm1.plx before-upgrade      # read-only snapshot of vm1.plx@base
  parallax-img clone vm1.plx@before-upgrade test    # writable disk vm1.plx@test sharing it
  parallax-img list vm1.plx                         # volumes with dates and sizes
  parallax-img delete vm1.plx@before-upgrade        # delete it, give its own blocks back
  parallax-img check vm1.plx                        # verify everything; exit 1 on problems,
                                                    # 2 if it cannot check
  parallax-img info vm1.plx
  parallax-img export vm1.plx@test test.raw         # copy a volume to a raw file
  parallax-img bench-cache                          # the thesis's Table 3.7
  parallax-img bench-io --dir /var/tmp              # the thesis's Table 3.6

Errors are one line on stderr, 'parallax-img: ...'. Exit status: 0 success, 1 failure (for
check: problems found), 2 bad command line (for check also: could not check, e.g. the image is
in use by a tapdisk). 'parallax-img COMMAND --help' for each command.";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "parallax-img",
    version,
    about = "Create, inspect, snapshot, clone, check and measure Parallax images",
    long_about = LONG_ABOUT,
    after_help = EXAMPLES,
    arg_required_else_help = true
)]
pub struct Cli {
    /// Print no progress on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub verb: Verb,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Create a new image with one empty disk, 'base'.
    #[command(after_help = verbs::CREATE_EXAMPLES)]
    Create(verbs::CreateArgs),
    /// Show an image's format, sizes and space use.
    Info(verbs::InfoArgs),
    /// List the volumes: kind, creation date, parent, mapped and exclusive size
    ///
    /// MAPPED is how much of the volume has been written; EXCLUSIVE is what only this volume
    /// holds, the space deleting it gives back.
    #[command(verbatim_doc_comment)]
    List(verbs::ListArgs),
    /// Take a read-only snapshot of a volume (constant time).
    #[command(after_help = verbs::SNAPSHOT_EXAMPLES)]
    Snapshot(verbs::SnapshotArgs),
    /// Make a new writable disk sharing every block of a volume (constant time).
    #[command(after_help = verbs::CLONE_EXAMPLES)]
    Clone(verbs::CloneArgs),
    /// Delete a volume and give back the blocks only it held.
    Delete(verbs::DeleteArgs),
    /// Rename a volume.
    Rename(verbs::RenameArgs),
    /// Verify an image: checksums, pointers, reference counts, bitmaps
    ///
    /// Prints what it found in plain words; exits 1 if there is any problem (a damaged
    /// superblock copy included), 2 if it cannot check (the image is in use by a tapdisk or
    /// another writer, unreadable, or not a Parallax image).
    #[command(verbatim_doc_comment)]
    Check(verbs::CheckArgs),
    /// Move a volume's blocks into one contiguous run of the store
    ///
    /// Only the physical-to-machine map changes: snapshots and clones sharing the blocks keep
    /// their content and see the new places too.
    #[command(verbatim_doc_comment)]
    Defrag(verbs::DefragArgs),
    /// Copy a volume into a raw file (unwritten ranges become holes).
    Export(verbs::ExportArgs),
    /// Copy a raw file into a volume (zero blocks are left unwritten).
    Import(verbs::ImportArgs),
    /// Measure metadata cache misses for sequential writes (the thesis's Table 3.7).
    #[command(after_help = bench::CACHE_EXAMPLES)]
    BenchCache(bench::BenchCacheArgs),
    /// Measure sequential throughput through Parallax against a plain file (Table 3.6).
    #[command(after_help = bench::IO_EXAMPLES)]
    BenchIo(bench::BenchIoArgs),
}

/// Parses `args` (the first is the program name), runs the command and returns the exit status.
pub fn main_with<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => return td_cli::clap_exit("parallax-img", &e, None),
    };
    let progress = Progress::new(cli.quiet);
    match run(&cli, &progress) {
        Ok(()) => 0,
        Err(e) => {
            progress.clear();
            eprintln!("parallax-img: {}", strip_os_error(&td_cli::one_line(&e)));
            exit_status(&cli.verb, &e)
        }
    }
}

/// The exit status of a failed command: 1, except that `check` tells "problems found" (1)
/// from "could not check" (2: the image is in use, unreadable, not an image at all).
fn exit_status(verb: &Verb, e: &anyhow::Error) -> i32 {
    match verb {
        Verb::Check(_) if e.downcast_ref::<verbs::ProblemsFound>().is_none() => 2,
        _ => 1,
    }
}

fn run(cli: &Cli, p: &Progress) -> Result<()> {
    match &cli.verb {
        Verb::Create(a) => verbs::create(a),
        Verb::Info(a) => verbs::info(a),
        Verb::List(a) => verbs::list(a, p),
        Verb::Snapshot(a) => verbs::snapshot(a),
        Verb::Clone(a) => verbs::clone(a),
        Verb::Delete(a) => verbs::delete(a, p),
        Verb::Rename(a) => verbs::rename(a),
        Verb::Check(a) => verbs::check(a, p),
        Verb::Defrag(a) => verbs::defrag(a, p),
        Verb::Export(a) => verbs::export(a, p),
        Verb::Import(a) => verbs::import(a, p),
        Verb::BenchCache(a) => bench::bench_cache(a),
        Verb::BenchIo(a) => bench::bench_io(a, p),
    }
}

/// Drops the `(os error N)` suffixes of IO errors.
fn strip_os_error(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(" (os error ") {
        out.push_str(&rest[..i]);
        rest = match rest[i..].find(')') {
            Some(j) => &rest[i + j + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// Progress on stderr for long operations: a line rewritten in place on a terminal, a line
/// every few seconds otherwise, nothing with `--quiet`.
#[derive(Clone)]
pub struct Progress {
    quiet: bool,
    tty: bool,
}

impl Progress {
    fn new(quiet: bool) -> Progress {
        Progress {
            quiet,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// A callback for the library, labelled `verb`.
    pub fn callback(&self, verb: &'static str) -> Option<parallax::ProgressFn> {
        if self.quiet {
            return None;
        }
        let tty = self.tty;
        let every = if tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        };
        let start = Instant::now();
        let mut last = Instant::now();
        Some(Box::new(move |what: &str, done: u64, total: u64| {
            if last.elapsed() < every || start.elapsed() < Duration::from_millis(500) {
                return;
            }
            last = Instant::now();
            let pct = if total > 0 {
                format!(" ({:.0}%)", done as f64 * 100.0 / total as f64)
            } else {
                String::new()
            };
            let total = if total > 0 {
                format!(" of {total}")
            } else {
                String::new()
            };
            let line = format!("parallax-img {verb}: {what} {done}{total}{pct}");
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r\x1b[K{line}")
            } else {
                writeln!(err, "{line}")
            };
        }))
    }

    /// Erases the progress line (on a terminal).
    pub fn clear(&self) {
        if self.tty && !self.quiet {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
        }
    }
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn fmt_time(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A path argument as given.
pub type PathArg = PathBuf;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(fmt_time(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }

    #[test]
    fn os_errors_lose_their_numbers() {
        assert_eq!(
            strip_os_error("x: cannot open: No such file or directory (os error 2)"),
            "x: cannot open: No such file or directory"
        );
    }

    #[test]
    fn bad_command_lines_exit_2() {
        assert_eq!(main_with(["parallax-img", "frobnicate"]), 2);
        assert_eq!(main_with(["parallax-img", "create", "x.plx"]), 2);
        assert_eq!(
            main_with(["parallax-img", "create", "x.plx", "--size", "12Q"]),
            2
        );
    }
}
