//! The extent master's state in etcd: one key per LUN (its extents and their owners), the
//! next extent id, and the extent size; every change a compare-and-swap transaction.
//!
//! A change ([`stripe::master_server::Backend::apply`]) reads the whole state at one revision (one
//! transaction of two range reads), runs the master's own logic on it
//! ([`stripe::master::State`]: placement, idempotence, checks), and writes back only the LUN
//! keys that changed, each guarded by its `mod_revision` as read (a new key by
//! `create_revision == 0`), and the next id likewise. If another master changed any of them
//! first, the transaction fails and the change runs again on the new state. So two masters
//! never hand out one extent, a retried call still finds its extents, and any number of
//! masters can run. etcd failures (a leader election, a member down) are retried for up to
//! [`RETRY_FOR`]: a transaction whose answer was lost is found done on the next read.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use stripe::master::{Slot, State};
use stripe::master_server::Backend;
use stripe::proto::{Failure, ListRes, Status};

use crate::{Error, Etcd};

/// How long a change keeps retrying etcd failures and lost races.
pub const RETRY_FOR: Duration = Duration::from_secs(30);

/// The state as read at one revision.
struct Snapshot {
    next_id: u64,
    next_id_rev: i64,
    /// LUN key -> (its extents, mod_revision).
    luns: BTreeMap<String, (Vec<Slot>, i64)>,
}

/// The master's state in etcd (see the module docs).
pub struct EtcdBackend {
    etcd: Etcd,
    extent_size: u64,
    log: slog::Logger,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Config {
    version: u32,
    extent_size: u64,
}

fn lun_key(s: &Slot) -> String {
    format!(
        "luns/{} {} {}",
        s.extent.portal, s.extent.target, s.extent.lun
    )
}

fn storage(e: impl std::fmt::Display) -> Failure {
    Failure::new(Status::Storage, e.to_string())
}

impl EtcdBackend {
    /// Opens the state under `etcd`'s prefix. A new keyspace needs `extent_size`; an existing
    /// one must agree with it when given.
    pub fn open(etcd: Etcd, extent_size: Option<u64>, log: slog::Logger) -> Result<Self, Error> {
        let key = etcd.key("config");
        let mut c = etcd.client();
        let got = etcd
            .block_on(c.get(key.as_str(), None))
            .map_err(|e| etcd.err(e))?;
        let stored = match got.kvs().first() {
            Some(kv) => {
                let cfg: Config =
                    serde_json::from_slice(kv.value()).map_err(|e| Error::BadValue {
                        key: key.clone(),
                        why: e.to_string(),
                    })?;
                if cfg.version != 1 {
                    return Err(Error::BadValue {
                        key,
                        why: format!("version {} is not 1", cfg.version),
                    });
                }
                Some(cfg.extent_size)
            }
            None => None,
        };
        let extent_size = match (stored, extent_size) {
            (Some(s), Some(want)) if s != want => {
                return Err(Error::BadValue {
                    key,
                    why: format!("extents are {s} bytes, not {want}"),
                })
            }
            (Some(s), _) => s,
            (None, None) => {
                return Err(Error::BadValue {
                    key,
                    why: "no master state here yet: give an extent size".into(),
                })
            }
            (None, Some(want)) => {
                if want == 0 || want % (1 << 20) != 0 {
                    return Err(Error::BadValue {
                        key,
                        why: "the extent size must be a non-zero multiple of 1 MiB".into(),
                    });
                }
                let v = serde_json::to_vec(&Config {
                    version: 1,
                    extent_size: want,
                })
                .map_err(|e| etcd.err(e))?;
                let txn = Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), v, None)])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                let r = etcd.block_on(c.txn(txn)).map_err(|e| etcd.err(e))?;
                if !r.succeeded() {
                    // Another master created it at the same moment: it must agree.
                    return EtcdBackend::open(etcd, Some(want), log);
                }
                want
            }
        };
        Ok(EtcdBackend {
            etcd,
            extent_size,
            log,
        })
    }

    /// Extent size in bytes.
    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    fn snapshot(&self) -> Result<Snapshot, Error> {
        let e = &self.etcd;
        let luns = e.key("luns/");
        let next = e.key("next-id");
        let txn = Txn::new().and_then([
            TxnOp::get(luns.as_str(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(next.as_str(), None),
        ]);
        let mut c = e.client();
        let r = e.block_on(c.txn(txn)).map_err(|x| e.err(x))?;
        let mut snap = Snapshot {
            next_id: 1,
            next_id_rev: 0,
            luns: BTreeMap::new(),
        };
        for (k, op) in r.op_responses().into_iter().enumerate() {
            let TxnOpResponse::Get(g) = op else {
                continue;
            };
            for kv in g.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let bad = |why: String| Error::BadValue {
                    key: key.clone(),
                    why,
                };
                if k == 0 {
                    let slots: Vec<Slot> =
                        serde_json::from_slice(kv.value()).map_err(|x| bad(x.to_string()))?;
                    let rest = key[e.prefix.len() + 1..].to_owned();
                    snap.luns.insert(rest, (slots, kv.mod_revision()));
                } else {
                    snap.next_id = std::str::from_utf8(kv.value())
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| bad("not a number".into()))?;
                    snap.next_id_rev = kv.mod_revision();
                }
            }
        }
        Ok(snap)
    }

    fn state_of(&self, snap: &Snapshot) -> Result<State, Failure> {
        let slots = snap.luns.values().flat_map(|(s, _)| s.iter().cloned());
        State::from_slots(self.extent_size, snap.next_id, slots.collect()).map_err(storage)
    }

    /// One attempt: Ok(true) done, Ok(false) lost a race (run again).
    fn try_apply(
        &self,
        f: &mut dyn FnMut(&mut State) -> Result<(), Failure>,
    ) -> Result<Result<bool, Failure>, Error> {
        let snap = self.snapshot()?;
        let before = match self.state_of(&snap) {
            Ok(s) => s,
            Err(fl) => return Ok(Err(fl)),
        };
        let mut next = before.clone();
        if let Err(fl) = f(&mut next) {
            return Ok(Err(fl));
        }
        let mut after: BTreeMap<String, Vec<Slot>> = BTreeMap::new();
        for s in next.slots() {
            after.entry(lun_key(s)).or_default().push(s.clone());
        }
        let e = &self.etcd;
        let mut compares = Vec::new();
        let mut puts = Vec::new();
        for (k, slots) in &after {
            let old = snap.luns.get(k);
            if old.is_some_and(|(o, _)| o == slots) {
                continue;
            }
            let key = e.key(k);
            compares.push(match old {
                Some((_, rev)) => Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev),
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            });
            let v = serde_json::to_vec(slots).map_err(|x| e.err(x))?;
            puts.push(TxnOp::put(key.as_str(), v, None));
        }
        if next.next_id() != before.next_id() {
            let key = e.key("next-id");
            compares.push(if snap.next_id_rev == 0 {
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.as_str(), CompareOp::Equal, snap.next_id_rev)
            });
            puts.push(TxnOp::put(key.as_str(), next.next_id().to_string(), None));
        }
        if puts.is_empty() {
            return Ok(Ok(true));
        }
        if compares.len() > 128 || puts.len() > 128 {
            return Ok(Err(Failure::new(
                Status::BadArgs,
                format!(
                    "the change touches {} LUNs; one call may touch at most 127",
                    puts.len()
                ),
            )));
        }
        let mut c = e.client();
        let r = e
            .block_on(c.txn(Txn::new().when(compares).and_then(puts)))
            .map_err(|x| e.err(x))?;
        Ok(Ok(r.succeeded()))
    }
}

