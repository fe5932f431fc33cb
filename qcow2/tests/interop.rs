//! Interop with QEMU both ways, against real `qemu-img` and `qemu-io` processes:
//! images QEMU made read back exactly as `qemu-img convert -O raw` says; images we wrote
//! pass `qemu-img check` and `qemu-img compare` with a raw reference; `qemu-img commit` of a
//! leaf we wrote gives the right base.

mod common;

use std::path::{Path, PathBuf};

use common::{check, pattern, qemu_img, qemu_io, qemu_raw, Rng};
use qcow2::{BackingPool, Chain, OpenOptions};

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

/// Opens `path`, retrying a lock conflict for a while: another test thread's fork (to start
/// qemu-img) briefly holds a copy of every open descriptor, and with it our released lock.
/// What is returned is the open's own result once no fork holds the lock.
fn open_unlocked(path: &Path, read_only: bool, cache_slots: usize) -> qcow2::Result<Chain> {
    let o = OpenOptions {
        read_only,
        cache_slots,
    };
    for _ in 0..100 {
        match Chain::open(path, &o, &BackingPool::new()) {
            Err(qcow2::Error::Locked(_)) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => return r,
        }
    }
    panic!("{} stayed locked", path.display())
}

fn open(path: &Path, read_only: bool) -> Chain {
    open_unlocked(path, read_only, 64).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

fn read_all(c: &mut Chain) -> Vec<u8> {
    let mut b = vec![0u8; c.disk_size() as usize];
    // In uneven pieces, to cross clusters and extents at odd places.
    let mut off = 0;
    let mut r = Rng(7);
    while off < b.len() {
        let n = ((r.below(300) + 1) as usize * 512).min(b.len() - off);
        c.read_at(off as u64, &mut b[off..off + n]).unwrap();
        off += n;
    }
    b
}

/// Writes, zero writes and discards with qemu-io, then compares our reading with QEMU's.
fn qemu_made(dir: &Path, name: &str, opts: &str, v3: bool) {
    let img = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p(&img), "8M"]);
    let mut cmds = vec![
        "write -P 0x11 0 4k".to_string(),
        "write -P 0x22 65024 1536".to_string(),
        "write -P 0x33 1M 1M".to_string(),
        "write -P 0x44 3M 100k".to_string(),
        "write -P 0x55 7M 1M".to_string(),
        "discard 1536k 64k".to_string(),
    ];
    if v3 {
        cmds.push("write -z 1152k 128k".into());
        cmds.push("write -z -u 3M 64k".into());
    }
    for c in &cmds {
        qemu_io(&["-f", "qcow2", "-c", c, p(&img)]);
    }
    let want = qemu_raw(&img, "qcow2");
    let mut c = open(&img, true);
    assert!(
        read_all(&mut c) == want,
        "{name}: our reading differs from QEMU's"
    );
}

#[test]
fn images_qemu_made_read_back_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, v3) in [
        ("512", true),
        ("4k", true),
        ("64k", true),
        ("2M", true),
        ("512", false),
        ("64k", false),
        ("1M", false),
    ] {
        let compat = if v3 { "1.1" } else { "0.10" };
        let name = format!("cs{cs}-{compat}.qcow2");
        qemu_made(
            dir.path(),
            &name,
            &format!("cluster_size={cs},compat={compat}"),
            v3,
        );
    }
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let name = format!("rc{bits}.qcow2");
        qemu_made(
            dir.path(),
            &name,
            &format!("cluster_size=4k,refcount_bits={bits}"),
            true,
        );
    }
}

