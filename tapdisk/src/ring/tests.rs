//! The ring loop on its own: a local frontend in the test drives a `RingLoop` on a thread over
//! a socket pair, on a raw image in a temporary file. Data round trips, refusals, a broken
//! frontend, pause and resume on another image, stop with IO in flight; and the same ring
//! served the way a Xen ring is (persistent grants, batched per-request mapping, grant copy),
//! through the real grant bookkeeping over a stand-in grant device that counts what is mapped.

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkif::local::{AttachLimits, FrontRequest, FrontendConfig, LocalBackend, LocalFrontend};
use blkif::protocol::{op, status, Response, Segment};
use blkif::request::DiskInfo;
use blkif::ring::BackRing;
use blkif::xen::backend::{GrantCounters, GrantMode, PersistentIo, XenGrants};
use blkif::xen::testing::{FakeCounts, FakeGntdev};
use slog::{o, Logger};

use super::*;
use crate::driver::aio::AioImage;
use crate::driver::{Image, OpenOptionsImg};

const SECTORS: u64 = 2048;

struct Rig {
    _dir: tempfile::TempDir,
    img: std::path::PathBuf,
    shared: Arc<VbdShared>,
    ctl: Arc<RingControl>,
    stats: Arc<RingStats>,
    front: LocalFrontend,
    thread: Option<JoinHandle<RingExit>>,
    next_id: u64,
    /// What the stand-in grant device has mapped (rings served the Xen way).
    grants: Option<Arc<FakeCounts>>,
}

/// A local frontend's ring served the way a Xen ring is: its memory reached through
/// [`XenGrants`] over a stand-in grant device (grant `g` = page `g` of the frontend's memory).
struct XenLike {
    /// First: its mappings go before the memory under them.
    grants: XenGrants<FakeGntdev>,
    be: LocalBackend,
}

impl RingTransport for XenLike {
    type Grants = XenGrants<FakeGntdev>;
    type Evtchn = blkif::local::LocalEvtchn;
    fn parts(&mut self) -> (&mut BackRing, &mut Self::Grants, &Self::Evtchn) {
        (&mut self.be.ring, &mut self.grants, &self.be.evtchn)
    }
    fn abi(&self) -> blkif::Abi {
        self.be.abi
    }
    fn hangup_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.be.sock.as_raw_fd())
    }
    fn grant_counters(&self) -> Option<GrantCounters> {
        Some(self.grants.counters())
    }
}

fn disk() -> DiskInfo {
    DiskInfo::writable(SECTORS)
}

fn image(path: &std::path::Path) -> Arc<dyn Image> {
    Arc::new(AioImage::open(path, OpenOptionsImg::default()).expect("open image"))
}

impl Rig {
    fn new(cfg: RingConfig) -> Rig {
        Rig::serving(cfg, None)
    }

    /// A rig whose ring is served as a Xen ring in `mode` (None: the local transport).
    fn serving(cfg: RingConfig, mode: Option<GrantMode>) -> Rig {
        Rig::serving_with(cfg, mode, PersistentIo::default())
    }

