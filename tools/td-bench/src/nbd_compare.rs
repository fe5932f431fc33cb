//! `td-bench nbd-compare`: the NBD export of a tapdisk against `qemu-nbd` serving the same
//! image, with fio's nbd engine as the client, alternating in one run.
//!
//! Each round runs the workload once against every server, in an order that rotates from round
//! to round (so neither side always runs first on a warm or cold cache); the medians of the
//! rounds are printed with each tapdisk's ratio to qemu-nbd. A tapdisk is driven through a
//! `tap-ctl` binary (`--tap-ctl`, repeatable), so two builds can be compared side by side; each
//! gets a private run directory and is destroyed after its round.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use td_cli::{fmt_size, parse_size};

use crate::bench::Rw;
use crate::compare::{median, parse_fio, Figures};
use crate::util::parse_duration;

/// The image format both servers open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A raw image (tapdisk `aio:`, qemu-nbd `-f raw`).
    Raw,
    /// A qcow2 image (tapdisk `qcow2:`, qemu-nbd `-f qcow2`).
    Qcow2,
}

impl Format {
    fn tapdisk_type(self) -> &'static str {
        match self {
            Format::Raw => "aio",
            Format::Qcow2 => "qcow2",
        }
    }

    fn qemu_name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// tapdisk's O_DIRECT policy for the run (qemu-nbd: `--cache=none` is O_DIRECT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Direct {
    /// O_DIRECT where the file system takes it.
    Auto,
    /// O_DIRECT.
    On,
    /// The page cache.
    Off,
}

