//! `tap-ctl` against real tapdisk processes: the VBD life cycle (create, list, pause, unpause,
//! stats, destroy), the two-step spawn + open, and one-line errors with blktap3's exit
//! statuses (errnos) for bad arguments, unknown minors and pids, and unreachable run
//! directories.
//!
//! Each test has its own run directory; a guard kills whatever tapdisk is left in it, also when
//! the test fails. The binaries are built on first use by `tapdisk_e2e::bin_dir`.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The folder holding tap-ctl and tapdisk (built on first use by the harness).
fn bins() -> PathBuf {
    tapdisk_e2e::bin_dir()
}

/// Whether `pid` is running (zombies are not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            !matches!(state, Some("Z" | "X" | "x"))
        }
        Err(_) => false,
    }
}

/// A private run directory and an image; kills any tapdisk left in the run directory on drop.
struct Rig {
    bins: PathBuf,
    rundir: PathBuf,
    image: PathBuf,
    seen: std::cell::RefCell<Vec<u32>>,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        let bins = bins();
        let dir = tempfile::tempdir().unwrap();
        let rundir = dir.path().join("run");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        Rig {
            bins,
            rundir,
            image,
            seen: Default::default(),
            _dir: dir,
        }
    }

    fn spec(&self) -> String {
        format!("aio:{}", self.image.display())
    }

    /// Runs tap-ctl with this run directory (given as `$TAPDISK_RS_RUNDIR`, which a
    /// `--rundir` in `args` overrides).
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(self.bins.join("tap-ctl"))
            .args(args)
            .env("TAPDISK_RS_RUNDIR", &self.rundir)
            .env("TAPDISK_RS_TAPDISK", self.bins.join("tapdisk"))
            .output()
            .expect("running tap-ctl");
        self.note_pids();
        out
    }

    /// Runs tap-ctl, expecting success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (so, se) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "tap-ctl {args:?} failed ({}): {se}{so}",
            out.status
        );
        assert!(se.is_empty(), "tap-ctl {args:?} wrote to stderr: {se}");
        so.into_owned()
    }

    /// Runs tap-ctl, expecting exit status `code` and one line `tap-ctl: ...` on stderr that
    /// contains `word`; returns that line.
    fn fails(&self, args: &[&str], code: i32, word: &str) -> String {
        let out = self.run(args);
        let se = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "tap-ctl {args:?}: {se}");
        assert!(
            out.stdout.is_empty(),
            "tap-ctl {args:?} printed {:?}",
            out.stdout
        );
        assert_eq!(
            se.lines().count(),
            1,
            "tap-ctl {args:?}: not one line: {se:?}"
        );
        assert!(se.ends_with('\n'));
        let line = se.trim_end().to_string();
        assert!(line.starts_with("tap-ctl: "), "{line}");
        assert!(
            line.contains(word),
            "tap-ctl {args:?}: {line:?} does not mention {word:?}"
        );
        line
    }

    /// Pids with a control socket in the run directory.
    fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = std::fs::read_dir(self.rundir.join("tapdisk-rs/ctl"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().into_string().ok()?;
                        n.strip_prefix("tapdisk-")?
                            .strip_suffix(".sock")?
                            .parse()
                            .ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        pids.sort_unstable();
        pids
    }

    /// Live tapdisks with a control socket in the run directory.
    fn live(&self) -> Vec<u32> {
        self.pids().into_iter().filter(|&p| alive(p)).collect()
    }

    fn note_pids(&self) {
        let mut seen = self.seen.borrow_mut();
        for p in self.pids() {
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.note_pids();
        for &pid in self.seen.borrow().iter() {
            // Only pids that had a control socket in this private run directory: our tapdisks.
            if alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn wait_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn is_socket(p: &str) -> bool {
    std::fs::metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

#[test]
fn vbd_life_cycle() {
    let r = Rig::new();
    let spec = r.spec();
    // No run directory yet: nothing runs (blktap3 says the same).
    assert_eq!(r.ok(&["list"]), "");

    let device = r.ok(&["create", "-a", &spec]);
    let device = device.trim_end();
    assert_eq!(
        device,
        r.rundir
            .join("tapdisk-rs/vbd/tapdev0")
            .display()
            .to_string()
    );
    assert!(is_socket(device), "{device} is not a socket");
    let pids = r.live();
    assert_eq!(pids.len(), 1, "one tapdisk: {pids:?}");
    let pid = pids[0];

    let list = r.ok(&["list"]);
    assert_eq!(list, format!("pid={pid} minor=0 state=0 args={spec}\n"));
    let nbd = r.rundir.join(format!("nbd{pid}.0"));
    assert!(
        is_socket(&nbd.display().to_string()),
        "no NBD socket {nbd:?}"
    );

    r.ok(&["pause", "-m", "0"]);
    assert_eq!(
        r.ok(&["list"]),
        format!("pid={pid} minor=0 state=0x28 args={spec}\n")
    );
    assert_eq!(
        r.ok(&["list", "-m", "0", "-p", &pid.to_string()]),
        r.ok(&["list"])
    );
    assert_eq!(r.ok(&["list", "-m", "1"]), "");

    r.ok(&["unpause", "-m", "0", "-a", &spec]);
    assert_eq!(
        r.ok(&["list"]),
        format!("pid={pid} minor=0 state=0 args={spec}\n")
    );

    let stats = r.ok(&["stats", "-m", "0"]);
    println!("tap-ctl stats -m 0:\n{stats}");
    assert_eq!(stats.lines().count(), 1, "stats is one line");
    assert!(r.ok(&["stats", "-m", "0", "--pretty"]).lines().count() > 10);
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats is JSON");
    assert!(stats.is_object(), "stats is not an object: {stats}");

    let json: serde_json::Value = serde_json::from_str(&r.ok(&["list", "--json"])).unwrap();
    assert_eq!(json[0]["pid"], pid);
    assert_eq!(json[0]["vbds"][0]["minor"], 0);
    assert_eq!(json[0]["vbds"][0]["state"], "running");
    assert_eq!(json[0]["vbds"][0]["device"], device);

    r.ok(&["destroy", "-m", "0"]);
    assert_eq!(r.ok(&["list"]), "");
    assert!(wait_gone(pid), "tapdisk {pid} still running after destroy");
    assert!(r.pids().is_empty(), "control socket left: {:?}", r.pids());
    assert!(!Path::new(device).exists(), "device {device} left behind");
    assert!(!nbd.exists(), "NBD socket {nbd:?} left behind");
    assert!(
        !r.rundir.join("tapdisk/tapdisk-0").exists(),
        "minor marker left"
    );
}

#[test]
fn spawn_open_close_and_shared_tapdisk() {
    let r = Rig::new();
    let spec = r.spec();
    let pid: u32 = r.ok(&["spawn"]).trim().parse().expect("spawn prints a pid");
    assert!(alive(pid));
    let p = pid.to_string();
    assert_eq!(r.ok(&["list"]), format!("pid={pid}\n"));

    let dev5 = r.ok(&[
        "open",
        "-p",
        &p,
        "-m",
        "5",
        "-a",
        &spec,
        "-R",
        "--ring-order",
        "2",
    ]);
    assert!(dev5.trim_end().ends_with("/vbd/tapdev5"), "{dev5}");
    // The image is locked by minor 5 (shared, for reading): writing it too takes the override.
    r.fails(&["open", "-p", &p, "-a", &spec], 1, "is in use by");
    let dev0 = r.ok(&[
        "open",
        "-p",
        &p,
        "-a",
        &spec,
        "--max-segments",
        "4",
        "--direct",
        "off",
        "--force-share",
    ]);
    assert!(dev0.trim_end().ends_with("/vbd/tapdev0"), "{dev0}");
    assert_eq!(
        r.ok(&["list"]),
        format!("pid={pid} minor=0 state=0 args={spec}\npid={pid} minor=5 state=0 args={spec}\n")
    );
    let json: serde_json::Value = serde_json::from_str(&r.ok(&["list", "--json"])).unwrap();
    assert_eq!(json[0]["vbds"][1]["read_only"], true);

    // A minor in use is refused before anything is started.
    r.fails(&["create", "-m", "5", "-a", &spec], 16, "minor 5");
    assert_eq!(r.live(), vec![pid]);

    r.ok(&["close", "-m", "5"]);
    assert_eq!(
        r.ok(&["list"]),
        format!("pid={pid} minor=0 state=0 args={spec}\n")
    );
    // destroy of the last VBD stops the tapdisk; close does not.
    r.ok(&["close", "-m", "0", "-p", &p]);
    assert_eq!(r.ok(&["list"]), format!("pid={pid}\n"));
    assert!(alive(pid));
    r.ok(&["open", "-p", &p, "-a", &spec]);
    r.ok(&["open", "-p", &p, "-a", &spec, "--force-share"]);
    r.ok(&["destroy", "-m", "1"]);
    assert!(
        alive(pid),
        "destroy stopped a tapdisk that still serves minor 0"
    );
    r.ok(&["destroy", "-m", "0", "-p", &p]);
    assert!(wait_gone(pid), "tapdisk {pid} still running");
    assert_eq!(r.ok(&["list"]), "");
}

#[test]
fn failed_open_stops_the_tapdisk_it_started() {
    let r = Rig::new();
    // Passes tap-ctl's checks (it exists), but no tapdisk can serve an empty image.
    let empty = r.rundir.parent().unwrap().join("empty.img");
    std::fs::File::create(&empty).unwrap();
    let spec = format!("aio:{}", empty.display());
    let line = r.fails(&["create", "-a", &spec], 1, "cannot open");
    println!("{line}");
    assert!(line.contains(&spec), "{line}");
    let seen = r.seen.borrow().clone();
    for pid in seen {
        assert!(wait_gone(pid), "tapdisk {pid} was left running");
    }
    assert!(r.live().is_empty());
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let r = Rig::new();
    let spec = r.spec();
    let img = r.image.display().to_string();

    // Checked before anything is contacted or started: no run directory gets created.
    // Exit statuses are blktap3's: the errno of what failed (EINVAL 22, ENOENT 2, ...).
    r.fails(&["create", "-a", &img], 22, "TYPE:PATH");
    r.fails(
        &["create", "-a", &format!("qed:{img}")],
        22,
        "unknown disk type 'qed'",
    );
    r.fails(
        &["create", "-a", "aio:/nonexistent/disk.img"],
        2,
        "/nonexistent/disk.img does not exist",
    );
    r.fails(
        &["create", "-a", &spec, "--ring-order", "9"],
        22,
        "ring order 9",
    );
    r.fails(
        &["create", "-a", &spec, "--max-segments", "12"],
        22,
        "max segments 12",
    );
    r.fails(
        &["create", "-a", &spec, "--max-segments", "0"],
        22,
        "max segments 0",
    );
    r.fails(
        &["create", "-a", &spec, "--nbd", "tcp:localhost"],
        22,
        "NBD address",
    );
    r.fails(
        &["create", "-a", &spec, "--nbd", "unix:/nonexistent/n.sock"],
        2,
        "NBD address",
    );
    r.fails(
        &["open", "-p", "1", "-a", "aio:/nonexistent/disk.img"],
        2,
        "does not exist",
    );
    r.fails(&["unpause", "-m", "0", "-a", "/x.img"], 22, "TYPE:PATH");
    // blktap3's flags tapdisk-rs does not implement: refused by name, EOPNOTSUPP.
    for flag in [
        &["-r"][..],
        &["-e", "3"],
        &["-2", "/x"],
        &["-s"],
        &["-C", "/l"],
        &["-E"],
    ] {
        let mut args = vec!["open", "-p", "1", "-m", "0", "-a", &spec];
        args.extend_from_slice(flag);
        r.fails(&args, 95, &format!("blktap3's {}", flag[0]));
    }
    r.fails(
        &["unpause", "-p", "1", "-m", "0", "-2", "/x"],
        95,
        "blktap3's -2",
    );
    assert!(
        !r.rundir.exists(),
        "a failed check created the run directory"
    );

    // Unreachable run directory (list: nothing runs there).
    assert_eq!(r.ok(&["list"]), "");
    r.fails(&["pause", "-m", "0"], 2, "run directory");
    r.fails(&["stats", "-m", "0", "-p", "1"], 2, "run directory");
    let not_a_dir = format!("{}/sub", img);
    r.fails(
        &["--rundir", &not_a_dir, "create", "-a", &spec],
        20,
        "cannot create run directory",
    );
    r.fails(&["--rundir", &not_a_dir, "spawn"], 20, "run directory");

    // Unknown minors and pids.
    std::fs::create_dir_all(r.rundir.join("tapdisk-rs/ctl")).unwrap();
    r.fails(&["pause", "-m", "7"], 2, "minor 7");
    r.fails(&["destroy", "-m", "7"], 2, "minor 7");
    r.fails(&["free", "-m", "7"], 2, "minor 7 is not allocated");
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    r.fails(
        &["stats", "-m", "0", "-p", &dead.to_string()],
        3,
        &format!("pid {dead}"),
    );
    // blktap3 lists nothing for a pid that is no tapdisk.
    assert_eq!(r.ok(&["list", "-p", &dead.to_string()]), "");
    let me = std::process::id().to_string();
    r.fails(&["close", "-m", "0", "-p", &me], 2, "is not a tapdisk");

    let pid: u32 = r.ok(&["spawn"]).trim().parse().unwrap();
    r.fails(&["stats", "-m", "7", "-p", &pid.to_string()], 1, "minor 7");
    r.fails(&["unpause", "-m", "7"], 2, "minor 7");
    r.ok(&["open", "-p", &pid.to_string(), "-a", &spec]);
    r.fails(&["unpause", "-m", "0"], 1, "not paused");
    r.fails(&["free", "-m", "0"], 11, "in use by tapdisk");
    r.fails(
        &["detach", "-p", &pid.to_string(), "-m", "0"],
        16,
        "still open",
    );

    // Command-line mistakes: blktap3's EINVAL, still one line.
    r.fails(&["close"], 22, "--minor");
    r.fails(
        &["create", "-a", &spec, "--direct", "maybe"],
        22,
        "tap-ctl create --help",
    );
    r.fails(&["pause", "-m", "zero"], 22, "invalid value 'zero'");
    r.fails(&["frobnicate"], 22, "frobnicate");
    r.fails(&["stats", "-p", &pid.to_string()], 22, "-m MINOR");

    r.ok(&["destroy", "-m", "0"]);
    assert!(wait_gone(pid));
}

#[test]
fn help_is_there() {
    let r = Rig::new();
    let out = r.ok(&["--help"]);
    for verb in [
        "allocate", "free", "spawn", "attach", "detach", "create", "open", "close", "pause",
        "unpause", "destroy", "stats", "list",
    ] {
        assert!(out.contains(verb), "--help does not mention {verb}");
        let sub = r.ok(&[verb, "--help"]);
        assert!(sub.contains("Examples:"), "{verb} --help has no examples");
    }
    assert!(r.ok(&["--version"]).starts_with("tap-ctl "));
}

#[test]
fn control_socket_refuses_long_lines_and_other_versions() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;
    let td = tapdisk_e2e::Tapdisk::start().unwrap();
    let path = td.rundir.ctl_socket(td.pid);
    let reply = |r: &mut BufReader<UnixStream>| {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l}: {e}"));
        v
    };
    // Another protocol version: an error naming both, and the connection stays usable.
    let s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    (&s).write_all(b"{\"v\":99,\"cmd\":\"hello\"}\n").unwrap();
    let v = reply(&mut r);
    let err = v["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        err.contains("version 99") && err.contains("this tapdisk speaks 1"),
        "{v}"
    );
    (&s).write_all(b"{\"v\":1,\"cmd\":\"hello\"}\n").unwrap();
    let v = reply(&mut r);
    assert!(v.get("ok").is_some(), "{v}");
    // Settings tap-ctl refuses are refused when written here directly, naming field and range.
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    for (settings, says) in [
        (r#"{"poll_us":4294967295}"#, "poll_us takes 0..=10000"),
        (
            r#"{"early":{"percent":250}}"#,
            "early.percent takes 0..=100",
        ),
        (
            r#"{"early":{"chunk_kb":0}}"#,
            "early.chunk_kb takes 4..=16384",
        ),
        (
            r#"{"faults":{"fail_ppm":2000000}}"#,
            "faults.fail_ppm takes 0..=1000000",
        ),
    ] {
        let line = format!(
            "{{\"v\":1,\"cmd\":\"open\",\"image\":{{\"driver\":\"aio\",\"path\":{:?}}},\"settings\":{settings}}}\n",
            img.path().display().to_string()
        );
        (&s).write_all(line.as_bytes()).unwrap();
        let v = reply(&mut r);
        let err = v["error"].as_str().unwrap_or_default().to_owned();
        assert!(err.contains(says), "{settings}: {v}");
    }
    (&s).write_all(b"{\"v\":1,\"cmd\":\"list\"}\n").unwrap();
    let v = reply(&mut r);
    assert_eq!(v["ok"]["vbds"], serde_json::json!([]), "{v}");
    // A line over 64 KiB: an error, then the connection is closed; memory is not spent on it.
    let s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        // 1 MiB with no newline; tapdisk stops reading after 64 KiB, so this write may fail.
        let _ = (&w).write_all(&vec![b'x'; 1 << 20]);
    });
    let v = reply(&mut r);
    let err = v["error"].as_str().unwrap_or_default().to_owned();
    assert!(err.contains("longer than 65536 bytes"), "{v}");
    let mut rest = Vec::new();
    assert_eq!(r.read_to_end(&mut rest).unwrap_or(0), 0);
    writer.join().unwrap();
    // tapdisk is still there and answers.
    let s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    (&s).write_all(b"{\"v\":1,\"cmd\":\"hello\"}\n").unwrap();
    assert!(reply(&mut r).get("ok").is_some());
}

/// A stand-in for a tapdisk killed in the middle of a request: a process that listens on the
/// control socket of its own pid, takes one connection, reads the request and exits without
/// an answer. Every verb reports such a tapdisk as dead (ESRCH), as it does one found dead
/// before the request, not as a broken connection.
#[test]
fn a_tapdisk_that_dies_during_a_request_is_reported_dead() {
    let rig = Rig::new();
    let script = r#"
import os, socket, sys
d = os.path.join(sys.argv[1], "tapdisk-rs", "ctl")
os.makedirs(d, exist_ok=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(os.path.join(d, "tapdisk-%d.sock" % os.getpid()))
s.listen(1)
print(os.getpid(), flush=True)
c, _ = s.accept()
c.recv(65536)
os._exit(0)
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&rig.rundir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running python3 (tests/run.sh installs it)");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let pid = line.trim().to_owned();
    let reaper = std::thread::spawn(move || child.wait());
    let msg = rig.fails(
        &["stats", "-p", &pid, "-m", "0"],
        libc::ESRCH,
        "died during the request",
    );
    assert!(msg.contains(&format!("tapdisk {pid}")), "{msg}");
    reaper.join().unwrap().unwrap();
}
