//! A hostile or broken frontend against a real tapdisk process, one test per class of bad
//! input: the bad request gets an error response, the ring or the process behaves as stated,
//! and other requests (and other rings) are still served.

use std::time::Duration;

use blkif::local::{AttachError, FrontRequest, FrontendConfig, LocalFrontend};
use blkif::protocol::{op, status, Abi, MAX_SLOT};
use blkif::request::encode;
use blkif::ring::SlotCopy;
use blkif::{Response, Segment};
use tapdisk_control::VbdSettings;
use tapdisk_e2e::*;

const T: Option<Duration> = Some(Duration::from_secs(10));

struct Rig {
    td: Tapdisk,
    _dir: tempfile::TempDir,
    device: std::path::PathBuf,
    minor: u32,
}

fn rig(opts: VbdSettings) -> Rig {
    let td = Tapdisk::start().unwrap();
    let (dir, img) = image(4 << 20).unwrap();
    let vbd = td.open(&format!("aio:{}", img.display()), opts).unwrap();
    Rig {
        td,
        _dir: dir,
        device: vbd.device.into(),
        minor: vbd.minor,
    }
}

fn fe(r: &Rig, abi: Abi) -> LocalFrontend {
    LocalFrontend::connect(
        &r.device,
        FrontendConfig {
            abi,
            ring_order: 0,
            mem_pages: 64,
            ..Default::default()
        },
    )
    .unwrap()
}

fn seg(gref: u32, f: u8, l: u8) -> Segment {
    Segment {
        gref,
        first_sect: f,
        last_sect: l,
        pad: 0,
    }
}

/// Pushes what is queued and collects `n` responses.
fn collect(f: &mut LocalFrontend, n: usize) -> Vec<Response> {
    f.push().unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        assert!(f.wait(T).unwrap(), "timed out waiting for responses");
        f.poll(|r| out.push(r));
    }
    out
}

fn rw(f: &mut LocalFrontend, opc: u8, id: u64, sector: u64, segs: &[Segment]) {
    assert!(f.queue(&FrontRequest::Rw {
        op: opc,
        id,
        sector,
        segments: segs
    }));
}

fn raw(f: &mut LocalFrontend, opc: u8, nseg: u8, id: u64, sector: u64, segs: &[Segment]) {
    let mut b = [0u8; MAX_SLOT];
    encode(f.abi(), opc, nseg, id, sector, segs, &mut b);
    assert!(f.queue_raw(&b[..f.abi().layout().slot]));
}

fn status_of(rs: &[Response], id: u64) -> i16 {
    rs.iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("no response for {id}"))
        .status
}

/// A valid read that must still succeed after the bad ones.
fn still_serving(f: &mut LocalFrontend) {
    rw(f, op::READ, 999, 0, &[seg(0, 0, 7)]);
    let rs = collect(f, 1);
    assert_eq!(status_of(&rs, 999), status::OKAY);
}

#[test]
fn unknown_and_unsupported_operations_get_eopnotsupp() {
    // Indirect requests are offered by default; turn them off to see them refused.
    let r = rig(VbdSettings {
        max_indirect_segments: 0,
        ..Default::default()
    });
    for abi in [Abi::X86_64, Abi::X86_32] {
        let mut f = fe(&r, abi);
        raw(&mut f, 99, 1, 1, 0, &[seg(0, 0, 7)]);
        raw(&mut f, op::RESERVED_1, 1, 2, 0, &[seg(0, 0, 7)]);
        raw(&mut f, op::INDIRECT, 1, 3, 0, &[seg(0, 0, 7)]);
        let rs = collect(&mut f, 3);
        for id in 1..=3 {
            assert_eq!(status_of(&rs, id), status::EOPNOTSUPP, "id {id}");
        }
        // The operation byte is echoed.
        assert_eq!(rs.iter().find(|x| x.id == 1).unwrap().operation, 99);
        still_serving(&mut f);
    }
    let s = r.td.stats(r.minor).unwrap();
    assert_eq!(s["ring"]["unsupported"], 6);
}

