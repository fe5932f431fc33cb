//! `td-bench compare --matrix`: the workloads the performance goals are stated in, each fio
//! against tapdisk side by side (alternating, medians), in one table of ratios.
//!
//! Rows run on two images td-bench makes and fills: one in memory (tmpfs: the ring path with
//! no device under it) and one on a file system (O_DIRECT where it allows: a device under
//! it). Every row uses tapdisk's default settings except where it says otherwise; the last
//! polls on both sides, with the frontend and tapdisk pinned to different CPUs (see
//! `--pin`); it is skipped where the process may use only one CPU (`taskset -c N td-bench
//! compare --matrix` runs every side on that one CPU).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::bench::Rw;
use crate::compare::{self, CompareArgs, Pair};
use crate::util::{prefill, RemoveFiles};

/// One row of the matrix.
struct Row {
    name: &'static str,
    memory: bool,
    rw: Rw,
    bs: u64,
    iodepth: u32,
    /// Indirect segments per request (0: direct requests).
    indirect: u16,
    /// Poll on both sides (µs), pinned.
    poll_us: u32,
}

const fn row(name: &'static str, memory: bool, rw: Rw, bs: u64, iodepth: u32) -> Row {
    Row {
        name,
        memory,
        rw,
        bs,
        iodepth,
        indirect: 0,
        poll_us: 0,
    }
}

const ROWS: &[Row] = &[
    row("tmpfs 4k randread QD32", true, Rw::Randread, 4096, 32),
    row("tmpfs 4k randwrite QD32", true, Rw::Randwrite, 4096, 32),
    Row {
        indirect: 32,
        ..row("tmpfs 512k read QD8", true, Rw::Read, 512 << 10, 8)
    },
    row("tmpfs 4k randread QD1", true, Rw::Randread, 4096, 1),
    row("file 4k randread QD32", false, Rw::Randread, 4096, 32),
    Row {
        poll_us: 50,
        ..row("tmpfs 4k randread QD1 polled", true, Rw::Randread, 4096, 1)
    },
];

/// Size of the matrix's images unless --size says otherwise.
const DEFAULT_SIZE: u64 = 512 << 20;

/// Makes `path` a `size`-byte image filled with data (reads of holes would not touch the
/// storage), unless it already is one.
fn filled(path: &Path, size: u64) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    prefill(path, size, size)
}

/// The arguments of row `r`.
fn row_args(base: &CompareArgs, r: &Row, image: &Path) -> CompareArgs {
    let mut a = base.clone();
    a.matrix = false;
    a.workload.rw = r.rw;
    a.workload.bs = r.bs;
    a.workload.iodepth = r.iodepth;
    a.workload.count = None;
    a.workload.runtime = Some(base.workload.runtime.unwrap_or(Duration::from_secs(5)));
    a.target.image = Some(image.to_path_buf());
    a.target.size = None;
    a.target.indirect_segments = r.indirect;
    a.target.poll_us = r.poll_us;
    a.target.spin_us = r.poll_us;
    a.target.pin = r.poll_us > 0;
    a
}

/// Runs the matrix. Returns whether every tapdisk request succeeded.
pub fn run(args: &CompareArgs) -> Result<bool> {
    use nix::sched::{sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let size = args.target.size.unwrap_or(DEFAULT_SIZE);
    let pid = std::process::id();
    let mem = args.tmpfs_dir.join(format!("td-bench-matrix-{pid}.img"));
    let file = args.file_dir.join(format!("td-bench-matrix-{pid}.img"));
    let _images = RemoveFiles(vec![mem.clone(), file.clone()]);
    eprintln!(
        "td-bench compare --matrix: filling {} and {} ({})",
        mem.display(),
        file.display(),
        td_cli::fmt_size(size)
    );
    filled(&mem, size)?;
    filled(&file, size)?;
    // Pinned rows move this thread; every other row runs with the CPUs we started with.
    let cpus = sched_getaffinity(Pid::from_raw(0)).context("reading this process's CPUs")?;
    let can_pin = (0..nix::sched::CpuSet::count())
        .filter(|&c| cpus.is_set(c).unwrap_or(false))
        .nth(1)
        .is_some();
    let mut rows: Vec<(&Row, Pair)> = Vec::new();
    let mut errors = 0;
    for r in ROWS {
        let image = if r.memory { &mem } else { &file };
        eprintln!("== {} ({} runs each)", r.name, args.repeat);
        if r.poll_us > 0 && !can_pin {
            // Two threads spinning on one CPU take it from each other: no measurement.
            eprintln!("   skipped: this process may use one CPU, and both sides poll");
            continue;
        }
        let p = compare::pair(&row_args(args, r, image), false);
        sched_setaffinity(Pid::from_raw(0), &cpus).context("restoring this process's CPUs")?;
        let p = p.with_context(|| r.name)?;
        errors += p.errors;
        rows.push((r, p));
    }
    println!(
        "td-bench compare --matrix: medians of {} alternating runs of {:.0} s each; ratios \
         are tapdisk / fio",
        args.repeat,
        args.workload
            .runtime
            .unwrap_or(Duration::from_secs(5))
            .as_secs_f64()
    );
    println!(
        "{:<30} {:>11} {:>11} {:>6}  {:>8} {:>8} {:>7}",
        "workload", "fio IOPS", "tapdisk", "ratio", "fio p50", "td p50", "+µs"
    );
    for (r, p) in &rows {
        let (f, t) = (p.fio, p.tapdisk);
        println!(
            "{:<30} {:>11.0} {:>11.0} {:>6.2}  {:>8.1} {:>8.1} {:>+7.1}",
            r.name,
            f.iops,
            t.iops,
            if f.iops > 0.0 { t.iops / f.iops } else { 0.0 },
            f.p50_us,
            t.p50_us,
            t.p50_us - f.p50_us
        );
    }
    if errors > 0 {
        eprintln!("td-bench: {errors} tapdisk requests failed");
    }
    Ok(errors == 0)
}
