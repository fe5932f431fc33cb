//! `td-bench vs`: the same workload on two images through tapdisk (a baseline, `--baseline`,
//! and the image under test, `--image`) on the same storage, alternating `--repeat` times in
//! one run; prints each run, the medians and the ratio image/baseline. For comparing image
//! formats with the raw driver: `--fill` writes every block of both images first (a disk whose
//! blocks are allocated), `--fresh` recreates both before every measurement (first writes).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use td_cli::fmt_size;

use crate::bench::{self, BenchResult, Rw, Stop, Workload, WorkloadArgs};
use crate::compare::median;
use crate::target::{self, TargetArgs};

/// Options of `td-bench vs`.
#[derive(Args, Clone, Debug)]
pub struct VsArgs {
    /// The baseline image, as --image takes it (e.g. aio:/var/tmp/raw.img); created like it
    /// when missing.
    #[arg(long, value_name = "FILE|SPEC")]
    pub baseline: PathBuf,
    /// Alternate the two this many times and report the medians (the machine may be noisy).
    #[arg(long, value_name = "K", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// Before the first measurement, write every byte of both images once (1 MiB sequential
    /// writes): blocks of a format are then allocated, and a raw file is too.
    #[arg(long)]
    pub fill: bool,
    /// Delete and recreate both images before every measurement, so writes are first writes
    /// (allocating).
    #[arg(long, conflicts_with = "fill")]
    pub fresh: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: TargetArgs,
}

/// Writes the whole disk the target arguments name once.
fn fill(ta: &TargetArgs) -> Result<()> {
    let mut w = Workload {
        rw: Rw::Write,
        bs: 1 << 20,
        iodepth: 4,
        stop: Stop::Count(1),
        warmup: std::time::Duration::ZERO,
        rwmixread: 0,
        seed: 1,
    };
    let mut t = target::open(ta, w.mem_pages(&ta.shape()))?;
    w.stop = Stop::Count((t.info.sectors * 512) >> 20);
    let r = bench::measure(&mut t.fe, t.info.sectors, &t.shape, &w, None)?;
    if r.errors > 0 {
        bail!("{} of {} writes filling the image failed", r.errors, r.ios);
    }
    Ok(())
}

/// One measurement on `spec`.
fn one(args: &VsArgs, spec: &Path, first: bool) -> Result<BenchResult> {
    let mut ta: TargetArgs = args.target.clone();
    ta.image = Some(spec.to_path_buf());
    let path = target::image_path(spec)?;
    if args.fresh {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => {}
        }
    }
    if args.fill && first {
        fill(&ta).with_context(|| format!("filling {}", spec.display()))?;
    }
    let (mut t, w) = bench::prepare(&args.workload, &ta)?;
    let r = bench::measure(&mut t.fe, t.info.sectors, &t.shape, &w, None)?;
    if r.errors > 0 {
        bail!(
            "{} of {} requests failed on {}",
            r.errors,
            r.ios,
            spec.display()
        );
    }
    Ok(r)
}

/// Runs `td-bench vs`.
pub fn run(args: &VsArgs) -> Result<bool> {
    let Some(image) = args.target.image.clone() else {
        bail!("vs compares two images: name the one under test with --image");
    };
    if args.target.device.is_some() {
        bail!("vs serves both images with private tapdisks: use --image, not --device");
    }
    let specs = [args.baseline.clone(), image];
    let w = Workload::resolve(&args.workload, u64::MAX)?;
    eprintln!(
        "td-bench vs: {} on {} vs baseline {}, {} round(s), alternating{}",
        w.describe(),
        specs[1].display(),
        specs[0].display(),
        args.repeat,
        if args.fill {
            "; both filled first"
        } else if args.fresh {
            "; both recreated before every run"
        } else {
            ""
        }
    );
    let mut runs: [Vec<BenchResult>; 2] = Default::default();
    for round in 0..args.repeat {
        for (k, spec) in specs.iter().enumerate() {
            let r = one(args, spec, round == 0)?;
            eprintln!(
                "  round {}: {:<8} {:>10.0} IOPS {:>9.1} MB/s  p50 {:>8.1} µs  p99 {:>8.1} µs",
                round + 1,
                if k == 0 { "baseline" } else { "image" },
                r.iops,
                r.mb_s,
                r.lat_us.p50,
                r.lat_us.p99
            );
            runs[k].push(r);
        }
    }
    let med = |k: usize, f: fn(&BenchResult) -> f64| median(runs[k].iter().map(f).collect());
    let (b, i) = (med(0, |r| r.mb_s), med(1, |r| r.mb_s));
    let (bi, ii) = (med(0, |r| r.iops), med(1, |r| r.iops));
    println!(
        "{} {} QD{}: baseline {bi:.0} IOPS {b:.1} MB/s, image {ii:.0} IOPS {i:.1} MB/s \
         (medians of {}): image/baseline {:.2}",
        w.rw.name(),
        fmt_size(w.bs),
        w.iodepth,
        args.repeat,
        if b > 0.0 { i / b } else { 0.0 }
    );
    Ok(true)
}
