//! The `qcow2:` driver through its engine: a chain read through and copied on write, shared
//! backing images, discards, pause write-back, a leaf released for a snapshot's overlay,
//! errors at open. (Images QEMU made, compressed clusters among them, are the end-to-end
//! tests' business: `tests/tests/qcow2_driver.rs`.)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::driver::engine::testing::{run, Step};
use crate::driver::engine::Uring;
use crate::driver::{open_image, Image, IoOp, OpenOptionsImg};
use tapdisk_control::{Driver, ImageSpec};

const MB: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;

fn spec(p: &Path) -> ImageSpec {
    ImageSpec::new(Driver::Qcow2, p)
}

fn open(p: &Path) -> Arc<dyn Image> {
    open_image(&spec(p), OpenOptionsImg::default()).unwrap()
}

/// A qcow2 image of `size` at `dir/name`, over `backing` (a name relative to `dir`).
fn create(dir: &Path, name: &str, size: u64, backing: Option<&str>) -> PathBuf {
    let p = dir.join(name);
    let f = qcow2::FileStorage::create(&p).unwrap();
    let mut o = qcow2::CreateOptions::new(size);
    o.backing = backing.map(|b| (b.into(), Some("qcow2".into())));
    qcow2::create(&f, &o).unwrap();
    p
}

/// A base of `size` with `[0x11; 3 MiB]` at 1 MiB, closed.
fn base(dir: &Path, size: u64) -> PathBuf {
    let p = create(dir, "base.qcow2", size, None);
    let mut c = lib_open(&p, false);
    c.write_at(MB, &vec![0x11u8; 3 * MB as usize]).unwrap();
    c.close().unwrap();
    p
}

/// The chain at `p`, opened by the library itself (its own pool: nothing shared with the
/// driver's).
fn lib_open(p: &Path, read_only: bool) -> qcow2::Chain {
    let opts = qcow2::OpenOptions {
        read_only,
        ..Default::default()
    };
    qcow2::Chain::open(p, &opts, &qcow2::BackingPool::new()).unwrap()
}

fn lib_read(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    lib_open(p, true).read_at(off, &mut b).unwrap();
    b
}

fn check_clean(p: &Path) {
    let mut c = lib_open(p, true);
    let r = c.leaf_mut().check().unwrap();
    assert_eq!(r, qcow2::CheckReport::default(), "{}", p.display());
}

#[test]
fn a_chain_reads_through_its_backing_file_and_copies_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), 8 * MB);
    let leaf = create(dir.path(), "leaf.qcow2", 8 * MB, Some("base.qcow2"));
    let img = open(&leaf);
    assert_eq!(img.size(), 8 * MB);
    assert!(!img.read_only() && img.supports_discard());
    let mut ring = Uring::new(32).unwrap();
    let mut e = img.clone().engine(&mut ring, 4).unwrap();
    assert_eq!(e.describe(), "qcow2 over aio (2 files)");
    // 4 KiB in the middle of a cluster over the base's data, and 100 KiB across clusters
    // at the base data's end.
    let w = vec![0x22u8; 4096];
    assert_eq!(run(&mut *e, &mut ring, Step::write(MB + 8192, &w)), 0);
    let w2 = vec![0x23u8; 100 << 10];
    assert_eq!(
        run(&mut *e, &mut ring, Step::write(4 * MB - 50_000, &w2)),
        0
    );
    let mut back = vec![0u8; 6 * MB as usize];
    assert_eq!(run(&mut *e, &mut ring, Step::read(0, &mut back)), 0);
    let mut want = vec![0u8; 6 * MB as usize];
    want[MB as usize..4 * MB as usize].fill(0x11);
    want[(MB + 8192) as usize..(MB + 12288) as usize].fill(0x22);
    want[(4 * MB - 50_000) as usize..(4 * MB - 50_000 + (100 << 10)) as usize].fill(0x23);
    assert!(back == want, "read back differs");
    assert_eq!(run(&mut *e, &mut ring, Step::op(IoOp::Flush, 0, 0)), 0);
    let st = img.stats();
    assert_eq!(st["type"], "qcow2");
    assert_eq!(
        (st["depth"].as_u64(), st["version"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(st["cluster_size"], CLUSTER);
    assert_eq!(st["levels"][1]["path"], b.display().to_string());
    assert!(st["cache"]["l2_hits"].as_u64().unwrap() > 0, "{st}");
    // Durable, clean, and the base untouched.
    drop(e);
    drop(img);
    check_clean(&leaf);
    assert!(lib_read(&leaf, 0, want.len()) == want);
    assert!(lib_read(&b, MB, 3 * MB as usize).iter().all(|&x| x == 0x11));
}

#[test]
fn vbds_of_one_process_share_their_backing_files() {
    let dir = tempfile::tempdir().unwrap();
    base(dir.path(), 4 * MB);
    let c1 = create(dir.path(), "c1.qcow2", 4 * MB, Some("base.qcow2"));
    let c2 = create(dir.path(), "c2.qcow2", 4 * MB, Some("base.qcow2"));
    crate::driver::engine::testing::check_shared_base(&open(&c1), &open(&c2));
}

#[test]
fn a_discarded_range_reads_as_zeroes_even_over_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    base(dir.path(), 8 * MB);
    let p = create(dir.path(), "d.qcow2", 8 * MB, Some("base.qcow2"));
    let img = open(&p);
    let mut ring = Uring::new(32).unwrap();
    let mut e = img.clone().engine(&mut ring, 2).unwrap();
    let w = vec![0x44u8; MB as usize];
    assert_eq!(run(&mut *e, &mut ring, Step::write(0, &w)), 0);
    // Over written clusters, the base's data, a partial cluster at each end.
    let discard = IoOp::Discard { secure: false };
    assert_eq!(
        run(
            &mut *e,
            &mut ring,
            Step::op(discard, 512 << 10, 2 * MB + 4096)
        ),
        0
    );
    let mut back = vec![1u8; 4 * MB as usize];
    assert_eq!(run(&mut *e, &mut ring, Step::read(0, &mut back)), 0);
    let mut want = vec![0u8; 4 * MB as usize];
    want[..512 << 10].fill(0x44);
    want[(2560 << 10) + 4096..].fill(0x11);
    assert!(back == want, "read back differs");
    drop(e);
    drop(img);
    check_clean(&p);
}

#[test]
fn quiesce_writes_the_metadata_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "q.qcow2", 4 * MB, None);
    let img = open(&p);
    let mut ring = Uring::new(32).unwrap();
    let mut e = img.clone().engine(&mut ring, 2).unwrap();
    assert_eq!(
        run(&mut *e, &mut ring, Step::write(4096, &[0x55u8; 8192])),
        0
    );
    // Not flushed: the cluster is not linked on disk yet (read with QEMU's force-share,
    // no locks).
    let unlocked = |p: &Path| {
        let s: Arc<dyn qcow2::Storage> =
            Arc::new(qcow2::FileStorage::open_unlocked(p, true).unwrap());
        let opts = qcow2::OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let mut i = qcow2::Image::open(s, &opts).unwrap();
        let mut b = vec![0u8; 8192];
        i.read_at(4096, &mut b, None).unwrap();
        b
    };
    assert!(unlocked(&p).iter().all(|&x| x == 0));
    img.quiesce().unwrap();
    assert!(unlocked(&p).iter().all(|&x| x == 0x55));
}