    /// The same, persistent-mode IO going where `pio` says.
    fn serving_with(cfg: RingConfig, mode: Option<GrantMode>, pio: PersistentIo) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(SECTORS * 512)
            .unwrap();
        let shared = Arc::new(VbdShared::new(image(&img), None));
        let ctl = Arc::new(RingControl::new().unwrap());
        let stats = Arc::new(RingStats::default());
        let (front, back) = UnixStream::pair().unwrap();
        let env = RingEnv {
            vbd: shared.clone(),
            ctl: ctl.clone(),
            stats: stats.clone(),
            trace: None,
            log: Logger::root(slog::Discard, o!()),
            cache: None,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let be = blkif::local::accept(back, &AttachLimits::default(), &disk()).unwrap();
            let Some(mode) = mode else {
                return match RingLoop::new(be, disk(), cfg, env) {
                    Ok(l) => l.run(),
                    Err(e) => RingExit::Fatal(e),
                };
            };
            // SAFETY: the frontend's memory stays mapped by `be`, which the transport holds
            // and drops after the grants (field order).
            let dev = unsafe { FakeGntdev::new(be.grants.base(), be.grants.pages()) };
            tx.send(dev.counts()).unwrap();
            let slots = be.ring.size();
            let grants = XenGrants::new(1, mode, slots, 11, None, pio, dev).unwrap();
            match RingLoop::new(XenLike { grants, be }, disk(), cfg, env) {
                Ok(l) => l.run(),
                Err(e) => RingExit::Fatal(e),
            }
        });
        let front = LocalFrontend::attach(
            front,
            FrontendConfig {
                mem_pages: 64,
                ..FrontendConfig::default()
            },
        )
        .unwrap();
        let grants = mode.map(|_| rx.recv().unwrap());
        Rig {
            _dir: dir,
            img,
            shared,
            ctl,
            stats,
            front,
            thread: Some(thread),
            next_id: 1,
            grants,
        }
    }

    /// Queues one request of `op` over guest page `page` (all of it) at `sector`; its id.
    fn queue(&mut self, opc: u8, sector: u64, page: u32) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let seg = [Segment {
            gref: page,
            first_sect: 0,
            last_sect: 7,
            pad: 0,
        }];
        let segs: &[Segment] = if opc == op::FLUSH_DISKCACHE {
            &[]
        } else {
            &seg
        };
        assert!(self.front.queue(&FrontRequest::Rw {
            op: opc,
            id,
            sector,
            segments: segs,
        }));
        id
    }

    /// Publishes and collects `n` responses.
    fn responses(&mut self, n: usize) -> Vec<Response> {
        self.front.push().unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} responses",
                out.len()
            );
            self.front.wait(Some(Duration::from_millis(100))).unwrap();
            self.front.poll(|r| out.push(r));
        }
        out
    }

    fn one(&mut self, opc: u8, sector: u64, page: u32) -> i16 {
        let id = self.queue(opc, sector, page);
        let r = self.responses(1);
        assert_eq!(r[0].id, id);
        r[0].status
    }

    fn stop(&mut self) -> RingExit {
        self.ctl.stop.store(true, Ordering::Release);
        self.ctl.wake();
        self.thread.take().unwrap().join().unwrap()
    }

    fn wait_quiesced(&self, want: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ctl.quiesced.load(Ordering::Acquire) != want {
            assert!(Instant::now() < deadline, "quiesced never became {want}");
            self.ctl.wake();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn writes_and_reads_round_trip_and_are_counted() {
    let mut r = Rig::new(RingConfig::default());
    r.front.write_mem(0, &[0xabu8; 4096]);
    assert_eq!(r.one(op::WRITE, 8, 0), status::OKAY);
    assert_eq!(r.one(op::FLUSH_DISKCACHE, 0, 0), status::OKAY);
    assert_eq!(r.one(op::READ, 8, 1), status::OKAY);
    let mut back = [0u8; 4096];
    r.front.read_mem(4096, &mut back);
    assert_eq!(back, [0xabu8; 4096]);
    let on_disk = std::fs::read(&r.img).unwrap();
    assert_eq!(&on_disk[4096..8192], &[0xabu8; 4096][..]);
    assert_eq!(r.stats.write.requests.get(), 1);
    assert_eq!(r.stats.read.requests.get(), 1);
    assert_eq!(r.stats.flush.requests.get(), 1);
    assert!(matches!(r.stop(), RingExit::Stopped));
}

#[test]
fn a_batch_is_answered_whole_and_merged() {
    let mut r = Rig::new(RingConfig::default());
    // 16 contiguous 4 KiB writes in one batch: one published batch of responses.
    let ids: Vec<u64> = (0..16u32)
        .map(|i| r.queue(op::WRITE, u64::from(i) * 8, i))
        .collect();
    let mut got: Vec<u64> = r.responses(16).iter().map(|x| x.id).collect();
    got.sort();
    assert_eq!(got, ids);
    assert!(
        r.stats.sched.merged_ios.get() > 0,
        "contiguous writes of one batch were not merged"
    );
    r.stop();
}

#[test]
fn bad_requests_are_refused_and_the_ring_goes_on() {
    let mut r = Rig::new(RingConfig::default());
    // Past the end of the disk, and a grant outside guest memory.
    assert_eq!(r.one(op::READ, SECTORS, 0), status::ERROR);
    assert_eq!(r.one(op::READ, 0, 1000), status::ERROR);
    assert_eq!(r.stats.bad_requests.get(), 2);
    assert_eq!(r.one(op::READ, 0, 0), status::OKAY);
    r.stop();
}

#[test]
fn a_frontend_reusing_an_id_in_flight_loses_its_ring() {
    let mut r = Rig::new(RingConfig::default());
    // Pause first so the two requests are both in flight when the loop looks at them.
    r.shared.paused.store(true, Ordering::Release);
    r.wait_quiesced(true);
    let id = r.queue(op::READ, 0, 0);
    r.next_id = id;
    r.queue(op::READ, 8, 1);
    r.front.push().unwrap();
    r.shared.paused.store(false, Ordering::Release);
    r.ctl.wake();
    let exit = r.thread.take().unwrap().join().unwrap();
    match exit {
        RingExit::Broken(why) => assert!(why.contains("reused id"), "{why}"),
        other => panic!("ring ended with {other:?}"),
    }
}

#[test]
fn pause_quiesces_and_resume_serves_the_new_image() {
    let mut r = Rig::new(RingConfig::default());
    r.front.write_mem(0, &[1u8; 4096]);
    assert_eq!(r.one(op::WRITE, 0, 0), status::OKAY);
    r.shared.paused.store(true, Ordering::Release);
    r.wait_quiesced(true);
    // A request while paused waits.
    let id = r.queue(op::READ, 0, 2);
    r.front.push().unwrap();
    assert!(!r.front.wait(Some(Duration::from_millis(200))).unwrap());
    // Swap to another image of the same size, holding 2s.
    let other = r.img.with_file_name("other.img");
    std::fs::write(&other, vec![2u8; (SECTORS * 512) as usize]).unwrap();
    r.shared.set_image(image(&other));
    r.shared.paused.store(false, Ordering::Release);
    r.ctl.wake();
    let resp = r.responses(1);
    assert_eq!((resp[0].id, resp[0].status), (id, status::OKAY));
    let mut back = [0u8; 4096];
    r.front.read_mem(2 * 4096, &mut back);
    assert_eq!(
        back, [2u8; 4096],
        "the read after resuming went to the old image"
    );
    r.wait_quiesced(false);
    r.stop();
}

#[test]
fn a_stopped_ring_finishes_its_io_first() {
    let mut r = Rig::new(RingConfig {
        layers: crate::driver::Layers {
            faults: Some("delay=1000000:200000".parse().unwrap()),
            model: None,
        },
        ..RingConfig::default()
    });
    r.front.write_mem(0, &[7u8; 4096]);
    let id = r.queue(op::WRITE, 16, 0);
    r.front.push().unwrap();
    // The write is delayed 200 ms by the fault layer; stop meanwhile.
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    assert!(matches!(r.stop(), RingExit::Stopped));
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "stopped before the IO finished"
    );
    let mut got = Vec::new();
    r.front.poll(|x| got.push(x));
    assert_eq!(got.len(), 1, "the write in flight was not answered");
    assert_eq!((got[0].id, got[0].status), (id, status::OKAY));
    let on_disk = std::fs::read(&r.img).unwrap();
    assert_eq!(&on_disk[8192..12288], &[7u8; 4096][..]);
}

/// The pages mapped now by the stand-in grant device.
fn live(r: &Rig) -> i64 {
    r.grants.as_ref().map_or(0, |c| c.live())
}

#[test]
fn persistent_grants_stay_mapped_while_the_ring_lives_and_go_when_it_disconnects() {
    for pio in [PersistentIo::Staged, PersistentIo::Direct] {
        persistent_grants_round_trip(pio);
    }
}

fn persistent_grants_round_trip(pio: PersistentIo) {
    let mut r = Rig::serving_with(RingConfig::default(), Some(GrantMode::Persistent), pio);
    r.front.write_mem(0, &[0x5au8; 4096]);
    for round in 0..3 {
        assert_eq!(
            r.one(op::WRITE, 8, 0),
            status::OKAY,
            "{pio:?} round {round}"
        );
        assert_eq!(r.one(op::READ, 8, 1), status::OKAY, "{pio:?} round {round}");
    }
    let mut back = [0u8; 4096];
    r.front.read_mem(4096, &mut back);
    assert_eq!(
        back, [0x5au8; 4096],
        "{pio:?}: the read's data in the guest's page"
    );
    // Two grants, mapped once each, still mapped after their IO; four hits.
    assert_eq!(live(&r), 2);
    let g = &r.stats.grants;
    assert_eq!((g.misses.get(), g.hits.get()), (2, 4));
    assert_eq!((g.ring_persistent.get(), g.mapped_pages.get()), (1, 2));
    assert_eq!(g.transient.get(), 0);
    // The frontend goes away: every grant is unmapped once its ring is gone.
    // SAFETY: the frontend's own socket, open while `r.front` lives; shutting it down only
    // makes the backend see the hang-up.
    let rc = unsafe { libc::shutdown(r.front.hangup_fd(), libc::SHUT_RDWR) };
    assert_eq!(rc, 0);
    let exit = r.thread.take().unwrap().join().unwrap();
    assert!(matches!(exit, RingExit::FrontendGone), "{exit:?}");
    assert_eq!(
        live(&r),
        0,
        "grants left mapped after the ring disconnected"
    );
    assert_eq!(r.stats.grants.mapped_pages.get(), 0);
}

#[test]
fn a_ring_stopped_with_io_in_flight_unmaps_its_persistent_grants_after_the_io() {
    let mut r = Rig::serving(
        RingConfig {
            layers: crate::driver::Layers {
                faults: Some("delay=1000000:200000".parse().unwrap()),
                model: None,
            },
            ..RingConfig::default()
        },
        Some(GrantMode::Persistent),
    );
    r.front.write_mem(0, &[9u8; 4096]);
    for i in 0..4u32 {
        r.queue(op::WRITE, u64::from(i) * 8, i);
    }
    r.front.push().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(live(&r), 4, "mapped while the writes are in flight");
    assert!(matches!(r.stop(), RingExit::Stopped));
    let mut got = 0;
    r.front.poll(|x| {
        assert_eq!(x.status, status::OKAY);
        got += 1;
    });
    assert_eq!(got, 4, "the writes in flight were answered");
    assert_eq!(live(&r), 0, "grants left mapped after the ring stopped");
}

#[test]
fn map_mode_unmaps_each_request_before_answering_it() {
    let mut r = Rig::serving(RingConfig::default(), Some(GrantMode::Map));
    r.front.write_mem(0, &[3u8; 8192]);
    // A batch of writes: one map call for all of them.
    let ids: Vec<u64> = (0..8u32)
        .map(|i| r.queue(op::WRITE, u64::from(i) * 64, i % 2))
        .collect();
    let got = r.responses(ids.len());
    assert!(got.iter().all(|x| x.status == status::OKAY));
    assert_eq!(live(&r), 0, "a request was answered with its grants mapped");
    let g = &r.stats.grants;
    assert_eq!(g.ring_map.get(), 1);
    assert_eq!(g.transient.get(), 8);
    assert!(
        g.map_calls.get() < 8,
        "{} map calls for 8 requests taken as one batch",
        g.map_calls.get()
    );
    assert_eq!(r.one(op::READ, 64, 5), status::OKAY);
    let mut back = [0u8; 4096];
    r.front.read_mem(5 * 4096, &mut back);
    assert_eq!(back, [3u8; 4096]);
    assert_eq!(live(&r), 0);
    r.stop();
}

#[test]
fn grant_copy_round_trips_and_maps_nothing() {
    let mut r = Rig::serving(RingConfig::default(), Some(GrantMode::Copy));
    r.front.write_mem(3 * 4096, &[0xc3u8; 4096]);
    assert_eq!(r.one(op::WRITE, 24, 3), status::OKAY);
    assert_eq!(r.one(op::READ, 24, 7), status::OKAY);
    let mut back = [0u8; 4096];
    r.front.read_mem(7 * 4096, &mut back);
    assert_eq!(back, [0xc3u8; 4096]);
    assert_eq!(live(&r), 0);
    assert_eq!(r.stats.grants.copy_calls.get(), 2);
    assert_eq!(r.stats.grants.ring_copy.get(), 1);
    r.stop();
}
