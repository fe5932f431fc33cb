//! After a crash: a tapdisk killed with SIGKILL in the middle of IO is visible (`tap-ctl list`
//! shows its VBD with blktap3's dead flag, says so on stderr and exits ESRCH), the same image
//! opens again at once, and `destroy`, `close` + `free`, or blktap3's `destroy -p -m` remove
//! everything it left. A zombie tapdisk is gone for tap-ctl and for a tapdisk claiming its
//! minor alike. (docs/operations.md, "After a crash", describes this.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tapdisk_control::process::pid_alive;
use tapdisk_e2e::{bin, Tapdisk};

struct Rig {
    rundir: PathBuf,
    dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        Rig {
            rundir: dir.path().join("run"),
            dir,
        }
    }

    fn image(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::File::create(&p)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        p
    }

    fn tap_ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("tap-ctl"))
            .args(args)
            .env("TAPDISK_RS_RUNDIR", &self.rundir)
            .env("TAPDISK_RS_TAPDISK", bin("tapdisk"))
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.tap_ctl(args);
        assert!(
            o.status.success(),
            "tap-ctl {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The pid serving `minor`, from `tap-ctl list -m`.
    fn pid_of(&self, minor: u32) -> u32 {
        let out = self.ok(&["list", "-m", &minor.to_string()]);
        out.split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {out:?}"))
    }

    /// What is left in the run directory besides logs and folders.
    fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["", "tapdisk", "tapdisk-rs/ctl", "tapdisk-rs/vbd"] {
            if let Ok(d) = std::fs::read_dir(self.rundir.join(sub)) {
                for e in d.flatten() {
                    if !e.file_type().unwrap().is_dir() {
                        out.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
                    }
                }
            }
        }
        out.sort();
        out
    }
}

/// A frontend doing checked IO on `device` until it is killed or the tapdisk goes.
fn io_load(device: &str) -> Child {
    Command::new(bin("td-bench"))
        .args(["verify", "--device", device, "--duration", "60s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "{pid} survived SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Block-tap's parse of `tap-ctl list -t aio -f FILE`: the pid= and minor= words.
fn find_device(r: &Rig, image: &Path) -> (Option<String>, Option<String>) {
    let o = r.tap_ctl(&["list", "-t", "aio", "-f", &image.display().to_string()]);
    let text = String::from_utf8_lossy(&o.stdout).replace(',', "\n");
    let word = |k: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k).map(str::to_owned))
    };
    (word("pid="), word("minor="))
}

