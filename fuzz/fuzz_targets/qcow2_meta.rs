//! Damaged qcow2 images: a small valid image (256 KiB disks, one of several templates:
//! versions 2 and 3, 512 B and 4 KiB clusters, 1-, 16- and 64-bit refcounts, with data, zeroed
//! and discarded clusters, a compressed cluster, header extensions and a backing file name),
//! patched at
//! header fields and table entries chosen by structure and at arbitrary bytes, perhaps
//! truncated; then opened (read-write or read-only) and read, written, zeroed, discarded,
//! mapped with tickets committed or aborted, flushed and reopened. Never a panic, a hang or
//! an unbounded allocation: every outcome is a value or an error.
//!
//! Inputs without patches also run against a model: every read returns what the model holds
//! (the template's content, read once when the template is made, then every write, zeroing
//! and discard), and at the end, if anything changed the image, the refcounts match the
//! references exactly (no corruption; no leak unless an operation failed). Header, extension
//! and table parsing alone, much faster, is `qcow2_header`'s.
#![no_main]
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use qcow2::{create, CreateOptions, Image, MemStorage, OpenOptions, Storage};

#[derive(Arbitrary, Debug)]
enum Patch {
    /// A header field (by index into a list of field offsets).
    Header { field: u8, value: u64 },
    /// An L1, refcount table, first L2 table or first refcount block entry.
    Entry { table: u8, index: u16, value: u64 },
    /// Arbitrary bytes anywhere.
    Bytes { at: u32, bytes: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u32, len: u16 },
    Write { offset: u32, len: u16, fill: u8 },
    Zero { offset: u32, len: u32, unmap: bool },
    Discard { offset: u32, len: u32 },
    Map { offset: u32, len: u16, commit: bool },
    Flush,
    Reopen,
}

#[derive(Arbitrary, Debug)]
struct Input {
    template: u8,
    patches: Vec<Patch>,
    truncate_to: Option<u32>,
    slots: u8,
    read_only: bool,
    ops: Vec<Op>,
}

/// The templates' virtual disk size: small, so that offsets from the input land on the
/// interesting clusters and the end-of-input refcount check is short.
const DISK: u64 = 256 << 10;

/// A template, where its tables are, and its disk's content.
struct Template {
    /// The file up to its last sector that is not all zeroes (the library grows files a MiB
    /// at a time, sparsely: copying those zeroes for every input cost more than the input).
    bytes: Vec<u8>,
    tables: [u64; 4],
    content: Vec<u8>,
}