#[test]
fn bad_segment_counts_get_errors() {
    let r = rig(VbdSettings::default());
    let mut f = fe(&r, Abi::X86_64);
    raw(&mut f, op::READ, 0, 1, 0, &[]);
    raw(&mut f, op::WRITE, 12, 2, 0, &[seg(0, 0, 7); 11]);
    raw(&mut f, op::READ, 32, 3, 0, &[seg(0, 0, 7); 11]);
    raw(&mut f, op::READ, 255, 4, 0, &[seg(0, 0, 7); 11]);
    let rs = collect(&mut f, 4);
    for id in 1..=4 {
        assert_eq!(status_of(&rs, id), status::ERROR, "id {id}");
    }
    still_serving(&mut f);
    let s = r.td.stats(r.minor).unwrap();
    assert_eq!(s["ring"]["bad_requests"], 4);
}

#[test]
fn max_segments_setting_is_enforced() {
    let r = rig(VbdSettings {
        max_segments: 4,
        ..Default::default()
    });
    let mut f = fe(&r, Abi::X86_64);
    assert_eq!(f.info().max_segments, 4);
    rw(&mut f, op::READ, 1, 0, &[seg(0, 0, 7); 5]);
    rw(
        &mut f,
        op::READ,
        2,
        0,
        &[seg(0, 0, 7), seg(1, 0, 7), seg(2, 0, 7), seg(3, 0, 7)],
    );
    let rs = collect(&mut f, 2);
    assert_eq!(status_of(&rs, 1), status::ERROR);
    assert_eq!(status_of(&rs, 2), status::OKAY);
}

#[test]
fn sectors_outside_a_page_get_errors() {
    let r = rig(VbdSettings::default());
    let mut f = fe(&r, Abi::X86_64);
    rw(&mut f, op::READ, 1, 0, &[seg(0, 5, 4)]);
    rw(&mut f, op::READ, 2, 0, &[seg(0, 0, 8)]);
    rw(&mut f, op::WRITE, 3, 0, &[seg(0, 0, 7), seg(1, 0, 255)]);
    let rs = collect(&mut f, 3);
    for id in 1..=3 {
        assert_eq!(status_of(&rs, id), status::ERROR, "id {id}");
    }
    still_serving(&mut f);
}

#[test]
fn sector_ranges_outside_the_disk_get_errors() {
    let r = rig(VbdSettings::default());
    let mut f = fe(&r, Abi::X86_32);
    let sectors = f.info().sectors;
    rw(&mut f, op::READ, 1, sectors - 4, &[seg(0, 0, 7)]);
    rw(&mut f, op::READ, 2, sectors, &[seg(0, 0, 0)]);
    rw(&mut f, op::WRITE, 3, u64::MAX - 3, &[seg(0, 0, 7)]);
    assert!(f.queue(&FrontRequest::Discard {
        id: 4,
        sector: sectors - 1,
        nr_sectors: 2,
        secure: false
    }));
    assert!(f.queue(&FrontRequest::Discard {
        id: 5,
        sector: 8,
        nr_sectors: u64::MAX,
        secure: false
    }));
    rw(&mut f, op::READ, 6, sectors - 8, &[seg(0, 0, 7)]);
    let rs = collect(&mut f, 6);
    for id in 1..=5 {
        assert_eq!(status_of(&rs, id), status::ERROR, "id {id}");
    }
    assert_eq!(
        status_of(&rs, 6),
        status::OKAY,
        "the last sectors are readable"
    );
}

#[test]
fn grant_refs_outside_guest_memory_get_errors() {
    let r = rig(VbdSettings::default());
    let mut f = fe(&r, Abi::X86_64);
    let pages = f.mem_pages();
    rw(&mut f, op::READ, 1, 0, &[seg(pages, 0, 7)]);
    rw(
        &mut f,
        op::WRITE,
        2,
        0,
        &[seg(0, 0, 7), seg(u32::MAX, 0, 7)],
    );
    let rs = collect(&mut f, 2);
    assert_eq!(status_of(&rs, 1), status::ERROR);
    assert_eq!(status_of(&rs, 2), status::ERROR);
    still_serving(&mut f);
}

