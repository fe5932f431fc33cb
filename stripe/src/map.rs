//! The mapping file (thesis section 5.2): the geometry of one striped virtual disk and where
//! each of its extents lives, held under an exclusive `flock` by the tapdisk that serves it.
//!
//! # Format (version 1)
//!
//! UTF-8 text, one item a line, fields separated by single spaces, lines ending in `\n`, in
//! exactly this order:
//!
//! ```text
//! tapdisk-stripe-map 1
//! disk-id vm1-3f2a9c
//! master 10.0.0.1:20049
//! size 1073741824
//! stripes 2
//! stripe-size 65536
//! replicas 2
//! extent-size 268435456
//! extents 4
//! extent 0 0 169.254.101.2:3260 iqn.2026-11.rs.tapdisk:srv1 1 0
//! extent 0 1 169.254.102.2:3260 iqn.2026-11.rs.tapdisk:srv2 1 0
//! ...
//! crc32c 5d0f1e2a
//! ```
//!
//! - `disk-id`: the id the master knows the disk by; `master`: where it was allocated (`-` for a
//!   map written by hand).
//! - `size`: bytes, a multiple of 512. `stripe-size`: bytes, a multiple of 4096.
//!   `extent-size`: bytes, a multiple of the stripe size. `stripes`: 1..=256. `replicas`: 1..=8.
//! - `extents N`: the number of extent indexes, which must be what the geometry needs (see
//!   [`Geometry::extent_count`]); then `N * replicas` lines `extent INDEX REPLICA PORTAL TARGET
//!   LUN ADDR`, sorted by index then replica, each index with every replica: `ADDR` is the
//!   byte offset on the LUN, a multiple of 4096. No two extents may overlap on one LUN, and the
//!   replicas of one index lie on distinct portals.
//! - `crc32c`: the CRC32C (Castagnoli) of every byte before this line, as 8 lowercase hex
//!   digits; the file ends after its newline.
//!
//! # Layout
//!
//! The disk is cut into stripe units of `stripe-size` bytes; unit `u` belongs to stripe
//! (column) `u % stripes`, at row `u / stripes`. Each column is a chain of extents: byte `co` of
//! a column lies in its extent `co / extent-size`, whose extent index in the file is
//! `(co / extent-size) * stripes + column`. So consecutive stripe units go to consecutive
//! extent indexes, which the master places on different servers.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::Error;

/// A mapping or geometry that breaks the format's rules (the caller names the file).
fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// The first line's magic word.
pub const MAGIC: &str = "tapdisk-stripe-map";
/// The format version of a file-backed disk's map (written and read).
pub const VERSION: u32 = 1;
/// The format version of an etcd-backed disk's local cache (written and read): version 1 with
/// two more lines after `master`, `store etcd ENDPOINTS PREFIX` (endpoints separated by
/// commas) and `generation N` (the record's generation this cache holds).
pub const VERSION_ETCD: u32 = 2;
/// Largest mapping file read.
pub const MAX_FILE: u64 = 64 << 20;
/// Most stripes.
pub const MAX_STRIPES: u32 = 256;
/// Most replicas.
pub const MAX_REPLICAS: u32 = 8;
/// Most extent indexes.
pub const MAX_EXTENTS: u32 = 1 << 20;

/// The shape of a striped disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Geometry {
    /// Bytes.
    pub size: u64,
    /// Stripes (columns).
    pub stripes: u32,
    /// Bytes per stripe unit.
    pub stripe_size: u64,
    /// Copies of each extent.
    pub replicas: u32,
    /// Bytes per extent.
    pub extent_size: u64,
}

/// Where a byte of the disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Extent index.
    pub index: u32,
    /// Byte offset inside the extent.
    pub offset: u64,
    /// Bytes from there to the end of the stripe unit (the most one piece can cover).
    pub run: u64,
}