#[test]
fn a_paused_leaf_lets_a_new_overlay_open_it_as_its_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = base(dir.path(), 4 * MB);
    let img = open(&leaf);
    let mut ring = Uring::new(32).unwrap();
    let mut e = img.clone().engine(&mut ring, 2).unwrap();
    assert_eq!(run(&mut *e, &mut ring, Step::write(0, &[0x66u8; 4096])), 0);
    let new = create(dir.path(), "new.qcow2", 4 * MB, Some("base.qcow2"));
    // While the leaf is a writer, nobody may read it as a backing file, we included.
    let refused = open_image(&spec(&new), OpenOptionsImg::default())
        .err()
        .unwrap();
    assert!(refused.to_string().contains("in use"), "{refused}");
    img.release().unwrap();
    let top = open(&new);
    let mut e2 = top.clone().engine(&mut ring, 2).unwrap();
    let mut got = vec![0u8; 8192];
    assert_eq!(run(&mut *e2, &mut ring, Step::read(0, &mut got)), 0);
    assert!(
        got[..4096].iter().all(|&x| x == 0x66),
        "written before the release"
    );
    // The old leaf cannot be a writer again while the overlay reads it.
    assert!(img.reclaim().unwrap_err().to_string().contains("in use"));
    drop(e2);
    drop(top);
    img.reclaim().unwrap();
    assert_eq!(
        run(&mut *e, &mut ring, Step::write(4096, &[0x67u8; 512])),
        0
    );
}

#[test]
fn bad_images_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.qcow2");
    std::fs::write(&junk, vec![7u8; 8192]).unwrap();
    let err = |p: &Path| match open_image(&spec(p), OpenOptionsImg::default()) {
        Ok(_) => panic!("{} opened", p.display()),
        Err(e) => e.to_string(),
    };
    let e = err(&junk);
    assert!(
        e.starts_with(&format!("qcow2 image {}: ", junk.display())),
        "{e}"
    );
    assert!(e.contains("not a qcow2 image"), "{e}");
    // A child whose backing file is gone.
    let leaf = create(dir.path(), "orphan.qcow2", 4 * MB, Some("gone.qcow2"));
    let e = err(&leaf);
    assert!(e.contains("gone.qcow2"), "{e}");
    // A writer is alone: a second writable open is refused, naming the lock.
    let p = create(dir.path(), "one.qcow2", 4 * MB, None);
    let _first = open(&p);
    let e = err(&p);
    assert!(e.contains("in use by another process"), "{e}");
}

#[test]
fn read_only_vbds_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), 4 * MB);
    let ro = OpenOptionsImg {
        read_only: true,
        ..Default::default()
    };
    let img = open_image(&spec(&b), ro).unwrap();
    assert!(img.read_only() && !img.supports_discard());
    let mut ring = Uring::new(8).unwrap();
    let mut e = img.clone().engine(&mut ring, 1).unwrap();
    assert_eq!(
        run(&mut *e, &mut ring, Step::write(0, &[1u8; 512])),
        -libc::EROFS
    );
    let mut got = [0u8; 512];
    assert_eq!(run(&mut *e, &mut ring, Step::read(MB, &mut got)), 0);
    assert_eq!(got, [0x11u8; 512]);
}