fn indirect(f: &mut LocalFrontend, inner: u8, id: u64, sector: u64, ind: &[u32], segs: &[Segment]) {
    assert!(f.queue(&FrontRequest::Indirect {
        op: inner,
        id,
        sector,
        indirect: ind,
        segments: segs,
    }));
}

#[test]
fn bad_indirect_requests_get_errors() {
    let r = rig(VbdSettings {
        max_indirect_segments: 32,
        ..Default::default()
    });
    let mut f = fe(&r, Abi::X86_64);
    assert_eq!(f.info().max_indirect_segments, 32);
    let pages = f.mem_pages();
    let good: Vec<Segment> = (0..32).map(|i| seg(i, 0, 7)).collect();
    // Each request's descriptors in a page of its own (40..64); data pages 0..32.
    indirect(&mut f, op::FLUSH_DISKCACHE, 1, 0, &[63], &good[..1]);
    indirect(&mut f, op::WRITE, 2, 0, &[62], &[]);
    let many: Vec<Segment> = (0..33).map(|_| seg(0, 0, 7)).collect();
    indirect(&mut f, op::WRITE, 3, 0, &[61], &many);
    indirect(&mut f, op::READ, 4, 0, &[pages], &good);
    let mut bad = good.clone();
    bad[31] = seg(31, 3, 8);
    indirect(&mut f, op::WRITE, 5, 0, &[60], &bad);
    indirect(&mut f, op::READ, 6, 8190, &[59], &good);
    let rs = collect(&mut f, 6);
    for id in 1..=6 {
        assert_eq!(status_of(&rs, id), status::ERROR, "id {id}");
    }
    // Answered with the inner operation, as Linux blkback does (blkfront requires it).
    for (id, want) in [
        (1, op::FLUSH_DISKCACHE),
        (2, op::WRITE),
        (3, op::WRITE),
        (4, op::READ),
        (5, op::WRITE),
        (6, op::READ),
    ] {
        let got = rs.iter().find(|x| x.id == id).map(|x| x.operation);
        assert_eq!(got, Some(want), "id {id}");
    }
    // A good one: 32 pages written indirectly read back directly.
    for i in 0..32u32 {
        f.write_mem(i as usize * 4096, &[i as u8 + 1; 4096]);
    }
    indirect(&mut f, op::WRITE, 7, 64, &[63], &good);
    assert_eq!(status_of(&collect(&mut f, 1), 7), status::OKAY);
    f.write_mem(0, &[0u8; 4096]);
    rw(&mut f, op::READ, 8, 64 + 8 * 31, &[seg(0, 0, 7)]);
    assert_eq!(status_of(&collect(&mut f, 1), 8), status::OKAY);
    let mut b = [0u8; 4096];
    f.read_mem(0, &mut b);
    assert_eq!(b, [32u8; 4096]);
    still_serving(&mut f);
    let s = r.td.stats(r.minor).unwrap();
    assert_eq!(s["ring"]["bad_requests"], 6);
}

#[test]
fn read_only_disks_refuse_writes_and_discards() {
    let r = rig(VbdSettings {
        read_only: true,
        ..Default::default()
    });
    let mut f = fe(&r, Abi::X86_64);
    assert!(f.info().read_only);
    rw(&mut f, op::WRITE, 1, 0, &[seg(0, 0, 7)]);
    rw(&mut f, op::WRITE_BARRIER, 2, 0, &[seg(0, 0, 7)]);
    assert!(f.queue(&FrontRequest::Discard {
        id: 3,
        sector: 0,
        nr_sectors: 8,
        secure: false
    }));
    let rs = collect(&mut f, 3);
    assert_eq!(status_of(&rs, 1), status::ERROR);
    assert_eq!(status_of(&rs, 2), status::ERROR);
    assert_ne!(status_of(&rs, 3), status::OKAY);
    still_serving(&mut f);
}

#[test]
fn producer_running_ahead_loses_its_ring_only() {
    let r = rig(VbdSettings::default());
    let mut good = fe(&r, Abi::X86_64);
    let mut bad = fe(&r, Abi::X86_64);
    let size = bad.ring_size();
    bad.publish_raw_req_prod(size + 1).unwrap();
    let err = bad.wait(T).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
    // The process and the other ring carry on, and new rings can attach.
    still_serving(&mut good);
    let mut again = fe(&r, Abi::X86_64);
    still_serving(&mut again);
    let mut td = r.td;
    assert!(td.alive());
}

