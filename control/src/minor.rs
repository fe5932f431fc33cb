//! Minor numbers, as blktap3 keeps them: a marker file `<rundir>/tapdisk/tapdisk-<minor>` per
//! allocated minor, on which the tapdisk serving the minor holds an exclusive `flock`.
//!
//! The lock is what says a minor is in use: the kernel drops it when the process exits, also
//! when it is killed or left a zombie, so tap-ctl, tapback and the daemon see a dead tapdisk
//! the same way, without asking about its pid. While it holds the lock, a tapdisk writes one
//! JSON line into the marker, [`MinorRecord`] (its pid and image), so a marker left unlocked
//! with a record names the tapdisk that died serving it ([`Marker::Dead`]). blktap3's own
//! markers are empty; both kinds share the folder and the numbering.
//!
//! Who made a marker removes it: `tap-ctl allocate` makes one that `tap-ctl free` removes; a
//! tapdisk asked to open a VBD without an allocated minor makes one and removes it when the
//! VBD closes ([`MinorClaim`]).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::ImageSpec;
use crate::rundir::RunDir;

/// Minors are numbered below this (blktap3's `MAX_ID`).
pub const MAX_MINORS: u32 = 16384;

/// What a tapdisk writes into the marker of a minor it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinorRecord {
    /// The tapdisk's pid.
    pub pid: u32,
    /// The image it serves, if it has one open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,
}

/// The state of one minor's marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Marker {
    /// No marker: the minor is not allocated.
    Missing,
    /// Allocated and not held: made by `tap-ctl allocate` (waiting for a tapdisk), or left by a
    /// VBD that closed cleanly (waiting for `tap-ctl free`).
    Allocated,
    /// Held by a live process; what it wrote (blktap3's tapdisks write nothing).
    Held(Option<MinorRecord>),
    /// Not held, but with a record: its tapdisk died (or became a zombie) serving it.
    Dead(MinorRecord),
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |cause| Error::Io { what, cause }
}

/// The record in a marker, if it holds a well-formed one.
fn read_record(f: &mut File) -> Option<MinorRecord> {
    let mut buf = Vec::new();
    f.rewind().ok()?;
    f.take(64 * 1024).read_to_end(&mut buf).ok()?;
    serde_json::from_slice(&buf).ok()
}

/// Tries to take the marker's lock without waiting; `Err(file)` if another process holds it.
fn try_lock(f: File, what: &Path) -> Result<std::result::Result<Flock<File>, File>> {
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Ok(l)),
        Err((f, Errno::EWOULDBLOCK)) => Ok(Err(f)),
        Err((_, e)) => Err(io(format!("locking {}", what.display()))(e.into())),
    }
}

/// The state of minor `minor`.
pub fn inspect(rundir: &RunDir, minor: u32) -> Result<Marker> {
    let path = rundir.minor_marker(minor);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Marker::Missing),
        Err(e) => return Err(io(format!("opening {}", path.display()))(e)),
    };
    // A shared lock tells a held marker from a free one and never blocks another reader.
    match Flock::lock(f, FlockArg::LockSharedNonblock) {
        Ok(mut l) => Ok(match read_record(&mut l) {
            Some(r) => Marker::Dead(r),
            None => Marker::Allocated,
        }),
        Err((mut f, Errno::EWOULDBLOCK)) => Ok(Marker::Held(read_record(&mut f))),
        Err((_, e)) => Err(io(format!("locking {}", path.display()))(e.into())),
    }
}

/// The minors that have a marker, in order.
pub fn markers(rundir: &RunDir) -> Result<Vec<u32>> {
    let dir = rundir.minor_dir();
    let rd = match std::fs::read_dir(&dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(format!("reading {}", dir.display()))(e)),
    };
    let mut out: Vec<u32> = rd
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("tapdisk-")?
                .parse::<u32>()
                .ok()
        })
        .filter(|m| *m < MAX_MINORS)
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Holds the folder's lock (blktap3's tap-ctl takes the same one around allocate and free).
fn lock_dir(rundir: &RunDir) -> Result<Flock<File>> {
    let dir = rundir.minor_dir();
    let f = File::open(&dir).map_err(io(format!("opening {}", dir.display())))?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| io(format!("locking {}", dir.display()))(e.into()))
}

