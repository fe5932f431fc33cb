//! Early read return against a real tapdisk, with a frontend in early-read mode (its read
//! pages unmapped until filled, through a real userfaultfd):
//!
//! - reads answered before any data is in read back right, byte for byte, even when the
//!   reader touches every page at once (td-bench verify, percent=0);
//! - a reader stalled on an unfilled page is woken, and told, when tapdisk is killed: it
//!   neither hangs nor goes on with unfilled data unknowing;
//! - a chunk that fails after the read was answered: the reader is told, and the pages hold
//!   poison, not stale data;
//! - td-bench err: answered early, zero wrong pages;
//! - the cache serves repeated reads without the disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkif::early::{EarlyReadError, POISON};
use blkif::local::{FrontRequest, FrontendConfig, LocalFrontend};
use blkif::protocol::{op, status};
use blkif::Segment;
use tapdisk_control::VbdSettings;
use tapdisk_e2e::*;

const T: Option<Duration> = Some(Duration::from_secs(20));

fn segs(first: u32, n: u32) -> Vec<Segment> {
    (first..first + n)
        .map(|g| Segment {
            gref: g,
            first_sect: 0,
            last_sect: 7,
            pad: 0,
        })
        .collect()
}

fn early_fe(device: &str, mem_pages: u32) -> LocalFrontend {
    LocalFrontend::connect(
        device.as_ref(),
        FrontendConfig {
            mem_pages,
            early_read: true,
            ..Default::default()
        },
    )
    .expect("early-read mode needs userfaultfd with minor shmem faults (Linux 5.13+, root)")
}

fn read(fe: &mut LocalFrontend, id: u64, sector: u64, s: &[Segment], ind: u32) {
    assert!(fe.queue(&FrontRequest::Indirect {
        op: op::READ,
        id,
        sector,
        indirect: &[ind],
        segments: s,
    }));
    fe.push().unwrap();
}

fn response(fe: &mut LocalFrontend) -> blkif::Response {
    let mut got = None;
    while got.is_none() {
        assert!(fe.wait(T).unwrap(), "no response");
        fe.poll(|r| got = Some(r));
    }
    got.unwrap()
}

/// An 8 MiB image whose first 64 KiB hold a pattern (byte `i` is `i / step`); the pattern.
fn patterned_image(step: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let (d, img) = image(8 << 20).unwrap();
    let pattern: Vec<u8> = (0..64 * 1024).map(|i| (i / step) as u8).collect();
    let mut v = pattern.clone();
    v.resize(8 << 20, 0);
    std::fs::write(&img, v).unwrap();
    (d, img, pattern)
}

fn opts(policy: &str, model: &str) -> VbdSettings {
    VbdSettings {
        early: Some(policy.parse().unwrap()),
        model: Some(model.parse().unwrap()),
        ..Default::default()
    }
}

#[test]
fn verify_with_reads_answered_before_any_data() {
    // percent=0: every read of two pages or more is answered before its first chunk is in;
    // verify reads every page right after the response.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let out = std::process::Command::new(bin("td-bench"))
        .args(["verify", "--image"])
        .arg(&img)
        .args([
            "--size",
            "32M",
            "--requests",
            "3000",
            "--seed",
            "11",
            "--indirect-segments",
            "64",
            "--early-read",
            "percent=0,chunk=8,cache=8",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert_eq!(text.lines().last(), Some("3000 passed, 0 failed"));
}

#[test]
fn a_stalled_reader_learns_that_tapdisk_died() {
    let (_d, img) = image(8 << 20).unwrap();
    let td = Tapdisk::start().unwrap();
    // A very slow link: 64 KiB take 650 ms to arrive.
    let vbd = td
        .open(
            &format!("aio:{}", img.display()),
            opts("percent=0", "link:500000,1"),
        )
        .unwrap();
    let mut fe = early_fe(&vbd.device, 64);
    fe.write_mem(15 * 4096, &[0x11; 4096]);
    read(&mut fe, 7, 0, &segs(0, 16), 63);
    let r = response(&mut fe);
    assert_eq!((r.id, r.status), (7, status::OKAY), "answered early");
    // A reader touches the last page, which is not filled: it must stall.
    let addr = fe.mem_ptr().as_ptr() as usize + 15 * 4096;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            // SAFETY: guest memory stays mapped until `fe` is dropped, after the join.
            let v = unsafe { (addr as *const u8).read_volatile() };
            done.store(true, Ordering::SeqCst);
            v
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst), "the reader did not stall");
    let s = td.stats(vbd.minor).unwrap();
    assert_eq!(s["ring"]["early"]["answered_early"], 1);
    // Kill tapdisk with the reader stalled.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(td.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t0 = Instant::now();
    let v = reader.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "the reader hung");
    assert_eq!(v, POISON, "the reader saw stale data, not poison");
    assert!(matches!(
        fe.finish_read(7),
        Err(blkif::Error::EarlyRead(EarlyReadError::BackendGone(7)))
    ));
    assert!(fe.backend_gone());
}

