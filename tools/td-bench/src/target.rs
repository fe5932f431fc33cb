//! The disk under test: an existing VBD socket, or an image served by a private tapdisk that
//! td-bench starts in a temporary run directory and shuts down when it is done, also on error
//! and on SIGINT/SIGTERM/SIGHUP.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blkif::local::{FrontendConfig, LocalFrontend};
use blkif::{Abi, DiskInfo};
use clap::{Args, ValueEnum};
use tapdisk_control::client::{self, Client};
use tapdisk_control::proto::{Command, Reply};
use tapdisk_control::{
    limits, DirectIo, Driver, EarlyPolicy, FaultPlan, ImageSpec, ModelParams, RunDir, VbdSettings,
};
use td_cli::{fmt_size, parse_size};

/// Default size of an image td-bench creates.
pub const DEFAULT_SIZE: u64 = 256 << 20;

/// Ring layout on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AbiArg {
    /// 64-bit layout (112-byte requests), the native one.
    #[value(name = "x86_64", alias = "x86_64-abi")]
    X86_64,
    /// 32-bit layout (108-byte requests, ids aligned to 4).
    #[value(name = "x86_32", alias = "x86_32-abi")]
    X86_32,
}

impl From<AbiArg> for Abi {
    fn from(a: AbiArg) -> Abi {
        match a {
            AbiArg::X86_64 => Abi::X86_64,
            AbiArg::X86_32 => Abi::X86_32,
        }
    }
}

/// O_DIRECT policy on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DirectArg {
    /// O_DIRECT where the file system takes it (sequential reads of image files: page cache).
    Auto,
    /// O_DIRECT for every aligned IO, or fail.
    On,
    /// Page cache.
    Off,
}

/// Whether `path` can be read with O_DIRECT (some file systems refuse it).
pub fn direct_io_works(path: &Path) -> bool {
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    else {
        return false;
    };
    let mut buf = vec![0u8; 8192];
    let off = buf.as_ptr().align_offset(4096);
    if off > 4096 {
        return false;
    }
    f.read_at(&mut buf[off..off + 4096], 0).is_ok()
}

impl DirectArg {
    /// `On` where `image` (a plain path, or a spec of an image file: not `stripe:`) exists on a
    /// file system that takes O_DIRECT, `Auto` otherwise. For experiments that measure O_DIRECT
    /// IO: under `auto` the sequential reads of image files go through the page cache.
    pub fn strict_where_possible(image: &Path) -> DirectArg {
        let s = image.to_string_lossy();
        let path = match s.parse::<ImageSpec>() {
            Ok(spec) if spec.driver == Driver::Stripe => return DirectArg::Auto,
            Ok(spec) => spec.path,
            Err(_) => image.to_owned(),
        };
        if direct_io_works(&path) {
            DirectArg::On
        } else {
            DirectArg::Auto
        }
    }
}

impl From<DirectArg> for DirectIo {
    fn from(d: DirectArg) -> DirectIo {
        match d {
            DirectArg::Auto => DirectIo::Auto,
            DirectArg::On => DirectIo::On,
            DirectArg::Off => DirectIo::Off,
        }
    }
}

