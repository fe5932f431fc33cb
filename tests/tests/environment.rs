//! A live tapdisk and what happens around it: its run directory or device socket removed,
//! the file system holding its log full, its start-up stuck, and SIGTERM with IO in flight.
//! Each test runs the real `tapdisk` (and `tap-ctl`) binaries.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tapdisk_control::{FaultPlan, NbdListen, VbdSettings};
use tapdisk_e2e::nbd::Client;
use tapdisk_e2e::*;

const MIB: u64 = 1 << 20;

/// Waits up to `limit` for `child` to exit.
fn exited_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("SIGTERM");
}

/// Settings of a VBD exported over NBD at `sock`.
fn exported(sock: &Path) -> VbdSettings {
    VbdSettings {
        nbd: Some(NbdListen::Unix(sock.to_owned())),
        ..VbdSettings::default()
    }
}

/// A block written and read back through the NBD export at `sock`.
fn nbd_round_trip(sock: &Path, offset: u64, fill: u8) {
    let mut c = Client::connect(sock, Duration::from_secs(10)).expect("NBD connect");
    let data = vec![fill; 64 << 10];
    c.write(offset, &data).expect("NBD write");
    assert_eq!(c.read(offset, data.len() as u32).expect("NBD read"), data);
    c.disconnect().expect("NBD disconnect");
}

