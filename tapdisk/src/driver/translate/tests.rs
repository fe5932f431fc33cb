//! The translating engine over a toy format: 4 KiB guest blocks mapped to a data file (file
//! 0, allocated on first write with a ticket), a second read-only file (a "parent"), zeroes,
//! or inline bytes; the format counts what the engine asked of it.

use std::sync::{Arc, Mutex, MutexGuard};

use super::*;
use crate::driver::engine::testing::{run, Step};
use crate::driver::engine::{BackendIo, Done, IoOp};

const BLOCK: u64 = 4096;
const BLOCKS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    Zero,
    /// Block of file 0 at this index.
    Own(u64),
    /// Block of file 1 at this index.
    Parent(u64),
    /// Reads as this byte (produced by the format).
    Inline(u8),
}

#[derive(Debug, Default)]
struct Counts {
    commits: u32,
    aborts: u32,
    failed: Vec<(u64, u64)>,
    flushes: u32,
    discards: u32,
}

struct Toy {
    map: Vec<Slot>,
    /// Block index of the next allocation in file 0.
    next: u64,
    /// Allocated by a write not yet committed: `(guest block, file block)`.
    pending: Vec<(usize, u64)>,
    dirty: bool,
    /// map_write fails for this guest block.
    fail_at: Option<usize>,
    counts: Counts,
}

struct ToyFormat {
    toy: Mutex<Toy>,
    disk: Disk,
}

struct ToyMapper<'a>(MutexGuard<'a, Toy>);

impl Mapper for ToyMapper<'_> {
    type Ticket = (usize, u64);
    type Inline = u8;

    fn map_read(&mut self, offset: u64, len: u64) -> Result<ReadExtent<u8>, Errno> {
        let b = (offset / BLOCK) as usize;
        let n = (BLOCK - offset % BLOCK).min(len);
        let within = offset % BLOCK;
        let map = match self.0.map[b] {
            Slot::Zero => ReadMap::Zero,
            Slot::Own(f) => ReadMap::Data {
                file: 0,
                offset: f * BLOCK + within,
            },
            Slot::Parent(f) => ReadMap::Data {
                file: 1,
                offset: f * BLOCK + within,
            },
            Slot::Inline(x) => ReadMap::Inline(x),
        };
        Ok(ReadExtent { len: n, map })
    }

    fn read_inline(&mut self, what: u8, _skip: u64, out: &mut [u8]) -> Result<(), Errno> {
        out.fill(what);
        Ok(())
    }

    fn map_write(&mut self, offset: u64, len: u64) -> Result<WriteExtent<(usize, u64)>, Errno> {
        let b = (offset / BLOCK) as usize;
        if self.0.fail_at == Some(b) {
            return Err(libc::ENOSPC);
        }
        let n = (BLOCK - offset % BLOCK).min(len);
        let within = offset % BLOCK;
        if let Slot::Own(f) = self.0.map[b] {
            return Ok(WriteExtent {
                len: n,
                offset: f * BLOCK + within,
                ticket: None,
            });
        }
        // A new block (whole-block writes only in these tests: nothing to copy first).
        let f = self.0.next;
        self.0.next += 1;
        self.0.pending.push((b, f));
        Ok(WriteExtent {
            len: n,
            offset: f * BLOCK + within,
            ticket: Some((b, f)),
        })
    }

    fn commit(&mut self, t: (usize, u64)) -> Result<(), Errno> {
        self.0.map[t.0] = Slot::Own(t.1);
        self.0.pending.retain(|&p| p != t);
        self.0.dirty = true;
        self.0.counts.commits += 1;
        Ok(())
    }

    fn abort(&mut self, t: (usize, u64)) {
        self.0.pending.retain(|&p| p != t);
        self.0.counts.aborts += 1;
    }

    fn write_failed(&mut self, offset: u64, len: u64) {
        self.0.counts.failed.push((offset, len));
    }

    fn metadata_dirty(&self) -> bool {
        self.0.dirty
    }

    fn flush(&mut self) -> Result<(), Errno> {
        self.0.dirty = false;
        self.0.counts.flushes += 1;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        for b in offset.div_ceil(BLOCK)..(offset + len) / BLOCK {
            self.0.map[b as usize] = Slot::Zero;
        }
        self.0.counts.discards += 1;
        Ok(())
    }
}

impl Format for ToyFormat {
    type Ticket = (usize, u64);
    type Inline = u8;
    type Mapper<'a> = ToyMapper<'a>;

    fn lock(&self) -> ToyMapper<'_> {
        ToyMapper(self.toy.lock().unwrap())
    }
    fn disk(&self) -> &Disk {
        &self.disk
    }
    fn name(&self) -> &'static str {
        "toy"
    }
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    image: Arc<Translated<ToyFormat>>,
}