/// Which disk to drive, and how to attach to it.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Target (default: a private tapdisk on a temporary 256M image)")]
pub struct TargetArgs {
    /// An existing VBD socket (e.g. from `tap-ctl create`).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["image", "size"])]
    pub device: Option<PathBuf>,
    /// An image file, served by a private tapdisk for this run (created sparse if missing);
    /// or a disk spec: aio:FILE (the same), parallax:FILE or parallax:FILE@VOLUME (a Parallax
    /// image, created with one disk if missing), qcow2:FILE (a qcow2 image, with its backing
    /// files; created empty, version 3 with 64 KiB clusters, if missing), vhd:FILE (a VHD, or
    /// the leaf of a chain; created as a dynamic disk if missing), stripe:MAPFILE (a striped
    /// disk made with stripe-img, served as it is).
    #[arg(long, value_name = "FILE|SPEC")]
    pub image: Option<PathBuf>,
    /// Size of the image when td-bench creates it [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// The ring has 2^N pages.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = |s: &str| limits::MAX_RING_ORDER.parse::<u8>(s))]
    pub ring_order: u8,
    /// Ring layout.
    #[arg(long, value_enum, default_value_t = AbiArg::X86_64)]
    pub abi: AbiArg,
    /// Segments per request (at most blkif's 11; the backend may offer fewer).
    #[arg(long, value_name = "N", default_value_t = VbdSettings::DEFAULT.max_segments,
          value_parser = |s: &str| limits::MAX_SEGMENTS.parse::<u8>(s))]
    pub max_segments: u8,
    /// O_DIRECT policy of the private tapdisk.
    #[arg(long, value_enum, default_value_t = DirectArg::Auto)]
    pub direct: DirectArg,
    /// The private tapdisk's ring loops poll for up to US µs before sleeping (0: never).
    #[arg(long, value_name = "US", default_value_t = 0,
          value_parser = |s: &str| limits::POLL_US.parse::<u32>(s))]
    pub poll_us: u32,
    /// The frontend busy-polls for responses up to US µs before sleeping (0: never).
    #[arg(long, value_name = "US", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10000))]
    pub spin_us: u32,
    /// Use indirect requests of up to N segments (0: direct requests of --max-segments only;
    /// the backend may offer fewer). 256 = 1 MiB per request, 4096 = 16 MiB.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = |s: &str| limits::MAX_INDIRECT_SEGMENTS.parse::<u16>(s))]
    pub indirect_segments: u16,
    /// The private tapdisk does not sort and merge requests.
    #[arg(long)]
    pub no_merge: bool,
    /// The private tapdisk's largest merged IO, KiB.
    #[arg(long, value_name = "KIB", default_value_t = VbdSettings::DEFAULT.max_merge_kb,
          value_parser = |s: &str| limits::MAX_MERGE_KB.parse::<u32>(s))]
    pub max_merge_kb: u32,
    /// Early-read mode: the frontend unmaps each read's pages until tapdisk has filled them,
    /// and the private tapdisk answers reads early under POLICY, e.g. percent=25 or
    /// first=10+20,seq=4:10,cache=64 ('off': the mode without early answers). See
    /// 'tap-ctl create --help' for the rules.
    #[arg(long, value_name = "POLICY", num_args = 0..=1, default_missing_value = "off",
          value_parser = |s: &str| s.parse::<EarlyPolicy>())]
    pub early_read: Option<EarlyPolicy>,
    /// For testing: the private tapdisk injects faults below its scheduler (see 'tap-ctl
    /// create --help'), e.g. seed=1,fail=2000,tear or bad=1000+8.
    #[arg(long, value_name = "PLAN", value_parser = |s: &str| s.parse::<FaultPlan>())]
    pub inject_faults: Option<FaultPlan>,
    /// The private tapdisk serves through the thesis's disk model ('default', or
    /// X_US,Y_NS_PER_KB,SEEK_US); the data is real, the timing modelled.
    #[arg(long, value_name = "PARAMS", num_args = 0..=1, default_missing_value = "default",
          value_parser = |s: &str| s.parse::<ModelParams>())]
    pub model_disk: Option<ModelParams>,
    /// Metadata cache slots of a parallax: or vhd: image in the private tapdisk (0: the
    /// driver's default).
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = |s: &str| limits::CACHE_SLOTS.parse::<u32>(s))]
    pub cache_slots: u32,
    /// Put the private tapdisk on the last CPU and this frontend (and fio, in compare) on the
    /// first, so that a polling tapdisk and a spinning frontend never share a core (where
    /// each would hold off the other's work). Needs two CPUs.
    #[arg(long)]
    pub pin: bool,
}