impl Geometry {
    /// Checks the numbers (not the extents).
    pub fn check(&self) -> Result<(), Error> {
        if self.size == 0 || !self.size.is_multiple_of(512) {
            return Err(invalid(format!(
                "size {} is not a positive multiple of 512",
                self.size
            )));
        }
        if self.stripes == 0 || self.stripes > MAX_STRIPES {
            return Err(invalid(format!(
                "stripes {} is not in 1..={MAX_STRIPES}",
                self.stripes
            )));
        }
        if self.stripe_size == 0
            || !self.stripe_size.is_multiple_of(4096)
            || self.stripe_size > 1 << 30
        {
            return Err(invalid(format!(
                "stripe size {} is not a positive multiple of 4096 up to 1 GiB",
                self.stripe_size
            )));
        }
        if self.replicas == 0 || self.replicas > MAX_REPLICAS {
            return Err(invalid(format!(
                "replicas {} is not in 1..={MAX_REPLICAS}",
                self.replicas
            )));
        }
        if self.extent_size == 0 || !self.extent_size.is_multiple_of(self.stripe_size) {
            return Err(invalid(format!(
                "extent size {} is not a positive multiple of the stripe size {}",
                self.extent_size, self.stripe_size
            )));
        }
        match self.extent_count_u64() {
            Some(n) if n <= u64::from(MAX_EXTENTS) => Ok(()),
            _ => Err(invalid(format!(
                "the disk needs more than {MAX_EXTENTS} extents"
            ))),
        }
    }

    fn extent_count_u64(&self) -> Option<u64> {
        let units = self.size.div_ceil(self.stripe_size);
        let rows = units.div_ceil(u64::from(self.stripes));
        let col = rows.checked_mul(self.stripe_size)?;
        let per_col = col.div_ceil(self.extent_size);
        per_col.checked_mul(u64::from(self.stripes))
    }

    /// Extent indexes the disk needs: `stripes` times the extents one column needs.
    pub fn extent_count(&self) -> u32 {
        self.extent_count_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(u32::MAX)
    }

    /// Where byte `off` of the disk lives (`off < size`; the geometry checked).
    #[inline]
    pub fn locate(&self, off: u64) -> Location {
        let unit = off / self.stripe_size;
        let within = off % self.stripe_size;
        let n = u64::from(self.stripes);
        let col = unit % n;
        let row = unit / n;
        let co = row * self.stripe_size + within;
        let k = co / self.extent_size;
        Location {
            index: (k * n + col) as u32,
            offset: co % self.extent_size,
            run: self.stripe_size - within,
        }
    }
}

/// One replica of one extent index: `len = extent-size` bytes at `addr` on a LUN.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapExtent {
    /// `host:port` of the iSCSI portal.
    pub portal: String,
    /// Target IQN.
    pub target: String,
    /// LUN.
    pub lun: u16,
    /// Byte offset on the LUN.
    pub addr: u64,
}

/// Where a disk's record lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Store {
    /// The mapping file is the record (format version 1), locked with `flock` while served.
    #[default]
    File,
    /// The record is in etcd and the file is this host's cache of it (format version 2).
    Etcd {
        /// Client URLs of the etcd members.
        endpoints: Vec<String>,
        /// The key prefix of the stripe keyspace.
        prefix: String,
        /// The record's generation the file holds.
        generation: u64,
    },
}

/// A parsed, validated mapping file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeMap {
    /// The master's id of the disk.
    pub disk_id: String,
    /// The master it came from (`-`: none).
    pub master: String,
    /// The shape.
    pub geometry: Geometry,
    /// `extents[index][replica]`.
    pub extents: Vec<Vec<MapExtent>>,
    /// Where the record lives.
    pub store: Store,
}

