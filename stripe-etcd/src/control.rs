//! The control plane of an etcd-backed disk being served ([`stripe::control::Control`]).
//!
//! # The writer role
//!
//! One key per disk, `PREFIX/writers/DISK`, bound to a lease of [`Options::ttl`] that a task
//! on this crate's runtime keeps alive (every third of the TTL). It is taken with a
//! transaction that puts it only if it does not exist; with [`Options::takeover`] it is put
//! whoever holds it (the hand-off of a live disk: the old holder was paused). The revision of
//! that put is the **fencing token**: the disk's sessions register it as their persistent
//! reservation key and hold "write exclusive, registrants only" on every LUN, preempting any
//! lower key, so an older writer's late writes end at the targets with RESERVATION CONFLICT.
//!
//! The role is lost when the key stops being ours (another writer took over: the keep-alive
//! task reads it back each round) or the lease cannot be renewed for a whole TTL; then
//! [`Control::held`] turns false for good, and the data path fails every request and withdraws
//! its reservation key. Every store (stale marks, the write-intent record, the record's
//! generation) is a transaction that first checks the key is still ours at our revision.
//!
//! # The cache
//!
//! The mapping file (format version 2) is this host's copy of the record: it is rewritten at
//! open and whenever the keep-alive task sees the record's generation move.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use stripe::control::Control;
use stripe::intent::Record;
use stripe::map::{Store, StripeMap};

use crate::record::{self, DiskRecord};
use crate::{Error, Etcd};

/// How an etcd-backed disk is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// The writer lease's time to live: a crashed writer's disk can be opened elsewhere (without
    /// a takeover) this long after its last renewal.
    pub ttl: Duration,
    /// Take the writer role even if another process holds it (see the module docs).
    pub takeover: bool,
    /// Bound on each etcd call.
    pub timeout: Duration,
    /// Who we are, written into the writer key (`host` and `pid` are added).
    pub owner: String,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            ttl: Duration::from_secs(10),
            takeover: false,
            timeout: Duration::from_secs(5),
            owner: "tapdisk".into(),
        }
    }
}

struct Shared {
    held: AtomicBool,
    why: Mutex<String>,
    map: Mutex<StripeMap>,
    stale: Mutex<Vec<(u32, u32)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn lose(&self, why: String) {
        if self.held.swap(false, Ordering::SeqCst) {
            *lock(&self.why) = why;
        }
    }
}

/// See the module docs.
pub struct EtcdControl {
    etcd: Arc<Etcd>,
    disk: String,
    cache: PathBuf,
    writer_key: String,
    token: i64,
    lease: i64,
    shared: Arc<Shared>,
    opts: Options,
    log: slog::Logger,
    since: Instant,
}