/// Header field offsets and widths.
const FIELDS: &[(usize, usize)] = &[
    (4, 4),
    (8, 8),
    (16, 4),
    (20, 4),
    (24, 8),
    (32, 4),
    (36, 4),
    (40, 8),
    (48, 8),
    (56, 4),
    (60, 4),
    (64, 8),
    (72, 8),
    (80, 8),
    (88, 8),
    (96, 4),
    (100, 4),
    (104, 8),
    (112, 8),
];

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn templates() -> &'static Vec<Template> {
    static T: OnceLock<Vec<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let make = |cb: u32, ro: u32, v: u32, backing: bool, compressed: bool| {
            let m = MemStorage::new();
            let mut o = CreateOptions::new(DISK);
            o.cluster_bits = cb;
            o.refcount_order = ro;
            o.version = v;
            if backing {
                o.backing = Some(("base.qcow2".into(), Some("qcow2".into())));
            }
            create(&m, &o).unwrap();
            {
                let s: Arc<dyn Storage> = Arc::new(m.clone());
                let mut img = Image::open(s, &OpenOptions::default()).unwrap();
                img.write_at(0, &[1u8; 3000], None).unwrap();
                img.write_at(60_000, &[2u8; 70_000], None).unwrap();
                img.write_zeroes(61_440, 8192, false, None).unwrap();
                img.discard(90_000, 20_000, None).unwrap();
                img.write_at(250_000, &[3u8; 5000], None).unwrap();
                img.close().unwrap();
            }
            let mut bytes = trimmed(m.to_bytes());
            let l1 = be64(&bytes, 40);
            let rt = be64(&bytes, 48);
            let l2 = be64(&bytes, l1 as usize) & 0x00ff_ffff_ffff_fe00;
            let rb = be64(&bytes, rt as usize);
            if compressed {
                // Guest cluster 1 becomes a compressed cluster stored at the end of the file.
                let cs = 1usize << cb;
                let data: Vec<u8> = (0..cs).map(|i| (i % 7) as u8).collect();
                let packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
                // In a cluster of its own, past the (trimmed) end of the file.
                let at = (bytes.len() as u64).next_multiple_of(cs as u64) + 100;
                bytes.resize(at as usize, 0);
                bytes.extend_from_slice(&packed);
                let x = 62 - (cb - 8);
                let sectors = ((at + packed.len() as u64 - 1) >> 9) - (at >> 9);
                let e = (1u64 << 62) | (sectors << x) | at;
                let l2e = l2 as usize + 8;
                bytes[l2e..l2e + 8].copy_from_slice(&e.to_be_bytes());
                // Its refcounts: mark the image dirty and let a writable open rebuild them.
                bytes[79] |= 1;
                let m = MemStorage::from_bytes(bytes);
                let s: Arc<dyn Storage> = Arc::new(m.clone());
                let mut img = Image::open(s, &OpenOptions::default()).unwrap();
                assert_eq!(img.check().unwrap(), qcow2::CheckReport::default());
                img.close().unwrap();
                drop(img);
                bytes = m.to_bytes();
            }
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes.clone()));
            let mut img = Image::open(s, &OpenOptions::default()).unwrap();
            let mut content = vec![0u8; img.disk_size() as usize];
            img.read_at(0, &mut content, None).unwrap();
            Template {
                bytes: trimmed(bytes),
                tables: [l1, rt, l2, rb],
                content,
            }
        };
        vec![
            make(9, 4, 3, false, false),
            make(12, 4, 2, false, false),
            make(12, 0, 3, true, true),
            make(9, 6, 3, false, true),
        ]
    })
}

/// `bytes` up to the last sector that is not all zeroes.
fn trimmed(mut bytes: Vec<u8>) -> Vec<u8> {
    let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    bytes.truncate(used.next_multiple_of(512));
    bytes
}

fn open(m: &MemStorage, slots: usize, read_only: bool) -> Option<Image> {
    let s: Arc<dyn Storage> = Arc::new(m.clone());
    Image::open(
        s,
        &OpenOptions {
            read_only,
            cache_slots: slots,
        },
    )
    .ok()
}

fuzz_target!(|input: Input| {
    let ts = templates();
    let t = &ts[input.template as usize % ts.len()];
    let mut bytes = t.bytes.clone();
    for p in input.patches.iter().take(8) {
        match p {
            Patch::Header { field, value } => {
                let (at, w) = FIELDS[*field as usize % FIELDS.len()];
                let v = value.to_be_bytes();
                bytes[at..at + w].copy_from_slice(&v[8 - w..]);
            }
            Patch::Entry {
                table,
                index,
                value,
            } => {
                let base = t.tables[*table as usize % 4] as usize;
                let at = base + (*index as usize % 64) * 8;
                if at + 8 <= bytes.len() {
                    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
                }
            }
            Patch::Bytes { at, bytes: b } => {
                let at = *at as usize % bytes.len();
                let n = b.len().min(bytes.len() - at).min(32);
                bytes[at..at + n].copy_from_slice(&b[..n]);
            }
        }
    }
    if let Some(n) = input.truncate_to {
        bytes.truncate(n as usize % (bytes.len() + 1));
    }
    // The image may grow, but not without bound.
    let m = MemStorage::with_limit(bytes, 8 << 20);
    let slots = 1 + input.slots as usize % 16;
    let Some(mut img) = open(&m, slots, input.read_only) else {
        return;
    };
    // The model: the disk's bytes, and which 512-byte sectors they are known for.
    let pristine = input.patches.is_empty() && input.truncate_to.is_none() && !input.read_only;
    // The model's buffer is reused from input to input: a fresh 256 KiB allocation each
    // time costs more page faults than the rest of a short input.
    let mut model = MODEL.with(|m| std::mem::take(&mut *m.borrow_mut()));
    let mut known = Vec::new();
    if pristine {
        model.clear();
        model.extend_from_slice(&t.content);
        known = vec![true; model.len() / 512];
    }
    run(&mut img, &input, &m, slots, pristine, &mut model, &mut known);
    MODEL.with(|m| *m.borrow_mut() = model);
});