fn word_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl StripeMap {
    /// Checks everything the format promises (see the module docs).
    pub fn check(&self) -> Result<(), Error> {
        let g = &self.geometry;
        g.check()?;
        if !word_ok(&self.disk_id) {
            return Err(invalid(format!(
                "disk id {:?} is not one printable word",
                self.disk_id
            )));
        }
        if !word_ok(&self.master) {
            return Err(invalid(format!(
                "master {:?} is not one printable word",
                self.master
            )));
        }
        let want = g.extent_count();
        if self.extents.len() != want as usize {
            return Err(invalid(format!(
                "the geometry needs {want} extent indexes, the map has {}",
                self.extents.len()
            )));
        }
        let mut all = Vec::with_capacity(self.extents.len() * g.replicas as usize);
        for (i, reps) in self.extents.iter().enumerate() {
            if reps.len() != g.replicas as usize {
                return Err(invalid(format!(
                    "extent index {i} has {} replicas, not {}",
                    reps.len(),
                    g.replicas
                )));
            }
            for (r, x) in reps.iter().enumerate() {
                if !word_ok(&x.portal) || !word_ok(&x.target) {
                    return Err(invalid(format!(
                        "extent {i} replica {r}: portal or target is not one printable word"
                    )));
                }
                if x.addr % 4096 != 0 || x.addr.checked_add(g.extent_size).is_none() {
                    return Err(invalid(format!(
                        "extent {i} replica {r}: address {} is not a multiple of 4096 or too large",
                        x.addr
                    )));
                }
                if reps[..r].iter().any(|y| y.portal == x.portal) {
                    return Err(invalid(format!(
                        "extent {i}: replicas {r} and another share portal {}",
                        x.portal
                    )));
                }
                all.push((x.portal.as_str(), x.target.as_str(), x.lun, x.addr, i, r));
            }
        }
        all.sort_unstable();
        for w in all.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if a.0 == b.0 && a.1 == b.1 && a.2 == b.2 && b.3 < a.3 + g.extent_size {
                return Err(invalid(format!(
                    "extents {} (replica {}) and {} (replica {}) overlap on {} {} LUN {}",
                    a.4, a.5, b.4, b.5, a.0, a.1, a.2
                )));
            }
        }
        Ok(())
    }

    /// The file's text (checksum included).
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let g = &self.geometry;
        let mut s = String::new();
        match &self.store {
            Store::File => {
                let _ = writeln!(s, "{MAGIC} {VERSION}");
                let _ = writeln!(s, "disk-id {}", self.disk_id);
                let _ = writeln!(s, "master {}", self.master);
            }
            Store::Etcd {
                endpoints,
                prefix,
                generation,
            } => {
                let _ = writeln!(s, "{MAGIC} {VERSION_ETCD}");
                let _ = writeln!(s, "disk-id {}", self.disk_id);
                let _ = writeln!(s, "master {}", self.master);
                let _ = writeln!(s, "store etcd {} {prefix}", endpoints.join(","));
                let _ = writeln!(s, "generation {generation}");
            }
        }
        let _ = writeln!(s, "size {}", g.size);
        let _ = writeln!(s, "stripes {}", g.stripes);
        let _ = writeln!(s, "stripe-size {}", g.stripe_size);
        let _ = writeln!(s, "replicas {}", g.replicas);
        let _ = writeln!(s, "extent-size {}", g.extent_size);
        let _ = writeln!(s, "extents {}", self.extents.len());
        for (i, reps) in self.extents.iter().enumerate() {
            for (r, x) in reps.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "extent {i} {r} {} {} {} {}",
                    x.portal, x.target, x.lun, x.addr
                );
            }
        }
        let crc = crc32c::crc32c(s.as_bytes());
        let _ = writeln!(s, "crc32c {crc:08x}");
        s
    }

    /// Parses and validates a mapping file's bytes (untrusted: fuzzed by
    /// `fuzz/fuzz_targets/stripe_map.rs`).
    pub fn parse(b: &[u8]) -> Result<StripeMap, Error> {
        if b.len() as u64 > MAX_FILE {
            return Err(invalid(format!("longer than {MAX_FILE} bytes")));
        }
        let text = std::str::from_utf8(b).map_err(|_| invalid("not UTF-8 text"))?;
        let body_end = text
            .strip_suffix('\n')
            .and_then(|t| t.rfind('\n'))
            .map(|i| i + 1)
            .ok_or_else(|| invalid("no checksum line at the end"))?;
        let (body, last) = text.split_at(body_end);
        let crc_hex = last
            .strip_prefix("crc32c ")
            .and_then(|l| l.strip_suffix('\n'))
            .filter(|h| h.len() == 8 && h.bytes().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| invalid("the last line is not `crc32c XXXXXXXX`"))?;
        let want = u32::from_str_radix(crc_hex, 16).map_err(|e| invalid(e.to_string()))?;
        let got = crc32c::crc32c(body.as_bytes());
        if got != want {
            return Err(invalid(format!(
                "checksum mismatch: the file says {want:08x}, its contents give {got:08x} (damaged or edited)"
            )));
        }
        let mut lines = body.lines().enumerate().map(|(n, l)| (n + 1, l));
        let mut header = |key: &str| -> Result<String, Error> {
            let (n, l) = lines
                .next()
                .ok_or_else(|| invalid(format!("missing `{key}` line")))?;
            let v = l
                .strip_prefix(key)
                .and_then(|v| v.strip_prefix(' '))
                .ok_or_else(|| invalid(format!("line {n}: expected `{key} ...`")))?;
            Ok(v.to_owned())
        };
        let version = header(MAGIC).map_err(|_| {
            invalid(format!(
                "not a stripe mapping file (no `{MAGIC}` line first)"
            ))
        })?;
        let etcd = if version == VERSION.to_string() {
            false
        } else if version == VERSION_ETCD.to_string() {
            true
        } else {
            return Err(invalid(format!(
                "format version {version:?} is not {VERSION} or {VERSION_ETCD}"
            )));
        };
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, Error> {
            v.parse()
                .map_err(|_| invalid(format!("{key} {v:?} is not a number in range")))
        }
        let disk_id = header("disk-id")?;
        let master = header("master")?;
        let store = if etcd {
            let st = header("store")?;
            let (kind, rest) = st.split_once(' ').unwrap_or((st.as_str(), ""));
            let (eps, prefix) = rest.split_once(' ').unwrap_or((rest, ""));
            if kind != "etcd" || eps.is_empty() || !word_ok(prefix) || !word_ok(eps) {
                return Err(invalid(
                    "the store line is not `store etcd ENDPOINT[,ENDPOINT...] PREFIX`",
                ));
            }
            let generation = num("generation", &header("generation")?)?;
            Store::Etcd {
                endpoints: eps.split(',').map(str::to_owned).collect(),
                prefix: prefix.to_owned(),
                generation,
            }
        } else {
            Store::File
        };
        let size = num("size", &header("size")?)?;
        let stripes = num("stripes", &header("stripes")?)?;
        let stripe_size = num("stripe-size", &header("stripe-size")?)?;
        let replicas = num("replicas", &header("replicas")?)?;
        let extent_size = num("extent-size", &header("extent-size")?)?;
        let geometry = Geometry {
            size,
            stripes,
            stripe_size,
            replicas,
            extent_size,
        };
        geometry.check()?;
        let count: u32 = num("extents", &header("extents")?)?;
        if count != geometry.extent_count() {
            return Err(invalid(format!(
                "extents {count}: the geometry needs {}",
                geometry.extent_count()
            )));
        }
        let mut extents: Vec<Vec<MapExtent>> = Vec::with_capacity(count as usize);
        for i in 0..count {
            let mut reps = Vec::with_capacity(replicas as usize);
            for r in 0..replicas {
                let (n, l) = lines
                    .next()
                    .ok_or_else(|| invalid(format!("missing extent {i} replica {r}")))?;
                let f: Vec<&str> = l.splitn(8, ' ').collect();
                if f.len() != 7 || f[0] != "extent" {
                    return Err(invalid(format!(
                        "line {n}: expected `extent INDEX REPLICA PORTAL TARGET LUN ADDR`"
                    )));
                }
                if f[1] != i.to_string() || f[2] != r.to_string() {
                    return Err(invalid(format!(
                        "line {n}: expected extent {i} replica {r} here"
                    )));
                }
                reps.push(MapExtent {
                    portal: f[3].to_owned(),
                    target: f[4].to_owned(),
                    lun: num(&format!("line {n}: LUN"), f[5])?,
                    addr: num(&format!("line {n}: address"), f[6])?,
                });
            }
            extents.push(reps);
        }
        if let Some((n, _)) = lines.next() {
            return Err(invalid(format!(
                "line {n}: unexpected after the last extent"
            )));
        }
        let m = StripeMap {
            disk_id,
            master,
            geometry,
            extents,
            store,
        };
        m.check()?;
        Ok(m)
    }

    /// Reads and parses a file (without locking it).
    pub fn read(path: &Path) -> Result<StripeMap, Error> {
        let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        StripeMap::parse(&b).map_err(|e| Error::BadMap {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
    }

    /// Writes a new file atomically (temporary file, fsync, rename, fsync the folder).
    pub fn write_new(&self, path: &Path) -> Result<(), Error> {
        use std::io::Write;
        self.check().map_err(|e| Error::BadMap {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().ok_or_else(|| Error::BadMap {
            path: path.to_path_buf(),
            why: "no file name".into(),
        })?;
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let r = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(self.to_text().as_bytes())?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, path)?;
            File::open(&dir)?.sync_all()
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r.map_err(|e| Error::io(path, e))
    }
}

/// A mapping file opened and locked (`flock(LOCK_EX)`) for one tapdisk; unlocked on drop.
#[derive(Debug)]
pub struct LockedMap {
    /// The file's path.
    pub path: PathBuf,
    /// Its contents.
    pub map: StripeMap,
    _file: File,
}

impl LockedMap {
    /// Opens `path`, takes the exclusive lock (failing at once with [`Error::InUse`] naming the
    /// holder's pid if another process has it), then reads and validates it.
    pub fn open(path: &Path) -> Result<LockedMap, Error> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::InUse {
                    path: path.to_path_buf(),
                    holder: flock_holder(path),
                });
            }
            return Err(Error::io(path, e));
        }
        let meta = f.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() || meta.len() > MAX_FILE {
            return Err(Error::BadMap {
                path: path.to_path_buf(),
                why: format!("not a regular file of at most {MAX_FILE} bytes"),
            });
        }
        let mut b = Vec::with_capacity(meta.len() as usize);
        use std::io::Read;
        (&f).take(MAX_FILE + 1)
            .read_to_end(&mut b)
            .map_err(|e| Error::io(path, e))?;
        let map = StripeMap::parse(&b).map_err(|e| Error::BadMap {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        Ok(LockedMap {
            path: path.to_path_buf(),
            map,
            _file: f,
        })
    }
}

