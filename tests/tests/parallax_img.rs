//! `parallax-img` end to end: the real binary on real files, content compared byte for byte,
//! and bad input (wrong magic, truncated file, corrupt node, unknown volume, bad sizes, a
//! locked image) answered with one line and a non-zero exit, never a panic.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use tapdisk_e2e::bin;

fn plx(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("parallax-img"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("running parallax-img")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = plx(dir, args);
    assert!(
        o.status.success(),
        "parallax-img {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Fails with exit status 1 and one line on stderr mentioning `want`.
fn fails(dir: &Path, args: &[&str], want: &str) {
    let o = plx(dir, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "parallax-img {args:?}: {err}");
    let lines: Vec<_> = err.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "parallax-img {args:?} said: {err}");
    assert!(lines[0].starts_with("parallax-img: "), "{err}");
    assert!(
        lines[0].contains(want),
        "parallax-img {args:?}: {err} (wanted '{want}')"
    );
    assert!(!err.contains("panicked"));
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed;
    let data: Vec<u8> = (0..len)
        .map(|i| {
            // Every fourth 64 KiB is zero, so import leaves holes.
            if (i >> 16) % 4 == 3 {
                return 0;
            }
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    std::fs::write(path, data).unwrap();
}

#[test]
fn snapshot_clone_export_delete_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["create", "vm.plx", "--size", "32M"]);
    random_file(&d.join("a.raw"), 6 << 20, 1);
    random_file(&d.join("b.raw"), 3 << 20, 2);
    ok(d, &["import", "vm.plx", "a.raw"]);
    ok(d, &["snapshot", "vm.plx", "s1"]);
    ok(d, &["clone", "vm.plx@s1", "c1"]);
    // Overwrite the disk: the snapshot and the clone keep the old content.
    ok(d, &["import", "vm.plx", "b.raw"]);
    ok(d, &["import", "vm.plx@c1", "b.raw"]);
    ok(d, &["export", "vm.plx@s1", "s1.raw"]);
    ok(d, &["export", "vm.plx", "base.raw"]);
    ok(d, &["export", "vm.plx@c1", "c1.raw"]);
    let a = std::fs::read(d.join("a.raw")).unwrap();
    let b = std::fs::read(d.join("b.raw")).unwrap();
    let s1 = std::fs::read(d.join("s1.raw")).unwrap();
    assert_eq!(s1.len(), 32 << 20);
    assert_eq!(&s1[..a.len()], &a[..], "snapshot content changed");
    assert!(s1[a.len()..].iter().all(|&x| x == 0));
    let base = std::fs::read(d.join("base.raw")).unwrap();
    assert_eq!(&base[..b.len()], &b[..]);
    assert_eq!(&base[b.len()..a.len()], &a[b.len()..]);
    assert_eq!(std::fs::read(d.join("c1.raw")).unwrap(), base);
    let list = ok(d, &["list", "vm.plx"]);
    assert!(
        list.contains("s1") && list.contains("snapshot") && list.contains("c1"),
        "{list}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(d, &["list", "vm.plx", "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3);
    let s1_row = &json.as_array().unwrap()[1];
    assert_eq!(s1_row["name"], "s1");
    assert_eq!(s1_row["parent"], "base");
    // The blocks b overwrote in both disks now belong to the snapshot alone.
    let excl = s1_row["exclusive_bytes"].as_u64().unwrap();
    assert!(excl >= 2 << 20, "{s1_row}");
    let out = ok(d, &["check", "vm.plx"]);
    assert!(out.contains("no problems found"), "{out}");
    // Deleting the snapshot gives its exclusive blocks back (and punches them out of the file).
    let used = |d: &Path| -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&ok(d, &["info", "vm.plx", "--json"])).unwrap();
        v["store_used_bytes"].as_u64().unwrap()
    };
    let before = used(d);
    let out = ok(d, &["delete", "vm.plx@s1"]);
    assert!(out.contains("given back"), "{out}");
    assert!(before - used(d) >= excl, "{before} -> {}", used(d));
    assert!(ok(d, &["check", "vm.plx"]).contains("no problems found"));
    ok(d, &["export", "vm.plx@c1", "c1b.raw"]);
    assert_eq!(std::fs::read(d.join("c1b.raw")).unwrap(), base);
    let out = ok(d, &["defrag", "vm.plx@c1"]);
    assert!(out.contains("-> 1"), "{out}");
    ok(d, &["export", "vm.plx@c1", "--force", "c1b.raw"]);
    assert_eq!(std::fs::read(d.join("c1b.raw")).unwrap(), base);
    assert!(ok(d, &["check", "vm.plx"]).contains("no problems found"));
}

