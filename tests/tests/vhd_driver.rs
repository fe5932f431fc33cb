//! The `vhd:` driver end to end, against real processes.
//!
//! - The live snapshot flow blktap users rely on, thirty times: `tap-ctl pause`, `vhd-util
//!   snapshot` of the served leaf, `tap-ctl unpause -a vhd:NEW_LEAF`, with writes between and
//!   a write sent while paused (it completes after the unpause, into the new leaf). Every
//!   level reads back, served read-only by the same tapdisk over NBD and through the library,
//!   as a raw reference model says; the old leaves never change again; `vhd-util check`
//!   (ours, and blktap3's where its peers folder is present) is clean at every level; then the
//!   chain is coalesced into its base, which holds the same content (`qemu-img compare`
//!   against a raw file).
//! - A crash test: tapdisk killed with SIGKILL under NBD load with flushes, 30 rounds on a
//!   chain that grows a snapshot every ten: afterwards every write acknowledged before a
//!   completed flush is there, no sector shows anything but a write made to it (or the
//!   parent's data, or zeroes, where that is what it held), and `vhd-util check` is clean.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tapdisk_control::proto::{Command as Ctl, Reply};
use tapdisk_control::{NbdListen, VbdSettings};
use tapdisk_e2e::blktap::{blktap, bt};
use tapdisk_e2e::crash::{check_after_crash, random_range, sectors_data, Rng, SectorModel, SECTOR};
use tapdisk_e2e::nbd::NbdClient;
use tapdisk_e2e::*;

const MB: u64 = 1 << 20;

fn text(o: std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Our vhd-util with `args` (paths as text); its stdout.
fn vhd_util(args: &[&str]) -> String {
    text(run_ok(Command::new(bin("vhd-util")).args(args)))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// `vhd-util check` of ours, and of blktap3 where it is available, must call `p` valid.
fn check_clean(p: &Path) {
    let out = vhd_util(&["check", "-n", s(p)]);
    assert!(
        out.contains("is valid"),
        "our check of {}: {out}",
        p.display()
    );
    if let Some(prefix) = blktap() {
        let out = text(run_ok(bt(&prefix, "bin/vhd-util").args([
            "check",
            "-n",
            s(p),
        ])));
        assert!(
            out.contains("is valid"),
            "blktap3's check of {}: {out}",
            p.display()
        );
    }
}

/// The whole chain at `p` through the library (a private, read-only open).
fn lib_read(p: &Path) -> Vec<u8> {
    let set = vhd::ParentSet::new();
    let opts = vhd::ChainOptions {
        read_only: true,
        ..Default::default()
    };
    let mut c = vhd::Chain::open(p, &opts, &set).expect("opening the chain");
    let mut v = vec![0u8; c.size() as usize];
    c.read_at(0, &mut v).expect("reading the chain");
    v
}

fn file_hash(p: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p).expect("reading an image").hash(&mut h);
    h.finish()
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// The bytes write `id` puts at byte `off` (a whole sector) and on.
fn fill(id: u32, off: u64, out: &mut [u8]) {
    sectors_data(id, off / SECTOR, out);
}

/// `tap-ctl` in `rundir`; stdout of a command that must succeed.
fn ctl(rundir: &Path, args: &[&str]) -> String {
    text(run_ok(tap_ctl(rundir).args(args)))
}

/// The minor of a device path `.../tapdevN`.
fn minor_of(device: &str) -> String {
    device
        .trim()
        .rsplit("tapdev")
        .next()
        .expect("a tapdev path")
        .to_string()
}

/// Destroys (or closes) VBDs at the end, even when the test fails.
struct Cleanup<'a>(&'a Path, Vec<String>);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for m in self.1.iter().rev() {
            let _ = tap_ctl(self.0).args(["destroy", "-m", m]).output();
        }
    }
}

const SNAP_DISK: u64 = 32 * MB;

/// One write of the snapshot test: where, how long, and its id.
#[derive(Clone, Copy)]
struct W {
    off: u64,
    len: u64,
    id: u32,
}