impl Backend for EtcdBackend {
    fn apply(&self, f: &mut dyn FnMut(&mut State) -> Result<(), Failure>) -> Result<(), Failure> {
        let deadline = Instant::now() + RETRY_FOR;
        let mut races = 0u32;
        let mut wait = Duration::from_millis(10);
        loop {
            match self.try_apply(f) {
                Ok(Ok(true)) => return Ok(()),
                Ok(Ok(false)) => {
                    races += 1;
                    slog::debug!(self.log, "lost a race to another master; retrying"; "races" => races);
                }
                Ok(Err(fl)) => return Err(fl),
                Err(e) => {
                    slog::warn!(self.log, "etcd call failed; retrying"; "error" => %e);
                    if Instant::now() >= deadline {
                        return Err(storage(e));
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(storage(format!(
                    "lost {races} races to other masters in {} s",
                    RETRY_FOR.as_secs()
                )));
            }
            // Jitter so that racing masters do not retry in lockstep.
            let jitter = Duration::from_micros(u64::from(std::process::id() % 997) * 7);
            std::thread::sleep(wait + jitter);
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    fn list(&self) -> Result<ListRes, Failure> {
        let deadline = Instant::now() + RETRY_FOR;
        loop {
            match self.snapshot() {
                Ok(snap) => return Ok(self.state_of(&snap)?.list()),
                Err(e) if Instant::now() >= deadline => return Err(storage(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}