/// Options of `td-bench nbd-compare`.
#[derive(Args, Clone, Debug)]
pub struct NbdCompareArgs {
    /// The image both servers open (created sparse with --size if it does not exist and the
    /// format is raw).
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// Size of a raw image td-bench creates.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Image format.
    #[arg(long, value_enum, default_value_t = Format::Raw)]
    pub format: Format,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,
    /// Bytes per IO.
    #[arg(long, value_name = "SIZE", default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// IOs in flight.
    #[arg(long, value_name = "D", default_value_t = 32)]
    pub iodepth: u32,
    /// Measure each run for this long.
    #[arg(long, value_name = "TIME", default_value = "10s", value_parser = parse_duration)]
    pub runtime: Duration,
    /// Run unmeasured for this long first.
    #[arg(long, value_name = "TIME", default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Rounds (each runs every server once); medians are reported.
    #[arg(long, value_name = "K", default_value_t = 3)]
    pub repeat: u32,
    /// A tap-ctl to serve the image with (its tapdisk is the one next to it); repeat to
    /// compare builds. Default: the tap-ctl next to td-bench.
    #[arg(long = "tap-ctl", value_name = "PATH")]
    pub tap_ctl: Vec<PathBuf>,
    /// A name for each --tap-ctl in the table (default: tapdisk, tapdisk2, ...).
    #[arg(long, value_name = "NAME")]
    pub label: Vec<String>,
    /// tapdisk's O_DIRECT policy (qemu-nbd runs with --cache=none, i.e. O_DIRECT).
    #[arg(long, value_enum, default_value_t = Direct::On)]
    pub direct: Direct,
    /// Extra tap-ctl create options for every tapdisk, e.g. "--no-merge".
    #[arg(long, value_name = "OPTS", allow_hyphen_values = true)]
    pub tap_opts: Option<String>,
    /// The fio binary.
    #[arg(long, value_name = "PATH", default_value = "fio")]
    pub fio: String,
    /// The qemu-nbd binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-nbd")]
    pub qemu_nbd: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One NBD server under test.
enum Server {
    Qemu,
    Tapdisk { tap_ctl: PathBuf, label: String },
}

impl Server {
    fn name(&self) -> &str {
        match self {
            Server::Qemu => "qemu-nbd",
            Server::Tapdisk { label, .. } => label,
        }
    }
}

/// A running server: how to reach it and how to stop it.
enum Running {
    Qemu(Child),
    Tapdisk { tap_ctl: PathBuf, rundir: PathBuf },
}

fn wait_for_socket(sock: &Path, child: &mut Option<&mut Child>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Some(c) = child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("the server exited before listening ({st})");
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not appear within 20 s", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn start(a: &NbdCompareArgs, s: &Server, dir: &Path, sock: &Path) -> Result<Running> {
    let _ = std::fs::remove_file(sock);
    match s {
        Server::Qemu => {
            let mut c = Command::new(&a.qemu_nbd)
                .args([
                    "--cache=none",
                    "--aio=io_uring",
                    "--persistent",
                    "--shared=64",
                    "-x",
                    "tapdev0",
                ])
                .arg(format!("--format={}", a.format.qemu_name()))
                .arg(format!("--socket={}", sock.display()))
                .arg(&a.image)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("cannot run {} (Debian: qemu-utils)", a.qemu_nbd))?;
            wait_for_socket(sock, &mut Some(&mut c))?;
            Ok(Running::Qemu(c))
        }
        Server::Tapdisk { tap_ctl, .. } => {
            let rundir = dir.join("run");
            let direct = match a.direct {
                Direct::Auto => "auto",
                Direct::On => "on",
                Direct::Off => "off",
            };
            let mut c = Command::new(tap_ctl);
            c.arg("--rundir")
                .arg(&rundir)
                .arg("create")
                .arg("-a")
                .arg(format!("{}:{}", a.format.tapdisk_type(), a.image.display()))
                .arg("--nbd")
                .arg(format!("unix:{}", sock.display()))
                .arg("--direct")
                .arg(direct);
            if let Some(o) = &a.tap_opts {
                c.args(o.split_whitespace());
            }
            let out = c
                .output()
                .with_context(|| format!("cannot run {}", tap_ctl.display()))?;
            if !out.status.success() {
                bail!(
                    "{} create failed: {}",
                    tap_ctl.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            wait_for_socket(sock, &mut None)?;
            Ok(Running::Tapdisk {
                tap_ctl: tap_ctl.clone(),
                rundir,
            })
        }
    }
}

fn stop(r: Running) -> Result<()> {
    match r {
        Running::Qemu(mut c) => {
            let _ = c.kill();
            c.wait()?;
        }
        Running::Tapdisk { tap_ctl, rundir } => {
            let st = Command::new(&tap_ctl)
                .arg("--rundir")
                .arg(&rundir)
                .args(["destroy", "-m", "0"])
                .status()
                .with_context(|| format!("cannot run {}", tap_ctl.display()))?;
            if !st.success() {
                bail!("{} destroy failed ({st})", tap_ctl.display());
            }
        }
    }
    Ok(())
}

fn fio_run(a: &NbdCompareArgs, sock: &Path) -> Result<Figures> {
    let out = Command::new(&a.fio)
        .arg("--name=nbd")
        .arg("--ioengine=nbd")
        .arg(format!(
            "--uri=nbd+unix:///tapdev0?socket={}",
            sock.display()
        ))
        .arg(format!("--rw={}", a.rw.name()))
        .arg(format!("--bs={}", a.bs))
        .arg(format!("--iodepth={}", a.iodepth))
        .arg(format!("--runtime={}ms", a.runtime.as_millis()))
        .arg(format!("--ramp_time={}ms", a.warmup.as_millis()))
        .args([
            "--time_based",
            "--norandommap",
            "--randrepeat=0",
            "--unified_rw_reporting=mixed",
            "--output-format=json",
        ])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} (Debian: fio)", a.fio))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fio failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_fio(&stdout)
}

fn prepare_image(a: &NbdCompareArgs) -> Result<()> {
    if a.image.exists() {
        return Ok(());
    }
    if a.format != Format::Raw {
        bail!(
            "{} does not exist (td-bench creates raw images only)",
            a.image.display()
        );
    }
    std::fs::File::create(&a.image)
        .and_then(|f| f.set_len(a.size))
        .with_context(|| format!("creating {}", a.image.display()))
}

/// A private folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("td-nbd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `td-bench nbd-compare`.
pub fn run(a: &NbdCompareArgs) -> Result<()> {
    if a.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    prepare_image(a)?;
    let mut servers = vec![Server::Qemu];
    let tap_ctls = if a.tap_ctl.is_empty() {
        let exe = std::env::current_exe()?;
        vec![exe
            .parent()
            .ok_or_else(|| anyhow!("td-bench has no folder"))?
            .join("tap-ctl")]
    } else {
        a.tap_ctl.clone()
    };
    for (i, t) in tap_ctls.iter().enumerate() {
        let label = a.label.get(i).cloned().unwrap_or_else(|| match i {
            0 => "tapdisk".into(),
            n => format!("tapdisk{}", n + 1),
        });
        servers.push(Server::Tapdisk {
            tap_ctl: t.clone(),
            label,
        });
    }
    let dir = TempDir::new()?;
    let sock = dir.0.join("nbd.sock");
    let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); servers.len()];
    for round in 0..a.repeat as usize {
        for k in 0..servers.len() {
            let i = (k + round) % servers.len();
            let r = start(a, &servers[i], &dir.0, &sock)
                .with_context(|| format!("starting {}", servers[i].name()))?;
            let f = fio_run(a, &sock);
            stop(r)?;
            let f = f.with_context(|| format!("fio against {}", servers[i].name()))?;
            if !a.json {
                eprintln!(
                    "round {}: {:<10} {:>10.0} IOPS {:>9.1} MB/s p50 {:.1} µs",
                    round + 1,
                    servers[i].name(),
                    f.iops,
                    f.mb_s,
                    f.p50_us
                );
            }
            runs[i].push(f);
        }
    }
    let med: Vec<(f64, f64, f64)> = runs
        .iter()
        .map(|r| {
            (
                median(r.iter().map(|f| f.iops).collect()),
                median(r.iter().map(|f| f.mb_s).collect()),
                median(r.iter().map(|f| f.p50_us).collect()),
            )
        })
        .collect();
    let base = med[0].0.max(f64::MIN_POSITIVE);
    let what = format!(
        "{} bs={} iodepth={} on {} ({}), {} rounds of {:?}",
        a.rw.name(),
        fmt_size(a.bs),
        a.iodepth,
        a.image.display(),
        a.format.qemu_name(),
        a.repeat,
        a.runtime
    );
    if a.json {
        let rows: Vec<serde_json::Value> = servers
            .iter()
            .zip(&med)
            .map(|(s, m)| {
                serde_json::json!({"server": s.name(), "iops": m.0, "mb_s": m.1,
                                   "p50_us": m.2, "ratio": m.0 / base})
            })
            .collect();
        println!("{}", serde_json::json!({"workload": what, "medians": rows}));
    } else {
        println!("td-bench nbd-compare: {what}; medians:");
        println!(
            "{:<12} {:>10} {:>9} {:>9} {:>14}",
            "server", "IOPS", "MB/s", "p50 µs", "vs qemu-nbd"
        );
        for (s, m) in servers.iter().zip(&med) {
            println!(
                "{:<12} {:>10.0} {:>9.1} {:>9.1} {:>13.2}x",
                s.name(),
                m.0,
                m.1,
                m.2,
                m.0 / base
            );
        }
    }
    Ok(())
}
