//! Options shared by several verbs, and their validation: everything is checked before any
//! tapdisk is contacted or started.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::{Args, ValueEnum};
use parallax::DiskSpec;
use tapdisk::control::proto::VbdOptions;
use tapdisk::early::EarlyPolicy;
use tapdisk::engine::fault::FaultPlan;
use tapdisk::engine::model::ModelParams;
use tapdisk::image::{DirectIo, Driver, ImageSpec};
use tapdisk::nbd::NbdListen;

use super::io_msg;

/// Highest ring order a VBD may offer.
pub const MAX_RING_ORDER: u32 = 8;
/// Most segments per request a VBD may offer.
pub const MAX_SEGMENTS: u32 = 11;
/// Most metadata cache slots of a Parallax image (4 GiB of cache).
pub const MAX_CACHE_SLOTS: u32 = 1 << 20;

/// An existing VBD: `-m MINOR`, and optionally the tapdisk serving it.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Minor number of the VBD (as shown by 'tap-ctl list').
    #[arg(short, long, value_name = "MINOR")]
    pub minor: u32,
    /// Pid of the tapdisk serving the VBD. Found through the run directory if omitted.
    #[arg(short, long, value_name = "PID")]
    pub pid: Option<u32>,
}

/// O_DIRECT policy, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Direct {
    /// O_DIRECT where the file system supports it, the page cache otherwise.
    Auto,
    /// O_DIRECT; refuse to open the image if it cannot be had.
    On,
    /// Always go through the page cache.
    Off,
}

impl From<Direct> for DirectIo {
    fn from(d: Direct) -> DirectIo {
        match d {
            Direct::Auto => DirectIo::Auto,
            Direct::On => DirectIo::On,
            Direct::Off => DirectIo::Off,
        }
    }
}

