//! Unit tests of whole-image behaviour on memory: a random model test against a plain byte
//! vector for every cluster size and refcount width, reopening in between.

use std::sync::Arc;

use crate::{create, CreateOptions, Image, MemStorage, OpenOptions, Storage};

/// A small deterministic generator.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn open(m: &MemStorage, slots: usize) -> Image {
    let s: Arc<dyn Storage> = Arc::new(m.clone());
    Image::open(
        s,
        &OpenOptions {
            read_only: false,
            cache_slots: slots,
        },
    )
    .unwrap()
}

fn model_run(cluster_bits: u32, refcount_order: u32, version: u32, slots: usize, seed: u64) {
    let size = 3 << 20;
    let m = MemStorage::new();
    let mut o = CreateOptions::new(size);
    o.cluster_bits = cluster_bits;
    o.refcount_order = refcount_order;
    o.version = version;
    create(&m, &o).unwrap();
    let mut img = open(&m, slots);
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    for step in 0..300 {
        let off = rng.below(size) & !511;
        let len = ((rng.below(64) + 1) * 512).min(size - off);
        match rng.below(10) {
            0..=4 => {
                let b = (step % 250 + 1) as u8;
                let data = vec![b; len as usize];
                img.write_at(off, &data, None).unwrap();
                model[off as usize..(off + len) as usize].fill(b);
            }
            5 => {
                img.discard(off, len, None).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            6 => {
                img.write_zeroes(off, len, false, None).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            7 => img.flush().unwrap(),
            8 => {
                img.close().unwrap();
                drop(img);
                img = open(&m, slots);
            }
            _ => {
                let mut b = vec![0xeeu8; len as usize];
                img.read_at(off, &mut b, None).unwrap();
                assert!(
                    b == model[off as usize..(off + len) as usize],
                    "cb {cluster_bits} ro {refcount_order} v{version} step {step}: read {off}+{len}"
                );
            }
        }
    }
    img.close().unwrap();
    assert_eq!(
        img.check().unwrap(),
        crate::CheckReport::default(),
        "cb {cluster_bits} ro {refcount_order} v{version}"
    );
    drop(img);
    let mut img = open(&m, slots);
    let mut all = vec![0u8; size as usize];
    img.read_at(0, &mut all, None).unwrap();
    assert!(
        all == model,
        "cb {cluster_bits} ro {refcount_order}: final image differs"
    );
}

#[test]
fn random_io_matches_a_model_for_every_geometry() {
    for (cb, ro, v, slots) in [
        (16, 4, 3, 64),
        (16, 4, 2, 2),
        (9, 0, 3, 1),
        (9, 6, 3, 3),
        (12, 1, 3, 8),
        (13, 2, 3, 4),
        (14, 3, 3, 16),
        (15, 5, 3, 5),
        (21, 4, 3, 2),
        (10, 4, 2, 1),
    ] {
        model_run(cb, ro, v, slots, 0x9e37_79b9 + cb as u64 * 131 + ro as u64);
    }
}

#[test]
fn tickets_link_after_the_data_and_reads_see_old_content_until_then() {
    let m = MemStorage::new();
    create(&m, &CreateOptions::new(1 << 20)).unwrap();
    let mut img = open(&m, 16);
    let w = img.map_write(4096, 4096, None).unwrap();
    let t = w.ticket.expect("a new cluster");
    // A second write into the same cluster joins the allocation.
    let w2 = img.map_write(8192, 4096, None).unwrap();
    assert_eq!(w2.offset, w.offset + 4096);
    let t2 = w2.ticket.expect("joins");
    m.write_at(&[5u8; 4096], w.offset).unwrap();
    // Not linked yet: reads as zeroes.
    let mut b = [1u8; 4096];
    img.read_at(4096, &mut b, None).unwrap();
    assert_eq!(b, [0u8; 4096]);
    img.commit(t).unwrap();
    img.read_at(4096, &mut b, None).unwrap();
    assert_eq!(b, [5u8; 4096]);
    img.abort(t2);
    assert_eq!(img.pending_allocations(), 0);
    // An aborted lone allocation is given back.
    let w3 = img.map_write(1 << 19, 512, None).unwrap();
    let t3 = w3.ticket.expect("new");
    img.abort(t3);
    let w4 = img.map_write(1 << 19, 512, None).unwrap();
    assert_eq!(w4.offset, w3.offset);
    img.abort(w4.ticket.expect("new"));
}

#[test]
fn the_refcount_table_grows_and_the_image_reopens() {
    let m = MemStorage::new();
    let mut o = CreateOptions::new(8 << 20);
    o.cluster_bits = 9;
    o.refcount_order = 6;
    create(&m, &o).unwrap();
    let mut img = open(&m, 4);
    let before = (
        img.header().refcount_table_offset,
        img.header().refcount_table_clusters,
    );
    let data: Vec<u8> = (0..(6 << 20)).map(|i: u32| (i / 512) as u8).collect();
    img.write_at(1 << 20, &data, None).unwrap();
    img.close().unwrap();
    let after = (
        img.header().refcount_table_offset,
        img.header().refcount_table_clusters,
    );
    assert_ne!(before, after);
    drop(img);
    let mut img = open(&m, 4);
    assert_eq!(
        (
            img.header().refcount_table_offset,
            img.header().refcount_table_clusters
        ),
        after
    );
    let mut back = vec![0u8; data.len()];
    img.read_at(1 << 20, &mut back, None).unwrap();
    assert!(back == data);
}

/// Keeps only what was written at each exact offset, and a size: enough for metadata, which
/// is read back at the offsets it was written at, without holding gigabytes of data.
#[derive(Debug, Default)]
struct Sparse {
    writes: std::sync::Mutex<std::collections::HashMap<u64, Vec<u8>>>,
    size: std::sync::atomic::AtomicU64,
}

impl Storage for Sparse {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        if let Some(v) = self.writes.lock().unwrap().get(&offset) {
            let n = v.len().min(buf.len());
            buf[..n].copy_from_slice(&v[..n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if buf.len() <= 65536 {
            self.writes.lock().unwrap().insert(offset, buf.to_vec());
        }
        self.size.fetch_max(
            offset + buf.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size.load(std::sync::atomic::Ordering::Relaxed))
    }
    fn grow(&self, size: u64) -> std::io::Result<()> {
        self.size
            .fetch_max(size, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn grows_with_zeroes(&self) -> bool {
        true
    }
    fn name(&self) -> String {
        "sparse".into()
    }
}

/// The mapping calls' own cost (no data IO), for the driver's budget:
/// `cargo test -p qcow2 --release --lib mapping_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn mapping_cost() {
    let s = Arc::new(Sparse::default());
    let size = 8u64 << 30;
    create(&*s, &CreateOptions::new(size)).unwrap();
    let mut img = Image::open(
        s,
        &OpenOptions {
            read_only: false,
            cache_slots: 4096,
        },
    )
    .unwrap();
    let mut rng = Rng(42);
    let n = 200_000u64;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let off = rng.below(size / 4096) * 4096;
        let w = img.map_write(off, 4096, None).unwrap();
        if let Some(t) = w.ticket {
            img.commit(t).unwrap();
        }
    }
    let alloc = t.elapsed();
    let t = std::time::Instant::now();
    img.flush().unwrap();
    let flush = t.elapsed();
    let t = std::time::Instant::now();
    for _ in 0..n {
        let off = rng.below(size / 4096) * 4096;
        let _ = img.map_read(off, 4096).unwrap();
    }
    let read = t.elapsed();
    let st = img.stats_handle().snapshot();
    println!(
        "4 KiB random writes into an 8 GiB image: map_write+commit {:.0} ns each \
         (flush after them {:?}); map_read {:.0} ns each; {st:?}",
        alloc.as_nanos() as f64 / n as f64,
        flush,
        read.as_nanos() as f64 / n as f64
    );
}

#[test]
fn chains_move_between_threads_and_backing_images_are_shared_across_them() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<crate::Chain>();
    send::<Image>();
    send_sync::<crate::BackingImage>();
    send_sync::<crate::BackingPool>();
    send_sync::<crate::StatsHandle>();
}

#[test]
fn check_finds_leaks_and_missing_references() {
    // Every refcount width; leaks just past the file, in a later slice and at the end of
    // the first refcount block's range.
    for order in [0, 3, 4, 6] {
        let m = MemStorage::new();
        let mut o = CreateOptions::new(1 << 20);
        o.refcount_order = order;
        create(&m, &o).unwrap();
        let mut img = open(&m, 8);
        img.write_at(0, &[1u8; 70_000], None).unwrap();
        img.close().unwrap();
        assert_eq!(img.check().unwrap(), crate::CheckReport::default());
        let host = match img.map_read(0, 512).unwrap().mapping {
            crate::Mapping::Data { offset } => offset >> 16,
            m => panic!("{m:?}"),
        };
        img.set_refcount(host, 0).unwrap();
        let per_block = (65536 * 8) >> order;
        for leak in [host + 100, 2000.min(per_block - 2), per_block - 1] {
            img.set_refcount(leak, 1).unwrap();
        }
        let r = img.check().unwrap();
        assert_eq!((r.errors, r.leaks), (1, 3), "refcount order {order}");
    }
}

#[test]
fn a_slice_loaded_while_a_slot_is_freed_is_not_loaded_twice() {
    // Found by the fuzz target: with 3 slots, freeing a slot applied deferred frees that
    // loaded the very refcount slice being looked up, and a second, stale copy lost them.
    let m = MemStorage::new();
    let mut o = CreateOptions::new(1 << 20);
    o.cluster_bits = 9;
    create(&m, &o).unwrap();
    {
        let mut img = open(&m, 2048);
        img.write_at(0, &[1u8; 3000], None).unwrap();
        img.write_at(200_000, &[2u8; 70_000], None).unwrap();
        img.write_zeroes(204_800, 8192, false, None).unwrap();
        img.discard(240_000, 20_000, None).unwrap();
        img.write_at(900_000, &[3u8; 5000], None).unwrap();
        img.close().unwrap();
    }
    let mut img = open(&m, 3);
    assert_eq!(img.check().unwrap(), crate::CheckReport::default());
    let off = 4290963706u64 % (1 << 20);
    img.discard(off, 50898u64.min((1 << 20) - off), None)
        .unwrap();
    img.close().unwrap();
    assert_eq!(img.check().unwrap(), crate::CheckReport::default());
}

#[test]
fn a_rebuild_clears_leaked_refcounts_in_every_slice() {
    for order in [0, 4, 6] {
        let m = MemStorage::new();
        let mut o = CreateOptions::new(1 << 20);
        o.refcount_order = order;
        create(&m, &o).unwrap();
        let mut img = open(&m, 8);
        img.write_at(0, &[1u8; 70_000], None).unwrap();
        let per_block = (65536 * 8) >> order;
        for leak in [40, 2000.min(per_block - 2), per_block - 1] {
            img.set_refcount(leak, 1).unwrap();
        }
        img.close().unwrap();
        drop(img);
        assert_eq!(open(&m, 8).check().unwrap().leaks, 3, "order {order}");
        // The dirty bit (incompatible feature bit 0): a writable open rebuilds.
        m.write_at(&[1], 79).unwrap();
        let mut img = open(&m, 8);
        assert!(!img.header().is_dirty());
        assert_eq!(
            img.check().unwrap(),
            crate::CheckReport::default(),
            "order {order}"
        );
    }
}
