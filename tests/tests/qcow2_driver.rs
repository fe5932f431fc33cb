//! qcow2 images served by a real tapdisk (`tap-ctl create -a qcow2:IMG --nbd unix:SOCK`),
//! checked with QEMU's own tools, both ways:
//!
//! - images `qemu-img create/convert` and `qemu-io` made (cluster sizes from 512 B to 2 MiB,
//!   versions 2 and 3, backing chains over qcow2 and raw files, compressed clusters) read
//!   through the export exactly as a raw reference holds them (`qemu-img compare`);
//! - random writes (512 B to 1 MiB), zero writes and discards through the export, the same
//!   on a raw reference: afterwards `qemu-img check` finds the image clean and `qemu-img
//!   compare` finds it equal to the reference;
//! - the snapshot flow: `tap-ctl pause`, `qemu-img create -b LEAF NEW`, `tap-ctl unpause -a
//!   qcow2:NEW`; QEMU may not change the backing file we read, and `qemu-img commit` of the
//!   overlay once nothing serves it folds everything back into LEAF.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tapdisk_e2e::*;

/// A VBD served over NBD, destroyed on drop.
struct Served {
    rundir: PathBuf,
    uri: String,
}

impl Served {
    /// `tap-ctl create -a SPEC --nbd unix:SOCK` in `dir` (its own run directory).
    fn new(dir: &Path, spec: &str) -> Served {
        let rundir = dir.join("run");
        let sock = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        run_ok(
            tap_ctl(&rundir)
                .args(["create", "-a", spec, "--nbd"])
                .arg(format!("unix:{}", sock.display())),
        );
        Served {
            rundir,
            uri: format!("nbd+unix:///?socket={}", sock.display()),
        }
    }

    fn tap_ctl(&self, args: &[&str]) -> Output {
        run_ok(tap_ctl(&self.rundir).args(args))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = tap_ctl(&self.rundir).args(["destroy", "-m", "0"]).output();
    }
}

fn qemu_img(args: &[&str], paths: &[&Path]) -> Output {
    run_ok(Command::new("qemu-img").args(args).args(paths))
}

/// `qemu-io` on `target` (with its `-f` format) running `cmds`; fails on a pattern mismatch.
fn qemu_io(format: &str, target: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", format, target]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(&mut c);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.contains("failed:"), "{cmds:?}: {text}");
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temporary path")
}

/// Asserts that the raw image `reference` and `other` (format `fmt`, a path or NBD URI)
/// hold the same guest bytes.
fn assert_same(reference: &Path, fmt: &str, other: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", fmt])
        .arg(reference)
        .arg(other)
        .output()
        .expect("qemu-img (CI installs qemu-utils)");
    assert!(
        out.status.success(),
        "{} differs from {}: {}{}",
        other,
        reference.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` of a qcow2 image: no errors and no leaks.
fn assert_clean(p: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(p)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        p.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` random pattern writes (`write -P`) over a disk of `size` bytes: 512 B to 1 MiB, at
/// 512-byte offsets.
fn pattern_writes(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let len = 512 * (1 + rng.below(2048));
            let off = 512 * rng.below((size - len) / 512);
            format!("write -P {:#x} {off} {len}", 1 + rng.below(254))
        })
        .collect()
}

const SIZE: u64 = 32 << 20;

/// (cluster size, compat, base compressed)
const GEOMETRIES: &[(&str, &str, bool)] = &[
    ("512", "0.10", false),
    ("4k", "1.1", true),
    ("64k", "1.1", true),
    ("64k", "0.10", true),
    ("2M", "1.1", false),
];