/// With its whole run directory removed (control socket, device sockets, minor claims,
/// logs), a tapdisk still ends on SIGTERM, promptly and cleanly. (It used to wake its
/// device socket's accept thread by connecting to the socket's path, and waited forever.)
#[test]
fn sigterm_ends_a_tapdisk_whose_run_directory_was_removed() {
    let dir = tempfile::tempdir().unwrap();
    let rundir = dir.path().join("run");
    let (_idir, img) = image(16 * MIB).unwrap();
    let mut td = Tapdisk::start_in(&rundir).unwrap();
    let sock = dir.path().join("nbd.sock");
    td.open(&format!("aio:{}", img.display()), exported(&sock))
        .unwrap();
    let (_idir2, img2) = image(16 * MIB).unwrap();
    td.open(&format!("aio:{}", img2.display()), VbdSettings::default())
        .unwrap();
    nbd_round_trip(&sock, 0, 0x5a);
    // A client still connected when the signal comes.
    let _idle = Client::connect(&sock, Duration::from_secs(10)).unwrap();
    std::fs::remove_dir_all(&rundir).unwrap();
    let t = Instant::now();
    sigterm(td.pid);
    let status = exited_within(&mut td.child, Duration::from_secs(10))
        .expect("the tapdisk did not end within 10 s of SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

/// With only its device socket removed, `tap-ctl destroy` closes the VBD and stops the
/// tapdisk at once (it used to wait a minute for a close that never came, and fail).
#[test]
fn destroy_works_when_the_device_socket_was_removed() {
    let dir = tempfile::tempdir().unwrap();
    let rundir = dir.path().join("run");
    let (_idir, img) = image(16 * MIB).unwrap();
    let out = run_ok(
        tap_ctl(&rundir)
            .args(["create", "-a"])
            .arg(format!("aio:{}", img.display())),
    );
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(device.ends_with("tapdev0"), "{device}");
    std::fs::remove_file(&device).unwrap();
    let t = Instant::now();
    run_ok(tap_ctl(&rundir).args(["destroy", "-m", "0"]));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let left = std::fs::read_dir(tapdisk_control::RunDir(rundir.clone()).ctl_dir())
        .unwrap()
        .count();
    assert_eq!(left, 0, "a control socket is left");
}

/// With its log on a full file system (`/dev/full`: every write fails with ENOSPC), a tapdisk
/// starts, serves two VBDs and their NBD exports (connection threads log at every connect
/// and protocol error), and ends cleanly on SIGTERM: logging degrades, nothing panics.
#[test]
fn a_full_log_file_system_degrades_logging_only() {
    let dir = tempfile::tempdir().unwrap();
    let rundir = dir.path().join("run");
    let (_idir, img) = image(16 * MIB).unwrap();
    let (_idir2, img2) = image(16 * MIB).unwrap();
    let mut td = Tapdisk::start_with(&rundir, &["--log-file", "/dev/full"]).unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    td.open(&format!("aio:{}", img.display()), exported(&a))
        .unwrap();
    td.open(&format!("aio:{}", img2.display()), exported(&b))
        .unwrap();
    for round in 0..20u8 {
        // A protocol error (logged by the connection thread), then real IO on both exports.
        let mut bad = Client::raw(&a, Duration::from_secs(5)).unwrap();
        bad.greeting().unwrap();
        use std::io::Write;
        bad.s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
        nbd_round_trip(&a, u64::from(round) * MIB / 4, round);
        nbd_round_trip(&b, u64::from(round) * MIB / 4, !round);
    }
    assert!(td.alive(), "the tapdisk died logging to a full file system");
    assert!(td.stats(0).is_ok() && td.stats(1).is_ok());
    sigterm(td.pid);
    let status = exited_within(&mut td.child, Duration::from_secs(10))
        .expect("no exit within 10 s of SIGTERM");
    assert!(status.success(), "{status}");
}

/// Start-up is bounded: a tapdisk whose log file is a FIFO nobody reads (its open blocks)
/// gives up after the start-up deadline, saying where it was stuck, instead of never
/// answering.
#[test]
fn a_stuck_start_up_gives_up_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("log.fifo");
    nix::unistd::mkfifo(
        &fifo,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .unwrap();
    let t = Instant::now();
    let mut child = Command::new(bin("tapdisk"))
        .arg("--rundir")
        .arg(dir.path().join("run"))
        .arg("--log-file")
        .arg(&fifo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = exited_within(&mut child, Duration::from_secs(20));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tapdisk still starting after 20 s");
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("start-up did not finish within 10 s (stuck opening the log file)"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert!(t.elapsed() >= Duration::from_secs(10));
}

/// SIGTERM with a write in flight: the tapdisk finishes the write, then exits 0 (the write is
/// in the image); with IO that does not finish within `--exit-deadline`, it exits at the
/// deadline with status 3 rather than whenever the IO ends (with a hung device: never).
#[test]
fn sigterm_finishes_in_flight_io_within_the_exit_deadline() {
    for (delay_ms, deadline_s, status) in [(1500u32, "10", 0), (10_000, "2", 3)] {
        let dir = tempfile::tempdir().unwrap();
        let (_idir, img) = image(16 * MIB).unwrap();
        let mut td =
            Tapdisk::start_with(&dir.path().join("run"), &["--exit-deadline", deadline_s]).unwrap();
        let sock = dir.path().join("nbd.sock");
        let settings = VbdSettings {
            faults: Some(FaultPlan {
                delay_ppm: 1_000_000,
                delay_us: delay_ms * 1000,
                ..FaultPlan::default()
            }),
            ..exported(&sock)
        };
        td.open(&format!("aio:{}", img.display()), settings)
            .unwrap();
        let mut c = Client::connect(&sock, Duration::from_secs(30)).unwrap();
        c.send_write(7, MIB, &[0xa5; 4096]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        sigterm(td.pid);
        let got = exited_within(&mut td.child, Duration::from_secs(15))
            .expect("no exit within 15 s of SIGTERM");
        let took = t.elapsed();
        assert_eq!(got.code(), Some(status), "delay {delay_ms} ms: {got}");
        let bound = Duration::from_millis(u64::from(delay_ms).min(2000) + 1500);
        assert!(took < bound, "delay {delay_ms} ms: exit after {took:?}");
        // A write finished before the exit is in the image; one abandoned at the deadline was
        // never acknowledged, so either outcome is allowed for it.
        if status == 0 {
            let data = std::fs::read(&img).unwrap();
            let at = MIB as usize;
            assert!(data[at..at + 4096].iter().all(|&b| b == 0xa5));
        }
    }
}