/// Allocates the lowest free minor: makes its (empty) marker and returns the number.
pub fn allocate(rundir: &RunDir) -> Result<u32> {
    let _dir = lock_dir(rundir)?;
    for m in 0..MAX_MINORS {
        let path = rundir.minor_marker(m);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => return Ok(m),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(format!("creating {}", path.display()))(e)),
        }
    }
    Err(Error::NoFreeMinor)
}

/// Removes the marker of `minor`, unless a live process holds it. Returns the record it held
/// (a dead tapdisk's), if any.
pub fn free(rundir: &RunDir, minor: u32) -> Result<Option<MinorRecord>> {
    let _dir = lock_dir(rundir)?;
    let path = rundir.minor_marker(minor);
    let f = match OpenOptions::new().read(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotAllocated(minor))
        }
        Err(e) => return Err(io(format!("opening {}", path.display()))(e)),
    };
    match try_lock(f, &path)? {
        Ok(mut l) => {
            let record = read_record(&mut l);
            std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
            Ok(record)
        }
        Err(mut f) => Err(Error::MinorInUse {
            minor,
            owner: read_record(&mut f).map(|r| r.pid),
        }),
    }
}

/// A tapdisk's hold on a minor: the marker's lock, with its record written in. Dropping it
/// removes the marker if the claim made it, or empties it (still allocated) if it was there.
#[derive(Debug)]
pub struct MinorClaim {
    /// The minor.
    pub minor: u32,
    /// A dead tapdisk's record the marker held when it was claimed (an explicit minor takes
    /// over from a tapdisk that died serving it).
    pub took_over: Option<MinorRecord>,
    path: PathBuf,
    file: Flock<File>,
    created: bool,
}

impl MinorClaim {
    /// Writes `record` into the marker, replacing what was there.
    pub fn write(&mut self, record: &MinorRecord) -> Result<()> {
        let what = || format!("writing {}", self.path.display());
        let mut line = serde_json::to_vec(record)
            .map_err(|e| io(what())(std::io::Error::other(e.to_string())))?;
        line.push(b'\n');
        let f: &mut File = &mut self.file;
        f.set_len(0).map_err(io(what()))?;
        f.rewind().map_err(io(what()))?;
        f.write_all(&line).map_err(io(what()))
    }
}

impl Drop for MinorClaim {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(&self.path);
        } else {
            let _ = self.file.set_len(0);
        }
    }
}

/// Claims minor `wanted`, or the lowest one with no marker, for the process writing `record`.
/// An explicit minor may be allocated already (`tap-ctl allocate`) or left by a dead tapdisk
/// (taken over: its NBD socket and, the process being gone, its control socket are removed);
/// one held by a live process is refused.
pub fn claim(rundir: &RunDir, wanted: Option<u32>, record: &MinorRecord) -> Result<MinorClaim> {
    let mut claim = match wanted {
        Some(m) => claim_one(rundir, m)?,
        None => claim_lowest(rundir)?,
    };
    if let Some(old) = &claim.took_over {
        let nbd = rundir.nbd_socket(old.pid, claim.minor);
        if is_socket(&nbd) {
            let _ = std::fs::remove_file(nbd);
        }
        let ctl = rundir.ctl_socket(old.pid);
        if !crate::process::pid_alive(old.pid) && is_socket(&ctl) {
            let _ = std::fs::remove_file(ctl);
        }
    }
    claim.write(record)?;
    Ok(claim)
}

/// Whether `p` is a unix socket (not following a symlink).
pub fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

