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
fn publish_ring(xs: &mut Xenstore, fe: &str, ring_ref: u32, port: u32, abi: Abi) -> Result<()> {
    xs.transaction(|xs, tx| {
        xs.write(tx, &format!("{fe}/ring-ref"), &ring_ref.to_string())?;
        xs.write(tx, &format!("{fe}/event-channel"), &port.to_string())?;
        xs.write(tx, &format!("{fe}/protocol"), abi.name())?;
        xs.write(tx, &format!("{fe}/state"), "3")
    })?;
    Ok(())
}

/// Sends one request of one segment and waits for its answer; its status.
fn one_request(
    ring: &mut FrontRing,
    ev: &Evtchn,
    abi: Abi,
    timeout: Duration,
    opc: u8,
    id: u64,
    segs: &[Segment],
) -> Result<i16> {
    let mut slot = [0u8; MAX_SLOT];
    encode(abi, opc, segs.len() as u8, id, 8, segs, &mut slot);
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
        std::thread::sleep(Duration::from_millis(5));
    }
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
    let result = frontend(&mut xs, a, &be, &fe);
    // Tear down as the toolstack would, whatever happened.
    let _ = xs.write(Tx::NONE, &format!("{fe}/state"), "6");
    let _ = xs.write(Tx::NONE, &format!("{be}/online"), "0");
    let _ = xs.write(Tx::NONE, &format!("{be}/state"), "5");
    let _ = wait_state(&mut xs, &format!("{be}/state"), &["6"], a.timeout);
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
    publish_ring(xs, fe, ring_ref, port, abi)?;
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

    // 4. The frontend goes away and comes back on the same device, with new rings.
    let mut ev_now = ev;
    for cycle in 1..=a.reconnects {
        let t0 = Instant::now();
        xs.write(Tx::NONE, &format!("{fe}/state"), "5")?;
        wait_state(xs, &format!("{be}/state"), &["5", "6"], a.timeout)?;
        xs.write(Tx::NONE, &format!("{fe}/state"), "6")?;
        wait_state(xs, &format!("{be}/state"), &["6"], a.timeout)?;
        xs.write(Tx::NONE, &format!("{fe}/state"), "1")?;
        wait_state(xs, &format!("{be}/state"), &["2"], a.timeout)?;
        // SAFETY: as for the first ring: the backend unmapped the page when it closed, and
        // `ring_pages` outlives this ring.
        let mut ring2 =
            unsafe { FrontRing::init(ring_pages.addr(), 1, abi) }.context("ring too small")?;
        let ev2 = Evtchn::bind_unbound(0).context("allocating an event channel")?;
        publish_ring(xs, fe, ring_pages.refs()[0], ev2.port(), abi)?;
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
