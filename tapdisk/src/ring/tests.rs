//! The ring loop on its own: a local frontend in the test drives a `RingLoop` on a thread over
//! a socket pair, on a raw image in a temporary file. Data round trips, refusals, a broken
//! frontend, pause and resume on another image, stop with IO in flight.

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkif::local::{AttachLimits, FrontRequest, FrontendConfig, LocalFrontend};
use blkif::protocol::{op, status, Response, Segment};
use blkif::request::DiskInfo;
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
}

fn disk() -> DiskInfo {
    DiskInfo {
        sectors: SECTORS,
        sector_size: 512,
        read_only: false,
        flush: true,
        barrier: true,
        discard: true,
        max_segments: 11,
        max_indirect_segments: 0,
    }
}

fn image(path: &std::path::Path) -> Arc<dyn Image> {
    Arc::new(AioImage::open(path, OpenOptionsImg::default()).expect("open image"))
}

impl Rig {
    fn new(cfg: RingConfig) -> Rig {
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
        let thread = std::thread::spawn(move || {
            let be = blkif::local::accept(back, &AttachLimits::default(), &disk()).unwrap();
            match RingLoop::new(be, disk(), cfg, env) {
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
        Rig {
            _dir: dir,
            img,
            shared,
            ctl,
            stats,
            front,
            thread: Some(thread),
            next_id: 1,
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
