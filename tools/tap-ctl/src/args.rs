//! Options shared by several verbs, and their validation: everything is checked before any
//! tapdisk is contacted or started, with the checks the daemon makes
//! ([`VbdSettings::validate_for`]) and the ranges of [`tapdisk_control::limits`], each named
//! by the flag that sets it.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use blkif::xen::backend::PersistentIo;
use clap::{Args, ValueEnum};
use tapdisk_control::limits::{self, Limit};
use tapdisk_control::{
    DirectIo, EarlyPolicy, FaultPlan, ImageSpec, ModelParams, NbdListen, VbdSettings,
};

use super::io_msg;

/// `text (MIN..=MAX)`: a help line with the range its value takes.
fn ranged(text: &str, limit: &Limit) -> String {
    format!("{text} ({})", limit.range())
}

/// The flag that sets a setting of [`VbdSettings`], by its protocol name.
fn flag_of(field: &str) -> Option<&'static str> {
    let top = field.split('.').next().unwrap_or(field);
    Some(match top {
        "max_ring_order" => "--ring-order",
        "max_segments" => "--max-segments",
        "max_indirect_segments" => "--max-indirect-segments",
        "max_merge_kb" => "--max-merge-kb",
        "batch_wait_us" => "--batch-wait-us",
        "trace" => "--trace",
        "poll_us" => "--poll-us",
        "cache_slots" => "--cache-slots",
        "iscsi_inline" => "--iscsi-inline",
        "force_share" => "--force-share",
        "takeover" => "--takeover",
        "early" => "--early-read",
        "faults" => "--inject-faults",
        "model" => "--model-disk",
        "nbd" => "--nbd",
        _ => return None,
    })
}

/// A settings error in tap-ctl's words: a range names the flag that takes it.
fn in_flags(e: tapdisk_control::Error) -> anyhow::Error {
    match e {
        tapdisk_control::Error::OutOfRange {
            field,
            what,
            unit,
            value,
            min,
            max,
        } => {
            let flag = flag_of(field).unwrap_or(field);
            crate::failure::fail(
                nix::errno::Errno::EINVAL,
                format!("{what} {value}{unit} is out of range: {flag} takes {min}..={max}"),
            )
        }
        other => anyhow!(other),
    }
}

/// blktap3's flags of `open` and `create` that tapdisk-rs honours differently or not at all:
/// accepted on the command line, so a caller gets a clear refusal rather than a usage error.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "blktap3's flags")]
pub struct CompatFlags {
    /// Do not open the image with O_DIRECT (the same as --direct off).
    #[arg(short = 'D')]
    pub no_o_direct: bool,
    /// blktap3's request timeout: how long a failing request is retried before it fails.
    /// tapdisk-rs never retries a failed request (it fails at once), so this holds already;
    /// accepted, and checked to be a number of seconds.
    #[arg(short = 't', value_name = "SECONDS")]
    pub timeout: Option<u32>,
    /// A read cache on the leaf image: not supported (refused).
    #[arg(short = 'r')]
    pub lcache: bool,
    /// Share the parent chain of another minor: not supported (refused).
    #[arg(short = 'e', value_name = "MINOR")]
    pub existing_parent: Option<String>,
    /// Mirror writes to a secondary image: not supported (refused).
    #[arg(short = '2', value_name = "PATH")]
    pub secondary: Option<String>,
    /// Fail over to the secondary on ENOSPC: not supported (refused).
    #[arg(short = 's')]
    pub standby: bool,
    /// Log changed blocks (CBT) to a file: not supported (refused).
    #[arg(short = 'C', value_name = "LOGFILE")]
    pub cbt_log: Option<String>,
    /// Read an encryption key on stdin: not supported (refused, nothing read).
    #[arg(short = 'E')]
    pub encrypted: bool,
}

impl CompatFlags {
    /// Refuses the flags tapdisk-rs does not implement, naming the first one given.
    pub fn check(&self) -> Result<()> {
        let refused = [
            (self.lcache, "-r (a read cache on the leaf image)"),
            (
                self.existing_parent.is_some(),
                "-e (sharing another minor's parent chain)",
            ),
            (self.secondary.is_some(), "-2 (a secondary image)"),
            (self.standby, "-s (standby failover)"),
            (self.cbt_log.is_some(), "-C (changed-block tracking)"),
            (self.encrypted, "-E (encrypted images)"),
        ];
        match refused.iter().find(|(given, _)| *given) {
            Some((_, what)) => Err(crate::failure::fail(
                nix::errno::Errno::EOPNOTSUPP,
                format!("blktap3's {what} is not supported by tapdisk-rs"),
            )),
            None => Ok(()),
        }
    }
}

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
    /// O_DIRECT where the file system supports it, the page cache otherwise; image files'
    /// sequential read streams use the page cache (its readahead).
    Auto,
    /// O_DIRECT for every aligned IO; refuse to open the image if it cannot be had.
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