/// The pid holding a `flock` on `path` (None if it cannot be told).
///
/// `/proc/locks` lists every flock with its holder's pid and `MAJOR:MINOR:INODE`, but on overlay
/// and container filesystems those numbers need not be the ones `stat` reports, and another
/// container's lock can carry the same inode number. So the device and inode printed there are
/// not trusted: each pid listed as holding a flock is confirmed by finding one of its open files
/// that is this file (same device and inode through `/proc/PID/fd`) and carries the lock in its
/// `/proc/PID/fdinfo`. Only when no holder can be confirmed (their descriptors are not readable
/// to us) is an exact `MAJOR:MINOR:INODE` match taken, and when `/proc/locks` names nobody,
/// every process is searched the same way (this runs only on the error path). The answer is a hint for an error message,
/// never used to decide anything.
pub fn flock_holder(path: &Path) -> Option<u32> {
    let meta = std::fs::metadata(path).ok()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    holder_in(&locks, dev, ino, |pid| holds_flock(pid, dev, ino)).or_else(|| {
        // Not listed (some sandboxes show no /proc/locks): every process's open files.
        let mut found = std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| holds_flock(pid, dev, ino));
        match (found.next(), found.next()) {
            (Some(p), None) => Some(p),
            _ => None,
        }
    })
}