/// The image and settings of a new VBD (create, open).
#[derive(Debug, Clone, Args)]
pub struct DiskArgs {
    /// Image to serve, as TYPE:PATH
    ///
    /// Types: aio (a raw image file or a block device),
    ///        parallax (a Parallax image: PATH serves its disk 'base', PATH@VOLUME another
    ///        disk, or a snapshot, read-only; see parallax-img),
    ///        stripe (PATH is a mapping file made by stripe-img: a disk striped over
    ///        iSCSI servers).
    /// A relative PATH is taken from the current directory.
    #[arg(
        verbatim_doc_comment,
        short = 'a',
        long = "args",
        value_name = "TYPE:PATH"
    )]
    pub image: String,
    /// Serve the disk read-only: frontends and NBD clients cannot write to it.
    #[arg(short = 'R', long)]
    pub readonly: bool,
    /// Largest ring order offered to frontends: rings of up to 2^N pages (0..=8)
    #[arg(long, value_name = "N", default_value_t = MAX_RING_ORDER)]
    pub ring_order: u32,
    /// Segments per request offered to frontends (1..=11)
    #[arg(long, value_name = "N", default_value_t = MAX_SEGMENTS)]
    pub max_segments: u32,
    /// Whether the image is opened with O_DIRECT, bypassing the page cache
    #[arg(long, value_enum, value_name = "MODE", default_value_t = Direct::Auto)]
    pub direct: Direct,
    /// Also export the disk over NBD at ADDRESS: unix:PATH or tcp:IP:PORT
    ///
    /// Examples: unix:/run/vm1.nbd, tcp:127.0.0.1:10809, tcp:[::1]:10809.
    /// Port 0 picks a free port; 'tap-ctl list' shows which.
    #[arg(verbatim_doc_comment, long, value_name = "ADDRESS")]
    pub nbd: Option<String>,
    /// Before sleeping, each ring loop polls its ring for up to US microseconds (0..=10000)
    ///
    /// Trades CPU for latency under dense load; 0 (the default) never polls.
    #[arg(verbatim_doc_comment, long, value_name = "US", default_value_t = 0)]
    pub poll_us: u32,
    /// Segments per indirect request offered to frontends (0..=4096; 0 turns
    /// BLKIF_OP_INDIRECT off). 256 = 1 MiB per request, as Linux blkback; 4096 = 16 MiB.
    #[arg(verbatim_doc_comment, long, value_name = "N", default_value_t = 256)]
    pub max_indirect_segments: u32,
    /// Do not sort and merge requests: each ring request becomes its own IO
    #[arg(long)]
    pub no_merge: bool,
    /// Largest IO the scheduler builds by merging requests, KiB (4..=65536)
    #[arg(long, value_name = "KIB", default_value_t = 1024)]
    pub max_merge_kb: u32,
    /// Requests taken from a ring at a time (0: the whole ring)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_batch: u32,
    /// Backend IOs in flight per ring at most (0: unlimited); the rest wait in the scheduler,
    /// where later requests can still be sorted and merged with them
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_ios: u32,
    /// Wait up to US microseconds for a batch to fill before starting its IO (0..=1000000)
    ///
    /// More requests per batch means more to merge, at the cost of latency; 0 never waits.
    #[arg(verbatim_doc_comment, long, value_name = "US", default_value_t = 0)]
    pub batch_wait_us: u32,
    /// Record a trace of up to N requests per ring (see 'tap-ctl trace'; 0: off)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub trace: u32,
    /// Serve through the thesis's disk model: every IO costs X + Y*size, plus a seek when
    /// it does not start where the last one ended, one at a time like one spindle.
    ///
    /// 'default' is X=335 µs, Y=4000 ns/KB, seek=4170 µs (thesis Table 3.1); or give
    /// X_US,Y_NS_PER_KB,SEEK_US. For experiments only: the data is real, the timing is not.
    #[arg(verbatim_doc_comment, long, value_name = "PARAMS", num_args = 0..=1, default_missing_value = "default")]
    pub model_disk: Option<String>,
    /// Early read return: answer a read before all of it is in, under POLICY, for frontends
    /// that unmap their read pages until filled (local transport's early-read mode; never on
    /// Xen rings). POLICY is any of, comma-separated (the read is answered when any holds):
    ///   percent=P      P % of the read's pages filled
    ///   first=X+Y      the first X % filled, and Y % of the rest
    ///   outstanding=N  at most N of its chunk IOs outstanding
    ///   eta=US         the rest estimated to take at most US µs
    ///   seq=R:X        after R sequential reads, the stream's reads once their first X % are in
    ///   chunk=KIB      fetch reads in chunks of KIB (default 64)
    ///   cache=MIB      a host-side read cache of MIB, served first
    /// e.g. --early-read percent=25,cache=256
    #[arg(verbatim_doc_comment, long, value_name = "POLICY")]
    pub early_read: Option<String>,
    /// For testing: inject faults below the scheduler. PLAN is any of, comma-separated:
    ///   seed=N          seed of the random faults
    ///   fail=PPM        IOs failing at random, per million
    ///   delay=PPM:US    IOs held back US µs at random, per million
    ///   tear            a failing write first writes half its data
    ///   bad=S+N;S+N     bad sector ranges: every IO touching one fails
    #[arg(verbatim_doc_comment, long, value_name = "PLAN")]
    pub inject_faults: Option<String>,
    /// Metadata cache slots of a parallax: image (1..=1048576; default 128, the thesis's
    /// first Parallax had 10). Volumes of one image served by one tapdisk share the cache
    /// of the first one opened.
    #[arg(verbatim_doc_comment, long, value_name = "N")]
    pub cache_slots: Option<u32>,
    /// Drive a stripe: image's iSCSI connections from each ring's own thread instead of
    /// one IO thread per server: less CPU per request and no hand-off between threads, but
    /// the socket work of all servers shares the ring's core.
    #[arg(verbatim_doc_comment, long)]
    pub iscsi_inline: bool,
}

/// A validated [`DiskArgs`]: what goes into an `open` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image spec, with an absolute path.
    pub image: String,
    /// The settings.
    pub options: VbdOptions,
}

