//! Per-VBD counters and latency histograms.
//!
//! Each ring's event loop is the only writer of its own [`RingStats`], so a counter update is a
//! relaxed load and store (no locked instruction, no lock); the control thread reads them at
//! any time and sums the rings of a VBD. Values read mid-update may be one request stale, which
//! is fine for statistics.

pub mod early;
pub mod grants;
pub mod poll;

use serde::Serialize;

/// A counter with one writer (the ring's thread) and many readers.
pub use metacache::Counter;

/// Counters of one kind of operation.
#[derive(Debug, Default)]
pub struct OpCounters {
    /// Requests completed.
    pub requests: Counter,
    /// Sectors moved (or discarded).
    pub sectors: Counter,
    /// Requests answered with an error.
    pub errors: Counter,
}

/// Sub-buckets per power of two in [`Histogram`].
const SUB: usize = 8;
const SUB_BITS: u32 = 3;
/// Buckets: values up to 2^48 ns (three days) with 8 sub-buckets per octave.
const BUCKETS: usize = 48 * SUB;

/// A log-linear latency histogram in nanoseconds (relative error under 12.5 %).
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[Counter]>,
    max: Counter,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| Counter::default()).collect(),
            max: Counter::default(),
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = ((v >> (exp - SUB_BITS)) as usize) & (SUB - 1);
    (((exp - SUB_BITS + 1) as usize) * SUB + sub).min(BUCKETS - 1)
}

fn bucket_low(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let exp = (b / SUB) as u32 + SUB_BITS - 1;
    let sub = (b % SUB) as u64;
    (1u64 << exp) | (sub << (exp - SUB_BITS))
}

impl Histogram {
    /// Records one value. Only the owning thread may call this.
    #[inline]
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].add(1);
        if ns > self.max.get() {
            self.max.set(ns);
        }
    }

    /// Adds this histogram's counts into `into` (a plain array of `BUCKETS`).
    fn accumulate(&self, into: &mut [u64], max: &mut u64) {
        for (a, b) in into.iter_mut().zip(self.buckets.iter()) {
            *a += b.get();
        }
        *max = (*max).max(self.max.get());
    }
}

/// Percentiles of a set of histograms.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Largest, µs.
    pub max_us: f64,
    /// The non-empty buckets: lower bound in µs and count (omitted for stage latencies).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<(f64, u64)>,
}

/// Percentiles over several histograms (e.g. every ring of a VBD).
pub fn percentiles<'a>(hs: impl IntoIterator<Item = &'a Histogram>) -> Percentiles {
    let mut counts = vec![0u64; BUCKETS];
    let mut max = 0;
    for h in hs {
        h.accumulate(&mut counts, &mut max);
    }
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return Percentiles::default();
    }
    let at = |q: f64| {
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // Middle of the bucket, in µs.
                let lo = bucket_low(b) as f64;
                let hi = bucket_low(b + 1) as f64;
                return ((lo + hi) / 2.0).min(max as f64) / 1000.0;
            }
        }
        max as f64 / 1000.0
    };
    Percentiles {
        count: total,
        p50_us: at(0.5),
        p90_us: at(0.9),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: max as f64 / 1000.0,
        buckets: counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(b, c)| (bucket_low(b) as f64 / 1000.0, *c))
            .collect(),
    }
}

/// What the scheduler did: ring requests in, backend IOs out.
#[derive(Debug, Default)]
pub struct SchedCounters {
    /// Ring requests (reads, writes, discards) dispatched.
    pub requests: Counter,
    /// Their segments.
    pub segments: Counter,
    /// Backend reads and writes issued.
    pub ios: Counter,
    /// iovecs in them (after coalescing adjacent pages).
    pub io_iovecs: Counter,
    /// Backend IOs that merged two or more requests.
    pub merged_ios: Counter,
    /// Merged IOs that failed and were retried request by request.
    pub merge_retries: Counter,
    /// fdatasyncs issued for flushes and barriers.
    pub flushes: Counter,
    /// Batches taken from the ring (one pass over the ring before the IO is submitted).
    pub batches: Counter,
    /// Requests in those batches.
    pub batch_requests: Counter,
    /// Segments in those batches.
    pub batch_segments: Counter,
}

/// Latency of each stage of a request (trace points, always on).
#[derive(Debug, Default)]
pub struct StageHists {
    /// Ring pop to scheduler: copy, validation, grant mapping.
    pub validate: Histogram,
    /// Scheduler to IO submit: waiting for ordering, sorting, merging.
    pub queue: Histogram,
    /// IO submit to IO complete: the backend.
    pub io: Histogram,
    /// IO complete to response pushed.
    pub respond: Histogram,
}