#[test]
fn images_qemu_made_read_through_the_export_as_qemu_reads_them() {
    for (i, &(cluster, compat, compressed)) in GEOMETRIES.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ i as u64);
        let reference = d.join("ref.raw");
        std::fs::File::create(&reference)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        let base = d.join("base.qcow2");
        let leaf = d.join("leaf.qcow2");
        qemu_io(
            "raw",
            path_str(&reference),
            &pattern_writes(&mut rng, SIZE, 12),
        );
        let opts = format!("cluster_size={cluster},compat={compat}");
        let mut convert = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", &opts];
        if compressed {
            convert.push("-c");
        }
        qemu_img(&convert, &[&reference, &base]);
        qcow2_overlay(&leaf, "base.qcow2", "qcow2", &opts);
        // The leaf's own clusters: data over the base's, zeroes, discards.
        let mut cmds = pattern_writes(&mut rng, SIZE, 8);
        cmds.push("write -z 3M 100k".into());
        qemu_io("qcow2", path_str(&leaf), &cmds);
        qemu_io("raw", path_str(&reference), &cmds);
        if compressed {
            let map = qemu_img(&["map", "--output=json", "-f", "qcow2"], &[&base]);
            assert!(
                String::from_utf8_lossy(&map.stdout).contains("\"compressed\": true"),
                "qemu-img convert -c made no compressed cluster"
            );
        }
        let served = Served::new(d, &format!("qcow2:{}", leaf.display()));
        assert_same(&reference, "raw", &served.uri);
        // A single image (no chain): the base itself, read-only.
        drop(served);
        let served = Served::new(d, &format!("qcow2:{}", base.display()));
        let _ = served.tap_ctl(&["list"]);
        drop(served);
        assert_clean(&leaf);
        assert_clean(&base);
        eprintln!("{cluster} clusters, compat {compat}, compressed base {compressed}: identical");
    }
}

#[test]
fn random_writes_zeroes_and_discards_through_the_export_keep_the_image_clean() {
    // (cluster size, compat, backing: "qcow2" (compressed) or "raw")
    for (i, &(cluster, compat, backing)) in [
        ("64k", "1.1", "qcow2"),
        ("4k", "0.10", "raw"),
        ("2M", "1.1", "qcow2"),
    ]
    .iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (i as u64 + 1));
        let reference = d.join("ref.raw");
        std::fs::File::create(&reference)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        qemu_io(
            "raw",
            path_str(&reference),
            &pattern_writes(&mut rng, SIZE, 10),
        );
        let base = d.join(format!("base.{backing}"));
        let mut convert = vec!["convert", "-f", "raw", "-O", backing];
        if backing == "qcow2" {
            convert.push("-c");
        }
        qemu_img(&convert, &[&reference, &base]);
        let leaf = d.join("leaf.qcow2");
        let opts = format!("cluster_size={cluster},compat={compat}");
        let backing_name = format!("base.{backing}");
        qcow2_overlay(&leaf, &backing_name, backing, &opts);
        let served = Served::new(d, &format!("qcow2:{}", leaf.display()));
        // Writes, zero writes and discards through the export, and the same (a discard as
        // zeroes: our discard always reads back as zeroes) on the reference.
        let (mut nbd, mut local) = (Vec::new(), Vec::new());
        for _ in 0..80 {
            let len = 512 * (1 + rng.below(2048));
            let off = 512 * rng.below((SIZE - len) / 512);
            match rng.below(6) {
                0 => {
                    nbd.push(format!("write -z {off} {len}"));
                    local.push(format!("write -z {off} {len}"));
                }
                1 => {
                    nbd.push(format!("discard {off} {len}"));
                    local.push(format!("write -z {off} {len}"));
                }
                _ => {
                    let w = format!("write -P {:#x} {off} {len}", 1 + rng.below(254));
                    nbd.push(w.clone());
                    local.push(w);
                }
            }
        }
        nbd.push("flush".into());
        qemu_io("raw", &served.uri, &nbd);
        qemu_io("raw", path_str(&reference), &local);
        assert_same(&reference, "raw", &served.uri);
        drop(served);
        assert_clean(&leaf);
        assert_same(&reference, "qcow2", path_str(&leaf));
        // The comparison can fail: one byte changed in the reference is found.
        qemu_io(
            "raw",
            path_str(&reference),
            &["write -P 0xee 4096 512".into()],
        );
        let out = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
            .arg(&reference)
            .arg(&leaf)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "a difference went unseen");
        eprintln!("{cluster} clusters, compat {compat}, {backing} backing: clean and equal");
    }
}

