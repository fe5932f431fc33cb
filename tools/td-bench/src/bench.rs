//! `td-bench run`: keep `iodepth` requests in flight and measure throughput and latency.
//!
//! The loop does no allocation and no data checks: every slot has its segment array built once,
//! ids are slot numbers, latencies go into a preallocated [`Histogram`]. A request's latency is
//! from the push that published it to the poll that saw its response.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blkif::local::{FrontRequest, LocalFrontend};
use blkif::protocol::{op, status, PAGE_SIZE};
use blkif::{Response, Segment};
use clap::{Args, ValueEnum};
use td_cli::{fmt_size, parse_size};

use crate::hist::Histogram;
use crate::progress::{Goal, Progress};
use crate::target::{self, ReqShape, Target, TargetArgs, STALL};
use crate::util::{clock_seed, parse_duration, parse_seed, Rng};
use tapdisk::trace::now_ns;

/// Access pattern (fio's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random mix of reads and writes (see --rwmixread).
    Randrw,
}

impl Rw {
    /// fio's `--rw` value.
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Randrw => "randrw",
        }
    }

    fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }
}

/// Workload options shared by `run` and `compare`.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Workload")]
pub struct WorkloadArgs {
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,
    /// Bytes per IO, a multiple of 512 (at most 64M). An IO larger than one ring request
    /// carries is split into several, as a guest's blkfront splits it.
    #[arg(long, value_name = "SIZE", default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// IOs kept in flight (their ring requests queue for free slots when the ring is full).
    #[arg(long, value_name = "D", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub iodepth: u32,
    /// Measure for this long [default: 10s].
    #[arg(long, value_name = "TIME", value_parser = parse_duration, conflicts_with = "count")]
    pub runtime: Option<Duration>,
    /// Measure this many requests instead of a time.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Run unmeasured for this long first [default: 2s with --runtime, 0 with --count].
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Percent of reads in randrw.
    #[arg(long, value_name = "PCT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,
    /// Seed of the random offsets (decimal or 0x...) [default: random].
    #[arg(long, value_parser = parse_seed)]
    pub seed: Option<u64>,
}

/// Options of `td-bench run`.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Print the result as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Trace every request (up to N; see --trace-size) and write a Chrome trace-event JSON
    /// to FILE (open it in https://ui.perfetto.dev): the frontend's stamps and tapdisk's
    /// stages, per request. Needs a private tapdisk (not --device).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<std::path::PathBuf>,
    /// Requests the trace has room for (per ring).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1_000_000,
        requires = "trace"
    )]
    pub trace_size: u32,
    /// After the workload, keep the ring attached and idle this long and print the CPU time
    /// the private tapdisk used meanwhile (what an idle disk costs, e.g. with --poll-us).
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub idle: Option<Duration>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: TargetArgs,
}

/// When a measurement ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// After this long.
    Time(Duration),
    /// After this many completions.
    Count(u64),
}

/// A workload with every default filled in and checked against the disk.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Access pattern.
    pub rw: Rw,
    /// Bytes per request.
    pub bs: u64,
    /// Requests in flight.
    pub iodepth: u32,
    /// End of the measurement.
    pub stop: Stop,
    /// Unmeasured time first.
    pub warmup: Duration,
    /// Percent reads (randrw).
    pub rwmixread: u8,
    /// Seed.
    pub seed: u64,
}

/// Largest `--bs`: one application IO of at most 64 MiB.
pub const MAX_BS: u64 = 64 << 20;
/// Largest `--iodepth`.
pub const MAX_IODEPTH: u32 = 4096;

