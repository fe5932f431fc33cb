//! `td-bench compare`: the same workload with fio directly on the image file (io_uring), then
//! through tapdisk, alternated `--repeat` times; reports medians and the ratio tapdisk/fio.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::bench::{self, BenchResult, Stop, Workload, WorkloadArgs};
use crate::target::{self, DirectArg, TargetArgs};

/// Options of `td-bench compare`.
#[derive(Args, Clone, Debug)]
pub struct CompareArgs {
    /// Alternate fio and tapdisk this many times and report the medians (the machine may be
    /// noisy).
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// The fio binary.
    #[arg(long, value_name = "PATH", default_value = "fio")]
    pub fio: String,
    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run the standard set of workloads instead of the one given (4 KiB random reads and
    /// writes at depth 32, 512 KiB sequential reads at depth 8 and 4 KiB random reads at
    /// depth 1 on a tmpfs image, 4 KiB random reads at depth 32 on a file in --file-dir, and
    /// depth 1 again with polling on both sides) and print one table of ratios. The workload
    /// and target options set nothing here except --runtime, --warmup and --size.
    #[arg(long)]
    pub matrix: bool,
    /// --matrix: the folder of the file-system image (O_DIRECT where it allows).
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub file_dir: std::path::PathBuf,
    /// --matrix: the folder of the memory image.
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    pub tmpfs_dir: std::path::PathBuf,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: TargetArgs,
}

/// What fio measured (the figures `compare` prints).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Figures {
    /// Requests per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mb_s: f64,
    /// Median completion latency, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    #[serde(rename = "p99.9_us")]
    pub p999_us: f64,
}

impl From<&BenchResult> for Figures {
    fn from(r: &BenchResult) -> Figures {
        Figures {
            iops: r.iops,
            mb_s: r.mb_s,
            p50_us: r.lat_us.p50,
            p99_us: r.lat_us.p99,
            p999_us: r.lat_us.p999,
        }
    }
}

/// Reads fio's `--output-format=json` output (text before the JSON, as fio sometimes prints,
/// is skipped). Uses the `mixed` section (`--unified_rw_reporting=mixed`), else adds up reads
/// and writes and takes the latencies of whichever did more IO.
pub fn parse_fio(out: &str) -> Result<Figures> {
    let at = out
        .find('{')
        .ok_or_else(|| anyhow!("fio printed no JSON"))?;
    let v: Value = serde_json::from_str(&out[at..]).context("fio's JSON output")?;
    let job = v["jobs"]
        .get(0)
        .ok_or_else(|| anyhow!("fio's JSON has no jobs"))?;
    if let Some(e) = job["error"].as_i64().filter(|&e| e != 0) {
        bail!("fio's job failed with error {e}");
    }
    let f = |sect: &Value| -> Option<Figures> {
        let pct = |k: &str| {
            sect["clat_ns"]["percentile"][k]
                .as_f64()
                .map(|ns| ns / 1000.0)
        };
        Some(Figures {
            iops: sect["iops"].as_f64()?,
            mb_s: sect["bw_bytes"].as_f64()? / 1e6,
            p50_us: pct("50.000000").unwrap_or(0.0),
            p99_us: pct("99.000000").unwrap_or(0.0),
            p999_us: pct("99.900000").unwrap_or(0.0),
        })
    };
    if job.get("mixed").is_some() {
        return f(&job["mixed"]).ok_or_else(|| anyhow!("fio's JSON lacks iops or bw_bytes"));
    }
    let (r, w) = (f(&job["read"]), f(&job["write"]));
    match (r, w) {
        (Some(r), Some(w)) => {
            let lat = if r.iops >= w.iops { r } else { w };
            Ok(Figures {
                iops: r.iops + w.iops,
                mb_s: r.mb_s + w.mb_s,
                ..lat
            })
        }
        _ => bail!("fio's JSON lacks read or write figures"),
    }
}