#[test]
fn reused_in_flight_id_loses_its_ring_only() {
    let r = rig(VbdSettings::default());
    let mut good = fe(&r, Abi::X86_64);
    let mut bad = fe(&r, Abi::X86_64);
    // Both requests are popped in one batch, so the first is still in flight.
    rw(&mut bad, op::READ, 7, 0, &[seg(0, 0, 7)]);
    rw(&mut bad, op::READ, 7, 8, &[seg(1, 0, 7)]);
    bad.push().unwrap();
    let mut n = 0;
    let err = loop {
        match bad.wait(T) {
            Ok(true) => {
                bad.poll(|_| n += 1);
            }
            Ok(false) => panic!("neither responses nor a disconnect"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
    assert!(n <= 1, "the duplicate must not be answered");
    still_serving(&mut good);
}

#[test]
fn attach_with_bad_parameters_is_refused_cleanly() {
    let r = rig(VbdSettings {
        max_ring_order: 2,
        ..Default::default()
    });
    let e = LocalFrontend::connect(
        &r.device,
        FrontendConfig {
            ring_order: 3,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&e, blkif::Error::Attach(AttachError::Refused(m)) if m.contains("ring order 3")),
        "{e}"
    );
    let mut f = LocalFrontend::connect(
        &r.device,
        FrontendConfig {
            ring_order: 2,
            mem_pages: 8,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(f.ring_size(), 128);
    still_serving(&mut f);
}

#[test]
fn frontend_vanishing_with_io_in_flight_is_harmless() {
    let r = rig(VbdSettings::default());
    for round in 0..5 {
        let mut f = fe(&r, Abi::X86_64);
        for i in 0..32u64 {
            rw(&mut f, op::WRITE, i, i * 8, &[seg(i as u32 % 64, 0, 7)]);
        }
        f.push().unwrap();
        drop(f);
        let _ = round;
    }
    let mut f = fe(&r, Abi::X86_64);
    still_serving(&mut f);
}

#[test]
fn responses_leave_padding_untouched() {
    let r = rig(VbdSettings::default());
    let mut f = fe(&r, Abi::X86_64);
    // Fill the slot's padding area with a marker the backend must not overwrite or replace.
    let mut b = [0u8; MAX_SLOT];
    encode(
        Abi::X86_64,
        op::READ,
        1,
        0x1122_3344_5566_7788,
        0,
        &[seg(0, 0, 7)],
        &mut b,
    );
    b[9] = 0xEE; // nr_segments' neighbour... the response's pad byte
    b[1] = 1;
    b[12..16].copy_from_slice(&[0xEE; 4]); // beyond the response's status: id high half in the request
                                           // Keep the request well formed: byte 9 is part of the id's... so use a fresh id layout.
    let id = u64::from_le_bytes(b[8..16].try_into().unwrap());
    assert!(f.queue_raw(&b[..112]));
    let rs = collect(&mut f, 1);
    assert_eq!(rs[0].id, id);
    let mut s = SlotCopy::default();
    f.peek_slot(0, &mut s);
    assert_eq!(s.bytes[9], 0xEE, "response padding byte rewritten");
    assert_eq!(&s.bytes[12..16], &[0xEE; 4], "tail padding rewritten");
    assert_eq!(&s.bytes[16..112], &b[16..112], "rest of the slot rewritten");
}

#[test]
fn barrier_and_flush_wait_for_earlier_requests() {
    let r = rig(VbdSettings::default());
    let mut f = fe(&r, Abi::X86_64);
    for i in 0..8u64 {
        f.write_mem(i as usize * 4096, &[i as u8 + 1; 4096]);
        rw(&mut f, op::WRITE, i, i * 8, &[seg(i as u32, 0, 7)]);
    }
    rw(&mut f, op::WRITE_BARRIER, 100, 64, &[seg(8, 0, 7)]);
    for i in 0..8u64 {
        rw(
            &mut f,
            op::READ,
            200 + i,
            i * 8,
            &[seg(16 + i as u32, 0, 7)],
        );
    }
    rw(&mut f, op::FLUSH_DISKCACHE, 300, 0, &[]);
    let rs = collect(&mut f, 18);
    assert!(rs.iter().all(|r| r.status == status::OKAY), "{rs:?}");
    let pos = |id| rs.iter().position(|r| r.id == id).unwrap();
    for i in 0..8 {
        assert!(pos(i) < pos(100), "write {i} answered after the barrier");
        assert!(
            pos(200 + i) > pos(100),
            "read {i} answered before the barrier"
        );
        assert!(pos(200 + i) < pos(300), "read {i} answered after the flush");
    }
    for i in 0..8u64 {
        let mut b = [0u8; 4096];
        f.read_mem((16 + i as usize) * 4096, &mut b);
        assert_eq!(b, [i as u8 + 1; 4096], "read {i} saw stale data");
    }
    let s = r.td.stats(r.minor).unwrap();
    assert_eq!(s["ring"]["flush"]["requests"], 2);
}

#[test]
fn discard_reads_back_zeroes() {
    let r = rig(VbdSettings::default());
    let mut f = fe(&r, Abi::X86_64);
    f.write_mem(0, &[0x77; 4096]);
    rw(&mut f, op::WRITE, 1, 16, &[seg(0, 0, 7)]);
    collect(&mut f, 1);
    assert!(f.queue(&FrontRequest::Discard {
        id: 2,
        sector: 16,
        nr_sectors: 8,
        secure: false
    }));
    assert_eq!(collect(&mut f, 1)[0].status, status::OKAY);
    rw(&mut f, op::READ, 3, 16, &[seg(1, 0, 7)]);
    assert_eq!(collect(&mut f, 1)[0].status, status::OKAY);
    let mut b = [1u8; 4096];
    f.read_mem(4096, &mut b);
    assert_eq!(b, [0u8; 4096]);
}

#[test]
fn silent_peers_on_the_device_socket_block_nobody_and_are_dropped() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let r = rig(VbdSettings::default());
    // Peers that connect and never send their attach message.
    let mut silent: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&r.device).unwrap())
        .collect();
    let t0 = std::time::Instant::now();
    // A real frontend attaches and is served meanwhile.
    let mut f = fe(&r, Abi::X86_64);
    still_serving(&mut f);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "attach waited {:?} behind silent peers",
        t0.elapsed()
    );
    // Each silent peer is disconnected by tapdisk's attach timeout (5 s), not left open.
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = Vec::new();
        let _ = s.read_to_end(&mut b);
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
        "silent peers dropped after {waited:?}"
    );
    still_serving(&mut f);
    assert!(r.td.stats(r.minor).is_ok());
}