/// Where a Xen ring with persistent grants does its IO, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PersistentIoArg {
    /// Through the ring's own pages: the data is copied from the guest's persistent pages
    /// before a write and to them after a read (a write's data read from the guest once)
    Staged,
    /// On the guest's persistent pages themselves, no copy
    Direct,
}

impl From<PersistentIoArg> for PersistentIo {
    fn from(p: PersistentIoArg) -> PersistentIo {
        match p {
            PersistentIoArg::Staged => PersistentIo::Staged,
            PersistentIoArg::Direct => PersistentIo::Direct,
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
    ///        vhd (a VHD image, blktap's format: fixed, dynamic, or a differencing disk
    ///        read through its parents; see vhd-util),
    ///        stripe (PATH is a mapping file made by stripe-img: a disk striped over
    ///        iSCSI servers),
    ///        qcow2 (a qcow2 image, versions 2 and 3, with its backing files: made by
    ///        qemu-img; backing files are opened read-only).
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
    /// Largest ring order offered to frontends: rings of up to 2^N pages.
    #[arg(
        long,
        value_name = "N",
        default_value_t = VbdSettings::DEFAULT.max_ring_order.into(),
        help = ranged(
            "Largest ring order offered to frontends: rings of up to 2^N pages",
            &limits::MAX_RING_ORDER,
        ),
    )]
    pub ring_order: u32,
    /// Segments per request offered to frontends.
    #[arg(
        long,
        value_name = "N",
        default_value_t = VbdSettings::DEFAULT.max_segments.into(),
        help = ranged("Segments per request offered to frontends", &limits::MAX_SEGMENTS),
    )]
    pub max_segments: u32,
    /// Whether the image is opened with O_DIRECT, bypassing the page cache
    #[arg(long, value_enum, value_name = "MODE", default_value_t = Direct::Auto)]
    pub direct: Direct,
    /// Xen guests with persistent grants: where a request's IO goes (see docs/xen.md)
    #[arg(long, value_enum, value_name = "MODE", default_value_t = PersistentIoArg::Staged)]
    pub persistent_io: PersistentIoArg,
    /// Also export the disk over NBD at ADDRESS: unix:PATH or tcp:IP:PORT
    ///
    /// Examples: unix:/run/vm1.nbd, tcp:127.0.0.1:10809, tcp:[::1]:10809.
    /// Port 0 picks a free port; 'tap-ctl list' shows which.
    #[arg(verbatim_doc_comment, long, value_name = "ADDRESS")]
    pub nbd: Option<String>,
    /// Before sleeping, each ring loop polls its ring for up to US microseconds.
    #[arg(
        long,
        value_name = "US",
        default_value_t = VbdSettings::DEFAULT.poll_us,
        help = ranged(
            "Before sleeping, each ring loop polls its ring for up to US microseconds",
            &limits::POLL_US,
        ),
        long_help = format!(
            "{}\n\nTrades CPU for latency under dense load; 0 (the default) never polls.",
            ranged(
                "Before sleeping, each ring loop polls its ring for up to US microseconds",
                &limits::POLL_US,
            )
        ),
    )]
    pub poll_us: u32,
    /// Segments per indirect request offered to frontends (0 turns BLKIF_OP_INDIRECT off).
    #[arg(
        long,
        value_name = "N",
        default_value_t = VbdSettings::DEFAULT.max_indirect_segments.into(),
        help = format!(
            "Segments per indirect request offered to frontends ({}; 0 turns\n\
             BLKIF_OP_INDIRECT off). 256 = 1 MiB per request, as Linux blkback; {} = {} MiB.",
            limits::MAX_INDIRECT_SEGMENTS.range(),
            limits::MAX_INDIRECT_SEGMENTS.max,
            limits::MAX_INDIRECT_SEGMENTS.max * 4096 >> 20,
        ),
    )]
    pub max_indirect_segments: u32,
    /// Do not sort and merge requests: each ring request becomes its own IO
    #[arg(long)]
    pub no_merge: bool,
    /// Largest IO the scheduler builds by merging requests, KiB.
    #[arg(
        long,
        value_name = "KIB",
        default_value_t = VbdSettings::DEFAULT.max_merge_kb,
        help = ranged(
            "Largest IO the scheduler builds by merging requests, KiB",
            &limits::MAX_MERGE_KB,
        ),
    )]
    pub max_merge_kb: u32,
    /// Requests taken from a ring at a time (0: half of what the frontend keeps outstanding,
    /// at least 8, so that it refills the ring while the rest are served)
    #[arg(long, value_name = "N", default_value_t = VbdSettings::DEFAULT.max_batch)]
    pub max_batch: u32,
    /// Backend IOs in flight per ring at most (0: unlimited); the rest wait in the scheduler,
    /// where later requests can still be sorted and merged with them
    #[arg(long, value_name = "N", default_value_t = VbdSettings::DEFAULT.max_ios)]
    pub max_ios: u32,
    /// Wait up to US microseconds for a batch to fill before starting its IO.
    #[arg(
        long,
        value_name = "US",
        default_value_t = VbdSettings::DEFAULT.batch_wait_us,
        help = ranged(
            "Wait up to US microseconds for a batch to fill before starting its IO",
            &limits::BATCH_WAIT_US,
        ),
        long_help = format!(
            "{}\n\nMore requests per batch means more to merge, at the cost of latency; 0 never \
             waits.",
            ranged(
                "Wait up to US microseconds for a batch to fill before starting its IO",
                &limits::BATCH_WAIT_US,
            )
        ),
    )]
    pub batch_wait_us: u32,
    /// Record a trace of up to N requests per ring (see 'tap-ctl trace'; 0: off).
    #[arg(
        long,
        value_name = "N",
        default_value_t = VbdSettings::DEFAULT.trace,
        help = format!(
            "Record a trace of up to N requests per ring (see 'tap-ctl trace'; 0: off; {})",
            limits::TRACE.range()
        ),
    )]
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
    /// Metadata cache slots of a parallax:, vhd: or qcow2: image (0: the driver's default).
    #[arg(
        long,
        value_name = "N",
        help = format!(
            "Metadata cache slots of a parallax: image ({}; 0 or none: the driver's default,\n\
             128 nodes of 4 KiB; the thesis's first Parallax had 10), or of each image of a\n\
             vhd: chain (512-byte BAT and bitmap sectors; default 1024) or of a qcow2: chain\n\
             (L2 and refcount slices of up to 4 KiB). Volumes of one image, and parents\n\
             shared by several chains, keep the cache of the first one opened.",
            limits::CACHE_SLOTS.range()
        ),
    )]
    pub cache_slots: Option<u32>,
    /// Drive a stripe: image's iSCSI connections from each ring's own thread instead of
    /// one IO thread per server: less CPU per request and no hand-off between threads, but
    /// the socket work of all servers shares the ring's core.
    #[arg(verbatim_doc_comment, long)]
    pub iscsi_inline: bool,
    /// Open a stripe: disk kept in etcd even if another tapdisk, on any host, holds it: this
    /// one takes the writer role and fences the other at the storage servers (their late
    /// writes are refused). For a hand-off: pause the disk there first (docs/operations.md).
    #[arg(verbatim_doc_comment, long)]
    pub takeover: bool,
    /// Serve an aio: image even if another VBD or process holds its lock. A read-write VBD
    /// locks its image for itself, a read-only one shares it with other readers; without this
    /// flag an image in use is refused, naming the holder.
    #[arg(verbatim_doc_comment, long)]
    pub force_share: bool,
    /// blktap3's flags.
    #[command(flatten)]
    pub compat: CompatFlags,
}

