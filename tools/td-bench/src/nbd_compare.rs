//! `td-bench nbd-compare`: the NBD export of a tapdisk against `qemu-nbd` serving the same
//! image, with fio's nbd engine as the client, alternating in one run.
//!
//! Each round runs the workload once against every server, in an order that rotates from round
//! to round (so neither side always runs first on a warm or cold cache); the medians of the
//! rounds are printed with each tapdisk's ratio to qemu-nbd. A tapdisk is driven through a
//! `tap-ctl` binary (`--tap-ctl`, repeatable), so two builds can be compared side by side; each
//! gets a private run directory and is destroyed after its round.
//!
//! Both servers open the same file, raw or qcow2 (`--image qcow2:FILE` or `--format qcow2`).
//! With `--fresh` every run gets a new image (`qemu-img create`, so both sides start from an
//! image QEMU made), and with `--once-per SIZE` each IO goes to its own SIZE-aligned block,
//! none twice: `--fresh --rw randwrite --once-per 64k` measures writes that each allocate a
//! new 64 KiB qcow2 cluster.

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
    /// The image both servers open: FILE, or a disk spec aio:FILE or qcow2:FILE (the spec's
    /// type is the format). Created with --size if it does not exist.
    #[arg(long, value_name = "FILE|SPEC")]
    pub image: PathBuf,
    /// Size of an image td-bench creates (a raw one is written in full, unless --fresh: a
    /// sparse image would let qemu-nbd answer reads with holes).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Image format (default: the --image spec's type, else raw).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Cluster size of a qcow2 image td-bench creates.
    #[arg(long, value_name = "SIZE", default_value = "64k", value_parser = parse_size)]
    pub cluster_size: u64,
    /// A new image before every run (raw: sparse; qcow2: `qemu-img create`), removed after
    /// it: runs that allocate start from the same empty image on every side.
    #[arg(long)]
    pub fresh: bool,
    /// Each IO at its own SIZE-aligned block, none twice (fio `--blockalign` with a random
    /// map; a run ends at --runtime or when every block was done once). With --fresh and
    /// a random write pattern, every IO allocates a new cluster of that size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub once_per: Option<u64>,
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

fn start(a: &Setup, s: &Server, dir: &Path, sock: &Path) -> Result<Running> {
    let _ = std::fs::remove_file(sock);
    match s {
        Server::Qemu => {
            let mut c = Command::new(&a.args.qemu_nbd)
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
                .arg(&a.path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("cannot run {} (Debian: qemu-utils)", a.args.qemu_nbd))?;
            wait_for_socket(sock, &mut Some(&mut c))?;
            Ok(Running::Qemu(c))
        }
        Server::Tapdisk { tap_ctl, .. } => {
            let (format, path, a) = (a.format, &a.path, a.args);
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
                .arg(format!("{}:{}", format.tapdisk_type(), path.display()))
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
    let mut c = Command::new(&a.fio);
    c.arg("--name=nbd")
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
            "--randrepeat=0",
            "--unified_rw_reporting=mixed",
            "--output-format=json",
        ]);
    match a.once_per {
        // A random map: no block twice, and the run ends when every block was done.
        Some(b) => c.arg(format!("--blockalign={b}")),
        None => c.args(["--time_based", "--norandommap"]),
    };
    let out = c
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

/// What both servers open: the file and its format.
struct Setup<'a> {
    args: &'a NbdCompareArgs,
    path: PathBuf,
    format: Format,
}

impl<'a> Setup<'a> {
    /// Splits `--image` into a format and a file (`aio:FILE`, `qcow2:FILE` or `FILE`).
    fn new(args: &'a NbdCompareArgs) -> Result<Setup<'a>> {
        let s = args.image.to_string_lossy();
        let (typed, path) = match s.split_once(':') {
            Some(("aio", p)) => (Some(Format::Raw), PathBuf::from(p)),
            Some(("qcow2", p)) => (Some(Format::Qcow2), PathBuf::from(p)),
            _ => (None, args.image.clone()),
        };
        let format = match (typed, args.format) {
            (Some(t), Some(f)) if t != f => {
                bail!("--image {s} and --format {} disagree", f.qemu_name())
            }
            (t, f) => t.or(f).unwrap_or(Format::Raw),
        };
        if args.once_per.is_some_and(|b| b == 0 || b % args.bs != 0) {
            bail!("--once-per must be a multiple of --bs");
        }
        Ok(Setup { args, path, format })
    }

    /// Creates the image if it does not exist (always, with `fresh`, replacing it).
    fn prepare(&self, fresh: bool) -> Result<()> {
        if fresh {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", self.path.display()))
                }
                _ => {}
            }
        } else if self.path.exists() {
            return Ok(());
        }
        match self.format {
            // A sparse raw image would let qemu-nbd answer reads with hole replies (no data on
            // the wire) where tapdisk sends the zeroes: written in full unless every run
            // starts fresh (then the runs measure writes into nothing, on both sides alike).
            Format::Raw if fresh => std::fs::File::create_new(&self.path)
                .and_then(|f| f.set_len(self.args.size))
                .with_context(|| format!("creating {}", self.path.display())),
            Format::Raw => crate::util::prefill(&self.path, self.args.size, self.args.size),
            Format::Qcow2 => {
                let out = Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-o"])
                    .arg(format!("cluster_size={}", self.args.cluster_size))
                    .arg(&self.path)
                    .arg(self.args.size.to_string())
                    .output()
                    .context("cannot run qemu-img (Debian: qemu-utils)")?;
                if !out.status.success() {
                    bail!(
                        "qemu-img create {} failed: {}",
                        self.path.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                Ok(())
            }
        }
    }
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
    let setup = Setup::new(a)?;
    setup.prepare(false)?;
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
            if a.fresh {
                setup.prepare(true)?;
            }
            let r = start(&setup, &servers[i], &dir.0, &sock)
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
    if a.fresh {
        let _ = std::fs::remove_file(&setup.path);
    }
    let what = format!(
        "{} bs={} iodepth={}{} on {} ({}{}), {} rounds of {:?}",
        a.rw.name(),
        fmt_size(a.bs),
        a.iodepth,
        a.once_per
            .map(|b| format!(" once per {}", fmt_size(b)))
            .unwrap_or_default(),
        setup.path.display(),
        setup.format.qemu_name(),
        if a.fresh { ", new for every run" } else { "" },
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