fn random_write(rng: &mut Rng, id: u32) -> W {
    let most = if rng.below(4) == 0 { 1024 } else { 64 };
    let len = SECTOR * (1 + rng.below(most));
    let mut off = rng.below((SNAP_DISK - len) / SECTOR) * SECTOR;
    if rng.below(2) == 0 {
        off &= !4095;
    }
    W { off, len, id }
}

fn apply(model: &mut [u8], w: W) {
    fill(
        w.id,
        w.off,
        &mut model[w.off as usize..(w.off + w.len) as usize],
    );
}

fn data_of(w: W) -> Vec<u8> {
    let mut d = vec![0u8; w.len as usize];
    fill(w.id, w.off, &mut d);
    d
}

#[test]
fn thirty_live_snapshots_read_back_at_every_level_and_coalesce_to_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rundir = d.join("run");
    let level = |i: usize| d.join(format!("l{i:02}.vhd"));
    vhd_util(&[
        "create",
        "-n",
        s(&level(0)),
        "-s",
        &(SNAP_DISK / MB).to_string(),
    ]);
    let sock = d.join("leaf.sock");
    let dev = ctl(
        &rundir,
        &[
            "create",
            "-a",
            &format!("vhd:{}", level(0).display()),
            "--nbd",
            &format!("unix:{}", sock.display()),
        ],
    );
    let mut cleanup = Cleanup(&rundir, vec![minor_of(&dev)]);
    let leaf_minor = minor_of(&dev);
    let pid = ctl(&rundir, &["list"])
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .expect("tap-ctl list names the pid")
        .to_string();
    let mut nbd = NbdClient::connect(&sock).unwrap();
    assert_eq!(nbd.size, SNAP_DISK);
    let mut rng = Rng(0x5a5a_0015_u64);
    let mut writes: Vec<W> = Vec::new();
    // Per level: how many writes it holds (a prefix of `writes`), and its file's hash once
    // it became history.
    let mut cuts = Vec::new();
    let mut hashes = Vec::new();
    let mut model = vec![0u8; SNAP_DISK as usize];
    let t0 = Instant::now();
    for i in 1..=30 {
        for _ in 0..1 + rng.below(4) {
            let w = random_write(&mut rng, writes.len() as u32 + 1);
            nbd.write(w.off, &data_of(w)).unwrap();
            apply(&mut model, w);
            writes.push(w);
        }
        if i % 7 == 0 {
            nbd.flush().unwrap();
        }
        ctl(&rundir, &["pause", "-m", &leaf_minor]);
        let old = level(i - 1);
        let new = level(i);
        vhd_util(&["snapshot", "-n", s(&new), "-p", s(&old)]);
        // The guest keeps going: a write sent now waits in the ring, and lands in the new
        // leaf once the VBD resumes on it.
        let w = random_write(&mut rng, writes.len() as u32 + 1);
        nbd.send_write(9, w.off, &data_of(w)).unwrap();
        assert!(
            nbd.next_reply(Duration::from_millis(50)).unwrap().is_none(),
            "a write completed while the VBD was paused"
        );
        cuts.push(writes.len());
        ctl(
            &rundir,
            &[
                "unpause",
                "-m",
                &leaf_minor,
                "-a",
                &format!("vhd:{}", new.display()),
            ],
        );
        let r = nbd
            .next_reply(Duration::from_secs(30))
            .unwrap()
            .expect("reply");
        assert_eq!((r.handle, r.error), (9, 0));
        apply(&mut model, w);
        writes.push(w);
        hashes.push(file_hash(&old));
        // What was just written reads back through the new chain.
        let back = nbd.read(w.off, w.len as u32).unwrap();
        assert!(
            back == data_of(w),
            "level {i}: the write made while paused reads back wrong"
        );
    }
    nbd.flush().unwrap();
    let leaf = level(30);
    let st: serde_json::Value =
        serde_json::from_str(&ctl(&rundir, &["stats", "-m", &leaf_minor])).unwrap();
    assert_eq!(st["image"], format!("vhd:{}", leaf.display()));
    assert_eq!(st["driver"]["type"], "vhd");
    assert_eq!(st["driver"]["depth"], 31);
    assert!(
        st["driver"]["cache"]["bitmap_hits"].as_u64().unwrap() > 0,
        "{st}"
    );
    eprintln!(
        "30 live snapshots in {:.1} s; driver stats: {}",
        t0.elapsed().as_secs_f64(),
        st["driver"]["cache"]
    );
    // The leaf as the guest sees it.
    assert!(
        nbd.read_all().unwrap() == model,
        "the leaf differs from the model"
    );

    // Every older level, served read-only beside the leaf by the same tapdisk (sharing its
    // parents), and through the library; each old leaf unchanged since it became history.
    let mut m = vec![0u8; SNAP_DISK as usize];
    let mut applied = 0;
    for (i, &cut) in cuts.iter().enumerate() {
        for &w in &writes[applied..cut] {
            apply(&mut m, w);
        }
        applied = cut;
        let p = level(i);
        assert_eq!(
            file_hash(&p),
            hashes[i],
            "level {i} changed after it became history"
        );
        let lsock = d.join(format!("l{i:02}.sock"));
        let ldev = ctl(
            &rundir,
            &[
                "open",
                "-p",
                &pid,
                "-R",
                "-a",
                &format!("vhd:{}", p.display()),
                "--nbd",
                &format!("unix:{}", lsock.display()),
            ],
        );
        let lm = minor_of(&ldev);
        cleanup.1.push(lm.clone());
        let got = NbdClient::connect(&lsock).unwrap().read_all().unwrap();
        assert!(
            got == m,
            "level {i} served differs at {:?}",
            first_diff(&got, &m)
        );
        let got = lib_read(&p);
        assert!(
            got == m,
            "level {i} (library) differs at {:?}",
            first_diff(&got, &m)
        );
        ctl(&rundir, &["close", "-m", &lm, "-p", &pid]);
        cleanup.1.pop();
        check_clean(&p);
    }
    drop(nbd);
    ctl(&rundir, &["destroy", "-m", &leaf_minor]);
    cleanup.1.clear();
    check_clean(&leaf);
    assert!(lib_read(&leaf) == model, "the leaf (library) differs");

    // Coalesce the chain into its base, top down; the base then reads as the leaf did.
    for i in (1..=30).rev() {
        let out = vhd_util(&["coalesce", "-n", s(&level(i))]);
        assert!(out.starts_with("Coalesced "), "{out}");
    }
    let base = level(0);
    check_clean(&base);
    let got = lib_read(&base);
    assert!(
        got == model,
        "the coalesced base differs at {:?}",
        first_diff(&got, &model)
    );
    let raw = d.join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    let bsock = d.join("base.sock");
    let bdev = ctl(
        &rundir,
        &[
            "create",
            "-R",
            "-a",
            &format!("vhd:{}", base.display()),
            "--nbd",
            &format!("unix:{}", bsock.display()),
        ],
    );
    let _cleanup = Cleanup(&rundir, vec![minor_of(&bdev)]);
    let out = text(run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(format!("nbd+unix:///?socket={}", bsock.display()))
            .arg(&raw),
    ));
    assert!(out.contains("Images are identical"), "{out}");
}