thread_local! {
    static MODEL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The operations of one input, then the end check.
fn run(
    img: &mut Image,
    input: &Input,
    m: &MemStorage,
    slots: usize,
    pristine: bool,
    model: &mut [u8],
    known: &mut [bool],
) {
    let mut buf = [0u8; 65536];
    let mut failed = false;
    // Whether an operation may have changed refcounts (only then is the end check worth it).
    let mut changed = false;
    for op in input.ops.iter().take(32) {
        let size = img.disk_size();
        if size == 0 {
            break;
        }
        let at = |o: u32| o as u64 % size;
        match *op {
            Op::Read { offset, len } => {
                let off = at(offset);
                let n = (len as u64).clamp(1, size - off) as usize;
                let r = img.read_at(off, &mut buf[..n], None);
                if pristine && r.is_ok() {
                    for k in off as usize / 512..(off as usize + n).div_ceil(512) {
                        let (a, z) = (
                            (k * 512).max(off as usize),
                            ((k + 1) * 512).min(off as usize + n),
                        );
                        if known[k] {
                            assert!(
                                buf[a - off as usize..z - off as usize] == model[a..z],
                                "read at {a}"
                            );
                        }
                    }
                }
                failed |= r.is_err();
            }
            Op::Write { offset, len, fill } => {
                changed = true;
                let off = at(offset);
                let n = (len as u64).clamp(1, size - off) as usize;
                buf[..n].fill(fill);
                let r = img.write_at(off, &buf[..n], None);
                if pristine {
                    model[off as usize..off as usize + n].fill(fill);
                    if r.is_err() {
                        forget(known, off, n as u64);
                    }
                }
                failed |= r.is_err();
            }
            Op::Zero { offset, len, unmap } => {
                changed = true;
                let off = at(offset);
                let n = (len as u64 % (4 << 20)).clamp(1, size - off);
                let r = img.write_zeroes(off, n, unmap, None);
                zeroed(pristine, model, known, off, n, r.is_err());
                failed |= r.is_err();
            }
            Op::Discard { offset, len } => {
                changed = true;
                let off = at(offset);
                let n = (len as u64 % (4 << 20)).clamp(1, size - off);
                let r = img.discard(off, n, None);
                zeroed(pristine, model, known, off, n, r.is_err());
                failed |= r.is_err();
            }
            Op::Map {
                offset,
                len,
                commit,
            } => {
                changed = true;
                let off = at(offset);
                let n = (len as u64).clamp(1, size - off);
                match img.map_write(off, n, None) {
                    Ok(w) => {
                        assert!(w.len >= 1 && w.len <= n);
                        if let Some(t) = w.ticket {
                            if commit {
                                // Committed without its data write: the range is unspecified.
                                failed |= img.commit(t).is_err();
                                if pristine {
                                    forget(known, off, w.len);
                                }
                            } else {
                                img.abort(t);
                            }
                        }
                    }
                    Err(_) => failed = true,
                }
                let _ = img.map_read(off, n);
            }
            Op::Flush => {
                failed |= img.flush().is_err();
            }
            Op::Reopen => {
                failed |= img.close().is_err();
                match open(m, slots, input.read_only) {
                    Some(i) => *img = i,
                    None => return,
                }
            }
        }
    }
    failed |= img.close().is_err();
    if pristine && changed {
        let r = img.check().expect("checking an image this library wrote");
        assert_eq!(r.errors, 0, "refcounts below references");
        assert!(failed || r.leaks == 0, "leaks without a failed operation");
    }
}

/// Sectors touched by `len` bytes at `off` are no longer known.
fn forget(known: &mut [bool], off: u64, len: u64) {
    for k in off / 512..(off + len).div_ceil(512) {
        known[k as usize] = false;
    }
}

/// The model after zeroing `len` bytes at `off`.
fn zeroed(on: bool, model: &mut [u8], known: &mut [bool], off: u64, len: u64, failed: bool) {
    if !on {
        return;
    }
    model[off as usize..(off + len) as usize].fill(0);
    if failed {
        forget(known, off, len);
    }
}