/// A validated [`DiskArgs`]: what goes into an `open` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image, with an absolute path.
    pub image: ImageSpec,
    /// The settings.
    pub settings: VbdSettings,
}

/// An option's value parsed as `T`, its error in the option's words.
fn parsed<T>(v: Option<&str>) -> Result<Option<T>>
where
    T: std::str::FromStr<Err = tapdisk_control::Error>,
{
    v.map(|v| v.parse::<T>().map_err(in_flags)).transpose()
}

impl DiskArgs {
    /// Checks every option; the image must exist.
    pub fn validate(&self) -> Result<Disk> {
        self.compat.check()?;
        let image = validate_image(&self.image)?;
        let direct = match (self.compat.no_o_direct, self.direct) {
            (false, d) => d.into(),
            (true, Direct::Auto | Direct::Off) => DirectIo::Off,
            (true, Direct::On) => {
                return Err(crate::failure::fail(
                    nix::errno::Errno::EINVAL,
                    "-D (no O_DIRECT) contradicts --direct on",
                ))
            }
        };
        let settings = VbdSettings {
            read_only: self.readonly,
            direct,
            persistent_io: self.persistent_io.into(),
            max_ring_order: limits::MAX_RING_ORDER
                .fit(self.ring_order.into())
                .map_err(in_flags)?,
            max_segments: limits::MAX_SEGMENTS
                .fit(self.max_segments.into())
                .map_err(in_flags)?,
            max_indirect_segments: limits::MAX_INDIRECT_SEGMENTS
                .fit(self.max_indirect_segments.into())
                .map_err(in_flags)?,
            merge: !self.no_merge,
            max_merge_kb: self.max_merge_kb,
            max_batch: self.max_batch,
            max_ios: self.max_ios,
            batch_wait_us: self.batch_wait_us,
            trace: self.trace,
            model: parsed::<ModelParams>(self.model_disk.as_deref())?,
            early: parsed::<EarlyPolicy>(self.early_read.as_deref())?,
            faults: parsed::<FaultPlan>(self.inject_faults.as_deref())?,
            nbd: self.nbd.as_deref().map(validate_nbd).transpose()?,
            poll_us: self.poll_us,
            cache_slots: self.cache_slots.unwrap_or(0),
            iscsi_inline: self.iscsi_inline,
            force_share: self.force_share,
            takeover: self.takeover,
        };
        settings.validate_for(&image).map_err(in_flags)?;
        Ok(Disk { image, settings })
    }
}

