//! Unit tests of the engine as a whole: volumes, snapshots, clones, commits, the cache.

use crate::backing::{Backing, MemBacking};
use crate::check::check;
use crate::fault::{FaultBacking, FaultOps};
use crate::image::{CreateOptions, Image, OpenOptions};
use crate::Error;

const MIB: u64 = 1 << 20;

fn create(size: u64, bs: u64, slots: usize) -> Image<MemBacking> {
    let mut o = CreateOptions::new(size);
    o.block_size = bs;
    o.cache_slots = slots;
    Image::create(MemBacking::new(), &o).unwrap()
}

#[test]
fn images_made_in_one_second_by_one_process_have_different_ids() {
    let a = create(MIB, 4096, 8);
    let b = create(MIB, 4096, 8);
    assert_ne!(a.superblock().uuid, b.superblock().uuid);
    assert_ne!(a.superblock().uuid, [0; 16]);
}

fn reopen<B: Backing + Clone>(img: &Image<B>, slots: usize) -> Image<B> {
    let o = OpenOptions {
        cache_slots: slots,
        read_only: false,
    };
    Image::open(img.backing().clone(), &o).unwrap()
}

fn assert_clean<B: Backing>(b: &B) {
    let r = check(b, None).unwrap();
    assert!(r.is_clean(), "{r}");
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

fn read(img: &mut Image<impl Backing>, vol: &str, off: u64, len: usize) -> Vec<u8> {
    let v = img.volume(vol).unwrap();
    let mut b = vec![0u8; len];
    img.read_at(v, off, &mut b).unwrap();
    b
}

fn write(img: &mut Image<impl Backing>, vol: &str, off: u64, data: &[u8]) {
    let v = img.volume(vol).unwrap();
    img.write_at(v, off, data).unwrap();
}

#[test]
fn new_image_reads_zeroes_and_checks_clean() {
    let mut img = create(8 * MIB, 4096, 128);
    assert_eq!(read(&mut img, "base", 0, 65536), vec![0; 65536]);
    assert_eq!(img.superblock().generation, 1);
    assert_clean(img.backing());
    let img2 = reopen(&img, 10);
    assert_eq!(img2.volumes().len(), 1);
    assert_eq!(img2.volumes()[0].name, "base");
}

#[test]
fn writes_read_back_across_flush_and_reopen_with_any_cache_size() {
    for &bs in &[4096u64, 16384, 65536] {
        for &slots in &[1usize, 2, 3, 10, 128] {
            let mut img = create(32 * MIB, bs, slots);
            // Unaligned writes spanning blocks, leaves and a gap.
            let a = pattern(1, 100_000);
            write(&mut img, "base", 1000, &a);
            let b = pattern(7, 5000);
            write(&mut img, "base", 3 * MIB + 17, &b);
            write(&mut img, "base", 31 * MIB, &pattern(9, MIB as usize));
            assert_eq!(read(&mut img, "base", 1000, a.len()), a);
            img.flush().unwrap();
            assert_clean(img.backing());
            let mut img = reopen(&img, slots);
            assert_eq!(
                read(&mut img, "base", 1000, a.len()),
                a,
                "bs {bs} slots {slots}"
            );
            assert_eq!(read(&mut img, "base", 3 * MIB + 17, b.len()), b);
            assert_eq!(read(&mut img, "base", 0, 1000), vec![0; 1000]);
            assert_eq!(read(&mut img, "base", 3 * MIB, 17), vec![0; 17]);
            assert_eq!(
                read(&mut img, "base", 31 * MIB, MIB as usize),
                pattern(9, MIB as usize)
            );
        }
    }
}

#[test]
fn snapshot_is_unchanged_by_overwriting_the_disk_and_clone_diverges() {
    let mut img = create(16 * MIB, 4096, 16);
    let a = pattern(3, 2 * MIB as usize);
    write(&mut img, "base", 0, &a);
    let base = img.volume("base").unwrap();
    img.snapshot(base, "s1").unwrap();
    write(&mut img, "base", 4096, &pattern(50, 8192));
    write(&mut img, "base", MIB + 100, &pattern(60, 300));
    img.flush().unwrap();
    assert_clean(img.backing());
    assert_eq!(read(&mut img, "s1", 0, a.len()), a);
    let s1 = img.volume("s1").unwrap();
    let c = img.clone_volume(s1, "c1").unwrap();
    img.write_at(c, 0, &pattern(99, 4096)).unwrap();
    img.flush().unwrap();
    assert_eq!(read(&mut img, "c1", 0, 4096), pattern(99, 4096));
    assert_eq!(read(&mut img, "c1", 4096, 8192), a[4096..12288].to_vec());
    assert_eq!(read(&mut img, "s1", 0, a.len()), a);
    assert_eq!(read(&mut img, "base", 4096, 8192), pattern(50, 8192));
    assert_eq!(read(&mut img, "base", 0, 4096), a[..4096].to_vec());
    // Snapshots refuse writes.
    assert!(matches!(img.write_at(s1, 0, &[1]), Err(Error::ReadOnly(_))));
    assert_clean(img.backing());
    let mut img = reopen(&img, 1);
    assert_eq!(read(&mut img, "s1", 0, a.len()), a);
    assert_eq!(read(&mut img, "c1", 0, 4096), pattern(99, 4096));
}

#[test]
fn delete_gives_space_back() {
    let mut img = create(64 * MIB, 4096, 32);
    let base = img.volume("base").unwrap();
    write(&mut img, "base", 0, &pattern(1, 8 * MIB as usize));
    let s = img.snapshot(base, "old").unwrap();
    // Overwrite everything: the snapshot now owns the old 8 MiB alone.
    write(&mut img, "base", 0, &pattern(2, 8 * MIB as usize));
    img.flush().unwrap();
    let u = img.usage(s).unwrap();
    assert_eq!(u.mapped_blocks, 2048);
    assert_eq!(u.exclusive_blocks, 2048);
    let used_before = img.superblock().used_machine;
    let freed = img.delete(s).unwrap();
    assert_eq!(freed, 2048);
    img.flush().unwrap();
    let used_after = img.superblock().used_machine;
    assert!(
        used_before - used_after >= 2048,
        "{used_before} -> {used_after}"
    );
    assert_clean(img.backing());
    assert!(img.volume("old").is_err());
    // The space is reused: writing 8 MiB more grows the store by far less than 8 MiB (at most
    // one data reservation, for the new metadata).
    let store = img.superblock().store_blocks;
    write(&mut img, "base", 16 * MIB, &pattern(3, 8 * MIB as usize));
    img.flush().unwrap();
    assert!(
        img.superblock().store_blocks < store + 1024,
        "store grew from {store} to {}",
        img.superblock().store_blocks
    );
    assert_clean(img.backing());
}

#[test]
fn discard_frees_and_reads_zeroes() {
    let mut img = create(16 * MIB, 4096, 8);
    let base = img.volume("base").unwrap();
    write(&mut img, "base", 0, &pattern(1, 4 * MIB as usize));
    let s = img.snapshot(base, "s").unwrap();
    // Partly covered blocks at both ends stay; whole blocks inside go.
    let freed = img.discard(base, 100, 3 * MIB).unwrap();
    assert_eq!(freed, 0, "all shared with the snapshot");
    img.flush().unwrap();
    let got = read(&mut img, "base", 0, 4 * MIB as usize);
    let want = pattern(1, 4 * MIB as usize);
    assert_eq!(got[..4096], want[..4096]);
    assert_eq!(
        got[4096..3 * MIB as usize],
        vec![0; 3 * MIB as usize - 4096][..]
    );
    assert_eq!(got[3 * MIB as usize..], want[3 * MIB as usize..]);
    assert_eq!(read(&mut img, "s", 0, 4 * MIB as usize), want);
    img.delete(s).unwrap();
    let freed = img.discard(base, 0, 16 * MIB).unwrap();
    assert_eq!(freed, 256 + 1);
    img.flush().unwrap();
    assert_clean(img.backing());
    assert_eq!(
        read(&mut img, "base", 0, 4 * MIB as usize),
        vec![0; 4 * MIB as usize]
    );
}

#[test]
fn extents_merge_contiguous_blocks() {
    let mut img = create(16 * MIB, 4096, 128);
    let base = img.volume("base").unwrap();
    let e = img.map_write(base, 0, 256 << 10).unwrap();
    assert_eq!(e.len, 256 << 10, "a fresh sequential write is one extent");
    let r = img.map_read(base, 0, MIB).unwrap();
    assert_eq!(r, e);
    // Later writes continue where the last one ended, up to the end of the reservation.
    let e2 = img.map_write(base, 256 << 10, 4096).unwrap();
    assert!(e2.machine.unwrap() > e.machine.unwrap());
    img.map_write(base, (256 << 10) + 4096, MIB - (256 << 10) - 4096)
        .unwrap();
    let r = img.map_read(base, 4 * MIB, MIB).unwrap();
    assert_eq!(r.machine, None);
    assert_eq!(r.len, MIB);
    // Across a leaf boundary (2 MiB) extents stop.
    let r = img.map_read(base, MIB, 2 * MIB).unwrap();
    assert_eq!(r.len, MIB);
    assert_eq!(r.machine, None);
}

#[test]
fn defrag_moves_blocks_without_touching_v2p() {
    let mut img = create(16 * MIB, 4096, 64);
    let base = img.volume("base").unwrap();
    // Write backwards, interleaved with a snapshot, so blocks are out of order.
    for i in (0..256u64).rev() {
        img.write_at(base, i * 8192, &pattern(i as u8, 4096))
            .unwrap();
        if i == 100 {
            img.snapshot(base, "mid").unwrap();
        }
    }
    img.flush().unwrap();
    let roots: Vec<_> = img.volumes().iter().map(|v| v.root).collect();
    let before: Vec<_> = (0..2)
        .map(|i| {
            read(
                &mut img,
                if i == 0 { "base" } else { "mid" },
                0,
                4 * MIB as usize,
            )
        })
        .collect();
    let rep = img.defrag(base).unwrap();
    assert_eq!(rep.moved, 256);
    assert!(rep.extents_before > 100, "{rep:?}");
    assert_eq!(rep.extents_after, 1, "{rep:?}");
    assert_eq!(read(&mut img, "base", 0, 4 * MIB as usize), before[0]);
    assert_eq!(read(&mut img, "mid", 0, 4 * MIB as usize), before[1]);
    let after: Vec<_> = img.volumes().iter().map(|v| v.root).collect();
    assert_eq!(roots, after);
    assert_clean(img.backing());
}

#[test]
fn open_refuses_garbage_with_clear_errors() {
    let e = Image::open(MemBacking::from_bytes(vec![]), &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, Error::NotParallax(_)), "{e}");
    let e = Image::open(
        MemBacking::from_bytes(vec![0x55; 65536]),
        &OpenOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::NotParallax(_)), "{e}");
    // Truncated.
    let img = create(4 * MIB, 4096, 8);
    let bytes = img.backing().to_bytes();
    let e = Image::open(
        MemBacking::from_bytes(bytes[..bytes.len() - 4096].to_vec()),
        &OpenOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    // Both superblocks damaged.
    let mut b = bytes.clone();
    b[100] ^= 1;
    b[4096 + 100] ^= 1;
    let e = Image::open(MemBacking::from_bytes(b), &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
}

#[test]
fn corrupt_node_is_reported_and_stops_the_image() {
    let mut img = create(4 * MIB, 4096, 4);
    write(&mut img, "base", 0, &pattern(1, 4 * MIB as usize));
    img.flush().unwrap();
    // Damage every block after the superblocks that the check walks: find a V2P leaf by
    // flipping bytes in each metadata block in turn until check complains.
    let bytes = img.backing().to_bytes();
    let mut found = 0;
    for blk in 2..(bytes.len() / 4096) {
        let mut b = bytes.clone();
        b[blk * 4096 + 9] ^= 0x10;
        let mb = MemBacking::from_bytes(b);
        let r = check(&mb, None).unwrap();
        if r.is_clean() {
            continue; // a data block
        }
        found += 1;
        assert!(r.to_string().contains("checksum mismatch"), "{r}");
        // Reading everything either works or fails with an error; then the image is stopped.
        if let Ok(mut img) = Image::open(mb, &OpenOptions::default()) {
            let v = img.volume("base").unwrap();
            let mut buf = vec![0u8; 4 * MIB as usize];
            if let Err(e) = img.read_at(v, 0, &mut buf) {
                assert!(matches!(e, Error::Corrupt(_)), "{e}");
                assert!(matches!(
                    img.read_at(v, 0, &mut buf[..10]),
                    Err(Error::Stopped(_))
                ));
            }
        }
    }
    assert!(found > 3, "metadata blocks found: {found}");
}

#[test]
fn first_io_error_stops_the_image_and_the_last_commit_survives() {
    let f = FaultBacking::new();
    let mut o = CreateOptions::new(8 * MIB);
    o.cache_slots = 4;
    let mut img = Image::create(f.clone(), &o).unwrap();
    write(&mut img, "base", 0, &pattern(1, MIB as usize));
    img.flush().unwrap();
    write(&mut img, "base", 2 * MIB, &pattern(2, MIB as usize));
    f.fail_after(0, FaultOps::Flushes, false);
    let e = img.flush().unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    let v = img.volume("base").unwrap();
    assert!(matches!(img.write_at(v, 0, &[1]), Err(Error::Stopped(_))));
    assert!(matches!(img.flush(), Err(Error::Stopped(_))));
    drop(img);
    let c = f.crash(1);
    assert_clean(&c);
    let mut img = Image::open(c, &OpenOptions::default()).unwrap();
    assert_eq!(
        read(&mut img, "base", 0, MIB as usize),
        pattern(1, MIB as usize)
    );
}

#[test]
fn warm_loads_the_root_so_the_first_io_misses_nothing_above_it() {
    let mut img = create(64 * MIB, 4096, 128);
    let base = img.volume("base").unwrap();
    for i in 0..64u64 {
        img.write_at(base, i * 4096, &[7u8; 4096]).unwrap();
    }
    img.flush().unwrap();
    let mut img = reopen(&img, 128);
    let base = img.volume("base").unwrap();
    let before = img.stats();
    img.warm(base).unwrap();
    let s = img.stats().since(&before);
    assert!(s.v2p.misses == 1 && s.p2m.misses >= 1, "{s:?}");
    // Warm again: the root is cached, nothing is read.
    let before = img.stats();
    img.warm(base).unwrap();
    let s = img.stats().since(&before);
    assert_eq!((s.v2p.misses, s.p2m.misses), (0, 0), "{s:?}");
    assert_eq!(read(&mut img, "base", 0, 4096), vec![7u8; 4096]);
    assert!(matches!(
        img.warm(crate::VolumeId(999)),
        Err(Error::NoSuchVolume(_))
    ));
}

#[test]
fn cache_counts_per_layer() {
    let mut img = create(64 * MIB, 4096, 128);
    let base = img.volume("base").unwrap();
    let before = img.stats();
    for i in 0..1024u64 {
        img.write_at(base, i * 4096, &[1u8; 4096]).unwrap();
    }
    img.flush().unwrap();
    let s = img.stats().since(&before);
    assert!(s.v2p.lookups >= 1024 && s.p2m.lookups >= 1024, "{s:?}");
    assert_eq!(s.v2p.misses, 0);
    assert_eq!(s.p2m.misses, 0);
    img.drop_cache().unwrap();
    let before = img.stats();
    let mut b = vec![0u8; 4 * MIB as usize];
    img.read_at(base, 0, &mut b).unwrap();
    let s = img.stats().since(&before);
    assert!(s.v2p.misses >= 3 && s.p2m.misses >= 4, "{s:?}");
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains("\"v2p\"") && json.contains("miss_rate_pct"));
}

