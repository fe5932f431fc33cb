//! Striped disks that span hosts: the extent master's state, each disk's record and its writer
//! lease in a 3-member etcd cluster the test starts on loopback.
//!
//! - Two stateless masters allocate through etcd while the etcd leader is killed again and
//!   again: every allocation completes, no extent has two owners.
//! - A tapdisk serves an etcd-backed 2-replica disk under td-bench verify while the leader is
//!   killed twice: no request fails.
//! - Hand-off between two "hosts" (network namespaces, each with its tapdisk): writes through
//!   the NBD export on A, A cut off from etcd (not from its storage), pause A, open on B with
//!   --takeover, the stale A unpaused by mistake keeps writing; its writes are refused by the
//!   targets (RESERVATION CONFLICT, counted) and are absent from the disk; every acknowledged write is there, read through B; both
//!   replicas are equal block by block.
//!
//! Needs etcd-server (every test), and root, tgt and iproute2 for the storage LAN; skipped with
//! a message where they are missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stripe::proto::{AllocArgs, RegisterArgs};
use stripe::MasterClient;
use tapdisk_e2e::etcd::{self, Cluster};
use tapdisk_e2e::lan::{self, Lan};
use tapdisk_e2e::nbd::Client as Nbd;
use tapdisk_e2e::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `stripe-master serve --etcd` process, killed on drop; its log is printed if the test
/// fails (a master that stops answering says why there).
struct Master(Child, String, tempfile::NamedTempFile);

impl Master {
    fn start(endpoints: &str, extent_size: &str) -> Master {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let log = tempfile::NamedTempFile::new().expect("a log file for the master");
        let child = Command::new(bin("stripe-master"))
            .args(["serve", "--etcd", endpoints, "--extent-size", extent_size])
            .args(["--listen", &addr])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                log.reopen().expect("reopening the master's log"),
            ))
            .spawn()
            .expect("starting stripe-master");
        let m = Master(child, addr.clone(), log);
        let t0 = Instant::now();
        let mut c = MasterClient::new(&addr);
        while c.reachable().is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "master did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.2.path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- stripe-master at {}, last lines of its log:", self.1);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn have_etcd() -> bool {
    if !etcd::available() {
        eprintln!(
            "skipped: needs etcd-server (apt-get install etcd-server; tests/run.sh installs it)"
        );
        return false;
    }
    true
}

/// Kills the etcd leader every `every` and starts it again half a period later, until `stop`.
fn leader_killer(
    cluster: Arc<Mutex<Cluster>>,
    stop: Arc<AtomicBool>,
    every: Duration,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut kills = 0;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(every / 2);
            let killed = cluster.lock().unwrap().kill_leader();
            let Ok(l) = killed else { continue };
            kills += 1;
            std::thread::sleep(every / 2);
            cluster
                .lock()
                .unwrap()
                .spawn(l)
                .expect("restarting an etcd member");
        }
        kills
    })
}

