//! The extent master under crashes: `stripe-master` is killed (SIGKILL) and restarted over
//! and over while clients allocate disks, retrying as ONC RPC's at-least-once semantics have
//! them do. No extent may end up with two disks, and every answer a client got must still be
//! what the master holds afterwards.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stripe::proto::{AllocArgs, RegisterArgs};
use stripe::MasterClient;
use tapdisk_e2e::{assert_holder_named, bin};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_master(state: &Path, port: u16) -> Child {
    let c = Command::new(bin("stripe-master"))
        .arg("serve")
        .arg("--state")
        .arg(state)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--extent-size")
        .arg("1M")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting stripe-master");
    c
}

#[test]
fn restarting_the_master_during_allocation_never_gives_an_extent_to_two_disks() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let mut master = start_master(&state, port);
    let addr = format!("127.0.0.1:{port}");
    let mut c = MasterClient::new(&addr);
    // Four servers of 200 extents each: room for everything the clients ask.
    for s in 1..=4 {
        c.register(&RegisterArgs {
            portal: format!("10.9.0.{s}:3260"),
            target: format!("iqn.2026-11.test:srv{s}"),
            lun: 1,
            start: 0,
            count: 200,
        })
        .unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = MasterClient::new(&addr);
                c.retry_for = Duration::from_secs(20);
                c.attempt_timeout = Duration::from_secs(2);
                let mut got = Vec::new();
                let mut retried = 0;
                for k in 0..25u32 {
                    let a = AllocArgs {
                        disk: format!("c{t}-d{k}"),
                        first: 0,
                        count: 1 + k % 4,
                        replicas: 1 + k % 2,
                    };
                    let p = c.allocate(&a).expect("allocation failed");
                    assert_eq!(p.len() as u32, a.count * a.replicas);
                    retried += u32::from(c.last_attempts > 1);
                    // A second call (as a retry after a lost reply would be) answers the same.
                    if k % 5 == 0 {
                        assert_eq!(c.allocate(&a).unwrap(), p, "retried call differs");
                    }
                    got.push((a.disk, p));
                }
                (got, retried)
            })
        })
        .collect();

    // Kill and restart the master every 30-80 ms while they work.
    let killer = {
        let stop = stop.clone();
        let state = state.clone();
        std::thread::spawn(move || {
            let mut kills = 0;
            let mut n = 7u64;
            while !stop.load(Ordering::Relaxed) {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                std::thread::sleep(Duration::from_millis(30 + (n >> 33) % 50));
                let _ = master.kill();
                let _ = master.wait();
                kills += 1;
                // A killed master's lock goes with it; the new one takes the folder over.
                master = start_master(&state, port);
            }
            (master, kills)
        })
    };

    let t0 = Instant::now();
    let mut answers: Vec<(String, Vec<stripe::proto::Placement>)> = Vec::new();
    let mut retried = 0;
    for h in clients {
        let (g, r) = h.join().expect("client thread");
        answers.extend(g);
        retried += r;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut master, kills) = killer.join().unwrap();
    eprintln!(
        "{} disks allocated in {:.1} s across {kills} master kills; {retried} calls needed a retry",
        answers.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(kills >= 3, "the master was killed only {kills} times");

    // No extent went to two disks.
    let mut owner_of: HashMap<u64, (String, u32, u32)> = HashMap::new();
    for (disk, ps) in &answers {
        for p in ps {
            let o = (disk.clone(), p.index, p.replica);
            if let Some(prev) = owner_of.insert(p.extent.id, o.clone()) {
                panic!("extent {} handed to {prev:?} and to {o:?}", p.extent.id);
            }
        }
    }
    // What the clients were told is what the master holds, after one more restart.
    let _ = master.kill();
    let _ = master.wait();
    let mut master = start_master(&state, port);
    let mut c = MasterClient::new(&addr);
    let l = c.list().unwrap();
    let held: HashMap<u64, (String, u32, u32)> = l
        .extents
        .iter()
        .filter_map(|x| x.owner.clone().map(|o| (x.extent.id, o)))
        .collect();
    assert_eq!(
        held, owner_of,
        "the master's state differs from its answers"
    );
    let _ = master.kill();
    let _ = master.wait();
}

#[test]
fn a_second_master_on_the_same_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let mut m = start_master(&state, port);
    let mut c = MasterClient::new(&format!("127.0.0.1:{port}"));
    c.ping().unwrap();
    let out = Command::new(bin("stripe-master"))
        .arg("serve")
        .arg("--state")
        .arg(&state)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.starts_with("stripe-master: "), "{err}");
    assert_holder_named(&err, &state.join("lock"), m.id());
    let _ = m.kill();
    let _ = m.wait();
}