#[test]
fn many_snapshots_and_names() {
    let mut img = create(4 * MIB, 4096, 16);
    let base = img.volume("base").unwrap();
    for i in 0..40u8 {
        img.write_at(base, 0, &[i; 512]).unwrap();
        img.snapshot(base, &format!("s{i}")).unwrap();
    }
    assert!(matches!(
        img.snapshot(base, "s3"),
        Err(Error::VolumeExists(_))
    ));
    assert!(matches!(img.snapshot(base, "a/b"), Err(Error::Invalid(_))));
    img.flush().unwrap();
    let mut img = reopen(&img, 16);
    for i in 0..40u8 {
        assert_eq!(read(&mut img, &format!("s{i}"), 0, 512), vec![i; 512]);
    }
    assert_clean(img.backing());
    let v = img.volume("s5").unwrap();
    img.rename(v, "five").unwrap();
    img.flush().unwrap();
    let mut img = reopen(&img, 16);
    assert_eq!(read(&mut img, "five", 0, 512), vec![5; 512]);
}

#[test]
fn read_only_open_refuses_changes() {
    let img = create(4 * MIB, 4096, 16);
    let o = OpenOptions {
        cache_slots: 8,
        read_only: true,
    };
    let mut ro = Image::open(img.backing().clone(), &o).unwrap();
    let v = ro.volume("base").unwrap();
    assert!(matches!(ro.write_at(v, 0, &[1]), Err(Error::ReadOnly(_))));
    assert!(matches!(ro.snapshot(v, "x"), Err(Error::ReadOnly(_))));
    assert!(matches!(ro.discard(v, 0, 4096), Err(Error::ReadOnly(_))));
    ro.flush().unwrap();
}

