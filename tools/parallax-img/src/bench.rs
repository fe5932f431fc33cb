//! `parallax-img bench-cache` and `bench-io`: the thesis's Tables 3.7 and 3.6, ours beside
//! theirs.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use parallax::bench::{self, THESIS_MISS_RATES, THESIS_THROUGHPUT};
use parallax::LayerStats;
use td_cli::emit;
use td_cli::{fmt_bytes, fmt_size, parse_size};

use super::Progress;

/// Examples shown by `parallax-img bench-cache --help`.
pub const CACHE_EXAMPLES: &str = "\
Examples:
  parallax-img bench-cache                       # 32768 x 4k writes, 10 and 128 slots
  parallax-img bench-cache --slots 1,10,32,128 --json";

/// Examples shown by `parallax-img bench-io --help`.
pub const IO_EXAMPLES: &str = "\
Examples:
  parallax-img bench-io --dir /var/tmp                    # 4k to 32k, 256 MiB, 3 runs each
  parallax-img bench-io --dir /mnt/ssd --size 1G --bs 4k,64k --repeat 5";

fn parse_list<T>(s: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    s.split(',').map(|x| f(x.trim())).collect()
}

fn parse_slots(s: &str) -> Result<Vec<usize>, String> {
    parse_list(s, |x| match x.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{x}' is not a number of slots (at least 1)")),
    })
}

fn parse_sizes(s: &str) -> Result<Vec<u64>, String> {
    parse_list(s, parse_size)
}

/// Options of `bench-cache`.
#[derive(Debug, Args)]
pub struct BenchCacheArgs {
    /// Sequential writes to issue (the thesis: dd of 32768 4 KiB blocks).
    #[arg(long, default_value_t = 32768)]
    pub writes: u64,
    /// Bytes per write.
    #[arg(long, value_parser = parse_size, default_value = "4k")]
    pub write_size: u64,
    /// Cache sizes to compare, comma-separated.
    #[arg(long, value_parser = parse_slots, default_value = "10,128")]
    pub slots: Vec<Vec<usize>>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn pct(l: &LayerStats) -> String {
    format!("{:.3} %", l.miss_rate_pct)
}

/// `bench-cache`.
pub fn bench_cache(a: &BenchCacheArgs) -> Result<()> {
    let slots: Vec<usize> = a.slots.iter().flatten().copied().collect();
    let mut runs = Vec::new();
    for &s in &slots {
        runs.push(bench::cache_experiment(s, a.writes, a.write_size)?);
    }
    if a.json {
        return emit(&format!("{}\n", serde_json::to_string_pretty(&runs)?));
    }
    let mut out = format!(
        "parallax-img bench-cache: {} sequential {} writes to a fresh in-memory disk, then the \
         same writes after emptying the cache\n\
         {:>5}  {:12}  {:>11}  {:>7}  {:>9}  {:>11}  {:>7}  {:>9}  {:>12}\n",
        a.writes,
        fmt_size(a.write_size),
        "slots",
        "pass",
        "V2P lookups",
        "misses",
        "miss rate",
        "P2M lookups",
        "misses",
        "miss rate",
        "thesis V/P"
    );
    for r in &runs {
        let thesis = THESIS_MISS_RATES
            .iter()
            .find(|t| t.0 == r.slots)
            .map(|t| format!("{:.2}/{:.2} %", t.1, t.2))
            .unwrap_or_else(|| "-".into());
        for (pass, s, th) in [
            ("fresh", &r.fresh, thesis.as_str()),
            ("rewrite-cold", &r.rewrite_cold, "-"),
        ] {
            out.push_str(&format!(
                "{:>5}  {:12}  {:>11}  {:>7}  {:>9}  {:>11}  {:>7}  {:>9}  {:>12}\n",
                r.slots,
                pass,
                s.v2p.lookups,
                s.v2p.misses,
                pct(&s.v2p),
                s.p2m.lookups,
                s.p2m.misses,
                pct(&s.p2m),
                th
            ));
        }
    }
    emit(&out)
}

/// Options of `bench-io`.
#[derive(Debug, Args)]
pub struct BenchIoArgs {
    /// Directory for the two temporary files (removed afterwards): the storage measured.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Bytes written and read per pass.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub size: u64,
    /// IO sizes, comma-separated.
    #[arg(long, value_parser = parse_sizes, default_value = "4k,8k,16k,32k")]
    pub bs: Vec<Vec<u64>>,
    /// Runs per IO size (alternating plain file and Parallax); medians are shown.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `bench-io`.
pub fn bench_io(a: &BenchIoArgs, p: &Progress) -> Result<()> {
    if !a.dir.is_dir() {
        bail!("{} is not a directory", a.dir.display());
    }
    let sizes: Vec<u64> = a.bs.iter().flatten().copied().collect();
    let mut rows = Vec::new();
    for (i, &bs) in sizes.iter().enumerate() {
        if let Some(mut cb) = p.callback("bench-io") {
            cb("block sizes", i as u64, sizes.len() as u64);
        }
        rows.push(bench::throughput(&a.dir, a.size, bs, a.repeat)?);
    }
    p.clear();
    if a.json {
        return emit(&format!("{}\n", serde_json::to_string_pretty(&rows)?));
    }
    let mut out = format!(
        "parallax-img bench-io: sequential {} per pass in {}, median of {} (MB/s; ratio = Parallax / plain file)\n\
         {:>5}  {:>20}  {:>20}  {:>20}  {:>14}\n",
        fmt_bytes(a.size),
        a.dir.display(),
        a.repeat.max(1),
        "bs",
        "write new (ratio)",
        "rewrite (ratio)",
        "read (ratio)",
        "thesis w/o, w/"
    );
    let cell = |plx: f64, raw: f64| format!("{plx:.0}/{raw:.0} ({:.2})", plx / raw);
    let cpu = |plx: f64, raw: f64| format!("{plx:.2}/{raw:.2} ({:.2})", raw / plx);
    for r in &rows {
        let thesis = THESIS_THROUGHPUT
            .iter()
            .find(|t| t.0 << 10 == r.block_size)
            .map(|t| format!("{:.0}, {:.0}", t.1, t.2))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:>5}  {:>20}  {:>20}  {:>20}  {:>14}\n",
            fmt_size(r.block_size),
            cell(r.plx_write, r.raw_write),
            cell(r.plx_rewrite, r.raw_rewrite),
            cell(r.plx_read, r.raw_read),
            thesis
        ));
    }
    out.push_str(&format!(
        "CPU time per IO (µs, Parallax/plain file; ratio = plain file / Parallax, as for throughput)\n\
         {:>5}  {:>20}  {:>20}  {:>20}\n",
        "bs", "write new", "rewrite", "read"
    ));
    for r in &rows {
        let c = r.cpu_us;
        out.push_str(&format!(
            "{:>5}  {:>20}  {:>20}  {:>20}\n",
            fmt_size(r.block_size),
            cpu(c[1], c[0]),
            cpu(c[3], c[2]),
            cpu(c[5], c[4])
        ));
    }
    emit(&out)
}
