//! Tests of the whole data path on memory images against a model.

use std::sync::Arc;

use crate::backing::MemBacking;
use crate::chain::{Chain, Parent, ParentImage};
use crate::create::{create_on, CreateOptions, ParentLink};
use crate::format::{DiskType, Uuid};
use crate::image::{Image, OpenOptions};
use crate::map::Mapping;

const MB: u64 = 1 << 20;

fn rw() -> OpenOptions {
    OpenOptions {
        read_only: false,
        cache_slots: 4,
    }
}

fn dynamic(size: u64) -> MemBacking {
    let m = MemBacking::new(1 << 30);
    create_on(&m, &CreateOptions::dynamic(size), None).unwrap();
    m
}

/// A small deterministic generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn dynamic_disk_reads_what_was_written_and_survives_reopen() {
    let size = 20 * MB;
    let m = dynamic(size);
    let img = Image::open(Box::new(m), "t", &rw()).unwrap();
    let mut c = Chain::from_parts(img, Vec::new());
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(7);
    for i in 0..200 {
        let len = 1 + rng.below(300_000) as usize;
        let off = rng.below(size - len as u64);
        let fill = (i % 251) as u8 + 1;
        let data: Vec<u8> = (0..len).map(|j| fill.wrapping_add(j as u8)).collect();
        c.write_at(off, &data).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        if i % 17 == 0 {
            c.flush().unwrap();
        }
    }
    c.flush().unwrap();
    let mut back = vec![0u8; size as usize];
    c.read_at(0, &mut back).unwrap();
    assert!(back == model, "content differs before reopen");
    // Reopen from the bytes.
    let bytes = {
        let b = &*c.leaf().backing;
        let mut v = vec![0u8; b.size().unwrap() as usize];
        b.read_at(&mut v, 0).unwrap();
        v
    };
    let img = Image::open(Box::new(MemBacking::from_bytes(bytes, 1 << 30)), "t", &rw()).unwrap();
    assert!(img.has_batmap());
    let mut c = Chain::from_parts(img, Vec::new());
    let mut back = vec![0u8; size as usize];
    c.read_at(0, &mut back).unwrap();
    assert!(back == model, "content differs after reopen");
}

#[test]
fn new_blocks_have_aligned_data_and_the_footer_moves_behind_them() {
    let m = dynamic(8 * MB);
    let mut img = Image::open(Box::new(m), "t", &rw()).unwrap();
    let w = img.map_write(2 * MB + 4096, 8192).unwrap();
    assert!(w.allocated);
    assert_eq!(w.file_offset % 4096, 0);
    let end = img.backing().size().unwrap();
    let mut f = [0u8; 512];
    img.backing().read_at(&mut f, end - 512).unwrap();
    assert_eq!(&f[..8], b"conectix");
    // Before commit the range still reads as absent.
    assert_eq!(
        img.map_read(2 * MB + 4096, 8192).unwrap().map,
        Mapping::Zero
    );
    img.commit(w.ticket).unwrap();
    assert!(matches!(
        img.map_read(2 * MB + 4096, 8192).unwrap().map,
        Mapping::Data { .. }
    ));
    // A ticket dropped (failed IO): still absent.
    let w2 = img.map_write(2 * MB + 65536, 512).unwrap();
    assert!(!w2.allocated);
    let _ = w2;
    assert_eq!(
        img.map_read(2 * MB + 65536, 512).unwrap().map,
        Mapping::Zero
    );
}

fn snapshot_of(parent: &Image, size: u64) -> MemBacking {
    let m = MemBacking::new(1 << 30);
    let link = ParentLink::for_path(parent.footer().uuid, 0, "p.vhd", "./p.vhd");
    create_on(&m, &CreateOptions::dynamic(size), Some(&link)).unwrap();
    m
}