#[test]
fn bad_create_arguments() {
    for (size, bs) in [
        (0, 4096),
        (1000, 4096),
        (MIB, 2048),
        (MIB, 6000),
        (MIB, 1 << 17),
    ] {
        let mut o = CreateOptions::new(size);
        o.block_size = bs;
        assert!(matches!(
            Image::create(MemBacking::new(), &o),
            Err(Error::Invalid(_))
        ));
    }
    let img = create(512, 4096, 1);
    assert_eq!(img.size(), 512);
    let mut img = create(1 << 40, 4096, 16);
    write(&mut img, "base", (1 << 40) - 4096, &[5; 4096]);
    assert!(img
        .write_at(img.volume("base").unwrap(), (1 << 40) - 4095, &[5; 4096])
        .is_err());
    img.flush().unwrap();
    assert_clean(img.backing());
}

#[test]
fn tiny_caches_commit_cleanly() {
    for slots in [1usize, 2, 3, 4, 5, 8] {
        let mut o = CreateOptions::new(8 * MIB);
        o.cache_slots = slots;
        let mut img = Image::create(MemBacking::new(), &o).unwrap();
        assert_clean(img.backing());
        write(&mut img, "base", 0, &pattern(1, MIB as usize));
        img.flush().unwrap();
        assert_clean(img.backing());
        write(&mut img, "base", 2 * MIB, &pattern(2, MIB as usize));
        let v = img.volume("base").unwrap();
        img.snapshot(v, "s").unwrap();
        write(&mut img, "base", 100, &pattern(3, MIB as usize));
        img.flush().unwrap();
        assert_clean(img.backing());
        assert_eq!(
            read(&mut img, "s", 0, MIB as usize),
            pattern(1, MIB as usize)
        );
    }
}

