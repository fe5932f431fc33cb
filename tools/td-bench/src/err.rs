//! `td-bench err`: early read return, measured.
//!
//! A reader does large reads one at a time from a slow disk (the thesis's model disk by
//! default) and consumes every page of each read, in order or in a random order. With early
//! read return tapdisk answers the read once its policy is met; the reader starts consuming
//! at once and stalls only on pages not filled yet. Reported per policy: the perceived
//! latency (issue to response) and the total time (issue to the last page consumed), medians,
//! and their ratio to early return off; and the early-read counters of tapdisk. Every page
//! consumed is checked against the pattern written first, so a wrong byte is caught.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use blkif::local::{FrontRequest, LocalFrontend};
use blkif::protocol::{op, status, PAGE_SIZE};
use blkif::request::MAX_INDIRECT_SEGMENTS;
use blkif::Segment;
use clap::{Args, ValueEnum};
use tapdisk_control::{EarlyPolicy, ModelParams, VbdSettings};
use td_cli::{fmt_size, parse_size};

use crate::target::{self, AbiArg, DirectArg, TargetArgs, STALL};
use crate::util::Rng;

/// How the reader consumes a read's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Order {
    /// First page to last (a sequential reader, e.g. a stream).
    InOrder,
    /// A random permutation (e.g. a hash join probing the block).
    Random,
}

/// Options of `td-bench err`.
#[derive(Args, Clone, Debug)]
pub struct ErrArgs {
    /// Policies to compare with early return off (each as in --early-read), e.g.
    /// percent=25 first=10+20 seq=2:10.
    #[arg(value_name = "POLICY", default_values = ["percent=25", "percent=50", "first=10+20", "outstanding=4", "eta=3000", "seq=2:10"])]
    pub policies: Vec<String>,
    /// Size of each read.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    pub bs: u64,
    /// Reads per policy.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub count: u32,
    /// How the reader consumes the pages.
    #[arg(long, value_enum, default_value_t = Order::InOrder)]
    pub order: Order,
    /// Reads are sequential (a stream) rather than at random offsets.
    #[arg(long)]
    pub sequential: bool,
    /// Work per page consumed, in passes over the page (a checksum each).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub work: u32,
    /// Chunk size tapdisk fetches reads in, KiB.
    #[arg(long, value_name = "KIB", default_value_t = 64)]
    pub chunk_kb: u32,
    /// The slow storage: link:LATENCY_US,MB_S (remote storage behind a network link: IOs in
    /// flight together, sharing the bandwidth), a spindle ('default' is the thesis's disk, or
    /// X_US,Y_NS_PER_KB,SEEK_US), or 'none' for the image file as it is.
    #[arg(long, value_name = "PARAMS", default_value = "link:2000,100")]
    pub model: String,
    /// Image file [default: a temporary one in /dev/shm]; its first --size bytes are written.
    #[arg(long, value_name = "FILE")]
    pub image: Option<std::path::PathBuf>,
    /// Disk size.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub size: u64,
    /// Print one JSON object per policy instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What one policy gave.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ErrResult {
    /// The policy ("off" for none).
    pub policy: String,
    /// Median time to the response, µs.
    pub latency_us: f64,
    /// Median time to the last page consumed, µs.
    pub total_us: f64,
    /// Reads.
    pub reads: u32,
    /// Pages whose content was wrong (must be 0).
    pub wrong_pages: u64,
    /// tapdisk's early-read counters.
    pub early: serde_json::Value,
}

