//! 64 misbehaving NBD clients beside a well-behaved one, against a real tapdisk: clients that
//! trickle their handshake a byte a second, loop on option negotiation (reading the replies,
//! or not reading them so the server's writes block), connect and say nothing, or finish the
//! handshake and then sit idle. Each comes back at once whenever it is cut off. The
//! well-behaved client connects every half second, writes and reads back a block: it must
//! never wait for its slot longer than the documented bound (`tapdisk::nbd::IDLE_EVICT` plus
//! the accept thread's check interval), and every one of its requests must succeed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tapdisk::nbd::slots::CHECK_EVERY;
use tapdisk::nbd::{IDLE_EVICT, MAX_CONNECTIONS};
use tapdisk_control::{NbdListen, VbdSettings};
use tapdisk_e2e::nbd::{Client, CLIENT_FLAGS, OPT_INFO, OPT_LIST};
use tapdisk_e2e::*;

const SOAK: Duration = Duration::from_secs(40);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Trickle,
    Loop,
    DeafLoop,
    Silent,
    IdleInTransmission,
}

/// One misbehaving client, reconnecting whenever it is cut off, until `stop`.
fn misbehave(sock: PathBuf, kind: Kind, stop: Arc<AtomicBool>, cut: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        let _ = misbehave_once(&sock, kind, &stop);
        cut.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One connection of a misbehaving client, until the server hangs up (an error) or `stop`.
fn misbehave_once(sock: &Path, kind: Kind, stop: &AtomicBool) -> std::io::Result<()> {
    let mut c = Client::raw(sock, Duration::from_secs(60))?;
    let running = || !stop.load(Ordering::Relaxed);
    match kind {
        Kind::Silent => {
            c.s.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut b = [0u8; 64];
            while running() {
                match c.s.read(&mut b) {
                    Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Kind::Trickle => {
            c.greeting()?;
            let mut bytes = CLIENT_FLAGS.to_be_bytes().to_vec();
            bytes.extend_from_slice(&tapdisk_e2e::nbd::IHAVEOPT.to_be_bytes());
            let mut i = 0;
            while running() {
                c.s.write_all(&bytes[i % bytes.len()..][..1])?;
                i += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Kind::Loop => {
            c.greeting()?;
            c.s.write_all(&CLIENT_FLAGS.to_be_bytes())?;
            while running() {
                c.option(OPT_LIST, b"")?;
                c.option_replies()?;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Kind::DeafLoop => {
            c.greeting()?;
            c.s.write_all(&CLIENT_FLAGS.to_be_bytes())?;
            c.s.set_write_timeout(Some(Duration::from_millis(500)))?;
            // OPT_INFO for the default export, no info requests: answered with a few KiB
            // over time, never read.
            let info = [0u8; 6];
            while running() {
                match c.option(OPT_INFO, &info) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Kind::IdleInTransmission => {
            let mut c = Client::connect(sock, Duration::from_secs(60))?;
            c.s.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut b = [0u8; 64];
            while running() {
                match c.s.read(&mut b) {
                    Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

#[test]
fn sixty_four_misbehaving_clients_never_lock_a_good_one_out() {
    let dir = tempfile::tempdir().unwrap();
    let (_idir, img) = image(64 << 20).unwrap();
    // Info, not debug: the looping clients would log thousands of lines a second.
    let td = Tapdisk::start_with(&dir.path().join("run"), &["--log-level", "info"]).unwrap();
    let sock = dir.path().join("nbd.sock");
    td.open(
        &format!("aio:{}", img.display()),
        VbdSettings {
            nbd: Some(NbdListen::Unix(sock.clone())),
            ..VbdSettings::default()
        },
    )
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let cut = Arc::new(AtomicU64::new(0));
    let kinds = [
        (Kind::Trickle, 16),
        (Kind::Loop, 16),
        (Kind::DeafLoop, 16),
        (Kind::Silent, 8),
        (Kind::IdleInTransmission, 8),
    ];
    let mut threads = Vec::new();
    for (kind, n) in kinds {
        for _ in 0..n {
            let (sock, stop, cut) = (sock.clone(), stop.clone(), cut.clone());
            threads.push(std::thread::spawn(move || misbehave(sock, kind, stop, cut)));
        }
    }
    assert_eq!(threads.len(), MAX_CONNECTIONS);
    // Let them take every slot first.
    std::thread::sleep(Duration::from_secs(2));

    let bound = IDLE_EVICT + CHECK_EVERY + Duration::from_secs(1);
    let start = Instant::now();
    let mut waits = Vec::new();
    let mut round = 0u64;
    while start.elapsed() < SOAK {
        let t = Instant::now();
        let mut c = Client::raw(&sock, Duration::from_secs(60)).unwrap();
        c.greeting().expect("the good client was refused");
        let waited = t.elapsed();
        waits.push(waited);
        c.s.write_all(&CLIENT_FLAGS.to_be_bytes()).unwrap();
        c.option(tapdisk_e2e::nbd::OPT_EXPORT_NAME, b"").unwrap();
        let mut b = [0u8; 10];
        c.s.read_exact(&mut b).unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| (i as u64 ^ round) as u8).collect();
        let at = (round % 1024) * 4096;
        c.write(at, &data).unwrap();
        assert_eq!(c.read(at, 4096).unwrap(), data);
        c.disconnect().unwrap();
        assert!(
            waited <= bound,
            "round {round}: the good client waited {waited:?} for its slot (bound {bound:?})"
        );
        round += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    let stats = td.stats(0).unwrap();
    for t in threads {
        t.join().unwrap();
    }
    let max = waits.iter().max().copied().unwrap_or_default();
    let mean = waits.iter().sum::<Duration>() / waits.len().max(1) as u32;
    println!(
        "good client: {} rounds, slot wait mean {mean:?}, max {max:?} (bound {bound:?}); \
         misbehaving connections cut off: {}; nbd stats: {}",
        waits.len(),
        cut.load(Ordering::Relaxed),
        stats["nbd"]
    );
    assert!(waits.len() >= 20, "only {} rounds", waits.len());
    assert!(
        cut.load(Ordering::Relaxed) >= 64,
        "the misbehaving clients were not cut off"
    );
}