/// fio's arguments for `w` on `file`.
pub fn fio_args(w: &Workload, file: &Path, direct: bool) -> Vec<String> {
    let mut a = vec![
        "--name=base".to_string(),
        format!("--filename={}", file.display()),
        "--ioengine=io_uring".into(),
        format!("--direct={}", u8::from(direct)),
        format!("--rw={}", w.rw.name()),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.iodepth),
        format!("--rwmixread={}", w.rwmixread),
        "--norandommap".into(),
        "--randrepeat=0".into(),
        "--time_based".into(),
        "--unified_rw_reporting=mixed".into(),
        "--output-format=json".into(),
    ];
    match w.stop {
        Stop::Time(t) => a.push(format!("--runtime={}ms", t.as_millis().max(1))),
        Stop::Count(n) => {
            a.push("--runtime=1h".into());
            a.push(format!("--number_ios={n}"));
        }
    }
    if !w.warmup.is_zero() {
        a.push(format!("--ramp_time={}ms", w.warmup.as_millis()));
    }
    a
}

/// Runs fio with `args` (JSON output) and returns its figures.
pub fn run_fio_figures(fio: &str, args: &[String]) -> Result<Figures> {
    let child = Command::new(fio)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!("{fio} is not installed (compare needs fio)"),
            _ => anyhow!("cannot run {fio}: {e}"),
        })?;
    target::register_child(Some(child.id()));
    let out = child.wait_with_output();
    target::register_child(None);
    let out = out.with_context(|| format!("waiting for {fio}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let msg = err
            .lines()
            .chain(stdout.lines())
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!("fio failed ({}): {}", out.status, msg.trim());
    }
    parse_fio(&stdout)
}

/// The median of `v` (mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn medians(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    Figures {
        iops: m(|f| f.iops),
        mb_s: m(|f| f.mb_s),
        p50_us: m(|f| f.p50_us),
        p99_us: m(|f| f.p99_us),
        p999_us: m(|f| f.p999_us),
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// One comparison: the workload, and what fio and tapdisk measured.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The workload both ran.
    pub workload: Workload,
    /// Whether fio used O_DIRECT.
    pub direct: bool,
    /// fio's medians.
    pub fio: Figures,
    /// tapdisk's medians.
    pub tapdisk: Figures,
    /// fio's runs.
    pub fio_runs: Vec<Figures>,
    /// tapdisk's runs.
    pub tapdisk_runs: Vec<Figures>,
    /// tapdisk requests that failed.
    pub errors: u64,
}

/// Runs fio and tapdisk alternately `args.repeat` times; progress on stderr unless `quiet`.
pub fn pair(args: &CompareArgs, quiet: bool) -> Result<Pair> {
    if args.target.device.is_some() {
        bail!("compare runs fio on the image file itself: name it with --image, not --device");
    }
    // Under `auto` tapdisk's sequential reads would go through the page cache while fio's go
    // direct: where the file takes O_DIRECT, both sides use it.
    let mut ta = args.target.clone();
    if let (DirectArg::Auto, Some(i)) = (ta.direct, &ta.image) {
        ta.direct = DirectArg::strict_where_possible(i);
    }
    let (mut t, w) = bench::prepare(&args.workload, &ta)?;
    let image = t
        .image
        .clone()
        .ok_or_else(|| anyhow!("no image file to give fio"))?;
    let direct = target::direct_io_works(&image);
    let fio_args = fio_args(&w, &image, direct);
    if !quiet {
        eprintln!("td-bench compare: {} on {}", w.describe(), t.describe);
        eprintln!(
            "  fio: io_uring, direct={}{}; tapdisk: --direct {}, ring {} slots {}, {} ring \
             request(s) of at most {} per IO",
            u8::from(direct),
            if direct {
                ""
            } else {
                " (the file system refuses O_DIRECT)"
            },
            format!("{:?}", ta.direct).to_lowercase(),
            t.fe.ring_size(),
            t.fe.abi().name(),
            w.bs.div_ceil(t.shape.max_bytes()),
            td_cli::fmt_size(t.shape.max_bytes())
        );
    }
    let (mut fio_runs, mut td_runs) = (Vec::new(), Vec::new());
    let mut errors = 0;
    for i in 1..=args.repeat {
        let f = run_fio_figures(&args.fio, &fio_args)?;
        let r = bench::measure(&mut t.fe, t.info.sectors, &t.shape, &w, None)?;
        errors += r.errors;
        let tf = Figures::from(&r);
        if !quiet {
            eprintln!(
                "  run {i}/{}: fio {:.0} IOPS p50 {:.1} µs; tapdisk {:.0} IOPS p50 {:.1} µs",
                args.repeat, f.iops, f.p50_us, tf.iops, tf.p50_us
            );
        }
        fio_runs.push(f);
        td_runs.push(tf);
    }
    drop(t);
    Ok(Pair {
        workload: w,
        direct,
        fio: medians(&fio_runs),
        tapdisk: medians(&td_runs),
        fio_runs,
        tapdisk_runs: td_runs,
        errors,
    })
}

