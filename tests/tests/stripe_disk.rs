//! Striped disks (`stripe:MAPFILE`) on real tgtd servers of the emulated storage LAN: data
//! checks with td-bench verify and qemu-io through the NBD export, replicas 1 and 2, a server
//! killed in the middle of a run, the mapping file's lock. Needs root, tgt and iproute2 (CI
//! installs them); skipped with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tapdisk_e2e::lan::{self, Lan};
use tapdisk_e2e::*;

/// Runs `cmd`, killing it after `limit` (a hang is a failure, not a stuck test).
fn run_limited(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} hung for {limit:?}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn ok(cmd: &mut Command) -> String {
    let out = run_limited(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A striped disk served by a tapdisk with an NBD export; destroyed on drop.
struct Disk {
    rundir: PathBuf,
    map: PathBuf,
    nbd: PathBuf,
    device: PathBuf,
}

impl Disk {
    fn create(dir: &Path, master: &str, name: &str, stripes: u32, replicas: u32) -> Disk {
        Disk::create_with(dir, master, name, stripes, replicas, &[])
    }

    /// As `create`, with more `tap-ctl create` arguments.
    fn create_with(
        dir: &Path,
        master: &str,
        name: &str,
        stripes: u32,
        replicas: u32,
        extra: &[&str],
    ) -> Disk {
        let map = dir.join(format!("{name}.map"));
        let out = ok(Command::new(bin("stripe-img"))
            .args([
                "create",
                "--master",
                master,
                "--size",
                "64M",
                "--stripe-size",
                "64k",
            ])
            .args(["--stripes", &stripes.to_string()])
            .args(["--replicas", &replicas.to_string(), "-o"])
            .arg(&map));
        assert!(out.starts_with("created "), "{out}");
        let rundir = dir.join(format!("run-{name}"));
        let nbd = dir.join(format!("{name}.nbd"));
        let out = ok(tap_ctl(&rundir)
            .args(["create", "-a"])
            .arg(format!("stripe:{}", map.display()))
            .arg("--nbd")
            .arg(format!("unix:{}", nbd.display()))
            .args(extra));
        Disk {
            device: PathBuf::from(out.trim()),
            rundir,
            map,
            nbd,
        }
    }

    fn verify(&self, requests: u32, extra: &[&str], limit: Duration) -> Output {
        run_limited(
            Command::new(bin("td-bench"))
                .args(["verify", "--device"])
                .arg(&self.device)
                .args(["--requests", &requests.to_string()])
                .args(extra),
            limit,
        )
    }

    /// A verify run of `time` (so it outlasts a server's restart).
    fn verify_for(&self, time: &str, extra: &[&str], limit: Duration) -> Output {
        run_limited(
            Command::new(bin("td-bench"))
                .args(["verify", "--device"])
                .arg(&self.device)
                .args(["--duration", time])
                .args(extra),
            limit,
        )
    }

    /// The pid of the tapdisk serving the disk.
    fn tapdisk_pid(&self) -> u32 {
        let list = ok(tap_ctl(&self.rundir).args(["list", "--json"]));
        let list: serde_json::Value = serde_json::from_str(&list).expect("list JSON");
        list[0]["pid"].as_u64().expect("tapdisk pid") as u32
    }

    fn stats(&self) -> serde_json::Value {
        let out = ok(tap_ctl(&self.rundir).args(["stats", "-m", "0"]));
        serde_json::from_str(&out).expect("stats JSON")
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.nbd.display())
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = tap_ctl(&self.rundir).args(["destroy", "-m", "0"]).output();
    }
}

fn passed(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains(" passed, 0 failed"),
        "verify failed: {text}\n{err}"
    );
    text
}