impl DiskArgs {
    /// Checks every option; the image must exist.
    pub fn validate(&self) -> Result<Disk> {
        let image = validate_image(&self.image)?;
        if self.ring_order > MAX_RING_ORDER {
            bail!(
                "ring order {} is out of range: --ring-order takes 0..={MAX_RING_ORDER}",
                self.ring_order
            );
        }
        if !(1..=MAX_SEGMENTS).contains(&self.max_segments) {
            bail!(
                "max segments {} is out of range: --max-segments takes 1..={MAX_SEGMENTS}",
                self.max_segments
            );
        }
        if self.poll_us > 10_000 {
            bail!(
                "poll time {} µs is out of range: --poll-us takes 0..=10000",
                self.poll_us
            );
        }
        if self.max_indirect_segments > 4096 {
            bail!(
                "max indirect segments {} is out of range: --max-indirect-segments takes 0..=4096",
                self.max_indirect_segments
            );
        }
        if !(4..=65536).contains(&self.max_merge_kb) {
            bail!(
                "max merge size {} KiB is out of range: --max-merge-kb takes 4..=65536",
                self.max_merge_kb
            );
        }
        if self.batch_wait_us > 1_000_000 {
            bail!(
                "batch wait {} µs is out of range: --batch-wait-us takes 0..=1000000",
                self.batch_wait_us
            );
        }
        if self.trace > 16_000_000 {
            bail!(
                "trace size {} is out of range: --trace takes 0..=16000000",
                self.trace
            );
        }
        let early = self
            .early_read
            .as_deref()
            .map(|m| m.parse::<EarlyPolicy>().map_err(|e| anyhow!("{e}")))
            .transpose()?;
        let faults = self
            .inject_faults
            .as_deref()
            .map(|m| m.parse::<FaultPlan>().map_err(|e| anyhow!("{e}")))
            .transpose()?;
        let model = self
            .model_disk
            .as_deref()
            .map(|m| m.parse::<ModelParams>().map_err(|e| anyhow!("{e}")))
            .transpose()?;
        let nbd = self.nbd.as_deref().map(validate_nbd).transpose()?;
        if let Some(n) = self.cache_slots {
            if !(1..=MAX_CACHE_SLOTS).contains(&n) {
                bail!("cache slots {n} is out of range: --cache-slots takes 1..={MAX_CACHE_SLOTS}");
            }
            if !image.starts_with("parallax:") {
                bail!("--cache-slots is for parallax: images only");
            }
        }
        if self.iscsi_inline && !image.starts_with("stripe:") {
            bail!("--iscsi-inline is for stripe: images only");
        }
        Ok(Disk {
            image,
            options: VbdOptions {
                read_only: self.readonly,
                direct: self.direct.into(),
                // Both checked against ranges that fit a u8 just above.
                max_ring_order: self.ring_order as u8,
                max_segments: self.max_segments as u8,
                max_indirect_segments: self.max_indirect_segments as u16,
                merge: !self.no_merge,
                max_merge_kb: self.max_merge_kb,
                max_batch: self.max_batch,
                max_ios: self.max_ios,
                batch_wait_us: self.batch_wait_us,
                trace: self.trace,
                model,
                early,
                faults,
                nbd,
                poll_us: self.poll_us,
                cache_slots: self.cache_slots.unwrap_or(0),
                iscsi_inline: self.iscsi_inline,
            },
        })
    }
}

/// `path` made absolute against the current directory (the tapdisk has its own), without
/// resolving symlinks.
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .map_err(|e| anyhow!("cannot make {} absolute: {}", path.display(), io_msg(&e)))
}

