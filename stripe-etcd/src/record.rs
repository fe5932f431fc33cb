//! Each disk's record in etcd (`PREFIX/disks/DISK`): what a file-backed disk's mapping file
//! says (geometry, extents, replicas) plus its stale marks and a generation that moves on
//! every change. A mapping file of format version 2 is a host's cache of it: tapdisk serves
//! from the cache and writes it again when the generation moved.

use std::path::Path;

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};
use stripe::map::{Geometry, MapExtent, Store, StripeMap};

use crate::{Error, Etcd};

/// The record's format version.
pub const VERSION: u32 = 1;

/// A disk's record (JSON in etcd).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskRecord {
    /// Format version, [`VERSION`].
    pub version: u32,
    /// The disk id.
    pub disk_id: String,
    /// The master that allocated its extents.
    pub master: String,
    /// The shape.
    pub geometry: Geometry,
    /// `extents[index][replica]`.
    pub extents: Vec<Vec<MapExtent>>,
    /// Replicas that missed writes, `(index, replica)`, ascending.
    pub stale: Vec<(u32, u32)>,
    /// Moves on every change of the record.
    pub generation: u64,
}

impl DiskRecord {
    /// The record of a new disk described by `m`.
    pub fn from_map(m: &StripeMap) -> DiskRecord {
        DiskRecord {
            version: VERSION,
            disk_id: m.disk_id.clone(),
            master: m.master.clone(),
            geometry: m.geometry,
            extents: m.extents.clone(),
            stale: Vec::new(),
            generation: 1,
        }
    }

    /// The mapping (a host's cache of this record from `etcd`), checked like a mapping file.
    pub fn to_map(&self, etcd: &Etcd) -> Result<StripeMap, Error> {
        let m = StripeMap {
            disk_id: self.disk_id.clone(),
            master: self.master.clone(),
            geometry: self.geometry,
            extents: self.extents.clone(),
            store: Store::Etcd {
                endpoints: etcd.endpoints().to_vec(),
                prefix: etcd.prefix.clone(),
                generation: self.generation,
            },
        };
        m.check().map_err(|e| Error::BadValue {
            key: etcd.key(&format!("disks/{}", self.disk_id)),
            why: e.to_string(),
        })?;
        Ok(m)
    }

    /// Decodes and checks a stored record.
    pub fn parse(key: &str, b: &[u8], etcd: &Etcd) -> Result<DiskRecord, Error> {
        let bad = |why: String| Error::BadValue {
            key: key.to_owned(),
            why,
        };
        if b.len() as u64 > stripe::map::MAX_FILE {
            return Err(bad("larger than a mapping file may be".into()));
        }
        let r: DiskRecord = serde_json::from_slice(b).map_err(|e| bad(e.to_string()))?;
        if r.version != VERSION {
            return Err(bad(format!("version {} is not {VERSION}", r.version)));
        }
        r.to_map(etcd)?;
        let reps = r.geometry.replicas;
        if r.stale
            .iter()
            .any(|&(i, k)| i as usize >= r.extents.len() || k >= reps)
        {
            return Err(bad("a stale mark out of range".into()));
        }
        Ok(r)
    }
}

/// The key of disk `disk`'s record.
pub fn key(etcd: &Etcd, disk: &str) -> String {
    etcd.key(&format!("disks/{disk}"))
}

/// Stores the record of a new disk; a record that is there already must be the same disk
/// (a retried create), else it is an error.
pub fn create(etcd: &Etcd, rec: &DiskRecord) -> Result<(), Error> {
    let k = key(etcd, &rec.disk_id);
    let v = serde_json::to_vec(rec).map_err(|e| etcd.err(e))?;
    let txn = Txn::new()
        .when([Compare::create_revision(k.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(k.as_str(), v, None)]);
    let mut c = etcd.client();
    let r = etcd.block_on(c.txn(txn)).map_err(|e| etcd.err(e))?;
    if r.succeeded() {
        return Ok(());
    }
    let (old, _) = get(etcd, &rec.disk_id)?;
    if old.geometry == rec.geometry && old.extents == rec.extents {
        return Ok(());
    }
    Err(Error::BadValue {
        key: k,
        why: "another disk of this id exists".into(),
    })
}

/// The record of `disk` and its `mod_revision`.
pub fn get(etcd: &Etcd, disk: &str) -> Result<(DiskRecord, i64), Error> {
    let k = key(etcd, disk);
    let mut c = etcd.client();
    let r = etcd
        .block_on(c.get(k.as_str(), None))
        .map_err(|e| etcd.err(e))?;
    let kv = r.kvs().first().ok_or_else(|| Error::NoDisk {
        disk: disk.to_owned(),
        prefix: etcd.prefix.clone(),
    })?;
    Ok((DiskRecord::parse(&k, kv.value(), etcd)?, kv.mod_revision()))
}

/// Removes the record, the write-intent record and (if no writer holds it) nothing else; a
/// disk with a writer is refused.
pub fn delete(etcd: &Etcd, disk: &str) -> Result<(), Error> {
    let w = etcd.key(&format!("writers/{disk}"));
    let txn = Txn::new()
        .when([Compare::create_revision(w.as_str(), CompareOp::Equal, 0)])
        .and_then([
            TxnOp::delete(key(etcd, disk), None),
            TxnOp::delete(etcd.key(&format!("intent/{disk}")), None::<DeleteOptions>),
        ]);
    let mut c = etcd.client();
    let r = etcd.block_on(c.txn(txn)).map_err(|e| etcd.err(e))?;
    if !r.succeeded() {
        return Err(Error::InUse {
            disk: disk.to_owned(),
            holder: "a tapdisk (its writer key is there)".into(),
        });
    }
    Ok(())
}

/// Writes the record as a host's mapping file (format version 2) at `path`, atomically.
pub fn write_cache(etcd: &Etcd, rec: &DiskRecord, path: &Path) -> Result<StripeMap, Error> {
    let m = rec.to_map(etcd)?;
    m.write_new(path)?;
    Ok(m)
}
