//! `xen-frontend`: a blkif frontend played from dom0, for the Xen rig.
//!
//! It does what a toolstack and a guest's blkfront do, with dom0 as the "guest": writes a
//! `backend/vbd3/0/<devid>` device and its frontend directory, runs the hotplug script, grants
//! a ring page and data pages through `/dev/xen/gntalloc`, allocates an event channel,
//! publishes them and waits for the backend to connect. Then:
//!
//! 1. a write and a read of one page, checked (the backend maps dom0's grants like a guest's);
//! 2. `--garbage N`: N slots of random bytes (unique ids), each must be answered with an error
//!    while the device stays Connected;
//! 3. `--storm-secs S`: the event channel notified in a tight loop for S seconds while a
//!    write and read go through every 100 ms: all must succeed and the device stay Connected
//!    (the late-EOI masking keeps the backend from spinning);
//! 4. `--reconnects N`: N times the frontend closes the device (Closing, Closed) and comes back
//!    (Initialising, a fresh ring and event channel, Initialised, Connected), as a guest that
//!    reloads blkfront or resumes does; each time the backend must follow (Closed, InitWait,
//!    Connected) and serve a write and read;
//! 5. a `req_prod` far beyond the ring: the backend must drop the rings and close the device
//!    (state 5), without harming the other disks it serves.
//!
//! With `--persistent` it offers persistent grants (`feature-persistent = 1`, at every
//! (re)connect) and expects the backend to offer them too; `--grants N` then writes and reads
//! back N more pages, each through a grant of its own, twice (with the backend's cache smaller
//! than N, grants are evicted and mapped again). Every time the backend closed the device
//! (each reconnect, and the end) the tapdisk that served it must have no grant mapped any
//! more: its `/proc/<pid>/maps` holds no `/dev/xen/gntdev` mapping.
//!
//! With `--bad ring-ref` or `--bad event-channel` it publishes a grant reference that was
//! never granted (or a port never allocated) instead, and passes if the backend refuses the
//! connection with an error in its `error` key and closes the device (real gntdev map and
//! evtchn bind failures).
//!
//! Prints `XENFRONT: PASS ...` or `XENFRONT: FAIL ...` lines and exits non-zero on a failure.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blkif::protocol::{op, status, Abi, Segment, MAX_SEGMENTS_PER_REQUEST, MAX_SLOT, PAGE_SIZE};
use blkif::request::encode;
use blkif::ring::FrontRing;
use blkif::xen::evtchn::Evtchn;
use blkif::xen::gntalloc::GrantedPages;
use blkif::xen::xenstore::{Tx, Xenstore};
use clap::Parser;

/// xen-frontend: play a (hostile) blkif frontend from dom0 against the backend serving vbd3.
#[derive(Debug, Parser)]
#[command(name = "xen-frontend", version)]
pub struct Args {
    /// Image for the device (given to the hotplug script as params).
    #[arg(long)]
    pub image: String,
    /// Device id to use (frontend `virtual-device`).
    #[arg(long, default_value_t = 51952)]
    pub devid: u32,
    /// Backend kind.
    #[arg(long, default_value = "vbd3")]
    pub kind: String,
    /// The hotplug script to run once the backend is in InitWait.
    #[arg(long, default_value = "/etc/xen/scripts/block-tap")]
    pub hotplug: String,
    /// Random slots to send before the overflowing producer index.
    #[arg(long, default_value_t = 64)]
    pub garbage: u32,
    /// Close-and-reinitialise cycles of the frontend (0: none).
    #[arg(long, default_value_t = 3)]
    pub reconnects: u32,
    /// Seconds of event-channel storm (0: none).
    #[arg(long, default_value_t = 2)]
    pub storm_secs: u64,
    /// Publish a bad key instead of a working ring and expect the backend to refuse it.
    #[arg(long, value_enum)]
    pub bad: Option<Bad>,
    /// Extra options for the VBD's `tap-ctl create`, handed to the hotplug script in
    /// `TAPCTL_CREATE_OPTS` (e.g. "--max-segments 8": the backend must still take 11-segment
    /// requests from a Xen frontend).
    #[arg(long, value_name = "OPTS", allow_hyphen_values = true)]
    pub tap_opts: Option<String>,
    /// Seconds to wait for each backend state change.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Offer persistent grants (feature-persistent = 1) and expect the backend to offer them.
    #[arg(long)]
    pub persistent: bool,
    /// Pages, each with a grant of its own, written and read back twice (0: none).
    #[arg(long, default_value_t = 0)]
    pub grants: usize,
    /// With --persistent: the backend keeps at most N grants mapped (tapback's
    /// --max-persistent-grants). Checked after the --grants passes against the tapdisk's
    /// counters (`tap-ctl stats`) and its `/proc/<pid>/maps`.
    #[arg(long, value_name = "N")]
    pub expect_cache: Option<u64>,
}