impl Workload {
    /// Fills in defaults and checks the workload against the disk.
    pub fn resolve(w: &WorkloadArgs, disk_bytes: u64) -> Result<Workload> {
        if w.bs == 0 || !w.bs.is_multiple_of(512) {
            bail!("--bs {} is not a positive multiple of 512", w.bs);
        }
        if w.bs > MAX_BS {
            bail!(
                "--bs {} is above the maximum {}",
                fmt_size(w.bs),
                fmt_size(MAX_BS)
            );
        }
        if w.bs > disk_bytes {
            bail!(
                "--bs {} is larger than the disk ({})",
                fmt_size(w.bs),
                fmt_size(disk_bytes)
            );
        }
        if w.iodepth > MAX_IODEPTH {
            bail!("--iodepth {} is above the maximum {MAX_IODEPTH}", w.iodepth);
        }
        let stop = match (w.count, w.runtime) {
            (Some(n), _) => Stop::Count(n),
            (None, Some(t)) => Stop::Time(t),
            (None, None) => Stop::Time(Duration::from_secs(10)),
        };
        if stop == Stop::Time(Duration::ZERO) {
            bail!("--runtime must be positive");
        }
        let warmup = w.warmup.unwrap_or(match stop {
            Stop::Time(_) => Duration::from_secs(2),
            Stop::Count(_) => Duration::ZERO,
        });
        Ok(Workload {
            rw: w.rw,
            bs: w.bs,
            iodepth: w.iodepth,
            stop,
            warmup,
            rwmixread: w.rwmixread,
            seed: w.seed.unwrap_or_else(clock_seed),
        })
    }

    /// Pages of guest memory the workload needs with requests shaped as `shape`: each IO in
    /// flight owns its own buffer (and descriptor pages for indirect requests).
    pub fn mem_pages(&self, shape: &ReqShape) -> u32 {
        self.iodepth * shape.pages_per_io(self.bs) as u32
    }

    /// `randread bs=4k iodepth=32 10 s (2 s warmup)`.
    pub fn describe(&self) -> String {
        let stop = match self.stop {
            Stop::Time(t) => format!("{} s", t.as_secs_f64()),
            Stop::Count(n) => format!("{n} requests"),
        };
        let mix = if self.rw == Rw::Randrw {
            format!(" rwmixread={}", self.rwmixread)
        } else {
            String::new()
        };
        format!(
            "{}{mix} bs={} iodepth={} for {stop} ({} s warmup)",
            self.rw.name(),
            fmt_size(self.bs),
            self.iodepth,
            self.warmup.as_secs_f64()
        )
    }
}

/// Latency figures in microseconds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Latency {
    /// Mean.
    pub mean: f64,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    #[serde(rename = "p99.9")]
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// From a histogram of nanoseconds.
    pub fn from_ns(h: &Histogram) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            mean: h.mean() / 1000.0,
            min: us(h.min()),
            p50: us(h.percentile(50.0)),
            p99: us(h.percentile(99.0)),
            p999: us(h.percentile(99.9)),
            max: us(h.max()),
        }
    }
}

/// The result of one measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    /// Access pattern.
    pub rw: Rw,
    /// Bytes per request.
    pub bs: u64,
    /// IOs in flight.
    pub iodepth: u32,
    /// Ring requests each IO was split into.
    pub ring_requests_per_io: u32,
    /// IOs measured.
    pub ios: u64,
    /// Reads among them.
    pub read_ios: u64,
    /// Writes among them.
    pub write_ios: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Seconds measured.
    pub elapsed_s: f64,
    /// Requests per second.
    pub iops: f64,
    /// Bytes per second.
    pub bw_bytes: f64,
    /// Megabytes (10^6) per second.
    pub mb_s: f64,
    /// Latency, µs.
    pub lat_us: Latency,
}

/// Frontend timestamps of each ring request, when asked for (for joining with tapdisk's
/// trace): `(id, published, response seen)`, ns on CLOCK_MONOTONIC.
pub type Stamps = Vec<(u64, u64, u64)>;