impl TargetArgs {
    /// Slots of the ring these options ask for.
    pub fn ring_slots(&self) -> u32 {
        blkif::ring::ring_size(self.abi.into(), 1 << self.ring_order)
    }

    /// How requests will be shaped, before the backend says what it offers.
    pub fn shape(&self) -> ReqShape {
        ReqShape {
            max_segments: self.max_segments,
            indirect_segments: self.indirect_segments,
        }
    }
}

/// How a frontend builds ring requests: direct ones of up to `max_segments` segments, or,
/// if `indirect_segments > 0`, indirect ones of up to that many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReqShape {
    /// Segments of a direct request (1..=11).
    pub max_segments: u8,
    /// Segments of an indirect request (0: none).
    pub indirect_segments: u16,
}

impl ReqShape {
    /// Segments one request carries.
    pub fn segs_per_req(&self) -> usize {
        if self.indirect_segments > 0 {
            usize::from(self.indirect_segments)
        } else {
            usize::from(self.max_segments.max(1))
        }
    }

    /// Descriptor pages an indirect request needs (0 for direct ones).
    pub fn indirect_pages(&self) -> usize {
        if self.indirect_segments > 0 {
            usize::from(self.indirect_segments).div_ceil(512)
        } else {
            0
        }
    }

    /// Bytes one request carries at most.
    pub fn max_bytes(&self) -> u64 {
        self.segs_per_req() as u64 * 4096
    }

    /// Pages of guest memory one IO of `bs` bytes needs: its data and its descriptor pages.
    pub fn pages_per_io(&self, bs: u64) -> usize {
        let data = (bs as usize).div_ceil(4096);
        data + data.div_ceil(self.segs_per_req()) * self.indirect_pages()
    }

    /// "11 segments (44k)" or "indirect, 256 segments (1M)".
    pub fn describe(&self) -> String {
        if self.indirect_segments > 0 {
            format!(
                "indirect requests of {} segments ({})",
                self.indirect_segments,
                fmt_size(self.max_bytes())
            )
        } else {
            format!(
                "requests of {} segments ({})",
                self.max_segments,
                fmt_size(self.max_bytes())
            )
        }
    }
}

/// A private tapdisk: its temporary folder (run directory, maybe the image) and its pid.
#[derive(Debug)]
struct Private {
    dir: PathBuf,
    pid: Option<u32>,
}

/// What must be undone however td-bench ends.
#[derive(Debug, Default)]
struct Cleanup {
    private: Option<Private>,
    child: Option<u32>,
}

static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    private: None,
    child: None,
});

/// Set when a signal arrived: the signal thread is tearing down and will exit the process.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// If td-bench was interrupted, waits for the signal thread to finish the cleanup and exit, so
/// the failures the teardown causes (a ring gone, fio killed) are not reported as results.
pub fn park_if_interrupted() {
    while INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn cleanup() -> std::sync::MutexGuard<'static, Cleanup> {
    CLEANUP.lock().unwrap_or_else(|e| e.into_inner())
}

fn pid_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name; a zombie has exited.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