#[test]
fn two_masters_allocate_through_etcd_leader_kills() {
    if !have_etcd() {
        return;
    }
    let cluster = Cluster::start(3, &[]).expect("etcd cluster");
    let eps = cluster.endpoints();
    let (m1, m2) = (Master::start(&eps, "1M"), Master::start(&eps, "1M"));
    let mut c = MasterClient::new(&m1.1);
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
    let cluster = Arc::new(Mutex::new(cluster));
    let stop = Arc::new(AtomicBool::new(false));
    let killer = leader_killer(cluster.clone(), stop.clone(), Duration::from_millis(1500));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let addrs = [m1.1.clone(), m2.1.clone()];
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for k in 0..20u32 {
                    // Alternate masters: both serve the same state.
                    let mut c = MasterClient::new(&addrs[(k % 2) as usize]);
                    c.retry_for = Duration::from_secs(60);
                    let a = AllocArgs {
                        disk: format!("c{t}-d{k}"),
                        first: 0,
                        count: 1 + k % 4,
                        replicas: 1 + k % 2,
                    };
                    let p = c.allocate(&a).expect("allocation failed");
                    assert_eq!(p.len() as u32, a.count * a.replicas);
                    // The other master answers the same (a retried call).
                    let mut o = MasterClient::new(&addrs[((k + 1) % 2) as usize]);
                    o.retry_for = Duration::from_secs(60);
                    assert_eq!(o.allocate(&a).unwrap(), p, "masters disagree");
                    got.push((a.disk, p));
                }
                got
            })
        })
        .collect();
    let mut answers = Vec::new();
    for h in clients {
        answers.extend(h.join().expect("client thread"));
    }
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let kills = killer.join().unwrap();
    let list = MasterClient::new(&m2.1).list().unwrap();
    let mut owner: HashMap<u64, (String, u32, u32)> = HashMap::new();
    for x in &list.extents {
        if let Some(o) = &x.owner {
            owner.insert(x.extent.id, o.clone());
        }
    }
    let mut placed = 0;
    for (disk, ps) in &answers {
        for p in ps {
            placed += 1;
            assert_eq!(
                owner.get(&p.extent.id),
                Some(&(disk.clone(), p.index, p.replica)),
                "extent {} answered to {disk} is not held by it",
                p.extent.id
            );
        }
    }
    assert_eq!(owner.len(), placed, "extents allocated beyond the answers");
    eprintln!(
        "{} allocations ({placed} extents) through 2 masters in {:.1} s, etcd leader killed {kills} times",
        answers.len(),
        took.as_secs_f64()
    );
    assert!(kills >= 2, "the leader was killed only {kills} times");
}

/// The storage LAN, an etcd cluster (serving clients on loopback and on each host's link) and
/// a master over it with every server registered.
struct Rig {
    dir: tempfile::TempDir,
    lan: Lan,
    cluster: Arc<Mutex<Cluster>>,
    master: Master,
    eps: String,
}

