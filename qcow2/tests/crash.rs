//! Crash safety at the library level: a workload of writes, zero writes, discards and
//! flushes runs over a storage that keeps unflushed writes volatile, and stops at a random
//! IO, as a SIGKILL or a power cut would; of the writes not yet flushed, a random subset
//! reaches the file. Then real `qemu-img check` must find no corruption (leaks allowed, and
//! repaired by `-r leaks`), and every write a completed flush covered must be there.

mod common;

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{check, qemu_img, Rng};
use qcow2::{BackingPool, Chain, FileStorage, Image, OpenOptions, Storage};

/// Writes stay in memory until a flush; after `ops` more IOs the storage "crashes": a
/// random subset of the volatile writes reaches the file and every later IO fails.
#[derive(Debug)]
struct CrashStorage {
    inner: FileStorage,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    volatile: Vec<(u64, Vec<u8>)>,
    ops_left: u64,
    crashed: bool,
    rng: u64,
}

impl CrashStorage {
    fn tick(&self) -> io::Result<std::sync::MutexGuard<'_, State>> {
        let mut s = self.state.lock().unwrap();
        if s.crashed {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        s.ops_left -= 1;
        if s.ops_left == 0 {
            s.crashed = true;
            let list = std::mem::take(&mut s.volatile);
            let mut r = Rng(s.rng);
            for (off, data) in list {
                if r.below(2) == 0 {
                    self.inner.write_at(&data, off)?;
                }
            }
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(s)
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state.lock().unwrap();
        if s.crashed {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        for (o, d) in &s.volatile {
            let (a, b) = ((*o).max(offset), (o + d.len() as u64).min(end));
            if a < b {
                buf[(a - offset) as usize..(b - offset) as usize]
                    .copy_from_slice(&d[(a - o) as usize..(b - o) as usize]);
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.tick()?;
        s.volatile.push((offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let mut s = self.tick()?;
        for (off, data) in std::mem::take(&mut s.volatile) {
            self.inner.write_at(&data, off)?;
        }
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        let s = self.state.lock().unwrap();
        let v = s
            .volatile
            .iter()
            .map(|(o, d)| o + d.len() as u64)
            .max()
            .unwrap_or(0);
        Ok(self.inner.size()?.max(v))
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        drop(self.tick()?);
        self.inner.grow(size)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // A hole reads as zeroes: volatile like a write of zeroes.
        let mut s = self.tick()?;
        s.volatile.push((offset, vec![0; len as usize]));
        Ok(())
    }
    fn grows_with_zeroes(&self) -> bool {
        true
    }
    fn name(&self) -> String {
        "crash".into()
    }
}

/// What a sector may hold.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Content {
    Zero,
    Base,
    Write(u64),
}

fn sector_bytes(c: Content, sector: u64, base: &[u8]) -> Vec<u8> {
    match c {
        Content::Zero => vec![0; 512],
        Content::Base => {
            let o = (sector * 512) as usize;
            if o < base.len() {
                base[o..o + 512].to_vec()
            } else {
                vec![0; 512]
            }
        }
        Content::Write(i) => {
            let mut r = Rng((i << 32) ^ sector ^ 0x5555);
            let mut v = Vec::with_capacity(512);
            while v.len() < 512 {
                v.extend_from_slice(&r.next().to_le_bytes());
            }
            v
        }
    }
}

const SIZE: u64 = 16 << 20;

fn one_run(dir: &Path, seed: u64) {
    let mut r = Rng(seed * 7919 + 1);
    let cs = ["4k", "64k", "512", "64k"][(seed % 4) as usize];
    let img = dir.join(format!("crash{seed}.qcow2"));
    let with_base = seed % 2 == 1;
    let base = if with_base {
        common::pattern(seed + 1000, (8 << 20) as usize)
    } else {
        Vec::new()
    };
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    let basep = dir.join(format!("base{seed}.raw"));
    if with_base {
        std::fs::write(&basep, &base).unwrap();
        args.extend(["-b", basep.to_str().unwrap(), "-F", "raw"]);
    }
    let o = format!("cluster_size={cs}");
    args.extend(["-o", &o, img.to_str().unwrap(), "16M"]);
    qemu_img(&args);

    let initial = if with_base {
        Content::Base
    } else {
        Content::Zero
    };
    let sectors = (SIZE / 512) as usize;
    let mut durable = vec![initial; sectors];
    let mut maybe: Vec<Vec<Content>> = vec![Vec::new(); sectors];
    let storage = Arc::new(CrashStorage {
        inner: FileStorage::open_unlocked(&img, false).unwrap(),
        state: Mutex::new(State {
            volatile: Vec::new(),
            ops_left: r.below(400) + 1,
            crashed: false,
            rng: r.next(),
        }),
    });
    let opts = OpenOptions {
        read_only: false,
        cache_slots: 16,
    };
    let leaf = match Image::open(storage, &opts) {
        Ok(i) => i,
        Err(_) => return, // crashed before the image even opened
    };
    let parent = with_base.then(|| BackingPool::new().open(&basep, Some("raw"), &opts).unwrap());
    let mut c = Chain::from_image(leaf, parent);
    for i in 1..1000u64 {
        let max = if r.below(4) == 0 { 512 } else { 16 };
        let len = (r.below(max) + 1) * 512;
        let off = r.below(SIZE - len + 1) & !511;
        let (s0, s1) = ((off / 512) as usize, ((off + len) / 512) as usize);
        let op = r.below(10);
        let res = match op {
            0..=5 => {
                let mut buf = Vec::with_capacity(len as usize);
                for (s, m) in maybe.iter_mut().enumerate().take(s1).skip(s0) {
                    m.push(Content::Write(i));
                    buf.extend(sector_bytes(Content::Write(i), s as u64, &base));
                }
                c.write_at(off, &buf)
            }
            6 | 7 => {
                maybe[s0..s1].iter_mut().for_each(|m| m.push(Content::Zero));
                if op == 6 {
                    c.discard(off, len)
                } else {
                    c.write_zeroes(off, len, false)
                }
            }
            _ => {
                let r = c.flush();
                if r.is_ok() {
                    // Everything before the flush is durable: the last value of each sector.
                    for (d, m) in durable.iter_mut().zip(maybe.iter_mut()) {
                        if let Some(&last) = m.last() {
                            *d = last;
                        }
                        m.clear();
                    }
                }
                r
            }
        };
        if res.is_err() {
            break;
        }
    }
    drop(c);

    // No corruption; leaks are allowed and repaired.
    let first = check(&img, false);
    assert_eq!(
        (first.corruptions, first.check_errors),
        (0, 0),
        "seed {seed} ({cs}, base {with_base}): {first:?}"
    );
    if first.leaks > 0 {
        check(&img, true);
        assert_eq!(check(&img, false), common::Check::default(), "seed {seed}");
    }
    // Every flushed write is there; other sectors hold a value written since.
    let raw = common::qemu_raw(&img, "qcow2");
    for s in 0..sectors {
        let got = &raw[s * 512..(s + 1) * 512];
        let ok = std::iter::once(durable[s])
            .chain(maybe[s].iter().copied())
            .any(|c| sector_bytes(c, s as u64, &base) == got);
        assert!(
            ok,
            "seed {seed} ({cs}, base {with_base}): sector {s} holds neither its flushed content \
             {:?} nor a later write {:?}",
            durable[s], maybe[s]
        );
    }
    std::fs::remove_file(&img).unwrap();
}

#[test]
fn a_crash_at_any_point_leaves_no_corruption_and_keeps_flushed_writes() {
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..30 {
        one_run(dir.path(), seed);
    }
}