impl Private {
    /// Asks the tapdisk to shut down, waits for it (killing it after 5 s), removes the folder.
    fn teardown(self) {
        if let Some(pid) = self.pid {
            let rundir = RunDir(self.dir.join("run"));
            let asked = Client::connect_pid(&rundir, pid)
                .and_then(|mut c| c.call(Command::Shutdown))
                .is_ok();
            let deadline = Instant::now() + Duration::from_secs(if asked { 5 } else { 0 });
            while pid_running(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if pid_running(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The number of the signal that arrived (0: none yet).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // An atomic store is async-signal-safe.
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn stop_child(pid: u32) {
    use nix::sys::signal::{kill, Signal};
    let p = nix::unistd::Pid::from_raw(pid as i32);
    let _ = kill(p, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while pid_running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if pid_running(pid) {
        let _ = kill(p, Signal::SIGKILL);
    }
}

/// Catches SIGINT, SIGTERM and SIGHUP and starts a thread that, on any of them, stops a running
/// fio and the private tapdisk, removes temporary files and exits with 130.
///
/// The handler only records the signal; the thread polls for it. (Blocking the signals and
/// waiting for them instead would leak the blocked mask into tapdisk and fio.)
pub fn install_signal_handler() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe) and is a plain
        // function that lives as long as the process; exec resets it in children.
        unsafe { sigaction(s, &act) }.with_context(|| format!("catching {s}"))?;
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let sig = loop {
                match SIGNAL.load(Ordering::SeqCst) {
                    0 => std::thread::sleep(Duration::from_millis(20)),
                    s => break s,
                }
            };
            INTERRUPTED.store(true, Ordering::SeqCst);
            let mut c = cleanup();
            if let Some(pid) = c.child.take() {
                stop_child(pid);
            }
            if let Some(p) = c.private.take() {
                p.teardown();
            }
            match Signal::try_from(sig) {
                Ok(s) => eprintln!("td-bench: interrupted by {s}"),
                Err(_) => eprintln!("td-bench: interrupted by signal {sig}"),
            }
            std::process::exit(130);
        })?;
    Ok(())
}

/// Remembers a child process (fio) to terminate if td-bench is interrupted.
pub fn register_child(pid: Option<u32>) {
    cleanup().child = pid;
}

/// Makes a new private folder under the system temporary folder.
fn make_temp_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for i in 0..1000u32 {
        let p = base.join(format!("td-bench-{}-{i}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).context(format!("creating a folder in {}", base.display())),
        }
    }
    bail!("cannot create a temporary folder in {}", base.display())
}

/// Shuts the private tapdisk down when dropped (after the frontend, declared before it).
#[derive(Debug)]
struct PrivateGuard;

impl Drop for PrivateGuard {
    fn drop(&mut self) {
        let p = cleanup().private.take();
        if let Some(p) = p {
            p.teardown();
        }
    }
}

/// An attached disk.
#[derive(Debug)]
pub struct Target {
    /// The frontend. Declared first: dropped (ring detached) before the tapdisk is stopped.
    pub fe: LocalFrontend,
    /// The disk as the backend describes it.
    pub info: DiskInfo,
    /// Segments per request to use: the smaller of `--max-segments` and the backend's offer.
    pub max_segments: u8,
    /// The VBD socket.
    pub device: PathBuf,
    /// The image file, when td-bench serves it.
    pub image: Option<PathBuf>,
    /// td-bench created the image in this run, so it is known to read as zeroes.
    pub fresh: bool,
    /// Words for the header line.
    pub describe: String,
    /// How requests are built: what `--max-segments` and `--indirect-segments` asked for,
    /// cut to what the backend offers.
    pub shape: ReqShape,
    /// The private tapdisk, if td-bench started one.
    pub private: Option<PrivateCtl>,
    /// Discards are hints that may leave data in place (a `vhd:` image frees whole blocks
    /// only), so discarded sectors are unknown until rewritten.
    pub discard_is_hint: bool,
    _guard: Option<PrivateGuard>,
}

/// How to reach the private tapdisk of a target.
#[derive(Debug)]
pub struct PrivateCtl {
    rundir: RunDir,
    pid: u32,
    minor: u32,
}

impl Target {
    fn call(&self, cmd: Command) -> Result<Reply> {
        let p = self
            .private
            .as_ref()
            .ok_or_else(|| anyhow!("only a private tapdisk can be asked for this"))?;
        Ok(Client::connect_pid(&p.rundir, p.pid)?.call(cmd)?)
    }

    /// The pid of the private tapdisk serving the disk, if td-bench started one.
    pub fn tapdisk_pid(&self) -> Option<u32> {
        self.private.as_ref().map(|p| p.pid)
    }

    /// The private tapdisk's folder (its run directory and temporary images live there).
    pub fn private_dir(&self) -> Option<&Path> {
        self.private.as_ref().and_then(|p| p.rundir.0.parent())
    }

    /// Opens one more VBD in the private tapdisk (it is closed when the tapdisk stops).
    pub fn open_more(
        &self,
        image: ImageSpec,
        settings: VbdSettings,
    ) -> Result<tapdisk_control::proto::VbdSummary> {
        match self.call(Command::Open {
            minor: None,
            image: image.clone(),
            settings,
        })? {
            Reply::Opened { vbd } => Ok(vbd),
            other => bail!("tapdisk answered the open of {image} with {other:?}"),
        }
    }

    /// The VBD's counters (`tap-ctl stats`).
    pub fn stats(&self) -> Result<serde_json::Value> {
        let minor = self.private.as_ref().map_or(0, |p| p.minor);
        match self.call(Command::Stats { minor })? {
            Reply::Stats { stats } => Ok(stats),
            other => bail!("tapdisk answered stats with {other:?}"),
        }
    }

    /// What the VBD's trace buffers hold, as records.
    pub fn trace(&self) -> Result<Vec<tapdisk::trace::RingTrace>> {
        let p = self
            .private
            .as_ref()
            .ok_or_else(|| anyhow!("tracing needs a private tapdisk"))?;
        let path = p.rundir.0.join(format!("trace-{}.json", p.minor));
        match self.call(Command::Trace {
            minor: p.minor,
            path: path.display().to_string(),
            format: tapdisk_control::proto::TraceFormat::Raw,
        })? {
            Reply::Trace { .. } => {}
            other => bail!("tapdisk answered trace with {other:?}"),
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let _ = std::fs::remove_file(&path);
        Ok(serde_json::from_slice(&bytes)?)
    }
}

fn create_image(path: &Path, size: u64) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    if size == 0 || !size.is_multiple_of(512) {
        bail!("image size {size} is not a positive multiple of 512 bytes");
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("sizing {} to {}", path.display(), fmt_size(size)))?;
    Ok(true)
}

/// An `--image` argument: `FILE` (a raw image) or a disk spec, `aio:FILE`, `parallax:FILE`,
/// `parallax:FILE@VOLUME`, `qcow2:FILE`, `vhd:FILE` or `stripe:MAPFILE`.
fn split_spec(arg: &Path) -> Result<ImageSpec> {
    let s = arg.to_string_lossy();
    let typed = Driver::ALL
        .iter()
        .any(|d| s.strip_prefix(d.name()).is_some_and(|r| r.starts_with(':')));
    if typed {
        Ok(s.parse()?)
    } else {
        Ok(ImageSpec::new(Driver::Aio, arg))
    }
}

/// The file an `--image` argument names (for a spec, its path).
pub fn image_path(arg: &Path) -> Result<PathBuf> {
    Ok(split_spec(arg)?.path)
}

/// Creates a Parallax image of `size` bytes at `path` if there is none; true if it did.
fn create_parallax(path: &Path, size: u64) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    parallax::Disk::create(path, &parallax::CreateOptions::new(size))
        .map_err(|e| anyhow!("creating Parallax image {}: {e}", path.display()))?;
    Ok(true)
}

/// Creates an empty qcow2 image of `size` bytes at `path` (version 3, 64 KiB clusters, as
/// `qemu-img create -f qcow2` makes it) if there is none; true if it did.
fn create_qcow2(path: &Path, size: u64) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let file = qcow2::FileStorage::create(path).map_err(|e| {
        anyhow!(
            "creating qcow2 image {}: {}",
            path.display(),
            match e {
                qcow2::OpenFileError::Locked => "locked by another process".to_string(),
                qcow2::OpenFileError::Io(e) => e.to_string(),
            }
        )
    })?;
    qcow2::create(&file, &qcow2::CreateOptions::new(size))
        .map_err(|e| anyhow!("creating qcow2 image {}: {e}", path.display()))?;
    Ok(true)
}