// ---- The crash test ------------------------------------------------------------------------

const CRASH_DISK: u64 = 32 * MB;
const CRASH_SECTORS: u64 = CRASH_DISK / SECTOR;
/// Writes in flight at most.
const DEPTH: usize = 16;

/// One round: serve `leaf`, write and flush at random over NBD until `kill_after`, then
/// SIGKILL tapdisk. Returns the writes and flushes completed.
fn crash_round(
    leaf: &Path,
    dir: &Path,
    rng: &mut Rng,
    model: &mut [SectorModel],
    next_id: &mut u32,
    kill_after: Duration,
) -> (u64, u64) {
    let rundir = dir.join("run");
    let _ = std::fs::remove_dir_all(&rundir);
    let mut td = Tapdisk::start_logged(&rundir, &dir.join("tapdisk.log")).unwrap();
    let sock = dir.join("crash.sock");
    let _ = std::fs::remove_file(&sock);
    let settings = VbdSettings {
        nbd: Some(NbdListen::Unix(sock.clone())),
        ..VbdSettings::default()
    };
    match td
        .client()
        .unwrap()
        .call(Ctl::Open {
            minor: None,
            image: format!("vhd:{}", leaf.display()).parse().unwrap(),
            settings,
        })
        .unwrap()
    {
        Reply::Opened { .. } => {}
        other => panic!("open: {other:?}"),
    }
    let mut nbd = NbdClient::connect(&sock).unwrap();
    // In flight: handle -> sector range (None: a flush).
    let mut flight: HashMap<u64, Option<(u64, u64)>> = HashMap::new();
    // Writes acknowledged since the last flush was sent, and what each flush in flight covers.
    let mut acked: Vec<u64> = Vec::new();
    let mut flush_covers: HashSet<u64> = HashSet::new();
    let mut seq = 0u64;
    let (mut writes, mut flushes) = (0u64, 0u64);
    let start = Instant::now();
    loop {
        if start.elapsed() >= kill_after {
            break;
        }
        while flight.len() < DEPTH {
            seq += 1;
            let flushing = flight.values().any(Option::is_none);
            if !flushing && rng.below(10) == 0 {
                nbd.send_flush(seq).unwrap();
                flush_covers = acked.drain(..).collect();
                flight.insert(seq, None);
                continue;
            }
            let (sct, n) = random_range(rng, CRASH_SECTORS);
            if flight
                .values()
                .any(|r| r.is_some_and(|(a, b)| a < sct + n && sct < b))
            {
                break;
            }
            *next_id += 1;
            let id = *next_id;
            let mut data = vec![0u8; (n * SECTOR) as usize];
            fill(id, sct * SECTOR, &mut data);
            nbd.send_write(seq, sct * SECTOR, &data).unwrap();
            for k in sct..sct + n {
                model[k as usize].since.push((seq, id));
            }
            flight.insert(seq, Some((sct, sct + n)));
        }
        let Some(r) = nbd.next_reply(Duration::from_millis(20)).unwrap() else {
            continue;
        };
        assert_eq!(r.error, 0, "request {} failed", r.handle);
        match flight.remove(&r.handle).expect("a request in flight") {
            Some(_) => {
                writes += 1;
                acked.push(r.handle);
            }
            None => {
                // Every write acknowledged before the flush was sent is durable now.
                flushes += 1;
                for m in model.iter_mut() {
                    if let Some(k) = m.since.iter().rposition(|(q, _)| flush_covers.contains(q)) {
                        m.durable = m.since[k].1;
                        m.since.drain(..=k);
                    }
                }
            }
        }
    }
    td.child.kill().unwrap();
    let _ = td.child.wait();
    (writes, flushes)
}

