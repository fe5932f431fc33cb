//! The `parallax:` driver end to end, against real processes: td-bench verify through the
//! local ring (several ring orders, direct and indirect requests, injected faults), qemu-io
//! and qemu-img through the NBD export, snapshots that stay unchanged while their disk is
//! overwritten and clones that diverge, served from one tapdisk, the metadata cache counters
//! in `tap-ctl stats`, and a crash test: tapdisk killed with SIGKILL at random points during
//! writes and flushes, after which `parallax-img check` is clean and every write acknowledged
//! before the last completed flush reads back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkif::local::{FrontRequest, FrontendConfig, LocalFrontend};
use blkif::protocol::{op, status};
use blkif::Segment;
use tapdisk_control::client::Client;
use tapdisk_control::proto::{Command as Ctl, Reply};
use tapdisk_control::{Driver, ImageSpec, VbdSettings};
use tapdisk_e2e::crash::{check_after_crash, random_range, sector_data, Rng, SectorModel, SECTOR};
use tapdisk_e2e::*;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn plx(args: &[&str]) -> String {
    stdout(&run_ok(Command::new(bin("parallax-img")).args(args)))
}

fn check_clean(img: &Path) {
    let out = plx(&["check", img.to_str().unwrap()]);
    assert!(out.contains("no problems found"), "{out}");
}

/// Destroys the VBDs of a run directory at the end, even when the test fails.
struct Destroy<'a>(&'a Path, Vec<u32>);
impl Drop for Destroy<'_> {
    fn drop(&mut self) {
        for m in self.1.iter().rev() {
            let _ = tap_ctl(self.0)
                .args(["destroy", "-m", &m.to_string()])
                .output();
        }
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let text = stdout(&run_ok(&mut c));
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.contains("error"), "{text}");
    text
}

fn td_bench(args: &[&str]) -> String {
    let out = Command::new(bin("td-bench"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running td-bench");
    let text = stdout(&out);
    eprintln!(
        "td-bench {}\n{text}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "td-bench failed: {}", out.status);
    text
}

#[test]
fn td_bench_verify_on_parallax_images() {
    // Ring orders and request shapes; each run on a fresh image, checked afterwards.
    let dir = tempfile::tempdir().unwrap();
    for (i, extra) in [
        &["--ring-order", "0"][..],
        &["--ring-order", "2", "--indirect-segments", "32"][..],
        &["--ring-order", "5", "--indirect-segments", "256"][..],
        // Merged IOs failing and torn underneath: retried one by one, nothing else lost.
        &[
            "--ring-order",
            "1",
            "--indirect-segments",
            "16",
            "--inject-faults",
            "seed=5,fail=2000,tear",
            "--allow-errors",
        ][..],
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("v{i}.plx"));
        let spec = format!("parallax:{}", img.display());
        let mut args = vec![
            "verify",
            "--image",
            &spec,
            "--size",
            "32M",
            "--requests",
            "3000",
            "--seed",
            "7",
        ];
        args.extend_from_slice(extra);
        let out = td_bench(&args);
        assert_eq!(
            out.lines().last(),
            Some("3000 passed, 0 failed"),
            "{extra:?}"
        );
        check_clean(&img);
    }
}

#[test]
fn nbd_export_of_a_parallax_disk_matches_a_raw_file_and_counts_cache_hits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rundir = d.join("run");
    let img = d.join("vm.plx");
    let raw = d.join("ref.raw");
    plx(&["create", img.to_str().unwrap(), "--size", "64M"]);
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sock = d.join("vm.nbd");
    let out = run_ok(
        tap_ctl(&rundir)
            .args(["create", "--cache-slots", "10", "-a"])
            .arg(format!("parallax:{}", img.display()))
            .arg("--nbd")
            .arg(format!("unix:{}", sock.display())),
    );
    assert!(stdout(&out).trim().ends_with("tapdev0"));
    let _destroy = Destroy(&rundir, vec![0]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    // Sizes and alignments: whole blocks, part blocks, a zero write, across leaf boundaries.
    let writes = [
        "write -P 0x5a 0 1M",
        "write -P 0x11 1M 4k",
        "write -P 0x22 3M 64k",
        "write -P 0x33 5120 512",
        "write -P 0x44 2040k 16k",
        "write -P 0x55 63M 1M",
        "write -z 3M 4k",
        "write -P 0x66 3076k 1536",
    ];
    qemu_io(&uri, &writes);
    let mut local = Command::new("qemu-io");
    local.args(["-f", "raw"]).arg(&raw);
    for w in writes {
        local.args(["-c", w]);
    }
    run_ok(&mut local);
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &uri])
            .arg(&raw),
    );
    assert!(stdout(&out).contains("Images are identical"));
    let text = qemu_io(
        &uri,
        &[
            "read -P 0x55 63M 1M",
            "read -P 0x33 5120 512",
            "read -P 0 3M 4k",
            "read -P 0x66 3076k 1536",
            "read -P 0 32M 1M",
        ],
    );
    assert!(text.contains("read 1048576/1048576 bytes at offset 33554432"));
    // The metadata cache's counters, per layer, with the slots asked for.
    let stats: serde_json::Value = serde_json::from_str(&stdout(&run_ok(
        tap_ctl(&rundir).args(["stats", "-m", "0"]),
    )))
    .unwrap();
    let drv = &stats["driver"];
    assert_eq!(drv["type"], "parallax", "{stats}");
    assert_eq!(drv["volume"], "base");
    assert_eq!(drv["cache"]["slots"], 10);
    for layer in ["v2p", "p2m"] {
        assert!(
            drv["cache"][layer]["lookups"].as_u64().unwrap() > 0,
            "{layer}: {drv}"
        );
    }
    run_ok(tap_ctl(&rundir).args(["destroy", "-m", "0"]));
    check_clean(&img);
    // A clear error for a volume that is not there: the tapdisk started for it refuses it and
    // is stopped again.
    let out = tap_ctl(&rundir)
        .args(["create", "-a"])
        .arg(format!("parallax:{}@nope", img.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has no volume named 'nope' (it has: base)"),
        "{err}"
    );
}

