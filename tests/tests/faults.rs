//! Fault injection below the scheduler (`--inject-faults`), checked by td-bench verify against a
//! real tapdisk: errors become BLKIF_RSP_ERROR for exactly the requests they affect, nothing
//! else fails, nothing hangs, and no acknowledged write is lost (every read of a sector whose
//! last write succeeded returns that write's data).

use std::process::Command;
use std::time::{Duration, Instant};

use tapdisk_e2e::*;

fn verify(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let t0 = Instant::now();
    let out = Command::new(bin("td-bench"))
        .arg("verify")
        .arg("--image")
        .arg(&img)
        .args([
            "--size",
            "32M",
            "--requests",
            "4000",
            "--indirect-segments",
            "32",
        ])
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("{text}{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "verify took too long"
    );
    assert!(out.status.success(), "verify failed");
    assert_eq!(text.lines().last(), Some("4000 passed, 0 failed"));
    err
}

fn injected(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("td-bench verify: ")?
                .strip_suffix(" requests got the error injected for them")?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[test]
fn bad_sectors_fail_exactly_the_requests_that_touch_them() {
    // Every request touching a bad range must fail; every other must succeed (merged or not).
    let bad = "2000+8;30000+64;65000+1";
    let e = verify(&[
        "--seed",
        "21",
        "--inject-faults",
        &format!("bad={bad}"),
        "--expect-bad",
        bad,
    ]);
    assert!(
        injected(&e) > 0,
        "no request touched a bad range: the test proves nothing"
    );
    let e = verify(&[
        "--seed",
        "22",
        "--no-merge",
        "--ring-order",
        "2",
        "--inject-faults",
        &format!("bad={bad}"),
        "--expect-bad",
        bad,
    ]);
    assert!(injected(&e) > 0);
}

#[test]
fn random_failures_delays_and_torn_writes_lose_no_acknowledged_write() {
    let e = verify(&[
        "--seed",
        "23",
        "--allow-errors",
        "--inject-faults",
        "seed=5,fail=20000,delay=20000:2000,tear",
    ]);
    assert!(injected(&e) > 0);
}

#[test]
fn faults_under_early_reads() {
    // Reads answered before their data is in, chunks failing after the answer: the reader is
    // told (and its pages hold poison), nothing else fails.
    let e = verify(&[
        "--seed",
        "24",
        "--allow-errors",
        "--early-read",
        "percent=0,chunk=8,cache=4",
        "--inject-faults",
        "seed=6,fail=20000,delay=20000:2000,tear",
    ]);
    assert!(injected(&e) > 0);
}