/// `path` made absolute against the current directory (the tapdisk has its own), without
/// resolving symlinks.
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .map_err(|e| anyhow!("cannot make {} absolute: {}", path.display(), io_msg(&e)))
}

/// Checks a disk spec and that its image exists and is a file or block device; returns the
/// spec with an absolute path. What is inside the image (a Parallax image holding the volume
/// named, a mapping file) the tapdisk checks when it opens it.
pub fn validate_image(spec: &str) -> Result<ImageSpec> {
    let mut spec: ImageSpec = spec.parse()?;
    spec.path = absolute(&spec.path)?;
    let shown = crate::ctx::shown(&spec.path);
    match std::fs::metadata(&spec.path) {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => {}
        Ok(_) => {
            return Err(crate::failure::fail(
                nix::errno::Errno::EINVAL,
                format!("image {shown} is neither a regular file nor a block device"),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(crate::failure::fail(
                nix::errno::Errno::ENOENT,
                format!("image {shown} does not exist"),
            ))
        }
        Err(e) => {
            return Err(anyhow!(e).context(format!("cannot access image {shown}")));
        }
    }
    Ok(spec)
}

/// Checks an NBD address; a unix socket path is made absolute and its folder must exist.
pub fn validate_nbd(addr: &str) -> Result<NbdListen> {
    let listen: NbdListen = addr.parse()?;
    Ok(match listen {
        NbdListen::Unix(path) => {
            let path = absolute(&path)?;
            let dir = path.parent().unwrap_or(Path::new("/"));
            if !dir.is_dir() {
                return Err(crate::failure::fail(
                    nix::errno::Errno::ENOENT,
                    format!(
                        "NBD address '{addr}': folder {} for the socket does not exist",
                        dir.display()
                    ),
                ));
            }
            NbdListen::Unix(path)
        }
        tcp @ NbdListen::Tcp(_) => tcp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        disk: DiskArgs,
    }

    /// The options as the command line gives them, defaults and all.
    fn disk(image: &str, more: &[&str]) -> DiskArgs {
        let args = ["x", "-a", image].into_iter().chain(more.iter().copied());
        Cmd::try_parse_from(args).unwrap().disk
    }

    #[test]
    fn good_disk_validates() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let spec = format!("aio:{}", f.path().display());
        let args = [
            "-R",
            "--ring-order",
            "0",
            "--max-segments",
            "1",
            "--direct",
            "off",
            "--persistent-io",
            "direct",
            "--nbd",
            "tcp:127.0.0.1:0",
        ];
        let d = disk(&spec, &args).validate().unwrap();
        assert_eq!(d.image.to_string(), spec);
        assert_eq!(
            d.settings,
            VbdSettings {
                read_only: true,
                direct: DirectIo::Off,
                persistent_io: PersistentIo::Direct,
                max_ring_order: 0,
                max_segments: 1,
                nbd: Some("tcp:127.0.0.1:0".parse().unwrap()),
                ..VbdSettings::default()
            }
        );
        // The command line's defaults are the settings' defaults.
        assert_eq!(
            disk(&spec, &[]).validate().unwrap().settings,
            VbdSettings::default()
        );
    }

    #[test]
    fn relative_paths_become_absolute() {
        let cwd = std::env::current_dir().unwrap();
        let img = validate_image("aio:Cargo.toml").unwrap();
        assert_eq!(
            img.to_string(),
            format!("aio:{}", cwd.join("Cargo.toml").display())
        );
        let n = validate_nbd("unix:x.sock").unwrap();
        assert_eq!(n, NbdListen::Unix(cwd.join("x.sock")));
    }

    #[test]
    fn bad_disks_are_named() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let good = format!("aio:{}", f.path().display());
        let err = |a: DiskArgs| a.validate().unwrap_err().to_string();
        assert!(err(disk("/tmp/x.img", &[])).contains("disk spec '/tmp/x.img' has no type"));
        assert!(err(disk("qed:/tmp/x.img", &[])).contains("unknown disk type 'qed'"));
        assert_eq!(
            err(disk("aio:/nonexistent/x.img", &[])),
            "image /nonexistent/x.img does not exist"
        );
        assert!(err(disk("aio:/tmp", &[])).contains("neither a regular file nor a block device"));
        for (flags, says) in [
            (
                &["--ring-order", "9"][..],
                "ring order 9 is out of range: --ring-order takes 0..=8",
            ),
            (
                &["--ring-order", "300"],
                "ring order 300 is out of range: --ring-order takes 0..=8",
            ),
            (
                &["--max-segments", "0"],
                "max segments 0 is out of range: --max-segments takes 1..=11",
            ),
            (&["--max-segments", "12"], "max segments 12"),
            (
                &["--max-indirect-segments", "70000"],
                "--max-indirect-segments takes 0..=4096",
            ),
            (
                &["--poll-us", "10001"],
                "poll time 10001 µs is out of range: --poll-us takes 0..=10000",
            ),
            (&["--max-merge-kb", "2"], "--max-merge-kb takes 4..=65536"),
            (&["--batch-wait-us", "1000001"], "--batch-wait-us takes"),
            (&["--trace", "16000001"], "--trace takes 0..=16000000"),
            (
                &["--early-read", "percent=250"],
                "early-read percent 250% is out of range: --early-read takes 0..=100",
            ),
            (&["--early-read", "chunk=0"], "--early-read takes 4..=16384"),
            (
                &["--inject-faults", "fail=1000001"],
                "--inject-faults takes 0..=1000000",
            ),
            (&["--model-disk", "link:1,0"], "--model-disk takes 1..="),
            (
                &["--cache-slots", "10"],
                "parallax:, vhd: and qcow2: images only",
            ),
            (
                &["--cache-slots", "2000000"],
                "--cache-slots takes 0..=1048576",
            ),
            (&["--iscsi-inline"], "stripe: images only"),
            (&["--nbd", "tcp:localhost"], "NBD address"),
        ] {
            let e = err(disk(&good, flags));
            assert!(e.contains(says), "{flags:?}: {e}");
        }
    }

    #[test]
    fn parallax_specs_are_passed_on_structured() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let spec = format!("parallax:{}@snap", f.path().display());
        let d = disk(&spec, &["--cache-slots", "10"]).validate().unwrap();
        assert_eq!(d.image.path, f.path());
        assert_eq!(d.image.volume.as_deref(), Some("snap"));
        assert_eq!(d.settings.cache_slots, 10);
        // What is inside the image is the tapdisk's to check; a missing file is ours.
        assert_eq!(
            validate_image("parallax:/nonexistent/x.plx@snap")
                .unwrap_err()
                .to_string(),
            "image /nonexistent/x.plx does not exist"
        );
        assert!(validate_image("parallax:@snap")
            .unwrap_err()
            .to_string()
            .contains("no image path"));
    }

    #[test]
    fn nbd_addresses() {
        assert_eq!(
            validate_nbd("tcp:[::1]:10809").unwrap().to_string(),
            "tcp:[::1]:10809"
        );
        assert_eq!(
            validate_nbd("unix:/tmp/n.sock").unwrap().to_string(),
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
