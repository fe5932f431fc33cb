//! `td-bench thesis`: the experiments of the thesis "Impacts on the I/O Performance of the
//! Virtual Disk in Xen" (UBC, 2012), chapters 3 and 4, rerun through tapdisk-rs, each table
//! printed with the thesis's figures beside ours.
//!
//! Every experiment runs twice: on a real file (ext4 under /var/tmp by default, O_DIRECT) and
//! on the *model disk* ([`tapdisk::engine::model`]: the thesis's spindle, `X + Y × size` per
//! IO plus a seek when an IO does not start where the last ended, one IO at a time), which lets
//! the thesis's effects show on any machine. Outputs that use the model say so.
//!
//! The guest side is [`crate::guest`]'s block-layer model; the "added time" of the
//! ring path and tapdisk is measured from trace points: what the frontend saw (publish to
//! response) minus what the backend IO took (first IO submitted to last IO completed), the
//! thesis's `(X2 - X1) + (X4 - X3)`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use tapdisk::trace::{ReqRecord, RingTrace};
use tapdisk_control::ModelParams;
use td_cli::fmt_size;

use crate::bench::{self, Rw, Stamps, Stop, Workload};
use crate::compare;
use crate::guest::{self, PlannedReq};
use crate::plot;
use crate::target::{self, AbiArg, DirectArg, ReqShape, TargetArgs};
use crate::util::{prefill, RemoveFiles};

/// Which experiment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Experiment {
    /// Tables 3.1-3.4: direct writes of 4 KB to 1 MB: time per write, added time of the ring
    /// path and tapdisk, ring requests and backend IOs per write, by request size.
    #[value(
        name = "table-3.2",
        alias = "table-3.1",
        alias = "table-3.3",
        alias = "table-3.4"
    )]
    Table32,
    /// Tables 3.5 and 4.1: 4096 buffered 4 KB writes: submissions and segments per submission
    /// with a 1-, 2- and 16-page ring.
    #[value(name = "table-3.5", alias = "table-4.1")]
    Table35,
    /// Table 4.2: 100 interleaved buffered 112 KB writes, scheduler off vs on.
    #[value(name = "table-4.2")]
    Table42,
    /// Table 3.6: sequential throughput by block size (4-32 KB), the raw aio: driver vs
    /// parallax: and vhd: on the same storage, through tapdisk (real file only).
    #[value(name = "table-3.6")]
    Table36,
    /// Table 3.7: V2P and P2M metadata cache miss rates, 10 vs 128 slots, for 32768 buffered
    /// 4 KB writes (the thesis's workload) and for random 4 KB reads (where the cache matters).
    #[value(name = "table-3.7")]
    Table37,
    /// Figure 4.2: 4096 buffered 4 KB writes, scheduler off vs on, with a 1-, 2- and 16-page
    /// ring: MB/s of each (medians of --rounds runs) and the median of the rounds' on / off
    /// ratios with their middle half.
    #[value(name = "figure-4.2")]
    Figure42,
    /// Figures 3.1, 4.1, 4.2 and 4.3 as PNG charts in --out.
    Figures,
    /// Everything above.
    All,
    /// Figure 6.1: 512 KB direct and 4 KB buffered IO on a local file and on disks striped
    /// over 1, 2 and 4 tgtd servers of the emulated storage LAN (needs root, tgt, iproute2;
    /// not part of 'all').
    #[value(name = "figure-6.1")]
    Figure61,
}

/// Which storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiskChoice {
    /// The real file and the model disk.
    Both,
    /// Only the real file.
    Real,
    /// Only the model disk.
    Model,
}

/// Options of `td-bench thesis`.
#[derive(Args, Clone, Debug)]
pub struct ThesisArgs {
    /// Experiments to run.
    #[arg(value_enum, default_value = "all")]
    pub what: Vec<Experiment>,
    /// Image file for the real-disk runs [default: a temporary file in /var/tmp, removed at
    /// the end]. Its first 256 MiB are overwritten.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Folder for the charts.
    #[arg(long, value_name = "DIR", default_value = "thesis-out")]
    pub out: PathBuf,
    /// Storage to run on.
    #[arg(long, value_enum, default_value_t = DiskChoice::Both)]
    pub disk: DiskChoice,
    /// Direct writes per size on the real file (the model disk does half as many).
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = clap::value_parser!(u64).range(2..=100_000))]
    pub count: u64,
    /// The model disk's constants: 'default' (X=335 µs, Y=4000 ns/KB, seek=4170 µs) or
    /// X_US,Y_NS_PER_KB,SEEK_US.
    #[arg(long, value_name = "PARAMS", default_value = "default", value_parser = |s: &str| s.parse::<ModelParams>())]
    pub model: ModelParams,
    /// Also measure the added time of a 4 KB write with tapdisk polling its ring and the
    /// frontend polling for responses for up to US µs (needs two otherwise idle cores).
    #[arg(long, value_name = "US", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10000))]
    pub poll_us: u32,
    /// fio binary, for the physical-disk line of Figure 3.1.
    #[arg(long, value_name = "PATH", default_value = "fio")]
    pub fio: String,
    /// Figure 6.1: the rate of every server's link (tc syntax: 200mbit, 1gbit; 'none' for
    /// unshaped links).
    #[arg(long, value_name = "RATE", default_value = "200mbit")]
    pub lan_rate: String,
    /// Figure 6.1: server counts to measure.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', default_value = "1,2,4",
          value_parser = clap::value_parser!(u32).range(1..=8))]
    pub lan_servers: Vec<u32>,
    /// Figure 6.1: measured seconds of each direct-IO run.
    #[arg(long, value_name = "S", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub lan_seconds: u64,
    /// Figure 6.1: the storage LAN script [default: tests/storage-lan/storage-lan.sh of the
    /// source tree td-bench was built from].
    #[arg(long, value_name = "PATH")]
    pub lan_script: Option<PathBuf>,
    /// Rounds of Table 4.2 and Figure 4.2: each runs the scheduler off and on back to back
    /// (which goes first alternates, so an even count runs each first equally often); medians
    /// are shown, and the middle half of the rounds' on/off ratios.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Bytes written and read per pass in Table 3.6.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = td_cli::parse_size)]
    pub plx_size: u64,
    /// Runs per block size in Table 3.6 (raw, Parallax and VHD in turn); medians are shown.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub plx_repeat: u32,
}

