//! Sizes an operator gives that the machine cannot hold, sent straight to a live tapdisk's
//! control socket: an early-read cache or a Parallax metadata cache bigger than the memory
//! the tapdisk can have, or an open with no file descriptors left. Each is refused with one
//! error line naming the setting and what there is; the tapdisk, its other VBDs and their
//! NBD exports go on serving. (They used to abort the whole tapdisk on a failed allocation.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tapdisk_control::{NbdListen, VbdSettings};
use tapdisk_e2e::nbd::Client;
use tapdisk_e2e::*;

const MIB: u64 = 1 << 20;

fn exported(sock: &Path) -> VbdSettings {
    VbdSettings {
        nbd: Some(NbdListen::Unix(sock.to_owned())),
        ..VbdSettings::default()
    }
}

fn nbd_round_trip(sock: &Path, round: u8) {
    let mut c = Client::connect(sock, Duration::from_secs(10)).expect("NBD connect");
    let data = vec![round; 64 << 10];
    let at = u64::from(round) * (64 << 10);
    c.write(at, &data).expect("NBD write");
    assert_eq!(c.read(at, data.len() as u32).expect("NBD read"), data);
    c.disconnect().expect("NBD disconnect");
}

/// An `open` line for `image` (`{"driver":..,"path":..}`) with `settings` (JSON).
fn open_line(driver: &str, path: &Path, settings: &str) -> String {
    format!(
        r#"{{"v":1,"cmd":"open","minor":null,"image":{{"driver":"{driver}","path":"{}"}},"settings":{settings}}}"#,
        path.display()
    )
}

/// The error of a reply line, which must be one.
fn error_of(reply: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(reply).expect("a JSON reply line");
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
        .to_owned()
}

fn parallax_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    run_ok(
        Command::new(bin("parallax-img"))
            .args(["create", "--size", "16M"])
            .arg(&p),
    );
    p
}

/// Two VBDs (a raw image and a Parallax one) with NBD exports, then sizes beyond what a
/// tapdisk limited to 3 GiB of address space can have: the refusals name the setting and the
/// limit, and both VBDs and their exports keep serving.
#[test]
fn sizes_beyond_the_tapdisks_memory_are_refused_and_it_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_idir, img) = image(16 * MIB).unwrap();
    let plx = parallax_image(dir.path(), "a.plx");
    let plx2 = parallax_image(dir.path(), "b.plx");
    let mut td = Tapdisk::start_wrapped(
        &dir.path().join("run"),
        &["prlimit", "--as=3221225472", "--"],
        &["--log-level", "info"],
    )
    .unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    td.open(&format!("aio:{}", img.display()), exported(&a))
        .unwrap();
    td.open(&format!("parallax:{}", plx.display()), exported(&b))
        .unwrap();
    nbd_round_trip(&a, 1);
    nbd_round_trip(&b, 1);

    for (line, says) in [
        (
            open_line("parallax", &plx2, r#"{"cache_slots":1048576}"#),
            "1048576 Parallax metadata cache slots (cache_slots: 4160 MiB of memory) is more \
             than this tapdisk can have",
        ),
        (
            open_line("aio", &img, r#"{"early":{"cache_mb":65536}}"#),
            "an early-read cache of 65536 MiB (early.cache_mb",
        ),
    ] {
        let e = error_of(&td.raw_call(&line).unwrap());
        assert!(e.contains(says), "{e}");
        assert!(e.contains("RLIMIT_AS"), "{e}");
        assert!(td.alive(), "the tapdisk died refusing {line}");
    }
    // Nothing was claimed or opened for them; the two VBDs serve on.
    let minors = std::fs::read_dir(tapdisk_control::RunDir(dir.path().join("run")).minor_dir())
        .unwrap()
        .count();
    assert_eq!(minors, 2);
    assert_eq!(td.stats(0).unwrap()["nbd"]["connections"], 0);
    nbd_round_trip(&a, 2);
    nbd_round_trip(&b, 2);
    // What fits is opened.
    let reply = td
        .raw_call(&open_line(
            "aio",
            &img,
            r#"{"early":{"cache_mb":64},"force_share":true}"#,
        ))
        .unwrap();
    assert!(reply.contains(r#""ok""#), "{reply}");
}

/// Without a limit of its own, a tapdisk refuses an early-read cache bigger than the memory
/// the machine has available (on machines with less than 64 GiB available: the largest cache
/// the setting's range allows is 64 GiB).
#[test]
fn a_cache_bigger_than_memory_is_refused() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let available_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    if available_kib * 1024 > 65536 * MIB {
        println!("skipped: this machine has more memory available than the largest cache");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_idir, img) = image(16 * MIB).unwrap();
    let mut td = Tapdisk::start_in(&dir.path().join("run")).unwrap();
    let a = dir.path().join("a.sock");
    td.open(&format!("aio:{}", img.display()), exported(&a))
        .unwrap();
    nbd_round_trip(&a, 1);
    let e = error_of(
        &td.raw_call(&open_line("aio", &img, r#"{"early":{"cache_mb":65536}}"#))
            .unwrap(),
    );
    assert!(
        e.contains("early-read cache of 65536 MiB") && e.contains("available memory"),
        "{e}"
    );
    assert!(td.alive());
    nbd_round_trip(&a, 2);
}

/// A tapdisk with few file descriptors left refuses another VBD, saying so, and the VBDs it
/// has keep serving (their NBD clients included).
#[test]
fn an_open_without_descriptors_left_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_idir, img) = image(16 * MIB).unwrap();
    let mut td = Tapdisk::start_wrapped(
        &dir.path().join("run"),
        &["prlimit", "--nofile=200", "--"],
        &["--log-level", "info"],
    )
    .unwrap();
    let mut opened = Vec::new();
    let refusal = loop {
        let sock = dir.path().join(format!("{}.sock", opened.len()));
        let line = open_line(
            "aio",
            &img,
            &format!(r#"{{"nbd":"unix:{}","read_only":true}}"#, sock.display()),
        );
        let reply = td.raw_call(&line).unwrap();
        if reply.contains(r#""ok""#) {
            opened.push(sock);
            assert!(opened.len() < 40, "no refusal with 200 descriptors");
            continue;
        }
        break error_of(&reply);
    };
    assert!(
        refusal.contains("file descriptors") && refusal.contains("ulimit -n"),
        "{refusal}"
    );
    assert!(!opened.is_empty());
    assert!(td.alive());
    let mut c = Client::connect(&opened[0], Duration::from_secs(10)).unwrap();
    assert_eq!(c.read(0, 4096).unwrap().len(), 4096);
    c.disconnect().unwrap();
}

/// A ring that cannot be set up (here: io_uring's fixed-file table is larger than a limit of
/// 100 open files) fails its one NBD connection, which the client sees closed at once; the
/// connection's thread does not wait forever for a ring that is gone.
#[test]
fn an_nbd_connection_whose_ring_fails_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (_idir, img) = image(16 * MIB).unwrap();
    let mut td = Tapdisk::start_wrapped(
        &dir.path().join("run"),
        &["prlimit", "--nofile=100", "--"],
        &["--log-level", "info"],
    )
    .unwrap();
    let a = dir.path().join("a.sock");
    td.open(&format!("aio:{}", img.display()), exported(&a))
        .unwrap();
    let t = std::time::Instant::now();
    let mut c = Client::connect(&a, Duration::from_secs(30)).unwrap();
    assert!(c.read(0, 4096).is_err(), "a read through a failed ring");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(td.alive());
    assert!(td.stats(0).is_ok());
}