fn to_parent(c: Chain) -> (Vec<Arc<Parent>>, Image) {
    let Chain { leaf, mut parents } = c;
    let bytes = {
        let b = leaf.backing();
        let mut v = vec![0u8; b.size().unwrap() as usize];
        b.read_at(&mut v, 0).unwrap();
        v
    };
    let ro = Image::open(
        Box::new(MemBacking::from_bytes(bytes, 1 << 30)),
        "p",
        &OpenOptions::default(),
    )
    .unwrap();
    let again = Image::open(
        Box::new(MemBacking::from_bytes(
            {
                let b = ro.backing();
                let mut v = vec![0u8; b.size().unwrap() as usize];
                b.read_at(&mut v, 0).unwrap();
                v
            },
            1 << 30,
        )),
        "p",
        &OpenOptions::default(),
    )
    .unwrap();
    parents.insert(
        0,
        Arc::new(Parent::new(ParentImage::Vhd(Box::new(ro)), "p".into())),
    );
    (parents, again)
}

#[test]
fn a_chain_of_snapshots_reads_as_the_model_at_every_level() {
    let size = 12 * MB;
    let img = Image::open(Box::new(dynamic(size)), "base", &rw()).unwrap();
    let mut chain = Chain::from_parts(img, Vec::new());
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(99);
    let mut levels: Vec<Vec<u8>> = Vec::new();
    for level in 0..12 {
        for _ in 0..6 {
            let len = 512 * (1 + rng.below(2000)) as usize;
            let len = if rng.below(3) == 0 { len - 100 } else { len };
            let off = rng.below(size - len as u64);
            let fill = rng.next() as u8;
            let data: Vec<u8> = (0..len).map(|j| fill ^ (j as u8)).collect();
            chain.write_at(off, &data).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        chain.flush().unwrap();
        let mut back = vec![0u8; size as usize];
        chain.read_at(0, &mut back).unwrap();
        assert!(back == model, "level {level} differs");
        levels.push(model.clone());
        // Snapshot: the leaf becomes a read-only parent, a new child on top.
        let (parents, parent_img) = to_parent(chain);
        let child = snapshot_of(&parent_img, size);
        let leaf = Image::open(Box::new(child), "leaf", &rw()).unwrap();
        assert_eq!(leaf.disk_type(), DiskType::Differencing);
        chain = Chain::from_parts(leaf, parents);
    }
    assert_eq!(chain.depth(), 13);
    let mut back = vec![0u8; size as usize];
    chain.read_at(0, &mut back).unwrap();
    assert!(back == model);
    let st = chain.stats();
    assert!(st.bat_hits + st.bat_misses > 0);
}

#[test]
fn discard_drops_whole_blocks_only_where_nothing_is_below() {
    let size = 8 * MB;
    let img = Image::open(Box::new(dynamic(size)), "t", &rw()).unwrap();
    let mut c = Chain::from_parts(img, Vec::new());
    c.write_at(0, &vec![5u8; (6 * MB) as usize]).unwrap();
    c.flush().unwrap();
    assert_eq!(c.leaf().allocated_blocks().unwrap(), 3);
    // 1 MiB .. 5 MiB covers block 1 only.
    assert_eq!(c.discard(MB, 4 * MB).unwrap(), 1);
    let mut b = vec![0u8; (6 * MB) as usize];
    c.read_at(0, &mut b).unwrap();
    assert!(b[..(2 * MB) as usize].iter().all(|&x| x == 5));
    assert!(b[(2 * MB) as usize..(4 * MB) as usize]
        .iter()
        .all(|&x| x == 0));
    assert!(b[(4 * MB) as usize..].iter().all(|&x| x == 5));
    // Over a parent with data: kept.
    let (parents, pimg) = to_parent(c);
    let leaf = Image::open(Box::new(snapshot_of(&pimg, size)), "leaf", &rw()).unwrap();
    let mut c = Chain::from_parts(leaf, parents);
    c.write_at(0, &vec![6u8; (2 * MB) as usize]).unwrap();
    assert_eq!(c.discard(0, 2 * MB).unwrap(), 0);
    let _ = Uuid::random();
}

/// The error opening `bytes` as an image.
fn open_error(bytes: Vec<u8>) -> String {
    Image::open(Box::new(MemBacking::from_bytes(bytes, 1 << 30)), "t", &rw())
        .unwrap_err()
        .to_string()
}

/// `bytes` with the dynamic header's field at `range` (offsets within the header) set to
/// `value` and the header's checksum fixed up, so only the field is wrong.
fn with_header_field(mut bytes: Vec<u8>, range: std::ops::Range<usize>, value: &[u8]) -> Vec<u8> {
    bytes[512 + range.start..512 + range.end].copy_from_slice(value);
    let c = crate::format::checksum(&bytes[512..1536], 36);
    bytes[512 + 36..512 + 40].copy_from_slice(&c.to_be_bytes());
    bytes
}

#[test]
fn fields_are_validated_with_their_names() {
    let m = dynamic(8 * MB);
    let mut bytes = m.bytes();
    // BAT entry 0 pointing into the header.
    bytes[1536..1540].copy_from_slice(&1u32.to_be_bytes());
    let e = open_error(bytes);
    assert!(e.contains("BAT") && e.contains("entry"), "{e}");
    // A block size that is not a power of two.
    let e = open_error(with_header_field(m.bytes(), 32..36, &3000u32.to_be_bytes()));
    assert!(e.contains("block_size"), "{e}");
    // A BAT offset whose end does not fit in 64 bits (fuzzing found the sum overflowing).
    let e = open_error(with_header_field(
        m.bytes(),
        16..24,
        &(u64::MAX - 2).to_be_bytes(),
    ));
    assert!(e.contains("table_offset"), "{e}");
}

#[test]
fn a_lost_footer_falls_back_to_the_copy() {
    let m = dynamic(8 * MB);
    let mut bytes = m.bytes();
    let n = bytes.len();
    bytes[n - 512..].fill(0);
    let mut img =
        Image::open(Box::new(MemBacking::from_bytes(bytes, 1 << 30)), "t", &rw()).unwrap();
    assert!(img.footer_from_copy());
    img.repair().unwrap();
    assert!(!img.footer_from_copy());
}

/// A file that forgets, at a "crash", any subset of the writes since the last flush (each
/// write kept whole, cut to a prefix of its sectors, or lost).
#[derive(Default)]
struct CrashState {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    /// Power fails during the fdatasync with this number (counting from 1)...
    crash_at: u64,
    flushes: u64,
    seed: u64,
    /// ... leaving this on disk.
    captured: Option<Vec<u8>>,
}

#[derive(Clone, Default)]
struct CrashBacking(Arc<std::sync::Mutex<CrashState>>);

impl CrashBacking {
    fn view(s: &CrashState) -> Vec<u8> {
        let mut v = s.durable.clone();
        for (o, d) in &s.pending {
            let end = *o as usize + d.len();
            if end > v.len() {
                v.resize(end, 0);
            }
            v[*o as usize..end].copy_from_slice(d);
        }
        v
    }
    fn crash(&self, rng: &mut Rng) -> Vec<u8> {
        let s = self.0.lock().unwrap();
        Self::crashed(&s, rng)
    }
    fn crashed(s: &CrashState, rng: &mut Rng) -> Vec<u8> {
        let mut v = s.durable.clone();
        for (o, d) in &s.pending {
            let keep = match rng.below(3) {
                0 => 0,
                1 => d.len(),
                _ => (rng.below(d.len() as u64 / 512 + 1) * 512) as usize,
            }
            .min(d.len());
            let end = *o as usize + keep;
            if end > v.len() {
                v.resize(end, 0);
            }
            v[*o as usize..end].copy_from_slice(&d[..keep]);
        }
        v
    }
}

impl crate::backing::Backing for CrashBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let v = Self::view(&self.0.lock().unwrap());
        let end = offset as usize + buf.len();
        if end > v.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&v[offset as usize..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().pending.push((offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut s = self.0.lock().unwrap();
        s.flushes += 1;
        if s.flushes == s.crash_at && s.captured.is_none() {
            let mut rng = Rng(s.seed | 1);
            s.captured = Some(Self::crashed(&s, &mut rng));
        }
        s.durable = Self::view(&s);
        s.pending.clear();
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(Self::view(&self.0.lock().unwrap()).len() as u64)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut s = self.0.lock().unwrap();
        s.durable = Self::view(&s);
        s.pending.clear();
        s.durable.resize(len as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let n = Self::view(&self.0.lock().unwrap()).len() as u64;
        let end = (offset + len).min(n);
        if end > offset {
            self.write_at(&vec![0u8; (end - offset) as usize], offset)?;
        }
        Ok(())
    }
}

#[test]
fn a_crash_keeps_every_flushed_write_and_never_shows_stale_data() {
    let size = 10 * MB;
    let mut rng = Rng(0xc0ffee);
    for round in 0..100 {
        // A parent with data, so a lost child bitmap bit would show the parent's (stale) data.
        let pimg = Image::open(Box::new(dynamic(size)), "p", &rw()).unwrap();
        let mut pc = Chain::from_parts(pimg, Vec::new());
        pc.write_at(0, &vec![0xeeu8; size as usize]).unwrap();
        pc.flush().unwrap();
        let (parents, pimg) = to_parent(pc);
        let fb = CrashBacking::default();
        let link = ParentLink::for_path(pimg.footer().uuid, 0, "p.vhd", "./p.vhd");
        create_on(&fb, &CreateOptions::dynamic(size), Some(&link)).unwrap();
        crate::backing::Backing::flush(&fb).unwrap();
        {
            let mut st = fb.0.lock().unwrap();
            st.crash_at = st.flushes + 1 + rng.below(12);
            st.seed = rng.next();
        }
        let leaf = Image::open(Box::new(fb.clone()), "leaf", &rw()).unwrap();
        let mut c = Chain::from_parts(leaf, parents.clone());
        let mut flushed = vec![0xeeu8; size as usize];
        let mut current = flushed.clone();
        // Sectors written since the last flush may hold the old or any new value.
        let mut since: Vec<(u64, Vec<u8>)> = Vec::new();
        let steps = 1 + rng.below(30);
        for _ in 0..steps {
            if fb.0.lock().unwrap().captured.is_some() {
                break;
            }
            if rng.below(5) == 0 {
                c.flush().unwrap();
                if fb.0.lock().unwrap().captured.is_none() {
                    flushed = current.clone();
                    since.clear();
                }
                continue;
            }
            if rng.below(8) == 0 {
                let off = rng.below(size / 512) * 512;
                let len = (rng.below(6 * MB) + 512).min(size - off);
                c.discard(off, len).unwrap();
                // Nothing below is empty here, so discard keeps everything.
                continue;
            }
            let len = 512 * (1 + rng.below(3000));
            let off = rng.below((size - len) / 512) * 512;
            let d: Vec<u8> = (0..len)
                .map(|i| (round as u8) ^ (i as u8) ^ rng.next() as u8)
                .collect();
            // Counted as "newer" before it starts: power may fail in the middle of it.
            since.push((off, d.clone()));
            c.write_at(off, &d).unwrap();
            current[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
        let captured = fb.0.lock().unwrap().captured.take();
        let bytes = captured.unwrap_or_else(|| fb.crash(&mut rng));
        let img = match Image::open(
            Box::new(MemBacking::from_bytes(bytes, 1 << 30)),
            "after",
            &rw(),
        ) {
            Ok(i) => i,
            Err(e) => panic!("round {round}: the image does not open after a crash: {e}"),
        };
        let mut after = Chain::from_parts(img, parents.clone());
        let mut got = vec![0u8; size as usize];
        after.read_at(0, &mut got).unwrap();
        for s in 0..(size / 512) as usize {
            let r = s * 512..s * 512 + 512;
            if got[r.clone()] == flushed[r.clone()] {
                continue;
            }
            let newer = since.iter().any(|(o, d)| {
                let (o, e) = (*o as usize, *o as usize + d.len());
                o <= r.start && r.end <= e && d[r.start - o..r.end - o] == got[r.clone()]
            });
            assert!(
                newer,
                "round {round}: sector {s} reads neither its flushed nor a newer value"
            );
        }
    }
}

#[test]
fn a_flush_puts_a_lost_footer_back() {
    let m = dynamic(8 * MB);
    let mut bytes = m.bytes();
    let n = bytes.len();
    bytes[n - 512..].fill(0);
    let mut img =
        Image::open(Box::new(MemBacking::from_bytes(bytes, 1 << 30)), "t", &rw()).unwrap();
    assert!(img.footer_from_copy());
    img.flush().unwrap();
    assert!(!img.footer_from_copy());
    let b = img.backing();
    let mut f = [0u8; 512];
    b.read_at(&mut f, b.size().unwrap() - 512).unwrap();
    assert_eq!(&f[..8], b"conectix");
}

#[test]
fn chains_share_their_parents_and_check_the_parent_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    crate::create::create(&base, &CreateOptions::dynamic(4 * MB)).unwrap();
    let (a, b) = (dir.path().join("a.vhd"), dir.path().join("b.vhd"));
    for c in [&a, &b] {
        crate::create::snapshot(c, &base, &Default::default()).unwrap();
    }
    let set = crate::chain::ParentSet::new();
    let ca = Chain::open(&a, &Default::default(), &set).unwrap();
    let cb = Chain::open(&b, &Default::default(), &set).unwrap();
    assert!(Arc::ptr_eq(&ca.parents()[0], &cb.parents()[0]));
    assert_eq!(set.len(), 1);
    drop((ca, cb));
    assert_eq!(set.len(), 0);
    // A new base under the same name: the children's uuid no longer matches.
    std::fs::remove_file(&base).unwrap();
    crate::create::create(&base, &CreateOptions::dynamic(4 * MB)).unwrap();
    let e = Chain::open(&a, &Default::default(), &set)
        .unwrap_err()
        .to_string();
    assert!(e.contains("uuid"), "{e}");
}

#[test]
fn growing_past_the_reserved_room_moves_blocks_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.vhd");
    // 4 MiB: room for 2 BAT entries; data in both blocks, so growing to 600 MiB (300
    // entries, a second BAT sector) must move the first block out of the way.
    crate::create::create(&p, &CreateOptions::dynamic(4 * MB)).unwrap();
    let set = crate::chain::ParentSet::new();
    let mut c = Chain::open(&p, &Default::default(), &set).unwrap();
    let data: Vec<u8> = (0..4 * MB as usize).map(|i| (i / 512) as u8).collect();
    c.write_at(0, &data).unwrap();
    c.flush().unwrap();
    drop(c);
    let j = dir.path().join("g.journal");
    crate::grow::grow(&p, 600 * MB, &j).unwrap();
    assert!(!j.exists());
    let report = crate::check::check(&p, &Default::default()).unwrap();
    assert!(report.clean(), "{:?}", report.problems);
    let mut c = Chain::open(&p, &Default::default(), &set).unwrap();
    assert_eq!(c.size(), 600 * MB);
    let mut back = vec![0u8; 4 * MB as usize];
    c.read_at(0, &mut back).unwrap();
    assert!(back == data);
    c.write_at(599 * MB, &[7u8; 4096]).unwrap();
    c.flush().unwrap();
    let mut b = [0u8; 4096];
    c.read_at(599 * MB, &mut b).unwrap();
    assert_eq!(b, [7u8; 4096]);
}

#[test]
fn revert_puts_the_journaled_metadata_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.vhd");
    crate::create::create(&p, &CreateOptions::dynamic(4 * MB)).unwrap();
    let before = std::fs::read(&p).unwrap();
    // A grow that "crashed" after writing its journal and part of the new metadata.
    let j = dir.path().join("r.journal");
    std::fs::write(&j, b"garbage").unwrap();
    assert!(
        crate::grow::revert(&p, &j).is_err(),
        "a foreign journal is refused"
    );
    std::fs::remove_file(&j).unwrap();
    super::grow::tests_support::journal_of(&p, &j);
    let mut scribbled = before.clone();
    scribbled[1536..2600].fill(0x5a);
    scribbled.extend_from_slice(&[1u8; 4096]);
    std::fs::write(&p, &scribbled).unwrap();
    crate::grow::revert(&p, &j).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert!(!j.exists());
}
