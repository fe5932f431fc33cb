//! The `vhd:` driver through its engine: chains, shared parents, discards, pause write-back,
//! errors at open.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::driver::engine::testing::{run, Step};
use crate::driver::engine::Uring;
use crate::driver::{open_image, Image, IoOp, OpenOptionsImg};
use tapdisk_control::{Driver, ImageSpec};

const MB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MB;

fn spec(p: &Path) -> ImageSpec {
    ImageSpec::new(Driver::Vhd, p)
}

fn open(p: &Path) -> Arc<dyn Image> {
    open_image(&spec(p), OpenOptionsImg::default()).unwrap()
}

/// A dynamic base of `size` with `[0x11; 3 MiB]` at 1 MiB, flushed.
fn base(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("base.vhd");
    vhd::create(&p, &vhd::CreateOptions::dynamic(size)).unwrap();
    let set = vhd::ParentSet::new();
    let mut c = vhd::Chain::open(&p, &vhd::ChainOptions::default(), &set).unwrap();
    c.write_at(MB, &vec![0x11u8; 3 * MB as usize]).unwrap();
    c.flush().unwrap();
    p
}

fn snapshot(child: &Path, parent: &Path) {
    vhd::snapshot(child, parent, &vhd::SnapshotOptions::default()).unwrap();
}

/// Reads `len` bytes at `off` through the library (a fresh, private open).
fn lib_read(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let set = vhd::ParentSet::new();
    let opts = vhd::ChainOptions {
        read_only: true,
        ..Default::default()
    };
    let mut c = vhd::Chain::open(p, &opts, &set).unwrap();
    let mut b = vec![0u8; len];
    c.read_at(off, &mut b).unwrap();
    b
}

fn check_clean(p: &Path) {
    let r = vhd::check(p, &vhd::CheckOptions::default()).unwrap();
    assert!(r.clean(), "{}: {:?}", p.display(), r.problems);
}

#[test]
fn a_chain_reads_through_its_parent_and_writes_into_its_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), 8 * MB);
    let leaf = dir.path().join("leaf.vhd");
    snapshot(&leaf, &b);
    let img = open(&leaf);
    assert_eq!(img.size(), 8 * MB);
    assert!(!img.read_only() && img.supports_discard());
    let mut ring = Uring::new(32).unwrap();
    let mut e = img.clone().engine(&mut ring, 4).unwrap();
    assert_eq!(e.describe(), "vhd over aio (2 files)");
    // Half a block over the parent's data, across a block boundary.
    let w = vec![0x22u8; MB as usize];
    assert_eq!(run(&mut *e, &mut ring, Step::write(BLOCK - MB / 2, &w)), 0);
    let mut back = vec![0u8; 4 * MB as usize];
    assert_eq!(run(&mut *e, &mut ring, Step::read(0, &mut back)), 0);
    let mut want = vec![0u8; 4 * MB as usize];
    want[MB as usize..].fill(0x11);
    want[(BLOCK - MB / 2) as usize..(BLOCK + MB / 2) as usize].fill(0x22);
    assert!(back == want, "read back differs");
    assert_eq!(run(&mut *e, &mut ring, Step::op(IoOp::Flush, 0, 0)), 0);
    let st = img.stats();
    assert_eq!(st["type"], "vhd");
    assert_eq!(st["disk_type"], "differencing");
    assert_eq!(st["depth"], 2);
    assert_eq!(st["levels"][1]["path"], b.display().to_string());
    assert!(st["cache"]["bitmap_hits"].as_u64().unwrap() > 0, "{st}");
    // Durable and clean for the library and its checker.
    drop(e);
    drop(img);
    check_clean(&leaf);
    assert!(lib_read(&leaf, 0, want.len()) == want);
    assert!(lib_read(&b, MB, MB as usize).iter().all(|&x| x == 0x11));
}

#[test]
fn vbds_of_one_process_share_their_parents() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), 4 * MB);
    let (c1, c2) = (dir.path().join("c1.vhd"), dir.path().join("c2.vhd"));
    snapshot(&c1, &b);
    snapshot(&c2, &b);
    crate::driver::engine::testing::check_shared_base(&open(&c1), &open(&c2));
}

#[test]
fn discard_drops_whole_blocks_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vhd");
    vhd::create(&p, &vhd::CreateOptions::dynamic(8 * MB)).unwrap();
    let img = open(&p);
    let mut ring = Uring::new(32).unwrap();
    let mut e = img.clone().engine(&mut ring, 2).unwrap();
    let w = vec![0x44u8; 6 * MB as usize];
    assert_eq!(run(&mut *e, &mut ring, Step::write(0, &w)), 0);
    // Blocks 0..3 written; discard from the middle of block 0 to the end of block 1.
    let discard = IoOp::Discard { secure: false };
    assert_eq!(run(&mut *e, &mut ring, Step::op(discard, MB, 3 * MB)), 0);
    assert_eq!(img.stats()["discarded_blocks"], 1);
    let mut back = vec![1u8; 6 * MB as usize];
    assert_eq!(run(&mut *e, &mut ring, Step::read(0, &mut back)), 0);
    assert!(
        back[..BLOCK as usize].iter().all(|&x| x == 0x44),
        "partly covered: kept"
    );
    assert!(back[BLOCK as usize..2 * BLOCK as usize]
        .iter()
        .all(|&x| x == 0));
    assert!(back[2 * BLOCK as usize..].iter().all(|&x| x == 0x44));
    drop(e);
    drop(img);
    check_clean(&p);
}

#[test]
fn quiesce_writes_the_metadata_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.vhd");
    vhd::create(&p, &vhd::CreateOptions::dynamic(4 * MB)).unwrap();
    let img = open(&p);
    let mut ring = Uring::new(32).unwrap();
    let mut e = img.clone().engine(&mut ring, 2).unwrap();
    assert_eq!(
        run(&mut *e, &mut ring, Step::write(4096, &[0x55u8; 8192])),
        0
    );
    // Not flushed: another reader of the file does not see the block yet.
    assert!(lib_read(&p, 4096, 8192).iter().all(|&x| x == 0));
    img.quiesce().unwrap();
    assert!(lib_read(&p, 4096, 8192).iter().all(|&x| x == 0x55));
    check_clean(&p);
}

#[test]
fn bad_images_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.vhd");
    std::fs::write(&junk, vec![7u8; 8192]).unwrap();
    let err = |p: &Path| match open_image(&spec(p), OpenOptionsImg::default()) {
        Ok(_) => panic!("{} opened", p.display()),
        Err(e) => e.to_string(),
    };
    let e = err(&junk);
    assert!(
        e.starts_with(&format!("VHD image {}: ", junk.display())),
        "{e}"
    );
    assert!(e.contains("not a VHD"), "{e}");
    // A child whose parent is gone.
    let b = base(dir.path(), 4 * MB);
    let leaf = dir.path().join("orphan.vhd");
    snapshot(&leaf, &b);
    std::fs::remove_file(&b).unwrap();
    let e = err(&leaf);
    assert!(e.contains("parent"), "{e}");
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
    assert!(img.read_only());
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
