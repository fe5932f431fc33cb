//! `td-bench soak`: one private tapdisk under a long mixed load on two disks at once, every byte
//! checked, its memory watched.
//!
//! Disk 1 is driven through the local ring by `td-bench verify` (reads, writes, flushes and
//! discards of random sizes, direct and indirect, a full ring of them in flight, every read
//! compared with a shadow of the disk). Disk 2 is served by the same tapdisk over its NBD export
//! and driven by fio's `nbd` engine (random writes of 4 KiB to 256 KiB with a CRC32C header,
//! read back and checked while the run goes on, `verify_backlog`). The tapdisk's resident set
//! is sampled every second; the figure at the end is compared with the one after the warm-up
//! (buffers and caches reach their size in the first seconds, so the very first sample says
//! little about a leak).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser};
use tapdisk_control::{limits, Driver, ImageSpec, NbdListen, VbdSettings};
use td_cli::{fmt_bytes, fmt_size, parse_size};

use crate::target::Target;
use crate::util::{parse_duration, parse_seed};
use crate::verify::{self, VerifyArgs};

/// Options of `td-bench soak`.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// How long to run.
    #[arg(long, value_name = "TIME", default_value = "10m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Size of each of the two temporary images.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub size: u64,
    /// Ring order of the local ring: 2^order pages; 4 gives 512 requests in flight.
    #[arg(long, value_name = "ORDER", default_value_t = 4,
          value_parser = |s: &str| limits::MAX_RING_ORDER.parse::<u8>(s))]
    pub ring_order: u8,
    /// Segments per indirect request on the ring (0: direct requests only).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub indirect_segments: u16,
    /// fio's queue depth on the NBD export.
    #[arg(long, value_name = "D", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub nbd_iodepth: u32,
    /// Memory is compared from this point on (the first sample is printed too).
    #[arg(long, value_name = "TIME", default_value = "30s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Largest growth after the warm-up that passes, in percent, of the tapdisk's resident set
    /// and of its private part (each checked).
    #[arg(long, value_name = "PCT", default_value_t = 5.0)]
    pub max_rss_growth: f64,
    /// Seed of the ring's workload [default: random, printed].
    #[arg(long, value_parser = parse_seed)]
    pub seed: Option<u64>,
    /// fio binary (needs the nbd engine: Debian's fio has it).
    #[arg(long, value_name = "PATH", default_value = "fio")]
    pub fio: String,
}

/// `td-bench verify` options for the ring side, parsed as an operator would type them so that
/// every other setting keeps verify's default.
fn verify_args(a: &SoakArgs) -> Result<VerifyArgs> {
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        v: VerifyArgs,
    }
    let mut argv = vec![
        "verify".to_owned(),
        format!("--duration={}ms", a.duration.as_millis()),
        format!("--size={}", a.size),
        format!("--ring-order={}", a.ring_order),
        format!("--indirect-segments={}", a.indirect_segments),
    ];
    if let Some(s) = a.seed {
        argv.push(format!("--seed={s}"));
    }
    Ok(Wrap::try_parse_from(argv)
        .map_err(|e| anyhow!("internal error: soak's verify options: {e}"))?
        .v)
}

/// Memory of a process in KiB: `(VmRSS, RssAnon)`, all it has resident and its private part
/// (heap, stacks; not the frontend's shared pages it has touched, nor mapped files).
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

/// What the memory sampler saw, in KiB: `(VmRSS, RssAnon)` pairs.
#[derive(Clone, Copy, Debug, Default)]
struct Rss {
    first: (u64, u64),
    after_warmup: (u64, u64),
    peak: (u64, u64),
    last: (u64, u64),
}

/// Samples the tapdisk's memory five times a second until told to stop.
fn sampler(pid: u32, warmup: Duration, stop: Arc<AtomicBool>) -> JoinHandle<Result<Rss>> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let first = rss_kib(pid)?;
        let mut r = Rss {
            first,
            after_warmup: (0, 0),
            peak: first,
            last: first,
        };
        let mut warm = false;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let now = rss_kib(pid)?;
            r.peak = (r.peak.0.max(now.0), r.peak.1.max(now.1));
            r.last = now;
            if !warm && start.elapsed() >= warmup {
                r.after_warmup = now;
                warm = true;
            }
        }
        if !warm {
            r.after_warmup = r.last;
        }
        Ok(r)
    })
}

/// fio's view of the NBD side.
#[derive(Debug, Default)]
struct FioResult {
    writes: u64,
    reads: u64,
    error: i64,
    written: u64,
}

