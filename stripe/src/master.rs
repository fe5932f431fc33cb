//! The master (thesis section 5.1): a registry of extents `<portal, target, LUN, ADDR>` that
//! storage servers offer, each with an allocation lock, handed out to virtual disks.
//!
//! # Durability and idempotence
//!
//! The whole state lives in one file, `state.json`, in the master's state folder. Every call
//! that changes it builds the new state beside the old one, writes it to `state.json.tmp`,
//! fsyncs it, renames it over `state.json` and fsyncs the folder, and only then answers and
//! makes it current. A master killed at any moment therefore restarts with the state before or
//! after a call, never between: an extent's owner changes only in one rename. Each allocation
//! records the disk id, the extent index and the replica number, so a client that retries a
//! call whose reply it lost (ONC RPC over TCP is at-least-once, as the thesis notes) gets the
//! same extents, and two disks never hold one extent. A lock file (`flock`) keeps a second
//! master off the same folder.
//!
//! # Placement
//!
//! Replicas of one extent index go to distinct servers (portals). Among the servers allowed,
//! the one chosen has the fewest extents of this disk with the same replica number, then the
//! fewest of this disk, then the fewest allocated overall; so consecutive extent indexes (the
//! stripes of a disk) land on different servers and primaries are spread as evenly as the
//! replicas allow.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::proto::{
    self, AllocArgs, Extent, ExtentState, Failure, ListRes, Placement, RegisterArgs, Status,
};
use crate::Error;

/// Most extents a master registers in all.
pub const MAX_TOTAL_EXTENTS: usize = 1 << 20;
/// Most replicas of one extent index.
pub const MAX_REPLICAS: u32 = 8;

/// Who holds an extent: one replica of one extent index of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// The disk id.
    pub disk: String,
    /// Extent index in the disk.
    pub index: u32,
    /// Replica number.
    pub replica: u32,
}

/// A registered extent and its owner, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The extent.
    pub extent: Extent,
    /// Its owner, when allocated.
    pub owner: Option<Owner>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    /// Format version of `state.json`.
    version: u32,
    extent_size: u64,
    next_id: u64,
    extents: Vec<Slot>,
}

const STATE_VERSION: u32 = 1;

/// The master's state, in memory.
#[derive(Debug, Clone)]
pub struct State {
    s: Stored,
    owners: HashMap<Owner, usize>,
}