#[test]
fn snapshot_pause_overlay_unpause_and_commit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reference = d.join("ref.raw");
    std::fs::File::create(&reference)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let leaf = d.join("leaf.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2"], &[&leaf, Path::new("32M")]);
    let served = Served::new(d, &format!("qcow2:{}", leaf.display()));
    let before: Vec<String> = vec![
        "write -P 0xa1 0 1M".into(),
        "write -P 0xa2 5M 64k".into(),
        "write -P 0xa3 7M 4k".into(),
    ];
    // Written, not flushed: the pause writes the metadata back.
    qemu_io("raw", &served.uri, &before);
    qemu_io("raw", path_str(&reference), &before);
    served.tap_ctl(&["pause", "-m", "0"]);
    let new = d.join("new.qcow2");
    // QEMU opens the backing file with force-share to read its size: our lock lets it.
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "leaf.qcow2",
            "-F",
            "qcow2",
        ],
        &[&new],
    );
    served.tap_ctl(&[
        "unpause",
        "-m",
        "0",
        "-a",
        &format!("qcow2:{}", new.display()),
    ]);
    let list = String::from_utf8_lossy(&served.tap_ctl(&["list"]).stdout).to_string();
    assert!(list.contains("new.qcow2"), "{list}");
    let after: Vec<String> = vec![
        "write -P 0xb1 512k 1M".into(),
        "write -P 0xb2 7M 8k".into(),
        "discard 5M 4k".into(),
    ];
    qemu_io("raw", &served.uri, &after);
    let local: Vec<String> = after
        .iter()
        .map(|c| c.replace("discard", "write -z"))
        .collect();
    qemu_io("raw", path_str(&reference), &local);
    assert_same(&reference, "raw", &served.uri);
    // The old leaf is a backing file now: QEMU may read it (force-share) but not write it,
    // not even by committing another overlay into it.
    let side = d.join("side.qcow2");
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "leaf.qcow2",
            "-F",
            "qcow2",
        ],
        &[&side, Path::new("32M")],
    );
    let out = Command::new("qemu-img")
        .args(["commit", "-q"])
        .arg(&side)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "qemu-img commit wrote a backing file we serve"
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("lock"), "{text}");
    let info = qemu_img(&["info", "-U", "--backing-chain"], &[&new]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("backing file: leaf.qcow2"), "{info}");
    // Nothing serves the overlay any more: commit it into the old leaf, which then holds
    // everything, and serves it.
    drop(served);
    assert_clean(&new);
    assert_clean(&leaf);
    qemu_img(&["commit", "-q"], &[&new]);
    assert_clean(&leaf);
    assert_same(&reference, "qcow2", path_str(&leaf));
    let served = Served::new(d, &format!("qcow2:{}", leaf.display()));
    assert_same(&reference, "raw", &served.uri);
}

#[test]
fn an_image_qemu_writes_is_refused_and_one_we_serve_is_not_written_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("x.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2"], &[&img, Path::new("8M")]);
    let served = Served::new(d, &format!("qcow2:{}", img.display()));
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&img)
        .args(["-c", "write 0 4k"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("lock"),
        "qemu-io wrote an image we serve: {text}"
    );
    drop(served);
    // And the other way: a tapdisk cannot open an image qemu-nbd serves.
    let sock = d.join("q.sock");
    let mut qemu = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "--socket"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .expect("qemu-nbd");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = tap_ctl(&d.join("run2"))
        .args(["create", "-a", &format!("qcow2:{}", img.display())])
        .output()
        .unwrap();
    let _ = qemu.kill();
    let _ = qemu.wait();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "tapdisk opened an image qemu-nbd writes"
    );
    assert!(text.contains("in use by another process"), "{text}");
}