/// The pid of the tapdisk serving minor 0 of `rundir`.
fn pid_of(rundir: &Path) -> u32 {
    let out = stdout(&run_ok(tap_ctl(rundir).arg("list")));
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out}"))
}

#[test]
fn snapshots_stay_unchanged_and_clones_diverge() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rundir = d.join("run");
    let img = d.join("vm.plx");
    let i = img.to_str().unwrap();
    plx(&["create", i, "--size", "64M"]);
    let nbd = |name: &str| d.join(format!("{name}.nbd"));
    let uri = |name: &str| format!("nbd+unix:///?socket={}", nbd(name).display());
    let serve = |spec: String, name: &str, pid: Option<u32>| {
        let mut c = tap_ctl(&rundir);
        match pid {
            None => c.arg("create"),
            Some(p) => c.args(["open", "-p", &p.to_string()]),
        };
        c.arg("-a")
            .arg(spec)
            .arg("--nbd")
            .arg(format!("unix:{}", nbd(name).display()));
        stdout(&run_ok(&mut c)).trim().to_string()
    };
    let before = [
        "write -P 0x5a 0 1M",
        "write -P 0x11 3M 64k",
        "write -P 0x22 63M 1M",
        "write -P 0x33 4100 1000",
    ];
    // 0x33 at 4100..5100 lies inside the first 1M of 0x5a.
    let before_reads = [
        "read -P 0x5a 0 4100",
        "read -P 0x5a 5100 1043476",
        "read -P 0x11 3M 64k",
        "read -P 0x22 63M 1M",
        "read -P 0x33 4100 1000",
        "read -P 0 8M 1M",
    ];
    {
        serve(format!("parallax:{i}"), "live", None);
        let _destroy = Destroy(&rundir, vec![0]);
        qemu_io(&uri("live"), &before);
    }
    plx(&["snapshot", i, "snap"]);
    plx(&["clone", &format!("{i}@snap"), "cl"]);

    // One tapdisk serves the disk, its snapshot and the clone (one process holds the image).
    let live_dev = serve(format!("parallax:{i}"), "live", None);
    let mut destroy = Destroy(&rundir, vec![0]);
    let pid = pid_of(&rundir);
    serve(format!("parallax:{i}@snap"), "snap", Some(pid));
    destroy.1.push(1);
    serve(format!("parallax:{i}@cl"), "cl", Some(pid));
    destroy.1.push(2);
    let list = stdout(&run_ok(tap_ctl(&rundir).arg("list")));
    assert_eq!(list.lines().count(), 3, "{list}");

    // Overwrite the live disk: patterns, then td-bench verify's random IO all over it.
    qemu_io(
        &uri("live"),
        &[
            "write -P 0x77 0 4M",
            "write -P 0x78 62M 2M",
            "read -P 0x77 0 4M",
            "read -P 0x78 63M 1M",
        ],
    );
    let out = td_bench(&["verify", "--device", &live_dev, "--requests", "3000"]);
    assert_eq!(out.lines().last(), Some("3000 passed, 0 failed"));

    // The snapshot still holds what the disk held when it was taken, and refuses writes.
    qemu_io(&uri("snap"), &before_reads);
    let w = Command::new("qemu-io")
        .args(["-f", "raw", &uri("snap"), "-c", "write -P 1 0 4k"])
        .output()
        .unwrap();
    let text = format!("{}{}", stdout(&w), String::from_utf8_lossy(&w.stderr));
    assert!(
        !w.status.success() || text.contains("failed"),
        "a write to the snapshot: {text}"
    );

    // The clone starts as the snapshot, then diverges without changing it.
    qemu_io(&uri("cl"), &before_reads);
    qemu_io(
        &uri("cl"),
        &[
            "write -P 0x99 0 64k",
            "write -P 0x98 3M 4k",
            "read -P 0x99 0 64k",
            "read -P 0x98 3M 4k",
            "read -P 0x11 3076k 60k",
        ],
    );
    qemu_io(&uri("snap"), &before_reads);

    // Byte for byte: the snapshot equals a raw file given the same writes.
    let raw = d.join("ref.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut local = Command::new("qemu-io");
    local.args(["-f", "raw"]).arg(&raw);
    for w in before {
        local.args(["-c", w]);
    }
    run_ok(&mut local);
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &uri("snap")])
            .arg(&raw),
    );
    assert!(stdout(&out).contains("Images are identical"));

    // Each VBD shows the cache counters of the one image they share.
    let stats: serde_json::Value = serde_json::from_str(&stdout(&run_ok(
        tap_ctl(&rundir).args(["stats", "-m", "1"]),
    )))
    .unwrap();
    assert_eq!(stats["driver"]["volume"], "snap");
    assert_eq!(stats["driver"]["read_only"], true);

    drop(destroy);
    check_clean(&img);
    let list = plx(&["list", i]);
    assert!(
        list.contains("snap") && list.contains("cl") && list.contains("base"),
        "{list}"
    );
}