fn rig(slot: u32, hosts: u32) -> Option<Rig> {
    if !have_etcd() {
        return None;
    }
    if !lan::available() {
        eprintln!("skipped: needs root, tgt and iproute2 for the storage LAN");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let lan = Lan::up(slot, 2, "none", "256M").expect("storage LAN up");
    let mut ips = Vec::new();
    for h in 1..=hosts {
        lan.host(h).expect("host namespace");
        ips.push(lan.host_peer_ip(h));
    }
    let cluster = Cluster::start(3, &ips).expect("etcd cluster");
    let eps = cluster.endpoints();
    let master = Master::start(&eps, "16M");
    lan::register_all(&master.1, 16 << 20, &lan.urls).expect("registering the servers");
    Some(Rig {
        dir,
        lan,
        cluster: Arc::new(Mutex::new(cluster)),
        master,
        eps,
    })
}

fn ok(cmd: &mut Command) -> String {
    let out = run_ok(cmd);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Rig {
    /// Creates an etcd-backed disk of 64 MiB; returns its id and the root namespace's map.
    fn create(&self, name: &str, replicas: u32) -> (String, PathBuf) {
        let map = self.dir.path().join(format!("{name}.map"));
        let out = ok(Command::new(bin("stripe-img"))
            .args(["create", "--master", &self.master.1, "--etcd", &self.eps])
            .args(["--size", "64M", "--stripes", "2", "--stripe-size", "64k"])
            .args(["--replicas", &replicas.to_string(), "--disk-id", name, "-o"])
            .arg(&map));
        assert!(out.contains("recorded disk"), "{out}");
        (name.to_owned(), map)
    }
}

#[test]
fn guest_io_rides_out_etcd_leader_kills() {
    let Some(r) = rig(6, 0) else {
        return;
    };
    let (_, map) = r.create("io", 2);
    let rundir = r.dir.path().join("run");
    let device = ok(tap_ctl(&rundir)
        .args(["create", "-a"])
        .arg(format!("stripe:{}", map.display())));
    let device = device.trim().to_owned();
    struct Destroy(PathBuf);
    impl Drop for Destroy {
        fn drop(&mut self) {
            let _ = tap_ctl(&self.0).args(["destroy", "-m", "0"]).output();
        }
    }
    let _d = Destroy(rundir.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let killer = leader_killer(r.cluster.clone(), stop.clone(), Duration::from_secs(4));
    // Writes spread over the whole disk, so regions keep being marked and cleared (etcd
    // transactions) while the leader changes.
    let out = Command::new(bin("td-bench"))
        .args([
            "verify",
            "--device",
            &device,
            "--duration",
            "14s",
            "--iodepth",
            "16",
        ])
        .output()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let kills = killer.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" passed, 0 failed"),
        "verify failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value =
        serde_json::from_str(&ok(tap_ctl(&rundir).args(["stats", "-m", "0"]))).unwrap();
    let ring = &s["ring"];
    let failed = ring["read"]["errors"].as_u64().unwrap()
        + ring["write"]["errors"].as_u64().unwrap()
        + ring["flush"]["errors"].as_u64().unwrap();
    let d = &s["driver"];
    eprintln!(
        "{}\netcd leader killed {kills} times; failed requests {failed}; intent {}; control {}",
        text.lines().last().unwrap_or(""),
        d["intent"],
        d["control"]
    );
    assert!(kills >= 2, "the leader was killed only {kills} times");
    assert_eq!(failed, 0, "{s}");
    assert_eq!(d["control"]["held"], true, "{s}");
    assert!(d["intent"]["records"].as_u64().unwrap() > 2, "{s}");
}

const BLOCK: u64 = 4096;
const WRITERS: u64 = 4;

/// One writer thread's blocks are those `b % WRITERS == t`; its writes are sequential, so the
/// last acknowledged one is what each of its blocks must hold.
fn content(block: u64, seq: u64, tag: u8) -> Vec<u8> {
    let mut b = vec![tag; BLOCK as usize];
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b
}

#[derive(Default)]
struct Log {
    /// block -> (seq, tag) of the last acknowledged write.
    acked: HashMap<u64, (u64, u8)>,
    /// Writes answered with an error: (block, seq, tag).
    failed: Vec<(u64, u64, u8)>,
}

/// Writers through `sock` until `stop` or the first error; `tag` marks their content.
fn write_load(
    sock: &Path,
    blocks: u64,
    tag: u8,
    seq0: u64,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..WRITERS)
        .map(|t| {
            let (sock, stop, log) = (sock.to_path_buf(), stop.clone(), log.clone());
            std::thread::spawn(move || {
                let Ok(mut c) = Nbd::connect(&sock, std::time::Duration::from_secs(60)) else {
                    return 0;
                };
                let mut x = (t + 1)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .wrapping_add(seq0)
                    | 1;
                let mut n = 0;
                let mut seq = seq0 + t;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = (x % (blocks / WRITERS)) * WRITERS + t;
                    seq += WRITERS;
                    let ok = c.write_acked(b * BLOCK, &content(b, seq, tag));
                    let mut l = log.lock().unwrap();
                    match ok {
                        Ok(true) => {
                            l.acked.insert(b, (seq, tag));
                            n += 1;
                        }
                        _ => {
                            l.failed.push((b, seq, tag));
                            break;
                        }
                    }
                }
                n
            })
        })
        .collect()
}

/// Compares the two replicas of every extent index, block by block, in the LUN files.
fn replicas_equal(lan: &Lan, map: &Path) -> (u64, u64) {
    use std::os::unix::fs::FileExt;
    let m = stripe::StripeMap::read(map).unwrap();
    let files: Vec<(String, std::fs::File)> = (1..=2)
        .map(|i| {
            let url: iscsi::Url = lan.urls[i as usize - 1].parse().unwrap();
            (url.portal, std::fs::File::open(lan.lun_file(i)).unwrap())
        })
        .collect();
    let file = |portal: &str| &files.iter().find(|f| f.0 == portal).unwrap().1;
    let es = m.geometry.extent_size as usize;
    let (mut a, mut b) = (vec![0u8; es], vec![0u8; es]);
    let (mut blocks, mut differ) = (0, 0);
    for reps in &m.extents {
        file(&reps[0].portal)
            .read_exact_at(&mut a, reps[0].addr)
            .unwrap();
        file(&reps[1].portal)
            .read_exact_at(&mut b, reps[1].addr)
            .unwrap();
        for (x, y) in a.chunks(512).zip(b.chunks(512)) {
            blocks += 1;
            differ += u64::from(x != y);
        }
    }
    (blocks, differ)
}