#[test]
fn compressed_images_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    // Compressible and incompressible stretches.
    let mut data = vec![0u8; 6 << 20];
    for (i, b) in data.iter_mut().enumerate().take(2 << 20) {
        *b = (i / 4096) as u8;
    }
    data[3 << 20..4 << 20].copy_from_slice(&pattern(3, 1 << 20));
    std::fs::write(&raw, &data).unwrap();
    for cs in ["4k", "64k", "2M", "512"] {
        let img = dir.path().join(format!("c{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            p(&raw),
            p(&img),
        ]);
        let mut c = open(&img, true);
        assert!(read_all(&mut c) == data, "compressed {cs}");
        // Overwriting inside compressed clusters copies them out.
        drop(c);
        let mut c = open(&img, false);
        let mut want = data.clone();
        for (k, off) in [1000u64, 70_000, 3 << 20, (5 << 20) + 17 * 512]
            .iter()
            .enumerate()
        {
            let w = pattern(k as u64 + 100, 3000 / 512 * 512);
            c.write_at(*off & !511, &w).unwrap();
            let o = (*off & !511) as usize;
            want[o..o + w.len()].copy_from_slice(&w);
        }
        c.close().unwrap();
        assert!(read_all(&mut c) == want);
        drop(c);
        let chk = check(&img, false);
        assert_eq!(
            (chk.corruptions, chk.check_errors, chk.leaks),
            (0, 0, 0),
            "{cs}"
        );
        assert!(
            qemu_raw(&img, "qcow2") == want,
            "compressed {cs} after writes"
        );
    }
}

/// raw base <- qcow2 mid <- qcow2 leaf, all written by QEMU.
fn qemu_chain(dir: &Path, cs: &str) -> PathBuf {
    let base = dir.join("base.raw");
    std::fs::write(&base, pattern(1, 5 << 20)).unwrap();
    let mid = dir.join("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "-o",
        &format!("cluster_size={cs}"),
        p(&mid),
        "8M",
    ]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x61 1M 1M", p(&mid)]);
    qemu_io(&["-f", "qcow2", "-c", "write -z 4M 64k", p(&mid)]);
    let leaf = dir.join("leaf.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(&mid),
        "-F",
        "qcow2",
        "-o",
        &format!("cluster_size={cs}"),
        p(&leaf),
        "10M",
    ]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x71 1536k 8k", p(&leaf)]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x72 9M 4k", p(&leaf)]);
    leaf
}

#[test]
fn backing_chains_read_back_and_share_their_base() {
    for cs in ["4k", "64k"] {
        let dir = tempfile::tempdir().unwrap();
        let leaf = qemu_chain(dir.path(), cs);
        let want = qemu_raw(&leaf, "qcow2");
        let mut c = open(&leaf, true);
        assert_eq!(c.depth(), 3);
        assert!(read_all(&mut c) == want, "chain {cs}");
        // Two chains of one process share the backing images.
        let pool = BackingPool::new();
        let o = OpenOptions {
            read_only: true,
            cache_slots: 8,
        };
        let a = Chain::open(&leaf, &o, &pool).unwrap();
        let b = Chain::open(&leaf, &o, &pool).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a.backing()[0], &b.backing()[0]));
        assert_eq!(pool.len(), 2);
    }
}

/// Random writes (512 B to 1 MiB), zero writes and discards through a chain, mirrored into a
/// raw reference; then `qemu-img check` and `qemu-img compare`.
fn random_io(c: &mut Chain, reference: &mut [u8], seed: u64, ops: usize) {
    let size = c.disk_size();
    let mut r = Rng(seed);
    for i in 0..ops {
        let len = match r.below(4) {
            0 => 512,
            1 => (r.below(16) + 1) * 512,
            2 => (r.below(256) + 1) * 512,
            _ => (r.below(2048) + 1) * 512,
        }
        .min(size);
        let off = (r.below(size - len + 1)) & !511;
        let range = off as usize..(off + len) as usize;
        match r.below(8) {
            0 => {
                c.discard(off, len).unwrap();
                reference[range].fill(0);
            }
            1 => {
                c.write_zeroes(off, len, r.below(2) == 0).unwrap();
                reference[range].fill(0);
            }
            2 => c.flush().unwrap(),
            _ => {
                let d = pattern(seed * 1000 + i as u64, len as usize);
                c.write_at(off, &d).unwrap();
                reference[range].copy_from_slice(&d);
            }
        }
    }
}

fn compare(img: &Path, reference: &Path) {
    common::run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(img),
            p(reference),
        ],
        &[0],
    );
}