/// This host's name.
/// Runs `call` on `etcd`'s runtime until it succeeds or `deadline` passes (every 200 ms).
fn retry<T, F, Fut>(etcd: &Etcd, deadline: Instant, mut call: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    loop {
        match etcd.block_on(call()) {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(etcd.err(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

impl EtcdControl {
    /// Opens the disk whose cache is `map` (read from `path`): reads its record, rewrites the
    /// cache if it is behind, and takes the writer role.
    pub fn open(
        path: &Path,
        map: &StripeMap,
        opts: Options,
        log: slog::Logger,
    ) -> Result<EtcdControl, Error> {
        let Store::Etcd {
            endpoints,
            prefix,
            generation,
        } = &map.store
        else {
            return Err(Error::Stripe(stripe::Error::Invalid(format!(
                "{} is not an etcd-backed mapping file",
                path.display()
            ))));
        };
        let etcd = Etcd::connect(endpoints, prefix, opts.timeout)?;
        let (rec, _) = record::get(&etcd, &map.disk_id)?;
        let current = if rec.generation != *generation {
            record::write_cache(&etcd, &rec, path)?
        } else {
            rec.to_map(&etcd)?
        };
        let mut c = etcd.client();
        let ttl = opts.ttl.as_secs().max(2) as i64;
        // A member may be down (or not yet up): each call is retried until the deadline.
        let deadline = Instant::now() + opts.timeout;
        let lease = retry(&etcd, deadline, || {
            let mut c = etcd.client();
            async move { c.lease_grant(ttl, None).await }
        })?
        .id();
        let writer_key = etcd.key(&format!("writers/{}", map.disk_id));
        let me = serde_json::json!({
            "host": hostname(),
            "pid": std::process::id(),
            "owner": opts.owner,
            "since": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
        .to_string();
        let put = TxnOp::put(
            writer_key.as_str(),
            me.clone(),
            Some(PutOptions::new().with_lease(lease).with_prev_key()),
        );
        let txn = if opts.takeover {
            Txn::new().and_then([put])
        } else {
            Txn::new()
                .when([Compare::create_revision(
                    writer_key.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([put])
                .or_else([TxnOp::get(writer_key.as_str(), None)])
        };
        let r = retry(&etcd, deadline, || {
            let (mut c, txn) = (etcd.client(), txn.clone());
            async move { c.txn(txn).await }
        })?;
        let token = if r.succeeded() {
            r.header().map(|h| h.revision()).unwrap_or(0)
        } else {
            let held = r.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                    (
                        String::from_utf8_lossy(kv.value()).into_owned(),
                        kv.mod_revision(),
                    )
                }),
                _ => None,
            });
            match held {
                // An earlier attempt took it and its answer was lost on the way.
                Some((holder, rev)) if holder == me => rev,
                other => {
                    let _ = etcd.block_on(c.lease_revoke(lease));
                    return Err(Error::InUse {
                        disk: map.disk_id.clone(),
                        holder: other.map_or_else(|| "another process".into(), |(h, _)| h),
                    });
                }
            }
        };
        if token <= 0 {
            return Err(etcd.err("no revision in the answer to taking the writer key"));
        }
        if opts.takeover {
            let prev = r.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Put(p) => p
                    .prev_key()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            });
            slog::warn!(log, "took the disk's writer role over"; "disk" => &map.disk_id,
                "from" => prev.unwrap_or_else(|| "nobody".into()), "token" => token);
        }
        let shared = Arc::new(Shared {
            held: AtomicBool::new(true),
            why: Mutex::new(String::new()),
            map: Mutex::new(current),
            stale: Mutex::new(rec.stale.clone()),
        });
        let ctl = EtcdControl {
            etcd: Arc::new(etcd),
            disk: map.disk_id.clone(),
            cache: path.to_path_buf(),
            writer_key,
            token,
            lease,
            shared,
            opts,
            log,
            since: Instant::now(),
        };
        ctl.keep_alive(rec.generation);
        Ok(ctl)
    }

    /// The fencing token.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// Starts the keep-alive task (see the module docs).
    fn keep_alive(&self, mut generation: u64) {
        let etcd = self.etcd.clone();
        let shared = self.shared.clone();
        let (wk, token, lease) = (self.writer_key.clone(), self.token, self.lease);
        let ttl = self.opts.ttl;
        let log = self.log.clone();
        let disk = self.disk.clone();
        let cache = self.cache.clone();
        let mut c = etcd.client();
        self.etcd.runtime().spawn(async move {
            use tokio::time::timeout;
            // Renew every third of the TTL while etcd answers; after a round that renewed
            // nothing (a member, perhaps the leader, went away) try again soon, and bound every
            // call, so that a dead member never holds the lease's renewal up for a whole TTL.
            let every = (ttl / 3).max(Duration::from_millis(300));
            let soon = Duration::from_millis(200);
            let call = every.min(Duration::from_secs(1));
            let mut wait = every;
            let mut last_ok = Instant::now();
            let mut keeper = None;
            while shared.held.load(Ordering::SeqCst) {
                tokio::time::sleep(wait).await;
                if keeper.is_none() {
                    keeper = timeout(call, c.lease_keep_alive(lease))
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
                let mut renewed = false;
                if let Some((k, s)) = keeper.as_mut() {
                    let sent = matches!(timeout(call, k.keep_alive()).await, Ok(Ok(())));
                    let answer = timeout(call, s.message()).await;
                    match (sent, answer) {
                        (true, Ok(Ok(Some(resp)))) if resp.ttl() > 0 => renewed = true,
                        (true, Ok(Ok(Some(_)))) => {
                            shared.lose(format!("its lease {lease:#x} expired"));
                            break;
                        }
                        _ => keeper = None,
                    }
                }
                // The key must still be ours (another writer may have taken over).
                match timeout(call, c.get(wk.as_str(), None)).await {
                    Ok(Ok(g)) => match g.kvs().first() {
                        Some(kv) if kv.mod_revision() == token => {}
                        Some(kv) => {
                            shared.lose(format!(
                                "taken over by {}",
                                String::from_utf8_lossy(kv.value())
                            ));
                            break;
                        }
                        None => {
                            shared.lose("its writer key is gone (the lease expired)".into());
                            break;
                        }
                    },
                    _ => renewed = false,
                }
                if renewed {
                    last_ok = Instant::now();
                    wait = every;
                } else if last_ok.elapsed() >= ttl {
                    shared.lose(format!(
                        "the lease could not be renewed for {} s",
                        ttl.as_secs()
                    ));
                    break;
                } else {
                    wait = soon;
                    continue;
                }
                // The record's generation moved: refresh the cache.
                let key = format!("{}/disks/{disk}", etcd.prefix);
                if let Ok(Ok(r)) = timeout(call, c.get(key, None)).await {
                    if let Some(kv) = r.kvs().first() {
                        if let Ok(rec) = serde_json::from_slice::<DiskRecord>(kv.value()) {
                            if rec.generation > generation {
                                if let Ok(m) = rec.to_map(&etcd) {
                                    if m.write_new(&cache).is_ok() {
                                        generation = rec.generation;
                                        *lock(&shared.map) = m;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            if !shared.held.load(Ordering::SeqCst) {
                slog::error!(log, "lost the disk's writer role"; "disk" => &disk,
                    "why" => lock(&shared.why).clone());
            }
        });
    }

    /// A transaction guarded by the writer key; Ok(false) and the role is lost when the key is
    /// no longer ours. etcd failures are retried until `deadline`.
    fn guarded(
        &self,
        mut ops: impl FnMut() -> Vec<TxnOp>,
        deadline: Instant,
    ) -> Result<(), stripe::Error> {
        let e = &self.etcd;
        loop {
            if !self.held() {
                return Err(stripe::Error::Master(self.lost_why()));
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    self.writer_key.as_str(),
                    CompareOp::Equal,
                    self.token,
                )])
                .and_then(ops());
            let mut c = e.client();
            match e.block_on(async { tokio::time::timeout(self.opts.timeout, c.txn(txn)).await }) {
                Ok(Ok(r)) if r.succeeded() => return Ok(()),
                Ok(Ok(_)) => {
                    self.shared
                        .lose("the writer key is no longer ours (taken over)".into());
                    return Err(stripe::Error::Master(self.lost_why()));
                }
                Ok(Err(x)) if Instant::now() >= deadline => {
                    return Err(stripe::Error::Master(format!("etcd: {x}")))
                }
                Err(_) if Instant::now() >= deadline => {
                    return Err(stripe::Error::Master("etcd: no answer in time".into()))
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Control for EtcdControl {
    fn map(&self) -> StripeMap {
        lock(&self.shared.map).clone()
    }

    fn pr_key(&self) -> Option<u64> {
        Some(self.token as u64)
    }

    fn held(&self) -> bool {
        self.shared.held.load(Ordering::SeqCst)
    }

    fn lost_why(&self) -> String {
        format!(
            "disk {}: lost the writer role: {}",
            self.disk,
            lock(&self.shared.why)
        )
    }

    fn store_stale(&self, marks: &[(u32, u32)]) -> Result<(), stripe::Error> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (mut rec, rev) = record::get(&self.etcd, &self.disk)
                .map_err(|e| stripe::Error::Master(e.to_string()))?;
            rec.stale = marks.to_vec();
            rec.generation += 1;
            let v = serde_json::to_vec(&rec).map_err(|e| stripe::Error::Master(e.to_string()))?;
            let rk = record::key(&self.etcd, &self.disk);
            // Both the writer key and the record as read: another change retries.
            let e = &self.etcd;
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(self.writer_key.as_str(), CompareOp::Equal, self.token),
                    Compare::mod_revision(rk.as_str(), CompareOp::Equal, rev),
                ])
                .and_then([TxnOp::put(rk.as_str(), v, None)]);
            let mut c = e.client();
            match e.block_on(c.txn(txn)) {
                Ok(r) if r.succeeded() => {
                    *lock(&self.shared.stale) = marks.to_vec();
                    if let Ok(m) = record::write_cache(e, &rec, &self.cache) {
                        *lock(&self.shared.map) = m;
                    }
                    return Ok(());
                }
                Ok(_) => {
                    // Lost to another change of the record, or no longer the writer.
                    self.guarded(Vec::new, deadline)?;
                }
                Err(x) if Instant::now() >= deadline => {
                    return Err(stripe::Error::Master(format!("etcd: {x}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn load_stale(&self) -> Result<Vec<(u32, u32)>, stripe::Error> {
        Ok(lock(&self.shared.stale).clone())
    }

    fn load_intent(
        &self,
        disk_size: u64,
        region_size: u64,
    ) -> Result<Option<Record>, stripe::Error> {
        let e = &self.etcd;
        let k = e.key(&format!("intent/{}", self.disk));
        let mut c = e.client();
        let r = e
            .block_on(c.get(k.as_str(), None))
            .map_err(|x| stripe::Error::Master(format!("etcd: {x}")))?;
        match r.kvs().first() {
            None => Ok(None),
            Some(kv) => Record::decode(kv.value(), disk_size, region_size).map(Some),
        }
    }

    fn store_intent(&self, rec: &Record) -> Result<(), stripe::Error> {
        let k = self.etcd.key(&format!("intent/{}", self.disk));
        let b = rec.encode();
        // Short: the intent worker tries again next round (writes wait meanwhile).
        let deadline = Instant::now() + self.opts.timeout;
        self.guarded(|| vec![TxnOp::put(k.as_str(), b.clone(), None)], deadline)
    }

    fn refresh_map(&self) -> Option<StripeMap> {
        let (rec, _) = record::get(&self.etcd, &self.disk).ok()?;
        let cur = self.map();
        if rec.disk_id != cur.disk_id || rec.geometry != cur.geometry {
            return None;
        }
        let m = record::write_cache(&self.etcd, &rec, &self.cache)
            .or_else(|_| rec.to_map(&self.etcd))
            .ok()?;
        *lock(&self.shared.map) = m.clone();
        Some(m)
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "store": "etcd",
            "endpoints": self.etcd.endpoints(),
            "token": self.token,
            "lease": format!("{:x}", self.lease),
            "ttl_s": self.opts.ttl.as_secs(),
            "held": self.held(),
            "held_for_s": self.since.elapsed().as_secs(),
            "lost_why": lock(&self.shared.why).clone(),
        })
    }

    fn release(&self) {
        if !self.held() {
            return;
        }
        self.shared.held.store(false, Ordering::SeqCst);
        let e = &self.etcd;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.writer_key.as_str(),
                CompareOp::Equal,
                self.token,
            )])
            .and_then([TxnOp::delete(self.writer_key.as_str(), None)]);
        let mut c = e.client();
        e.block_on(async {
            let _ = tokio::time::timeout(self.opts.timeout, c.txn(txn)).await;
            let _ = tokio::time::timeout(self.opts.timeout, c.lease_revoke(self.lease)).await;
        });
        *lock(&self.shared.why) = "released at close".into();
    }
}
