//! What every event loop of one striped disk shares ([`Disk`]): the mapping, the stale marks,
//! the control plane ([`crate::control`]), the write-intent log ([`crate::intent_log`]), the
//! writer's reservation key and the per-server counters.
//!
//! Opening a disk ([`Disk::open_with`]):
//! 1. takes the mapping and stale marks from the control plane (which holds the writer role:
//!    a `flock`, or an etcd lease);
//! 2. logs in to every LUN once: checks its block size and capacity and, where the disk has a
//!    fencing key, registers it and takes the "write exclusive, registrants only" reservation
//!    (preempting an older writer's key, see [`iscsi::Registration`]). A server that does not
//!    answer is tolerated when every extent has a replica elsewhere that is not stale; its
//!    replicas are marked stale;
//! 3. for a replicated disk, copies the regions the write-intent record names (an unclean
//!    stop or a takeover left them) from one replica to the others ([`crate::resync`]), then
//!    stores an empty record and starts the intent worker.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use iscsi::{Config, Registration};

use crate::control::{Control, FileControl};
use crate::intent::{self, Record};
use crate::intent_log::IntentLog;
use crate::map::{Geometry, StripeMap};
use crate::options::{Options, BLOCK};
use crate::resync::{self, Lun};
use crate::Error;

/// Counters of one server, shared by every event loop of the disk.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// `host:port`.
    pub portal: String,
    /// Target IQN.
    pub target: String,
    /// Commands completed.
    pub ios: AtomicU64,
    /// Bytes read or written.
    pub bytes: AtomicU64,
    /// Commands failed.
    pub errors: AtomicU64,
    /// Reads sent to another replica after this server failed them.
    pub failovers: AtomicU64,
    /// Reconnects seen.
    pub reconnects: AtomicU64,
    /// Last seen [`iscsi::State`] (as u8).
    pub state: AtomicU8,
}

impl ServerStats {
    /// As JSON for `tap-ctl stats`.
    pub fn json(&self) -> serde_json::Value {
        let st = match self.state.load(Ordering::Relaxed) {
            0 => "up",
            1 => "reconnecting",
            2 => "down",
            _ => "closed",
        };
        serde_json::json!({
            "portal": self.portal,
            "target": self.target,
            "state": st,
            "ios": self.ios.load(Ordering::Relaxed),
            "bytes": self.bytes.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "failovers": self.failovers.load(Ordering::Relaxed),
            "reconnects": self.reconnects.load(Ordering::Relaxed),
        })
    }
}

/// What the open-time resync did, for `tap-ctl stats`.
#[derive(Debug, Default)]
pub struct ResyncStats {
    /// Regions the record named at open.
    pub marked_at_open: AtomicU64,
    /// Regions copied.
    pub regions: AtomicU64,
    /// Bytes copied.
    pub bytes: AtomicU64,
    /// Regions left unequal (no replica answered).
    pub unresolved: AtomicU64,
    /// How long the copy took.
    pub millis: AtomicU64,
    /// Whether the record was unreadable (then every region was copied).
    pub record_damaged: AtomicBool,
    /// Stale replicas copied back and cleared since open.
    pub stale_copied: AtomicU64,
    /// Bytes copied into stale replicas.
    pub stale_bytes: AtomicU64,
    /// Replicas being copied now.
    pub stale_copying: AtomicU64,
}

/// See the module docs.
pub struct Disk {
    /// The geometry.
    pub geometry: Geometry,
    control: Arc<dyn Control>,
    map: Mutex<StripeMap>,
    /// `index * replicas + replica`: the replica missed a write.
    stale: Box<[AtomicBool]>,
    /// Per replica: writes it missed (counted even when it was stale already), so a copy
    /// that raced a new miss knows not to clear the mark.
    misses: Box<[AtomicU64]>,
    stale_lock: Mutex<()>,
    servers: Mutex<Vec<Arc<ServerStats>>>,
    /// Every LUN reports thin provisioning (UNMAP frees space and reads back zeroes).
    pub discard: bool,
    /// Settings.
    pub opts: Options,
    /// Mapping refreshes done.
    pub refreshes: AtomicU64,
    /// The write-intent log (replicated disks).
    pub intent: Option<Arc<IntentLog>>,
    intent_thread: Mutex<Option<JoinHandle<()>>>,
    /// The reservation key every session registers (0: none, or withdrawn once fenced).
    pub pr_key: Arc<AtomicU64>,
    pub(crate) fenced: AtomicBool,
    /// Why the disk was fenced (set once).
    fenced_why: Mutex<String>,
    /// Writes, discards and flushes a target refused with RESERVATION CONFLICT.
    pub fenced_writes: AtomicU64,
    /// Requests failed because the disk was fenced.
    pub fenced_requests: AtomicU64,
    /// The open-time resync.
    pub resync: ResyncStats,
}