/// Which key `--bad` breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bad {
    /// A grant reference nobody granted.
    RingRef,
    /// An event channel port nobody allocated.
    EventChannel,
}

/// Entry point.
pub fn main_with(argv: impl IntoIterator<Item = OsString>) -> i32 {
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            println!("XENFRONT: FAIL {e:#}");
            1
        }
    }
}

fn wait_state(xs: &mut Xenstore, path: &str, want: &[&str], secs: u64) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = xs.read(Tx::NONE, path)?.unwrap_or_default();
        if want.contains(&v.as_str()) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{path} is {v:?} after {secs} s, expected one of {want:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Publishes a ring (one page) and its event channel, and says Initialised, as blkfront does.
fn publish_ring(
    xs: &mut Xenstore,
    fe: &str,
    ring_ref: u32,
    port: u32,
    abi: Abi,
    persistent: bool,
) -> Result<()> {
    xs.transaction(|xs, tx| {
        xs.write(tx, &format!("{fe}/ring-ref"), &ring_ref.to_string())?;
        xs.write(tx, &format!("{fe}/event-channel"), &port.to_string())?;
        xs.write(tx, &format!("{fe}/protocol"), abi.name())?;
        xs.write(
            tx,
            &format!("{fe}/feature-persistent"),
            if persistent { "1" } else { "0" },
        )?;
        xs.write(tx, &format!("{fe}/state"), "3")
    })?;
    Ok(())
}

/// Pages of `/dev/xen/gntdev` mapped in process `pid` (its `/proc/<pid>/maps`).
fn gntdev_pages(pid: u32) -> Result<usize> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    let mut pages = 0;
    for line in maps.lines().filter(|l| l.ends_with("/dev/xen/gntdev")) {
        let range = line.split_whitespace().next().unwrap_or("");
        let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap_or(0),
            usize::from_str_radix(b, 16).unwrap_or(0),
        );
        pages += b.saturating_sub(a) / PAGE_SIZE;
    }
    Ok(pages)
}

/// The backend closed the device: the tapdisk that served it must hold no grant any more.
fn check_unmapped(xs: &mut Xenstore, be: &str, when: &str) -> Result<()> {
    let Some(pid) = xs
        .read(Tx::NONE, &format!("{be}/pid"))?
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        bail!("no pid key under {be}");
    };
    let pages = gntdev_pages(pid)?;
    if pages != 0 {
        bail!("{when}: tapdisk {pid} still maps {pages} pages of /dev/xen/gntdev");
    }
    println!("XENFRONT: PASS {when}: tapdisk {pid} maps no grant any more (/proc/{pid}/maps)");
    Ok(())
}

/// Sends one request (at sector 8) and waits for its answer; its status.
fn one_request(
    ring: &mut FrontRing,
    ev: &Evtchn,
    abi: Abi,
    timeout: Duration,
    opc: u8,
    id: u64,
    segs: &[Segment],
) -> Result<i16> {
    request_at(ring, ev, abi, timeout, opc, id, 8, segs)
}