#[test]
fn peers_beyond_the_ring_limit_are_closed_at_once() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let r = rig(VbdSettings::default());
    let max = tapdisk::vbd::rings::MAX_RINGS;
    // `max` peers in their handshake hold every ring the VBD serves.
    let t0 = std::time::Instant::now();
    let silent: Vec<UnixStream> = (0..max)
        .map(|_| UnixStream::connect(&r.device).unwrap())
        .collect();
    // The next one is closed at once, not after the 5 s attach timeout.
    let mut extra = UnixStream::connect(&r.device).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = Vec::new();
    let n = extra.read_to_end(&mut b);
    assert!(matches!(n, Ok(0)), "{n:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "refused after {:?}",
        t0.elapsed()
    );
    // A frontend trying now is refused with an error, not left hanging.
    let refused = LocalFrontend::connect(
        &r.device,
        FrontendConfig {
            ring_order: 0,
            mem_pages: 8,
            ..Default::default()
        },
    );
    assert!(refused.is_err());
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the refusal took {:?}",
        t0.elapsed()
    );
    // Once the silent peers are dropped by the attach timeout, frontends attach again.
    drop(silent);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut f = loop {
        match LocalFrontend::connect(
            &r.device,
            FrontendConfig {
                ring_order: 0,
                mem_pages: 64,
                ..Default::default()
            },
        ) {
            Ok(f) => break f,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("no ring attaches after the silent peers left: {e}"),
        }
    };
    still_serving(&mut f);
}

