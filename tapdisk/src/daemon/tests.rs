//! Tests of the control server: minor claims, settings refused on the socket, deadlines.

use super::*;

#[test]
fn minors_are_claimed_and_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let rd = RunDir(dir.path().into());
    rd.create().unwrap();
    let img: tapdisk_control::ImageSpec = "aio:/x.img".parse().unwrap();
    let a = claim_minor(&rd, None, &img).unwrap();
    let b = claim_minor(&rd, None, &img).unwrap();
    assert_eq!((a.minor, b.minor), (0, 1));
    assert!(claim_minor(&rd, Some(0), &img)
        .unwrap_err()
        .to_string()
        .contains("in use"));
    drop(a);
    assert_eq!(claim_minor(&rd, None, &img).unwrap().minor, 0);
    // A claim a dead process left is taken over when asked for.
    std::fs::write(rd.minor_marker(7), r#"{"pid":999999999}"#).unwrap();
    let c = claim_minor(&rd, Some(7), &img).unwrap();
    assert_eq!(c.took_over.as_ref().map(|r| r.pid), Some(999999999));
}

/// What tap-ctl refuses is refused when written to the socket directly, with the error
/// line naming the setting and its range, and nothing claimed or opened.
#[test]
fn settings_out_of_range_are_refused_on_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let rundir = RunDir(dir.path().join("run"));
    let log = Logger::root(slog::Discard, slog::o!());
    let (d, _listener) = Daemon::bind(rundir.clone(), log).unwrap();
    let open = |settings: &str| {
        format!(
            r#"{{"v":1,"cmd":"open","minor":null,"image":{{"driver":"aio","path":"{}"}},"settings":{settings}}}"#,
            img.display()
        )
    };
    let error = |line: &str| match d.answer(line.as_bytes()) {
        (ResultMsg::Error(e), false) => e,
        other => panic!("{line}: {other:?}"),
    };
    for (settings, says) in [
        (
            r#"{"early":{"percent":250}}"#,
            "early-read percent 250% is out of range: early.percent takes 0..=100",
        ),
        (
            r#"{"early":{"chunk_kb":0}}"#,
            "early-read chunk 0 KiB is out of range: early.chunk_kb takes 4..=16384",
        ),
        (
            r#"{"faults":{"fail_ppm":1000001}}"#,
            "faults.fail_ppm takes 0..=1000000",
        ),
        (
            r#"{"faults":{"delay_ppm":4294967295}}"#,
            "faults.delay_ppm takes 0..=1000000",
        ),
        (
            r#"{"poll_us":4294967295}"#,
            "poll time 4294967295 µs is out of range: poll_us takes 0..=10000",
        ),
        (r#"{"max_segments":12}"#, "max_segments takes 1..=11"),
        (
            r#"{"cache_slots":8}"#,
            "parallax:, vhd: and qcow2: images only",
        ),
    ] {
        let e = error(&open(settings));
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(says), "{settings}: {e}");
    }
    assert!(lock(&d.vbds).is_empty());
    assert_eq!(std::fs::read_dir(rundir.minor_dir()).unwrap().count(), 0);
    // The same open with settings in range succeeds.
    match d.answer(open(r#"{"poll_us":10000}"#).as_bytes()) {
        (ResultMsg::Ok(Reply::Opened { vbd }), false) => assert_eq!(vbd.minor, 0),
        other => panic!("{other:?}"),
    }
    let e = error(
        r#"{"v":1,"cmd":"unpause","minor":0,"image":{"driver":"aio","path":"/x","volume":"v"}}"#,
    );
    assert!(e.contains("aio images have no volumes"), "{e}");
    assert!(matches!(
        d.answer(br#"{"v":1,"cmd":"close","minor":0}"#),
        (ResultMsg::Ok(Reply::Done), false)
    ));
}

/// A daemon serving its control socket in a temporary run directory (its thread lives on
/// after the test; nothing else uses the socket).
fn serving() -> (tempfile::TempDir, Arc<Daemon>, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let rundir = RunDir(dir.path().join("run"));
    let log = Logger::root(slog::Discard, slog::o!());
    let (d, listener) = Daemon::bind(rundir.clone(), log).unwrap();
    let d2 = d.clone();
    std::thread::spawn(move || d2.serve(listener));
    (dir, d, rundir.ctl_socket(std::process::id()))
}

fn hello(path: &std::path::Path) -> std::time::Duration {
    let t = std::time::Instant::now();
    let mut c = tapdisk_control::client::Client::connect(path).unwrap();
    assert!(matches!(c.call(Command::Hello), Ok(Reply::Hello { .. })));
    t.elapsed()
}

/// A request trickled one byte at a time is cut off once it has taken longer than
/// [`LINE_DEADLINE`] (not per read: each byte comes well within any per-read timeout), with
/// an error line; other connections are answered at once meanwhile.
#[test]
fn a_trickled_request_is_cut_off_at_its_deadline() {
    use std::io::{BufRead, BufReader, Write};
    let (_dir, _d, path) = serving();
    let slow = std::os::unix::net::UnixStream::connect(&path).unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut writer = slow.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for b in br#"{"v":1,"cmd":"hello"}"#.iter().take(20) {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(150));
        }
    });
    assert!(hello(&path) < std::time::Duration::from_millis(500));
    let mut line = String::new();
    BufReader::new(&slow).read_line(&mut line).unwrap();
    let took = start.elapsed();
    assert!(
        line.contains("not finished within 1 s"),
        "{line:?} after {took:?}"
    );
    assert!(
        took >= LINE_DEADLINE && took < LINE_DEADLINE * 2,
        "cut off after {took:?}"
    );
    let mut rest = String::new();
    assert_eq!(BufReader::new(&slow).read_line(&mut rest).unwrap(), 0);
    trickle.join().unwrap();
    assert!(hello(&path) < std::time::Duration::from_millis(500));
}

/// At most [`MAX_CONNECTIONS`] control connections are served at once: the next one gets an
/// error line, and a slot comes back when a peer leaves.
#[test]
fn control_connections_are_limited_and_slots_come_back() {
    use std::io::{BufRead, BufReader};
    let (_dir, d, path) = serving();
    let idle: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while d.control_conns.load(Ordering::Acquire) < MAX_CONNECTIONS {
        assert!(
            std::time::Instant::now() < deadline,
            "connections not taken"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let extra = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut line = String::new();
    BufReader::new(&extra).read_line(&mut line).unwrap();
    assert!(
        line.contains("already serves 64 control connections"),
        "{line}"
    );
    drop(idle);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while d.control_conns.load(Ordering::Acquire) > 0 {
        assert!(std::time::Instant::now() < deadline, "slots not given back");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    hello(&path);
}