/// File 0 empty (writable unless `data_ro`), file 1 with block i holding byte `0x40 + i`.
fn fixture(map: Vec<Slot>, data_ro: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(BLOCKS as u64 * BLOCK * 2)
        .unwrap();
    let parent = dir.path().join("parent");
    let bytes: Vec<u8> = (0..BLOCKS)
        .flat_map(|i| vec![0x40 + i as u8; BLOCK as usize])
        .collect();
    std::fs::write(&parent, bytes).unwrap();
    let opts = |ro| OpenOptionsImg {
        read_only: ro,
        ..Default::default()
    };
    let files = vec![
        Arc::new(AioImage::open(&data, opts(data_ro)).unwrap()),
        shared_read_only(&parent, DirectIo::Auto).unwrap(),
    ];
    let image = Arc::new(Translated::new(ToyFormat {
        toy: Mutex::new(Toy {
            map,
            next: 0,
            pending: Vec::new(),
            dirty: false,
            fail_at: None,
            counts: Counts::default(),
        }),
        disk: Disk {
            files,
            size: BLOCKS as u64 * BLOCK,
            read_only: false,
            spec: ImageSpec::new(crate::driver::Driver::Aio, "toy"),
        },
    }));
    Fixture { _dir: dir, image }
}

impl Fixture {
    fn toy(&self) -> MutexGuard<'_, Toy> {
        self.image.format().toy.lock().unwrap()
    }
    fn engine(&self, ring: &mut Uring, tags: u32) -> Box<dyn Engine> {
        self.image.clone().engine(ring, tags).unwrap()
    }
}

#[test]
fn reads_are_cut_at_extents_across_files_zeroes_and_inline_bytes() {
    let mut map = vec![Slot::Zero; BLOCKS];
    map[1] = Slot::Parent(5);
    map[2] = Slot::Inline(0x99);
    map[3] = Slot::Parent(6);
    map[4] = Slot::Parent(7);
    let f = fixture(map, false);
    let mut ring = Uring::new(32).unwrap();
    let mut e = f.engine(&mut ring, 4);
    assert_eq!(e.describe(), "toy over aio (2 files)");
    // One IO from the middle of block 0 to the middle of block 4 (zeroes, parent, inline,
    // parent, parent: the last two contiguous in the parent, one part), through three iovecs
    // whose boundaries fall inside blocks.
    let mut a = vec![0xeeu8; 3000];
    let mut b = vec![0xeeu8; 9000];
    let mut c = vec![0xeeu8; 16384 - 12000];
    let mut iov = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
        libc::iovec {
            iov_base: c.as_mut_ptr().cast(),
            iov_len: c.len(),
        },
    ];
    let io = BackendIo {
        tag: 1,
        op: IoOp::Read,
        offset: 2048,
        len: 16384,
        iov: iov.as_mut_ptr(),
        iovcnt: 3,
        memory: crate::driver::engine::Memory::Stable,
    };
    let mut done = Done::with_capacity(4);
    // SAFETY: the iovecs and buffers live on this frame until the tag is reported below.
    unsafe { e.submit(&mut ring, io, &mut done).unwrap() };
    while done.0.is_empty() {
        ring.submit_and_wait(1).unwrap();
        while let Some(cqe) = ring.next_completion() {
            e.complete(&mut ring, cqe, &mut done).unwrap();
        }
    }
    assert_eq!(done.0, vec![(1, 0)]);
    let got: Vec<u8> = [a, b, c].concat();
    let want: Vec<u8> = [
        vec![0u8; 2048],
        vec![0x45; 4096],
        vec![0x99; 4096],
        vec![0x46; 4096],
        vec![0x47; 2048],
    ]
    .concat();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "read back differs");
}

