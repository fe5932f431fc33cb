//! Figure 6.1 of the thesis: the striped virtual disk offsets the cost of the virtual disk.
//! The thesis ran `dd` with 512 KB direct IO and with 4 KB buffered IO on the physical disk,
//! the virtual disk and the virtual disk striped over two servers. Here: one local file, and a
//! striped disk over one, two and four tgtd servers of the emulated storage LAN
//! (`tests/storage-lan/storage-lan.sh`: each server in its own network namespace behind a veth
//! link rate-limited alike with tc), all through a private tapdisk and the blkif ring.
//!
//! Each point: 512 KB sequential direct writes and reads, one IO at a time (dd's pattern: the
//! parallelism is the striping's, not the queue's), and 4 KB buffered sequential writes (the
//! guest's page cache model of [`crate::guest`] turns them into merged ring
//! requests). Needs root, tgt and iproute2.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::bench::{self, Rw, Stop, Workload};
use crate::guest;
use crate::plot;
use crate::target::{self, AbiArg, DirectArg, TargetArgs};

/// Disk size of every run (and each server's LUN).
const DISK: u64 = 256 << 20;
/// Extent size of the master.
const EXTENT: u64 = 16 << 20;
/// Stripe unit.
const STRIPE: u64 = 64 << 10;
/// Buffered 4 KB writes per run (32 MiB).
const BUFFERED_WRITES: u64 = 8192;

/// Settings of the figure.
#[derive(Clone, Debug)]
pub struct Fig61 {
    /// Link rate of every server (tc syntax, e.g. 200mbit).
    pub rate: String,
    /// Servers per point.
    pub servers: Vec<u32>,
    /// Measured seconds of each direct-IO run.
    pub seconds: u64,
    /// The storage LAN script.
    pub script: PathBuf,
    /// Folder for the chart.
    pub out: PathBuf,
    /// The local file (default: a temporary one in /var/tmp).
    pub local: Option<PathBuf>,
}

/// The default place of the storage LAN script: the source tree td-bench was built from.
pub fn default_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/storage-lan/storage-lan.sh")
}

/// One row of the figure.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// 512 KB direct writes, MB/s.
    pub direct_write: f64,
    /// 512 KB direct reads, MB/s.
    pub direct_read: f64,
    /// 4 KB buffered writes, MB/s.
    pub buffered_write: f64,
}

struct Lan {
    script: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl Lan {
    fn cmd(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("bash")
            .arg(&self.script)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v)))
            .output()
            .with_context(|| format!("running {}", self.script.display()))?;
        if !out.status.success() {
            bail!(
                "storage-lan.sh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = self.cmd(&["down"]);
    }
}

fn targs(image: String) -> TargetArgs {
    let direct = DirectArg::strict_where_possible(Path::new(&image));
    TargetArgs {
        device: None,
        image: Some(PathBuf::from(image)),
        size: Some(DISK),
        ring_order: 0,
        abi: AbiArg::X86_64,
        max_segments: 11,
        direct,
        poll_us: 0,
        spin_us: 0,
        indirect_segments: 0,
        no_merge: false,
        max_merge_kb: 1024,
        model_disk: None,
        early_read: None,
        inject_faults: None,
        cache_slots: 0,
        pin: false,
    }
}

fn direct(image: &str, rw: Rw, seconds: u64) -> Result<f64> {
    let ta = targs(image.to_owned());
    let w = Workload {
        rw,
        bs: 512 << 10,
        iodepth: 1,
        stop: Stop::Time(Duration::from_secs(seconds)),
        warmup: Duration::from_secs(1),
        rwmixread: 0,
        seed: 1,
    };
    let mut t = target::open(&ta, w.mem_pages(&ta.shape()))?;
    let r = bench::measure(&mut t.fe, t.info.sectors, &t.shape, &w, None)?;
    if r.errors > 0 {
        bail!("{} of {} IOs failed on {image}", r.errors, r.ios);
    }
    Ok(r.mb_s)
}

fn buffered(image: &str) -> Result<f64> {
    let ta = targs(image.to_owned());
    let shape = ta.shape();
    let writes = guest::sequential(BUFFERED_WRITES, 4096);
    let plan = guest::writeback_plan(&writes, &shape);
    let pages = guest::plan_pages(&plan, &shape);
    let mut t = target::open(&ta, pages as u32)?;
    let r = guest::run_plan(&mut t.fe, &shape, &plan, None)?;
    if r.errors > 0 {
        bail!("{} of {} requests failed on {image}", r.errors, r.requests);
    }
    Ok((BUFFERED_WRITES * 4096) as f64 / r.elapsed_s / 1e6)
}

fn measure(name: String, image: &str, seconds: u64) -> Result<Row> {
    eprintln!("td-bench thesis: figure 6.1: {name}");
    Ok(Row {
        direct_write: direct(image, Rw::Write, seconds)?,
        direct_read: direct(image, Rw::Read, seconds)?,
        buffered_write: buffered(image)?,
        name,
    })
}