/// The counters of one ring (or of the NBD export): written by one thread only.
#[derive(Debug, Default)]
pub struct RingStats {
    /// Scheduler counters.
    pub sched: SchedCounters,
    /// Early read return.
    pub early: early::EarlyCounters,
    /// Adaptive polling.
    pub poll: poll::PollCounters,
    /// Grant access (Xen rings).
    pub grants: grants::GrantStats,
    /// Per-stage latencies.
    pub stages: StageHists,
    /// Reads.
    pub read: OpCounters,
    /// Writes.
    pub write: OpCounters,
    /// Flushes and barriers.
    pub flush: OpCounters,
    /// Discards.
    pub discard: OpCounters,
    /// Requests in flight now (accepted, not answered).
    pub in_flight: Counter,
    /// Requests waiting in the scheduler now.
    pub waiting: Counter,
    /// Backend IOs in flight now.
    pub ios_in_flight: Counter,
    /// Early reads answered or not whose pages are still being filled now.
    pub early_busy: Counter,
    /// Requests refused as malformed (guest-caused).
    pub bad_requests: Counter,
    /// Requests with unsupported operations.
    pub unsupported: Counter,
    /// Backend IO errors.
    pub io_errors: Counter,
    /// io_uring submissions (syscalls that submitted work).
    pub submits: Counter,
    /// Frontend notifications sent.
    pub notifies: Counter,
    /// Request latency, ring pop to response push.
    pub latency: Histogram,
}

/// Sums of one kind of operation, for output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpTotals {
    /// Requests completed.
    pub requests: u64,
    /// Sectors.
    pub sectors: u64,
    /// Errors.
    pub errors: u64,
}

impl OpTotals {
    fn add(&mut self, c: &OpCounters) {
        self.requests += c.requests.get();
        self.sectors += c.sectors.get();
        self.errors += c.errors.get();
    }
}

/// A VBD's counters summed over its rings and NBD export, as `tap-ctl stats` prints them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Reads.
    pub read: OpTotals,
    /// Writes.
    pub write: OpTotals,
    /// Flushes and barriers.
    pub flush: OpTotals,
    /// Discards.
    pub discard: OpTotals,
    /// In flight now.
    pub in_flight: u64,
    /// Waiting in the scheduler now.
    pub waiting: u64,
    /// Backend IOs in flight now.
    pub ios_in_flight: u64,
    /// Early reads still filling now.
    pub early_busy: u64,
    /// Malformed requests refused.
    pub bad_requests: u64,
    /// Unsupported operations refused.
    pub unsupported: u64,
    /// Backend IO errors.
    pub io_errors: u64,
    /// io_uring submit calls.
    pub submits: u64,
    /// Notifications sent to frontends.
    pub notifies: u64,
    /// Latency from ring pop to response.
    pub latency: Percentiles,
    /// The scheduler: ring requests vs backend IOs.
    pub sched: SchedTotals,
    /// Latency per stage.
    pub stages: StageTotals,
    /// Early read return.
    pub early: early::EarlyTotals,
    /// Adaptive polling.
    pub poll: poll::PollTotals,
    /// Grant access of Xen rings.
    pub grants: grants::GrantTotals,
}

/// Scheduler figures for output.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SchedTotals {
    /// Ring requests dispatched (reads, writes, discards).
    pub requests: u64,
    /// Backend reads and writes.
    pub backend_ios: u64,
    /// Ring requests per backend IO.
    pub merge_ratio: f64,
    /// Segments (pages) per backend IO.
    pub segments_per_io: f64,
    /// iovecs per backend IO.
    pub iovecs_per_io: f64,
    /// Backend IOs made of two or more requests.
    pub merged_ios: u64,
    /// Merged IOs retried request by request after an error.
    pub merge_retries: u64,
    /// fdatasyncs.
    pub flushes: u64,
    /// Batches taken from the ring.
    pub batches: u64,
    /// Requests per batch.
    pub requests_per_batch: f64,
    /// Segments per batch.
    pub segments_per_batch: f64,
}

/// Stage latencies for output.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StageTotals {
    /// Ring pop to scheduler.
    pub validate: Percentiles,
    /// Scheduler to IO submit.
    pub queue: Percentiles,
    /// IO submit to complete.
    pub io: Percentiles,
    /// IO complete to response.
    pub respond: Percentiles,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn brief<'a>(hs: impl IntoIterator<Item = &'a Histogram>) -> Percentiles {
    let mut p = percentiles(hs);
    p.buckets = Vec::new();
    p
}