/// Whether process `pid` holds a `flock` on `path` as /proc shows it: one of its open files is
/// `path` and that open file's fdinfo lists the lock (false where /proc cannot tell).
pub fn flock_held_by(path: &Path, pid: u32) -> bool {
    std::fs::metadata(path).is_ok_and(|m| holds_flock(pid, m.dev(), m.ino()))
}

/// Whether process `pid` has the file `(dev, ino)` open with a flock on that open file.
fn holds_flock(pid: u32, dev: u64, ino: u64) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        let same = std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino);
        same && std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .is_ok_and(|info| {
            info.lines()
                .any(|l| l.starts_with("lock:") && l.contains(" FLOCK "))
        })
    })
}

/// The holder among the flocks listed in `locks`: the one pid `confirm` accepts, else the pid
/// of an exact `MAJOR:MINOR:INODE` match.
fn holder_in(locks: &str, dev: u64, ino: u64, confirm: impl Fn(u32) -> bool) -> Option<u32> {
    let key = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    let mut exact = None;
    let mut pids: Vec<u32> = Vec::new();
    for l in locks.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF" (blocked waiters have "->"; pid 0
        // is a holder outside our pid namespace).
        if f.len() < 6 || f[1] != "FLOCK" {
            continue;
        }
        let Some(pid) = f[4].parse::<u32>().ok().filter(|&p| p != 0) else {
            continue;
        };
        if f[5] == key && exact.is_none() {
            exact = Some(pid);
        }
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    let mut confirmed = pids.into_iter().filter(|&p| confirm(p));
    match (confirmed.next(), confirmed.next()) {
        (Some(p), None) => Some(p),
        (Some(_), Some(_)) => None,
        (None, _) => exact,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(stripes: u32, replicas: u32) -> StripeMap {
        let geometry = Geometry {
            size: 10 << 20,
            stripes,
            stripe_size: 64 << 10,
            replicas,
            extent_size: 1 << 20,
        };
        let n = geometry.extent_count();
        let extents = (0..n)
            .map(|i| {
                (0..replicas)
                    .map(|r| MapExtent {
                        portal: format!("10.0.0.{}:3260", (i + r) % (stripes + replicas)),
                        target: "iqn.x:t".into(),
                        lun: 1,
                        addr: u64::from(i) << 20,
                    })
                    .collect()
            })
            .collect();
        StripeMap {
            disk_id: "vm1".into(),
            master: "-".into(),
            geometry,
            extents,
            store: Store::File,
        }
    }

    #[test]
    fn layout_covers_every_byte_once() {
        let g = Geometry {
            size: 3 << 20,
            stripes: 3,
            stripe_size: 64 << 10,
            replicas: 1,
            extent_size: 256 << 10,
        };
        g.check().unwrap();
        // 48 units, 16 rows, 1 MiB per column, 4 extents per column: 12 indexes.
        assert_eq!(g.extent_count(), 12);
        let mut seen = std::collections::HashSet::new();
        let mut off = 0;
        while off < g.size {
            let l = g.locate(off);
            assert!(l.index < 12 && l.offset + l.run <= g.extent_size);
            assert!(seen.insert((l.index, l.offset)));
            off += 4096.min(l.run);
        }
        // Consecutive units go to consecutive columns.
        assert_eq!(g.locate(0).index, 0);
        assert_eq!(g.locate(64 << 10).index, 1);
        assert_eq!(g.locate(128 << 10).index, 2);
        assert_eq!(
            g.locate(192 << 10),
            Location {
                index: 0,
                offset: 64 << 10,
                run: 64 << 10
            }
        );
        // Row 4 of column 0 is in its second extent (index 3).
        assert_eq!(g.locate(12 * (64 << 10)).index, 3);
    }

    #[test]
    fn text_round_trips_and_damage_is_caught() {
        let m = sample(2, 2);
        m.check().unwrap();
        let t = m.to_text();
        assert_eq!(StripeMap::parse(t.as_bytes()).unwrap(), m);
        // One flipped byte in the body: the checksum catches it.
        let mut b = t.clone().into_bytes();
        let i = t.find("stripes 2").unwrap() + 8;
        b[i] = b'3';
        assert!(StripeMap::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        // Truncated, empty, not UTF-8, another version.
        assert!(StripeMap::parse(&t.as_bytes()[..t.len() - 3]).is_err());
        assert!(StripeMap::parse(b"").is_err());
        assert!(StripeMap::parse(&[0xff, b'\n', b'\n']).is_err());
        let v2 = t.replacen("tapdisk-stripe-map 1", "tapdisk-stripe-map 2", 1);
        let body = &v2[..v2.rfind("crc32c").unwrap()];
        let v2 = format!("{body}crc32c {:08x}\n", crc32c::crc32c(body.as_bytes()));
        assert!(StripeMap::parse(v2.as_bytes()).is_err());
        let v9 = t.replacen("tapdisk-stripe-map 1", "tapdisk-stripe-map 9", 1);
        let body = &v9[..v9.rfind("crc32c").unwrap()];
        let v9 = format!("{body}crc32c {:08x}\n", crc32c::crc32c(body.as_bytes()));
        assert!(StripeMap::parse(v9.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("version"));
        // An etcd-backed cache round-trips too.
        let mut e = m.clone();
        e.store = Store::Etcd {
            endpoints: vec![
                "http://127.0.0.1:2379".into(),
                "http://127.0.0.1:22379".into(),
            ],
            prefix: "/tapdisk-rs/stripe".into(),
            generation: 7,
        };
        let t = e.to_text();
        assert!(t.starts_with("tapdisk-stripe-map 2\n"), "{t}");
        assert_eq!(StripeMap::parse(t.as_bytes()).unwrap(), e);
    }

    #[test]
    fn overlaps_and_shared_portals_are_refused() {
        let mut m = sample(2, 2);
        m.extents[1][0].addr = m.extents[0][0].addr + 4096;
        m.extents[1][0].portal = m.extents[0][0].portal.clone();
        assert!(m.check().unwrap_err().to_string().contains("overlap"));
        let mut m = sample(2, 2);
        m.extents[0][1].portal = m.extents[0][0].portal.clone();
        assert!(m.check().unwrap_err().to_string().contains("share portal"));
    }

    #[test]
    fn holder_is_the_confirmed_pid_or_an_exact_match() {
        let dev = libc::makedev(0, 0x2d);
        let locks = "1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 77 00:31:5678 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 0 00:2d:9 0 EOF\n\
                     4: POSIX  ADVISORY  WRITE 9 00:2d:5678 0 EOF\n";
        // Nothing confirmed (descriptors unreadable): the exact device and inode decide.
        assert_eq!(holder_in(locks, dev, 5678, |_| false), Some(1234));
        assert_eq!(holder_in(locks, dev, 42, |_| false), None);
        // overlay: the lock shows another device, and only pid 77 really has the file.
        assert_eq!(holder_in(locks, dev, 5678, |p| p == 77), Some(77));
        // Two confirmed holders cannot both be right: no answer.
        assert_eq!(holder_in(locks, dev, 5678, |p| p == 77 || p == 1234), None);
        // POSIX locks and pids outside our namespace are never candidates.
        assert_eq!(
            holder_in(locks, dev, 5678, |p| p == 9 || p == 0),
            Some(1234)
        );
        assert_eq!(holder_in("garbage\n1: FLOCK", dev, 5678, |_| true), None);
    }

    #[test]
    fn lock_names_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.map");
        sample(2, 1).write_new(&p).unwrap();
        let held = LockedMap::open(&p).unwrap();
        // flock locks belong to the open file description: a second open in this process
        // conflicts just like another process would.
        match LockedMap::open(&p) {
            Err(Error::InUse { holder, .. }) => {
                // The holder is named by its pid as /proc shows it (in a pid namespace with an
                // outer /proc that is not getpid()); where /proc shows our lock it must be
                // named, elsewhere it may be unknown, never someone else.
                let me: u32 = std::fs::read_link("/proc/self")
                    .ok()
                    .and_then(|l| l.to_str()?.parse().ok())
                    .unwrap_or_else(std::process::id);
                if flock_held_by(&p, me) {
                    assert_eq!(holder, Some(me));
                } else {
                    assert!(holder.is_none_or(|h| h == me), "{holder:?}");
                }
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(held);
        LockedMap::open(&p).unwrap();
    }
}