/// Runs `td-bench compare`. Returns whether every tapdisk request succeeded.
pub fn run(args: &CompareArgs) -> Result<bool> {
    if args.matrix {
        return crate::matrix::run(args);
    }
    let p = pair(args, args.json)?;
    let (w, fm, tm, errors) = (&p.workload, p.fio, p.tapdisk, p.errors);
    if args.json {
        let o = serde_json::json!({
            "workload": {
                "rw": w.rw.name(), "bs": w.bs, "iodepth": w.iodepth,
                "runtime_s": match w.stop { Stop::Time(t) => Some(t.as_secs_f64()), _ => None },
                "count": match w.stop { Stop::Count(n) => Some(n), _ => None },
                "warmup_s": w.warmup.as_secs_f64(), "repeat": args.repeat,
            },
            "fio": { "direct": p.direct, "median": fm, "runs": p.fio_runs },
            "tapdisk": { "median": tm, "runs": p.tapdisk_runs, "errors": errors },
            "ratio": {
                "iops": ratio(tm.iops, fm.iops), "mb_s": ratio(tm.mb_s, fm.mb_s),
                "p50": ratio(tm.p50_us, fm.p50_us), "p99": ratio(tm.p99_us, fm.p99_us),
            },
        });
        println!("{o}");
    } else {
        let title = if args.repeat > 1 {
            format!("median of {} runs", args.repeat)
        } else {
            "one run".into()
        };
        println!(
            "{} bs={} iodepth={} ({title})",
            w.rw.name(),
            td_cli::fmt_size(w.bs),
            w.iodepth
        );
        println!(
            "{:<10} {:>12} {:>12} {:>12}",
            "", "fio", "tapdisk", "tapdisk/fio"
        );
        for (name, a, b) in [
            ("IOPS", fm.iops, tm.iops),
            ("MB/s", fm.mb_s, tm.mb_s),
            ("p50 µs", fm.p50_us, tm.p50_us),
            ("p99 µs", fm.p99_us, tm.p99_us),
        ] {
            println!("{name:<10} {a:>12.1} {b:>12.1} {:>12.2}", ratio(b, a));
        }
    }
    if errors > 0 {
        eprintln!("td-bench: {errors} tapdisk requests failed");
    }
    Ok(errors == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json() {
        let out = r#"note: something fio says first
{"fio version":"fio-3.33","jobs":[{"jobname":"base","error":0,
 "mixed":{"iops":36677.3,"bw_bytes":150230313,
   "clat_ns":{"percentile":{"50.000000":21504,"99.000000":60160,"99.900000":142336}}}}]}"#;
        let f = parse_fio(out).unwrap();
        assert_eq!(f.iops, 36677.3);
        assert!((f.mb_s - 150.230313).abs() < 1e-9);
        assert_eq!((f.p50_us, f.p99_us, f.p999_us), (21.504, 60.16, 142.336));
        let split = r#"{"jobs":[{"error":0,
 "read":{"iops":100,"bw_bytes":1000000,"clat_ns":{"percentile":{"50.000000":1000}}},
 "write":{"iops":50,"bw_bytes":500000,"clat_ns":{"percentile":{"50.000000":3000}}}}]}"#;
        let f = parse_fio(split).unwrap();
        assert_eq!((f.iops, f.mb_s, f.p50_us), (150.0, 1.5, 1.0));
        assert!(parse_fio(r#"{"jobs":[{"error":5}]}"#)
            .unwrap_err()
            .to_string()
            .contains("error 5"));
        assert!(parse_fio("nothing").is_err());
    }

    #[test]
    fn medians_and_args() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
        let w = Workload {
            rw: bench::Rw::Randrw,
            bs: 4096,
            iodepth: 8,
            stop: Stop::Time(std::time::Duration::from_secs(3)),
            warmup: std::time::Duration::from_secs(1),
            rwmixread: 70,
            seed: 1,
        };
        let a = fio_args(&w, Path::new("/x.img"), false).join(" ");
        for want in [
            "--filename=/x.img",
            "--direct=0",
            "--rw=randrw",
            "--bs=4096",
            "--iodepth=8",
            "--rwmixread=70",
            "--runtime=3000ms",
            "--ramp_time=1000ms",
            "--time_based",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
    }
}
