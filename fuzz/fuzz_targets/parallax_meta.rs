//! Damaged Parallax images: a small valid image (one of three templates: empty, with data,
//! snapshots and a clone, with 64 KiB blocks), patched at arbitrary places, perhaps truncated,
//! and usually with its checksums recomputed so that the damage reaches the checks behind them.
//! The image is opened, checked, read and written. Never a panic, a hang or an unbounded
//! allocation: every outcome is a value or an error.
#![no_main]
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use parallax::{check, CreateOptions, Image, MemBacking, OpenOptions};

#[derive(Arbitrary, Debug)]
struct Patch {
    /// Which 4 KiB block (modulo the image's blocks).
    block: u16,
    /// Where in it.
    offset: u16,
    bytes: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read { vol: u8, offset: u32, len: u16 },
    Write { vol: u8, offset: u32, len: u16, fill: u8 },
    Discard { vol: u8, offset: u32, len: u32 },
    Snapshot { vol: u8 },
    Clone { vol: u8 },
    Delete { vol: u8 },
    Flush,
    Usage { vol: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    template: u8,
    patches: Vec<Patch>,
    truncate_to: Option<u32>,
    /// Recompute checksums after patching (most inputs).
    keep_checksums_broken: bool,
    slots: u8,
    ops: Vec<Op>,
}

fn templates() -> &'static [Vec<u8>; 3] {
    static T: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    T.get_or_init(|| {
        let make = |data: bool, bs: u64| {
            let mut o = CreateOptions::new(4 << 20);
            o.block_size = bs;
            o.cache_slots = 4;
            let mut img = Image::create(MemBacking::new(), &o).unwrap();
            if data {
                let v = img.volume("base").unwrap();
                img.write_at(v, 0, &[1u8; 300_000]).unwrap();
                let s = img.snapshot(v, "s").unwrap();
                img.write_at(v, 100_000, &[2u8; 50_000]).unwrap();
                img.flush().unwrap();
                let c = img.clone_volume(s, "c").unwrap();
                img.write_at(c, 3 << 20, &[3u8; 70_000]).unwrap();
                img.discard(v, 0, 65536).unwrap();
                img.flush().unwrap();
            }
            img.backing().to_bytes()
        };
        [make(false, 4096), make(true, 4096), make(true, 65536)]
    })
}

fuzz_target!(|input: Input| {
    let mut bytes = templates()[input.template as usize % 3].clone();
    let blocks = bytes.len() / 4096;
    for p in input.patches.iter().take(16) {
        let at = (p.block as usize % blocks) * 4096 + (p.offset as usize % 4096);
        let n = p.bytes.len().min(bytes.len() - at).min(64);
        bytes[at..at + n].copy_from_slice(&p.bytes[..n]);
    }
    if let Some(t) = input.truncate_to {
        bytes.truncate(t as usize % (bytes.len() + 1));
    }
    if !input.keep_checksums_broken {
        parallax::check::refresh_checksums(&mut bytes);
    }
    let backing = MemBacking::from_bytes(bytes);
    let _ = check(&backing, None).map(|r| r.to_string());
    let o = OpenOptions {
        cache_slots: 1 + input.slots as usize % 16,
        read_only: false,
    };
    let Ok(mut img) = Image::open(backing, &o) else {
        return;
    };
    let size = img.size();
    let pick = |img: &Image<MemBacking>, v: u8| {
        let vols = img.volumes();
        (!vols.is_empty()).then(|| parallax::VolumeId(vols[v as usize % vols.len()].id))
    };
    let mut buf = vec![0u8; 65536];
    for (i, op) in input.ops.iter().take(24).enumerate() {
        match *op {
            Op::Read { vol, offset, len } => {
                if let Some(v) = pick(&img, vol) {
                    let off = offset as u64 % size;
                    let n = (len as u64).clamp(1, size - off) as usize;
                    let _ = img.read_at(v, off, &mut buf[..n]);
                }
            }
            Op::Write {
                vol,
                offset,
                len,
                fill,
            } => {
                if let Some(v) = pick(&img, vol) {
                    let off = offset as u64 % size;
                    let n = (len as u64).clamp(1, size - off) as usize;
                    buf[..n].fill(fill);
                    let _ = img.write_at(v, off, &buf[..n]);
                }
            }
            Op::Discard { vol, offset, len } => {
                if let Some(v) = pick(&img, vol) {
                    let off = offset as u64 % size;
                    let _ = img.discard(v, off, (len as u64).clamp(1, size - off));
                }
            }
            Op::Snapshot { vol } | Op::Clone { vol } => {
                if let Some(v) = pick(&img, vol) {
                    let name = format!("f{i}");
                    let _ = if matches!(op, Op::Snapshot { .. }) {
                        img.snapshot(v, &name)
                    } else {
                        img.clone_volume(v, &name)
                    };
                }
            }
            Op::Delete { vol } => {
                if let Some(v) = pick(&img, vol) {
                    let _ = img.delete(v);
                }
            }
            Op::Flush => {
                let _ = img.flush();
            }
            Op::Usage { vol } => {
                if let Some(v) = pick(&img, vol) {
                    let _ = img.usage(v);
                }
            }
        }
    }
    let _ = img.flush();
});