#[test]
fn a_tapdisk_killed_mid_io_is_listed_dead_and_cleaned_up() {
    let r = Rig::new();
    let img = r.image("vm1.img");
    let spec = format!("aio:{}", img.display());
    let device = r.ok(&["create", "-a", &spec]).trim().to_owned();
    let pid = r.pid_of(0);
    let mut load = io_load(&device);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        load.try_wait().unwrap().is_none(),
        "the IO load ended early"
    );
    sigkill(pid);
    let _ = load.kill();
    let _ = load.wait();

    // Visible: the dead flag, no pid= for a parser to reuse, a message naming the pid.
    let o = r.tap_ctl(&["list"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    println!("tap-ctl list after SIGKILL:\n{out}{err}");
    assert_eq!(o.status.code(), Some(3), "exit ESRCH");
    assert_eq!(out, format!("minor=0 state=0x1 args={spec}\n"));
    assert!(
        err.contains(&format!("tapdisk {pid}")) && err.contains("dead"),
        "{err}"
    );
    assert!(err.contains("tap-ctl destroy -m 0"), "{err}");
    let long = String::from_utf8_lossy(&r.tap_ctl(&["list", "--long"]).stdout).into_owned();
    assert!(long.contains(&format!("dead_pid={pid}")), "{long}");
    // Xen's block-tap finds no pid to reuse for the image, so it starts a new tapdisk.
    assert_eq!(find_device(&r, &img).0, None);
    // Commands aimed at it say it is dead.
    let o = r.tap_ctl(&["stats", "-m", "0"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("dead"));

    // The same image opens again at once (another minor), and serves checked IO.
    let device2 = r.ok(&["create", "-a", &spec]).trim().to_owned();
    assert!(device2.ends_with("tapdev1"), "{device2}");
    let out = Command::new(bin("td-bench"))
        .args(["verify", "--device", &device2, "--requests", "2000"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // destroy cleans up after the dead one: its sockets and marker.
    let before = r.leftovers();
    assert!(before.contains(&format!("/nbd{pid}.0")), "{before:?}");
    assert!(
        before.contains(&format!("tapdisk-rs/ctl/tapdisk-{pid}.sock")),
        "{before:?}"
    );
    r.ok(&["destroy", "-m", "0"]);
    let after = r.leftovers();
    for gone in [
        format!("/nbd{pid}.0"),
        format!("tapdisk-rs/ctl/tapdisk-{pid}.sock"),
        "tapdisk/tapdisk-0".to_string(),
        "tapdisk-rs/vbd/tapdev0".to_string(),
    ] {
        assert!(!after.contains(&gone), "{gone} left: {after:?}");
    }
    let pid2 = r.pid_of(1);
    assert_eq!(
        r.ok(&["list"]),
        format!("pid={pid2} minor=1 state=0 args={spec}\n")
    );
    r.ok(&["destroy", "-m", "1"]);
    assert_eq!(r.leftovers(), Vec::<String>::new());
}

#[test]
fn close_free_and_blktap3s_destroy_clean_up_after_a_dead_tapdisk() {
    let r = Rig::new();
    let img = r.image("vm2.img");
    let spec = format!("aio:{}", img.display());

    // xapi's shutdown of a dead tapdisk: close, detach, free all succeed and clean up.
    let dev = r.ok(&["create", "-a", &spec]).trim().to_owned();
    let pid = r.pid_of(0);
    let mut load = io_load(&dev);
    std::thread::sleep(Duration::from_millis(500));
    sigkill(pid);
    let _ = load.kill();
    let _ = load.wait();
    let p = pid.to_string();
    r.ok(&["close", "-p", &p, "-m", "0", "-t", "120"]);
    r.ok(&["detach", "-p", &p, "-m", "0"]);
    r.ok(&["free", "-m", "0"]);
    assert_eq!(r.ok(&["list"]), "");
    assert_eq!(r.leftovers(), Vec::<String>::new());

    // block-tap's life cycle, then its remove after the tapdisk was killed.
    let minor = r.ok(&["allocate"]);
    let minor = minor.trim().rsplit("tapdisk-").next().unwrap().to_owned();
    let pid: u32 = r.ok(&["spawn"]).trim().parse().unwrap();
    let p = pid.to_string();
    r.ok(&["attach", "-p", &p, "-m", &minor]);
    r.ok(&["open", "-p", &p, "-m", &minor, "-a", &spec]);
    sigkill(pid);
    assert_eq!(r.tap_ctl(&["list"]).status.code(), Some(3));
    r.ok(&["destroy", "-p", &p, "-m", &minor]);
    assert_eq!(r.ok(&["list"]), "");
    assert_eq!(r.leftovers(), Vec::<String>::new());

    // A dead minor given explicitly is taken over by the next open.
    r.ok(&["create", "-m", "4", "-a", &spec]);
    sigkill(r.pid_of(4));
    r.ok(&["create", "-m", "4", "-a", &spec]);
    let o = r.tap_ctl(&["list"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    r.ok(&["destroy", "-m", "4"]);
    assert_eq!(r.leftovers(), Vec::<String>::new());
}

#[test]
fn a_zombie_tapdisk_is_gone_for_tap_ctl_and_the_daemon_alike() {
    let r = Rig::new();
    let img = r.image("vm3.img");
    let spec = format!("aio:{}", img.display());
    // A tapdisk that is our child: killed and not reaped, it stays a zombie.
    let mut td = Tapdisk::start_in(&r.rundir).unwrap();
    let vbd = td.open(&spec, Default::default()).unwrap();
    assert_eq!(vbd.minor, 0);
    let pid = td.pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(stat.contains(") Z "), "not a zombie: {stat}");

    let o = r.tap_ctl(&["list"]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("minor=0 state=0x1 args={spec}\n")
    );
    // A new tapdisk asked for the zombie's minor takes it (tap-ctl checks it the same way).
    r.ok(&["create", "-m", "0", "-a", &spec]);
    assert!(r.tap_ctl(&["list"]).status.success());
    r.ok(&["destroy", "-m", "0"]);
    assert!(td.child.wait().is_ok());
}