/// The storage of one run.
#[derive(Clone, Debug)]
struct Disk {
    path: PathBuf,
    model: Option<ModelParams>,
}

impl Disk {
    fn name(&self) -> String {
        match self.model {
            Some(m) => format!("model disk ({m})"),
            None => format!("real file {}", self.path.display()),
        }
    }
}

/// A tapdisk configuration of one run.
#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    ring_order: u8,
    indirect: u16,
    merge: bool,
    /// tapdisk polls its ring, and the frontend polls for responses, this long (µs).
    poll_us: u32,
}

const THESIS_SETUP: Config = Config {
    name: "11 segments, no merging (tapdisk2)",
    ring_order: 0,
    indirect: 0,
    merge: false,
    poll_us: 0,
};

fn targs(disk: &Disk, c: Config) -> TargetArgs {
    TargetArgs {
        device: None,
        image: Some(disk.path.clone()),
        size: None,
        ring_order: c.ring_order,
        abi: AbiArg::X86_64,
        max_segments: 11,
        direct: DirectArg::strict_where_possible(&disk.path),
        poll_us: c.poll_us,
        spin_us: c.poll_us,
        indirect_segments: c.indirect,
        no_merge: !c.merge,
        max_merge_kb: 16384,
        model_disk: disk.model,
        early_read: None,
        inject_faults: None,
        cache_slots: 0,
        pin: false,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Per application IO (ids `seq << 32 | ...`): frontend span, backend span, in ns.
fn spans(stamps: &Stamps, trace: &[RingTrace]) -> Vec<(f64, f64)> {
    let recs: HashMap<u64, &ReqRecord> = trace
        .iter()
        .flat_map(|r| r.requests.iter())
        .map(|q| (q.id, q))
        .collect();
    let mut per_io: HashMap<u64, (u64, u64, u64, u64)> = HashMap::new();
    for &(id, pushed, seen) in stamps {
        let Some(q) = recs.get(&id) else { continue };
        let e = per_io.entry(id >> 32).or_insert((u64::MAX, 0, u64::MAX, 0));
        e.0 = e.0.min(pushed);
        e.1 = e.1.max(seen);
        e.2 = e.2.min(q.submit);
        e.3 = e.3.max(q.complete);
    }
    per_io
        .values()
        .filter(|e| e.1 >= e.0 && e.3 >= e.2)
        .map(|e| ((e.1 - e.0) as f64, (e.3 - e.2) as f64))
        .collect()
}

fn sched_figure(stats: &serde_json::Value, key: &str) -> f64 {
    stats["ring"]["sched"][key].as_f64().unwrap_or(0.0)
}

/// One row of the direct-write tables.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct DirectRow {
    bs: u64,
    lat_us: f64,
    added_us: f64,
    io_us: f64,
    reqs_per_io: f64,
    backend_ios_per_io: f64,
    mb_s: f64,
    /// Medians per ring request, µs: frontend publish to ring pop, pop to scheduler, scheduler
    /// to IO submit, IO complete to response push, push to the frontend seeing it.
    stages: [f64; 5],
}

/// Per-request stage medians (see `DirectRow::stages`).
fn stage_medians(stamps: &Stamps, trace: &[RingTrace]) -> [f64; 5] {
    let recs: HashMap<u64, &ReqRecord> = trace
        .iter()
        .flat_map(|r| r.requests.iter())
        .map(|q| (q.id, q))
        .collect();
    let mut v: [Vec<f64>; 5] = Default::default();
    for &(id, pushed, seen) in stamps {
        let Some(q) = recs.get(&id) else { continue };
        let d = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1000.0;
        v[0].push(d(pushed, q.pop));
        v[1].push(d(q.pop, q.sched));
        v[2].push(d(q.sched, q.submit));
        v[3].push(d(q.complete, q.push));
        v[4].push(d(q.push, seen));
    }
    v.map(median)
}

fn direct_writes(disk: &Disk, c: Config, bs: u64, count: u64) -> Result<DirectRow> {
    let ta = targs(disk, c);
    let w = Workload {
        rw: Rw::Write,
        bs,
        iodepth: 1,
        stop: Stop::Count(count),
        warmup: std::time::Duration::ZERO,
        rwmixread: 0,
        seed: 1,
    };
    let parts = bs.div_ceil(ta.shape().max_bytes());
    let mut t = target::open_traced(&ta, w.mem_pages(&ta.shape()), (count * parts + 64) as u32)?;
    let mut stamps = Stamps::new();
    let r = bench::measure(&mut t.fe, t.info.sectors, &t.shape, &w, Some(&mut stamps))?;
    if r.errors > 0 {
        bail!("{} of {} writes failed", r.errors, r.ios);
    }
    let stats = t.stats()?;
    let trace = t.trace()?;
    let sp = spans(&stamps, &trace);
    Ok(DirectRow {
        bs,
        lat_us: r.lat_us.p50,
        added_us: median(sp.iter().map(|s| (s.0 - s.1) / 1000.0).collect()),
        io_us: median(sp.iter().map(|s| s.1 / 1000.0).collect()),
        reqs_per_io: f64::from(r.ring_requests_per_io),
        backend_ios_per_io: sched_figure(&stats, "backend_ios") / r.ios as f64,
        mb_s: r.mb_s,
        stages: stage_medians(&stamps, &trace),
    })
}

/// What a buffered run showed.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct BufferedRow {
    requests: usize,
    batches: Vec<u32>,
    backend_ios: f64,
    elapsed_ms: f64,
    mb_s: f64,
}

fn buffered(disk: &Disk, c: Config, writes: &[(u64, u64)]) -> Result<BufferedRow> {
    let ta = targs(disk, c);
    let shape: ReqShape = ta.shape();
    let plan: Vec<PlannedReq> = guest::writeback_plan(writes, &shape);
    let pages = guest::plan_pages(&plan, &shape);
    let mut t = target::open_traced(&ta, pages as u32, plan.len() as u32 + 64)?;
    if t.shape != shape {
        bail!(
            "the backend offers less than the experiment needs ({:?})",
            t.shape
        );
    }
    let r = guest::run_plan(&mut t.fe, &shape, &plan, None)?;
    if r.errors > 0 {
        bail!("{} of {} writes failed", r.errors, r.requests);
    }
    let stats = t.stats()?;
    let trace = t.trace()?;
    let bytes: u64 = writes.iter().map(|w| w.1).sum();
    Ok(BufferedRow {
        requests: plan.len(),
        batches: trace
            .iter()
            .flat_map(|r| r.batches.iter().map(|b| b.segments))
            .collect(),
        backend_ios: sched_figure(&stats, "backend_ios"),
        elapsed_ms: r.elapsed_s * 1000.0,
        mb_s: bytes as f64 / r.elapsed_s / 1e6,
    })
}