/// Checks a name that goes into the mapping file and the state (one word, printable).
pub fn check_name(what: &str, s: &str) -> Result<(), Failure> {
    if s.is_empty() || s.len() > proto::MAX_NAME as usize {
        return Err(Failure::new(
            Status::BadArgs,
            format!("{what} must be 1..={} bytes", proto::MAX_NAME),
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Failure::new(
            Status::BadArgs,
            format!("{what} {s:?} contains whitespace or control characters"),
        ));
    }
    Ok(())
}

impl State {
    /// An empty state with extents of `extent_size` bytes.
    pub fn new(extent_size: u64) -> State {
        State {
            s: Stored {
                version: STATE_VERSION,
                extent_size,
                next_id: 1,
                extents: Vec::new(),
            },
            owners: HashMap::new(),
        }
    }

    fn from_stored(s: Stored, path: &Path) -> Result<State, Error> {
        let bad = |why: String| Error::BadState(format!("{}: {why}", path.display()));
        if s.version != STATE_VERSION {
            return Err(bad(format!(
                "state version {} is not {STATE_VERSION}",
                s.version
            )));
        }
        let mut owners = HashMap::new();
        let mut ids = HashSet::new();
        for (i, slot) in s.extents.iter().enumerate() {
            if !ids.insert(slot.extent.id) {
                return Err(bad(format!("extent id {} appears twice", slot.extent.id)));
            }
            if let Some(o) = &slot.owner {
                if owners.insert(o.clone(), i).is_some() {
                    return Err(bad(format!(
                        "disk {} index {} replica {} owns two extents",
                        o.disk, o.index, o.replica
                    )));
                }
            }
        }
        Ok(State { s, owners })
    }

    /// A state from its parts (a store other than `state.json`, e.g. etcd); checked as a
    /// loaded file is.
    pub fn from_slots(extent_size: u64, next_id: u64, extents: Vec<Slot>) -> Result<State, Error> {
        let s = Stored {
            version: STATE_VERSION,
            extent_size,
            next_id,
            extents,
        };
        State::from_stored(s, Path::new("(store)"))
    }

    /// Every registered extent and its owner, in registration order.
    pub fn slots(&self) -> &[Slot] {
        &self.s.extents
    }

    /// The id the next registered extent gets.
    pub fn next_id(&self) -> u64 {
        self.s.next_id
    }

    /// Extent size in bytes.
    pub fn extent_size(&self) -> u64 {
        self.s.extent_size
    }

    /// Registers extents (see `master_register_args`); returns how many were new.
    pub fn register(&mut self, a: &RegisterArgs) -> Result<u32, Failure> {
        check_name("portal", &a.portal)?;
        check_name("target", &a.target)?;
        let e = self.s.extent_size;
        if a.count == 0 || a.count > proto::MAX_EXTENTS {
            return Err(Failure::new(
                Status::BadArgs,
                format!("count must be 1..={}", proto::MAX_EXTENTS),
            ));
        }
        if !a.start.is_multiple_of(4096) {
            return Err(Failure::new(
                Status::BadArgs,
                "start must be a multiple of 4096 bytes",
            ));
        }
        let end = u64::from(a.count)
            .checked_mul(e)
            .and_then(|l| l.checked_add(a.start))
            .ok_or_else(|| {
                Failure::new(Status::BadArgs, "start + count * extent size overflows")
            })?;
        let mut added = 0;
        let mut new = Vec::new();
        for k in 0..u64::from(a.count) {
            let addr = a.start + k * e;
            let mut same = false;
            for slot in &self.s.extents {
                let x = &slot.extent;
                if x.portal != a.portal || x.target != a.target || x.lun != a.lun {
                    continue;
                }
                if x.addr == addr && x.len == e {
                    same = true;
                    break;
                }
                if x.addr < addr + e && addr < x.addr + x.len {
                    return Err(Failure::new(
                        Status::Conflict,
                        format!(
                            "bytes {addr}..{} of {} {} LUN {} overlap extent {} at {}",
                            addr + e,
                            a.portal,
                            a.target,
                            a.lun,
                            x.id,
                            x.addr
                        ),
                    ));
                }
            }
            if !same {
                new.push(addr);
            }
        }
        debug_assert!(end >= a.start);
        if self.s.extents.len() + new.len() > MAX_TOTAL_EXTENTS {
            return Err(Failure::new(
                Status::NoSpace,
                format!("the master holds at most {MAX_TOTAL_EXTENTS} extents"),
            ));
        }
        for addr in new {
            let id = self.s.next_id;
            self.s.next_id += 1;
            self.s.extents.push(Slot {
                extent: Extent {
                    id,
                    portal: a.portal.clone(),
                    target: a.target.clone(),
                    lun: a.lun,
                    addr,
                    len: e,
                },
                owner: None,
            });
            added += 1;
        }
        Ok(added)
    }

    /// Allocates (or finds, for a retried call) extents for a disk; all or nothing.
    pub fn allocate(&mut self, a: &AllocArgs) -> Result<Vec<Placement>, Failure> {
        check_name("disk id", &a.disk)?;
        if a.replicas == 0 || a.replicas > MAX_REPLICAS {
            return Err(Failure::new(
                Status::BadArgs,
                format!("replicas must be 1..={MAX_REPLICAS}"),
            ));
        }
        let total = u64::from(a.count) * u64::from(a.replicas);
        if a.count == 0 || total > u64::from(proto::MAX_EXTENTS) {
            return Err(Failure::new(
                Status::BadArgs,
                format!(
                    "count * replicas must be 1..={} per call",
                    proto::MAX_EXTENTS
                ),
            ));
        }
        if a.first.checked_add(a.count).is_none() {
            return Err(Failure::new(Status::BadArgs, "first + count overflows"));
        }
        // Per server: (free extent slots, sorted by address), and counters for the score.
        let mut servers: Vec<String> = Vec::new();
        let mut server_of: HashMap<&str, usize> = HashMap::new();
        for slot in &self.s.extents {
            if !server_of.contains_key(slot.extent.portal.as_str()) {
                server_of.insert(&slot.extent.portal, servers.len());
                servers.push(slot.extent.portal.clone());
            }
        }
        let n = servers.len();
        let mut free: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut used_total = vec![0u64; n];
        let mut used_disk = vec![0u64; n];
        let mut used_disk_rep: HashMap<(usize, u32), u64> = HashMap::new();
        for (i, slot) in self.s.extents.iter().enumerate() {
            let sv = server_of[slot.extent.portal.as_str()];
            match &slot.owner {
                None => free[sv].push(i),
                Some(o) => {
                    used_total[sv] += 1;
                    if o.disk == a.disk {
                        used_disk[sv] += 1;
                        *used_disk_rep.entry((sv, o.replica)).or_default() += 1;
                    }
                }
            }
        }
        for f in &mut free {
            // Lowest address first, popped from the end.
            let ex = &self.s.extents;
            f.sort_by(|&x, &y| {
                (
                    ex[y].extent.target.as_str(),
                    ex[y].extent.lun,
                    ex[y].extent.addr,
                )
                    .cmp(&(
                        ex[x].extent.target.as_str(),
                        ex[x].extent.lun,
                        ex[x].extent.addr,
                    ))
            });
        }
        drop(server_of);
        let mut chosen: Vec<(usize, Owner)> = Vec::new();
        let mut out = Vec::with_capacity(total as usize);
        for index in a.first..a.first + a.count {
            let mut taken_servers = Vec::new();
            // Replicas that exist already (a retried or extended call) keep their servers.
            for replica in 0..a.replicas {
                let o = Owner {
                    disk: a.disk.clone(),
                    index,
                    replica,
                };
                if let Some(&i) = self.owners.get(&o) {
                    let p = &self.s.extents[i].extent.portal;
                    if let Some(sv) = servers.iter().position(|s| s == p) {
                        taken_servers.push(sv);
                    }
                }
            }
            for replica in 0..a.replicas {
                let o = Owner {
                    disk: a.disk.clone(),
                    index,
                    replica,
                };
                if let Some(&i) = self.owners.get(&o) {
                    out.push(Placement {
                        index,
                        replica,
                        extent: self.s.extents[i].extent.clone(),
                    });
                    continue;
                }
                let best = (0..n)
                    .filter(|sv| !free[*sv].is_empty() && !taken_servers.contains(sv))
                    .min_by_key(|&sv| {
                        (
                            used_disk_rep.get(&(sv, replica)).copied().unwrap_or(0),
                            used_disk[sv],
                            used_total[sv],
                            sv,
                        )
                    });
                let Some(sv) = best else {
                    let free_total: usize = free.iter().map(Vec::len).sum();
                    return Err(Failure::new(
                        Status::NoSpace,
                        format!(
                            "no free extent for disk {} index {index} replica {replica} on a server \
                             other than those of its other replicas ({free_total} free extents on {} \
                             servers left; asked for {} indexes x {} replicas)",
                            a.disk,
                            free.iter().filter(|f| !f.is_empty()).count(),
                            a.count,
                            a.replicas
                        ),
                    ));
                };
                let Some(slot) = free[sv].pop() else {
                    continue;
                };
                taken_servers.push(sv);
                used_total[sv] += 1;
                used_disk[sv] += 1;
                *used_disk_rep.entry((sv, replica)).or_default() += 1;
                out.push(Placement {
                    index,
                    replica,
                    extent: self.s.extents[slot].extent.clone(),
                });
                chosen.push((slot, o));
            }
        }
        for (slot, o) in chosen {
            self.s.extents[slot].owner = Some(o.clone());
            self.owners.insert(o, slot);
        }
        Ok(out)
    }

    /// Frees every extent of `disk`; returns how many.
    pub fn release(&mut self, disk: &str) -> Result<u32, Failure> {
        check_name("disk id", disk)?;
        let mut freed = 0;
        for slot in &mut self.s.extents {
            if slot.owner.as_ref().is_some_and(|o| o.disk == disk) {
                slot.owner = None;
                freed += 1;
            }
        }
        self.owners.retain(|o, _| o.disk != disk);
        Ok(freed)
    }

    /// Every extent and its owner.
    pub fn list(&self) -> ListRes {
        ListRes {
            extent_size: self.s.extent_size,
            extents: self
                .s
                .extents
                .iter()
                .map(|s| ExtentState {
                    extent: s.extent.clone(),
                    owner: s
                        .owner
                        .as_ref()
                        .map(|o| (o.disk.clone(), o.index, o.replica)),
                })
                .collect(),
        }
    }
}

/// The state folder: `state.json` plus a lock file.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the state folder and locks it, then loads the state. A new
    /// folder needs `extent_size`; an existing one must agree with it when given.
    pub fn open(dir: &Path, extent_size: Option<u64>) -> Result<(Store, State), Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::InUse {
                path: dir.to_path_buf(),
                holder: crate::map::flock_holder(&lock_path),
            });
        }
        let store = Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        };
        let path = dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(b) => {
                let s: Stored = serde_json::from_slice(&b)
                    .map_err(|e| Error::BadState(format!("{}: {e}", path.display())))?;
                let st = State::from_stored(s, &path)?;
                if let Some(es) = extent_size {
                    if es != st.extent_size() {
                        return Err(Error::BadState(format!(
                            "{} has extents of {} bytes, not {es}",
                            path.display(),
                            st.extent_size()
                        )));
                    }
                }
                st
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let es = extent_size.ok_or_else(|| {
                    Error::BadState(format!(
                        "{} has no state yet: give an extent size",
                        dir.display()
                    ))
                })?;
                if es == 0 || es % (1 << 20) != 0 {
                    return Err(Error::BadState(
                        "the extent size must be a non-zero multiple of 1 MiB".into(),
                    ));
                }
                let st = State::new(es);
                store.save(&st)?;
                st
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        Ok((store, state))
    }

    /// Makes `st` the durable state (write, fsync, rename, fsync the folder).
    pub fn save(&self, st: &State) -> Result<(), Error> {
        let tmp = self.dir.join("state.json.tmp");
        let path = self.dir.join("state.json");
        let body = serde_json::to_vec(&st.s).map_err(|e| Error::BadState(e.to_string()))?;
        let r = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        })();
        r.map_err(|e| Error::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn reg(st: &mut State, portal: &str, count: u32) -> u32 {
        st.register(&RegisterArgs {
            portal: portal.into(),
            target: "iqn.x:t".into(),
            lun: 1,
            start: 0,
            count,
        })
        .unwrap()
    }

    fn alloc(disk: &str, first: u32, count: u32, replicas: u32) -> AllocArgs {
        AllocArgs {
            disk: disk.into(),
            first,
            count,
            replicas,
        }
    }

    #[test]
    fn register_is_idempotent_and_refuses_overlap() {
        let mut st = State::new(G);
        assert_eq!(reg(&mut st, "a:1", 4), 4);
        assert_eq!(reg(&mut st, "a:1", 4), 0);
        assert_eq!(reg(&mut st, "a:1", 6), 2);
        let r = st.register(&RegisterArgs {
            portal: "a:1".into(),
            target: "iqn.x:t".into(),
            lun: 1,
            start: G / 2,
            count: 1,
        });
        assert_eq!(r.unwrap_err().status, Status::Conflict);
        assert_eq!(st.list().extents.len(), 6);
    }

    #[test]
    fn allocation_spreads_stripes_and_replicas_and_is_idempotent() {
        let mut st = State::new(G);
        for p in ["a:1", "b:1", "c:1", "d:1"] {
            reg(&mut st, p, 5);
        }
        let p = st.allocate(&alloc("vm1", 0, 4, 2)).unwrap();
        assert_eq!(p.len(), 8);
        for i in 0..4 {
            let reps: Vec<_> = p.iter().filter(|x| x.index == i).collect();
            assert_ne!(reps[0].extent.portal, reps[1].extent.portal);
        }
        // The four primaries are on four servers.
        let prim: HashSet<_> = p
            .iter()
            .filter(|x| x.replica == 0)
            .map(|x| x.extent.portal.clone())
            .collect();
        assert_eq!(prim.len(), 4);
        // Retried: the same answer, nothing more taken.
        let again = st.allocate(&alloc("vm1", 0, 4, 2)).unwrap();
        assert_eq!(again, p);
        let taken = st
            .list()
            .extents
            .iter()
            .filter(|x| x.owner.is_some())
            .count();
        assert_eq!(taken, 8);
        // Another disk gets other extents; a disk too big for what is left gets nothing.
        let q = st.allocate(&alloc("vm2", 0, 4, 2)).unwrap();
        let pids: HashSet<_> = p.iter().map(|x| x.extent.id).collect();
        assert!(q.iter().all(|x| !pids.contains(&x.extent.id)));
        let r = st.allocate(&alloc("vm3", 0, 1, 5));
        assert!(r.is_err(), "5 replicas need 5 servers");
        assert_eq!(r.unwrap_err().status, Status::NoSpace);
        let r = st.allocate(&alloc("vm3", 0, 2, 1)).unwrap();
        assert_eq!(r.len(), 2);
        // Three indexes do not fit in the two extents left: nothing is taken.
        let r = st.allocate(&alloc("vm4", 0, 3, 1));
        assert_eq!(r.unwrap_err().status, Status::NoSpace);
        let taken = st
            .list()
            .extents
            .iter()
            .filter(|x| x.owner.is_some())
            .count();
        assert_eq!(taken, 18);
        assert_eq!(st.release("vm1").unwrap(), 8);
        assert_eq!(st.release("vm1").unwrap(), 0);
        assert_eq!(st.allocate(&alloc("vm4", 0, 2, 2)).unwrap().len(), 4);
    }

    #[test]
    fn names_are_checked() {
        let mut st = State::new(G);
        reg(&mut st, "a:1", 1);
        assert!(st.allocate(&alloc("has space", 0, 1, 1)).is_err());
        assert!(st.allocate(&alloc("", 0, 1, 1)).is_err());
        assert!(st.allocate(&alloc("x", u32::MAX, 2, 1)).is_err());
    }

    #[test]
    fn store_survives_reopen_and_locks_out_a_second_master() {
        let d = tempfile::tempdir().unwrap();
        let (store, mut st) = Store::open(d.path(), Some(G)).unwrap();
        reg(&mut st, "a:1", 2);
        st.allocate(&alloc("vm1", 0, 1, 1)).unwrap();
        store.save(&st).unwrap();
        assert!(matches!(
            Store::open(d.path(), Some(G)),
            Err(Error::InUse { .. })
        ));
        drop(store);
        let (_s, st2) = Store::open(d.path(), None).unwrap();
        assert_eq!(st2.list(), st.list());
        drop(_s);
        assert!(Store::open(d.path(), Some(2 * G)).is_err());
    }
}