/// A store that grows normally up to `limit` bytes and then fails every growth with `errno`,
/// counting the attempts.
#[derive(Clone)]
struct GrowFails {
    inner: MemBacking,
    limit: u64,
    errno: i32,
    failed_grows: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Backing for GrowFails {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn grow(&self, size: u64) -> std::io::Result<()> {
        if size > self.limit {
            self.failed_grows
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(std::io::Error::from_raw_os_error(self.errno));
        }
        self.inner.grow(size)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
}

#[test]
fn a_store_that_cannot_grow_gets_smaller_reservations_but_io_errors_are_not_retried() {
    // Create, then write until the store has to grow beyond what was created.
    let fill = |errno: i32| {
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut o = CreateOptions::new(64 * MIB);
        o.cache_slots = 128;
        let b = GrowFails {
            inner: MemBacking::new(),
            limit: u64::MAX,
            errno,
            failed_grows: failed.clone(),
        };
        let mut img = Image::create(b, &o).unwrap();
        let v = img.volume("base").unwrap();
        img.write_at(v, 0, &pattern(1, 4096)).unwrap();
        img.flush().unwrap();
        // From now on the store cannot grow past 2 MiB more than it has.
        let limit = img.backing().size().unwrap() + 2 * MIB;
        let b = GrowFails {
            limit,
            ..img.backing().clone()
        };
        drop(img);
        let mut img = Image::open(
            b,
            &OpenOptions {
                cache_slots: 128,
                read_only: false,
            },
        )
        .unwrap();
        let v = img.volume("base").unwrap();
        let mut written = 0u64;
        let err = loop {
            match img.write_at(v, MIB + written, &pattern(2, 65536)) {
                Ok(()) => written += 65536,
                Err(e) => break e,
            }
            assert!(written < 64 * MIB, "the store never filled");
        };
        (
            written,
            err,
            failed.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    // Out of space: the first full-size reservation fails, smaller ones fill the rest.
    let (written, err, grows) = fill(libc::ENOSPC);
    assert!(matches!(err, Error::NoSpace(_)), "{err}");
    assert!(
        written >= MIB,
        "only {written} bytes written before NoSpace"
    );
    assert!(grows > 1, "{grows} failed growths");
    // A real IO error while growing is not retried with smaller sizes: it is reported.
    let (_, err, grows) = fill(libc::EIO);
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_eq!(grows, 1);
}