/// Sums `rings`.
pub fn totals<'a>(rings: impl IntoIterator<Item = &'a RingStats> + Clone) -> Totals {
    let mut t = Totals::default();
    for r in rings.clone() {
        t.read.add(&r.read);
        t.write.add(&r.write);
        t.flush.add(&r.flush);
        t.discard.add(&r.discard);
        t.in_flight += r.in_flight.get();
        t.waiting += r.waiting.get();
        t.ios_in_flight += r.ios_in_flight.get();
        t.early_busy += r.early_busy.get();
        t.bad_requests += r.bad_requests.get();
        t.unsupported += r.unsupported.get();
        t.io_errors += r.io_errors.get();
        t.submits += r.submits.get();
        t.notifies += r.notifies.get();
    }
    let sum = |f: fn(&SchedCounters) -> &Counter| -> u64 {
        rings.clone().into_iter().map(|r| f(&r.sched).get()).sum()
    };
    let (req, ios, segs) = (sum(|c| &c.requests), sum(|c| &c.ios), sum(|c| &c.segments));
    let batches = sum(|c| &c.batches);
    t.sched = SchedTotals {
        requests: req,
        backend_ios: ios,
        merge_ratio: ratio(req, ios),
        segments_per_io: ratio(segs, ios),
        iovecs_per_io: ratio(sum(|c| &c.io_iovecs), ios),
        merged_ios: sum(|c| &c.merged_ios),
        merge_retries: sum(|c| &c.merge_retries),
        flushes: sum(|c| &c.flushes),
        batches,
        requests_per_batch: ratio(sum(|c| &c.batch_requests), batches),
        segments_per_batch: ratio(sum(|c| &c.batch_segments), batches),
    };
    t.stages = StageTotals {
        validate: brief(rings.clone().into_iter().map(|r| &r.stages.validate)),
        queue: brief(rings.clone().into_iter().map(|r| &r.stages.queue)),
        io: brief(rings.clone().into_iter().map(|r| &r.stages.io)),
        respond: brief(rings.clone().into_iter().map(|r| &r.stages.respond)),
    };
    t.early = early::totals(rings.clone().into_iter().map(|r| &r.early));
    t.poll = poll::totals(rings.clone().into_iter().map(|r| &r.poll));
    t.grants = grants::totals(rings.clone().into_iter().map(|r| &r.grants));
    t.latency = percentiles(rings.into_iter().map(|r| &r.latency));
    t
}

/// Adds the counters of a ring that has finished into an accumulator, so a VBD keeps its
/// totals without keeping every ring it ever served. Gauges (values "now") are not added: a
/// finished ring has nothing in flight. The caller must be the accumulator's only writer.
pub trait Absorb {
    /// Adds `other` into `self`.
    fn absorb(&self, other: &Self);
}

impl Absorb for Counter {
    fn absorb(&self, other: &Self) {
        self.add(other.get());
    }
}

impl Absorb for Histogram {
    fn absorb(&self, other: &Self) {
        for (a, b) in self.buckets.iter().zip(other.buckets.iter()) {
            a.absorb(b);
        }
        if other.max.get() > self.max.get() {
            self.max.set(other.max.get());
        }
    }
}

/// Implements [`Absorb`] field by field for a struct of counters and histograms. Fields that
/// are not added (gauges) are named after `skip`; a field named in neither list is a compile
/// error, so a new counter cannot be forgotten.
macro_rules! absorb_fields {
    ($t:ident { $($f:ident),* $(,)? } $(skip { $($s:ident),* $(,)? })?) => {
        impl $crate::stats::Absorb for $t {
            fn absorb(&self, other: &Self) {
                let $t { $($f: _,)* $($($s: _,)*)? } = other;
                $($crate::stats::Absorb::absorb(&self.$f, &other.$f);)*
            }
        }
    };
}
pub(crate) use absorb_fields;

absorb_fields!(OpCounters {
    requests,
    sectors,
    errors
});
absorb_fields!(SchedCounters {
    requests,
    segments,
    ios,
    io_iovecs,
    merged_ios,
    merge_retries,
    flushes,
    batches,
    batch_requests,
    batch_segments,
});
absorb_fields!(StageHists {
    validate,
    queue,
    io,
    respond
});
absorb_fields!(RingStats {
    sched,
    early,
    poll,
    grants,
    stages,
    read,
    write,
    flush,
    discard,
    bad_requests,
    unsupported,
    io_errors,
    submits,
    notifies,
    latency,
} skip {
    in_flight,
    waiting,
    ios_in_flight,
    early_busy,
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..100_000u64).chain([1 << 30, 1 << 40, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b >= last || v > 100_000);
            last = b;
            if v < (1 << 47) {
                assert!(bucket_low(b) <= v && v < bucket_low(b + 1), "v={v} b={b}");
            }
        }
    }

    #[test]
    fn percentiles_are_close() {
        let h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v * 1000); // 1..10000 µs
        }
        let p = percentiles([&h]);
        assert_eq!(p.count, 10_000);
        assert!((p.p50_us - 5000.0).abs() / 5000.0 < 0.13, "{p:?}");
        assert!((p.p99_us - 9900.0).abs() / 9900.0 < 0.13, "{p:?}");
        assert_eq!(p.max_us, 10_000.0);
        assert_eq!(percentiles([&Histogram::default()]).count, 0);
    }
}
