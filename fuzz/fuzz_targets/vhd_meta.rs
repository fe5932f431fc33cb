//! Damaged VHD images: a small valid image (one of four templates: an empty dynamic disk, a
//! dynamic disk with data and full blocks, a differencing disk over a parent with data, a
//! fixed disk), patched at arbitrary places (mostly in the footer, header, BAT, batmap and
//! bitmaps), perhaps truncated, and usually with its checksums recomputed so that the damage
//! reaches the checks behind them. The image (and the parent) is opened, checked, mapped, read,
//! written, discarded, flushed, resized and reopened through the synchronous executor over
//! memory files. Never a panic, a hang or an unbounded allocation: every outcome is a value or
//! an error.
#![no_main]
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vhd::format::{batmap_checksum, batmap_used_bytes, checksum};
use vhd::{
    create_on, Chain, CreateOptions, DiskType, Image, MemBacking, OpenOptions, Parent, ParentImage,
    ParentLink,
};

/// Memory files may not grow beyond this.
const LIMIT: u64 = 64 << 20;
/// Largest read or write: a few of the templates' 4 KiB blocks.
const MAX_IO: u64 = 16 << 10;
/// Reopens per input: each copies and parses the whole image again, and a second one finds
/// nothing the first did not.
const MAX_REOPENS: usize = 2;

#[derive(Arbitrary, Debug)]
struct Patch {
    /// Where: a region (0 footer, 1 header, 2 BAT, 3 batmap, 4 anywhere) and an offset in it.
    region: u8,
    offset: u32,
    bytes: Vec<u8>,
    /// Patch the parent instead of the child (differencing template).
    parent: bool,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: u32,
        len: u32,
    },
    Write {
        offset: u32,
        len: u32,
        fill: u8,
    },
    /// A mapped write whose data IO "failed": the ticket is dropped.
    FailedWrite {
        offset: u32,
        sectors: u16,
    },
    Discard {
        offset: u32,
        len: u32,
    },
    Flush,
    Hidden(u8),
    Grow {
        mb: u8,
    },
    Reopen,
}

#[derive(Arbitrary, Debug)]
struct Input {
    template: u8,
    patches: Vec<Patch>,
    truncate_to: Option<u32>,
    keep_checksums_broken: bool,
    slots: u8,
    ops: Vec<Op>,
}

struct Template {
    child: Vec<u8>,
    parent: Option<Vec<u8>>,
}

fn rw(slots: usize) -> OpenOptions {
    OpenOptions {
        read_only: false,
        cache_slots: slots,
    }
}

fn templates() -> &'static [Template; 4] {
    static T: OnceLock<[Template; 4]> = OnceLock::new();
    T.get_or_init(|| {
        let make = |opts: CreateOptions, writes: &[(u64, usize, u8)], link: Option<&ParentLink>| {
            let m = MemBacking::new(LIMIT);
            create_on(&m, &opts, link).unwrap();
            let img = Image::open(Box::new(m), "t", &rw(8)).unwrap();
            let mut c = Chain::from_parts(img, Vec::new());
            for &(o, n, f) in writes {
                c.write_at(o, &vec![f; n]).unwrap();
            }
            c.flush().unwrap();
            let b = c.leaf_ref().backing();
            let mut v = vec![0u8; b.size().unwrap() as usize];
            b.read_at(&mut v, 0).unwrap();
            v
        };
        // Small blocks keep the images (and so each execution) small; the data template's
        // 2 KiB blocks give it a BAT of two sectors (and its child another block size).
        let blocks = |size: u64, block_size: u32| {
            let mut o = CreateOptions::dynamic(size);
            o.block_size = block_size;
            o
        };
        let small = |size: u64| blocks(size, 4096);
        let empty = make(small(256 << 10), &[], None);
        let data = make(
            blocks(512 << 10, 2048),
            &[(0, 20_480, 1), (40_000, 7_000, 2), (500 << 10, 4096, 3)],
            None,
        );
        let parent_img = Image::open(
            Box::new(MemBacking::from_bytes(data.clone(), LIMIT)),
            "p",
            &OpenOptions::default(),
        )
        .unwrap();
        let link = ParentLink::for_path(parent_img.footer().uuid, 0, "p.vhd", "./p.vhd");
        let child = make(
            small(512 << 10),
            &[(8192, 12_288, 4), (300 << 10, 512, 5)],
            Some(&link),
        );
        let mut fixed = CreateOptions::dynamic(64 << 10);
        fixed.disk_type = DiskType::Fixed;
        let fixed = make(fixed, &[(4096, 8192, 6)], None);
        [
            Template {
                child: empty,
                parent: None,
            },
            Template {
                child: data.clone(),
                parent: None,
            },
            Template {
                child,
                parent: Some(data),
            },
            Template {
                child: fixed,
                parent: None,
            },
        ]
    })
}

fn be32(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}
fn be64(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8)
        .map(|s| u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]))
        .unwrap_or(0)
}

/// Where the interesting structures are in an unpatched template.
fn regions(b: &[u8]) -> [(usize, usize); 5] {
    // Earlier patches may have changed these fields: saturating arithmetic throughout.
    let n = b.len();
    let table = be64(b, 512 + 16).min(n as u64) as usize;
    let entries = be32(b, 512 + 28) as usize;
    let bat_len = entries.saturating_mul(4).max(512);
    let bm_hdr = table
        .saturating_add(entries.saturating_mul(4).div_ceil(512).saturating_mul(512))
        .min(n);
    [
        (n.saturating_sub(512), 512),
        (512, 1024),
        (table, bat_len),
        (bm_hdr, 1024),
        (0, n),
    ]
}