/// Creates a dynamic VHD of `size` bytes at `path` if there is none; true if it did.
fn create_vhd(path: &Path, size: u64) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    vhd::create(path, &vhd::CreateOptions::dynamic(size))
        .map_err(|e| anyhow!("creating VHD image {}: {e}", path.display()))?;
    Ok(true)
}

/// Opens the target the options name with `mem_pages` pages of guest memory.
pub fn open(args: &TargetArgs, mem_pages: u32) -> Result<Target> {
    open_traced(args, mem_pages, 0)
}

/// Starts a private tapdisk on the last CPU (it inherits our affinity at spawn), then moves
/// this thread to the first.
fn pinned_spawn(rundir: &RunDir) -> Result<u32> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let me = Pid::from_raw(0);
    let all = sched_getaffinity(me).context("reading this process's CPUs")?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| all.is_set(c).unwrap_or(false))
        .collect();
    let (&first, &last) = match (cpus.first(), cpus.last()) {
        (Some(f), Some(l)) if f != l => (f, l),
        _ => bail!("--pin needs two CPUs; this process may use {}", cpus.len()),
    };
    let one = |c: usize| -> Result<CpuSet> {
        let mut s = CpuSet::new();
        s.set(c)?;
        Ok(s)
    };
    sched_setaffinity(me, &one(last)?).context("pinning to the last CPU")?;
    let pid = client::spawn(rundir).context("starting a private tapdisk");
    sched_setaffinity(me, &one(first)?).context("pinning to the first CPU")?;
    let pid = pid?;
    eprintln!("td-bench: pinned: tapdisk {pid} on CPU {last}, this frontend on CPU {first}");
    Ok(pid)
}

