//! `td-bench verify`: random reads, writes, flushes and discards, every read checked byte for
//! byte against a shadow of the disk.
//!
//! Requests have 1..=max_segments segments, each a random `first_sect..=last_sect` inside its
//! page (partial pages included), and start at random sectors anywhere on the disk. With
//! `--indirect-segments N`, half the reads and writes are indirect requests of up to
//! min(N, 128) segments. Each ring slot the verifier uses owns its own pages of guest memory
//! (and a descriptor page); read pages are filled with a canary first, so a backend writing
//! outside a segment is caught too. Every response's id, operation echo and status are
//! checked.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use blkif::local::FrontRequest;
use blkif::protocol::{op, status, MAX_SEGMENTS_PER_REQUEST, PAGE_SIZE};
use blkif::{Response, Segment};
use clap::Args;
use td_cli::{fmt_bytes, fmt_size};

use crate::progress::{Goal, Progress};
use crate::shadow::{self, describe, fill_canary, fill_sector, Range, Shadow, SECTOR};
use crate::target::{self, Target, TargetArgs, STALL};
use crate::util::{clock_seed, mix64, parse_seed, Rng};

/// Options of `td-bench verify`.
#[derive(Args, Clone, Debug)]
pub struct VerifyArgs {
    /// Requests to issue and check.
    #[arg(long, default_value_t = 100_000)]
    pub requests: u64,
    /// Run for this long instead of a number of requests (e.g. 10m): new requests stop at the
    /// deadline, those in flight are checked.
    #[arg(long, value_name = "TIME", value_parser = crate::util::parse_duration)]
    pub duration: Option<Duration>,
    /// Seed of the workload and of the data patterns (decimal or 0x...) [default: random,
    /// printed].
    #[arg(long, value_parser = parse_seed)]
    pub seed: Option<u64>,
    /// Requests in flight at most [default: the ring size].
    #[arg(long, value_name = "D", value_parser = clap::value_parser!(u32).range(1..))]
    pub iodepth: Option<u32>,
    /// Percent of requests that are discards (skipped if the disk offers none).
    #[arg(long, value_name = "PCT", default_value_t = 2.0)]
    pub discard_pct: f64,
    /// Percent of requests that are flushes (half of them also carry data).
    #[arg(long, value_name = "PCT", default_value_t = 1.0)]
    pub flush_pct: f64,
    /// Do not expect discarded sectors to read back as zeroes (for devices whose discard does
    /// not zero): treat them as unknown until rewritten. Implied for vhd: images, which free
    /// whole blocks only.
    #[arg(long)]
    pub discard_unknown: bool,
    /// Print the result as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Accept error responses (with faults injected at random): the request passes, and a
    /// failed write's sectors are unknown until rewritten. Wrong data is still a failure.
    #[arg(long)]
    pub allow_errors: bool,
    /// Sector ranges that must fail (bad sectors injected there): every request touching one
    /// must get an error, and every other must succeed (unless --allow-errors).
    /// Written SECTOR+COUNT;SECTOR+COUNT.
    #[arg(long, value_name = "RANGES", value_parser = parse_ranges)]
    pub expect_bad: Option<Ranges>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub target: TargetArgs,
}

/// Sector ranges `(first, count)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranges(pub Vec<(u64, u64)>);

fn parse_ranges(s: &str) -> Result<Ranges, String> {
    s.split(';')
        .map(|r| {
            let (a, b) = r
                .split_once('+')
                .ok_or_else(|| format!("range '{r}' is not SECTOR+COUNT"))?;
            let a = a
                .parse::<u64>()
                .map_err(|_| format!("'{a}' is not a sector"))?;
            let b = b
                .parse::<u64>()
                .map_err(|_| format!("'{b}' is not a count"))?;
            Ok((a, b.max(1)))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Ranges)
}

/// What a planned request does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kind {
    /// Read the range.
    #[default]
    Read,
    /// Write the range.
    Write,
    /// Flush, then write the range.
    FlushData,
    /// Flush without data.
    Flush,
    /// Discard the range.
    Discard,
}

impl Kind {
    fn op(self) -> u8 {
        match self {
            Kind::Read => op::READ,
            Kind::Write => op::WRITE,
            Kind::FlushData | Kind::Flush => op::FLUSH_DISKCACHE,
            Kind::Discard => op::DISCARD,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::FlushData => "flush+write",
            Kind::Flush => "flush",
            Kind::Discard => "discard",
        }
    }
}