#[test]
fn sigkill_under_nbd_load_loses_no_flushed_write_in_30_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A base with data in every other 2 MiB block, then a leaf over it.
    let base = d.join("base.vhd");
    vhd_util(&[
        "create",
        "-n",
        s(&base),
        "-s",
        &(CRASH_DISK / MB).to_string(),
    ]);
    let mut model = vec![SectorModel::default(); CRASH_SECTORS as usize];
    {
        let set = vhd::ParentSet::new();
        let mut c = vhd::Chain::open(&base, &vhd::ChainOptions::default(), &set).unwrap();
        let mut buf = vec![0u8; MB as usize];
        for b in (0..CRASH_DISK / (2 * MB)).step_by(2) {
            let off = b * 2 * MB + 512 * 1024;
            fill(1, off, &mut buf);
            c.write_at(off, &buf).unwrap();
            for k in off / SECTOR..(off + MB) / SECTOR {
                model[k as usize].durable = 1;
            }
        }
        c.flush().unwrap();
    }
    let mut leaf = base.clone();
    let mut rng = Rng(0x5eed_0015_c0a5_0001);
    let mut next_id = 1u32;
    let (mut writes, mut flushes) = (0u64, 0u64);
    let t0 = Instant::now();
    for round in 0..30 {
        if round % 10 == 0 {
            // A new leaf: allocations again, over a deeper chain.
            let next = d.join(format!("leaf{}.vhd", round / 10));
            vhd_util(&["snapshot", "-n", s(&next), "-p", s(&leaf)]);
            leaf = next;
        }
        let kill_after = Duration::from_millis(30 + rng.below(200));
        let (w, f) = crash_round(&leaf, d, &mut rng, &mut model, &mut next_id, kill_after);
        writes += w;
        flushes += f;
        check_clean(&leaf);
        check_after_crash(round, &lib_read(&leaf), &mut model);
    }
    eprintln!(
        "30 crash rounds in {:.1} s: {writes} writes and {flushes} flushes acknowledged",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        flushes >= 30,
        "too few flushes completed to test anything: {flushes}"
    );
}