// ---- The thesis's figures -----------------------------------------------------------------

/// Table 3.1 (time on the driver and disk, µs), Table 3.2 (added time, µs), Table 3.3 bios
/// (44 KB requests), Table 3.4 bios (88 KB requests), by size in KB.
const T31: &[(u64, f64)] = &[
    (4, 345.0),
    (8, 373.0),
    (16, 399.0),
    (32, 476.0),
    (64, 605.0),
    (128, 887.0),
    (256, 1412.0),
    (512, 2383.0),
    (1024, 4830.0),
];
const T32: &[(u64, f64, u32, u32)] = &[
    (4, 111.0, 1, 1),
    (8, 117.0, 1, 1),
    (16, 136.0, 1, 1),
    (32, 171.0, 1, 1),
    (64, 299.0, 2, 1),
    (128, 416.0, 3, 2),
    (256, 678.0, 6, 3),
    (512, 1315.0, 12, 6),
];

fn thesis_31(kb: u64) -> String {
    T31.iter()
        .find(|r| r.0 == kb)
        .map_or("-".into(), |r| format!("{:.0}", r.1))
}

fn thesis_32(kb: u64) -> (String, String, String) {
    T32.iter()
        .find(|r| r.0 == kb)
        .map_or(("-".into(), "-".into(), "-".into()), |r| {
            (format!("{:.0}", r.1), r.2.to_string(), r.3.to_string())
        })
}

const SIZES_KB: &[u64] = &[4, 8, 16, 32, 64, 128, 256, 512, 1024];

const DIRECT_CONFIGS: [Config; 4] = [
    THESIS_SETUP,
    Config {
        name: "88 KB requests (indirect, 22 segments)",
        ring_order: 0,
        indirect: 22,
        merge: false,
        poll_us: 0,
    },
    Config {
        name: "704 KB requests (indirect, 176 segments)",
        ring_order: 0,
        indirect: 176,
        merge: false,
        poll_us: 0,
    },
    Config {
        name: "11 segments, merging scheduler",
        ring_order: 0,
        indirect: 0,
        merge: true,
        poll_us: 0,
    },
];

fn table_3_2(disk: &Disk, count: u64, poll_us: u32) -> Result<Vec<Vec<DirectRow>>> {
    println!();
    println!(
        "Tables 3.1-3.4: direct writes (dd oflag=direct, one at a time, sequential), {count} per \
         size, 1-page ring, on the {}",
        disk.name()
    );
    println!(
        "  thesis: time = driver+disk (Table 3.1), added = blktap2+tapdisk2 (Table 3.2), bios = \
         requests per write with 44 KB (3.3) and 88 KB (3.4) requests"
    );
    println!(
        "  ours: time = the write as the frontend sees it (p50), added = that minus the \
         backend IO (p50, trace points), io = the backend IO (p50), reqs = ring requests per \
         write, ios = backend IOs per write"
    );
    let mut all = Vec::new();
    for c in DIRECT_CONFIGS {
        let mut rows = Vec::new();
        for &kb in SIZES_KB {
            rows.push(
                direct_writes(disk, c, kb << 10, count)
                    .with_context(|| format!("{} writes with {}", fmt_size(kb << 10), c.name))?,
            );
        }
        all.push(rows);
    }
    print!(
        "{:>6} | {:>6} {:>6} {:>4} {:>4} |",
        "size", "time", "added", "bios", "3.4"
    );
    for c in DIRECT_CONFIGS {
        let short: String = c.name.chars().take(36).collect();
        print!(" {short:<36} |");
    }
    println!();
    print!("{:>6} | {:>6} {:>6} {:>4} {:>4} |", "", "µs", "µs", "", "");
    for _ in DIRECT_CONFIGS {
        print!(
            " {:>8} {:>7} {:>8} {:>4} {:>5} |",
            "time µs", "added", "io µs", "reqs", "ios"
        );
    }
    println!();
    for (i, &kb) in SIZES_KB.iter().enumerate() {
        let (added, b33, b34) = thesis_32(kb);
        print!(
            "{:>6} | {:>6} {:>6} {:>4} {:>4} |",
            fmt_size(kb << 10),
            thesis_31(kb),
            added,
            b33,
            b34
        );
        for rows in &all {
            let r = rows[i];
            print!(
                " {:>8.0} {:>7.1} {:>8.0} {:>4.0} {:>5.1} |",
                r.lat_us, r.added_us, r.io_us, r.reqs_per_io, r.backend_ios_per_io
            );
        }
        println!();
    }
    for (c, rows) in DIRECT_CONFIGS.iter().zip(&all) {
        let st = rows[0].stages;
        println!(
            "  added time of a 4 KB write, {}: {:.1} µs = ring in {:.1} + validate and map {:.1} \
             + schedule {:.1} + respond {:.1} + ring out {:.1} (medians per request, µs)",
            c.name, rows[0].added_us, st[0], st[1], st[2], st[3], st[4]
        );
    }
    // The two wake-ups (tapdisk woken by the frontend's kick, the frontend by tapdisk's
    // notification) dominate; polling on both sides removes them, given two idle cores.
    if poll_us == 0 {
        return Ok(all);
    }
    let polled = Config {
        name: "11 segments, both sides polling",
        poll_us,
        ..THESIS_SETUP
    };
    let r = direct_writes(disk, polled, 4096, count)?;
    let st = r.stages;
    println!(
        "  added time of a 4 KB write, {} {poll_us} µs: {:.1} µs = ring in {:.1} + validate and \
         map {:.1} + schedule {:.1} + respond {:.1} + ring out {:.1}",
        polled.name, r.added_us, st[0], st[1], st[2], st[3], st[4]
    );
    Ok(all)
}