/// A request before it is given a slot: what, where, and its segments' sector ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// What.
    pub kind: Kind,
    /// The sectors it covers (empty for a pure flush).
    pub range: Range,
    /// Segments used (0 for flushes and discards).
    pub nsegs: usize,
    /// `(first_sect, last_sect)` of each segment.
    pub segs: [(u8, u8); MAX_VERIFY_SEGS],
    /// Sent as an indirect request.
    pub indirect: bool,
}

/// Most segments a verify request carries (indirect requests; direct ones carry at most 11).
pub const MAX_VERIFY_SEGS: usize = 128;

impl Default for Plan {
    fn default() -> Self {
        Plan {
            kind: Kind::default(),
            range: Range::default(),
            nsegs: 0,
            segs: [(0, 0); MAX_VERIFY_SEGS],
            indirect: false,
        }
    }
}

/// Makes random requests for a disk.
#[derive(Clone, Debug)]
pub struct Planner {
    /// Disk size in sectors.
    pub sectors: u64,
    /// Segments per direct request at most.
    pub max_segs: usize,
    /// Segments per indirect request at most (0: no indirect requests).
    pub indirect_segs: usize,
    /// Percent of discards (0 if unsupported).
    pub discard_pct: f64,
    /// Percent of flushes (0 if unsupported).
    pub flush_pct: f64,
}

impl Planner {
    /// A random request.
    pub fn plan(&self, rng: &mut Rng) -> Plan {
        let mut p = Plan::default();
        let roll = rng.below(1_000_000) as f64 / 10_000.0;
        if roll < self.discard_pct {
            p.kind = Kind::Discard;
            let len = if rng.below(2) == 0 {
                rng.range(1, 2048)
            } else {
                rng.range(1, 256) * 8
            };
            let len = len.min(self.sectors);
            let mut start = self.start(rng, len);
            if rng.below(2) == 0 {
                start &= !7;
            }
            p.range = Range { start, len };
            return p;
        }
        if roll < self.discard_pct + self.flush_pct {
            if rng.below(2) == 0 {
                p.kind = Kind::Flush;
                return p;
            }
            p.kind = Kind::FlushData;
        } else {
            p.kind = if rng.below(2) == 0 {
                Kind::Read
            } else {
                Kind::Write
            };
        }
        p.indirect = self.indirect_segs > 0 && p.kind != Kind::FlushData && rng.below(2) == 0;
        let max = if p.indirect {
            self.indirect_segs
        } else {
            self.max_segs
        };
        let mut total = 0u64;
        for _ in 0..8 {
            p.nsegs = rng.range(1, max as u64) as usize;
            total = 0;
            for s in &mut p.segs[..p.nsegs] {
                *s = if rng.below(2) == 0 {
                    (0, 7)
                } else {
                    let f = rng.below(8) as u8;
                    (f, rng.range(u64::from(f), 7) as u8)
                };
                total += u64::from(s.1 - s.0 + 1);
            }
            if total <= self.sectors {
                break;
            }
        }
        if total > self.sectors {
            // A disk smaller than the request: one sector.
            p.nsegs = 1;
            p.segs[0] = (0, 0);
            total = 1;
        }
        p.range = Range {
            start: self.start(rng, total),
            len: total,
        };
        p
    }

    /// Moves `p` to another random place on the disk (same kind and shape).
    pub fn relocate(&self, rng: &mut Rng, p: &mut Plan) {
        if p.kind != Kind::Flush {
            p.range.start = self.start(rng, p.range.len);
        }
    }

    /// A start sector for `len` sectors: uniform, with 2% at either edge of the disk.
    fn start(&self, rng: &mut Rng, len: u64) -> u64 {
        let last = self.sectors - len;
        match rng.below(100) {
            0 => 0,
            1 => last,
            _ => rng.below(last + 1),
        }
    }
}

/// Whether `p` may be issued with what `shadow` has in flight.
pub fn allowed(shadow: &Shadow, p: &Plan) -> bool {
    match p.kind {
        Kind::Flush => true,
        Kind::Read => shadow.can_read(p.range),
        _ => shadow.can_write(p.range),
    }
}

/// Slot bits in a request id; the rest is a sequence number, all xored with a per-run mask.
const SLOT_BITS: u32 = 16;