// ---- The crash test ----------------------------------------------------------------------

const DISK: u64 = 8 << 20;
const SECTORS: u64 = DISK / SECTOR;
/// Writes in flight at most.
const DEPTH: usize = 16;
/// Pages of guest memory per in-flight write (up to 64 sectors, unaligned).
const PAGES_PER_SLOT: usize = 9;

/// One round: serve the image, write and flush at random until `kill_after`, then SIGKILL
/// tapdisk. Returns the model with what was submitted and flushed.
fn crash_round(
    img: &Path,
    dir: &Path,
    rng: &mut Rng,
    model: &mut [SectorModel],
    next_id: &mut u32,
    kill_after: Duration,
) -> (u64, u64) {
    let rundir = dir.join("run");
    let _ = std::fs::remove_dir_all(&rundir);
    let mut td = Tapdisk::start_logged(&rundir, &dir.join("tapdisk.log")).expect("tapdisk");
    let vbd = match Client::connect_pid(&td.rundir, td.pid)
        .unwrap()
        .call(Ctl::Open {
            minor: None,
            image: ImageSpec::new(Driver::Parallax, img),
            settings: VbdSettings::default(),
        })
        .unwrap()
    {
        Reply::Opened { vbd } => vbd,
        other => panic!("open: {other:?}"),
    };
    let mut fe = LocalFrontend::connect(
        Path::new(&vbd.device),
        FrontendConfig {
            ring_order: 1,
            mem_pages: (DEPTH * PAGES_PER_SLOT) as u32,
            ..FrontendConfig::default()
        },
    )
    .unwrap();
    let mut free: Vec<usize> = (0..DEPTH).collect();
    // Per request id: its memory slot, the write's sector range (None for a flush) and its
    // sequence number.
    type InFlight = (usize, Option<(u64, u64)>, u64);
    let mut flight: HashMap<u64, InFlight> = HashMap::new();
    let mut seq = 0u64;
    let mut flush_in_flight = false;
    let (mut writes, mut flushes) = (0u64, 0u64);
    let start = Instant::now();
    let mut buf = vec![0u8; PAGES_PER_SLOT * 4096];
    let killed = 'run: loop {
        if start.elapsed() >= kill_after {
            break 'run true;
        }
        while let Some(&slot) = free.last() {
            seq += 1;
            if !flush_in_flight && rng.below(8) == 0 {
                free.pop();
                let req = FrontRequest::Rw {
                    op: op::FLUSH_DISKCACHE,
                    id: seq,
                    sector: 0,
                    segments: &[],
                };
                assert!(fe.queue(&req));
                flight.insert(seq, (slot, None, seq));
                flush_in_flight = true;
                continue;
            }
            // A range overlapping no write in flight (so per sector, submission order is the
            // order on disk).
            let (s, n) = random_range(rng, SECTORS);
            if flight
                .values()
                .any(|&(_, r, _)| r.is_some_and(|(a, b)| a < s + n && s < b))
            {
                break;
            }
            free.pop();
            *next_id += 1;
            let id = *next_id;
            let off = (s % 8) as usize;
            for k in 0..n as usize {
                sector_data(
                    id,
                    s + k as u64,
                    &mut buf[(off + k) * 512..(off + k + 1) * 512],
                );
            }
            let pages = (off + n as usize).div_ceil(8);
            let base = slot * PAGES_PER_SLOT;
            fe.write_mem(base * 4096, &buf[..pages * 4096]);
            let segs: Vec<Segment> = (0..pages)
                .map(|p| {
                    let first = if p == 0 { off } else { 0 };
                    let last = (off + n as usize - 1 - p * 8).min(7);
                    Segment {
                        gref: (base + p) as u32,
                        first_sect: first as u8,
                        last_sect: last as u8,
                        pad: 0,
                    }
                })
                .collect();
            let req = FrontRequest::Rw {
                op: op::WRITE,
                id: seq,
                sector: s,
                segments: &segs,
            };
            assert!(fe.queue(&req));
            for k in s..s + n {
                model[k as usize].since.push((seq, id));
            }
            flight.insert(seq, (slot, Some((s, s + n)), seq));
        }
        if fe.push().is_err() {
            break 'run false;
        }
        match fe.wait(Some(Duration::from_millis(200))) {
            Ok(_) => {}
            Err(_) => break 'run false,
        }
        let mut done = Vec::new();
        fe.poll(|r| done.push((r.id, r.status)));
        for (id, st) in done {
            assert_eq!(st, status::OKAY, "request {id} failed");
            let (slot, range, fseq) = flight.remove(&id).expect("a request in flight");
            free.push(slot);
            match range {
                Some(_) => writes += 1,
                None => {
                    // Everything submitted before the flush is durable now.
                    flushes += 1;
                    flush_in_flight = false;
                    for m in model.iter_mut() {
                        if let Some(k) = m.since.iter().rposition(|&(q, _)| q < fseq) {
                            m.durable = m.since[k].1;
                            m.since.drain(..=k);
                        }
                    }
                }
            }
        }
    };
    assert!(killed, "tapdisk went away before it was killed");
    let _ = td.child.kill();
    let _ = td.child.wait();
    (writes, flushes)
}