/// The current superblock's P2M root pointer's machine block (format: FORMAT.md).
fn p2m_root(img: &[u8]) -> usize {
    let gen = |c: usize| u64::from_le_bytes(img[c * 4096 + 56..c * 4096 + 64].try_into().unwrap());
    let c = if gen(1) > gen(0) { 1 } else { 0 };
    let off = c * 4096 + 144;
    let mut m = [0u8; 8];
    m[..6].copy_from_slice(&img[off..off + 6]);
    u64::from_le_bytes(m) as usize
}

#[test]
fn bad_input_gets_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["create", "vm.plx", "--size", "16M"]);
    random_file(&d.join("a.raw"), 2 << 20, 3);
    ok(d, &["import", "vm.plx", "a.raw"]);
    let img = std::fs::read(d.join("vm.plx")).unwrap();

    std::fs::write(d.join("text.plx"), vec![b'x'; 65536]).unwrap();
    fails(d, &["info", "text.plx"], "not a Parallax image");
    std::fs::write(d.join("short.plx"), b"PARALLAX").unwrap();
    fails(d, &["list", "short.plx"], "too small");
    std::fs::write(d.join("trunc.plx"), &img[..img.len() / 2]).unwrap();
    fails(d, &["list", "trunc.plx"], "truncated");
    fails(d, &["check", "trunc.plx"], "problem");
    let mut bad = img.clone();
    bad[100] ^= 1;
    bad[4096 + 100] ^= 1;
    std::fs::write(d.join("sb.plx"), &bad).unwrap();
    fails(d, &["info", "sb.plx"], "both superblock copies are damaged");
    let mut bad = img.clone();
    let root = p2m_root(&img);
    bad[root * 4096 + 20] ^= 0x40;
    std::fs::write(d.join("node.plx"), &bad).unwrap();
    fails(d, &["export", "node.plx", "x.raw"], "checksum mismatch");
    let o = plx(d, &["check", "node.plx"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("problem: P2M node") && out.contains("checksum mismatch"),
        "{out}"
    );

    fails(
        d,
        &["snapshot", "vm.plx@nosuch", "x"],
        "no volume named 'nosuch'",
    );
    fails(
        d,
        &["export", "vm.plx@nosuch", "y.raw"],
        "no volume named 'nosuch'",
    );
    fails(d, &["delete", "vm.plx"], "name the volume to delete");
    fails(d, &["snapshot", "vm.plx", "bad name"], "may contain only");
    fails(d, &["create", "vm.plx", "--size", "1G"], "exists");
    fails(
        d,
        &["create", "odd.plx", "--size", "1000"],
        "multiple of 512",
    );
    assert!(
        !d.join("odd.plx").exists(),
        "a failed create leaves no file"
    );
    fails(
        d,
        &["create", "bs.plx", "--size", "1G", "--block-size", "3k"],
        "power of two",
    );
    fails(d, &["info", "missing.plx"], "No such file");
    random_file(&d.join("big.raw"), 17 << 20, 4);
    fails(d, &["import", "vm.plx", "big.raw"], "more than the volume");
    ok(d, &["snapshot", "vm.plx", "s"]);
    fails(d, &["import", "vm.plx@s", "a.raw"], "read-only");

    // A writer holds the image: changes are refused, and so are readers.
    let mut holder = Command::new("flock")
        .args(["--no-fork", "-x", "vm.plx", "sleep", "30"])
        .current_dir(d)
        .spawn()
        .expect("flock from util-linux");
    std::thread::sleep(std::time::Duration::from_millis(300));
    fails(d, &["snapshot", "vm.plx", "t"], "in use by another process");
    // check cannot check an image in use: exit 2, not the 1 of "problems found".
    let o = plx(d, &["check", "vm.plx"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use by another process"));
    holder.kill().unwrap();
    holder.wait().unwrap();
    ok(d, &["snapshot", "vm.plx", "t"]);

    // Command-line mistakes exit 2.
    let o = plx(d, &["create", "z.plx", "--size", "12Q"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--help"));
    let o = plx(d, &["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for verb in [
        "create", "snapshot", "clone", "list", "info", "check", "delete", "defrag",
    ] {
        assert!(help.contains(verb), "{help}");
    }
}

#[test]
fn bench_cache_prints_both_cache_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(dir.path(), &["bench-cache", "--writes", "4096"]);
    assert!(
        out.contains("fresh") && out.contains("rewrite-cold"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_str(&ok(
        dir.path(),
        &[
            "bench-cache",
            "--writes",
            "4096",
            "--slots",
            "10,128",
            "--json",
        ],
    ))
    .unwrap();
    let runs = v.as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1]["slots"], 128);
    assert_eq!(runs[1]["fresh"]["v2p"]["misses"], 0);
    assert!(runs[1]["fresh"]["p2m"]["lookups"].as_u64().unwrap() >= 4096);
}

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// An image on a block device (a loop device): formatted in place, fixed size, and a full
/// device answered with an out-of-space error.
#[test]
fn image_on_a_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backing = d.join("dev.img");
    std::fs::write(&backing, vec![0xeeu8; 8 << 20]).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .expect("losetup (util-linux) must be installed");
    assert!(
        out.status.success(),
        "losetup failed (needs root and loop devices): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());
    ok(d, &["create", &dev.0, "--size", "64M"]);
    random_file(&d.join("a.raw"), 4 << 20, 5);
    ok(d, &["import", &dev.0, "a.raw"]);
    ok(d, &["snapshot", &dev.0, "s"]);
    ok(d, &["export", &format!("{}@s", dev.0), "s.raw"]);
    let s = std::fs::read(d.join("s.raw")).unwrap();
    assert_eq!(&s[..4 << 20], &std::fs::read(d.join("a.raw")).unwrap()[..]);
    assert!(ok(d, &["check", &dev.0]).contains("no problems found"));
    // 8 MiB of device cannot hold 12 MiB of data.
    random_file(&d.join("b.raw"), 12 << 20, 6);
    fails(d, &["import", &dev.0, "b.raw"], "out of space");
    assert!(ok(d, &["check", &dev.0]).contains("no problems found"));
}

/// One byte flipped in either superblock copy: `check` reports that copy as damaged (a
/// problem: exit 1), the image still holds the last commit (its export is the data imported),
/// a tapdisk opening it logs the damage and serves the last commit, and `check` on something
/// it cannot check exits 2. (The damage used to be skipped silently: "no problems found", and
/// the disk came up on the previous generation.)
#[test]
fn a_damaged_superblock_copy_is_reported_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["create", "vm.plx", "--size", "16M"]);
    random_file(&d.join("a.raw"), 4 << 20, 7);
    ok(d, &["import", "vm.plx", "a.raw"]);
    let img = std::fs::read(d.join("vm.plx")).unwrap();
    let data = std::fs::read(d.join("a.raw")).unwrap();
    for copy in 0..2 {
        let mut bad = img.clone();
        bad[copy * 4096 + 100] ^= 1;
        let name = format!("sb{copy}.plx");
        std::fs::write(d.join(&name), &bad).unwrap();
        let o = plx(d, &["check", &name]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(
            out.contains(&format!(
                "problem: superblock copy {copy} is damaged (checksum mismatch)"
            )),
            "{out}"
        );
        ok(d, &["export", &name, &format!("x{copy}.raw")]);
        let got = std::fs::read(d.join(format!("x{copy}.raw"))).unwrap();
        assert!(
            got[..data.len()] == data[..],
            "copy {copy} damaged: data differs"
        );

        // A tapdisk opening it says so, and serves the last commit.
        let run = tempfile::tempdir().unwrap();
        let log = run.path().join("tapdisk.log");
        let td = tapdisk_e2e::Tapdisk::start_with(
            &run.path().join("run"),
            &["--log-file", log.to_str().unwrap()],
        )
        .unwrap();
        let sock = run.path().join("nbd.sock");
        td.open(
            &format!("parallax:{}", d.join(&name).display()),
            tapdisk_control::VbdSettings {
                read_only: true,
                nbd: Some(tapdisk_control::NbdListen::Unix(sock.clone())),
                ..Default::default()
            },
        )
        .unwrap();
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(
            logged.contains("damaged superblock copy")
                && logged.contains(&format!("superblock copy {copy} is damaged")),
            "{logged}"
        );
        let mut c =
            tapdisk_e2e::nbd::Client::connect(&sock, std::time::Duration::from_secs(10)).unwrap();
        assert!(c.read(0, 65536).unwrap() == data[..65536]);
        c.disconnect().unwrap();
    }
    // Could not check: not an image, a missing file.
    std::fs::write(d.join("text.plx"), vec![b'x'; 65536]).unwrap();
    for args in [["check", "text.plx"], ["check", "missing.plx"]] {
        let o = plx(d, &args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
    }
}