#[derive(Clone, Copy, Debug)]
struct Flight {
    active: bool,
    seq: u64,
    plan: Plan,
    segs: [Segment; MAX_VERIFY_SEGS],
    gen: u32,
}

impl Default for Flight {
    fn default() -> Self {
        Flight {
            active: false,
            seq: 0,
            plan: Plan::default(),
            segs: [Segment::default(); MAX_VERIFY_SEGS],
            gen: 0,
        }
    }
}

/// Counts of a verify run.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Totals {
    /// Requests whose result and content checked out.
    pub passed: u64,
    /// Requests (or stray responses) that did not.
    pub failed: u64,
    /// Reads completed.
    pub reads: u64,
    /// Writes completed (flushes with data included).
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Discards completed.
    pub discards: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Sectors whose content a read could check.
    pub sectors_checked: u64,
    /// Requests answered with an error that was expected (injected faults).
    pub expected_errors: u64,
}

struct Failures {
    shown: u32,
}

impl Failures {
    const SHOW: u32 = 20;
    fn report(&mut self, msg: std::fmt::Arguments<'_>) {
        self.shown += 1;
        if self.shown <= Self::SHOW {
            eprintln!("td-bench: FAIL {msg}");
        } else if self.shown == Self::SHOW + 1 {
            eprintln!("td-bench: (further failures not shown)");
        }
    }
}

/// Runs `td-bench verify`. Returns whether every request passed.
pub fn run(args: &VerifyArgs) -> Result<bool> {
    run_with_hooks(args, |_| Ok(()), |_| Ok(()))
}

