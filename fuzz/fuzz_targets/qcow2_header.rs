//! qcow2 headers, header extensions, backing file names, snapshot tables and the L1 and
//! refcount tables as they are opened: a file built from structured fields (mostly plausible:
//! versions 2 and 3, cluster sizes of 512 B to 64 KiB, tables at cluster offsets inside the
//! file, extensions of the known types with lengths that fit, snapshot entries with their
//! variable parts), then bytes overwritten anywhere. Parsed with `Header::parse`, opened
//! read-only (and, when the input asks, read-write, which rebuilds the refcounts of a dirty
//! image), and read a little through the mapping calls.
//!
//! The light companion of `qcow2_meta` (which runs whole workloads against a model): no
//! guest writes and files that are mostly sparse, so it runs several times faster and spends
//! its time in the parsers.
//! Never a panic, a hang or an unbounded allocation, and whatever parses is consistent with
//! the file: tables inside it, sizes within QEMU's limits.
#![no_main]
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use qcow2::header::{ext, Header, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS};
use qcow2::{Image, MemStorage, OpenOptions, Storage};

/// A header extension: a type (mostly a known one), its data, perhaps a lying length.
#[derive(Arbitrary, Debug)]
struct Extension {
    kind: u8,
    raw_kind: u32,
    data: Vec<u8>,
    length: Option<u32>,
}

/// An internal snapshot's table entry.
#[derive(Arbitrary, Debug)]
struct SnapshotEntry {
    l1_cluster: u8,
    l1_size: u16,
    id: Vec<u8>,
    name: Vec<u8>,
    extra: Vec<u8>,
    extra_len: Option<u16>,
    date: u32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// 2 or 3 (others rarely).
    version: u8,
    /// log2 cluster size: 9..=16 mostly.
    cluster_bits: u8,
    size: u32,
    size_high: bool,
    /// Clusters in the file (1..=64).
    clusters: u8,
    l1_cluster: u8,
    l1_size: Option<u32>,
    rt_cluster: u8,
    rt_clusters: u8,
    crypt: u8,
    incompat: u8,
    compat: u64,
    autoclear: u64,
    refcount_order: u8,
    header_extra: u8,
    compression: u8,
    backing: Option<Vec<u8>>,
    backing_size_lie: Option<u16>,
    extensions: Vec<Extension>,
    snapshots_cluster: u8,
    snapshots: Vec<SnapshotEntry>,
    nb_snapshots_lie: Option<u32>,
    /// Entries of the L1 table and of the refcount table (cluster indexes and flag bits).
    l1: Vec<(u8, u8)>,
    refblocks: Vec<u8>,
    /// Bytes overwritten after the file is built.
    patches: Vec<(u32, u8)>,
    read_write: bool,
    reads: Vec<(u32, u16)>,
    /// Also compare every refcount with the references (`Image::check`).
    check: bool,
}

const KNOWN: [u32; 5] = [
    ext::BACKING_FORMAT,
    ext::FEATURE_NAMES,
    ext::BITMAPS,
    ext::ENCRYPTION,
    ext::DATA_FILE,
];

/// A file being built: its bytes up to the last one written, and its size (the rest reads
/// as zeroes, as in a sparse file; a zeroed multi-megabyte buffer per input would cost more
/// than the parsing).
struct File {
    data: Vec<u8>,
    size: usize,
}

impl File {
    fn len(&self) -> usize {
        self.size
    }
    /// `n` bytes at `at` (inside the file), for writing.
    fn at(&mut self, at: usize, n: usize) -> &mut [u8] {
        if self.data.len() < at + n {
            self.data.resize(at + n, 0);
        }
        &mut self.data[at..at + n]
    }
    fn put(&mut self, at: usize, bytes: &[u8]) {
        self.at(at, bytes.len()).copy_from_slice(bytes);
    }
}

fn put32(f: &mut File, at: usize, v: u32) {
    f.put(at, &v.to_be_bytes());
}
fn put64(f: &mut File, at: usize, v: u64) {
    f.put(at, &v.to_be_bytes());
}