/// As [`open`]; a private tapdisk records a trace of up to `trace_cap` requests.
pub fn open_traced(args: &TargetArgs, mem_pages: u32, trace_cap: u32) -> Result<Target> {
    let cfg = FrontendConfig {
        abi: args.abi.into(),
        ring_order: args.ring_order,
        mem_pages: mem_pages.max(1),
        early_read: args.early_read.is_some(),
    };
    if let Some(dev) = &args.device {
        let fe = LocalFrontend::connect(dev, cfg)
            .with_context(|| format!("attaching to {}", dev.display()))?;
        let describe = format!("device {}", dev.display());
        if trace_cap > 0 {
            bail!("tracing needs a private tapdisk (--image or the default), not --device");
        }
        return finish(fe, args, dev.clone(), None, false, describe, None);
    }
    let dir = make_temp_dir()?;
    cleanup().private = Some(Private {
        dir: dir.clone(),
        pid: None,
    });
    let guard = PrivateGuard;
    let (spec, temporary) = match &args.image {
        Some(p) => {
            let mut spec = split_spec(p)?;
            spec.path = std::path::absolute(&spec.path)
                .with_context(|| format!("resolving {}", spec.path.display()))?;
            (spec, false)
        }
        None => (ImageSpec::new(Driver::Aio, dir.join("disk.img")), true),
    };
    let path = spec.path.clone();
    let size = args.size.unwrap_or(DEFAULT_SIZE);
    let fresh = match spec.driver {
        Driver::Aio => create_image(&path, size)?,
        Driver::Parallax => create_parallax(&path, size)? && spec.volume.is_none(),
        Driver::Qcow2 => create_qcow2(&path, size)?,
        Driver::Vhd => create_vhd(&path, size)?,
        Driver::Stripe => false,
    };
    if !fresh
        && spec.driver == Driver::Aio
        && args
            .size
            .is_some_and(|s| std::fs::metadata(&path).map(|m| m.len()).ok() != Some(s))
    {
        eprintln!(
            "td-bench: note: {} exists; using it at its own size (--size ignored)",
            path.display()
        );
    }
    let rundir = RunDir(dir.join("run"));
    let pid = {
        // Held across the spawn so an interrupt cannot miss the new pid.
        let mut c = cleanup();
        let pid = if args.pin {
            pinned_spawn(&rundir)?
        } else {
            client::spawn(&rundir).context("starting a private tapdisk")?
        };
        if let Some(p) = c.private.as_mut() {
            p.pid = Some(pid);
        }
        pid
    };
    let settings = VbdSettings {
        direct: args.direct.into(),
        max_ring_order: blkif::local::MAX_RING_ORDER,
        max_segments: args.max_segments,
        max_indirect_segments: blkif::request::MAX_INDIRECT_SEGMENTS,
        merge: !args.no_merge,
        max_merge_kb: args.max_merge_kb,
        model: args.model_disk,
        early: args.early_read,
        faults: args.inject_faults.clone(),
        trace: trace_cap,
        poll_us: args.poll_us,
        cache_slots: args.cache_slots,
        ..VbdSettings::default()
    };
    let reply = Client::connect_pid(&rundir, pid)?
        .call(Command::Open {
            minor: None,
            image: spec.clone(),
            settings,
        })
        .with_context(|| format!("opening {spec}"))?;
    let Reply::Opened { vbd } = reply else {
        bail!("tapdisk answered the open with {reply:?}");
    };
    let device = PathBuf::from(&vbd.device);
    let fe = LocalFrontend::connect(&device, cfg)
        .with_context(|| format!("attaching to {}", device.display()))?;
    let what = if temporary {
        "temporary image"
    } else {
        "image"
    };
    let mut describe = format!("{what} {spec} via private tapdisk {pid}");
    if let Some(m) = args.model_disk {
        describe.push_str(&format!(" ({m})"));
    }
    // Only a raw image is something fio (compare) can be given.
    let raw = (spec.driver == Driver::Aio).then_some(path);
    let mut t = finish(fe, args, device, raw, fresh, describe, Some(guard))?;
    t.discard_is_hint = spec.driver == Driver::Vhd;
    t.private = Some(PrivateCtl {
        rundir,
        pid,
        minor: vbd.minor,
    });
    Ok(t)
}