#[test]
fn sigkill_during_writes_and_flushes_loses_nothing_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let img: PathBuf = dir.path().join("crash.plx");
    plx(&["create", img.to_str().unwrap(), "--size", "8M"]);
    let mut model = vec![SectorModel::default(); SECTORS as usize];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut next_id = 0u32;
    let t0 = Instant::now();
    let mut rounds = 0;
    let (mut writes, mut flushes) = (0u64, 0u64);
    let mut disk = vec![0u8; DISK as usize];
    // Bounded: as many rounds as fit in 15 s, at least 8.
    while rounds < 8 || (t0.elapsed() < Duration::from_secs(15) && rounds < 40) {
        let kill_after = Duration::from_millis(30 + rng.below(250));
        let (w, f) = crash_round(
            &img,
            dir.path(),
            &mut rng,
            &mut model,
            &mut next_id,
            kill_after,
        );
        writes += w;
        flushes += f;
        rounds += 1;
        check_clean(&img);
        // Every sector holds its content at the last completed flush, or a later write's.
        let spec: parallax::DiskSpec = img.to_str().unwrap().parse().unwrap();
        let mut d = parallax::Disk::open(
            &spec,
            parallax::DiskOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        d.read_at(0, &mut disk).unwrap();
        drop(d);
        check_after_crash(rounds, &disk, &mut model);
    }
    eprintln!(
        "{rounds} rounds in {:.1} s: {writes} writes and {flushes} flushes acknowledged",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        flushes > 0 && writes > 100,
        "{writes} writes, {flushes} flushes"
    );
}
