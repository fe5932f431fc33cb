//! Trace points: every request's stages, timestamped, in a preallocated buffer per ring.
//!
//! Stages (ns on CLOCK_MONOTONIC, comparable across processes on one host): ring pop,
//! scheduler in (validated and mapped), IO submit, IO complete, response push. A local
//! frontend adds its own two (submit, sees the response) and joins them by request id. Each
//! batch taken from the ring is recorded too (requests and segments per batch: the thesis's
//! "segments per submission", Tables 3.5 and 4.1).
//!
//! The per-stage latency histograms in `tap-ctl stats` are always on. The record buffer is
//! opt-in (`--trace N`: room for N requests per ring) and append-only: when it is full, new
//! records are counted as dropped. The ring loop is its only writer; the control thread reads
//! what was published, so neither side ever waits for the other.

use std::cell::UnsafeCell;
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Nanoseconds on CLOCK_MONOTONIC (the vDSO makes this a few tens of ns).
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One request's trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReqRecord {
    /// The frontend's id.
    pub id: u64,
    /// The blkif operation byte.
    pub op: u8,
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub sectors: u32,
    /// Segments.
    pub segments: u32,
    /// Response status.
    pub status: i16,
    /// Popped from the ring.
    pub pop: u64,
    /// Handed to the scheduler.
    pub sched: u64,
    /// First IO submitted.
    pub submit: u64,
    /// Last IO completed.
    pub complete: u64,
    /// Response pushed.
    pub push: u64,
}

/// One batch taken from the ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// When it was taken.
    pub t: u64,
    /// Requests in it.
    pub requests: u32,
    /// Their segments.
    pub segments: u32,
}

struct Log<T> {
    recs: Box<[UnsafeCell<MaybeUninit<T>>]>,
    len: AtomicUsize,
    dropped: AtomicU64,
}

// SAFETY: only the single `TraceWriter` writes, and only to slots at or beyond `len`, which
// readers never touch; a slot is published by the Release store of `len` after it is written,
// and readers read only below an Acquire load of `len`. `T: Copy` has no drop glue.
unsafe impl<T: Copy + Send> Sync for Log<T> {}

impl<T: Copy> Log<T> {
    /// A log of `cap` records; `None` if the memory cannot be had.
    fn new(cap: usize) -> Option<Log<T>> {
        let mut recs = Vec::new();
        recs.try_reserve_exact(cap).ok()?;
        recs.extend((0..cap).map(|_| UnsafeCell::new(MaybeUninit::uninit())));
        Some(Log {
            recs: recs.into_boxed_slice(),
            len: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// Only the writer calls this.
    fn push(&self, r: T) {
        let i = self.len.load(Ordering::Relaxed);
        match self.recs.get(i) {
            Some(cell) => {
                // SAFETY: slot `i >= len` is invisible to readers and we are the only writer.
                unsafe { (*cell.get()).write(r) };
                self.len.store(i + 1, Ordering::Release);
            }
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn snapshot(&self) -> Vec<T> {
        let n = self.len.load(Ordering::Acquire);
        self.recs[..n]
            .iter()
            // SAFETY: slots below the published `len` are initialised and never written again.
            .map(|c| unsafe { (*c.get()).assume_init() })
            .collect()
    }
}

struct Shared {
    ring: u32,
    reqs: Log<ReqRecord>,
    batches: Log<BatchRecord>,
}

/// The ring loop's end of a trace buffer (one per ring; not `Clone`).
pub struct TraceWriter(Arc<Shared>);

/// The control thread's end.
#[derive(Clone)]
pub struct TraceReader(Arc<Shared>);

/// A trace buffer for ring `ring` with room for `cap` requests (and as many batches); an
/// `OutOfMemory` error if the memory cannot be had (the trace size is a setting: the ring that
/// wanted it fails, the process goes on).
pub fn buffer(ring: u32, cap: usize) -> std::io::Result<(TraceWriter, TraceReader)> {
    let (Some(reqs), Some(batches)) = (Log::new(cap), Log::new(cap)) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!("cannot allocate a trace buffer of {cap} requests"),
        ));
    };
    let s = Arc::new(Shared {
        ring,
        reqs,
        batches,
    });
    Ok((TraceWriter(s.clone()), TraceReader(s)))
}

impl TraceWriter {
    /// Records a request.
    #[inline]
    pub fn request(&self, r: ReqRecord) {
        self.0.reqs.push(r);
    }

    /// Records a batch.
    #[inline]
    pub fn batch(&self, b: BatchRecord) {
        self.0.batches.push(b);
    }
}

/// What a dump holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RingTrace {
    /// Ring number within the VBD.
    pub ring: u32,
    /// Requests, in completion order.
    pub requests: Vec<ReqRecord>,
    /// Batches, in order.
    pub batches: Vec<BatchRecord>,
    /// Requests not recorded because the buffer was full.
    pub dropped: u64,
}

impl TraceReader {
    /// Copies out what has been recorded so far.
    pub fn snapshot(&self) -> RingTrace {
        RingTrace {
            ring: self.0.ring,
            requests: self.0.reqs.snapshot(),
            batches: self.0.batches.snapshot(),
            dropped: self.0.reqs.dropped.load(Ordering::Relaxed),
        }
    }
}

/// Frontend timestamps of one request, to join with tapdisk's record of the same id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontStamps {
    /// Published on the ring.
    pub submit: u64,
    /// Response seen.
    pub seen: u64,
}