/// Xen's `block-common.sh` as far as block-tap uses it, over a folder of files standing in for
/// xenstore (one file per key, `/` written as `_`).
const BLOCK_COMMON: &str = r#"
key() { printf '%s/%s' "$FAKE_XS" "$(printf '%s' "$1" | tr / _)"; }
xenstore_read() { cat "$(key "$1")"; }
xenstore_read_default() { cat "$(key "$1")" 2>/dev/null || printf '%s' "$2"; }
xenstore_write() {
    while [ $# -ge 2 ]; do printf '%s' "$2" > "$(key "$1")"; shift 2; done
}
log() { :; }
success() { xenstore_write "$XENBUS_PATH/hotplug-status" connected; }
fatal() { echo "$*" >&2; exit 1; }
"#;

#[test]
fn block_tap_serves_what_xl_writes_for_format_vhd() {
    // libxl writes params = "vhd:PATH" for `format=vhd, backendtype=tap`.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("vm.vhd");
    vhd_util(&["create", "-n", s(&img), "-s", "8"]);
    let scripts = d.join("scripts");
    std::fs::create_dir(&scripts).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::copy(
        repo.join("xen-configs/block-tap"),
        scripts.join("block-tap"),
    )
    .unwrap();
    std::fs::write(scripts.join("block-common.sh"), BLOCK_COMMON).unwrap();
    let xs = d.join("xenstore");
    std::fs::create_dir(&xs).unwrap();
    let bus = "backend/vbd3/1/51712";
    let key = |k: &str| xs.join(format!("{bus}/{k}").replace('/', "_"));
    std::fs::write(key("params"), format!("vhd:{}", img.display())).unwrap();
    let rundir = d.join("run");
    let hotplug = |action: &str| {
        run_ok(
            Command::new("bash")
                .arg(scripts.join("block-tap"))
                .arg(action)
                .env("XENBUS_PATH", bus)
                .env("FAKE_XS", &xs)
                .env("TAPCTL", bin("tap-ctl"))
                .env("TAPDISK_RS_RUNDIR", &rundir),
        )
    };
    hotplug("add");
    let _cleanup = Cleanup(&rundir, vec!["0".into()]);
    assert_eq!(
        std::fs::read_to_string(key("hotplug-status")).unwrap(),
        "connected"
    );
    let list = ctl(&rundir, &["list"]);
    assert!(
        list.contains(&format!("minor=0 state=0 args=vhd:{}", img.display())),
        "{list}"
    );
    let st: serde_json::Value = serde_json::from_str(&ctl(&rundir, &["stats", "-m", "0"])).unwrap();
    assert_eq!(st["driver"]["type"], "vhd");
    hotplug("remove");
    assert_eq!(ctl(&rundir, &["list"]), "");
}
