//! Counters of a Xen ring's grant access, per ring, and their totals: which mode each ring
//! uses (persistent grants, per-request mapping, grant copy; chosen per ring from what was
//! negotiated), how often a persistent grant was found mapped, and the map and copy calls.
//!
//! The ring's transport keeps the running figures ([`blkif::xen::backend::GrantCounters`]);
//! the ring loop copies them here after each pass.

use blkif::xen::backend::{GrantCounters, GrantMode, PersistentIo};
use serde::Serialize;

use super::Counter;

/// Grant counters of one ring (all zero on a ring that is not a Xen ring).
#[derive(Debug, Default)]
pub struct GrantStats {
    /// 1 if the ring maps each request's pages for its IO (gauge).
    pub ring_map: Counter,
    /// 1 if the ring copies through bounce pages (gauge).
    pub ring_copy: Counter,
    /// 1 if the ring keeps persistent grants (gauge).
    pub ring_persistent: Counter,
    /// 1 if it keeps them and stages their IO through its own pages (gauge).
    pub ring_staged: Counter,
    /// Segments whose persistent grant was mapped already.
    pub hits: Counter,
    /// Persistent grants mapped.
    pub misses: Counter,
    /// Persistent grants unmapped to make room for others.
    pub evictions: Counter,
    /// Requests mapped for their IO only.
    pub transient: Counter,
    /// Map calls.
    pub map_calls: Counter,
    /// Grant-copy calls.
    pub copy_calls: Counter,
    /// Persistent grants mapped now (gauge).
    pub mapped_pages: Counter,
    /// Most persistent grants the ring keeps (gauge).
    pub capacity: Counter,
}

crate::stats::absorb_fields!(GrantStats {
    hits,
    misses,
    evictions,
    transient,
    map_calls,
    copy_calls,
} skip {
    ring_map,
    ring_copy,
    ring_persistent,
    ring_staged,
    mapped_pages,
    capacity,
});

impl GrantStats {
    /// Takes the transport's running figures. Only the ring's thread may call this.
    pub fn update(&self, c: &GrantCounters) {
        self.ring_map.set(u64::from(c.mode == GrantMode::Map));
        self.ring_copy.set(u64::from(c.mode == GrantMode::Copy));
        let persistent = c.mode == GrantMode::Persistent;
        self.ring_persistent.set(u64::from(persistent));
        self.ring_staged.set(u64::from(
            persistent && c.persistent_io == PersistentIo::Staged,
        ));
        self.hits.set(c.hits);
        self.misses.set(c.misses);
        self.evictions.set(c.evictions);
        self.transient.set(c.transient);
        self.map_calls.set(c.map_calls);
        self.copy_calls.set(c.copy_calls);
        self.mapped_pages.set(c.mapped_pages);
        self.capacity.set(c.capacity);
    }

    /// The ring is gone: nothing of it is mapped any more.
    pub fn clear_gauges(&self) {
        for g in [
            &self.ring_map,
            &self.ring_copy,
            &self.ring_persistent,
            &self.ring_staged,
            &self.mapped_pages,
            &self.capacity,
        ] {
            g.set(0);
        }
    }
}

/// Live Xen rings by grant mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ModeCounts {
    /// Persistent grants.
    pub persistent: u64,
    /// Of those, the rings whose IO goes through their own pages (`tapback --persistent-io`).
    pub persistent_staged: u64,
    /// Per-request mapping.
    pub map: u64,
    /// Grant copy.
    pub copy: u64,
}

/// Grant figures for output.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GrantTotals {
    /// Live Xen rings in each mode.
    pub rings: ModeCounts,
    /// Segments whose persistent grant was mapped already.
    pub hits: u64,
    /// Persistent grants mapped.
    pub misses: u64,
    /// hits / (hits + misses).
    pub hit_ratio: f64,
    /// Persistent grants unmapped to make room.
    pub evictions: u64,
    /// Requests mapped for their IO only.
    pub transient: u64,
    /// Map calls.
    pub map_calls: u64,
    /// Grant-copy calls.
    pub copy_calls: u64,
    /// Persistent grants mapped now.
    pub mapped_pages: u64,
    /// Most persistent grants the live rings keep.
    pub capacity: u64,
}

/// Sums the counters of several rings.
pub fn totals<'a>(cs: impl IntoIterator<Item = &'a GrantStats>) -> GrantTotals {
    let mut t = GrantTotals::default();
    for c in cs {
        t.rings.map += c.ring_map.get();
        t.rings.copy += c.ring_copy.get();
        t.rings.persistent += c.ring_persistent.get();
        t.rings.persistent_staged += c.ring_staged.get();
        t.hits += c.hits.get();
        t.misses += c.misses.get();
        t.evictions += c.evictions.get();
        t.transient += c.transient.get();
        t.map_calls += c.map_calls.get();
        t.copy_calls += c.copy_calls.get();
        t.mapped_pages += c.mapped_pages.get();
        t.capacity += c.capacity.get();
    }
    let looked = t.hits + t.misses;
    t.hit_ratio = if looked == 0 {
        0.0
    } else {
        t.hits as f64 / looked as f64
    };
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Absorb;

    #[test]
    fn modes_are_gauges_counts_add_up_when_a_ring_retires() {
        let live = GrantStats::default();
        live.update(&GrantCounters {
            mode: GrantMode::Persistent,
            hits: 30,
            misses: 10,
            map_calls: 2,
            mapped_pages: 10,
            capacity: 352,
            ..GrantCounters::default()
        });
        let retired = GrantStats::default();
        let old = GrantStats::default();
        old.update(&GrantCounters {
            mode: GrantMode::Map,
            transient: 5,
            map_calls: 5,
            ..GrantCounters::default()
        });
        old.clear_gauges();
        retired.absorb(&old);
        let t = totals([&live, &retired]);
        assert_eq!(
            t.rings,
            ModeCounts {
                persistent: 1,
                persistent_staged: 1,
                map: 0,
                copy: 0
            }
        );
        assert_eq!((t.hits, t.misses, t.transient, t.map_calls), (30, 10, 5, 7));
        assert_eq!((t.mapped_pages, t.capacity), (10, 352));
        assert!((t.hit_ratio - 0.75).abs() < 1e-9);
    }
}