/// A memory figure of `pid` from /proc/PID/status ("VmRSS", "VmData"), in KiB.
fn vm_kib(pid: u32, what: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(what)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn rings_attaching_in_a_loop_keep_their_counts_in_bounded_memory() {
    use tapdisk_control::proto::{Command as Ctl, Reply, TraceFormat};
    // Traces on, so each ring also has a trace buffer of 4096 records.
    let r = rig(VbdSettings {
        trace: 4096,
        ..Default::default()
    });
    let cycle = |n: usize| {
        for _ in 0..n {
            let mut f = fe(&r, Abi::X86_64);
            still_serving(&mut f);
        }
    };
    let settle = || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let s = r.td.stats(r.minor).unwrap();
            if s["rings"] == 0 || std::time::Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    cycle(100);
    settle();
    let before = (vm_kib(r.td.pid, "VmRSS"), vm_kib(r.td.pid, "VmData"));
    cycle(300);
    let s = settle();
    let after = (vm_kib(r.td.pid, "VmRSS"), vm_kib(r.td.pid, "VmData"));
    eprintln!("RSS, data: {before:?} KiB -> {after:?} KiB");
    // Every ring is counted, and its requests are in the totals after it is gone.
    assert_eq!(s["rings"], 0, "{s}");
    assert_eq!(s["rings_total"], 400, "{s}");
    assert_eq!(s["ring"]["read"]["requests"], 400, "{s}");
    assert_eq!(s["ring"]["latency"]["count"], 400, "{s}");
    // Only the last few finished rings' traces are kept.
    let path = r._dir.path().join("trace.json");
    let reply =
        r.td.client()
            .unwrap()
            .call(Ctl::Trace {
                minor: r.minor,
                path: path.display().to_string(),
                format: TraceFormat::Raw,
            })
            .unwrap();
    match reply {
        Reply::Trace { requests, .. } => assert!(requests <= 8, "{requests} traced requests"),
        other => panic!("{other:?}"),
    }
    // Kept whole (counters and trace buffers), 300 rings grew tapdisk by about 110 MiB here;
    // retired, by under 1 MiB.
    assert!(
        after.0 < before.0 + 4 * 1024 && after.1 < before.1 + 48 * 1024,
        "(RSS, data) grew from {before:?} KiB to {after:?} KiB over 300 rings"
    );
}

#[test]
fn kick_storms_cost_their_own_ring_wakeups_only() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let r = rig(VbdSettings::default());
    let mut stormy = fe(&r, Abi::X86_64);
    let mut calm = fe(&r, Abi::X86_64);
    // A thread kicks the stormy ring's eventfd as fast as it can, for the whole test.
    let kick = stormy.kick_handle().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let kicks = Arc::new(AtomicU64::new(0));
    let storm = {
        let (stop, kicks) = (stop.clone(), kicks.clone());
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let one = 1u64.to_ne_bytes();
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: writes 8 bytes from a live buffer to an eventfd this thread owns.
                if unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), 8) } == 8 {
                    kicks.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    // Both rings keep serving while it goes on: the other ring, and the kicked one itself.
    let t0 = std::time::Instant::now();
    for i in 0..300u64 {
        rw(&mut calm, op::READ, i, i * 8, &[seg(0, 0, 7)]);
        assert_eq!(status_of(&collect(&mut calm, 1), i), status::OKAY);
        if i % 10 == 0 {
            still_serving(&mut stormy);
        }
    }
    let served = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    storm.join().unwrap();
    let kicks = kicks.load(Ordering::Relaxed);
    assert!(kicks > 10_000, "only {kicks} kicks");
    assert!(
        served < Duration::from_secs(20),
        "330 requests took {served:?} during a storm of {kicks} kicks"
    );
    let s = r.td.stats(r.minor).unwrap();
    assert_eq!(s["rings"], 2, "{s}");
    assert_eq!(s["ring"]["bad_requests"], 0, "{s}");
    eprintln!("{kicks} kicks; 330 requests served in {served:?}");
}

