//! The real `td-bench` binary against real tapdisk processes: `verify` passes on every ring
//! order and ABI tested and fails when the image is corrupted behind tapdisk's back; `run`
//! prints parseable JSON; `--device` drives a VBD someone else opened; a dead tapdisk is a
//! one-line error.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use tapdisk_control::VbdSettings;
use tapdisk_e2e::*;

/// What a td-bench run left: its output, and its pid (which names its temporary folder).
struct Run {
    out: Output,
    pid: u32,
}

impl std::ops::Deref for Run {
    type Target = Output;
    fn deref(&self) -> &Output {
        &self.out
    }
}

fn td_bench(args: &[&str]) -> Run {
    let child = Command::new(bin("td-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running td-bench");
    let pid = child.id();
    let out = child.wait_with_output().expect("waiting for td-bench");
    eprintln!(
        "td-bench {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Run { out, pid }
}

fn last_line(out: &Run) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

fn verify_passes(extra: &[&str]) {
    verify_n_passes(extra, 20000)
}

fn verify_n_passes(extra: &[&str], n: u32) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let n_s = n.to_string();
    let mut args = vec![
        "verify",
        "--image",
        img.to_str().unwrap(),
        "--size",
        "64M",
        "--requests",
        &n_s,
    ];
    args.extend_from_slice(extra);
    let out = td_bench(&args);
    assert_eq!(last_line(&out), format!("{n} passed, 0 failed"));
    assert!(out.status.success(), "exit status {}", out.status);
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        64 << 20,
        "the image was created at --size"
    );
    assert_no_leftovers(&out);
}