/// As [`run`]; `on_open` is called once the disk is attached, before the first request, and
/// `before_close` after the last response, while the tapdisk still runs (the soak run starts
/// its other load and its memory sampler in the first and collects them in the second).
pub fn run_with_hooks(
    args: &VerifyArgs,
    on_open: impl FnOnce(&Target) -> Result<()>,
    before_close: impl FnOnce(&Target) -> Result<()>,
) -> Result<bool> {
    if !(0.0..=100.0).contains(&args.discard_pct)
        || !(0.0..=100.0).contains(&args.flush_pct)
        || args.discard_pct + args.flush_pct > 100.0
    {
        bail!("--discard-pct and --flush-pct must be percentages adding up to at most 100");
    }
    let ring = args.target.ring_slots();
    let depth = args.iodepth.unwrap_or(ring);
    if depth > ring {
        eprintln!("td-bench: note: iodepth {depth} is above the ring size; using {ring}");
    }
    let depth = depth.min(ring);
    let seed = args.seed.unwrap_or_else(clock_seed);
    let ind = usize::from(args.target.indirect_segments).min(MAX_VERIFY_SEGS);
    let per_slot = if ind > 0 { ind.max(SEGS) + 1 } else { SEGS };
    let mut t = target::open(&args.target, depth * per_slot as u32)?;
    let info = t.info;
    if info.read_only {
        bail!("verify writes, and the disk is read-only");
    }
    if info.sectors > (4u64 << 30) / 6 {
        bail!(
            "the disk has {} sectors; the shadow would need more than 4 GiB (verify a disk of at \
             most ~{})",
            info.sectors,
            fmt_size(((4u64 << 30) / 6) * 512)
        );
    }
    let planner = Planner {
        sectors: info.sectors,
        max_segs: usize::from(t.max_segments),
        indirect_segs: usize::from(t.shape.indirect_segments).min(MAX_VERIFY_SEGS),
        discard_pct: if info.discard { args.discard_pct } else { 0.0 },
        flush_pct: if info.flush { args.flush_pct } else { 0.0 },
    };
    if !args.json {
        eprintln!(
            "td-bench verify: {} on {} ({} sectors, {}); ring {} slots {}, iodepth {}, \
             up to {} segments{}, seed {:#x}{}",
            match args.duration {
                Some(d) => format!("requests for {:.0} s", d.as_secs_f64()),
                None => format!("{} requests", args.requests),
            },
            t.describe,
            info.sectors,
            fmt_size(info.sectors * 512),
            ring,
            t.fe.abi().name(),
            depth,
            planner.max_segs,
            if planner.indirect_segs > 0 {
                format!(" (indirect: up to {})", planner.indirect_segs)
            } else {
                String::new()
            },
            seed,
            if t.fresh {
                ""
            } else {
                "; existing content is not checked until written"
            }
        );
    }
    let mut v = Verifier {
        seed,
        id_mask: mix64(seed ^ 0x1d) & !((1 << SLOT_BITS) - 1),
        shadow: Shadow::new(info.sectors, t.fresh),
        flights: vec![Flight::default(); depth as usize],
        free: (0..depth).rev().collect(),
        next_seq: 1,
        next_gen: 1,
        totals: Totals::default(),
        failures: Failures { shown: 0 },
        discard_zeroes: !args.discard_unknown && !t.discard_is_hint,
        per_slot: per_slot as u32,
        allow_errors: args.allow_errors,
        expect_bad: args.expect_bad.clone().unwrap_or_default().0,
    };
    on_open(&t)?;
    let mut rng = Rng::new(seed);
    let mut rsps: Vec<Response> = Vec::with_capacity(ring as usize);
    let (mut issued, mut completed) = (0u64, 0u64);
    let mut pending: Option<Plan> = None;
    let start = Instant::now();
    let deadline = args.duration.map(|d| start + d);
    // With --duration, --requests is no limit; issuing stops at the deadline.
    let mut limit = if deadline.is_some() {
        u64::MAX
    } else {
        args.requests
    };
    let goal = match deadline {
        Some(d) => Goal::Time(d.saturating_duration_since(start)),
        None => Goal::Count(limit),
    };
    let mut progress = (!args.json).then(|| Progress::new("verify", goal));
    let fe = &mut t.fe;
    while completed < limit {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            limit = issued;
            if completed >= limit {
                break;
            }
        }
        let mut queued = 0;
        while issued < limit && !v.free.is_empty() && fe.free_slots() > 0 {
            // A plan that overlaps requests in flight is moved elsewhere, not replaced, so
            // busy disks keep the mix of kinds and sizes; if it fits nowhere, it waits.
            let mut plan = pending.take().unwrap_or_else(|| planner.plan(&mut rng));
            let mut tries = 0;
            while !allowed(&v.shadow, &plan) && tries < 16 {
                planner.relocate(&mut rng, &mut plan);
                tries += 1;
            }
            if !allowed(&v.shadow, &plan) {
                pending = Some(plan);
                break;
            }
            v.issue(fe, &plan);
            issued += 1;
            queued += 1;
        }
        if queued > 0 {
            fe.push()
                .map_err(|e| target::wait_error(e, fe.outstanding()))?;
        }
        if fe.outstanding() == 0 {
            if queued == 0 {
                bail!("internal error: nothing in flight and nothing could be issued");
            }
            continue;
        }
        let in_flight = fe.outstanding();
        let got = fe.wait(Some(STALL)).map_err(|e| {
            target::park_if_interrupted();
            v.totals.failed += u64::from(in_flight);
            print_totals(&v.totals, args.json, start.elapsed(), seed);
            target::wait_error(e, in_flight)
        })?;
        if !got {
            v.totals.failed += u64::from(in_flight);
            print_totals(&v.totals, args.json, start.elapsed(), seed);
            bail!(
                "no response from tapdisk for {} s with {in_flight} requests in flight",
                STALL.as_secs()
            );
        }
        fe.poll(|r| rsps.push(r));
        for r in rsps.drain(..) {
            if v.complete(fe, &r) {
                completed += 1;
            }
        }
        if let Some(p) = &mut progress {
            let failed = v.totals.failed;
            p.update(completed, || format!("{failed} failed"));
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    debug_assert!(v.shadow.idle());
    let elapsed = start.elapsed();
    print_totals(&v.totals, args.json, elapsed, seed);
    before_close(&t)?;
    drop(t);
    if v.totals.failed > 0 {
        eprintln!(
            "td-bench: {} failures; reproduce with --seed {:#x} (timing may change the exact \
             sequence)",
            v.totals.failed, seed
        );
    }
    Ok(v.totals.failed == 0)
}

fn print_totals(t: &Totals, json: bool, elapsed: Duration, seed: u64) {
    let secs = elapsed.as_secs_f64();
    if json {
        let mut o = serde_json::to_value(t).unwrap_or_default();
        o["seed"] = seed.into();
        o["elapsed_s"] = secs.into();
        println!("{o}");
        return;
    }
    let done = t.reads + t.writes + t.flushes + t.discards;
    if t.expected_errors > 0 {
        eprintln!(
            "td-bench verify: {} requests got the error injected for them",
            t.expected_errors
        );
    }
    eprintln!(
        "td-bench verify: {} reads ({}), {} writes ({}), {} flushes, {} discards, {} sectors \
         checked in {:.2} s ({:.0} requests/s)",
        t.reads,
        fmt_bytes(t.bytes_read),
        t.writes,
        fmt_bytes(t.bytes_written),
        t.flushes,
        t.discards,
        t.sectors_checked,
        secs,
        done as f64 / secs.max(1e-9)
    );
    println!("{} passed, {} failed", t.passed, t.failed);
}

struct Verifier {
    seed: u64,
    id_mask: u64,
    shadow: Shadow,
    flights: Vec<Flight>,
    free: Vec<u32>,
    next_seq: u64,
    next_gen: u32,
    totals: Totals,
    failures: Failures,
    discard_zeroes: bool,
    /// Pages of guest memory each slot owns (the last is the descriptor page, if indirect).
    per_slot: u32,
    /// Error responses are acceptable (random faults injected).
    allow_errors: bool,
    /// Ranges every request touching must fail.
    expect_bad: Vec<(u64, u64)>,
}

const SEGS: usize = MAX_SEGMENTS_PER_REQUEST;

impl Verifier {
    /// Gives `plan` a slot, fills its pages, marks its range busy, queues it.
    fn issue(&mut self, fe: &mut blkif::local::LocalFrontend, plan: &Plan) {
        let Some(s) = self.free.pop() else { return };
        let seq = self.next_seq;
        self.next_seq += 1;
        let id = ((seq << SLOT_BITS) | u64::from(s)) ^ self.id_mask;
        let mut f = Flight {
            active: true,
            seq,
            plan: *plan,
            ..Flight::default()
        };
        for (j, &(first, last)) in plan.segs[..plan.nsegs].iter().enumerate() {
            f.segs[j] = Segment {
                gref: s * self.per_slot + j as u32,
                first_sect: first,
                last_sect: last,
                pad: 0,
            };
        }
        let mut page = [0u8; PAGE_SIZE];
        match plan.kind {
            Kind::Read => {
                fill_canary(&mut page);
                for sg in &f.segs[..plan.nsegs] {
                    fe.write_mem(sg.gref as usize * PAGE_SIZE, &page);
                }
                self.shadow.begin_read(plan.range);
            }
            Kind::Write | Kind::FlushData => {
                f.gen = self.next_gen;
                self.next_gen = if self.next_gen >= shadow::UNKNOWN - 1 {
                    1
                } else {
                    self.next_gen + 1
                };
                let mut sector = plan.range.start;
                for sg in &f.segs[..plan.nsegs] {
                    let (a, b) = (sg.first_sect as usize, sg.last_sect as usize + 1);
                    for k in a..b {
                        fill_sector(
                            self.seed,
                            sector,
                            f.gen,
                            &mut page[k * SECTOR..(k + 1) * SECTOR],
                        );
                        sector += 1;
                    }
                    fe.write_mem(
                        sg.gref as usize * PAGE_SIZE + a * SECTOR,
                        &page[a * SECTOR..b * SECTOR],
                    );
                }
                self.shadow.begin_write(plan.range);
            }
            Kind::Discard => self.shadow.begin_write(plan.range),
            Kind::Flush => {}
        }
        let ind_page = [s * self.per_slot + self.per_slot - 1];
        let req = match plan.kind {
            Kind::Discard => FrontRequest::Discard {
                id,
                sector: plan.range.start,
                nr_sectors: plan.range.len,
                secure: false,
            },
            k if plan.indirect => FrontRequest::Indirect {
                op: k.op(),
                id,
                sector: plan.range.start,
                indirect: &ind_page,
                segments: &f.segs[..plan.nsegs],
            },
            k => FrontRequest::Rw {
                op: k.op(),
                id,
                sector: plan.range.start,
                segments: &f.segs[..plan.nsegs],
            },
        };
        let queued = fe.queue(&req);
        debug_assert!(queued, "the caller checked free_slots");
        self.flights[s as usize] = f;
    }

    /// Checks one response. Returns false for a stray one (no such request in flight).
    fn complete(&mut self, fe: &blkif::local::LocalFrontend, r: &Response) -> bool {
        let raw = r.id ^ self.id_mask;
        let s = (raw & ((1 << SLOT_BITS) - 1)) as usize;
        let seq = raw >> SLOT_BITS;
        if s >= self.flights.len() || !self.flights[s].active || self.flights[s].seq != seq {
            self.totals.failed += 1;
            self.failures.report(format_args!(
                "response with an id no request in flight has: {:#x} (operation {}, status {})",
                r.id, r.operation, r.status
            ));
            return false;
        }
        let f = self.flights[s];
        self.flights[s].active = false;
        self.free.push(s as u32);
        let p = f.plan;
        let what = format_args!(
            "request #{} {} of sectors {}+{} ({} segments)",
            f.seq,
            p.kind.name(),
            p.range.start,
            p.range.len,
            p.nsegs
        )
        .to_string();
        let mut ok = true;
        // An indirect request is answered with its inner operation, as Linux blkback does.
        let want_op = p.kind.op();
        if r.operation != want_op {
            ok = false;
            self.failures.report(format_args!(
                "{what}: the response echoes operation {}, not {}",
                r.operation, want_op
            ));
        }
        let mut good = r.status == status::OKAY;
        if good && p.kind == Kind::Read {
            // In early-read mode a read may be answered before all of it is in: its data is
            // good only once the backend says the rest arrived.
            if let Err(e) = fe.finish_read(r.id) {
                if matches!(
                    e,
                    blkif::Error::EarlyRead(blkif::early::EarlyReadError::Failed(_))
                ) {
                    good = false;
                } else {
                    ok = false;
                    self.failures.report(format_args!("{what}: {e}"));
                }
            }
        }
        let touches_bad = p.kind != Kind::Flush
            && self.expect_bad.iter().any(|&(a, n)| {
                p.range.start < a.saturating_add(n) && a < p.range.start + p.range.len
            });
        if !good {
            if touches_bad || self.allow_errors {
                self.totals.expected_errors += 1;
            } else {
                ok = false;
                self.failures
                    .report(format_args!("{what}: status {}", r.status));
            }
        } else if touches_bad {
            ok = false;
            self.failures.report(format_args!(
                "{what}: succeeded, but it touches a bad sector range"
            ));
        }
        let bytes = p.range.len * SECTOR as u64;
        match p.kind {
            Kind::Read => {
                self.shadow.end_read(p.range);
                self.totals.reads += 1;
                self.totals.bytes_read += bytes;
                if good && !self.check_read(fe, &f, &what) {
                    ok = false;
                }
            }
            Kind::Write | Kind::FlushData => {
                self.shadow.end_write(p.range);
                self.shadow
                    .set(p.range, if good { f.gen } else { shadow::UNKNOWN });
                self.totals.writes += 1;
                self.totals.bytes_written += bytes;
                if p.kind == Kind::FlushData {
                    self.totals.flushes += 1;
                }
            }
            Kind::Discard => {
                self.shadow.end_write(p.range);
                let gen = if good && self.discard_zeroes {
                    shadow::ZERO
                } else {
                    shadow::UNKNOWN
                };
                self.shadow.set(p.range, gen);
                self.totals.discards += 1;
            }
            Kind::Flush => self.totals.flushes += 1,
        }
        if ok {
            self.totals.passed += 1;
        } else {
            self.totals.failed += 1;
        }
        true
    }

    /// Compares the pages of a completed read with the shadow. Returns whether all matched.
    fn check_read(&mut self, fe: &blkif::local::LocalFrontend, f: &Flight, what: &str) -> bool {
        let mut page = [0u8; PAGE_SIZE];
        let mut want = [0u8; SECTOR];
        let mut canary = [0u8; SECTOR];
        fill_canary(&mut canary);
        let mut sector = f.plan.range.start;
        let mut bad = 0u64;
        let mut first_bad = String::new();
        for (j, sg) in f.segs[..f.plan.nsegs].iter().enumerate() {
            fe.read_mem(sg.gref as usize * PAGE_SIZE, &mut page);
            for k in 0..PAGE_SIZE / SECTOR {
                let got = &page[k * SECTOR..(k + 1) * SECTOR];
                if (sg.first_sect as usize..=sg.last_sect as usize).contains(&k) {
                    let gen = self.shadow.gen(sector);
                    if gen != shadow::UNKNOWN {
                        self.totals.sectors_checked += 1;
                        fill_sector(self.seed, sector, gen, &mut want);
                        if got != want {
                            bad += 1;
                            if first_bad.is_empty() {
                                let at = got.iter().zip(want.iter()).position(|(a, b)| a != b);
                                let expected = if gen == shadow::ZERO {
                                    "zeroes".to_string()
                                } else {
                                    format!("generation {gen}")
                                };
                                first_bad = format!(
                                    "sector {sector} (segment {j}, page sector {k}) differs from \
                                     byte {}: expected {expected}, found {}",
                                    at.unwrap_or(0),
                                    describe(self.seed, got)
                                );
                            }
                        }
                    }
                    sector += 1;
                } else if got != canary {
                    bad += 1;
                    if first_bad.is_empty() {
                        first_bad = format!(
                            "segment {j} covers page sectors {}..={}, but the backend wrote page \
                             sector {k} too",
                            sg.first_sect, sg.last_sect
                        );
                    }
                }
            }
        }
        if bad > 0 {
            self.failures.report(format_args!(
                "{what}: {bad} bad sectors; first: {first_bad}"
            ));
        }
        bad == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planner(sectors: u64) -> Planner {
        Planner {
            sectors,
            max_segs: 11,
            indirect_segs: 100,
            discard_pct: 5.0,
            flush_pct: 5.0,
        }
    }

    #[test]
    fn plans_stay_inside_pages_and_disk() {
        for sectors in [1u64, 7, 88, 1000, 1 << 20] {
            let pl = planner(sectors);
            let mut rng = Rng::new(sectors);
            let mut kinds = [0u32; 5];
            let (mut partial, mut edge) = (0, 0);
            for _ in 0..20_000 {
                let p = pl.plan(&mut rng);
                kinds[p.kind as usize] += 1;
                assert!(
                    p.range.start + p.range.len <= sectors,
                    "{p:?} leaves a disk of {sectors}"
                );
                match p.kind {
                    Kind::Flush => assert_eq!((p.nsegs, p.range.len), (0, 0)),
                    Kind::Discard => assert!(p.range.len >= 1 && p.nsegs == 0),
                    _ => {
                        let max = if p.indirect { 100 } else { 11 };
                        assert!((1..=max).contains(&p.nsegs), "{p:?}");
                        assert!(!(p.indirect && p.kind == Kind::FlushData));
                        let total: u64 = p.segs[..p.nsegs]
                            .iter()
                            .map(|&(f, l)| {
                                assert!(f <= l && l < 8, "{p:?}");
                                u64::from(l - f + 1)
                            })
                            .sum();
                        assert_eq!(total, p.range.len);
                        if p.segs[..p.nsegs].iter().any(|&(f, l)| (f, l) != (0, 7)) {
                            partial += 1;
                        }
                    }
                }
                if p.range.len > 0 && (p.range.start == 0 || p.range.start + p.range.len == sectors)
                {
                    edge += 1;
                }
            }
            assert!(
                kinds.iter().all(|&k| k > 0),
                "every kind appears: {kinds:?}"
            );
            assert!(
                partial > 1000 && edge > 100,
                "partial {partial} edge {edge}"
            );
        }
    }

    #[test]
    fn conflicting_plans_are_held_back() {
        let mut sh = Shadow::new(100, true);
        let mk = |kind, start, len| Plan {
            kind,
            range: Range { start, len },
            ..Plan::default()
        };
        sh.begin_write(Range { start: 10, len: 5 });
        sh.begin_read(Range { start: 50, len: 5 });
        assert!(!allowed(&sh, &mk(Kind::Read, 14, 1)));
        assert!(!allowed(&sh, &mk(Kind::Write, 0, 11)));
        assert!(!allowed(&sh, &mk(Kind::Discard, 54, 10)));
        assert!(!allowed(&sh, &mk(Kind::FlushData, 54, 1)));
        assert!(allowed(&sh, &mk(Kind::Read, 50, 10)));
        assert!(allowed(&sh, &mk(Kind::Write, 15, 35)));
        assert!(allowed(&sh, &mk(Kind::Flush, 0, 0)));
    }

    #[test]
    fn ids_roundtrip_through_the_mask() {
        let mask = mix64(7 ^ 0x1d) & !((1 << SLOT_BITS) - 1);
        let id = ((12345u64 << SLOT_BITS) | 8191) ^ mask;
        let raw = id ^ mask;
        assert_eq!((raw & 0xffff, raw >> SLOT_BITS), (8191, 12345));
        assert_ne!(id >> 32, 0, "high id bits are exercised");
    }
}