/// Not a test on its own: the scribbler process of
/// `slots_rewritten_while_tapdisk_copies_them_reach_nothing_unchecked`, run by it as a child of
/// this test binary. Maps the ring memfd it inherited as descriptor `SCRIBBLE_FD` and rewrites
/// its request slots with random words until killed.
#[test]
#[ignore = "helper process of another test"]
fn scribble_helper() {
    let Some(fd) = std::env::var("SCRIBBLE_FD")
        .ok()
        .and_then(|v| v.parse::<std::os::fd::RawFd>().ok())
    else {
        return;
    };
    // SAFETY: the parent left this descriptor open across exec for us alone, and nothing else
    // in this process owns or closes it.
    let f = std::fs::File::from(unsafe {
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    let len = f.metadata().unwrap().len().min(4096) as usize;
    use std::os::fd::AsRawFd;
    // SAFETY: maps `len` bytes of a shared memfd we opened; the result is checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let words = p.cast::<u64>();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    loop {
        // xorshift64: cheap random words and slots.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Words 8.. are the slots (the first 64 bytes are the indexes, left alone).
        let i = 8 + (x as usize >> 32) % (len / 8 - 8);
        // Mostly small changes of a live request (id, sector, segment fields), sometimes noise.
        let v = if x & 3 == 0 { x } else { x & 0xffff };
        // SAFETY: `i < len / 8`, inside the mapping; volatile so each store happens.
        unsafe { words.add(i).write_volatile(v) };
    }
}

#[test]
fn slots_rewritten_while_tapdisk_copies_them_reach_nothing_unchecked() {
    let r = rig(VbdSettings::default());
    let img_len = |r: &Rig| {
        let spec = r.td.stats(r.minor).unwrap()["image"]
            .as_str()
            .unwrap()
            .to_owned();
        std::fs::metadata(spec.trim_start_matches("aio:"))
            .unwrap()
            .len()
    };
    let size = img_len(&r);
    let mut calm = fe(&r, Abi::X86_64);
    let mut popped = 0u64;
    for round in 0..3u64 {
        let mut f = fe(&r, Abi::X86_64);
        // The ring's memfd, left open across exec (the clone is close-on-exec) for the child.
        let ring = f.ring_handle().unwrap();
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&ring),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "scribble_helper", "--ignored", "--nocapture"])
            .env(
                "SCRIBBLE_FD",
                std::os::fd::AsRawFd::as_raw_fd(&ring).to_string(),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Valid writes and reads inside the disk, as fast as the ring takes them, while the
        // other process rewrites the slots under tapdisk's copy.
        let t0 = std::time::Instant::now();
        let mut id = round << 32;
        while t0.elapsed() < Duration::from_secs(1) && !f.disconnected() {
            for _ in 0..8 {
                id += 1;
                let opc = if id % 2 == 0 { op::WRITE } else { op::READ };
                if !f.queue(&FrontRequest::Rw {
                    op: opc,
                    id,
                    sector: (id * 8) % 8000,
                    segments: &[seg((id % 64) as u32, 0, 7)],
                }) {
                    break;
                }
            }
            if f.push().is_err() {
                break;
            }
            let _ = f.wait(Some(Duration::from_millis(20)));
            f.poll(|_| popped += 1);
        }
        let _ = child.kill();
        let _ = child.wait();
        // tapdisk is alive, the other ring is served, and nothing reached past the disk.
        still_serving(&mut calm);
        assert_eq!(img_len(&r), size, "an IO went past the end of the disk");
    }
    let s = r.td.stats(r.minor).unwrap();
    eprintln!(
        "{popped} responses seen; tapdisk: {} reads, {} writes, {} bad, {} unsupported",
        s["ring"]["read"]["requests"],
        s["ring"]["write"]["requests"],
        s["ring"]["bad_requests"],
        s["ring"]["unsupported"]
    );
    assert!(popped > 100, "the race hardly ran: {popped} responses");
    let refused =
        s["ring"]["bad_requests"].as_u64().unwrap() + s["ring"]["unsupported"].as_u64().unwrap();
    assert!(refused > 0, "the scribbler never reached the slots: {s}");
}
