//! Making replicas equal again: the regions a write-intent record names ([`crate::intent`])
//! are copied, at open and before anything is served, from one chosen replica to the others.
//!
//! The source of each piece is the first replica of its extent that is not marked stale and
//! whose server answers (so, with every server up, replica 0): every write acknowledged
//! before the stop is on it, since a write is acknowledged only when every replica not marked
//! stale has it. A replica whose server does not answer is marked stale instead (it is copied
//! whole when it returns). Copies go through blocking sessions ([`iscsi::Client`]) that hold
//! the writer's reservation like the data path's.

use std::collections::BTreeSet;
use std::time::Instant;

use iscsi::Client;

use crate::map::StripeMap;
use crate::Error;

/// One LUN of the disk and its session (None: the server did not answer).
pub struct Lun {
    /// `host:port` of the portal.
    pub portal: String,
    /// Target IQN.
    pub target: String,
    /// LUN number.
    pub lun: u16,
    /// The session.
    pub client: Option<Client>,
}

/// What a resync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Regions copied.
    pub regions: u64,
    /// Bytes read from sources.
    pub bytes: u64,
    /// Regions that could not be made equal (no replica answered): still marked.
    pub unresolved: Vec<u32>,
    /// Replicas marked stale because their server did not answer, `(index, replica)`.
    pub new_stale: BTreeSet<(u32, u32)>,
    /// How long it took, in milliseconds.
    pub millis: u64,
}

fn find<'a>(luns: &'a mut [Lun], portal: &str, target: &str, lun: u16) -> Option<&'a mut Lun> {
    luns.iter_mut()
        .find(|l| l.portal == portal && l.target == target && l.lun == lun)
}

/// Copies regions `marked` (of `region_size` bytes) of the disk `map` from a source replica to
/// the others; `stale(index, replica)` tells the replicas never to use.
pub fn copy_regions(
    map: &StripeMap,
    marked: &[u32],
    region_size: u64,
    stale: &dyn Fn(u32, u32) -> bool,
    luns: &mut [Lun],
) -> Result<Report, Error> {
    let t0 = Instant::now();
    let g = map.geometry;
    let mut rep = Report::default();
    let mut buf = vec![0u8; g.stripe_size as usize];
    for &r in marked {
        let start = u64::from(r) * region_size;
        let end = (start + region_size).min(g.size);
        let mut off = start;
        let mut ok = true;
        while off < end {
            let loc = g.locate(off);
            let n = loc.run.min(end - off);
            off += n;
            let reps = &map.extents[loc.index as usize];
            let data = &mut buf[..n as usize];
            // The first replica that is not stale and reads: the source.
            let mut source = None;
            for (k, x) in reps.iter().enumerate() {
                let k = k as u32;
                if stale(loc.index, k) || rep.new_stale.contains(&(loc.index, k)) {
                    continue;
                }
                let Some(c) =
                    find(luns, &x.portal, &x.target, x.lun).and_then(|l| l.client.as_mut())
                else {
                    rep.new_stale.insert((loc.index, k));
                    continue;
                };
                match c.read16((x.addr + loc.offset) / 512, data, 512) {
                    Ok(()) => {
                        source = Some(k);
                        break;
                    }
                    Err(_) => {
                        rep.new_stale.insert((loc.index, k));
                    }
                }
            }
            let Some(src) = source else {
                ok = false;
                continue;
            };
            rep.bytes += n;
            for (k, x) in reps.iter().enumerate() {
                let k = k as u32;
                if k == src || stale(loc.index, k) || rep.new_stale.contains(&(loc.index, k)) {
                    continue;
                }
                let written = find(luns, &x.portal, &x.target, x.lun)
                    .and_then(|l| l.client.as_mut())
                    .map(|c| c.write16((x.addr + loc.offset) / 512, data, 512, false));
                if !matches!(written, Some(Ok(()))) {
                    rep.new_stale.insert((loc.index, k));
                }
            }
        }
        if ok {
            rep.regions += 1;
        } else {
            rep.unresolved.push(r);
        }
    }
    // What was copied is durable before the record that stops naming it is stored.
    for l in luns.iter_mut() {
        if let Some(c) = l.client.as_mut() {
            if c.synchronize_cache16().is_err() {
                return Err(Error::Master(format!(
                    "resync: server {} target {} LUN {} did not flush the copied regions",
                    l.portal, l.target, l.lun
                )));
            }
        }
    }
    rep.millis = t0.elapsed().as_millis() as u64;
    Ok(rep)
}
