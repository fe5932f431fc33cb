//! tap-ctl never waits forever: a tapdisk that never reports ready fails `spawn` within its
//! start-up deadline (10 s), and a control socket that answers a byte at a time, or never,
//! fails a command within its deadline (10 s for `list`, `-t` where blktap3 has it), with
//! ETIMEDOUT. Whole phases are bounded, not each read.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tapdisk_e2e::bin;

fn tap_ctl(rundir: &Path, tapdisk: &Path, args: &[&str]) -> (Output, Duration) {
    let tap_ctl = bin("tap-ctl");
    let t = Instant::now();
    let o = Command::new(tap_ctl)
        .args(args)
        .env("TAPDISK_RS_RUNDIR", rundir)
        .env("TAPDISK_RS_TAPDISK", tapdisk)
        .output()
        .unwrap();
    (o, t.elapsed())
}

fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn spawn_gives_up_on_a_tapdisk_that_never_reports_ready() {
    let dir = tempfile::tempdir().unwrap();
    let rundir = dir.path().join("run");
    for (name, body, says) in [
        // Never prints its pid, keeps the pipe open.
        ("silent", "exec sleep 600", "print its pid"),
        // Prints a pid and never detaches (nor lets go of the pipe).
        ("stuck", "echo $$; exec sleep 600", "its pid"),
        // Detaches, but the pid it printed never answers on a control socket.
        (
            "mute",
            "sleep 600 >/dev/null 2>&1 & echo $!",
            "control socket",
        ),
    ] {
        let fake = script(dir.path(), name, body);
        let (o, took) = tap_ctl(&rundir, &fake, &["spawn"]);
        let err = String::from_utf8_lossy(&o.stderr);
        println!("{name}: {took:?}: {err}");
        assert_eq!(o.status.code(), Some(110), "{name}: ETIMEDOUT: {err}");
        assert!(err.contains(says) && err.contains("10 s"), "{name}: {err}");
        assert!(took < Duration::from_secs(20), "{name} took {took:?}");
        // The "mute" one left its sleeping process behind, named in the error: stop it.
        if let Some(pid) = err
            .split("starting tapdisk ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn a_control_socket_that_trickles_or_never_answers_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let rundir = tapdisk_control::RunDir(dir.path().join("run"));
    rundir.create().unwrap();
    // A "tapdisk" with our (live) pid whose socket accepts and answers one byte a second,
    // never a whole line.
    let me = std::process::id();
    let l = UnixListener::bind(rundir.ctl_socket(me)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                for _ in 0..120 {
                    if s.write_all(b" ").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(900));
                }
            });
        }
    });
    let tapdisk = bin("tapdisk");
    let (o, took) = tap_ctl(&rundir.0, &tapdisk, &["list"]);
    let err = String::from_utf8_lossy(&o.stderr);
    println!("list: {took:?}: {err}");
    assert_eq!(o.status.code(), Some(110), "{err}");
    assert!(
        err.contains(&format!("tapdisk {me}")) && err.contains("within 10 s"),
        "{err}"
    );
    assert!(took < Duration::from_secs(15), "list took {took:?}");
    let p = me.to_string();
    let (o, took) = tap_ctl(
        &rundir.0,
        &tapdisk,
        &["pause", "-p", &p, "-m", "0", "-t", "2"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    println!("pause -t 2: {took:?}: {err}");
    assert_eq!(o.status.code(), Some(110), "{err}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
}