#[test]
fn writes_commit_after_their_data_and_abort_when_it_fails() {
    let f = fixture(vec![Slot::Zero; BLOCKS], false);
    let mut ring = Uring::new(32).unwrap();
    let mut e = f.engine(&mut ring, 4);
    let data: Vec<u8> = (0..3 * BLOCK).map(|i| (i / 512) as u8).collect();
    assert_eq!(run(&mut *e, &mut ring, Step::write(BLOCK, &data)), 0);
    {
        let t = f.toy();
        assert_eq!(t.counts.commits, 3, "one ticket per new block");
        assert!(t.pending.is_empty());
        assert_eq!(t.map[1..4], [Slot::Own(0), Slot::Own(1), Slot::Own(2)]);
    }
    let mut back = vec![0u8; data.len()];
    assert_eq!(run(&mut *e, &mut ring, Step::read(BLOCK, &mut back)), 0);
    assert_eq!(back, data);
    // Rewriting in place takes no ticket.
    assert_eq!(
        run(&mut *e, &mut ring, Step::write(BLOCK, &data[..4096])),
        0
    );
    assert_eq!(f.toy().counts.commits, 3);
    // A flush with dirty metadata is the format's; then a clean one is an fdatasync.
    assert_eq!(run(&mut *e, &mut ring, Step::op(IoOp::Flush, 0, 0)), 0);
    assert_eq!(run(&mut *e, &mut ring, Step::op(IoOp::Flush, 0, 0)), 0);
    assert_eq!(f.toy().counts.flushes, 1);
    // A mapping failure half way: the tickets mapped so far are aborted, the prefix reported.
    f.toy().fail_at = Some(9);
    let w = vec![7u8; 3 * BLOCK as usize];
    assert_eq!(
        run(&mut *e, &mut ring, Step::write(7 * BLOCK, &w)),
        -libc::ENOSPC
    );
    {
        let mut t = f.toy();
        assert_eq!((t.counts.commits, t.counts.aborts), (3, 2));
        assert_eq!(t.counts.failed, vec![(7 * BLOCK, 2 * BLOCK)]);
        assert_eq!(t.map[7..9], [Slot::Zero, Slot::Zero]);
        t.fail_at = None;
    }
    // Discard is the format's.
    let discard = IoOp::Discard { secure: false };
    assert_eq!(run(&mut *e, &mut ring, Step::op(discard, BLOCK, BLOCK)), 0);
    assert_eq!(f.toy().counts.discards, 1);
}

#[test]
fn a_failed_data_write_aborts_its_tickets() {
    // File 0 opened read-only under a format that claims to be writable: the data IO fails.
    let f = fixture(vec![Slot::Zero; BLOCKS], true);
    let mut ring = Uring::new(32).unwrap();
    let mut e = f.engine(&mut ring, 2);
    let w = vec![1u8; 2 * BLOCK as usize];
    assert!(run(&mut *e, &mut ring, Step::write(0, &w)) < 0);
    let t = f.toy();
    assert_eq!((t.counts.commits, t.counts.aborts), (0, 2));
    assert_eq!(t.counts.failed, vec![(0, 2 * BLOCK)]);
    assert_eq!(t.map[0..2], [Slot::Zero, Slot::Zero], "reads as before");
}

#[test]
fn more_parts_than_inner_tags_wait_their_turn() {
    // Every other block in the parent, the rest in file 0: 16 parts for one IO of an engine
    // with one tag (two inner tags).
    let map: Vec<Slot> = (0..BLOCKS)
        .map(|i| {
            if i % 2 == 0 {
                Slot::Parent(i as u64)
            } else {
                Slot::Own(i as u64)
            }
        })
        .collect();
    let f = fixture(map, false);
    let mut ring = Uring::new(8).unwrap();
    let mut e = f.engine(&mut ring, 1);
    let mut all = vec![0u8; BLOCKS * BLOCK as usize];
    assert_eq!(run(&mut *e, &mut ring, Step::read(0, &mut all)), 0);
    for (i, b) in all.chunks(BLOCK as usize).enumerate() {
        let want = if i % 2 == 0 { 0x40 + i as u8 } else { 0 };
        assert!(b.iter().all(|&x| x == want), "block {i}");
    }
}

#[test]
fn read_only_formats_refuse_writes_and_discards() {
    let mut f = fixture(vec![Slot::Zero; BLOCKS], false);
    Arc::get_mut(&mut f.image).unwrap().format.disk.read_only = true;
    let mut ring = Uring::new(8).unwrap();
    let mut e = f.engine(&mut ring, 1);
    assert_eq!(
        run(&mut *e, &mut ring, Step::write(0, &[1u8; 512])),
        -libc::EROFS
    );
    let discard = IoOp::Discard { secure: false };
    assert_eq!(
        run(&mut *e, &mut ring, Step::op(discard, 0, 4096)),
        -libc::EROFS
    );
    assert_eq!(run(&mut *e, &mut ring, Step::op(IoOp::Flush, 0, 0)), 0);
}

#[test]
fn read_only_files_are_shared() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("base");
    std::fs::write(&p, vec![0u8; 8192]).unwrap();
    let a = shared_read_only(&p, DirectIo::Off).unwrap();
    let b = shared_read_only(&p, DirectIo::Off).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let c = shared_read_only(&p, DirectIo::Auto).unwrap();
    assert!(
        !Arc::ptr_eq(&a, &c),
        "another O_DIRECT policy is another open"
    );
    drop((a, b));
    let d = shared_read_only(&p, DirectIo::Off).unwrap();
    assert!(d.read_only());
    drop(c);
}