#[test]
fn images_we_write_are_clean_and_equal_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (k, opts) in [
        "cluster_size=64k",
        "cluster_size=512,refcount_bits=1",
        "cluster_size=4k,refcount_bits=64",
        "cluster_size=512,refcount_bits=64",
        "cluster_size=2M",
        "cluster_size=64k,compat=0.10",
        "cluster_size=4k,refcount_bits=2,lazy_refcounts=on",
        "cluster_size=16k,refcount_bits=8,preallocation=metadata",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("w{k}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p(&img), "24M"]);
        let mut reference = vec![0u8; 24 << 20];
        let mut c = open(&img, false);
        random_io(&mut c, &mut reference, k as u64 + 1, 300);
        c.close().unwrap();
        drop(c);
        let chk = check(&img, false);
        assert_eq!(chk, common::Check::default(), "{opts}");
        let refp = dir.path().join(format!("w{k}.raw"));
        std::fs::write(&refp, &reference).unwrap();
        compare(&img, &refp);
    }
}

#[test]
fn a_leaf_we_write_over_backing_files_opens_in_qemu_and_commits_right() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = qemu_chain(dir.path(), "64k");
    let mut reference = qemu_raw(&leaf, "qcow2");
    let mut c = open(&leaf, false);
    random_io(&mut c, &mut reference, 99, 200);
    c.close().unwrap();
    drop(c);
    assert_eq!(check(&leaf, false), common::Check::default());
    let refp = dir.path().join("ref.raw");
    std::fs::write(&refp, &reference).unwrap();
    compare(&leaf, &refp);
    // Commit the leaf into mid: mid (over base) must now read as the leaf did, within its
    // own size.
    let mid = dir.path().join("mid.qcow2");
    qemu_img(&["commit", "-q", "-f", "qcow2", p(&leaf)]);
    let got = qemu_raw(&mid, "qcow2");
    assert!(got[..] == reference[..got.len()], "committed base differs");
    // And our reading of mid agrees.
    let mut m = open(&mid, true);
    assert!(read_all(&mut m) == got);
}

#[test]
fn images_we_create_are_clean_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (cb, ro, v) in [(16, 4, 3), (9, 0, 3), (9, 6, 3), (21, 4, 3), (12, 4, 2)] {
        let img = dir.path().join(format!("n{cb}-{ro}-{v}.qcow2"));
        let s = qcow2::FileStorage::create(&img).unwrap();
        let mut o = qcow2::CreateOptions::new(100 << 20);
        o.cluster_bits = cb;
        o.refcount_order = ro;
        o.version = v;
        qcow2::create(&s, &o).unwrap();
        drop(s);
        assert_eq!(check(&img, false), common::Check::default());
        let info = qemu_img(&["info", "--output=json", p(&img)]);
        assert!(info.contains("\"virtual-size\": 104857600"), "{info}");
    }
}

/// The error opening `path` gives, a lock conflict of another thread's fork aside (see
/// `open_unlocked`): the one the image itself causes.
fn open_err(path: &Path, read_only: bool) -> String {
    match open_unlocked(path, read_only, 8) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn features_we_do_not_support_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let data = d("data.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", p(&data)),
        p(&d("ext.qcow2")),
        "1M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        p(&d("l2.qcow2")),
        "1M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        p(&d("zstd.qcow2")),
        "1M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=123456",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        p(&d("luks.qcow2")),
        "1M",
    ]);
    for (f, want) in [
        ("ext.qcow2", "external data file"),
        ("l2.qcow2", "extended L2 entries"),
        ("zstd.qcow2", "zstd"),
        ("luks.qcow2", "LUKS"),
    ] {
        for ro in [true, false] {
            let e = open_err(&d(f), ro);
            assert!(e.contains("unsupported") && e.contains(want), "{f}: {e}");
        }
    }
    // Internal snapshots: read-only works, writing is refused.
    let s = d("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&s), "4M"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x42 0 64k", p(&s)]);
    qemu_img(&["snapshot", "-c", "first", p(&s)]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x43 0 4k", p(&s)]);
    let e = open_err(&s, false);
    assert!(e.contains("internal snapshots (1)"), "{e}");
    let mut c = open(&s, true);
    assert_eq!(c.leaf().snapshots()[0].name, "first");
    assert!(read_all(&mut c) == qemu_raw(&s, "qcow2"));
}