const T35_VIRTUAL: &[u32] = &[1636, 352, 352, 352, 352, 352, 352, 348];
const T41_8K: &[u32] = &[1635, 715, 704, 704, 338];

fn table_3_5(disk: &Disk) -> Result<Vec<BufferedRow>> {
    println!();
    println!(
        "Tables 3.5 / 4.1: 4096 buffered 4 KB writes (page cache writeback, 44 KB requests), on \
         the {}",
        disk.name()
    );
    println!(
        "  a submission is one batch tapdisk takes from the ring; segments per submission = \
         pages in it"
    );
    println!(
        "  thesis, 4 KB ring: {} submissions: {:?}",
        T35_VIRTUAL.len(),
        T35_VIRTUAL
    );
    println!(
        "  thesis, 8 KB ring: {} submissions: {:?}",
        T41_8K.len(),
        T41_8K
    );
    let writes = guest::sequential(4096, 4096);
    let mut rows = Vec::new();
    for order in [0u8, 1, 4] {
        let c = Config {
            name: "",
            ring_order: order,
            indirect: 0,
            merge: true,
            poll_us: 0,
        };
        let r = buffered(disk, c, &writes)?;
        let mut counts: Vec<(u32, usize)> = Vec::new();
        for &b in &r.batches {
            match counts.last_mut() {
                Some(l) if l.0 == b => l.1 += 1,
                _ => counts.push((b, 1)),
            }
        }
        let list: Vec<String> = counts
            .iter()
            .map(|(s, n)| {
                if *n > 1 {
                    format!("{s}x{n}")
                } else {
                    s.to_string()
                }
            })
            .collect();
        println!(
            "  ours, {:>2}-page ring ({:>3} requests): {:>3} submissions, segments: {}; {} ring \
             requests became {} backend IOs; {:.1} ms",
            1 << order,
            blkif::ring::ring_size(blkif::Abi::X86_64, 1 << order),
            r.batches.len(),
            list.join(" "),
            r.requests,
            r.backend_ios,
            r.elapsed_ms
        );
        rows.push(r);
    }
    Ok(rows)
}

/// Off and on of one experiment, `rounds` runs each.
struct OffOn {
    /// The median run of each, by elapsed time.
    off: BufferedRow,
    on: BufferedRow,
    /// Elapsed time on / off of each round's two runs, run back to back.
    time_ratios: Vec<f64>,
}

impl OffOn {
    /// Time on / off: the median of the rounds and their middle half.
    fn time(&self) -> Spread {
        Spread::of(self.time_ratios.clone())
    }

    /// Throughput on / off (the same bytes both ways, so off's time / on's).
    fn throughput(&self) -> Spread {
        Spread::of(self.time_ratios.iter().map(|r| 1.0 / r).collect())
    }
}

/// A median and the middle half (25th to 75th percentile) of a few ratios.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    median: f64,
    low: f64,
    high: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if v.is_empty() {
                return 0.0;
            }
            // Linear between the closest ranks, as a spreadsheet's PERCENTILE does.
            let x = q * (v.len() - 1) as f64;
            let (i, f) = (x.floor() as usize, x.fract());
            v[i] + (v[(i + 1).min(v.len() - 1)] - v[i]) * f
        };
        Spread {
            median: at(0.5),
            low: at(0.25),
            high: at(0.75),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} ({:.2}-{:.2})", self.median, self.low, self.high)
    }
}

/// Runs `off` and `on` `rounds` times each, back to back in each round, the first of the
/// pair alternating between rounds: a disk that is slower or faster for the second of two
/// runs (its cache, its neighbours) then weighs on both alike. The ratio of each round's pair
/// is kept as well as each side's median: on a noisy disk the spread of the ratios says
/// whether a difference is the scheduler's or the disk's.
fn off_on(
    disk: &Disk,
    off: Config,
    on: Config,
    writes: &[(u64, u64)],
    rounds: u32,
) -> Result<OffOn> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut time_ratios = Vec::new();
    for round in 0..rounds {
        let (x, y) = if round % 2 == 0 {
            let x = buffered(disk, off, writes)?;
            (x, buffered(disk, on, writes)?)
        } else {
            let y = buffered(disk, on, writes)?;
            (buffered(disk, off, writes)?, y)
        };
        time_ratios.push(y.elapsed_ms / x.elapsed_ms.max(1e-9));
        a.push(x);
        b.push(y);
    }
    let mid = |mut v: Vec<BufferedRow>| {
        v.sort_by(|x, y| x.elapsed_ms.total_cmp(&y.elapsed_ms));
        v.swap_remove(v.len() / 2)
    };
    Ok(OffOn {
        off: mid(a),
        on: mid(b),
        time_ratios,
    })
}

fn table_4_2(disk: &Disk, rounds: u32) -> Result<()> {
    println!();
    println!(
        "Table 4.2: 100 buffered 112 KB writes interleaved over two regions, 1-page ring, 44 KB \
         requests, on the {} (medians of {rounds} rounds, off and on back to back in each)",
        disk.name()
    );
    let writes = guest::interleaved(100, 112 << 10);
    let off = THESIS_SETUP;
    let on = Config {
        merge: true,
        ..THESIS_SETUP
    };
    let r = off_on(disk, off, on, &writes, rounds)?;
    let (off, on) = (&r.off, &r.on);
    println!(
        "  {:<28} {:>10} {:>10} {:>12}",
        "", "time", "backend IOs", "ring requests"
    );
    println!(
        "  {:<28} {:>10} {:>10} {:>12}",
        "thesis, before the sort", "1.419 s", "-", "-"
    );
    println!(
        "  {:<28} {:>10} {:>10} {:>12}",
        "thesis, after the sort", "0.359 s", "-", "-"
    );
    println!(
        "  {:<28} {:>8.1}ms {:>10.0} {:>12}",
        "ours, scheduler off", off.elapsed_ms, off.backend_ios, off.requests
    );
    println!(
        "  {:<28} {:>8.1}ms {:>10.0} {:>12}",
        "ours, scheduler on", on.elapsed_ms, on.backend_ios, on.requests
    );
    let t = r.time();
    println!(
        "  time on / off: ours {:.3} (rounds' middle half {:.3}-{:.3}), thesis {:.3}; backend \
         IOs fell {:.1}x",
        t.median,
        t.low,
        t.high,
        0.359 / 1.419,
        off.backend_ios / on.backend_ios.max(1.0)
    );
    Ok(())
}

