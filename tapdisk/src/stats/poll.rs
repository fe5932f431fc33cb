//! Counters of adaptive polling (see the ring loop's `poll` module), per ring, and their
//! totals.

use serde::Serialize;

use super::Counter;

/// Counters of polling, per ring.
#[derive(Debug, Default)]
pub struct PollCounters {
    /// Spins: times the loop polled instead of sleeping at once.
    pub spins: Counter,
    /// Spins that found work (a request or a completion) before their window ran out.
    pub hits: Counter,
    /// Spins whose window ran out with nothing to do.
    pub misses: Counter,
    /// Time spent spinning, ns.
    pub spin_ns: Counter,
    /// The window now, ns (a gauge: 0 when closed).
    pub window_ns: Counter,
}

crate::stats::absorb_fields!(PollCounters {
    spins,
    hits,
    misses,
    spin_ns,
} skip {
    window_ns,
});

/// Polling figures for output.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PollTotals {
    /// Spins.
    pub spins: u64,
    /// Spins that found work.
    pub hits: u64,
    /// Spins that ran out.
    pub misses: u64,
    /// Time spent spinning, ms.
    pub spin_ms: f64,
    /// The largest window of any ring now, µs (0: every ring sleeps at once).
    pub window_us: f64,
}

/// Sums the counters of several rings.
pub fn totals<'a>(cs: impl IntoIterator<Item = &'a PollCounters>) -> PollTotals {
    let mut t = PollTotals::default();
    for c in cs {
        t.spins += c.spins.get();
        t.hits += c.hits.get();
        t.misses += c.misses.get();
        t.spin_ms += c.spin_ns.get() as f64 / 1e6;
        t.window_us = t.window_us.max(c.window_ns.get() as f64 / 1000.0);
    }
    t
}