#[test]
fn a_dirty_image_gets_its_refcounts_rebuilt_on_a_writable_open() {
    let dir = tempfile::tempdir().unwrap();
    for cs in ["64k", "512"] {
        let img = dir.path().join(format!("dirty{cs}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("lazy_refcounts=on,cluster_size={cs}"),
            p(&img),
            "16M",
        ]);
        // Killed by a signal with lazy refcounts in use: the dirty bit stays set and the
        // refcounts on disk lag the L2 tables.
        common::run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x5a 0 128k",
                "-c",
                "write -P 0x5b 3M 2M",
                "-c",
                "flush",
                "-c",
                "write -P 0x5c 9M 300k",
                "-c",
                "sigraise 9",
                p(&img),
            ],
            &[-1, 137],
        );
        let want = {
            let mut c = open(&img, true);
            read_all(&mut c)
        };
        assert!(want[..128 << 10].iter().all(|&b| b == 0x5a));
        let before = check(&img, false);
        assert!(
            before != common::Check::default(),
            "{cs}: the killed image should need repair"
        );
        // Our writable open repairs it; the data stays.
        let mut c = open(&img, false);
        assert!(!c.leaf().header().is_dirty());
        assert!(read_all(&mut c) == want);
        c.write_at(12 << 20, &[1u8; 4096]).unwrap();
        c.close().unwrap();
        drop(c);
        assert_eq!(check(&img, false), common::Check::default(), "{cs}");
        let mut want = want;
        want[12 << 20..(12 << 20) + 4096].fill(1);
        assert!(qemu_raw(&img, "qcow2") == want);
    }
}

#[test]
fn partial_writes_over_a_compressed_qcow2_base_copy_the_right_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = pattern(5, 4 << 20);
    std::fs::write(&raw, &data).unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=16k",
        p(&raw),
        p(&base),
    ]);
    let leaf = dir.path().join("leaf.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "-o",
        "cluster_size=64k",
        p(&leaf),
        "4M",
    ]);
    let mut want = data.clone();
    let mut c = open(&leaf, false);
    assert_eq!(c.depth(), 2);
    let mut r = Rng(11);
    for k in 0..40 {
        let len = (r.below(20) + 1) * 512;
        let off = r.below((4 << 20) - len) & !511;
        let w = pattern(1000 + k, len as usize);
        c.write_at(off, &w).unwrap();
        want[off as usize..(off + len) as usize].copy_from_slice(&w);
    }
    c.close().unwrap();
    assert!(read_all(&mut c) == want);
    drop(c);
    assert_eq!(check(&leaf, false), common::Check::default());
    assert!(qemu_raw(&leaf, "qcow2") == want);
}

#[test]
fn qemu_and_we_respect_each_others_locks() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("locked.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "4M"]);
    // We write it: QEMU may not, but may read with force-share.
    let c = open(&img, false);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512", p(&img)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lock"),
        "qemu-io wrote an image we hold: {err}"
    );
    qemu_img(&["info", "-U", p(&img)]);
    drop(c);
    // QEMU writes it: we may not open it at all (a reader must not see it change).
    let sock = dir.path().join("nbd.sock");
    let mut nbd = std::process::Command::new("qemu-nbd")
        .args(["-k", p(&sock), "-f", "qcow2", p(&img)])
        .spawn()
        .unwrap();
    // Serving once its socket exists.
    for _ in 0..250 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let results: Vec<_> = [false, true]
        .iter()
        .map(|&read_only| {
            let o = OpenOptions {
                read_only,
                cache_slots: 8,
            };
            Chain::open(&img, &o, &BackingPool::new()).map(|_| ())
        })
        .collect();
    nbd.kill().unwrap();
    nbd.wait().unwrap();
    for r in results {
        assert!(
            matches!(r, Err(qcow2::Error::Locked(_))),
            "we opened an image qemu-nbd was serving: {r:?}"
        );
    }
}