/// Figure 4.2's numbers: per ring size, MB/s with the scheduler off and on (medians).
struct Fig42 {
    rings: Vec<String>,
    off: Vec<f64>,
    on: Vec<f64>,
}

fn figure_4_2(disk: &Disk, rounds: u32) -> Result<Fig42> {
    println!();
    println!(
        "Figure 4.2: 4096 buffered 4 KB writes (44 KB requests), scheduler off vs on, on the {} \
         (medians of {rounds} rounds, off and on back to back in each)",
        disk.name()
    );
    println!(
        "  {:<14} {:>9} {:>9} {:>18} {:>8} {:>8}",
        "ring", "off MB/s", "on MB/s", "on/off (mid half)", "IOs off", "IOs on"
    );
    let writes = guest::sequential(4096, 4096);
    let mut f = Fig42 {
        rings: Vec::new(),
        off: Vec::new(),
        on: Vec::new(),
    };
    for order in [0u8, 1, 4] {
        let off = Config {
            ring_order: order,
            ..THESIS_SETUP
        };
        let on = Config { merge: true, ..off };
        let r = off_on(disk, off, on, &writes, rounds)?;
        let (a, b) = (&r.off, &r.on);
        let ring = format!("{}-page ring", 1 << order);
        println!(
            "  {:<14} {:>9.1} {:>9.1} {:>18} {:>8.0} {:>8.0}",
            ring,
            a.mb_s,
            b.mb_s,
            r.throughput().to_string(),
            a.backend_ios,
            b.backend_ios
        );
        f.rings.push(ring);
        f.off.push(a.mb_s);
        f.on.push(b.mb_s);
    }
    println!(
        "  on/off is the median of the rounds' own ratios (each round runs off and on back to \
         back, in turn first); (mid half) is their 25th-75th percentile. Where it holds 1.00, \
         the difference is within this disk's noise."
    );
    Ok(f)
}

// ---- Parallax (section 3.5): Tables 3.6 and 3.7 ------------------------------------------

/// Target arguments for a private tapdisk serving `spec` (`aio:FILE` or `parallax:FILE`) with
/// `slots` metadata cache slots, a 1-page ring and 11 segments, as the thesis's tapdisk2.
fn spec_targs(spec: &str, slots: u32) -> TargetArgs {
    let disk = Disk {
        path: PathBuf::from(spec),
        model: None,
    };
    let mut t = targs(
        &disk,
        Config {
            merge: true,
            ..THESIS_SETUP
        },
    );
    t.cache_slots = slots;
    t
}

fn seq_workload(rw: Rw, bs: u64, count: u64) -> Workload {
    Workload {
        rw,
        bs,
        iodepth: 1,
        stop: Stop::Count(count),
        warmup: std::time::Duration::ZERO,
        rwmixread: 0,
        seed: 1,
    }
}

/// One run of Table 3.6 on one driver: MB/s of writing a fresh image, rewriting it, reading it.
fn seq_passes(spec: &str, bs: u64, size: u64) -> Result<[f64; 3]> {
    let ta = spec_targs(spec, 0);
    let mut t = target::open(&ta, (bs / 4096).max(1) as u32 + 1)?;
    let n = size / bs;
    let mut out = [0.0; 3];
    for (i, rw) in [Rw::Write, Rw::Write, Rw::Read].into_iter().enumerate() {
        let r = bench::measure(
            &mut t.fe,
            t.info.sectors,
            &t.shape,
            &seq_workload(rw, bs, n),
            None,
        )?;
        if r.errors > 0 {
            bail!("{} of {} IOs failed on {spec}", r.errors, r.ios);
        }
        out[i] = r.mb_s;
    }
    Ok(out)
}

/// The thesis's Table 3.6: `(KB, MB/s without Parallax, MB/s with)` ("virtual disk 2" is the
/// plain one, "virtual disk 1" the Parallax one).
const T36: &[(u64, f64, f64)] = &[
    (4, 20.0, 18.0),
    (8, 31.0, 29.0),
    (16, 46.0, 40.0),
    (32, 64.0, 59.0),
];

/// The drivers of Table 3.6, in column order: raw first (the baseline), then the formats.
const T36_DRIVERS: [(&str, &str); 3] = [("raw", "aio"), ("plx", "parallax"), ("vhd", "vhd")];

/// A fresh image of `size` bytes for Table 3.6's driver `driver` at `path`; its spec.
fn t36_image(driver: &str, path: &Path, size: u64) -> Result<String> {
    let _ = std::fs::remove_file(path);
    match driver {
        "parallax" => parallax::Disk::create(path, &parallax::CreateOptions::new(size))
            .map(drop)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?,
        "vhd" => vhd::create(path, &vhd::CreateOptions::dynamic(size))
            .map(drop)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?,
        _ => std::fs::File::create(path)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("creating {}", path.display()))?,
    }
    Ok(format!("{driver}:{}", path.display()))
}