fn pattern(block: u64, out: &mut [u8]) {
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn prepare_image(path: &std::path::Path, size: u64) -> Result<()> {
    use std::io::Write;
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
    let mut page = vec![0u8; PAGE_SIZE];
    for b in 0..size / PAGE_SIZE as u64 {
        pattern(b, &mut page);
        w.write_all(&page)?;
    }
    w.flush()?;
    Ok(())
}

fn run_one(
    args: &ErrArgs,
    image: &std::path::Path,
    policy: Option<EarlyPolicy>,
) -> Result<ErrResult> {
    let model = match args.model.as_str() {
        "none" => None,
        m => Some(m.parse::<ModelParams>().map_err(anyhow::Error::msg)?),
    };
    let pages = (args.bs as usize).div_ceil(PAGE_SIZE);
    let ta = TargetArgs {
        device: None,
        image: Some(image.to_path_buf()),
        size: None,
        ring_order: 0,
        abi: AbiArg::X86_64,
        max_segments: VbdSettings::DEFAULT.max_segments,
        direct: DirectArg::Auto,
        poll_us: 0,
        spin_us: 0,
        indirect_segments: pages.min(MAX_INDIRECT_SEGMENTS.into()) as u16,
        no_merge: false,
        max_merge_kb: 1024,
        model_disk: model,
        early_read: Some(policy.unwrap_or_default()),
        inject_faults: None,
        cache_slots: 0,
        pin: false,
    };
    let shape = ta.shape();
    let mut t = target::open(&ta, shape.pages_per_io(args.bs) as u32)?;
    if t.shape.indirect_segments < pages.min(MAX_INDIRECT_SEGMENTS.into()) as u16 {
        bail!("the backend does not offer indirect requests of {pages} segments");
    }
    let fe: &mut LocalFrontend = &mut t.fe;
    let segs: Vec<Segment> = (0..pages)
        .map(|i| Segment {
            gref: i as u32,
            first_sect: 0,
            last_sect: 7,
            pad: 0,
        })
        .collect();
    let ind: Vec<u32> = (pages as u32..(pages + pages.div_ceil(512)) as u32).collect();
    let blocks = t.info.sectors * 512 / args.bs;
    let mut rng = Rng::new(7);
    let mut order: Vec<usize> = (0..pages).collect();
    let mut lat = Vec::new();
    let mut total = Vec::new();
    let mut wrong = 0u64;
    let mut want = vec![0u8; PAGE_SIZE];
    let mut got = vec![0u8; PAGE_SIZE];
    let mut sink = 0u64;
    for i in 0..u64::from(args.count) {
        let b = if args.sequential {
            i % blocks
        } else {
            rng.below(blocks)
        };
        let sector = b * args.bs / 512;
        let id = i + 1;
        let start = Instant::now();
        let queued = fe.queue(&FrontRequest::Indirect {
            op: op::READ,
            id,
            sector,
            indirect: &ind,
            segments: &segs,
        });
        if !queued {
            bail!("the ring is full with nothing in flight");
        }
        fe.push()?;
        let mut rsp = None;
        while rsp.is_none() {
            if !fe.wait(Some(STALL))? {
                bail!("no response from tapdisk for {} s", STALL.as_secs());
            }
            fe.poll(|r| rsp = Some(r));
        }
        let answered = start.elapsed();
        let r = rsp.unwrap_or(blkif::Response {
            id: 0,
            operation: 0,
            status: -1,
        });
        if r.status != status::OKAY || r.id != id {
            bail!("read {id} answered with status {} (id {})", r.status, r.id);
        }
        if args.order == Order::Random {
            for k in (1..pages).rev() {
                order.swap(k, rng.below(k as u64 + 1) as usize);
            }
        }
        for &p in &order {
            // Touching a page that is not filled yet stalls right here.
            fe.read_mem(p * PAGE_SIZE, &mut got);
            for _ in 0..args.work {
                sink = got.chunks(8).fold(sink, |a, c| {
                    a.rotate_left(5) ^ u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))
                });
            }
            pattern(sector / 8 + p as u64, &mut want);
            if got != want {
                wrong += 1;
            }
        }
        if let Err(e) = fe.finish_read(id) {
            bail!("read {id}: {e}");
        }
        total.push(start.elapsed().as_secs_f64() * 1e6);
        lat.push(answered.as_secs_f64() * 1e6);
    }
    std::hint::black_box(sink);
    let stats = t.stats()?;
    Ok(ErrResult {
        policy: String::new(),
        latency_us: median(lat),
        total_us: median(total),
        reads: args.count,
        wrong_pages: wrong,
        early: stats["ring"]["early"].clone(),
    })
}

/// Runs `td-bench err`. Returns whether every page read back right.
pub fn run(args: &ErrArgs) -> Result<bool> {
    if args.bs < 2 * PAGE_SIZE as u64
        || !args.bs.is_multiple_of(PAGE_SIZE as u64)
        || args.bs > 16 << 20
    {
        bail!("--bs must be a multiple of 4k from 8k to 16M");
    }
    let mut remove = None;
    let image = match &args.image {
        Some(p) => p.clone(),
        None => {
            let p = std::path::PathBuf::from(format!(
                "/dev/shm/td-bench-err-{}.img",
                std::process::id()
            ));
            remove = Some(p.clone());
            p
        }
    };
    struct Rm(Option<std::path::PathBuf>);
    impl Drop for Rm {
        fn drop(&mut self) {
            if let Some(p) = &self.0 {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let _rm = Rm(remove);
    prepare_image(&image, args.size)?;
    let mut policies: Vec<(String, Option<EarlyPolicy>)> = vec![("off".into(), None)];
    for p in &args.policies {
        let mut pol: EarlyPolicy = p.parse().map_err(anyhow::Error::msg)?;
        pol.chunk_kb = args.chunk_kb;
        policies.push((p.clone(), Some(pol)));
    }
    if !args.json {
        eprintln!(
            "td-bench err: {} reads of {} per policy, {} reads, consumed {}, {}; storage: {}",
            args.count,
            fmt_size(args.bs),
            if args.sequential {
                "sequential"
            } else {
                "random"
            },
            match args.order {
                Order::InOrder => "page by page in order",
                Order::Random => "in a random page order",
            },
            format_args!("chunks of {} KiB", args.chunk_kb),
            if args.model == "none" {
                format!("image {}", image.display())
            } else {
                args.model
                    .parse::<ModelParams>()
                    .map(|m| m.to_string())
                    .unwrap_or_else(|_| args.model.clone())
            }
        );
        println!(
            "{:<24} {:>12} {:>12} {:>9} {:>9} {:>8} {:>8} {:>10}",
            "policy",
            "latency µs",
            "total µs",
            "lat/off",
            "tot/off",
            "early",
            "stalls",
            "wrong pages"
        );
    }
    let mut base: Option<ErrResult> = None;
    let mut all_good = true;
    for (name, pol) in policies {
        let mut r = run_one(args, &image, pol)?;
        r.policy = name.clone();
        all_good &= r.wrong_pages == 0;
        let b = base.get_or_insert_with(|| r.clone());
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:<24} {:>12.0} {:>12.0} {:>9.2} {:>9.2} {:>8} {:>8} {:>10}",
                name,
                r.latency_us,
                r.total_us,
                r.latency_us / b.latency_us.max(1e-9),
                r.total_us / b.total_us.max(1e-9),
                r.early["answered_early"],
                r.early["stalls"],
                r.wrong_pages
            );
        }
    }
    Ok(all_good)
}