/// The file the input describes.
fn build(i: &Input) -> File {
    let bits = match i.cluster_bits % 16 {
        0..=7 => 9 + (i.cluster_bits % 8) as u32,
        15 => i.cluster_bits as u32 % 24,
        _ => 12,
    };
    let cs = 1usize << bits.clamp(MIN_CLUSTER_BITS, 16);
    let clusters = 1 + i.clusters as usize % 64;
    let mut f = File {
        data: Vec::with_capacity(cs),
        size: cs * clusters,
    };
    let version = match i.version % 8 {
        0..=2 => 2,
        7 => i.version as u32 % 5,
        _ => 3,
    };
    let cluster = |c: u8| (c as usize % clusters) * cs;
    put32(&mut f, 0, 0x5146_49fb);
    put32(&mut f, 4, version);
    put32(&mut f, 20, bits);
    let size = i.size as u64 | if i.size_high { (i.size as u64) << 32 } else { 0 };
    put64(&mut f, 24, size);
    put32(&mut f, 32, if i.crypt % 16 == 0 { i.crypt as u32 } else { 0 });
    // An L1 table just large enough, unless the input says otherwise.
    let per_l2 = (cs as u64 / 8) * cs as u64;
    let l1_size = i.l1_size.unwrap_or(size.div_ceil(per_l2).min(1 << 20) as u32);
    put32(&mut f, 36, l1_size);
    let l1_at = cluster(i.l1_cluster);
    put64(&mut f, 40, l1_at as u64);
    let rt_at = cluster(i.rt_cluster);
    put64(&mut f, 48, rt_at as u64);
    put32(&mut f, 56, 1 + i.rt_clusters as u32 % 4);
    let snap_at = cluster(i.snapshots_cluster);
    let nb = i
        .nb_snapshots_lie
        .unwrap_or(i.snapshots.len().min(8) as u32);
    put32(&mut f, 60, nb);
    put64(&mut f, 64, snap_at as u64);
    let mut header_len = 72usize;
    if version >= 3 {
        let incompat = match i.incompat % 4 {
            0 => 0,
            1 => 1, // dirty
            2 => 2, // corrupt
            _ => 1u64 << (i.incompat % 64),
        };
        put64(&mut f, 72, incompat);
        put64(&mut f, 80, i.compat);
        put64(&mut f, 88, i.autoclear);
        put32(&mut f, 96, (i.refcount_order % 8) as u32);
        header_len = 104 + 8 * (i.header_extra as usize % 3);
        put32(&mut f, 100, header_len as u32);
        if header_len > 104 {
            f.put(104, &[if i.compression % 4 == 0 { i.compression } else { 0 }]);
        }
    }
    // Extensions after the header, then the backing file name.
    let mut at = header_len;
    for e in i.extensions.iter().take(6) {
        let kind = match e.kind % 8 {
            0..=4 => KNOWN[e.kind as usize % 5],
            5 => ext::END,
            _ => e.raw_kind,
        };
        let data = &e.data[..e.data.len().min(200)];
        let len = e.length.unwrap_or(data.len() as u32);
        let padded = data.len().next_multiple_of(8);
        if at + 8 + padded > cs.min(f.len()) {
            break;
        }
        put32(&mut f, at, kind);
        put32(&mut f, at + 4, len);
        f.put(at + 8, data);
        at += 8 + padded;
    }
    at += 8; // the end marker (zeroes)
    if let Some(name) = &i.backing {
        let name = &name[..name.len().min(64)];
        if at + name.len() <= cs {
            f.put(at, name);
            put64(&mut f, 8, at as u64);
            let n = i.backing_size_lie.map_or(name.len() as u32, u32::from);
            put32(&mut f, 16, n);
        }
    }
    // Tables: L1 entries and refcount table entries pointing at clusters of the file.
    for (k, &(c, flags)) in i.l1.iter().take(64).enumerate() {
        let e = cluster(c) as u64 | if flags & 1 != 0 { 1 << 63 } else { 0 };
        let e = if flags & 2 != 0 { e | (flags as u64) << 56 } else { e };
        if l1_at + k * 8 + 8 <= f.len() {
            put64(&mut f, l1_at + k * 8, e);
        }
    }
    for (k, &c) in i.refblocks.iter().take(64).enumerate() {
        if rt_at + k * 8 + 8 <= f.len() {
            put64(&mut f, rt_at + k * 8, cluster(c) as u64);
        }
    }
    // The snapshot table.
    let mut at = snap_at;
    for s in i.snapshots.iter().take(8) {
        let id = &s.id[..s.id.len().min(32)];
        let name = &s.name[..s.name.len().min(32)];
        let extra = &s.extra[..s.extra.len().min(64)];
        let var = extra.len() + id.len() + name.len();
        if at + 40 + var > f.len() {
            break;
        }
        put64(&mut f, at, cluster(s.l1_cluster) as u64);
        put32(&mut f, at + 8, s.l1_size as u32);
        f.put(at + 12, &(id.len() as u16).to_be_bytes());
        f.put(at + 14, &(name.len() as u16).to_be_bytes());
        put32(&mut f, at + 16, s.date);
        let extra_len = s.extra_len.map_or(extra.len() as u32, u32::from);
        put32(&mut f, at + 36, extra_len);
        let mut p = at + 40;
        for part in [extra, id, name] {
            f.put(p, part);
            p += part.len();
        }
        at = p.next_multiple_of(8);
    }
    for &(at, b) in i.patches.iter().take(16) {
        let n = f.len();
        f.put(at as usize % n, &[b]);
    }
    f
}

fuzz_target!(|input: Input| {
    let mut f = build(&input);
    let file_size = f.len() as u64;
    // Header::parse takes the first cluster (at most 64 KiB here).
    let first = f.at(0, f.len().min(1 << 16)).to_vec();
    if let Ok(h) = Header::parse(&first, file_size) {
        assert!((MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits));
        assert!(h.version == 2 || h.version == 3);
        assert!(h.refcount_order <= 6);
        let l1_bytes = h.l1_size as u64 * 8;
        assert!(l1_bytes <= MAX_L1_BYTES);
        if h.l1_size > 0 {
            assert!(h.l1_table_offset + l1_bytes <= file_size, "{h:?}");
            assert_eq!(h.l1_table_offset % h.cluster_size(), 0);
        }
        assert!(
            h.refcount_table_offset + h.refcount_table_clusters as u64 * h.cluster_size()
                <= file_size
        );
    }
    let m = MemStorage::with_limit(f.data, 16 << 20);
    if m.grow(file_size).is_err() {
        return;
    }
    let s: Arc<dyn Storage> = Arc::new(m);
    let opts = OpenOptions {
        read_only: !input.read_write,
        cache_slots: 4,
    };
    let Ok(mut img) = Image::open(s, &opts) else {
        return;
    };
    assert!(img.disk_size() % 512 == 0);
    let _ = img.snapshots();
    let size = img.disk_size();
    let mut buf = [0u8; 4096];
    for &(off, len) in input.reads.iter().take(8) {
        if size == 0 {
            break;
        }
        let off = off as u64 % size;
        let n = (len as u64 % 4096).clamp(1, size - off);
        if let Ok(e) = img.map_read(off, n) {
            assert!(e.len >= 1 && e.len <= n);
        }
        let _ = img.read_at(off, &mut buf[..n as usize], None);
    }
    if input.check {
        let _ = img.check();
    }
    let _ = img.close();
});