#[test]
fn a_chunk_failing_after_the_answer_is_reported() {
    let (_d, img) = image(8 << 20).unwrap();
    let td = Tapdisk::start().unwrap();
    // 4 chunks of 16 KiB on a spindle that takes 150 ms per IO, one IO at a time: the image
    // shrinks under the read, so the later chunks hit the end of the file.
    let vbd = td
        .open(
            &format!("aio:{}", img.display()),
            opts("percent=0,chunk=16", "150000,0,0"),
        )
        .unwrap();
    let mut fe = early_fe(&vbd.device, 64);
    let last = (8 << 20) / 512 - 16 * 8;
    read(&mut fe, 9, last, &segs(0, 16), 63);
    let r = response(&mut fe);
    assert_eq!((r.id, r.status), (9, status::OKAY));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len((8 << 20) - 32 * 1024)
        .unwrap();
    assert!(matches!(
        fe.finish_read(9),
        Err(blkif::Error::EarlyRead(EarlyReadError::Failed(9)))
    ));
    let mut page = [0u8; 4096];
    fe.read_mem(15 * 4096, &mut page);
    assert!(
        page.iter().all(|&b| b == POISON),
        "a failed page is not poisoned"
    );
    let s = td.stats(vbd.minor).unwrap();
    assert_eq!(s["ring"]["early"]["late_failures"], 1);
    // The ring keeps serving.
    read(&mut fe, 10, 0, &segs(20, 4), 62);
    assert_eq!(response(&mut fe).status, status::OKAY);
    fe.finish_read(10).unwrap();
}

#[test]
fn the_cache_serves_repeated_reads() {
    let (_d, img, pattern) = patterned_image(7);
    let td = Tapdisk::start().unwrap();
    let vbd = td
        .open(
            &format!("aio:{}", img.display()),
            VbdSettings {
                early: Some("cache=4".parse().unwrap()),
                ..Default::default()
            },
        )
        .unwrap();
    let mut fe = early_fe(&vbd.device, 64);
    for id in 1..=3u64 {
        read(&mut fe, id, 0, &segs(0, 16), 63);
        assert_eq!(response(&mut fe).status, status::OKAY);
        fe.finish_read(id).unwrap();
        let mut got = vec![0u8; 64 * 1024];
        fe.read_mem(0, &mut got);
        assert!(got == pattern, "read {id} returned wrong data");
    }
    let e = &td.stats(vbd.minor).unwrap()["ring"]["early"];
    assert_eq!(e["cache_misses"], 16, "{e}");
    assert_eq!(e["cache_hits"], 32, "{e}");
    // A write through the ring invalidates: the next read goes to the disk again.
    fe.write_mem(0, &[0xEE; 4096]);
    assert!(fe.queue(&FrontRequest::Rw {
        op: op::WRITE,
        id: 4,
        sector: 8,
        segments: &segs(0, 1)
    }));
    fe.push().unwrap();
    assert_eq!(response(&mut fe).status, status::OKAY);
    read(&mut fe, 5, 0, &segs(0, 16), 63);
    assert_eq!(response(&mut fe).status, status::OKAY);
    fe.finish_read(5).unwrap();
    let mut p1 = [0u8; 4096];
    fe.read_mem(4096, &mut p1);
    assert_eq!(p1, [0xEE; 4096]);
    let e = &td.stats(vbd.minor).unwrap()["ring"]["early"];
    assert_eq!(e["cache_misses"], 17, "{e}");
}

#[test]
fn td_bench_err_answers_early_with_no_wrong_page() {
    let out = std::process::Command::new(bin("td-bench"))
        .args([
            "err",
            "percent=25",
            "--count",
            "10",
            "--size",
            "16M",
            "--model",
            "link:1000,200",
            "--json",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["policy"], "off");
    assert_eq!(rows[1]["early"]["answered_early"], 10);
    for r in &rows {
        assert_eq!(r["wrong_pages"], 0);
    }
}

#[test]
fn a_ring_without_the_contract_never_gets_early_answers() {
    // The VBD asks for answers before any data, but this frontend did not set up the early-read
    // contract (no userfaultfd: like every Xen frontend), so its reads are answered only when
    // every page is in.
    let (_d, img, pattern) = patterned_image(11);
    let td = Tapdisk::start().unwrap();
    let vbd = td
        .open(
            &format!("aio:{}", img.display()),
            opts("percent=0,chunk=16", "20000,0,0"),
        )
        .unwrap();
    let mut fe = LocalFrontend::connect(
        vbd.device.as_ref(),
        FrontendConfig {
            mem_pages: 64,
            ..Default::default()
        },
    )
    .unwrap();
    for id in 1..=3u64 {
        let t0 = Instant::now();
        read(&mut fe, id, 0, &segs(0, 16), 63);
        let r = response(&mut fe);
        assert_eq!((r.id, r.status), (id, status::OKAY));
        // The model disk takes 20 ms per IO: the answer waited for it.
        assert!(
            t0.elapsed() >= Duration::from_millis(18),
            "{:?}",
            t0.elapsed()
        );
        let mut got = vec![0u8; 64 * 1024];
        fe.read_mem(0, &mut got);
        assert!(got == pattern, "read {id}: wrong data");
    }
    let e = &td.stats(vbd.minor).unwrap()["ring"]["early"];
    assert_eq!(e["answered_early"], 0, "{e}");
}