fn run(a: &Args) -> Result<()> {
    let mut xs = Xenstore::open()?;
    let be = format!("/local/domain/0/backend/{}/0/{}", a.kind, a.devid);
    let fe = format!("/local/domain/0/device/vbd/{}", a.devid);
    xs.rm(Tx::NONE, &be)?;
    xs.rm(Tx::NONE, &fe)?;
    // What xl writes for a new disk (see xen-configs/NOTES.md), with dom0 as the frontend.
    xs.transaction(|xs, tx| {
        for (k, v) in [
            ("backend", be.as_str()),
            ("backend-id", "0"),
            ("virtual-device", &a.devid.to_string()),
            ("device-type", "disk"),
            ("state", "1"),
        ] {
            xs.write(tx, &format!("{fe}/{k}"), v)?;
        }
        for (k, v) in [
            ("frontend", fe.as_str()),
            ("frontend-id", "0"),
            ("online", "1"),
            ("state", "1"),
            ("params", &a.image),
            ("mode", "w"),
            ("dev", "xvdz"),
            ("type", &a.kind),
            ("device-type", "disk"),
        ] {
            xs.write(tx, &format!("{be}/{k}"), v)?;
        }
        Ok(())
    })?;
    wait_state(&mut xs, &format!("{be}/state"), &["2"], a.timeout)?;
    println!("XENFRONT: backend in InitWait; running {} add", a.hotplug);
    let st = std::process::Command::new(&a.hotplug)
        .arg("add")
        .env("XENBUS_PATH", be.trim_start_matches("/local/domain/0/"))
        .env("XENBUS_TYPE", &a.kind)
        .env("XENBUS_BASE_PATH", "backend")
        .env("TAPCTL_CREATE_OPTS", a.tap_opts.as_deref().unwrap_or(""))
        .status()
        .with_context(|| format!("cannot run {}", a.hotplug))?;
    if !st.success() {
        bail!("{} add failed ({st})", a.hotplug);
    }
    let mut result = frontend(&mut xs, a, &be, &fe);
    // Tear down as the toolstack would, whatever happened.
    let _ = xs.write(Tx::NONE, &format!("{fe}/state"), "6");
    let _ = xs.write(Tx::NONE, &format!("{be}/online"), "0");
    let _ = xs.write(Tx::NONE, &format!("{be}/state"), "5");
    let closed = wait_state(&mut xs, &format!("{be}/state"), &["6"], a.timeout);
    if result.is_ok() && a.bad.is_none() {
        result = closed.and_then(|_| check_unmapped(&mut xs, &be, "device closed"));
    }
    let _ = std::process::Command::new(&a.hotplug)
        .arg("remove")
        .env("XENBUS_PATH", be.trim_start_matches("/local/domain/0/"))
        .env("XENBUS_TYPE", &a.kind)
        .env("XENBUS_BASE_PATH", "backend")
        .status();
    let _ = xs.rm(Tx::NONE, &be);
    let _ = xs.rm(Tx::NONE, &fe);
    result
}

