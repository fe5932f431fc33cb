//! Counters of early read return (see [`crate::early`]), per ring, and their totals.

use serde::Serialize;

use super::Counter;

/// Counters of early reads, per ring.
#[derive(Debug, Default)]
pub struct EarlyCounters {
    /// Reads handled by the early-read layer.
    pub reads: Counter,
    /// Of those, answered before all their pages were filled.
    pub answered_early: Counter,
    /// Pages still unmapped (not filled) when their read was answered.
    pub pages_unmapped: Counter,
    /// Faults the frontend took on its guest memory.
    pub faults: Counter,
    /// Of those, on pages not yet filled: a reader stalled.
    pub stalls: Counter,
    /// Time readers spent stalled, ns.
    pub stall_ns: Counter,
    /// Pages served from the cache.
    pub cache_hits: Counter,
    /// Pages that had to come from the disk.
    pub cache_misses: Counter,
    /// Reads that failed after they had been answered early.
    pub late_failures: Counter,
}

crate::stats::absorb_fields!(EarlyCounters {
    reads,
    answered_early,
    pages_unmapped,
    faults,
    stalls,
    stall_ns,
    cache_hits,
    cache_misses,
    late_failures,
});

/// Early-read figures for output.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EarlyTotals {
    /// Reads handled by the early-read layer.
    pub reads: u64,
    /// Answered before all their pages were filled.
    pub answered_early: u64,
    /// Pages unmapped when their read was answered.
    pub pages_unmapped: u64,
    /// Faults taken by the frontend.
    pub faults: u64,
    /// Faults on unfilled pages (a reader stalled).
    pub stalls: u64,
    /// Total stall time, µs.
    pub stall_us: f64,
    /// Pages served from the cache.
    pub cache_hits: u64,
    /// Pages read from the disk.
    pub cache_misses: u64,
    /// Reads that failed after being answered.
    pub late_failures: u64,
}

/// Sums the counters of several rings.
pub fn totals<'a>(cs: impl IntoIterator<Item = &'a EarlyCounters>) -> EarlyTotals {
    let mut t = EarlyTotals::default();
    for c in cs {
        t.reads += c.reads.get();
        t.answered_early += c.answered_early.get();
        t.pages_unmapped += c.pages_unmapped.get();
        t.faults += c.faults.get();
        t.stalls += c.stalls.get();
        t.stall_us += c.stall_ns.get() as f64 / 1000.0;
        t.cache_hits += c.cache_hits.get();
        t.cache_misses += c.cache_misses.get();
        t.late_failures += c.late_failures.get();
    }
    t
}
