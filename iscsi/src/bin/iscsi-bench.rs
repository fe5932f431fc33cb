//! iscsi-bench: our initiator against libiscsi (the initiator QEMU uses), side by side, in one
//! run, against the same target.
//!
//! By default it starts a private `tgtd` on loopback with a file LUN in /dev/shm, compiles
//! `tests/storage-lan/iscsi-rw.c` (embedded in this binary) against libiscsi with gcc, and for
//! each workload runs iscsi-rw and then our initiator for the same time, `--repeat` times
//! (alternating which goes first), printing medians and the ratio ours/libiscsi.
//!
//! Both initiators move data through one buffer per request slot (queue depth buffers), as a
//! disk backend does with guest memory: iscsi-rw runs with `-i`, handing libiscsi each read's
//! buffer with `scsi_task_set_iov_in` as QEMU's block/iscsi.c does. `--libiscsi-own-buffers`
//! lets libiscsi allocate (and free) each read's data instead, so its copies land in memory
//! still warm in the cache, and its writes share one buffer.

use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use iscsi::lab::{Tgtd, TgtdOptions};
use iscsi::{scsi, Client, Command, Config, Drive, Session, SubmitError, Url};

const ISCSI_RW_C: &str = include_str!("../../../tests/storage-lan/iscsi-rw.c");

/// Measure this crate's iSCSI initiator against libiscsi's iscsi-rw on the same target.
///
/// Workloads: 512 KiB sequential read, 512 KiB sequential write, 4 KiB random read at QD 32.
/// Needs tgt (tgtd, tgtadm), gcc and libiscsi-dev unless --url and --iscsi-rw are given.
#[derive(Parser, Debug)]
#[command(name = "iscsi-bench", version)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    runtime: u64,
    /// Measurements per workload and initiator (medians are printed).
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Queue depth of the 512 KiB sequential workloads.
    #[arg(long, default_value_t = 8)]
    seq_qd: u32,
    /// Queue depth of the 4 KiB random read workload.
    #[arg(long, default_value_t = 32)]
    rand_qd: u32,
    /// LUN size of the private target, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Use this target (iscsi://host:port/iqn/lun) instead of starting a private tgtd.
    #[arg(long)]
    url: Option<String>,
    /// Use this iscsi-rw binary instead of compiling one.
    #[arg(long)]
    iscsi_rw: Option<PathBuf>,
    /// Measure only our initiator (for profiling); no libiscsi, no ratios.
    #[arg(long)]
    ours_only: bool,
    /// Only these workloads (seq-read, seq-write, rand-read); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Which thread drives our connection: `inline` (the benchmark's own thread, as a
    /// single-threaded event loop like iscsi-rw) or `thread` (the session's IO thread).
    #[arg(long, default_value = "inline", value_parser = parse_drive)]
    drive: Drive,
    /// Run iscsi-rw without `-i`: libiscsi allocates each read's data itself (freed at once,
    /// so the next read reuses cache-warm memory) and all writes send one shared buffer.
    #[arg(long)]
    libiscsi_own_buffers: bool,
}

fn parse_drive(s: &str) -> std::result::Result<Drive, String> {
    match s {
        "inline" => Ok(Drive::Inline),
        "thread" => Ok(Drive::Thread),
        _ => Err(format!("'{s}' is not inline or thread")),
    }
}

struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    bs: u32,
    qd: u32,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    mbps: f64,
    iops: f64,
    /// CPU time (user + system, all threads) per IO, in microseconds.
    cpu_us: f64,
}