#[test]
fn connections_beyond_the_limit_are_closed_and_slots_come_back() {
    use std::io::Read;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut m = start_master(&dir.path().join("state"), port);
    let addr = format!("127.0.0.1:{port}");
    MasterClient::new(&addr).ping().unwrap();
    // 64 idle peers (the master's limit) hold every slot. The master counts a connection once
    // its accept loop has seen it, and gives the ping's slot back only when that connection's
    // thread has seen it close: a peer that came in before that was refused (closed at once),
    // so replace refused peers until 64 are held.
    let closed = |s: &TcpStream| -> bool {
        s.set_nonblocking(true).unwrap();
        let r = s.peek(&mut [0u8; 1]);
        s.set_nonblocking(false).unwrap();
        !matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    };
    let mut idle: Vec<TcpStream> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Two looks in a row with none refused: the accept loop has seen every peer.
    let mut steady = 0;
    while steady < 2 {
        while idle.len() < 64 {
            idle.push(TcpStream::connect(&addr).unwrap());
        }
        std::thread::sleep(Duration::from_millis(500));
        let before = idle.len();
        idle.retain(|s| !closed(s));
        steady = if idle.len() == before { steady + 1 } else { 0 };
        assert!(Instant::now() < deadline, "the master never held 64 peers");
    }
    let t0 = Instant::now();
    let mut extra = TcpStream::connect(&addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = Vec::new();
    assert!(matches!(extra.read_to_end(&mut b), Ok(0)));
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // One peer leaves: its slot comes back.
    drop(idle.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    while MasterClient::new(&addr).ping().is_err() {
        assert!(Instant::now() < deadline, "no slot came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(idle);
    let _ = m.kill();
    let _ = m.wait();
}

/// A master on a fresh state folder with four fake servers of 20 extents of 1 MiB.
fn master_with_servers(dir: &Path) -> (Child, String) {
    let port = free_port();
    let m = start_master(&dir.join("state"), port);
    let addr = format!("127.0.0.1:{port}");
    let mut c = MasterClient::new(&addr);
    for s in 1..=4 {
        c.register(&RegisterArgs {
            portal: format!("10.9.0.{s}:3260"),
            target: format!("iqn.2026-11.test:srv{s}"),
            lun: 1,
            start: 0,
            count: 20,
        })
        .unwrap();
    }
    (m, addr)
}

fn allocated(addr: &str) -> usize {
    MasterClient::new(addr)
        .list()
        .unwrap()
        .extents
        .iter()
        .filter(|x| x.owner.is_some())
        .count()
}

#[test]
fn stripe_img_create_checks_arguments_before_the_master() {
    let dir = tempfile::tempdir().unwrap();
    // Nobody listens on this port: a bad argument must still be named at once, not after
    // 30 s of retries.
    let nobody = format!("127.0.0.1:{}", free_port());
    for (args, says) in [
        (vec!["--size", "1000"], "--size 1000"),
        (vec!["--size", "8M", "--stripes", "0"], "--stripes 0"),
        (
            vec!["--size", "8M", "--stripe-size", "1000"],
            "--stripe-size 1000",
        ),
        (vec!["--size", "8M", "--replicas", "9"], "--replicas 9"),
        (vec!["--size", "8M", "--disk-id", "has space"], "--disk-id"),
    ] {
        let t0 = Instant::now();
        let out = Command::new(bin("stripe-img"))
            .args(["create", "--master", &nobody])
            .args(&args)
            .arg("-o")
            .arg(dir.path().join("x.map"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{args:?} took {:?}",
            t0.elapsed()
        );
    }
    // An output folder that does not exist is found before the master is asked.
    let out = Command::new(bin("stripe-img"))
        .args(["create", "--master", &nobody, "--size", "8M", "-o"])
        .arg(dir.path().join("no/such/dir/x.map"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot write the mapping file"), "{err}");
    // (An unreachable master is named in words after its retries: `stripe::client`'s tests.)
}

#[test]
fn stripe_img_create_gives_extents_back_when_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, addr) = master_with_servers(dir.path());
    // A file name the folder takes, whose temporary sibling (".NAME.tmpPID") is too long: the
    // mapping file cannot be written after the extents were allocated.
    let long = "d".repeat(250);
    let out = Command::new(bin("stripe-img"))
        .args([
            "create",
            "--master",
            &addr,
            "--size",
            "8M",
            "--stripe-size",
            "64k",
        ])
        .args(["--replicas", "2", "--disk-id", "vm-fail", "-o"])
        .arg(dir.path().join(&long))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("vm-fail") && err.contains("given back"),
        "the failure names neither the disk nor its extents: {err}"
    );
    assert_eq!(allocated(&addr), 0, "extents left allocated: {err}");
    // A disk that existed before keeps its extents when a create of it fails.
    let ok = Command::new(bin("stripe-img"))
        .args([
            "create",
            "--master",
            &addr,
            "--size",
            "8M",
            "--disk-id",
            "vm-keep",
            "-o",
        ])
        .arg(dir.path().join("keep.map"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out_text = String::from_utf8_lossy(&ok.stdout);
    assert!(out_text.contains("allocated at master"), "{out_text}");
    let before = allocated(&addr);
    let out = Command::new(bin("stripe-img"))
        .args([
            "create",
            "--master",
            &addr,
            "--size",
            "8M",
            "--disk-id",
            "vm-keep",
            "-o",
        ])
        .arg(dir.path().join(&long))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("left allocated"),
        "{err}"
    );
    assert_eq!(allocated(&addr), before);
    let _ = m.kill();
    let _ = m.wait();
}
