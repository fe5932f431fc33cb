//! td-bench: the benchmark and verification frontend of tapdisk-rs.
//!
//! It drives a VBD over the local transport with [`blkif::local::LocalFrontend`], either an
//! existing VBD socket or an image served by a private tapdisk it starts for the run
//! ([`target`]). Three subcommands:
//!
//! - `verify` ([`verify`]): random reads, writes, flushes and discards of mixed sizes and
//!   alignments, every read checked byte for byte against a shadow of the disk ([`shadow`]).
//! - `run` ([`bench`]): a fio-like load generator reporting IOPS, bandwidth and latency
//!   percentiles from a log-bucket histogram ([`hist`]).
//! - `compare` ([`compare`]): fio on the image file, then the same workload through tapdisk.
//! - `vs` ([`vs`]): the same workload on two images through tapdisk, alternating (an image
//!   format against the raw driver).
//! - `err` ([`err`]): early read return against a slow disk, per policy.
//! - `thesis` ([`thesis`]): the thesis's experiments (Tables 3.1-3.5, 4.1, 4.2, Figures 3.1,
//!   4.1-4.3), with a model of the guest's block layer ([`guest`]) and PNG charts ([`plot`]).

pub mod bench;
pub mod compare;
pub mod err;
pub mod fig61;
pub mod guest;
pub mod hist;
pub mod matrix;
pub mod nbd_compare;
pub mod plot;
pub mod progress;
pub mod shadow;
pub mod soak;
pub mod target;
pub mod thesis;
pub mod util;
pub mod verify;
pub mod vs;

use clap::{Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  td-bench verify                                  # 100000 checked requests, temporary 256M image
  td-bench verify --image /tmp/d.img --size 64M --requests 20000 --ring-order 4 --abi x86_32
  td-bench run --rw randread --bs 4k --iodepth 32 --runtime 10s
  td-bench run --device /run/tapdisk-rs/vbd/tapdev0 --rw write --bs 44k --count 100000 --json
  td-bench compare --image /var/tmp/d.img --size 1G --rw randread --iodepth 32 --repeat 3

Without --device or --image, td-bench creates a temporary 256M sparse image, serves it with a
private tapdisk (found via $TAPDISK_RS_TAPDISK, next to td-bench, or on PATH) and removes both
at the end, also on error or Ctrl-C.";

/// td-bench: verify and benchmark tapdisk-rs through its local blkif transport.
#[derive(Parser, Debug)]
#[command(name = "td-bench", version, after_help = EXAMPLES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Check data integrity: random mixed IO, every read compared with a shadow of the disk;
    /// ends with "N passed, M failed" and exits 1 if M > 0.
    #[command(
        after_help = "Example:\n  td-bench verify --image /tmp/d.img --size 64M --requests 20000 --seed 7"
    )]
    Verify(verify::VerifyArgs),
    /// Benchmark: keep --iodepth requests in flight; print IOPS, MB/s and latency percentiles.
    #[command(
        after_help = "Example:\n  td-bench run --rw randrw --rwmixread 70 --bs 16k --iodepth 64 --ring-order 2 --runtime 30s"
    )]
    Run(bench::RunArgs),
    /// Run the workload with fio on the image file, then through tapdisk, and compare.
    #[command(
        after_help = "Example:\n  td-bench compare --image /var/tmp/d.img --size 1G --rw randread --runtime 5s --repeat 3"
    )]
    Compare(compare::CompareArgs),
    /// Rerun the thesis's experiments (Tables 3.1-3.5, 4.1, 4.2; Figures 3.1, 4.1-4.3) on a
    /// real file and on the model disk, the thesis's figures beside ours.
    #[command(after_help = THESIS_EXAMPLES)]
    Thesis(thesis::ThesisArgs),
    /// Early read return measured: large reads from a slow disk, every page consumed and
    /// checked; perceived latency and total time per policy, against early return off.
    #[command(after_help = ERR_EXAMPLES)]
    Err(err::ErrArgs),
    /// Soak: a full ring of checked mixed IO on one disk and fio with verification over the
    /// NBD export of another, in one tapdisk, for a bounded time (10 minutes by default);
    /// fails on any wrong byte or error, or if the tapdisk's memory grows more than 5 %.
    #[command(
        after_help = "Examples:\n  td-bench soak                          # 10 minutes\n  td-bench soak --duration 2m --warmup 20s --size 128M"
    )]
    Soak(soak::SoakArgs),
    /// The NBD export of tapdisk against qemu-nbd on the same image, with fio's nbd engine,
    /// alternating in one run; prints medians and each tapdisk's ratio to qemu-nbd.
    #[command(
        after_help = "Examples:\n  td-bench nbd-compare --image /dev/shm/d.img --rw randread --bs 4k --iodepth 32\n  td-bench nbd-compare --image /var/tmp/d.img --rw read --bs 1M --iodepth 4 --tap-ctl /old/tap-ctl --label old --tap-ctl target/release/tap-ctl --label new"
    )]
    NbdCompare(nbd_compare::NbdCompareArgs),
    /// The same workload on two images through tapdisk (an image format against the raw
    /// driver, say), alternating in one run; prints medians and the ratio.
    #[command(
        after_help = "Examples:\n  td-bench vs --baseline aio:/var/tmp/r.img --image vhd:/var/tmp/d.vhd --size 1G --fill --rw randread --bs 4k --iodepth 32 --runtime 5s\n  td-bench vs --baseline aio:/var/tmp/r.img --image vhd:/var/tmp/d.vhd --size 1G --fresh --rw write --bs 1M --iodepth 8 --count 512"
    )]
    Vs(vs::VsArgs),
}