/// Recomputes the footer, header and batmap checksums where those structures are.
fn fix_checksums(b: &mut [u8]) {
    let n = b.len();
    if n < 512 {
        return;
    }
    for at in [n - 512, 0] {
        let c = checksum(&b[at..at + 512], 64);
        b[at + 64..at + 68].copy_from_slice(&c.to_be_bytes());
    }
    let h = be64(b, n - 512 + 16) as usize;
    if h.checked_add(1024).is_some_and(|e| e <= n) {
        let c = checksum(&b[h..h + 1024], 36);
        b[h + 36..h + 40].copy_from_slice(&c.to_be_bytes());
        let table = be64(b, h + 16) as usize;
        let entries = be32(b, h + 28) as usize;
        let bh = table.saturating_add(entries.saturating_mul(4).div_ceil(512) * 512);
        if bh.checked_add(512).is_some_and(|e| e <= n) && &b[bh..bh + 8] == b"tdbatmap" {
            let off = be64(b, bh + 8) as usize;
            let used = batmap_used_bytes(be64(b, n - 512 + 48)) as usize;
            if off.checked_add(used).is_some_and(|e| e <= n) {
                let c = batmap_checksum(&b[off..off + used], be32(b, bh + 20));
                b[bh + 24..bh + 28].copy_from_slice(&c.to_be_bytes());
            }
        }
    }
}

fn open(bytes: Vec<u8>, slots: usize) -> Option<Image> {
    Image::open(
        Box::new(MemBacking::from_bytes(bytes, LIMIT)),
        "fuzz",
        &rw(slots),
    )
    .ok()
}

fn bytes_of(img: &Image) -> Vec<u8> {
    let b = img.backing();
    let mut v = vec![0u8; b.size().unwrap_or(0).min(LIMIT) as usize];
    let _ = b.read_at(&mut v, 0);
    v
}

fuzz_target!(|input: Input| {
    let t = &templates()[input.template as usize % 4];
    let mut child = t.child.clone();
    let mut parent = t.parent.clone();
    for p in input.patches.iter().take(12) {
        let target = match (&mut parent, p.parent) {
            (Some(pb), true) => pb,
            _ => &mut child,
        };
        let regs = regions(target);
        let (start, len) = regs[p.region as usize % regs.len()];
        if target.is_empty() || len == 0 {
            continue;
        }
        let at = (start + p.offset as usize % len).min(target.len() - 1);
        let n = p.bytes.len().min(target.len() - at).min(64);
        target[at..at + n].copy_from_slice(&p.bytes[..n]);
    }
    if let Some(tr) = input.truncate_to {
        child.truncate(tr as usize % (child.len() + 1));
    }
    if !input.keep_checksums_broken {
        fix_checksums(&mut child);
        if let Some(pb) = parent.as_mut() {
            fix_checksums(pb);
        }
    }
    let slots = 2 + input.slots as usize % 16;
    let _ = vhd::check::check_backing(Box::new(MemBacking::from_bytes(child.clone(), LIMIT)));
    let parents = match parent {
        Some(pb) => match Image::open(
            Box::new(MemBacking::from_bytes(pb, LIMIT)),
            "parent",
            &OpenOptions {
                read_only: true,
                cache_slots: slots,
            },
        ) {
            Ok(p) => vec![Arc::new(Parent::new(
                ParentImage::Vhd(Box::new(p)),
                "parent".into(),
            ))],
            Err(_) => Vec::new(),
        },
        None => Vec::new(),
    };
    let Some(img) = open(child, slots) else {
        return;
    };
    let mut chain = Chain::from_parts(img, parents.clone());
    let mut buf = [0u8; MAX_IO as usize];
    let mut reopens = 0;
    for op in input.ops.iter().take(20) {
        let size = chain.size();
        if size == 0 {
            break;
        }
        match *op {
            Op::Read { offset, len } => {
                let off = offset as u64 % size;
                let n = (len as u64 % MAX_IO).clamp(1, size - off) as usize;
                let _ = chain.read_at(off, &mut buf[..n]);
            }
            Op::Write { offset, len, fill } => {
                let off = offset as u64 % size;
                let n = (len as u64 % MAX_IO).clamp(1, size - off) as usize;
                buf[..n].fill(fill);
                let _ = chain.write_at(off, &buf[..n]);
            }
            Op::FailedWrite { offset, sectors } => {
                let off = (offset as u64 % size) & !511;
                let n = ((sectors as u64 % 64 + 1) * 512).min(size - off);
                if let Ok(m) = chain.leaf().map_write(off, n) {
                    let _ = m.ticket;
                }
            }
            Op::Discard { offset, len } => {
                let off = offset as u64 % size;
                let _ = chain.discard(off, (len as u64).clamp(1, size - off));
            }
            Op::Flush => {
                let _ = chain.flush();
            }
            Op::Hidden(v) => {
                let _ = chain.leaf().set_hidden(v);
            }
            Op::Grow { mb } => {
                let _ = chain.leaf().set_size(size + (mb as u64 % 8) * (64 << 10));
            }
            Op::Reopen if reopens < MAX_REOPENS => {
                reopens += 1;
                let _ = chain.flush();
                let bytes = bytes_of(chain.leaf_ref());
                let Some(img) = open(bytes, slots) else {
                    return;
                };
                chain = Chain::from_parts(img, parents.clone());
            }
            Op::Reopen => {}
        }
    }
    let _ = chain.flush();
});