/// fio runs in `dir`, the soak's temporary directory: it leaves its verify state
/// (`local-soak-nbd-0-verify.state`) in its working directory, which is not the caller's.
fn fio_command(a: &SoakArgs, dir: &Path, sock: &Path, out: &Path) -> Command {
    let mut c = Command::new(&a.fio);
    c.current_dir(dir)
        .arg("--name=soak-nbd")
        .arg("--ioengine=nbd")
        .arg(format!("--uri=nbd+unix:///?socket={}", sock.display()))
        .arg("--rw=randwrite")
        .arg("--bsrange=4k-256k")
        .arg(format!("--iodepth={}", a.nbd_iodepth))
        .arg(format!("--size={}", a.size))
        .arg("--time_based")
        .arg(format!("--runtime={}", a.duration.as_secs().max(1)))
        .arg("--verify=crc32c")
        .arg("--verify_backlog=1024")
        .arg("--verify_fatal=1")
        .arg("--output-format=json")
        .arg(format!("--output={}", out.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn fio_result(path: &Path) -> Result<FioResult> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // fio may print notes before the JSON object.
    let json = &text[text.find('{').unwrap_or(0)..];
    let v: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("parsing fio's {}", path.display()))?;
    let job = &v["jobs"][0];
    let n = |k: &str, f: &str| job[k][f].as_u64().unwrap_or(0);
    Ok(FioResult {
        writes: n("write", "total_ios"),
        reads: n("read", "total_ios"),
        error: job["error"].as_i64().unwrap_or(-1),
        written: n("write", "io_bytes"),
    })
}

/// The NBD side: its image, the export, fio.
struct NbdSide {
    fio: Child,
    out: PathBuf,
}

fn start_nbd(a: &SoakArgs, t: &Target) -> Result<NbdSide> {
    let dir = t
        .private_dir()
        .ok_or_else(|| anyhow!("soak needs a private tapdisk"))?;
    let img = dir.join("nbd.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(a.size))
        .with_context(|| format!("creating {}", img.display()))?;
    let sock = dir.join("nbd.sock");
    let vbd = t.open_more(
        ImageSpec::new(Driver::Aio, img.clone()),
        VbdSettings {
            nbd: Some(NbdListen::Unix(sock.clone())),
            ..VbdSettings::default()
        },
    )?;
    eprintln!(
        "td-bench soak: NBD side: {} ({}) exported at {}, fio randwrite 4k-256k iodepth {} with \
         crc32c verify_backlog",
        vbd.image,
        fmt_size(a.size),
        sock.display(),
        a.nbd_iodepth
    );
    let out = dir.join("fio.json");
    let fio = fio_command(a, dir, &sock, &out)
        .spawn()
        .with_context(|| format!("running {} (Debian: apt-get install fio)", a.fio))?;
    Ok(NbdSide { fio, out })
}

/// Waits for fio (it stops at its runtime; a minute more for its last checks).
fn finish_nbd(side: &mut NbdSide) -> Result<(FioResult, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if side.fio.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = side.fio.kill();
            bail!("fio did not finish within 60 s of its runtime");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut err = String::new();
    if let Some(mut e) = side.fio.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    let status = side.fio.wait()?;
    let r = fio_result(&side.out).with_context(|| format!("fio exited with {status}: {err}"))?;
    Ok((r, err))
}

/// Runs `td-bench soak`. Returns whether it passed.
pub fn run(a: &SoakArgs) -> Result<bool> {
    if a.warmup >= a.duration {
        bail!("--warmup must be shorter than --duration");
    }
    let v = verify_args(a)?;
    let stop = Arc::new(AtomicBool::new(false));
    // Set up by the first hook, collected by the second (both run on this thread).
    let nbd: RefCell<Option<NbdSide>> = RefCell::new(None);
    let sampling: RefCell<Option<JoinHandle<Result<Rss>>>> = RefCell::new(None);
    let mut ended: Option<Result<(FioResult, String)>> = None;
    let mut rss = Rss::default();
    let started = Instant::now();
    let ring_ok = verify::run_with_hooks(
        &v,
        |t| {
            let pid = t
                .tapdisk_pid()
                .ok_or_else(|| anyhow!("soak needs a private tapdisk"))?;
            *nbd.borrow_mut() = Some(start_nbd(a, t)?);
            *sampling.borrow_mut() = Some(sampler(pid, a.warmup, stop.clone()));
            Ok(())
        },
        |_| {
            // The ring side is done; the tapdisk stays up until fio is, then memory is read.
            if let Some(side) = nbd.borrow_mut().as_mut() {
                ended = Some(finish_nbd(side));
            }
            stop.store(true, Ordering::Relaxed);
            if let Some(h) = sampling.borrow_mut().take() {
                rss = h
                    .join()
                    .map_err(|_| anyhow!("the memory sampler panicked"))??;
            }
            Ok(())
        },
    );
    stop.store(true, Ordering::Relaxed);
    if let (Err(_), Some(side)) = (&ring_ok, nbd.borrow_mut().as_mut()) {
        let _ = side.fio.kill();
    }
    let ring_ok = ring_ok?;
    let (fio, fio_err) = ended.ok_or_else(|| anyhow!("the NBD side never started"))??;
    let growth = |a: u64, b: u64| (b as f64 - a as f64) * 100.0 / (a.max(1)) as f64;
    let total = growth(rss.after_warmup.0, rss.last.0);
    let private = growth(rss.after_warmup.1, rss.last.1);
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "soak: {:.0} s; NBD side (fio): {} writes ({}), {} verifying reads, error {}",
        started.elapsed().as_secs_f64(),
        fio.writes,
        fmt_bytes(fio.written),
        fio.reads,
        fio.error
    );
    for (what, pick, g) in [("RSS", 0, total), ("private (RssAnon)", 1, private)] {
        let at = |p: (u64, u64)| mib(if pick == 0 { p.0 } else { p.1 });
        println!(
            "soak: tapdisk {what}: {:.1} MiB at start, {:.1} MiB after the {:.0} s warm-up, \
             {:.1} MiB at the end ({g:+.2} %), peak {:.1} MiB",
            at(rss.first),
            at(rss.after_warmup),
            a.warmup.as_secs_f64(),
            at(rss.last),
            at(rss.peak)
        );
    }
    let mut ok = ring_ok;
    if fio.error != 0 {
        eprintln!(
            "td-bench soak: FAIL fio reported error {}: {fio_err}",
            fio.error
        );
        ok = false;
    }
    if fio.writes == 0 || fio.reads == 0 {
        eprintln!("td-bench soak: FAIL fio did no checked IO on the NBD export: {fio_err}");
        ok = false;
    }
    for (what, g) in [("resident set", total), ("private memory", private)] {
        if g > a.max_rss_growth {
            eprintln!(
                "td-bench soak: FAIL the tapdisk's {what} grew {g:.2} % after the warm-up \
                 (limit {} %)",
                a.max_rss_growth
            );
            ok = false;
        }
    }
    println!("soak: {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_options_follow_the_soak_options() {
        let a = SoakArgs {
            duration: Duration::from_secs(90),
            size: 64 << 20,
            ring_order: 3,
            indirect_segments: 16,
            nbd_iodepth: 8,
            warmup: Duration::from_secs(5),
            max_rss_growth: 5.0,
            seed: Some(7),
            fio: "fio".into(),
        };
        let v = verify_args(&a).unwrap();
        assert_eq!(v.duration, Some(Duration::from_secs(90)));
        assert_eq!(v.target.ring_order, 3);
        assert_eq!(v.target.indirect_segments, 16);
        assert_eq!(v.target.size, Some(64 << 20));
        assert_eq!(v.seed, Some(7));
    }

    #[test]
    fn fio_json_is_read_after_notes() {
        let dir = std::env::temp_dir().join(format!("soak-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("fio.json");
        std::fs::write(
            &p,
            r#"note: both iodepth and ... set
{"jobs":[{"error":0,"read":{"total_ios":5},"write":{"total_ios":9,"io_bytes":36864}}]}"#,
        )
        .unwrap();
        let r = fio_result(&p).unwrap();
        assert_eq!((r.reads, r.writes, r.written, r.error), (5, 9, 36864, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fio_runs_in_the_soak_directory() {
        let a = SoakArgs {
            duration: Duration::from_secs(90),
            size: 64 << 20,
            ring_order: 3,
            indirect_segments: 16,
            nbd_iodepth: 8,
            warmup: Duration::from_secs(5),
            max_rss_growth: 5.0,
            seed: None,
            fio: "fio".into(),
        };
        let dir = Path::new("/tmp/td-bench-1-0");
        let c = fio_command(&a, dir, &dir.join("nbd.sock"), &dir.join("fio.json"));
        assert_eq!(c.get_current_dir(), Some(dir));
    }

    #[test]
    fn rss_of_this_process_is_read() {
        let (all, private) = rss_kib(std::process::id()).unwrap();
        assert!(all >= private && private > 0);
    }
}
