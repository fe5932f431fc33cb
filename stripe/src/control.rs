//! Where the durable state of a disk being served lives, and who may write the disk: the
//! control plane under the data path.
//!
//! [`Control`] is what the data path ([`crate::path`]) asks of it: the writer's fencing key,
//! whether it may still write, and durable storage for the stale marks and the write-intent
//! record ([`crate::intent`]). Two implementations:
//!
//! - [`FileControl`], the single-host default: the mapping file locked with `flock` (one
//!   writer on this host), stale marks in `MAP.stale` and the intent record in `MAP.intent`
//!   beside it. No fencing key: nothing outside this host knows of the disk.
//! - `stripe_etcd::EtcdControl` (crate `stripe-etcd`): the disk's record in etcd, the writer's
//!   lease-bound key whose revision is the fencing token, and the marks in etcd.
//!
//! Every call may block (an fsync, an etcd round trip); the data path makes them from the
//! disk's intent worker, at open, or on the rare path of a replica that missed a write.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::intent::{self, Record};
use crate::map::{LockedMap, StripeMap};
use crate::Error;

/// The control plane of one disk being served (see the module docs).
pub trait Control: Send + Sync {
    /// The mapping as the control plane has it now.
    fn map(&self) -> StripeMap;

    /// The reservation key the disk's sessions register and reserve with (the fencing token),
    /// or None where there is no fencing (file-backed disks).
    fn pr_key(&self) -> Option<u64>;

    /// Whether this process still holds the disk's writer role. Once false it stays false:
    /// the disk must stop writing.
    fn held(&self) -> bool;

    /// Why the role was lost, for the error every request then gets.
    fn lost_why(&self) -> String {
        "the disk's writer role was lost".into()
    }

    /// Stores the complete set of stale marks `(extent index, replica)` durably.
    fn store_stale(&self, marks: &[(u32, u32)]) -> Result<(), Error>;

    /// The stale marks stored.
    fn load_stale(&self) -> Result<Vec<(u32, u32)>, Error>;

    /// The write-intent record stored (None: none yet).
    fn load_intent(&self, disk_size: u64, region_size: u64) -> Result<Option<Record>, Error>;

    /// Stores a write-intent record durably (replacing the last one).
    fn store_intent(&self, rec: &Record) -> Result<(), Error>;

    /// Reads the mapping again where it may have changed (a command failed as if an extent
    /// moved); returns it if it describes the same disk.
    fn refresh_map(&self) -> Option<StripeMap>;

    /// Where the mapping comes from, and the role's state, for `tap-ctl stats`.
    fn stats(&self) -> serde_json::Value;

    /// Gives the role up at a clean close (after the last write was flushed and the empty
    /// intent record stored).
    fn release(&self) {}
}

/// The file-backed control plane: see the module docs.
pub struct FileControl {
    path: PathBuf,
    locked: Mutex<LockedMap>,
    stale_file: PathBuf,
    intent_file: PathBuf,
    intent: Mutex<Option<File>>,
}

/// `MAP` + `suffix`.
pub fn beside(map: &Path, suffix: &str) -> PathBuf {
    let mut s = map.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl FileControl {
    /// Opens and locks the mapping file.
    pub fn open(path: &Path) -> Result<FileControl, Error> {
        let locked = LockedMap::open(path)?;
        Ok(FileControl {
            path: path.to_path_buf(),
            locked: Mutex::new(locked),
            stale_file: beside(path, ".stale"),
            intent_file: beside(path, ".intent"),
            intent: Mutex::new(None),
        })
    }

    fn intent_file(&self) -> Result<std::sync::MutexGuard<'_, Option<File>>, Error> {
        let mut g = lock(&self.intent);
        if g.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.intent_file)
                .map_err(|e| Error::io(&self.intent_file, e))?;
            *g = Some(f);
        }
        Ok(g)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Control for FileControl {
    fn map(&self) -> StripeMap {
        lock(&self.locked).map.clone()
    }

    fn pr_key(&self) -> Option<u64> {
        None
    }

    fn held(&self) -> bool {
        true
    }

    fn store_stale(&self, marks: &[(u32, u32)]) -> Result<(), Error> {
        let mut text = String::new();
        for (i, r) in marks {
            text.push_str(&format!("{i} {r}\n"));
        }
        let tmp = self.stale_file.with_extension("stale.tmp");
        let r = (|| {
            use std::io::Write;
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.stale_file)
        })();
        r.map_err(|e| Error::io(&self.stale_file, e))
    }

    fn load_stale(&self) -> Result<Vec<(u32, u32)>, Error> {
        let mut bytes = Vec::new();
        match File::open(&self.stale_file) {
            Ok(f) => {
                f.take(crate::map::MAX_FILE)
                    .read_to_end(&mut bytes)
                    .map_err(|e| Error::io(&self.stale_file, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&self.stale_file, e)),
        }
        let m = self.map();
        let (n, r) = (m.extents.len(), m.geometry.replicas as usize);
        Ok(crate::path::parse_stale_marks(&bytes, n, r)
            .into_iter()
            .enumerate()
            .filter(|(_, s)| *s)
            .map(|(k, _)| ((k / r) as u32, (k % r) as u32))
            .collect())
    }

    fn load_intent(&self, disk_size: u64, region_size: u64) -> Result<Option<Record>, Error> {
        let g = self.intent_file()?;
        let Some(f) = g.as_ref() else {
            return Ok(None);
        };
        let regions = disk_size.div_ceil(region_size) as u32;
        let slot = intent::slot_len(regions);
        let read = |k: u64| -> Result<Option<Record>, Error> {
            let mut b = vec![0u8; slot as usize];
            let n = f
                .read_at(&mut b, k * slot)
                .map_err(|e| Error::io(&self.intent_file, e))?;
            Ok(Record::decode(&b[..n], disk_size, region_size).ok())
        };
        let (a, b) = (read(0)?, read(1)?);
        let len = f
            .metadata()
            .map_err(|e| Error::io(&self.intent_file, e))?
            .len();
        match intent::pick_slot(a, b) {
            Some(r) => Ok(Some(r)),
            // A file with bytes in it but no valid slot: damaged, not empty. The caller must
            // not take that for "nothing marked".
            None if len > 0 => Err(Error::Invalid(format!(
                "{}: no valid write-intent record in either slot",
                self.intent_file.display()
            ))),
            None => Ok(None),
        }
    }

    fn store_intent(&self, rec: &Record) -> Result<(), Error> {
        let g = self.intent_file()?;
        let Some(f) = g.as_ref() else {
            return Ok(());
        };
        let slot = intent::slot_len(rec.regions());
        let b = rec.encode();
        let r = f
            .write_all_at(&b, (rec.seq % 2) * slot)
            .and_then(|()| f.sync_data());
        r.map_err(|e| Error::io(&self.intent_file, e))
    }

    fn refresh_map(&self) -> Option<StripeMap> {
        let mut g = lock(&self.locked);
        match LockedMap::open(&self.path) {
            Ok(n) if n.map.disk_id == g.map.disk_id && n.map.geometry == g.map.geometry => {
                *g = n;
                Some(g.map.clone())
            }
            _ => None,
        }
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::json!({ "store": "file", "lock": "flock" })
    }
}