/// How the intent worker's cleaning interval is chosen (settable for tests).
const CLEAN_INTERVAL: Duration = Duration::from_secs(1);

/// Every LUN of `m` with the furthest byte its extents reach.
fn luns_of(m: &StripeMap) -> Vec<(String, String, u16, u64)> {
    let mut need: Vec<(String, String, u16, u64)> = Vec::new();
    for reps in &m.extents {
        for x in reps {
            let end = x.addr + m.geometry.extent_size;
            match need
                .iter_mut()
                .find(|n| n.0 == x.portal && n.1 == x.target && n.2 == x.lun)
            {
                Some(n) => n.3 = n.3.max(end),
                None => need.push((x.portal.clone(), x.target.clone(), x.lun, end)),
            }
        }
    }
    need
}

impl Disk {
    /// Opens a file-backed disk: locks the mapping file (see [`FileControl`]).
    pub fn open(map_path: &std::path::Path, opts: Options) -> Result<Arc<Disk>, Error> {
        let ctl = FileControl::open(map_path)?;
        Disk::open_with(Arc::new(ctl), opts)
    }

    /// Opens a disk whose control plane holds the writer role already (see the module docs).
    pub fn open_with(control: Arc<dyn Control>, opts: Options) -> Result<Arc<Disk>, Error> {
        let m = control.map();
        let g = m.geometry;
        let r = g.replicas as usize;
        let stale: Box<[AtomicBool]> = (0..m.extents.len() * r)
            .map(|_| AtomicBool::new(false))
            .collect();
        for (i, rep) in control.load_stale()? {
            if let Some(b) = stale.get(i as usize * r + rep as usize) {
                b.store(true, Ordering::Relaxed);
            }
        }
        let pr_key = Arc::new(AtomicU64::new(control.pr_key().unwrap_or(0)));
        // Log in to every LUN once: reachable, 512-byte blocks, big enough; the reservation.
        let mut discard = true;
        let mut luns = Vec::new();
        let mut down = Vec::new();
        for (portal, target, lun, end) in luns_of(&m) {
            let mut cfg = Config::new(portal.clone(), target.clone());
            cfg.login_timeout = Duration::from_secs(5);
            cfg.reconnect_timeout = Duration::from_secs(2);
            if pr_key.load(Ordering::SeqCst) != 0 {
                cfg.registration = Some(Registration {
                    key: pr_key.clone(),
                    luns: vec![lun],
                });
            }
            let named = |e: &dyn std::fmt::Display| {
                Error::Master(format!("server {portal} target {target} LUN {lun}: {e}"))
            };
            let mut client = match iscsi::Client::connect(&cfg, lun) {
                Ok(c) => c,
                Err(e @ iscsi::Error::Fenced { .. }) => return Err(named(&e)),
                Err(e) if r > 1 => {
                    slog::warn!(opts.logger, "server down at open; its replicas are marked stale";
                        "portal" => &portal, "target" => &target, "error" => %e);
                    down.push((portal.clone(), target.clone(), lun, e.to_string()));
                    luns.push(Lun {
                        portal,
                        target,
                        lun,
                        client: None,
                    });
                    continue;
                }
                Err(e) => return Err(named(&e)),
            };
            let cap = client.read_capacity16().map_err(|e| named(&e))?;
            if u64::from(cap.block_size) != BLOCK {
                return Err(named(&format!(
                    "{}-byte blocks (only {BLOCK} is served)",
                    cap.block_size
                )));
            }
            if cap.bytes() < end {
                return Err(named(&format!(
                    "has {} bytes; its extents reach {end}",
                    cap.bytes()
                )));
            }
            discard &= cap.thin_provisioned;
            luns.push(Lun {
                portal,
                target,
                lun,
                client: Some(client),
            });
        }
        // Replicas on servers that did not answer are stale; every extent needs another.
        let mut marks_changed = false;
        for (i, reps) in m.extents.iter().enumerate() {
            let mut usable = 0;
            for (k, x) in reps.iter().enumerate() {
                let off = down
                    .iter()
                    .any(|d| d.0 == x.portal && d.1 == x.target && d.2 == x.lun);
                if off && !stale[i * r + k].swap(true, Ordering::Relaxed) {
                    marks_changed = true;
                }
                usable += usize::from(!stale[i * r + k].load(Ordering::Relaxed));
            }
            if usable == 0 {
                let why = down
                    .iter()
                    .map(|d| format!("{} ({})", d.0, d.3))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Error::Master(format!(
                    "extent {i} has no replica left to serve from (servers down: {why})"
                )));
            }
        }
        let resync = ResyncStats::default();
        let mut intent_log = None;
        if r > 1 {
            let region = intent::region_size(g.size, g.stripe_size);
            let (marked, seq) = match control.load_intent(g.size, region) {
                Ok(Some(rec)) => (rec.marked, rec.seq),
                Ok(None) => (Vec::new(), 0),
                Err(e) => {
                    slog::warn!(opts.logger, "write-intent record unreadable; resyncing every region";
                        "error" => %e);
                    resync.record_damaged.store(true, Ordering::Relaxed);
                    ((0..g.size.div_ceil(region) as u32).collect(), 0)
                }
            };
            resync
                .marked_at_open
                .store(marked.len() as u64, Ordering::Relaxed);
            let mut still = Vec::new();
            if !marked.is_empty() {
                let is_stale = |i: u32, k: u32| {
                    stale
                        .get(i as usize * r + k as usize)
                        .is_some_and(|b| b.load(Ordering::Relaxed))
                };
                let rep = resync::copy_regions(&m, &marked, region, &is_stale, &mut luns)?;
                slog::info!(opts.logger, "resynced the regions of the write-intent record";
                    "regions" => rep.regions, "bytes" => rep.bytes, "ms" => rep.millis,
                    "unresolved" => rep.unresolved.len(), "new_stale" => rep.new_stale.len());
                for (i, k) in &rep.new_stale {
                    if !stale[*i as usize * r + *k as usize].swap(true, Ordering::Relaxed) {
                        marks_changed = true;
                    }
                }
                resync.regions.store(rep.regions, Ordering::Relaxed);
                resync.bytes.store(rep.bytes, Ordering::Relaxed);
                resync
                    .unresolved
                    .store(rep.unresolved.len() as u64, Ordering::Relaxed);
                resync.millis.store(rep.millis, Ordering::Relaxed);
                still = rep.unresolved;
            }
            if marks_changed {
                control.store_stale(&marks_of(&stale, r))?;
                marks_changed = false;
            }
            let log = IntentLog::new(g.size, region, pr_key.load(Ordering::SeqCst), seq + 1)
                .map_err(|e| Error::io(std::path::Path::new("eventfd"), e))?;
            // The regions still unequal stay in the record until a later open copies them.
            control.store_intent(&Record {
                region_size: region,
                disk_size: g.size,
                token: pr_key.load(Ordering::SeqCst),
                seq: seq + 1,
                marked: still,
            })?;
            intent_log = Some(Arc::new(log));
        }
        if marks_changed {
            control.store_stale(&marks_of(&stale, r))?;
        }
        drop(luns);
        let disk = Arc::new(Disk {
            geometry: g,
            map: Mutex::new(m),
            control: control.clone(),
            misses: (0..stale.len()).map(|_| AtomicU64::new(0)).collect(),
            stale,
            stale_lock: Mutex::new(()),
            servers: Mutex::new(Vec::new()),
            discard,
            opts,
            refreshes: AtomicU64::new(0),
            intent: intent_log.clone(),
            intent_thread: Mutex::new(None),
            pr_key,
            fenced: AtomicBool::new(false),
            fenced_why: Mutex::new(String::new()),
            fenced_writes: AtomicU64::new(0),
            fenced_requests: AtomicU64::new(0),
            resync,
        });
        if r > 1 {
            let weak = Arc::downgrade(&disk);
            std::thread::Builder::new()
                .name("stripe-recover".into())
                .spawn(move || crate::recover::run(weak))
                .map_err(|e| Error::io(std::path::Path::new("recover thread"), e))?;
        }
        if let Some(log) = intent_log {
            let ctl = control.clone();
            let h = std::thread::Builder::new()
                .name("stripe-intent".into())
                .spawn(move || log.run(ctl, CLEAN_INTERVAL))
                .map_err(|e| Error::io(std::path::Path::new("intent thread"), e))?;
            *lock(&disk.intent_thread) = Some(h);
        }
        Ok(disk)
    }

    /// The mapping as the disk holds it now.
    pub fn map(&self) -> StripeMap {
        lock(&self.map).clone()
    }

    /// The control plane.
    pub fn control(&self) -> &Arc<dyn Control> {
        &self.control
    }

    pub(crate) fn server_stats(&self, portal: &str, target: &str) -> Arc<ServerStats> {
        let mut s = lock(&self.servers);
        if let Some(x) = s.iter().find(|x| x.portal == portal && x.target == target) {
            return x.clone();
        }
        let x = Arc::new(ServerStats {
            portal: portal.to_owned(),
            target: target.to_owned(),
            ..ServerStats::default()
        });
        s.push(x.clone());
        x
    }

    /// Whether replica `r` of extent `i` missed writes.
    #[inline]
    pub fn is_stale(&self, i: u32, r: u32) -> bool {
        let k = i as usize * self.geometry.replicas as usize + r as usize;
        self.stale.get(k).is_some_and(|b| b.load(Ordering::Relaxed))
    }

    /// Stale replicas.
    pub fn stale_count(&self) -> usize {
        self.stale
            .iter()
            .filter(|b| b.load(Ordering::Relaxed))
            .count()
    }

    /// Marks replicas stale and stores the marks (rare: after a replica failed). Returns
    /// false if they could not be stored: the requests that made them must then fail.
    pub(crate) fn mark_stale(&self, marks: &[(u32, u32)]) -> bool {
        let rr = self.geometry.replicas as usize;
        let mut new = false;
        for &(i, r) in marks {
            let k = i as usize * rr + r as usize;
            if let Some(m) = self.misses.get(k) {
                m.fetch_add(1, Ordering::SeqCst);
            }
            if let Some(b) = self.stale.get(k) {
                new |= !b.swap(true, Ordering::SeqCst);
            }
        }
        if !new {
            return true;
        }
        let _g = lock(&self.stale_lock);
        match self.control.store_stale(&marks_of(&self.stale, rr)) {
            Ok(()) => {
                slog::warn!(self.opts.logger, "replicas marked stale after failed writes";
                    "marks" => format!("{marks:?}"));
                true
            }
            Err(e) => {
                slog::error!(self.opts.logger, "cannot store stale marks"; "error" => %e);
                false
            }
        }
    }

    /// Whether the disk lost its writer role (it then fails every request).
    #[inline]
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed) || {
            if self.control.held() {
                false
            } else {
                self.fence(&self.control.lost_why());
                true
            }
        }
    }

    /// Fences the disk: no more writes from any of its sessions (the key is withdrawn so no
    /// login registers it again); logged once.
    pub fn fence(&self, why: &str) {
        self.pr_key.store(0, Ordering::SeqCst);
        if !self.fenced.swap(true, Ordering::SeqCst) {
            *lock(&self.fenced_why) = why.to_owned();
            slog::error!(self.opts.logger, "disk fenced: failing every request from now on";
                "why" => why);
        }
    }

    /// Reads the mapping again (it may have changed); keeps the new one if it describes the
    /// same disk. Returns the current mapping.
    pub(crate) fn refresh(&self) -> StripeMap {
        if let Some(n) = self.control.refresh_map() {
            let mut g = lock(&self.map);
            if *g != n {
                slog::info!(self.opts.logger, "mapping changed; using the new extents");
            }
            *g = n;
        }
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        self.map()
    }

    /// The stale replicas now, `(index, replica)`.
    pub fn stale_marks(&self) -> Vec<(u32, u32)> {
        marks_of(&self.stale, self.geometry.replicas as usize)
    }

    /// Writes replica `r` of extent `i` missed so far.
    pub(crate) fn misses(&self, i: u32, r: u32) -> u64 {
        let k = i as usize * self.geometry.replicas as usize + r as usize;
        self.misses.get(k).map_or(0, |m| m.load(Ordering::SeqCst))
    }

    /// Clears the stale mark of a replica just copied, unless it missed a write since
    /// `misses_before` (then the mark stays); stores the marks. True if cleared.
    pub(crate) fn clear_stale(&self, i: u32, r: u32, misses_before: u64) -> bool {
        let rr = self.geometry.replicas as usize;
        let k = i as usize * rr + r as usize;
        let _g = lock(&self.stale_lock);
        self.stale[k].store(false, Ordering::SeqCst);
        if self.misses[k].load(Ordering::SeqCst) != misses_before {
            self.stale[k].store(true, Ordering::SeqCst);
            return false;
        }
        match self.control.store_stale(&marks_of(&self.stale, rr)) {
            Ok(()) => true,
            Err(e) => {
                // Not stored: keep the replica out of reads (the stored marks still have it).
                self.stale[k].store(true, Ordering::SeqCst);
                slog::warn!(self.opts.logger, "cannot store cleared stale mark"; "error" => %e);
                false
            }
        }
    }

    /// Counters of every server, for `tap-ctl stats`.
    pub fn stats(&self) -> serde_json::Value {
        let s = lock(&self.servers);
        let g = self.geometry;
        let r = &self.resync;
        serde_json::json!({
            "driver": "stripe",
            "stripes": g.stripes,
            "stripe_size": g.stripe_size,
            "replicas": g.replicas,
            "extent_size": g.extent_size,
            "stale_replicas": self.stale_count(),
            "map_refreshes": self.refreshes.load(Ordering::Relaxed),
            "control": self.control.stats(),
            "fenced": self.fenced.load(Ordering::Relaxed),
            "fenced_why": lock(&self.fenced_why).clone(),
            "fenced_writes": self.fenced_writes.load(Ordering::Relaxed),
            "fenced_requests": self.fenced_requests.load(Ordering::Relaxed),
            "intent": self.intent.as_ref().map(|l| l.stats()),
            "resync": {
                "stale_copied": r.stale_copied.load(Ordering::Relaxed),
                "stale_bytes": r.stale_bytes.load(Ordering::Relaxed),
                "stale_copying": r.stale_copying.load(Ordering::Relaxed),
                "marked_at_open": r.marked_at_open.load(Ordering::Relaxed),
                "regions": r.regions.load(Ordering::Relaxed),
                "bytes": r.bytes.load(Ordering::Relaxed),
                "unresolved": r.unresolved.load(Ordering::Relaxed),
                "ms": r.millis.load(Ordering::Relaxed),
                "record_damaged": r.record_damaged.load(Ordering::Relaxed),
            },
            "servers": s.iter().map(|x| x.json()).collect::<Vec<_>>(),
        })
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Some(log) = &self.intent {
            log.stop();
        }
        if let Some(h) = lock(&self.intent_thread).take() {
            let _ = h.join();
        }
        if !self.fenced.load(Ordering::Relaxed) {
            self.control.release();
        }
    }
}

fn marks_of(stale: &[AtomicBool], rr: usize) -> Vec<(u32, u32)> {
    stale
        .iter()
        .enumerate()
        .filter(|(_, b)| b.load(Ordering::Relaxed))
        .map(|(k, _)| ((k / rr) as u32, (k % rr) as u32))
        .collect()
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stale marks in the text of a marks file, `index * replicas + replica` for `extents` x
/// `replicas`. The file is ours but may be damaged (a crash mid-write, an editor): lines that
/// are not two numbers in range are skipped, so damage can only forget marks, never invent
/// them or fail the open.
pub fn parse_stale_marks(bytes: &[u8], extents: usize, replicas: usize) -> Vec<bool> {
    let mut stale = vec![false; extents.saturating_mul(replicas)];
    for l in bytes.split(|&b| b == b'\n') {
        let Ok(l) = std::str::from_utf8(l) else {
            continue;
        };
        let mut f = l.split(' ');
        let (Some(i), Some(rep), None) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if let (Ok(i), Ok(rep)) = (i.parse::<usize>(), rep.parse::<usize>()) {
            if i < extents && rep < replicas {
                stale[i * replicas + rep] = true;
            }
        }
    }
    stale
}