fn claim_one(rundir: &RunDir, m: u32) -> Result<MinorClaim> {
    if m >= MAX_MINORS {
        return Err(Error::invalid(
            "minor",
            format!("minor {m} is out of range: minors are 0..{MAX_MINORS}"),
        ));
    }
    let path = rundir.minor_marker(m);
    let mut owner = None;
    // Someone inspecting the marker holds a shared lock for a moment: try a few times.
    for _ in 0..10 {
        let existed = path.exists();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        match try_lock(f, &path)? {
            Ok(mut file) => {
                let took_over = read_record(&mut file);
                return Ok(MinorClaim {
                    minor: m,
                    took_over,
                    path,
                    file,
                    created: !existed,
                });
            }
            Err(mut f) => owner = read_record(&mut f).map(|r| r.pid),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(Error::MinorInUse { minor: m, owner })
}

fn claim_lowest(rundir: &RunDir) -> Result<MinorClaim> {
    for m in 0..MAX_MINORS {
        let path = rundir.minor_marker(m);
        let f = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(format!("creating {}", path.display()))(e)),
        };
        if let Ok(file) = try_lock(f, &path)? {
            return Ok(MinorClaim {
                minor: m,
                took_over: None,
                path,
                file,
                created: true,
            });
        }
    }
    Err(Error::NoFreeMinor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rundir() -> (tempfile::TempDir, RunDir) {
        let d = tempfile::tempdir().unwrap();
        let r = RunDir(d.path().into());
        r.create().unwrap();
        (d, r)
    }

    fn rec(pid: u32) -> MinorRecord {
        MinorRecord {
            pid,
            image: Some("aio:/x.img".parse().unwrap()),
        }
    }

    #[test]
    fn claims_lock_record_and_clean_up() {
        let (_d, r) = rundir();
        let a = claim(&r, None, &rec(10)).unwrap();
        let b = claim(&r, None, &rec(10)).unwrap();
        assert_eq!((a.minor, b.minor), (0, 1));
        assert_eq!(inspect(&r, 0).unwrap(), Marker::Held(Some(rec(10))));
        match claim(&r, Some(0), &rec(11)).unwrap_err() {
            Error::MinorInUse { minor: 0, owner } => assert_eq!(owner, Some(10)),
            e => panic!("{e}"),
        }
        assert!(matches!(
            free(&r, 1).unwrap_err(),
            Error::MinorInUse { minor: 1, .. }
        ));
        drop(a);
        assert_eq!(inspect(&r, 0).unwrap(), Marker::Missing);
        assert_eq!(markers(&r).unwrap(), vec![1]);
    }

    #[test]
    fn allocated_minors_stay_until_freed() {
        let (_d, r) = rundir();
        assert_eq!(allocate(&r).unwrap(), 0);
        assert_eq!(allocate(&r).unwrap(), 1);
        assert_eq!(inspect(&r, 1).unwrap(), Marker::Allocated);
        // An automatic claim skips allocated minors; an explicit one takes them.
        assert_eq!(claim(&r, None, &rec(5)).unwrap().minor, 2);
        let c = claim(&r, Some(1), &rec(5)).unwrap();
        assert_eq!(inspect(&r, 1).unwrap(), Marker::Held(Some(rec(5))));
        drop(c);
        assert_eq!(inspect(&r, 1).unwrap(), Marker::Allocated);
        assert_eq!(free(&r, 1).unwrap(), None);
        assert_eq!(inspect(&r, 1).unwrap(), Marker::Missing);
        assert!(matches!(free(&r, 1).unwrap_err(), Error::NotAllocated(1)));
    }

    #[test]
    fn a_dead_holders_marker_is_dead_and_can_be_taken_over() {
        let (_d, r) = rundir();
        // What a tapdisk killed with SIGKILL leaves: a record, no lock.
        std::fs::write(
            r.minor_marker(7),
            br#"{"pid":999999999,"image":{"driver":"aio","path":"/x.img"}}"#,
        )
        .unwrap();
        let nbd = r.nbd_socket(999999999, 7);
        drop(std::os::unix::net::UnixListener::bind(&nbd).unwrap());
        assert_eq!(inspect(&r, 7).unwrap(), Marker::Dead(rec(999999999)));
        assert_eq!(claim(&r, None, &rec(1)).unwrap().minor, 0);
        let c = claim(&r, Some(7), &rec(1)).unwrap();
        assert_eq!(c.took_over, Some(rec(999999999)));
        assert!(!nbd.exists());
        drop(c);
        assert_eq!(inspect(&r, 7).unwrap(), Marker::Allocated);
        // free returns the dead one's record for the caller to clean up after.
        std::fs::write(r.minor_marker(8), br#"{"pid":999999998}"#).unwrap();
        assert_eq!(
            free(&r, 8).unwrap(),
            Some(MinorRecord {
                pid: 999999998,
                image: None
            })
        );
    }

    #[test]
    fn garbage_markers_are_allocated_ones() {
        let (_d, r) = rundir();
        std::fs::write(r.minor_marker(2), b"\x00\xffnot json").unwrap();
        assert_eq!(inspect(&r, 2).unwrap(), Marker::Allocated);
        std::fs::write(r.minor_dir().join("tapdisk-x"), b"").unwrap();
        std::fs::write(r.minor_dir().join("other"), b"").unwrap();
        assert_eq!(markers(&r).unwrap(), vec![2]);
    }
}