fn op_name(op: u8) -> &'static str {
    match op {
        0 => "read",
        1 => "write",
        2 => "barrier",
        3 => "flush",
        5 => "discard",
        6 => "indirect",
        _ => "op?",
    }
}

/// Writes `rings` as a Chrome trace-event JSON document (opens in Perfetto and
/// chrome://tracing): one async track per request with a nested slice per stage, and counter
/// events for batch sizes. `front(id)` may add the frontend's own stamps.
pub fn write_chrome<W: Write>(
    out: &mut W,
    minor: u32,
    rings: &[RingTrace],
    front: &dyn Fn(u32, &ReqRecord) -> Option<FrontStamps>,
) -> io::Result<()> {
    let t0 = rings
        .iter()
        .flat_map(|r| {
            r.requests.iter().map(|q| match front(r.ring, q) {
                Some(f) if f.submit > 0 => f.submit.min(q.pop),
                _ => q.pop,
            })
        })
        .chain(rings.iter().flat_map(|r| r.batches.iter().map(|b| b.t)))
        .filter(|&t| t > 0)
        .min()
        .unwrap_or(0);
    let us = |t: u64| (t.saturating_sub(t0)) as f64 / 1000.0;
    writeln!(out, "{{\"displayTimeUnit\":\"ns\",\"traceEvents\":[")?;
    let mut first = true;
    let mut ev = |out: &mut W, s: String| -> io::Result<()> {
        if !first {
            out.write_all(b",\n")?;
        }
        first = false;
        out.write_all(s.as_bytes())
    };
    let mut seq = 0u64;
    for r in rings {
        let tid = r.ring;
        for q in &r.requests {
            seq += 1;
            let f = front(r.ring, q);
            let name = op_name(q.op);
            let (start, end) = match f {
                Some(f) if f.submit > 0 && f.seen > 0 => (f.submit, f.seen),
                _ => (q.pop, q.push),
            };
            let args = format!(
                "{{\"id\":{},\"sector\":{},\"sectors\":{},\"segments\":{},\"status\":{}}}",
                q.id, q.sector, q.sectors, q.segments, q.status
            );
            ev(out, format!(
                "{{\"name\":\"{name}\",\"cat\":\"request\",\"ph\":\"b\",\"id\":{seq},\"pid\":{minor},\"tid\":{tid},\"ts\":{:.3},\"args\":{args}}}",
                us(start)
            ))?;
            let mut stages: Vec<(&str, u64, u64)> = Vec::with_capacity(6);
            if let Some(f) = f {
                stages.push(("ring (frontend to tapdisk)", f.submit, q.pop));
            }
            stages.push(("validate", q.pop, q.sched));
            stages.push(("queue", q.sched, q.submit));
            stages.push(("io", q.submit, q.complete));
            stages.push(("respond", q.complete, q.push));
            if let Some(f) = f {
                stages.push(("ring (tapdisk to frontend)", q.push, f.seen));
            }
            for (sname, a, b) in stages {
                if a == 0 || b < a {
                    continue;
                }
                ev(out, format!(
                    "{{\"name\":\"{sname}\",\"cat\":\"stage\",\"ph\":\"b\",\"id\":{seq},\"pid\":{minor},\"tid\":{tid},\"ts\":{:.3}}}",
                    us(a)
                ))?;
                ev(out, format!(
                    "{{\"name\":\"{sname}\",\"cat\":\"stage\",\"ph\":\"e\",\"id\":{seq},\"pid\":{minor},\"tid\":{tid},\"ts\":{:.3}}}",
                    us(b)
                ))?;
            }
            ev(out, format!(
                "{{\"name\":\"{name}\",\"cat\":\"request\",\"ph\":\"e\",\"id\":{seq},\"pid\":{minor},\"tid\":{tid},\"ts\":{:.3}}}",
                us(end.max(start))
            ))?;
        }
        for b in &r.batches {
            ev(out, format!(
                "{{\"name\":\"batch ring {tid}\",\"ph\":\"C\",\"pid\":{minor},\"ts\":{:.3},\"args\":{{\"requests\":{},\"segments\":{}}}}}",
                us(b.t), b.requests, b.segments
            ))?;
        }
    }
    writeln!(out, "\n]}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory check at open counts [`tapdisk_control::limits::TRACE_RECORD_BYTES`] per
    /// traced request: a request's record and a batch's fit in it.
    #[test]
    fn records_fit_the_memory_check() {
        let per = std::mem::size_of::<ReqRecord>() + std::mem::size_of::<BatchRecord>();
        assert!(
            per as u64 <= tapdisk_control::limits::TRACE_RECORD_BYTES,
            "{per}"
        );
        assert!(buffer(0, usize::MAX / 64).is_err());
    }

    #[test]
    fn buffer_publishes_and_drops() {
        let (w, r) = buffer(3, 2).unwrap();
        assert!(r.snapshot().requests.is_empty());
        for i in 0..3 {
            w.request(ReqRecord {
                id: i,
                pop: 10 + i,
                push: 20 + i,
                ..Default::default()
            });
        }
        w.batch(BatchRecord {
            t: 5,
            requests: 3,
            segments: 33,
        });
        let s = r.snapshot();
        assert_eq!(s.ring, 3);
        assert_eq!(s.requests.iter().map(|q| q.id).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(s.dropped, 1);
        assert_eq!(s.batches.len(), 1);
    }

    #[test]
    fn chrome_json_parses() {
        let q = ReqRecord {
            id: 7,
            op: 1,
            sector: 8,
            sectors: 8,
            segments: 1,
            status: 0,
            pop: 1000,
            sched: 1100,
            submit: 1200,
            complete: 5000,
            push: 5100,
        };
        let rings = vec![RingTrace {
            ring: 1,
            requests: vec![q],
            batches: vec![BatchRecord {
                t: 1000,
                requests: 1,
                segments: 1,
            }],
            dropped: 0,
        }];
        let mut out = Vec::new();
        write_chrome(&mut out, 0, &rings, &|_, _| {
            Some(FrontStamps {
                submit: 900,
                seen: 5300,
            })
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let evs = v["traceEvents"].as_array().unwrap();
        // request b/e, 6 stages x b/e, one counter.
        assert_eq!(evs.len(), 2 + 12 + 1);
        assert_eq!(evs[0]["name"], "write");
        assert_eq!(evs[0]["ts"], 0.0);
        let io_b = evs
            .iter()
            .find(|e| e["name"] == "io" && e["ph"] == "b")
            .unwrap();
        assert_eq!(io_b["ts"].as_f64().unwrap(), 0.3);
    }

    #[test]
    fn clock_moves_forward() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a && a > 0);
    }
}