#[test]
fn hand_off_between_hosts_fences_the_old_writer() {
    let Some(r) = rig(7, 2) else {
        return;
    };
    let (disk, _) = r.create("mig", 2);
    // Each host's cache of the record, pulled through its own link to etcd.
    let cl = r.cluster.lock().unwrap();
    let eps_of = |h: u32| cl.endpoints_on(&r.lan.host_peer_ip(h));
    let (eps_a, eps_b) = (eps_of(1), eps_of(2));
    drop(cl);
    let d = r.dir.path();
    let (map_a, map_b) = (d.join("a.map"), d.join("b.map"));
    for (h, eps, map) in [(1, &eps_a, &map_a), (2, &eps_b, &map_b)] {
        ok(r.lan
            .in_host(h, &bin("stripe-img"))
            .args(["pull", "--etcd", eps, &disk, "-o"])
            .arg(map));
    }
    let (run_a, run_b) = (d.join("run-a"), d.join("run-b"));
    let (sock_a, sock_b) = (d.join("a.nbd"), d.join("b.nbd"));
    let tapctl = bin("tap-ctl");
    let open = |h: u32, run: &Path, map: &Path, sock: &Path, extra: &[&str]| {
        ok(r.lan
            .in_host(h, &tapctl)
            .arg("--rundir")
            .arg(run)
            .args(["create", "-a"])
            .arg(format!("stripe:{}", map.display()))
            .arg("--nbd")
            .arg(format!("unix:{}", sock.display()))
            .args(extra))
    };
    struct Destroy(Vec<PathBuf>);
    impl Drop for Destroy {
        fn drop(&mut self) {
            for r in &self.0 {
                let _ = tap_ctl(r).args(["destroy", "-m", "0"]).output();
            }
        }
    }
    let _d = Destroy(vec![run_a.clone(), run_b.clone()]);
    open(1, &run_a, &map_a, &sock_a, &[]);
    // B cannot open it while A holds it.
    let out = r
        .lan
        .in_host(2, &tapctl)
        .arg("--rundir")
        .arg(&run_b)
        .args(["create", "-a"])
        .arg(format!("stripe:{}", map_b.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("in use by"), "{err}");

    let blocks = (64 << 20) / BLOCK;
    let log = Arc::new(Mutex::new(Log::default()));
    // 1. Load through A.
    let stop = Arc::new(AtomicBool::new(false));
    let ws = write_load(&sock_a, blocks, b'A', 0, stop.clone(), log.clone());
    std::thread::sleep(Duration::from_secs(3));
    // A loses etcd but not its storage (a partition): it cannot learn of the hand-off and
    // goes on writing until its lease would run out; only the targets can stop it.
    r.lan.host_etcd_link(1, false).unwrap();
    // 2. The hand-off, as a toolstack does it: pause A (its writers' requests wait), open B.
    let t0 = Instant::now();
    ok(tap_ctl(&run_a).args(["pause", "-m", "0"]));
    open(2, &run_b, &map_b, &sock_b, &["--takeover"]);
    let handoff = t0.elapsed();
    // 3. A stale A: unpaused by mistake, its waiting and further writes go out (late).
    stop.store(true, Ordering::Relaxed);
    ok(tap_ctl(&run_a).args(["unpause", "-m", "0"]));
    let late_stop = Arc::new(AtomicBool::new(false));
    let late = write_load(
        &sock_a,
        blocks,
        b'L',
        1 << 40,
        late_stop.clone(),
        log.clone(),
    );
    let acked_a: u64 = ws.into_iter().map(|h| h.join().unwrap()).sum();
    std::thread::sleep(Duration::from_secs(1));
    late_stop.store(true, Ordering::Relaxed);
    let acked_late: u64 = late.into_iter().map(|h| h.join().unwrap()).sum();
    r.lan.host_etcd_link(1, true).unwrap();
    // 4. Load through B.
    let stop_b = Arc::new(AtomicBool::new(false));
    let wb = write_load(&sock_b, blocks, b'B', 1 << 50, stop_b.clone(), log.clone());
    std::thread::sleep(Duration::from_secs(2));
    stop_b.store(true, Ordering::Relaxed);
    let acked_b: u64 = wb.into_iter().map(|h| h.join().unwrap()).sum();
    let sa: serde_json::Value =
        serde_json::from_str(&ok(tap_ctl(&run_a).args(["stats", "-m", "0"]))).unwrap();
    let sb: serde_json::Value =
        serde_json::from_str(&ok(tap_ctl(&run_b).args(["stats", "-m", "0"]))).unwrap();
    ok(tap_ctl(&run_a).args(["destroy", "-m", "0"]));
    // 5. Every acknowledged write is there, read through B; no failed write is.
    let mut c = Nbd::connect(&sock_b, std::time::Duration::from_secs(60)).unwrap();
    let l = log.lock().unwrap();
    let failed: HashMap<(u64, u64), u8> = l.failed.iter().map(|&(b, s, t)| ((b, s), t)).collect();
    let (mut lost, mut present_failed, mut late_found) = (0, 0, 0);
    let mut buf = vec![0u8; (1 << 20) as usize];
    for chunk in 0..(64 << 20) / (1 << 20) {
        c.read_into(chunk << 20, &mut buf).unwrap();
        for (k, blk) in buf.chunks(BLOCK as usize).enumerate() {
            let b = (chunk << 20) / BLOCK + k as u64;
            let seq = u64::from_le_bytes(blk[8..16].try_into().unwrap());
            let tag = blk[100];
            if tag == b'L' {
                late_found += 1;
            }
            if failed.contains_key(&(b, seq)) && blk[..8] == b.to_le_bytes() {
                present_failed += 1;
            }
            if let Some(&(s, t)) = l.acked.get(&b) {
                lost += u64::from(blk != content(b, s, t).as_slice());
            }
        }
    }
    let fenced_writes = sa["driver"]["fenced_writes"].as_u64().unwrap();
    let fenced_requests = sa["driver"]["fenced_requests"].as_u64().unwrap();
    let late_failed = l.failed.iter().filter(|f| f.2 == b'L').count();
    drop(l);
    ok(tap_ctl(&run_b).args(["destroy", "-m", "0"]));
    let (compared, differ) = replicas_equal(&r.lan, &map_b);
    eprintln!(
        "hand-off in {} ms; acknowledged writes: {acked_a} through A, {acked_late} by the stale A, \
         {acked_b} through B; lost {lost}; stale A's writes refused by the targets {fenced_writes}, \
         failed in A {fenced_requests}, failed at its writers {late_failed}; late or failed \
         writes found on the disk {late_found}+{present_failed}; replicas: {compared} blocks \
         compared, {differ} differ; A: {}",
        handoff.as_millis(),
        sa["driver"]["fenced_why"],
    );
    assert!(acked_a > 100 && acked_b > 100, "too little load");
    assert_eq!(lost, 0, "acknowledged writes lost");
    assert_eq!(acked_late, 0, "the stale writer's writes were acknowledged");
    assert!(fenced_writes > 0, "no write refused by a target: {sa}");
    assert_eq!(
        late_found + present_failed,
        0,
        "refused writes reached the disk"
    );
    assert_eq!(differ, 0, "replicas differ");
    assert_eq!(sa["driver"]["fenced"], true);
    assert_eq!(sb["driver"]["control"]["held"], true, "{sb}");
}
