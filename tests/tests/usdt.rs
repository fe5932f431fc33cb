//! tapdisk's USDT probes (`tapdisk::probes`) as an operator uses them: `bpftrace -l` lists the
//! four, and the latency one-liner of docs/operations.md prints a histogram over requests a
//! frontend sends through a VBD. Needs root and Debian's bpftrace (tests/run.sh installs it);
//! tracefs is mounted if it is not.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tapdisk_e2e::{bin, run_ok};

const PROBES: [&str; 4] = [
    "request_pull",
    "driver_queue",
    "driver_complete",
    "response_push",
];

/// The histogram one-liner of docs/operations.md, for the tapdisk binary at `path`.
fn one_liner(path: &str) -> String {
    format!(
        "usdt:{path}:tapdisk:request_pull {{ @t[tid, arg0] = nsecs; }} \
         usdt:{path}:tapdisk:response_push /@t[tid, arg0]/ {{ \
         @us = hist((nsecs - @t[tid, arg0]) / 1000); delete(@t[tid, arg0]); }}"
    )
}

#[test]
fn bpftrace_lists_the_probes_and_the_one_liner_draws_a_histogram() {
    let tapdisk = bin("tapdisk").display().to_string();
    let out = run_ok(Command::new("bpftrace").args(["-l", &format!("usdt:{tapdisk}:*")]));
    let listed = String::from_utf8_lossy(&out.stdout);
    for p in PROBES {
        assert!(
            listed.contains(&format!("usdt:{tapdisk}:tapdisk:{p}")),
            "{p} not listed:\n{listed}"
        );
    }

    let tracing = std::path::Path::new("/sys/kernel/tracing");
    if std::fs::read_dir(tracing).map_or(true, |mut d| d.next().is_none()) {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
    let dir = tempfile::tempdir().unwrap();
    let rundir = dir.path().join("run");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let tap_ctl = |args: &[&str]| {
        let mut c = Command::new(bin("tap-ctl"));
        c.args(args)
            .env("TAPDISK_RS_RUNDIR", &rundir)
            .env("TAPDISK_RS_TAPDISK", bin("tapdisk"));
        String::from_utf8_lossy(&run_ok(&mut c).stdout)
            .trim()
            .to_owned()
    };
    let device = tap_ctl(&["create", "-a", &format!("aio:{}", img.display())]);

    let mut bt = Command::new("bpftrace")
        .args(["-e", &one_liner(&tapdisk)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bpftrace (tests/run.sh installs it)");
    // Wait until it has attached ("Attaching 2 probes...").
    let mut out = BufReader::new(bt.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !line.starts_with("Attaching") {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 || Instant::now() > deadline {
            let mut err = String::new();
            let _ = bt.stderr.take().unwrap().read_to_string(&mut err);
            panic!("bpftrace did not attach: {line}{err}");
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    run_ok(Command::new(bin("td-bench")).args([
        "verify",
        "--device",
        &device,
        "--requests",
        "3000",
    ]));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bt.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut rest = String::new();
    use std::io::Read;
    out.read_to_string(&mut rest).unwrap();
    let _ = bt.wait();
    println!("{rest}");
    assert!(rest.contains("@us:"), "no histogram:\n{rest}");
    let counted: u64 = rest
        .lines()
        .filter(|l| l.starts_with('['))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(2)
                .or_else(|| l.split_whitespace().nth(1))
        })
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    assert!(
        counted >= 3000,
        "the histogram counts {counted} requests, 3000 were sent"
    );
    tap_ctl(&["destroy", "-m", "0"]);
}