/// User + system CPU seconds of this process (`RUSAGE_SELF`) or its waited-for children.
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: all-zero is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass.
    unsafe {
        libc::getrusage(who, &mut ru);
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("iscsi-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<()> {
    let workdir = std::env::temp_dir().join(format!("iscsi-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir)?;
    let r = bench(&a, &workdir);
    let _ = std::fs::remove_dir_all(&workdir);
    r
}

fn bench(a: &Args, workdir: &Path) -> Result<()> {
    let rw = match &a.iscsi_rw {
        Some(p) => p.clone(),
        None if a.ours_only => PathBuf::new(),
        None => compile_iscsi_rw(workdir)?,
    };
    let mut _tgtd = None;
    let url: Url = match &a.url {
        Some(u) => u.parse()?,
        None => {
            if !Tgtd::available() {
                bail!("tgtd is not installed (apt-get install tgt), or give --url");
            }
            let t = Tgtd::start(TgtdOptions {
                size: a.size_mib << 20,
                preallocate: true,
                ..Default::default()
            })
            .context("starting a private tgtd")?;
            let u = t.url().parse()?;
            _tgtd = Some(t);
            u
        }
    };
    let url_s = a
        .url
        .clone()
        .unwrap_or_else(|| format!("iscsi://{}/{}/{}", url.portal, url.target, url.lun));
    let mut cfg = Config::new(url.portal.clone(), url.target.clone());
    cfg.chap = url.chap.clone();
    cfg.drive = a.drive;
    let (blocks, bsz) = {
        let mut c = Client::connect(&cfg, url.lun)?;
        let cap = c.read_capacity16()?;
        c.close();
        (cap.blocks, cap.block_size)
    };
    println!(
        "iscsi-bench: {url_s}: {} MiB, {bsz}-byte blocks; {} s per run, {} runs each (median); ours driven {}; libiscsi {}",
        (blocks * u64::from(bsz)) >> 20,
        a.runtime,
        a.repeat,
        if a.drive == Drive::Inline { "inline" } else { "by its IO thread" },
        if a.libiscsi_own_buffers {
            "allocating its own read buffers"
        } else {
            "into a buffer per request slot"
        }
    );
    let all = [
        Workload {
            name: "seq-read",
            write: false,
            random: false,
            bs: 512 * 1024,
            qd: a.seq_qd,
        },
        Workload {
            name: "seq-write",
            write: true,
            random: false,
            bs: 512 * 1024,
            qd: a.seq_qd,
        },
        Workload {
            name: "rand-read",
            write: false,
            random: true,
            bs: 4096,
            qd: a.rand_qd,
        },
    ];
    println!(
        "{:<26} {:>13} {:>10} {:>6} {:>13} {:>10} {:>15} {:>12}",
        "workload",
        "libiscsi MB/s",
        "ours MB/s",
        "ratio",
        "libiscsi IOPS",
        "ours IOPS",
        "libiscsi CPU/IO",
        "ours CPU/IO"
    );
    for w in all
        .iter()
        .filter(|w| a.only.is_empty() || a.only.iter().any(|o| o == w.name))
    {
        let mut theirs = Vec::new();
        let mut ours = Vec::new();
        for k in 0..a.repeat.max(1) {
            if a.ours_only {
                ours.push(run_ours(&cfg, url.lun, w, a.runtime, blocks, bsz)?);
                theirs.push(Sample {
                    mbps: f64::NAN,
                    iops: f64::NAN,
                    cpu_us: f64::NAN,
                });
            } else {
                let slots = !a.libiscsi_own_buffers;
                // Alternating which goes first.
                if k % 2 == 1 {
                    ours.push(run_ours(&cfg, url.lun, w, a.runtime, blocks, bsz)?);
                }
                theirs.push(run_libiscsi(&rw, &url_s, w, a.runtime, slots)?);
                if k % 2 == 0 {
                    ours.push(run_ours(&cfg, url.lun, w, a.runtime, blocks, bsz)?);
                }
            }
        }
        let t = median(&theirs);
        let o = median(&ours);
        let label = format!("{} bs={}k qd={}", w.name, w.bs / 1024, w.qd);
        println!(
            "{:<26} {:>13.1} {:>10.1} {:>6.2} {:>13.0} {:>10.0} {:>13.1}µs {:>10.1}µs",
            label,
            t.mbps,
            o.mbps,
            o.mbps / t.mbps,
            t.iops,
            o.iops,
            t.cpu_us,
            o.cpu_us
        );
    }
    Ok(())
}

fn median(v: &[Sample]) -> Sample {
    let mut m: Vec<f64> = v.iter().map(|s| s.mbps).collect();
    let mut i: Vec<f64> = v.iter().map(|s| s.iops).collect();
    let mut c: Vec<f64> = v.iter().map(|s| s.cpu_us).collect();
    m.sort_by(f64::total_cmp);
    i.sort_by(f64::total_cmp);
    c.sort_by(f64::total_cmp);
    let mid = |x: &[f64]| {
        let n = x.len();
        if n % 2 == 1 {
            x[n / 2]
        } else {
            (x[n / 2 - 1] + x[n / 2]) / 2.0
        }
    };
    Sample {
        mbps: mid(&m),
        iops: mid(&i),
        cpu_us: mid(&c),
    }
}

fn compile_iscsi_rw(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("iscsi-rw.c");
    let bin = dir.join("iscsi-rw");
    std::fs::write(&src, ISCSI_RW_C)?;
    let out = Proc::new("gcc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .arg("-liscsi")
        .output()
        .context("running gcc (apt-get install gcc)")?;
    if !out.status.success() {
        bail!(
            "compiling iscsi-rw failed (apt-get install libiscsi-dev): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(bin)
}

fn run_libiscsi(rw: &Path, url: &str, w: &Workload, secs: u64, slots: bool) -> Result<Sample> {
    let mut cmd = Proc::new(rw);
    if slots {
        cmd.arg("-i");
    }
    if w.write {
        cmd.arg("-w");
    }
    if w.random {
        cmd.arg("-R");
    }
    cmd.args([
        "-b",
        &w.bs.to_string(),
        "-q",
        &w.qd.to_string(),
        "-t",
        &secs.to_string(),
        url,
    ]);
    let cpu0 = cpu_seconds(libc::RUSAGE_CHILDREN);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", rw.display()))?;
    let cpu = cpu_seconds(libc::RUSAGE_CHILDREN) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "iscsi-rw failed: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // TOTAL read seq bs=524288 qd=8/tgt ntgt=1: 1234.5 MB/s 2345 IOPS in 5.0s errors=0
    let line = text
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .context("iscsi-rw printed no TOTAL line")?;
    let after = line.split_once(": ").map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let mbps: f64 = f
        .first()
        .and_then(|x| x.parse().ok())
        .context("parsing MB/s")?;
    let iops: f64 = f
        .get(2)
        .and_then(|x| x.parse().ok())
        .context("parsing IOPS")?;
    Ok(Sample {
        mbps,
        iops,
        cpu_us: cpu * 1e6 / (iops * secs as f64).max(1.0),
    })
}

fn run_ours(
    cfg: &Config,
    lun: u16,
    w: &Workload,
    secs: u64,
    blocks: u64,
    bsz: u32,
) -> Result<Sample> {
    let mut cfg = cfg.clone();
    cfg.queue_depth = w.qd as u16;
    let mut s = Session::connect(&cfg)?;
    let inline = cfg.drive == Drive::Inline;
    let qd = w.qd as usize;
    let nb = w.bs / bsz;
    // One page-aligned buffer per request slot, as a backend's guest pages are (and as
    // iscsi-rw's aligned_alloc buffers are).
    let bs = w.bs as usize;
    let mut arena = vec![0x5au8; qd * bs + 4096];
    let start = arena.as_ptr().align_offset(4096);
    let iovs: Vec<libc::iovec> = arena[start..start + qd * bs]
        .chunks_exact_mut(bs)
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut next_lba = 0u64;
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id());
    let mut lba_for = |_: ()| -> u64 {
        if w.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % (blocks / u64::from(nb))) * u64::from(nb)
        } else {
            let l = next_lba;
            next_lba += u64::from(nb);
            if next_lba + u64::from(nb) > blocks {
                next_lba = 0;
            }
            l
        }
    };
    let make = |tag: usize, lba: u64| {
        if w.write {
            Command::write(
                tag as u32,
                lun,
                scsi::write16(lba, nb, false),
                w.bs,
                &iovs[tag],
                1,
            )
        } else {
            Command::read(tag as u32, lun, scsi::read16(lba, nb), w.bs, &iovs[tag], 1)
        }
    };
    let submit = |s: &Session, c: Command| -> Result<()> {
        // SAFETY: `arena`/`iovs` outlive the session (dropped at the end of this function,
        // after every completion has been popped or the session is closed).
        match unsafe { s.submit_quiet(c) } {
            Ok(()) => Ok(()),
            Err(SubmitError::Full) => bail!("submission queue full"),
            Err(SubmitError::Invalid(e)) => Err(e.into()),
        }
    };
    for tag in 0..qd {
        submit(&s, make(tag, lba_for(())))?;
    }
    s.send();
    let start = Instant::now();
    let cpu0 = cpu_seconds(libc::RUSAGE_SELF);
    let end = start + Duration::from_secs(secs);
    let mut done = 0u64;
    let mut inflight = qd;
    let mut stopping = false;
    while inflight > 0 {
        if !stopping && Instant::now() >= end {
            stopping = true;
        }
        let mut any = false;
        while let Some(c) = s.pop_completion() {
            any = true;
            if let Err(e) = c.result {
                bail!("IO error: {e}");
            }
            done += 1;
            if stopping {
                inflight -= 1;
            } else {
                submit(&s, make(c.tag as usize, lba_for(())))?;
            }
        }
        if any {
            s.send();
        } else if inline {
            let mut p = libc::pollfd {
                fd: s.poll_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack.
            unsafe { libc::poll(&mut p, 1, 100) };
            s.drive();
        } else {
            // Sleeps only when armed with nothing queued; a busy stream costs no syscalls.
            s.wait_completion_fd(Some(Duration::from_millis(100)));
            s.clear_completion_fd();
        }
    }
    let el = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(libc::RUSAGE_SELF) - cpu0;
    s.close();
    drop(arena);
    Ok(Sample {
        mbps: done as f64 * f64::from(w.bs) / el / 1e6,
        iops: done as f64 / el,
        cpu_us: cpu * 1e6 / (done as f64).max(1.0),
    })
}