fn table_3_6(dir: &Path, size: u64, repeat: u32) -> Result<()> {
    println!();
    println!(
        "Table 3.6: sequential IO by block size through tapdisk, the raw aio: driver vs \
         parallax: and vhd: on the same storage ({}), {} per pass, one IO at a time (dd), \
         1-page ring, median of {repeat}",
        dir.display(),
        fmt_size(size)
    );
    println!(
        "  passes: write a fresh image (Parallax and VHD allocate every block), rewrite it \
         (blocks in place), read it; no flush in the timed passes (dd oflag=direct sends none)"
    );
    let paths: Vec<PathBuf> = T36_DRIVERS
        .iter()
        .map(|(short, _)| dir.join(format!("td-bench-thesis-{}-36.{short}", std::process::id())))
        .collect();
    let _remove = RemoveFiles(paths.clone());
    let head = "raw / plx / vhd (plx, vhd)";
    println!(
        "  {:>5} | {:>16} | {:>33} | {:>33} | {:>33}",
        "bs", "thesis w/o, w/", "write new MB/s", "rewrite MB/s", "read MB/s"
    );
    println!(
        "  {:>5} | {:>16} | {head:>33} | {head:>33} | {head:>33}",
        "", "(ratio)"
    );
    let mut worst = [f64::MAX; 2];
    for &(kb, t_raw, t_plx) in T36 {
        let bs = kb << 10;
        let mut runs: [[Vec<f64>; 3]; 3] = Default::default();
        for _ in 0..repeat {
            for (k, (_, driver)) in T36_DRIVERS.iter().enumerate() {
                let spec = t36_image(driver, &paths[k], size)?;
                let r = seq_passes(&spec, bs, size)
                    .with_context(|| format!("{} IOs on {spec}", fmt_size(bs)))?;
                for p in 0..3 {
                    runs[k][p].push(r[p]);
                }
                std::fs::remove_file(&paths[k])?;
            }
        }
        let m = runs.map(|d| d.map(median));
        let mut cell = |p: usize| {
            let ratios = [m[1][p] / m[0][p], m[2][p] / m[0][p]];
            for (w, r) in worst.iter_mut().zip(ratios) {
                *w = w.min(r);
            }
            format!(
                "{:.1} / {:.1} / {:.1} ({:.2}, {:.2})",
                m[0][p], m[1][p], m[2][p], ratios[0], ratios[1]
            )
        };
        let (c0, c1, c2) = (cell(0), cell(1), cell(2));
        println!(
            "  {:>5} | {:>16} | {c0:>33} | {c1:>33} | {c2:>33}",
            fmt_size(bs),
            format!("{t_raw:.0}, {t_plx:.0} ({:.2})", t_plx / t_raw),
        );
    }
    println!(
        "  Parallax / raw: at worst {:.2} here (thesis: 0.87 to 0.94; goal: at least 0.90)",
        worst[0]
    );
    println!("  VHD / raw: at worst {:.2} here", worst[1]);
    Ok(())
}

/// `(V2P lookups, V2P misses, P2M lookups, P2M misses)` from a VBD's stats.
fn cache_counts(stats: &serde_json::Value) -> Result<[u64; 4]> {
    let c = &stats["driver"]["cache"];
    let get = |l: &str, k: &str| {
        c[l][k]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no parallax cache counters in the VBD's stats"))
    };
    Ok([
        get("v2p", "lookups")?,
        get("v2p", "misses")?,
        get("p2m", "lookups")?,
        get("p2m", "misses")?,
    ])
}

fn pct(misses: u64, lookups: u64) -> f64 {
    if lookups == 0 {
        0.0
    } else {
        misses as f64 * 100.0 / lookups as f64
    }
}

/// Cache counters over `f`, run on a private tapdisk serving `spec` with `slots` slots.
fn counted(
    spec: &str,
    slots: u32,
    pages: u32,
    f: impl FnOnce(&mut target::Target) -> Result<f64>,
) -> Result<([u64; 4], f64)> {
    let ta = spec_targs(spec, slots);
    let mut t = target::open(&ta, pages)?;
    let before = cache_counts(&t.stats()?)?;
    let figure = f(&mut t)?;
    let after = cache_counts(&t.stats()?)?;
    let mut d = [0u64; 4];
    for i in 0..4 {
        d[i] = after[i] - before[i];
    }
    Ok((d, figure))
}

fn miss_row(what: &str, slots: u32, c: [u64; 4], thesis: &str, extra: &str) {
    println!(
        "  {what:<22} {slots:>5} {:>10} {:>8} {:>8.3} % {:>10} {:>8} {:>8.3} % {thesis:>12} {extra}",
        c[0],
        c[1],
        pct(c[1], c[0]),
        c[2],
        c[3],
        pct(c[3], c[2]),
    );
}

fn table_3_7(dir: &Path) -> Result<()> {
    println!();
    println!(
        "Table 3.7: Parallax metadata cache, V2P and P2M lookups and misses, through tapdisk, \
         images in {}",
        dir.display()
    );
    println!(
        "  {:<22} {:>5} {:>10} {:>8} {:>10} {:>10} {:>8} {:>10} {:>12}",
        "workload",
        "slots",
        "V2P look",
        "misses",
        "miss rate",
        "P2M look",
        "misses",
        "miss rate",
        "thesis V/P"
    );
    let path = dir.join(format!("td-bench-thesis-{}-37.plx", std::process::id()));
    let _remove = RemoveFiles(vec![path.clone()]);
    let spec = format!("parallax:{}", path.display());
    let fresh = |size: u64| -> Result<()> {
        let _ = std::fs::remove_file(&path);
        parallax::Disk::create(&path, &parallax::CreateOptions::new(size))
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
        Ok(())
    };
    // The thesis's workload: dd of 32768 4 KB blocks through the page cache, written back
    // in 44 KB requests, to a fresh disk.
    let writes = guest::sequential(32768, 4096);
    let shape = spec_targs(&spec, 0).shape();
    let plan = guest::writeback_plan(&writes, &shape);
    let pages = guest::plan_pages(&plan, &shape) as u32;
    let mut seq_misses = 0;
    for (slots, thesis) in [(10u32, "0 / 0.98 %"), (128, "0 / 0 %")] {
        fresh(256 << 20)?;
        let (c, _) = counted(&spec, slots, pages, |t| {
            let r = guest::run_plan(&mut t.fe, &t.shape, &plan, None)?;
            if r.errors > 0 {
                bail!("{} of {} writes failed", r.errors, r.requests);
            }
            Ok(r.elapsed_s)
        })?;
        seq_misses += c[1] + c[3];
        miss_row("32768 x 4 KB buffered", slots, c, thesis, "");
    }
    if seq_misses == 0 {
        println!(
            "  (no misses on the thesis's workload: the writes are sequential to a fresh disk, so \
             every V2P and P2M leaf is created in the cache and used for 512 and 256 blocks in a \
             row before the next; the upper nodes are touched on every block and never evicted, \
             and an evicted leaf is never needed again. The thesis's 0.98 % came from its \
             Parallax's own workload, which read some metadata back.)"
        );
    }
    // Where the cache matters: random 4 KB reads over a written 64 MiB disk, whose V2P and
    // P2M leaves (32 and 64) fit in 128 slots but not in 10.
    let size = 64u64 << 20;
    for slots in [10u32, 128] {
        fresh(size)?;
        // Written first (through a tapdisk of its own, not counted).
        counted(&spec, slots, 4 * 256, |t| {
            let fill = Workload {
                rw: Rw::Write,
                bs: 1 << 20,
                iodepth: 4,
                stop: Stop::Count(size >> 20),
                warmup: std::time::Duration::ZERO,
                rwmixread: 0,
                seed: 1,
            };
            let sh = t.shape;
            let r = bench::measure(&mut t.fe, t.info.sectors, &sh, &fill, None)?;
            if r.errors > 0 {
                bail!("filling the disk: {} IOs failed", r.errors);
            }
            Ok(0.0)
        })?;
        // Counted apart from the fill: a new tapdisk, cold cache, the same image.
        let (c, iops) = counted(&spec, slots, 8, |t| {
            let w = Workload {
                rw: Rw::Randread,
                bs: 4096,
                iodepth: 8,
                stop: Stop::Count(20000),
                warmup: std::time::Duration::ZERO,
                rwmixread: 0,
                seed: 3,
            };
            let sh = t.shape;
            let r = bench::measure(&mut t.fe, t.info.sectors, &sh, &w, None)?;
            if r.errors > 0 {
                bail!("{} of {} reads failed", r.errors, r.ios);
            }
            Ok(r.iops)
        })?;
        miss_row(
            "20000 random 4 KB reads",
            slots,
            c,
            "-",
            &format!("{iops:.0} IOPS"),
        );
    }
    println!(
        "  (random reads over 64 MiB, cold cache: 32 V2P and 64 P2M leaves plus the nodes above \
         them are the working set; 128 slots hold it after the first touch of each node, 10 \
         slots miss most lookups)"
    );
    Ok(())
}