fn finish(
    fe: LocalFrontend,
    args: &TargetArgs,
    device: PathBuf,
    image: Option<PathBuf>,
    fresh: bool,
    describe: String,
    guard: Option<PrivateGuard>,
) -> Result<Target> {
    let info = *fe.info();
    if info.sectors == 0 {
        return Err(anyhow!("the disk is empty"));
    }
    let mut fe = fe;
    fe.set_spin(Duration::from_micros(u64::from(args.spin_us)));
    let max_segments = args.max_segments.min(info.max_segments).max(1);
    let shape = ReqShape {
        max_segments,
        indirect_segments: args.indirect_segments.min(info.max_indirect_segments),
    };
    Ok(Target {
        fe,
        info,
        max_segments,
        shape,
        private: None,
        discard_is_hint: false,
        device,
        image,
        fresh,
        describe,
        _guard: guard,
    })
}

/// Turns a frontend wait failure into an error that says what happened.
pub fn wait_error(e: std::io::Error, in_flight: u32) -> anyhow::Error {
    park_if_interrupted();
    anyhow!("tapdisk went away with {in_flight} requests in flight: {e}")
}

/// How long a request may take before td-bench gives up on the backend.
pub const STALL: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experiments_keep_o_direct_for_image_files_only() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let want = if direct_io_works(&img) {
            DirectArg::On
        } else {
            DirectArg::Auto
        };
        let strict = |s: String| DirectArg::strict_where_possible(Path::new(&s));
        let p = img.display();
        assert_eq!(strict(p.to_string()), want, "a plain path");
        assert_eq!(strict(format!("aio:{p}")), want);
        assert_eq!(strict(format!("vhd:{p}")), want);
        assert_eq!(strict(format!("parallax:{p}@vol")), want);
        assert_eq!(
            strict(format!("stripe:{p}")),
            DirectArg::Auto,
            "not a file of data"
        );
        let gone = dir.path().join("missing");
        assert_eq!(strict(gone.display().to_string()), DirectArg::Auto);
    }
}