/// Runs `w` on an attached frontend. Leaves nothing in flight.
///
/// Like a guest's block layer over blkfront, each application IO of `bs` bytes is split into
/// ring requests shaped as `shape` (direct requests of up to 11 segments, or indirect ones);
/// the parts wait in a FIFO for free ring slots, and the IO completes when its last part does
/// (failed if any part failed). Latency is from the moment the IO is queued to the response of
/// its last part, as an application sees it. Request ids are unique for the run
/// (`sequence << 32 | slot << 16 | part`), so a trace can be joined on them.
pub fn measure(
    fe: &mut LocalFrontend,
    sectors: u64,
    shape: &ReqShape,
    w: &Workload,
    mut stamps: Option<&mut Stamps>,
) -> Result<BenchResult> {
    let depth = w.iodepth as usize;
    let ppi = (w.bs as usize).div_ceil(PAGE_SIZE);
    let seg_per_req = shape.segs_per_req();
    let ind_pages = shape.indirect_pages();
    let parts = ppi.div_ceil(seg_per_req);
    let per_io = shape.pages_per_io(w.bs);
    if depth * per_io > fe.mem_pages() as usize {
        bail!(
            "internal error: {depth} IOs of {} need {} pages of guest memory, {} attached",
            fmt_size(w.bs),
            depth * per_io,
            fe.mem_pages()
        );
    }
    if parts > usize::from(u16::MAX) {
        bail!(
            "--bs {} needs too many ring requests per IO",
            fmt_size(w.bs)
        );
    }
    // IO slot s owns pages s*per_io .. +ppi for data, then `parts * ind_pages` descriptor
    // pages; segments and descriptor grant refs are built once, here.
    let segs: Vec<Segment> = (0..depth * ppi)
        .map(|i| {
            let (s, j) = (i / ppi, i % ppi);
            let left = w.bs as usize - j * PAGE_SIZE;
            Segment {
                gref: (s * per_io + j) as u32,
                first_sect: 0,
                last_sect: ((left.min(PAGE_SIZE) / 512) - 1) as u8,
                pad: 0,
            }
        })
        .collect();
    let ind_grefs: Vec<u32> = (0..depth * parts * ind_pages)
        .map(|i| {
            let s = i / (parts * ind_pages);
            (s * per_io + ppi + i % (parts * ind_pages)) as u32
        })
        .collect();
    let req_sectors = (seg_per_req * PAGE_SIZE / 512) as u64;
    let bs_sectors = w.bs / 512;
    let mut rng = Rng::new(w.seed);
    let blocks = sectors / bs_sectors;
    let mut next_seq = 0u64;
    let mut io_seq = 0u32;
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut sector_of = vec![0u64; depth];
    let mut seq_of = vec![0u32; depth];
    let mut left = vec![0u16; depth];
    let mut failed = vec![false; depth];
    let mut part_out = vec![false; depth * parts];
    let mut part_ts = vec![0u64; if stamps.is_some() { depth * parts } else { 0 }];
    let mut is_read = vec![false; depth];
    let mut issued_at = vec![Instant::now(); depth];
    // Ring requests waiting for a free slot: (IO slot << 16) | part.
    let mut fifo: VecDeque<u32> = VecDeque::with_capacity(depth * parts);
    let mut just_queued: Vec<usize> = Vec::with_capacity(fe.ring_size() as usize);
    let mut rsps: Vec<Response> = Vec::with_capacity(fe.ring_size() as usize);
    let (mut hr, mut hw) = (Histogram::new(), Histogram::new());
    let mut errors = 0u64;

    let start = Instant::now();
    let mut t0: Option<Instant> = w.warmup.is_zero().then_some(start);
    let mut end: Option<Instant> = None;
    let mut measured_issued = 0u64;
    let mut last_done = start;
    let count = match w.stop {
        Stop::Count(n) => Some(n),
        Stop::Time(_) => None,
    };
    // Runs of 10 s or more (or 200000 IOs) show how far they are.
    let mut progress = match w.stop {
        Stop::Time(rt) if rt + w.warmup >= Duration::from_secs(10) => {
            Some(Progress::new("run", Goal::Time(rt + w.warmup)))
        }
        Stop::Count(n) if n >= 200_000 => Some(Progress::new("run", Goal::Count(n))),
        _ => None,
    };
    let mut finished = 0u64;
    loop {
        let now = Instant::now();
        if t0.is_none() && now >= start + w.warmup {
            t0 = Some(now);
        }
        if let (Some(t), Stop::Time(rt)) = (t0, w.stop) {
            if end.is_none() && now >= t + rt {
                end = Some(t + rt);
            }
        }
        let stopping = end.is_some() || count.is_some_and(|n| measured_issued >= n);
        if !stopping {
            while let Some(s) = free.pop() {
                is_read[s] = match w.rw {
                    Rw::Read | Rw::Randread => true,
                    Rw::Write | Rw::Randwrite => false,
                    Rw::Randrw => rng.below(100) < u64::from(w.rwmixread),
                };
                sector_of[s] = if w.rw.random() {
                    rng.below(blocks) * bs_sectors
                } else {
                    let b = next_seq % blocks;
                    next_seq += 1;
                    b * bs_sectors
                };
                left[s] = parts as u16;
                failed[s] = false;
                issued_at[s] = now;
                seq_of[s] = io_seq;
                io_seq = io_seq.wrapping_add(1);
                for p in 0..parts {
                    fifo.push_back(((s as u32) << 16) | p as u32);
                }
                if t0.is_some() {
                    measured_issued += 1;
                    if count.is_some_and(|n| measured_issued >= n) {
                        break;
                    }
                }
            }
        }
        while fe.free_slots() > 0 {
            let Some(sp) = fifo.pop_front() else { break };
            let (s, p) = ((sp >> 16) as usize, (sp & 0xffff) as usize);
            let first = s * ppi + p * seg_per_req;
            let last = (first + seg_per_req).min((s + 1) * ppi);
            let id = (u64::from(seq_of[s]) << 32) | u64::from(sp);
            let opc = if is_read[s] { op::READ } else { op::WRITE };
            let sector = sector_of[s] + p as u64 * req_sectors;
            let req = if ind_pages > 0 {
                let g = (s * parts + p) * ind_pages;
                FrontRequest::Indirect {
                    op: opc,
                    id,
                    sector,
                    indirect: &ind_grefs[g..g + ind_pages],
                    segments: &segs[first..last],
                }
            } else {
                FrontRequest::Rw {
                    op: opc,
                    id,
                    sector,
                    segments: &segs[first..last],
                }
            };
            if !fe.queue(&req) {
                fifo.push_front(sp);
                break;
            }
            part_out[s * parts + p] = true;
            just_queued.push(s * parts + p);
        }
        if !just_queued.is_empty() {
            // Stamped before the push: the push publishes the requests and then kicks
            // tapdisk, and the kick (a system call that may wake another CPU) is the ring
            // path's time, not the frontend's. Stamped after it, a slow kick hid from the
            // ring-in stage and could even put tapdisk's IO before the frontend's publish.
            if stamps.is_some() {
                let ts = now_ns();
                for &k in &just_queued {
                    part_ts[k] = ts;
                }
            }
            fe.push()
                .map_err(|e| target::wait_error(e, fe.outstanding()))?;
            just_queued.clear();
        }
        if fe.outstanding() == 0 {
            if stopping && fifo.is_empty() {
                break;
            }
            continue;
        }
        let n = fe.outstanding();
        if !fe.wait(Some(STALL)).map_err(|e| target::wait_error(e, n))? {
            bail!(
                "no response from tapdisk for {} s with {n} requests in flight",
                STALL.as_secs()
            );
        }
        fe.poll(|r| rsps.push(r));
        let done = Instant::now();
        let seen = if stamps.is_some() { now_ns() } else { 0 };
        for r in rsps.drain(..) {
            let (s, p) = (((r.id >> 16) & 0xffff) as usize, (r.id & 0xffff) as usize);
            if s >= depth
                || p >= parts
                || !part_out[s * parts + p]
                || (r.id >> 32) as u32 != seq_of[s]
            {
                return Err(anyhow!(
                    "tapdisk answered an id that is not in flight: {:#x}",
                    r.id
                ));
            }
            part_out[s * parts + p] = false;
            if let Some(st) = stamps.as_deref_mut() {
                st.push((r.id, part_ts[s * parts + p], seen));
            }
            failed[s] |= r.status != status::OKAY;
            left[s] -= 1;
            if left[s] > 0 {
                continue;
            }
            free.push(s);
            finished += 1;
            let measured = t0.is_some_and(|t| issued_at[s] >= t) && end.is_none_or(|e| done <= e);
            if measured {
                let lat = done.duration_since(issued_at[s]).as_nanos() as u64;
                if is_read[s] {
                    hr.record(lat);
                } else {
                    hw.record(lat);
                }
                if failed[s] {
                    errors += 1;
                }
                last_done = done;
            }
        }
        if let Some(p) = &mut progress {
            p.update(finished, || format!("{errors} errors"));
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    let t0 = t0.unwrap_or(start);
    let elapsed = match (w.stop, end) {
        (Stop::Time(_), Some(e)) => e - t0,
        _ => last_done.saturating_duration_since(t0),
    };
    let (read_ios, write_ios) = (hr.count(), hw.count());
    hr.merge(&hw);
    let ios = hr.count();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let bw = (ios * w.bs) as f64 / secs;
    Ok(BenchResult {
        rw: w.rw,
        bs: w.bs,
        iodepth: w.iodepth,
        ring_requests_per_io: parts as u32,
        ios,
        read_ios,
        write_ios,
        errors,
        elapsed_s: elapsed.as_secs_f64(),
        iops: ios as f64 / secs,
        bw_bytes: bw,
        mb_s: bw / 1e6,
        lat_us: Latency::from_ns(&hr),
    })
}

/// Prints a result as text.
pub fn print_text(r: &BenchResult) {
    println!(
        "{}: {} IOs in {:.2} s: {:.0} IOPS, {:.1} MB/s{}",
        r.rw.name(),
        r.ios,
        r.elapsed_s,
        r.iops,
        r.mb_s,
        if r.errors > 0 {
            format!(", {} ERRORS", r.errors)
        } else {
            String::new()
        }
    );
    let l = &r.lat_us;
    println!(
        "latency (µs): mean {:.1}, min {:.1}, p50 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1}",
        l.mean, l.min, l.p50, l.p99, l.p999, l.max
    );
}

/// Joins tapdisk's trace of `t` with the frontend's `stamps` and writes Chrome JSON to `path`.
pub fn write_trace(t: &Target, path: &std::path::Path, stamps: &Stamps) -> Result<()> {
    let rings = t.trace()?;
    let front: std::collections::HashMap<u64, tapdisk::trace::FrontStamps> = stamps
        .iter()
        .map(|&(id, submit, seen)| (id, tapdisk::trace::FrontStamps { submit, seen }))
        .collect();
    let minor = 0;
    let f = std::fs::File::create(path)
        .map_err(|e| anyhow!("cannot create {}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    tapdisk::trace::write_chrome(&mut w, minor, &rings, &|_, q| front.get(&q.id).copied())?;
    use std::io::Write;
    w.flush()?;
    let n: usize = rings.iter().map(|r| r.requests.len()).sum();
    let dropped: u64 = rings.iter().map(|r| r.dropped).sum();
    eprintln!(
        "td-bench: wrote a trace of {n} requests to {}{}",
        path.display(),
        if dropped > 0 {
            format!(" ({dropped} more did not fit: raise --trace-size)")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Opens the target and resolves the workload against it.
pub fn prepare(w: &WorkloadArgs, t: &TargetArgs) -> Result<(Target, Workload)> {
    // Check what does not depend on the disk before starting anything.
    let work = Workload::resolve(w, u64::MAX)?;
    let target = target::open(t, work.mem_pages(&t.shape()))?;
    let work = Workload::resolve(w, target.info.sectors * 512)?;
    Ok((target, work))
}

/// Runs `td-bench run`. Returns whether every request succeeded.
pub fn run(args: &RunArgs) -> Result<bool> {
    let (mut t, w) = if args.trace.is_some() {
        let work = Workload::resolve(&args.workload, u64::MAX)?;
        let t = target::open_traced(
            &args.target,
            work.mem_pages(&args.target.shape()),
            args.trace_size,
        )?;
        let work = Workload::resolve(&args.workload, t.info.sectors * 512)?;
        (t, work)
    } else {
        prepare(&args.workload, &args.target)?
    };
    if !args.json {
        eprintln!(
            "td-bench run: {} on {}; ring {} slots {}",
            w.describe(),
            t.describe,
            t.fe.ring_size(),
            t.fe.abi().name()
        );
    }
    let mut stamps = args.trace.as_ref().map(|_| Stamps::new());
    let r = measure(&mut t.fe, t.info.sectors, &t.shape, &w, stamps.as_mut())?;
    if let (Some(path), Some(stamps)) = (&args.trace, &stamps) {
        write_trace(&t, path, stamps)?;
    }
    let idle = match args.idle {
        Some(d) => Some(idle_cost(&t, d)?),
        None => None,
    };
    drop(t);
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_text(&r);
    }
    if let (Some(d), Some(cpu)) = (args.idle, idle) {
        println!(
            "idle for {:.1} s: tapdisk used {:.1} ms of CPU ({:.3} % of a core)",
            d.as_secs_f64(),
            cpu.as_secs_f64() * 1e3,
            100.0 * cpu.as_secs_f64() / d.as_secs_f64()
        );
    }
    if r.errors > 0 {
        eprintln!("td-bench: {} of {} requests failed", r.errors, r.ios);
    }
    Ok(r.errors == 0)
}

/// CPU time (user + system, every thread) of process `pid` so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after its closing parenthesis;
    // utime and stime are fields 14 and 15, 11 and 12 after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(
        (ticks(11)? + ticks(12)?) * 1_000_000_000 / hz,
    ))
}

/// The CPU time the private tapdisk of `t` uses while its ring sits idle for `d`.
fn idle_cost(t: &Target, d: Duration) -> Result<Duration> {
    let pid = t
        .tapdisk_pid()
        .ok_or_else(|| anyhow!("--idle needs a private tapdisk (not --device)"))?;
    let before = cpu_time(pid)?;
    std::thread::sleep(d);
    Ok(cpu_time(pid)?.saturating_sub(before))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> WorkloadArgs {
        WorkloadArgs {
            rw: Rw::Randread,
            bs: 4096,
            iodepth: 32,
            runtime: None,
            count: None,
            warmup: None,
            rwmixread: 50,
            seed: Some(1),
        }
    }

    #[test]
    fn resolve_checks_and_defaults() {
        let w = Workload::resolve(&args(), 1 << 30).unwrap();
        assert_eq!(
            (w.bs, w.iodepth, w.stop, w.warmup),
            (
                4096,
                32,
                Stop::Time(Duration::from_secs(10)),
                Duration::from_secs(2)
            )
        );
        let direct = ReqShape {
            max_segments: 11,
            indirect_segments: 0,
        };
        assert_eq!(w.mem_pages(&direct), 32);
        let big = WorkloadArgs {
            bs: 1 << 20,
            iodepth: 64,
            count: Some(5),
            ..args()
        };
        let w = Workload::resolve(&big, 1 << 30).unwrap();
        assert_eq!(
            (w.bs, w.iodepth, w.stop, w.warmup),
            (1 << 20, 64, Stop::Count(5), Duration::ZERO)
        );
        assert_eq!(w.mem_pages(&direct), 64 * 256);
        let ind = ReqShape {
            max_segments: 11,
            indirect_segments: 600,
        };
        // 256 data pages in one request needing two descriptor pages.
        assert_eq!(w.mem_pages(&ind), 64 * 258);
        let odd = WorkloadArgs {
            bs: 6 * 512,
            iodepth: 3,
            ..args()
        };
        assert_eq!(
            Workload::resolve(&odd, 1 << 30).unwrap().mem_pages(&direct),
            3
        );
        let bad = |a: WorkloadArgs, disk| Workload::resolve(&a, disk).unwrap_err().to_string();
        assert!(bad(WorkloadArgs { bs: 1000, ..args() }, 1 << 30).contains("multiple of 512"));
        assert!(bad(args(), 2048).contains("larger than the disk"));
        assert!(bad(
            WorkloadArgs {
                bs: 128 << 20,
                ..args()
            },
            1 << 40
        )
        .contains("above the maximum"));
        assert!(bad(
            WorkloadArgs {
                iodepth: 5000,
                ..args()
            },
            1 << 30
        )
        .contains("--iodepth 5000"));
        assert!(w
            .describe()
            .starts_with("randread bs=1M iodepth=64 for 5 requests"));
    }
}