fn fio_direct_write(fio: &str, image: &Path, bs: u64, count: u64) -> Result<f64> {
    let w = Workload {
        rw: Rw::Write,
        bs,
        iodepth: 1,
        stop: Stop::Count(count),
        warmup: std::time::Duration::ZERO,
        rwmixread: 0,
        seed: 1,
    };
    let direct = target::direct_io_works(image);
    let mut args = compare::fio_args(&w, image, direct);
    // Sequential from offset 0, like dd; no time-based looping.
    args.retain(|a| a != "--time_based");
    let f = compare::run_fio_figures(fio, &args)?;
    Ok(f.mb_s)
}

fn figures(args: &ThesisArgs, real: Option<&Disk>, model: Option<&Disk>) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut written = Vec::new();
    let count = args.count.min(100);
    // Figure 3.1: direct-write throughput, physical (fio on the file) vs virtual (tapdisk).
    if let Some(d) = real {
        let mut phys = Vec::new();
        let mut virt = Vec::new();
        let mut ratio = Vec::new();
        for &kb in SIZES_KB {
            let p = fio_direct_write(&args.fio, &d.path, kb << 10, count)?;
            let v = direct_writes(d, THESIS_SETUP, kb << 10, count)?.mb_s;
            phys.push((kb as f64, p));
            virt.push((kb as f64, v));
            ratio.push((kb as f64, 100.0 * v / p.max(1e-9)));
        }
        let path = args.out.join("figure-3.1-throughput.png");
        plot::line_chart(
            &path,
            "Figure 3.1: direct writes, physical (fio) vs virtual (tapdisk, 44 KB requests)",
            "block size (KB)",
            "MB/s",
            &[
                ("physical (fio)".into(), phys),
                ("virtual (tapdisk)".into(), virt),
            ],
            true,
        )?;
        written.push(path);
        let path = args.out.join("figure-3.1-ratio.png");
        plot::line_chart(
            &path,
            "Figure 3.1: virtual / physical throughput",
            "block size (KB)",
            "percent",
            &[("virtual / physical".into(), ratio)],
            true,
        )?;
        written.push(path);
    }
    // Figure 4.1: 64 KB direct write added time, 44 KB vs 88 KB requests; 4096 buffered 4 KB
    // writes with a 1-page vs 2-page ring.
    if let Some(d) = real.or(model) {
        let a = direct_writes(d, DIRECT_CONFIGS[0], 64 << 10, count)?;
        let b = direct_writes(d, DIRECT_CONFIGS[1], 64 << 10, count)?;
        let writes = guest::sequential(4096, 4096);
        let mut c = THESIS_SETUP;
        let r1 = buffered(d, c, &writes)?;
        c.ring_order = 1;
        c.indirect = 22;
        let r2 = buffered(d, c, &writes)?;
        let path = args.out.join("figure-4.1.png");
        plot::bar_chart(
            &path,
            &format!(
                "Figure 4.1: before / after 88 KB requests and a 2-page ring ({})",
                short(d)
            ),
            "µs (added, 64 KB write) / ms (4096 x 4 KB)",
            &[
                "added time, 64 KB direct write (µs)".into(),
                "4096 buffered 4 KB writes (ms)".into(),
            ],
            &[
                (
                    "44 KB requests, 1-page ring".into(),
                    vec![a.added_us, r1.elapsed_ms],
                ),
                (
                    "88 KB requests, 2-page ring".into(),
                    vec![b.added_us, r2.elapsed_ms],
                ),
            ],
        )?;
        written.push(path);
    }
    // Figure 4.2: buffered writes, scheduler off vs on, by ring size.
    if let Some(d) = real.or(model) {
        let f = figure_4_2(d, args.rounds)?;
        let path = args.out.join("figure-4.2.png");
        plot::bar_chart(
            &path,
            &format!(
                "Figure 4.2: 4096 buffered 4 KB writes, merging off / on ({})",
                short(d)
            ),
            "MB/s",
            &f.rings,
            &[
                ("scheduler off".into(), f.off),
                ("scheduler on".into(), f.on),
            ],
        )?;
        written.push(path);
    }
    // Figure 4.3: direct writes 64-512 KB, 44 KB vs 704 KB requests, on each disk.
    for d in [real, model].into_iter().flatten() {
        let n = if d.model.is_some() { count / 2 } else { count };
        let mut a = Vec::new();
        let mut b = Vec::new();
        for kb in [64u64, 128, 256, 512] {
            a.push((
                kb as f64,
                direct_writes(d, DIRECT_CONFIGS[0], kb << 10, n)?.mb_s,
            ));
            b.push((
                kb as f64,
                direct_writes(d, DIRECT_CONFIGS[2], kb << 10, n)?.mb_s,
            ));
        }
        let tag = if d.model.is_some() { "model" } else { "real" };
        let path = args.out.join(format!("figure-4.3-{tag}.png"));
        plot::line_chart(
            &path,
            &format!(
                "Figure 4.3: direct writes, 44 KB vs 704 KB requests ({})",
                short(d)
            ),
            "block size (KB)",
            "MB/s",
            &[("44 KB requests".into(), a), ("704 KB requests".into(), b)],
            true,
        )?;
        written.push(path);
    }
    Ok(written)
}