/// Checks a disk spec and that its image exists and is a file or block device; returns the
/// spec with an absolute path. A `parallax:` image must be a Parallax image holding the volume
/// named (unless a tapdisk holds it open, which then checks it itself).
pub fn validate_image(spec: &str) -> Result<String> {
    let mut spec: ImageSpec = spec.parse().map_err(|e: String| anyhow!(e))?;
    let volume = match spec.driver {
        Driver::Aio | Driver::Stripe => None,
        Driver::Parallax => {
            let ds: DiskSpec = spec
                .path
                .to_str()
                .ok_or_else(|| anyhow!("image path {} is not UTF-8", spec.path.display()))?
                .parse()
                .map_err(|e: parallax::Error| anyhow!(e))?;
            spec.path = ds.path;
            ds.volume
        }
    };
    spec.path = absolute(&spec.path)?;
    let shown = spec.path.display();
    match std::fs::metadata(&spec.path) {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => {}
        Ok(_) => bail!("image {shown} is neither a regular file nor a block device"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("image {shown} does not exist")
        }
        Err(e) => bail!("cannot access image {shown}: {}", io_msg(&e)),
    }
    if spec.driver == Driver::Parallax {
        check_parallax(&spec.path, volume.as_deref())?;
        let ds = DiskSpec {
            path: spec.path,
            volume,
        };
        spec.path = PathBuf::from(ds.to_string());
    }
    Ok(spec.to_string())
}

/// Checks that `path` is a Parallax image with volume `volume` (its first disk if `None`).
fn check_parallax(path: &Path, volume: Option<&str>) -> Result<()> {
    let shown = path.display();
    let opts = parallax::OpenOptions {
        cache_slots: 1,
        read_only: true,
    };
    let img = match parallax::disk::open_image(path, &opts) {
        Ok(img) => img,
        // A tapdisk serves it (perhaps another volume of it): that tapdisk checks the spec.
        Err(parallax::Error::Locked(_)) => return Ok(()),
        Err(e) => bail!("image {shown}: {e}"),
    };
    let name = volume.unwrap_or(parallax::DEFAULT_VOLUME);
    if img.volume(name).is_err() {
        let names: Vec<&str> = img.volumes().iter().map(|v| v.name.as_str()).collect();
        bail!(
            "Parallax image {shown} has no volume named '{name}' (it has: {})",
            names.join(", ")
        );
    }
    Ok(())
}