/// The private tapdisk named in the header line (if printed) is gone, and so is the temporary
/// folder.
fn assert_no_leftovers(run: &Run) {
    let err = String::from_utf8_lossy(&run.stderr);
    let pid = err
        .split("private tapdisk ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse::<u32>().ok());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // (--json runs print no header.)
    while let Some(pid) = pid {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let alive = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'));
        if !alive {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "private tapdisk {pid} still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let tmp = std::env::temp_dir();
    let prefix = format!("td-bench-{}-", run.pid);
    let stale: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(
        stale.is_empty(),
        "td-bench left {stale:?} in {}",
        tmp.display()
    );
}

#[test]
fn verify_ring_order_0() {
    verify_passes(&["--ring-order", "0", "--seed", "1"]);
}

#[test]
fn verify_ring_order_4() {
    verify_passes(&["--ring-order", "4", "--seed", "2"]);
}

#[test]
fn verify_indirect_requests_merged_and_not() {
    // Half the reads and writes indirect, up to 128 segments (512 KiB), on a 4-page ring.
    verify_n_passes(
        &[
            "--ring-order",
            "2",
            "--indirect-segments",
            "128",
            "--seed",
            "4",
        ],
        4000,
    );
    verify_n_passes(
        &[
            "--indirect-segments",
            "64",
            "--no-merge",
            "--abi",
            "x86_32",
            "--seed",
            "5",
        ],
        3000,
    );
}

#[test]
fn verify_x86_32_abi() {
    verify_passes(&["--abi", "x86_32", "--seed", "3"]);
}

#[test]
fn verify_default_temporary_image_cleans_up() {
    let out = td_bench(&[
        "verify",
        "--requests",
        "2000",
        "--abi",
        "x86_32",
        "--max-segments",
        "3",
    ]);
    assert_eq!(last_line(&out), "2000 passed, 0 failed");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temporary image"));
    assert_no_leftovers(&out);
}

#[test]
fn run_count_json() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let out = td_bench(&[
        "run",
        "--image",
        img.to_str().unwrap(),
        "--size",
        "64M",
        "--count",
        "5000",
        "--json",
    ]);
    assert!(out.status.success(), "exit status {}", out.status);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("td-bench printed JSON");
    assert!(v["iops"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["ios"], 5000);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["bs"], 4096);
    let l = &v["lat_us"];
    let (p50, p99, max) = (
        l["p50"].as_f64().unwrap(),
        l["p99"].as_f64().unwrap(),
        l["max"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{l}");
    assert_no_leftovers(&out);
}

#[test]
fn a_trace_has_both_ring_steps_of_every_request() {
    // Each request's trace pairs the frontend's stamps with tapdisk's: published, popped,
    // ..., answered, seen. A step whose end came before its start is left out of the trace,
    // so a request without both ring steps means the two sides' stamps disagree (the
    // frontend once stamped a request after its kick returned, when tapdisk, woken on the
    // other CPU, could already have popped it). One IO in flight, so most pushes kick a
    // sleeping tapdisk.
    let dir = tempfile::tempdir().unwrap();
    let (img, trace) = (dir.path().join("disk.img"), dir.path().join("trace.json"));
    let out = td_bench(&[
        "run",
        "--image",
        img.to_str().unwrap(),
        "--size",
        "16M",
        "--rw",
        "randrw",
        "--iodepth",
        "1",
        "--count",
        "3000",
        "--trace",
        trace.to_str().unwrap(),
        "--trace-size",
        "4096",
    ]);
    assert!(out.status.success(), "exit status {}", out.status);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trace).unwrap()).expect("a JSON trace");
    let events = v["traceEvents"].as_array().expect("traceEvents");
    let begun = |name: &str| {
        events
            .iter()
            .filter(|e| e["ph"] == "b" && e["name"] == name)
            .count()
    };
    let requests = events
        .iter()
        .filter(|e| e["ph"] == "b" && e["cat"] == "request")
        .count();
    assert!(requests >= 3000, "{requests} requests traced");
    for step in [
        "ring (frontend to tapdisk)",
        "ring (tapdisk to frontend)",
        "io",
    ] {
        assert_eq!(begun(step), requests, "requests with a '{step}' step");
    }
}

#[test]
fn run_splits_large_ios_into_ring_requests() {
    // 1M IOs with 4 segments per request: 64 ring requests each, 8 IOs in flight = 512
    // requests queued against a 32-slot ring. Every one must come back, none with an error.
    let out = td_bench(&[
        "run",
        "--rw",
        "randrw",
        "--bs",
        "1M",
        "--iodepth",
        "8",
        "--count",
        "200",
        "--size",
        "32M",
        "--max-segments",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "exit status {}", out.status);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("td-bench printed JSON");
    assert_eq!(v["ring_requests_per_io"], 64, "{v}");
    assert_eq!(v["ios"], 200, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["bs"], 1 << 20, "{v}");
    assert!(v["read_ios"].as_u64().unwrap() > 0 && v["write_ios"].as_u64().unwrap() > 0);
}

#[test]
fn verify_via_device_of_another_tapdisk() {
    let td = Tapdisk::start().unwrap();
    let (_dir, img) = image(16 << 20).unwrap();
    let vbd = td
        .open(&format!("aio:{}", img.display()), VbdSettings::default())
        .unwrap();
    let out = td_bench(&[
        "verify",
        "--device",
        &vbd.device,
        "--requests",
        "5000",
        "--iodepth",
        "16",
    ]);
    assert_eq!(last_line(&out), "5000 passed, 0 failed");
    assert!(out.status.success());
    // td-bench must not have shut down a tapdisk it did not start.
    let mut c = td.client().unwrap();
    assert!(c.call(tapdisk_control::proto::Command::List).is_ok());
}

#[test]
fn errors_are_one_line() {
    let out = td_bench(&["run", "--device", "/nonexistent/tapdev0", "--count", "10"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("td-bench: ") && err.contains("/nonexistent/tapdev0"),
        "{err}"
    );
}

/// Overwrites the whole image with 0xee, as if someone wrote to it behind tapdisk's back.
fn corrupt(img: &Path) {
    let mut f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let len = f.metadata().unwrap().len();
    let chunk = vec![0xeeu8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = chunk.len().min((len - done) as usize);
        f.write_all(&chunk[..n]).unwrap();
        done += n as u64;
    }
    f.sync_all().unwrap();
}

#[test]
fn verify_fails_on_corruption_behind_tapdisks_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut child = Command::new(bin("td-bench"))
        .args(["verify", "--image", img.to_str().unwrap(), "--size", "16M"])
        .args(["--requests", "60000", "--seed", "9"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut header = String::new();
    err.read_line(&mut header).unwrap();
    assert!(
        header.starts_with("td-bench verify: 60000 requests"),
        "{header}"
    );
    // The disk is attached and requests are flowing: pull the rug.
    corrupt(&img);
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    eprintln!("--- stdout\n{stdout}--- stderr\n{header}{rest}");
    assert!(!status.success(), "verify passed over a corrupted image");
    let last = stdout.lines().last().unwrap_or("");
    let failed: u64 = last
        .strip_suffix(" failed")
        .and_then(|s| s.split(", ").nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line: {last:?}"));
    assert!(failed > 0, "{last}");
    assert!(
        rest.contains("FAIL") && rest.contains("unrecognised bytes (eeee"),
        "{rest}"
    );
}