fn short(d: &Disk) -> &'static str {
    if d.model.is_some() {
        "model disk"
    } else {
        "real file"
    }
}

fn fig61_args(args: &ThesisArgs, local: Option<PathBuf>) -> crate::fig61::Fig61 {
    crate::fig61::Fig61 {
        rate: args.lan_rate.clone(),
        servers: args.lan_servers.clone(),
        seconds: args.lan_seconds,
        script: args
            .lan_script
            .clone()
            .unwrap_or_else(crate::fig61::default_script),
        out: args.out.clone(),
        local,
    }
}

/// Runs `td-bench thesis`.
pub fn run(args: &ThesisArgs) -> Result<bool> {
    if args.what == [Experiment::Figure61] {
        crate::fig61::run(&fig61_args(args, args.image.clone()))?;
        return Ok(true);
    }
    let what = |e: Experiment| args.what.contains(&e) || args.what.contains(&Experiment::All);
    let size: u64 = 1 << 30;
    let mut temp = RemoveFiles(Vec::new());
    let real = if args.disk != DiskChoice::Model {
        let path = match &args.image {
            Some(p) => std::path::absolute(p)?,
            None => {
                let p = PathBuf::from(format!(
                    "/var/tmp/td-bench-thesis-{}.img",
                    std::process::id()
                ));
                temp.0.push(p.clone());
                p
            }
        };
        eprintln!(
            "td-bench thesis: preparing {} (256 MiB written)",
            path.display()
        );
        prefill(&path, size, 256 << 20)?;
        Some(Disk { path, model: None })
    } else {
        None
    };
    let model = if args.disk != DiskChoice::Real {
        // The model's timing replaces the storage's: keep its image in memory.
        let dir = if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let p = PathBuf::from(format!(
            "{dir}/td-bench-thesis-model-{}.img",
            std::process::id()
        ));
        temp.0.push(p.clone());
        let f = std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        f.set_len(size)?;
        Some(Disk {
            path: p,
            model: Some(args.model),
        })
    } else {
        None
    };
    println!(
        "td-bench thesis: the experiments of \"Impacts on the I/O Performance of the Virtual Disk \
         in Xen\" (UBC 2012), thesis figures beside ours"
    );
    for d in [&real, &model].into_iter().flatten() {
        let n = if d.model.is_some() {
            (args.count / 2).max(2)
        } else {
            args.count
        };
        if what(Experiment::Table32) {
            table_3_2(d, n, args.poll_us)?;
        }
        if what(Experiment::Table35) {
            table_3_5(d)?;
        }
        if what(Experiment::Table42) {
            table_4_2(d, args.rounds)?;
        }
        if args.what.contains(&Experiment::Figure42) {
            figure_4_2(d, args.rounds)?;
        }
    }
    // Parallax's experiments need real storage under both drivers; the model disk would
    // time the data IO and hide the metadata work, so they run on the real file's folder.
    let plx_dir = match &real {
        Some(d) => d.path.parent().map(Path::to_path_buf),
        None => None,
    }
    .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    if what(Experiment::Table36) {
        if real.is_some() {
            table_3_6(&plx_dir, args.plx_size, args.plx_repeat)?;
        } else {
            println!();
            println!("Table 3.6: skipped on the model disk (it would time the data IO only)");
        }
    }
    if what(Experiment::Table37) {
        table_3_7(&plx_dir)?;
    }
    if what(Experiment::Figures) {
        let files = figures(args, real.as_ref(), model.as_ref())?;
        println!();
        for f in files {
            println!("wrote {}", f.display());
        }
    }
    if args.what.contains(&Experiment::Figure61) {
        println!();
        crate::fig61::run(&fig61_args(args, None))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_is_the_median_and_the_middle_half() {
        let s = Spread::of(vec![1.2, 0.8, 1.0, 0.9, 1.1]);
        assert_eq!((s.median, s.low, s.high), (1.0, 0.9, 1.1));
        // Between ranks it interpolates: four values, the median halfway between the middle two.
        let s = Spread::of(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.median, s.low, s.high), (2.5, 1.75, 3.25));
        assert_eq!(Spread::of(vec![0.5]).to_string(), "0.50 (0.50-0.50)");
        assert_eq!(Spread::of(Vec::new()).median, 0.0);
    }

    #[test]
    fn off_on_ratios_read_both_ways() {
        let r = OffOn {
            off: BufferedRow::default(),
            on: BufferedRow::default(),
            time_ratios: vec![0.5, 2.0, 1.0],
        };
        assert_eq!(r.time().median, 1.0);
        // Half the time is twice the throughput.
        assert_eq!((r.throughput().low, r.throughput().high), (0.75, 1.5));
    }

    #[test]
    fn spans_join_by_io() {
        let rec = |id, submit, complete| ReqRecord {
            id,
            submit,
            complete,
            ..Default::default()
        };
        let trace = vec![RingTrace {
            ring: 1,
            requests: vec![
                rec(1 << 32, 110, 500),
                rec((1 << 32) | 1, 120, 700),
                rec(2 << 32, 900, 950),
            ],
            batches: vec![],
            dropped: 0,
        }];
        let stamps = vec![
            (1 << 32, 100, 720),
            ((1 << 32) | 1, 100, 730),
            (2 << 32, 880, 990),
        ];
        let mut s = spans(&stamps, &trace);
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(s, vec![(110.0, 50.0), (630.0, 590.0)]);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn thesis_figures_are_at_hand() {
        assert_eq!(thesis_31(512), "2383");
        assert_eq!(thesis_32(512), ("1315".into(), "12".into(), "6".into()));
        assert_eq!(thesis_32(1024).0, "-");
    }
}