/// Checks an NBD address; a unix socket path is made absolute and its folder must exist.
pub fn validate_nbd(addr: &str) -> Result<String> {
    let listen: NbdListen = addr.parse().map_err(|e: String| anyhow!(e))?;
    let listen = match listen {
        NbdListen::Unix(path) => {
            let path = absolute(&path)?;
            let dir = path.parent().unwrap_or(Path::new("/"));
            if !dir.is_dir() {
                bail!(
                    "NBD address '{addr}': folder {} for the socket does not exist",
                    dir.display()
                );
            }
            NbdListen::Unix(path)
        }
        tcp @ NbdListen::Tcp(_) => tcp,
    };
    Ok(listen.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(image: &str) -> DiskArgs {
        DiskArgs {
            image: image.into(),
            readonly: false,
            ring_order: MAX_RING_ORDER,
            max_segments: MAX_SEGMENTS,
            direct: Direct::Auto,
            nbd: None,
            poll_us: 0,
            max_indirect_segments: 256,
            no_merge: false,
            max_merge_kb: 1024,
            max_batch: 0,
            max_ios: 0,
            batch_wait_us: 0,
            trace: 0,
            model_disk: None,
            early_read: None,
            inject_faults: None,
            cache_slots: None,
            iscsi_inline: false,
        }
    }

    #[test]
    fn good_disk_validates() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let spec = format!("aio:{}", f.path().display());
        let mut a = disk(&spec);
        a.readonly = true;
        a.ring_order = 0;
        a.max_segments = 1;
        a.direct = Direct::Off;
        a.nbd = Some("tcp:127.0.0.1:0".into());
        let d = a.validate().unwrap();
        assert_eq!(d.image, spec);
        assert_eq!(
            d.options,
            VbdOptions {
                read_only: true,
                direct: DirectIo::Off,
                max_ring_order: 0,
                max_segments: 1,
                nbd: Some("tcp:127.0.0.1:0".into()),
                poll_us: 0,
                ..VbdOptions::default()
            }
        );
        assert_eq!(
            disk(&spec).validate().unwrap().options,
            VbdOptions::default()
        );
    }

    #[test]
    fn relative_paths_become_absolute() {
        let cwd = std::env::current_dir().unwrap();
        let img = validate_image("aio:Cargo.toml").unwrap();
        assert_eq!(img, format!("aio:{}", cwd.join("Cargo.toml").display()));
        let n = validate_nbd("unix:x.sock").unwrap();
        assert_eq!(n, format!("unix:{}", cwd.join("x.sock").display()));
    }

    #[test]
    fn bad_disks_are_named() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let good = format!("aio:{}", f.path().display());
        let err = |a: DiskArgs| a.validate().unwrap_err().to_string();
        assert!(err(disk("/tmp/x.img")).contains("disk spec '/tmp/x.img' has no type"));
        assert!(err(disk("vhd:/tmp/x.img")).contains("unknown disk type 'vhd'"));
        assert_eq!(
            err(disk("aio:/nonexistent/x.img")),
            "image /nonexistent/x.img does not exist"
        );
        assert!(err(disk("aio:/tmp")).contains("neither a regular file nor a block device"));
        let mut a = disk(&good);
        a.ring_order = 9;
        assert!(err(a).contains("ring order 9 is out of range"));
        let mut a = disk(&good);
        a.max_segments = 0;
        assert!(err(a).contains("max segments 0 is out of range"));
        let mut a = disk(&good);
        a.max_segments = 12;
        assert!(err(a).contains("max segments 12"));
    }

    #[test]
    fn parallax_specs_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.plx");
        let mut d = parallax::Disk::create(&p, &parallax::CreateOptions::new(1 << 20)).unwrap();
        let base = d.volume_id();
        d.image_mut().snapshot(base, "snap").unwrap();
        d.flush().unwrap();
        drop(d);
        let good = format!("parallax:{}@snap", p.display());
        assert_eq!(validate_image(&good).unwrap(), good);
        let err = |s: &str| validate_image(s).unwrap_err().to_string();
        assert_eq!(
            err(&format!("parallax:{}@other", p.display())),
            format!(
                "Parallax image {} has no volume named 'other' (it has: base, snap)",
                p.display()
            )
        );
        let raw = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(raw.path(), vec![0u8; 65536]).unwrap();
        let e = err(&format!("parallax:{}", raw.path().display()));
        assert!(e.contains("not a Parallax image"), "{e}");
        assert!(err(&format!("parallax:{}@bad name", p.display())).contains("disk spec"));
        assert_eq!(
            err("parallax:/nonexistent/x.plx@snap"),
            "image /nonexistent/x.plx does not exist"
        );
        let mut a = disk(&good);
        a.cache_slots = Some(10);
        assert_eq!(a.validate().unwrap().options.cache_slots, 10);
        a.cache_slots = Some(0);
        assert!(a
            .validate()
            .unwrap_err()
            .to_string()
            .contains("cache slots 0"));
        let mut a = disk(&format!("aio:{}", raw.path().display()));
        a.cache_slots = Some(10);
        assert!(a
            .validate()
            .unwrap_err()
            .to_string()
            .contains("parallax: images only"));
    }

    #[test]
    fn nbd_addresses() {
        assert_eq!(validate_nbd("tcp:[::1]:10809").unwrap(), "tcp:[::1]:10809");
        assert_eq!(
            validate_nbd("unix:/tmp/n.sock").unwrap(),
            "unix:/tmp/n.sock"
        );
        for bad in [
            "tcp:localhost",
            "tcp:1.2.3.4",
            "udp:1.2.3.4:5",
            "/tmp/s",
            "unix:",
        ] {
            assert!(
                validate_nbd(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("NBD address"),
                "{bad}"
            );
        }
        let e = validate_nbd("unix:/nonexistent/dir/n.sock")
            .unwrap_err()
            .to_string();
        assert!(e.contains("folder /nonexistent/dir"), "{e}");
    }
}