fn striped(f: &Fig61, n: u32, dir: &Path) -> Result<Row> {
    let lan = Lan {
        script: f.script.clone(),
        env: vec![
            ("STORAGE_LAN_PREFIX", "tdsbench".into()),
            ("STORAGE_LAN_NET", "200".into()),
            ("STORAGE_LAN_CTL_BASE", "21700".into()),
            ("STORAGE_LAN_DIR", "/dev/shm/td-bench-storage-lan".into()),
        ],
    };
    lan.cmd(&["up", &n.to_string(), &f.rate, &DISK.to_string()])?;
    let urls: Vec<String> = lan.cmd(&["urls"])?.lines().map(str::to_owned).collect();
    // A master of our own for this LAN.
    let state = dir.join(format!("master-{n}"));
    let (store, st) = stripe::master::Store::open(&state, Some(EXTENT))?;
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let m = stripe::master_server::Master::new(
        store,
        st,
        slog::Logger::root(slog::Discard, slog::o!()),
    );
    std::thread::spawn(move || m.serve(l));
    let mut c = stripe::MasterClient::new(&addr);
    for u in &urls {
        let url: iscsi::Url = u.parse()?;
        c.register(&stripe::proto::RegisterArgs {
            portal: url.portal,
            target: url.target,
            lun: u32::from(url.lun),
            start: 0,
            count: (DISK / EXTENT) as u32,
        })?;
    }
    let geometry = stripe::Geometry {
        size: DISK,
        stripes: n,
        stripe_size: STRIPE,
        replicas: 1,
        extent_size: EXTENT,
    };
    let map = stripe_img::allocate_map(&mut c, geometry, &format!("fig61-{n}"))?;
    let path = dir.join(format!("fig61-{n}.map"));
    map.write_new(&path)?;
    let name = format!(
        "{n} server{} ({} stripe{} of 64 KiB, {} links)",
        if n == 1 { "" } else { "s" },
        n,
        if n == 1 { "" } else { "s" },
        f.rate
    );
    measure(name, &format!("stripe:{}", path.display()), f.seconds)
}

/// Runs the figure: prints the table, writes the chart; returns the rows.
pub fn run(f: &Fig61) -> Result<Vec<Row>> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("figure 6.1 needs root (network namespaces for the storage LAN)");
    }
    if !f.script.is_file() {
        bail!(
            "storage LAN script {} not found (--lan-script)",
            f.script.display()
        );
    }
    let dir = tempfile_dir()?;
    let _rm = RemoveDir(dir.clone());
    let local = f.local.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "/var/tmp/td-bench-fig61-{}.img",
            std::process::id()
        ))
    });
    let _rm_local = f
        .local
        .is_none()
        .then(|| crate::util::RemoveFiles(vec![local.clone()]));
    let mut rows = vec![measure(
        format!("local file {}", local.display()),
        &local.display().to_string(),
        f.seconds,
    )?];
    for &n in &f.servers {
        rows.push(striped(f, n, &dir)?);
    }
    let base = rows
        .iter()
        .find(|r| r.name.starts_with("1 server"))
        .cloned();
    println!(
        "Figure 6.1: 512 KB direct IO (one at a time) and 4 KB buffered writes; striped disks over \
         tgtd servers behind {} links (stripe unit 64 KiB)",
        f.rate
    );
    println!(
        "{:<52} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "", "512K dw MB/s", "512K dr MB/s", "4K bw MB/s", "dw / 1 srv", "dr / 1 srv"
    );
    for r in &rows {
        let ratio = |v: f64, b: Option<f64>| match b {
            Some(b) if b > 0.0 => format!("{:.2}", v / b),
            _ => "-".into(),
        };
        println!(
            "{:<52} {:>12.1} {:>12.1} {:>12.1} {:>10} {:>10}",
            r.name,
            r.direct_write,
            r.direct_read,
            r.buffered_write,
            ratio(r.direct_write, base.as_ref().map(|b| b.direct_write)),
            ratio(r.direct_read, base.as_ref().map(|b| b.direct_read)),
        );
    }
    println!(
        "  thesis (2 disks, its Figure 6.1): the striped virtual disk beat the physical disk for \
         both; the issue's goal here: 2 servers >= 1.8x one, 4 servers >= 3.4x, 512 KB direct IO"
    );
    std::fs::create_dir_all(&f.out).with_context(|| format!("creating {}", f.out.display()))?;
    let path = f.out.join("figure-6.1.png");
    let cats: Vec<String> = rows
        .iter()
        .map(|r| {
            r.name
                .split(" (")
                .next()
                .unwrap_or(&r.name)
                .replace("local file ", "local file\n")
        })
        .map(|s| s.lines().next().unwrap_or("").to_owned())
        .collect();
    plot::bar_chart(
        &path,
        &format!("Figure 6.1: striped over tgtd servers ({} links)", f.rate),
        "MB/s",
        &cats,
        &[
            (
                "512 KB direct write".into(),
                rows.iter().map(|r| r.direct_write).collect(),
            ),
            (
                "512 KB direct read".into(),
                rows.iter().map(|r| r.direct_read).collect(),
            ),
            (
                "4 KB buffered write".into(),
                rows.iter().map(|r| r.buffered_write).collect(),
            ),
        ],
    )?;
    println!("wrote {}", path.display());
    Ok(rows)
}

fn tempfile_dir() -> Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("td-bench-fig61-{}", std::process::id()));
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(p)
}

struct RemoveDir(PathBuf);
impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