fn setup(slot: u32, n: u32) -> Option<(tempfile::TempDir, Lan, String)> {
    if !lan::available() {
        eprintln!("skipped: needs root, tgt and iproute2 for the storage LAN");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let lan = Lan::up(slot, n, "none", "256M").expect("storage LAN up");
    let master = lan::master(&dir.path().join("master"), 16 << 20, &lan.urls).expect("master");
    Some((dir, lan, master))
}

#[test]
fn verify_and_qemu_io_on_replicas_1_and_2() {
    let Some((dir, _lan, master)) = setup(1, 2) else {
        return;
    };
    for replicas in [1, 2] {
        let d = Disk::create(dir.path(), &master, &format!("r{replicas}"), 2, replicas);
        passed(&d.verify(3000, &[], Duration::from_secs(60)));
        // Patterns across stripe units, extents and both servers, read back through NBD.
        let mut q = Command::new("qemu-io");
        q.args(["-f", "raw", &d.uri()]);
        let writes = [
            ("0x5a", "0", "1M"),
            ("0x11", "1084k", "8k"),
            ("0x22", "16380k", "8k"),
            ("0x33", "2102272", "512"),
            ("0x44", "63M", "1M"),
        ];
        for (p, off, len) in writes {
            q.args(["-c", &format!("write -P {p} {off} {len}")]);
        }
        for (p, off, len) in writes {
            q.args(["-c", &format!("read -P {p} {off} {len}")]);
        }
        q.args(["-c", "discard 4M 1M", "-c", "read -P 0 4M 1M"]);
        let out = ok(&mut q);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert_eq!(out.matches("read ").count(), 6, "{out}");
        // Both servers did IO; a second tapdisk cannot open the same map.
        let s = d.stats();
        let servers = s["driver"]["servers"].as_array().unwrap();
        assert_eq!(servers.len(), 2, "{s}");
        for sv in servers {
            assert!(sv["ios"].as_u64().unwrap() > 100, "{s}");
            assert_eq!(sv["state"], "up");
        }
        let out = run_limited(
            tap_ctl(&dir.path().join("other"))
                .args(["create", "-a"])
                .arg(format!("stripe:{}", d.map.display())),
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_holder_named(&err, &d.map, d.tapdisk_pid());
    }
}

/// Kills server 2 one second into a verify run and starts it again `down_for` later.
fn kill_during(lan: &Lan, down_for: Duration) -> std::thread::JoinHandle<()> {
    let (mut k, mut s) = (lan.command(&["kill", "2"]), lan.command(&["start", "2"]));
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        assert!(k.status().unwrap().success(), "kill failed");
        std::thread::sleep(down_for);
        assert!(s.status().unwrap().success(), "restart failed");
    })
}

#[test]
fn killing_a_server_with_replicas_2_fails_no_request() {
    let Some((dir, lan, master)) = setup(2, 2) else {
        return;
    };
    let d = Disk::create(dir.path(), &master, "r2", 2, 2);
    ride_out_a_restart(&lan, &d);
}

/// Kills server 2 of a replicas-2 disk during a verify run: no request fails, and the server
/// comes back (its session reconnects and takes IO again, with the data intact).
fn ride_out_a_restart(lan: &Lan, d: &Disk) {
    // Down from 1 s to 8 s, longer than the reconnect timeout (5 s): writes go on with one
    // replica. The run goes on until 11 s, so its ring sees the server return.
    let t = kill_during(lan, Duration::from_secs(7));
    let out = d.verify_for("11s", &["--iodepth", "16"], Duration::from_secs(60));
    t.join().unwrap();
    eprintln!("{}", passed(&out));
    let s = d.stats();
    assert_eq!(s["ring"]["read"]["errors"], 0, "{s}");
    assert_eq!(s["ring"]["write"]["errors"], 0, "{s}");
    let before = s["driver"]["servers"][1]["ios"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        passed(&d.verify(2000, &[], Duration::from_secs(30)));
        let s = d.stats();
        let sv = &s["driver"]["servers"][1];
        if sv["state"] == "up" && sv["ios"].as_u64().unwrap() > before {
            assert!(sv["reconnects"].as_u64().unwrap() >= 1, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "server 2 did not come back: {s}");
    }
    // The replicas that missed writes while it was down are copied back and unmarked.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = d.stats();
        if s["driver"]["stale_replicas"] == 0 {
            assert!(
                s["driver"]["resync"]["stale_copied"].as_u64().unwrap() > 0,
                "{s}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stale replicas not copied back: {s}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    passed(&d.verify(2000, &[], Duration::from_secs(30)));
}

#[test]
fn killing_a_server_with_replicas_1_gives_errors_then_resumes() {
    let Some((dir, lan, master)) = setup(3, 2) else {
        return;
    };
    let d = Disk::create(dir.path(), &master, "r1", 2, 1);
    let t = kill_during(&lan, Duration::from_secs(7));
    let out = d.verify(
        20000,
        &["--allow-errors", "--iodepth", "16"],
        Duration::from_secs(60),
    );
    t.join().unwrap();
    // Errors, not wrong data and not a hang.
    passed(&out);
    let s = d.stats();
    let errors = s["ring"]["read"]["errors"].as_u64().unwrap()
        + s["ring"]["write"]["errors"].as_u64().unwrap();
    assert!(
        errors > 0,
        "no error responses while a server was down: {s}"
    );
    // IO resumes once the server is back.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = d.verify(2000, &[], Duration::from_secs(30));
        if out.status.success() {
            passed(&out);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "IO did not resume: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn inline_driven_sessions_verify_and_ride_out_a_server_restart() {
    let Some((dir, lan, master)) = setup(4, 2) else {
        return;
    };
    let d = Disk::create_with(dir.path(), &master, "inl", 2, 2, &["--iscsi-inline"]);
    // tapdisk has no iSCSI IO threads: the ring loop drives both servers' sockets.
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", d.tapdisk_pid()))
        .expect("tapdisk's threads")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect();
    assert!(!names.is_empty(), "no thread names read");
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("iscsi-") && !n.starts_with("iscsi-login")),
        "IO threads in inline mode: {names:?}"
    );
    passed(&d.verify(3000, &[], Duration::from_secs(60)));
    ride_out_a_restart(&lan, &d);
}