fn frontend(xs: &mut Xenstore, a: &Args, be: &str, fe: &str) -> Result<()> {
    let abi = Abi::X86_64;
    let ring_pages = GrantedPages::alloc(0, 1).context("granting the ring page")?;
    let data = GrantedPages::alloc(0, MAX_SEGMENTS_PER_REQUEST).context("granting data pages")?;
    // SAFETY: the granted page is ours, mapped for as long as `ring_pages` lives, which
    // outlives `ring` (declared after it, dropped before it).
    let mut ring =
        unsafe { FrontRing::init(ring_pages.addr(), 1, abi) }.context("ring too small")?;
    let ev = Evtchn::bind_unbound(0).context("allocating an event channel")?;
    let (ring_ref, port) = match a.bad {
        // Far above anything gntalloc hands out here, and never granted.
        Some(Bad::RingRef) => (ring_pages.refs()[0].wrapping_add(40_000), ev.port()),
        Some(Bad::EventChannel) => (ring_pages.refs()[0], ev.port().wrapping_add(900)),
        None => (ring_pages.refs()[0], ev.port()),
    };
    publish_ring(xs, fe, ring_ref, port, abi, a.persistent)?;
    if let Some(bad) = a.bad {
        let st = wait_state(xs, &format!("{be}/state"), &["4", "5", "6"], a.timeout)?;
        let why = xs
            .read(Tx::NONE, &format!("{be}/error"))?
            .unwrap_or_default();
        if st == "4" || why.is_empty() {
            bail!("the backend took a bad {bad:?} (state {st}, error {why:?})");
        }
        println!("XENFRONT: PASS bad {bad:?} refused: backend state {st} ({why})");
        return Ok(());
    }
    wait_state(xs, &format!("{be}/state"), &["4"], a.timeout)?;
    xs.write(Tx::NONE, &format!("{fe}/state"), "4")?;
    let sectors: u64 = xs
        .read(Tx::NONE, &format!("{be}/sectors"))?
        .unwrap_or_default()
        .parse()
        .context("sectors")?;
    println!("XENFRONT: backend Connected, {sectors} sectors");
    if a.persistent {
        let offered = xs.read(Tx::NONE, &format!("{be}/feature-persistent"))?;
        if offered.as_deref() != Some("1") {
            bail!("the backend does not offer persistent grants (feature-persistent {offered:?})");
        }
        println!("XENFRONT: both sides offer persistent grants");
    }

    // 1. A well-formed write then read of one page.
    let pat: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 + 3) as u8).collect();
    // SAFETY: page 0 of `data` is ours and mapped; nothing else writes it now.
    unsafe { std::ptr::copy_nonoverlapping(pat.as_ptr(), data.addr().as_ptr(), PAGE_SIZE) };
    let seg = |p: usize| Segment {
        gref: data.refs()[p],
        first_sect: 0,
        last_sect: 7,
        pad: 0,
    };
    let lay = abi.layout().slot;
    let timeout = Duration::from_secs(a.timeout);
    let roundtrip = |ring: &mut FrontRing, ev: &Evtchn, opc: u8, id: u64, s: Segment| {
        one_request(ring, ev, abi, timeout, opc, id, &[s])
    };
    let w = roundtrip(&mut ring, &ev, op::WRITE, 1, seg(0))?;
    let r = roundtrip(&mut ring, &ev, op::READ, 2, seg(1))?;
    let mut back = vec![0u8; PAGE_SIZE];
    // SAFETY: page 1 of `data` is ours; the backend finished writing it (response seen).
    unsafe {
        std::ptr::copy_nonoverlapping(
            data.addr().as_ptr().add(PAGE_SIZE),
            back.as_mut_ptr(),
            PAGE_SIZE,
        )
    };
    if w != status::OKAY || r != status::OKAY || back != pat {
        bail!(
            "write/read through dom0 grants: status {w}/{r}, data equal: {}",
            back == pat
        );
    }
    println!("XENFRONT: PASS write+read of a page through granted dom0 pages");

    // 2. A direct request of the most segments blkif allows (11): a Xen frontend cannot learn
    // a lower limit, so every VBD must take it, whatever its own max-segments.
    let all: Vec<Segment> = (0..MAX_SEGMENTS_PER_REQUEST).map(seg).collect();
    let n = MAX_SEGMENTS_PER_REQUEST;
    let big: Vec<u8> = (0..n * PAGE_SIZE).map(|i| (i * 13 + 5) as u8).collect();
    // SAFETY: the `n` pages of `data` are ours and mapped; nothing else writes them now.
    unsafe { std::ptr::copy_nonoverlapping(big.as_ptr(), data.addr().as_ptr(), n * PAGE_SIZE) };
    let w = one_request(&mut ring, &ev, abi, timeout, op::WRITE, 3, &all)?;
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(data.addr().as_ptr(), 0, n * PAGE_SIZE) };
    let r = one_request(&mut ring, &ev, abi, timeout, op::READ, 4, &all)?;
    let mut back = vec![0u8; n * PAGE_SIZE];
    // SAFETY: the pages are ours; the backend finished writing them (response seen).
    unsafe {
        std::ptr::copy_nonoverlapping(data.addr().as_ptr(), back.as_mut_ptr(), n * PAGE_SIZE)
    };
    if w != status::OKAY || r != status::OKAY || back != big {
        bail!(
            "an {n}-segment direct request: status {w}/{r}, data equal: {}",
            back == big
        );
    }
    println!("XENFRONT: PASS write+read of an {n}-segment direct request");
    // The single-page checks below use pages 0 and 1 again.
    // SAFETY: page 0 is ours.
    unsafe { std::ptr::copy_nonoverlapping(pat.as_ptr(), data.addr().as_ptr(), PAGE_SIZE) };

    // 3 (before the garbage, which may leave answers behind). An event-channel storm.
    if a.storm_secs > 0 {
        let t0 = Instant::now();
        let (mut kicks, mut rounds, mut next) = (0u64, 0u64, Instant::now());
        while t0.elapsed() < Duration::from_secs(a.storm_secs) {
            ev.notify_port()?;
            kicks += 1;
            if Instant::now() >= next {
                rounds += 1;
                let w = roundtrip(&mut ring, &ev, op::WRITE, 10 + 2 * rounds, seg(0))?;
                let r = roundtrip(&mut ring, &ev, op::READ, 11 + 2 * rounds, seg(1))?;
                if w != status::OKAY || r != status::OKAY {
                    bail!("during the event storm: status {w}/{r}");
                }
                next = Instant::now() + Duration::from_millis(100);
            }
        }
        if xs.read(Tx::NONE, &format!("{be}/state"))?.as_deref() != Some("4") {
            bail!("the backend left Connected during the event storm");
        }
        println!(
            "XENFRONT: PASS event storm: {kicks} notifications in {} s, {rounds} write+read pairs served, device still Connected",
            a.storm_secs
        );
    }

    // 3b. Many grants, each page its own, twice over.
    if a.grants > 0 {
        many_grants(&mut ring, &ev, abi, timeout, a.grants, be, xs)?;
    }
    if let Some(cap) = a.expect_cache {
        check_cache(xs, be, cap, a.grants as u64)?;
    }

    // 4. The frontend goes away and comes back on the same device, with new rings.
    let mut ev_now = ev;
    for cycle in 1..=a.reconnects {
        let t0 = Instant::now();
        xs.write(Tx::NONE, &format!("{fe}/state"), "5")?;
        wait_state(xs, &format!("{be}/state"), &["5", "6"], a.timeout)?;
        xs.write(Tx::NONE, &format!("{fe}/state"), "6")?;
        wait_state(xs, &format!("{be}/state"), &["6"], a.timeout)?;
        check_unmapped(xs, be, &format!("reconnect {cycle}, backend closed"))?;
        xs.write(Tx::NONE, &format!("{fe}/state"), "1")?;
        wait_state(xs, &format!("{be}/state"), &["2"], a.timeout)?;
        // SAFETY: as for the first ring: the backend unmapped the page when it closed, and
        // `ring_pages` outlives this ring.
        let mut ring2 =
            unsafe { FrontRing::init(ring_pages.addr(), 1, abi) }.context("ring too small")?;
        let ev2 = Evtchn::bind_unbound(0).context("allocating an event channel")?;
        publish_ring(xs, fe, ring_pages.refs()[0], ev2.port(), abi, a.persistent)?;
        wait_state(xs, &format!("{be}/state"), &["4"], a.timeout)?;
        xs.write(Tx::NONE, &format!("{fe}/state"), "4")?;
        let w = roundtrip(&mut ring2, &ev2, op::WRITE, 1, seg(0))?;
        let r = roundtrip(&mut ring2, &ev2, op::READ, 2, seg(1))?;
        if w != status::OKAY || r != status::OKAY {
            bail!("after reconnect {cycle}: status {w}/{r}");
        }
        println!(
            "XENFRONT: reconnect {cycle}: backend Closed, InitWait, Connected again, write+read served ({:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        ring = ring2;
        ev_now = ev2;
    }
    if a.reconnects > 0 {
        println!(
            "XENFRONT: PASS {} reconnects of the frontend followed by the backend",
            a.reconnects
        );
    }
    let ev = &ev_now;

    // 2. Garbage slots, each with a unique id.
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut answered = 0u32;
    let mut errors = 0u32;
    for i in 0..a.garbage {
        let mut g = [0u8; MAX_SLOT];
        for b in g.iter_mut() {
            *b = rng.next() as u8;
        }
        let id = 1000 + u64::from(i);
        g[abi.layout().id..abi.layout().id + 8].copy_from_slice(&id.to_le_bytes());
        while ring.free() == 0 {
            ring.take_responses(|_| {});
            std::thread::sleep(Duration::from_millis(1));
        }
        ring.put_request(&g[..lay]);
        if ring.push_requests() {
            ev.notify_port()?;
        }
        let deadline = Instant::now() + Duration::from_secs(a.timeout);
        loop {
            let mut got = None;
            ring.take_responses(|r| got = Some(r));
            if let Some(r) = got {
                answered += 1;
                if r.status != status::OKAY {
                    errors += 1;
                }
                break;
            }
            if xs.read(Tx::NONE, &format!("{be}/state"))?.as_deref() != Some("4") {
                bail!("the backend closed the device after {i} garbage requests");
            }
            if Instant::now() > deadline {
                bail!("garbage request {i} was never answered");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    println!(
        "XENFRONT: PASS {answered} garbage requests answered ({errors} with an error), device still Connected"
    );

    // 3. A producer index far beyond the ring: the backend must drop the rings.
    let t0 = Instant::now();
    ring.publish_raw_req_prod(ring.outstanding().wrapping_add(100_000));
    ev.notify_port()?;
    let st = wait_state(xs, &format!("{be}/state"), &["5", "6"], a.timeout)?;
    let why = xs
        .read(Tx::NONE, &format!("{be}/error"))?
        .unwrap_or_default();
    println!(
        "XENFRONT: PASS overflowing req_prod: backend state {st} after {:.1} s ({why})",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes `n` pages, each through a grant of its own, one request each, then reads each back
/// into its own page and compares; twice, with other contents the second time. A backend
/// whose persistent-grant cache is smaller than `n` evicts grants and maps them again.
fn many_grants(
    ring: &mut FrontRing,
    ev: &Evtchn,
    abi: Abi,
    timeout: Duration,
    n: usize,
    be: &str,
    xs: &mut Xenstore,
) -> Result<()> {
    let mut pages = Vec::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(256);
        pages.push(GrantedPages::alloc(0, k).context("granting pages")?);
        left -= k;
    }
    let page = |i: usize| -> (u32, *mut u8) {
        let g = &pages[i / 256];
        // SAFETY: page `i % 256` of a set of at least that many pages, mapped while `pages`
        // lives.
        (g.refs()[i % 256], unsafe {
            g.addr().as_ptr().add((i % 256) * PAGE_SIZE)
        })
    };
    let t0 = Instant::now();
    let mut id = 100_000u64;
    for pass in 0..2u8 {
        for i in 0..n {
            let (gref, p) = page(i);
            let fill = (i as u8).wrapping_mul(31).wrapping_add(pass * 101);
            // SAFETY: the page is ours; the backend touches it only while a request of ours
            // on it is outstanding, and none is now.
            unsafe { std::ptr::write_bytes(p, fill, PAGE_SIZE) };
            let seg = [Segment {
                gref,
                first_sect: 0,
                last_sect: 7,
                pad: 0,
            }];
            let sector = 2048 + 8 * i as u64;
            id += 1;
            let w = request_at(ring, ev, abi, timeout, op::WRITE, id, sector, &seg)?;
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(p, 0, PAGE_SIZE) };
            id += 1;
            let r = request_at(ring, ev, abi, timeout, op::READ, id, sector, &seg)?;
            // SAFETY: as above; the read's response was seen.
            let back = unsafe { std::slice::from_raw_parts(p, PAGE_SIZE) };
            if w != status::OKAY || r != status::OKAY || back.iter().any(|&b| b != fill) {
                bail!(
                    "page {i} of {n} (pass {pass}): status {w}/{r}, data equal: {}",
                    back.iter().all(|&b| b == fill)
                );
            }
        }
    }
    if xs.read(Tx::NONE, &format!("{be}/state"))?.as_deref() != Some("4") {
        bail!("the backend left Connected during the {n}-grant passes");
    }
    println!(
        "XENFRONT: PASS {n} pages through {n} grants of their own, written and read back twice ({:.1} s), device still Connected",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One request at `sector` over `segs`; waits for its answer; its status.
#[allow(clippy::too_many_arguments)]
fn request_at(
    ring: &mut FrontRing,
    ev: &Evtchn,
    abi: Abi,
    timeout: Duration,
    opc: u8,
    id: u64,
    sector: u64,
    segs: &[Segment],
) -> Result<i16> {
    let mut slot = [0u8; MAX_SLOT];
    encode(abi, opc, segs.len() as u8, id, sector, segs, &mut slot);
    ring.put_request(&slot[..abi.layout().slot]);
    if ring.push_requests() {
        ev.notify_port()?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        let mut got = None;
        ring.take_responses(|r| got = Some(r));
        if let Some(r) = got {
            if r.id != id {
                bail!("response id {} for request {id}", r.id);
            }
            return Ok(r.status);
        }
        if Instant::now() > deadline {
            bail!("no response to request {id}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The tapdisk's grant counters (`tap-ctl stats`, `.ring.grants`) agree with a persistent
/// cache of at most `cap` grants, with what its `/proc/<pid>/maps` holds (one ring page and
/// the cached grants), and, after `used` distinct grants, with grants having been evicted or
/// mapped for one request only when `used > cap`.
fn check_cache(xs: &mut Xenstore, be: &str, cap: u64, used: u64) -> Result<()> {
    let read = |xs: &mut Xenstore, k: &str| -> Result<String> {
        xs.read(Tx::NONE, &format!("{be}/{k}"))?
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| anyhow::anyhow!("no {k} key under {be}"))
    };
    let pid: u32 = read(xs, "pid")?.parse().context("pid key")?;
    let minor = read(xs, "minor")?;
    let out = std::process::Command::new("tap-ctl")
        .args(["stats", "-m", &minor, "-p", &pid.to_string()])
        .output()
        .context("running tap-ctl stats")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("tap-ctl stats printed no JSON")?;
    let g = &v["ring"]["grants"];
    println!("XENFRONT: tapdisk {pid} grants {g}");
    let n = |k: &str| g[k].as_u64().unwrap_or(0);
    if g["rings"]["persistent"].as_u64() != Some(1) {
        bail!("the ring does not use persistent grants: {g}");
    }
    let mapped = n("mapped_pages");
    if mapped > cap || n("capacity") != cap {
        bail!(
            "{mapped} grants mapped, capacity {} (expected at most {cap})",
            n("capacity")
        );
    }
    if used > cap && n("evictions") + n("transient") == 0 {
        bail!("{used} grants through a cache of {cap}, but none evicted or mapped for one request");
    }
    let in_maps = gntdev_pages(pid)? as u64;
    if in_maps != mapped + 1 {
        bail!("/proc/{pid}/maps holds {in_maps} gntdev pages, the counters say 1 ring page + {mapped} grants");
    }
    println!(
        "XENFRONT: PASS persistent cache of {cap}: {mapped} grants mapped (= /proc/{pid}/maps less the ring page), {} hits, {} misses, {} evictions, {} requests mapped for their IO only",
        n("hits"),
        n("misses"),
        n("evictions"),
        n("transient")
    );
    Ok(())
}
