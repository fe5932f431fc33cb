//! The slot policy against a live server: the handshake's deadline is for the whole phase,
//! and a full export makes room for a newcomer at the expense of a client stalled in its
//! handshake or idle, never of one that uses its connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::super::proto::*;
use super::super::*;
use super::*;

/// Whether the server has hung up on `s` (a read sees end of file or a reset; a write fails).
fn hung_up(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Clients that trickle their handshake a byte at a time, loop on options reading the
/// replies, or loop on options without reading them (so the server's writes block) each
/// lose their connection at the handshake deadline, counted from the accept; none of their
/// reads or writes ever waits long enough for a per-read timeout.
#[test]
fn trickling_and_looping_clients_lose_their_slot_at_the_handshake_deadline() {
    let fx = Fixture::new(MIB, false);
    let start = Instant::now();
    let mut threads = Vec::new();
    for kind in ["trickle", "loop", "deaf loop"] {
        let sock = fx.sock.clone();
        threads.push(std::thread::spawn(move || {
            let mut s = UnixStream::connect(&sock).unwrap();
            let accepted = Instant::now();
            s.set_write_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut c = Raw::new(s.try_clone().unwrap());
            c.greeting();
            c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
            let mut opt = IHAVEOPT.to_be_bytes().to_vec();
            opt.extend_from_slice(&OPT_LIST.to_be_bytes());
            opt.extend_from_slice(&0u32.to_be_bytes());
            let mut i = 0;
            let ended = loop {
                assert!(
                    accepted.elapsed() < HANDSHAKE_DEADLINE * 3,
                    "{kind}: still connected after {:?}",
                    accepted.elapsed()
                );
                let sent = match kind {
                    "trickle" => {
                        std::thread::sleep(Duration::from_millis(150));
                        i += 1;
                        s.write_all(&opt[i % opt.len()..][..1])
                    }
                    _ => s.write_all(&opt),
                };
                match sent {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break accepted.elapsed(),
                }
                if kind == "loop" {
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut h = [0u8; 20];
                    if s.read_exact(&mut h).is_err() {
                        break accepted.elapsed();
                    }
                    let len = be32(&h[16..20]) as usize;
                    let mut d = vec![0u8; len];
                    if s.read_exact(&mut d).is_err() {
                        break accepted.elapsed();
                    }
                } else if hung_up(&mut s) {
                    break accepted.elapsed();
                }
            };
            (kind, ended)
        }));
    }
    for t in threads {
        let (kind, ended) = t.join().unwrap();
        assert!(
            ended >= HANDSHAKE_DEADLINE - Duration::from_millis(50)
                && ended < HANDSHAKE_DEADLINE + Duration::from_secs(1),
            "{kind}: hung up on after {ended:?}"
        );
    }
    wait_for("no clients left", || fx.server().connections() == 0);
    assert!(start.elapsed() < HANDSHAKE_DEADLINE * 2);
    assert_alive(&fx.sock);
}

/// When the greeting of a client that connected at `connected` arrives (its slot), or None
/// if not within `limit`.
fn greeted(s: &mut UnixStream, connected: Instant, limit: Duration) -> Option<Duration> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut g = [0u8; 18];
    match s.read_exact(&mut g) {
        Ok(()) => Some(connected.elapsed()),
        Err(_) => None,
    }
}

/// Every slot held by clients stalled in their handshake: a newcomer waits in line (no
/// greeting) while they are within their grace, then gets the slot of the one stalled
/// longest. Every slot held by clients in transmission: a newcomer waits while they are
/// active, then gets the slot of the one idle longest, never of one that uses its connection.
#[test]
fn a_full_export_makes_room_for_a_newcomer() {
    let fx = Fixture::new(MIB, false);
    let mut stalled: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let s = UnixStream::connect(&fx.sock).unwrap();
            std::thread::sleep(Duration::from_millis(1));
            s
        })
        .collect();
    wait_for("every slot taken", || {
        fx.server().connections() == MAX_CONNECTIONS
    });
    let t = Instant::now();
    let mut newcomer = UnixStream::connect(&fx.sock).unwrap();
    let after = greeted(&mut newcomer, t, Duration::from_secs(2)).expect("no slot for a newcomer");
    assert!(
        after >= HANDSHAKE_GRACE - Duration::from_millis(100)
            && after < HANDSHAKE_GRACE + Duration::from_millis(600),
        "greeted after {after:?}"
    );
    let mut c = Raw::new(newcomer);
    c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go(b"").unwrap();
    c.write(1, 0, &[7u8; 4096], 0);
    assert_eq!(c.reply(1), 0);
    assert!(
        hung_up(&mut stalled[0]),
        "the oldest stalled client keeps its slot"
    );
    assert!(stalled[1..].iter_mut().all(|s| !hung_up(s)));
    assert_eq!(fx.server().connections(), MAX_CONNECTIONS);
    c.disconnect();
    drop(stalled);
    wait_for("slots free", || fx.server().connections() == 0);

    let mut ready: Vec<Raw<UnixStream>> = (0..MAX_CONNECTIONS)
        .map(|_| Raw::ready(&fx.sock).0)
        .collect();
    let idle_since = Instant::now();
    let t = Instant::now();
    let mut newcomer = UnixStream::connect(&fx.sock).unwrap();
    // All but the first use their connection while the newcomer waits; the first, idle,
    // gives its slot to the newcomer once it has been idle for IDLE_EVICT.
    let mut round = 0u64;
    let after = loop {
        for (i, c) in ready.iter_mut().enumerate().skip(1) {
            assert_eq!(c.read(round * 100 + i as u64, 0, 4096), vec![7u8; 4096]);
        }
        round += 1;
        if let Some(a) = greeted(&mut newcomer, t, Duration::from_millis(100)) {
            break a;
        }
        assert!(t.elapsed() < IDLE_EVICT * 3, "no slot for a newcomer");
    };
    let idle_for = idle_since.elapsed();
    assert!(
        after >= IDLE_EVICT - Duration::from_millis(200) && idle_for < IDLE_EVICT * 2,
        "greeted after {after:?}"
    );
    let mut c = Raw::new(newcomer);
    c.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go(b"").unwrap();
    assert_eq!(c.read(1, 0, 512), vec![7u8; 512]);
    assert!(hung_up(&mut ready[0].s), "the idle client keeps its slot");
    for (i, r) in ready.iter_mut().enumerate().skip(1) {
        assert_eq!(r.read(10_000 + i as u64, 0, 512), vec![7u8; 512]);
    }
    c.disconnect();
    for r in ready.into_iter().skip(1) {
        r.disconnect();
    }
    wait_for("slots free", || fx.server().connections() == 0);
}