const ERR_EXAMPLES: &str = "\
Examples:
  td-bench err                                   # 1M reads on the model disk, the usual policies
  td-bench err percent=25 --order random --count 200
  td-bench err seq=2:10 --sequential --bs 4M

The reader runs in early-read mode: each read's pages are unmapped until tapdisk has filled
them, so touching one early stalls the reader until it is there (userfaultfd; needs root or
vm.unprivileged_userfaultfd=1).";

const THESIS_EXAMPLES: &str = "\
Examples:
  td-bench thesis                          # everything: tables on stdout, charts in ./thesis-out
  td-bench thesis table-4.2 --disk model   # one table, on the model disk only
  td-bench thesis table-3.2 --image /var/tmp/t.img --count 500

The model disk is the thesis's spindle (Table 3.1: X = 335 µs per IO, Y = 4 µs per KB, plus
4.17 ms when an IO does not start where the last one ended); the data is real, the timing
modelled. Runs take a few minutes; the machine should otherwise be idle.";

/// Runs td-bench with these arguments. Returns the process exit code; errors are printed as
/// one line `td-bench: <message>`.
pub fn main_with(cli: Cli) -> i32 {
    let res = target::install_signal_handler().and_then(|()| match &cli.command {
        Cmd::Verify(a) => verify::run(a),
        Cmd::Run(a) => bench::run(a),
        Cmd::Compare(a) => compare::run(a),
        Cmd::Thesis(a) => thesis::run(a),
        Cmd::Err(a) => err::run(a),
        Cmd::Soak(a) => soak::run(a),
        Cmd::NbdCompare(a) => nbd_compare::run(a).map(|()| true),
        Cmd::Vs(a) => vs::run(a),
    });
    match res {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            target::park_if_interrupted();
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("td-bench: {msg}");
            1
        }
    }
}

/// Parses the process's arguments and runs td-bench; returns the exit code.
pub fn main() -> i32 {
    main_with(Cli::parse())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn target_options_parse() {
        let c = Cli::try_parse_from([
            "td-bench",
            "verify",
            "--image",
            "/x",
            "--size",
            "64M",
            "--ring-order",
            "4",
            "--abi",
            "x86_32",
            "--requests",
            "5",
        ])
        .unwrap();
        let Cmd::Verify(v) = c.command else { panic!() };
        assert_eq!(v.target.size, Some(64 << 20));
        assert_eq!(v.target.ring_slots(), 512);
        assert!(Cli::try_parse_from(["td-bench", "run", "--ring-order", "9"]).is_err());
        assert!(
            Cli::try_parse_from(["td-bench", "run", "--device", "/d", "--image", "/i"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["td-bench", "run", "--runtime", "1s", "--count", "5"]).is_err()
        );
        let c =
            Cli::try_parse_from(["td-bench", "compare", "--repeat", "3", "--bs", "16k"]).unwrap();
        let Cmd::Compare(a) = c.command else { panic!() };
        assert_eq!((a.repeat, a.workload.bs), (3, 16384));
    }
}
