//! The `parallax:` engine: Parallax's V2P/P2M translation in front of the store's own engine.
//!
//! Each read or write is translated, under the image's mutex, by the mapping calls
//! ([`parallax::Image::map_read`], [`parallax::Image::map_write`]) into *parts*: runs of the
//! virtual range that are contiguous in the store, or (reads only) never written. The iovecs
//! of the IO are cut at part boundaries into a per-tag array (pointers into the frontend's
//! pages, no data copied); each part with a store offset becomes one IO of the inner engine,
//! the store driver's own ([`crate::driver::aio::engine::AioEngine`] on the image file now, with its O_DIRECT
//! choice and short-IO resume; a striped store's later), and parts never written are filled
//! with zeroes here. The IO completes when all its parts have; the first error is reported.
//!
//! A flush (which the scheduler sends only when nothing else of the ring is in flight) is the
//! inner engine's `fdatasync` of the store, then, if the metadata changed since the last
//! commit, the commit ([`parallax::Image::flush`]) under the mutex. A discard makes the range
//! read as zeroes ([`parallax::Image::write_zeroes`]: whole blocks freed, the ends of partly
//! covered blocks written with zeroes), synchronously. A write that fails leaves its range
//! zeroed (best effort), so blocks it allocated never show what the store held before.
//!
//! # What is synchronous
//!
//! The mapping calls run on the ring's thread, holding the image's mutex. When the metadata
//! they need is cached they do no IO; a miss reads a 4 KiB node through the page cache. A
//! write covering only part of a block that must be allocated or copied (shared with a
//! snapshot) also fills the rest of that block synchronously, before its data IO starts (the
//! library's rule: zeroes, or the old content). Guests write whole 4 KiB pages, so this is the
//! exception. Commits, discards and the zeroing after a failed write are synchronous too.
//!
//! # Allocation
//!
//! Per-tag part and iovec lists are vectors that keep their capacity: after each tag has seen
//! its largest (most fragmented) IO, the data path allocates nothing. Parts wait in a FIFO of
//! tags when the inner engine's tags (twice the outer ones) are all busy.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use super::{errno, ParallaxImage};
use crate::driver::engine::{BackendIo, Cqe, Done, Engine, IoOp, Memory, Uring};
use crate::driver::Image;

/// Inner-engine tags per outer tag.
pub const INNER_PER_TAG: u32 = 2;

/// A run of an IO: contiguous in the store, or never written.
#[derive(Clone, Copy, Debug)]
struct Part {
    /// Byte offset in the store; `None`: reads as zeroes, no IO.
    machine: Option<u64>,
    len: u64,
    /// First iovec of the part in the tag's `iov`.
    iov: u32,
    iovcnt: u32,
}

struct Tag {
    io: BackendIo,
    parts: Vec<Part>,
    iov: Vec<libc::iovec>,
    /// Next part to start.
    next: usize,
    /// Parts with IO not yet finished (started or not).
    left: usize,
    /// First error (negative errno), 0 if none.
    err: i32,
}

/// The engine of one ring over a [`ParallaxImage`].
pub struct ParallaxEngine {
    image: Arc<ParallaxImage>,
    inner: Box<dyn Engine>,
    tags: Box<[Tag]>,
    /// Per inner tag: the outer tag it works for.
    owner: Box<[u32]>,
    free: Vec<u32>,
    /// Tags with parts not started for want of inner tags, oldest first.
    waiting: VecDeque<u32>,
    inner_done: Done,
}

/// Walks the iovecs of an IO, handing out slices of them.
struct Cursor<'a> {
    src: &'a [libc::iovec],
    i: usize,
    off: usize,
}

impl Cursor<'_> {
    /// Appends iovecs covering the next `n` bytes to `out`, merging with the last one when
    /// contiguous. False if the iovecs hold fewer bytes.
    fn take(&mut self, mut n: u64, out: &mut Vec<libc::iovec>, first: usize) -> bool {
        while n > 0 {
            let Some(v) = self.src.get(self.i) else {
                return false;
            };
            let avail = v.iov_len - self.off;
            let k = (avail as u64).min(n) as usize;
            // SAFETY: `off + k <= iov_len`: the pointer stays inside the iovec's buffer.
            let base = unsafe { v.iov_base.cast::<u8>().add(self.off) };
            let mine = out.len() > first;
            match out.last_mut() {
                Some(l) if mine && l.iov_base as usize + l.iov_len == base as usize => {
                    l.iov_len += k
                }
                _ => out.push(libc::iovec {
                    iov_base: base.cast(),
                    iov_len: k,
                }),
            }
            self.off += k;
            n -= k as u64;
            if self.off == v.iov_len {
                self.i += 1;
                self.off = 0;
            }
        }
        true
    }
}

impl ParallaxEngine {
    /// An engine for `tags` concurrent IOs over `image`, doing its store IO through `inner`
    /// (built with `inner_tags` tags).
    pub fn new(
        image: Arc<ParallaxImage>,
        inner: Box<dyn Engine>,
        tags: u32,
        inner_tags: u32,
    ) -> ParallaxEngine {
        let idle = || Tag {
            io: BackendIo {
                tag: 0,
                op: IoOp::Read,
                offset: 0,
                len: 0,
                iov: std::ptr::null_mut(),
                iovcnt: 0,
                memory: Memory::Stable,
            },
            parts: Vec::with_capacity(4),
            iov: Vec::with_capacity(16),
            next: 0,
            left: 0,
            err: 0,
        };
        ParallaxEngine {
            image,
            inner,
            tags: (0..tags).map(|_| idle()).collect(),
            owner: vec![0; inner_tags as usize].into_boxed_slice(),
            free: (0..inner_tags).rev().collect(),
            waiting: VecDeque::with_capacity(tags as usize),
            inner_done: Done::with_capacity(inner_tags as usize),
        }
    }

    /// Translates read or write `io` into parts of its tag. Errors are negative errnos.
    fn map(&mut self, io: BackendIo) -> Result<(), i32> {
        let write = io.op == IoOp::Write;
        if write && self.image.read_only() {
            return Err(-libc::EROFS);
        }
        let vol = self.image.volume();
        let t = &mut self.tags[io.tag as usize];
        t.parts.clear();
        t.iov.clear();
        let src: &[libc::iovec] = if io.iovcnt == 0 || io.iov.is_null() {
            &[]
        } else {
            // SAFETY: the scheduler keeps the iovec array valid, and ours, until the tag is
            // reported done (`Engine::submit`'s contract).
            unsafe { std::slice::from_raw_parts(io.iov, io.iovcnt as usize) }
        };
        let mut cur = Cursor { src, i: 0, off: 0 };
        let end = io.offset.checked_add(io.len).ok_or(-libc::EINVAL)?;
        let mut img = self.image.lock();
        let mut off = io.offset;
        while off < end {
            let r = if write {
                img.map_write(vol, off, end - off)
            } else {
                img.map_read(vol, off, end - off)
            };
            let e = match r {
                Ok(e) => e,
                Err(e) => {
                    if write && off > io.offset {
                        // Blocks mapped for the first part: never show old store bytes.
                        let _ = img.write_zeroes(vol, io.offset, off - io.offset);
                    }
                    return Err(-errno(&e));
                }
            };
            let start = t.iov.len();
            let contiguous = match t.parts.last() {
                Some(p) => match (p.machine, e.machine) {
                    (Some(a), Some(b)) => a + p.len == b,
                    (None, None) => true,
                    _ => false,
                },
                None => false,
            };
            if contiguous {
                let p = t.parts.last_mut().expect("a last part");
                let first = p.iov as usize;
                if !cur.take(e.len, &mut t.iov, first) {
                    return Err(-libc::EINVAL);
                }
                p.len += e.len;
                p.iovcnt = (t.iov.len() - first) as u32;
            } else {
                if !cur.take(e.len, &mut t.iov, start) {
                    return Err(-libc::EINVAL);
                }
                t.parts.push(Part {
                    machine: e.machine,
                    len: e.len,
                    iov: start as u32,
                    iovcnt: (t.iov.len() - start) as u32,
                });
            }
            off += e.len;
        }
        Ok(())
    }

    /// Fills the never-written parts of tag `tag` with zeroes; returns the parts needing IO.
    fn zero_fill(&mut self, tag: u32) -> usize {
        let t = &self.tags[tag as usize];
        let mut io = 0;
        for p in &t.parts {
            if p.machine.is_some() {
                io += 1;
                continue;
            }
            for v in &t.iov[p.iov as usize..(p.iov + p.iovcnt) as usize] {
                // SAFETY: the iovec points into the frontend's pages this read fills, ours to
                // write until the tag completes (submit contract); `iov_len` bytes of it.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
        }
        io
    }

    /// Starts parts of tag `tag` while inner tags are free; true when all have started.
    fn start(&mut self, ring: &mut Uring, tag: u32) -> io::Result<bool> {
        loop {
            let t = &mut self.tags[tag as usize];
            while t.next < t.parts.len() && t.parts[t.next].machine.is_none() {
                t.next += 1;
            }
            if t.next == t.parts.len() {
                return Ok(true);
            }
            let Some(inner) = self.free.pop() else {
                return Ok(false);
            };
            let p = t.parts[t.next];
            t.next += 1;
            self.owner[inner as usize] = tag;
            let (iov, iovcnt) = if t.io.op == IoOp::Flush {
                (std::ptr::null_mut(), 0)
            } else {
                // SAFETY: `p.iov + p.iovcnt <= iov.len()`: the part's iovecs are in the array.
                (unsafe { t.iov.as_mut_ptr().add(p.iov as usize) }, p.iovcnt)
            };
            let b = BackendIo {
                tag: inner,
                op: t.io.op,
                offset: p.machine.unwrap_or(0),
                len: p.len,
                iov,
                iovcnt,
                memory: t.io.memory,
            };
            // SAFETY: the part's iovecs live in `t.iov`, which is neither cleared nor grown
            // until the tag is done, and point at the frontend's pages, which stay valid
            // until then (our own submit contract); the inner engine may rewrite them.
            unsafe { self.inner.submit(ring, b, &mut self.inner_done)? };
        }
    }

    /// Queues tag `tag`'s parts and starts what inner tags allow.
    fn launch(&mut self, ring: &mut Uring, tag: u32) -> io::Result<()> {
        if !self.waiting.is_empty() || !self.start(ring, tag)? {
            self.waiting.push_back(tag);
        }
        Ok(())
    }

    /// Inner tag `inner` finished with `res`.
    fn part_done(&mut self, inner: u32, res: i32, done: &mut Done) {
        let Some(&tag) = self.owner.get(inner as usize) else {
            return;
        };
        self.free.push(inner);
        let t = &mut self.tags[tag as usize];
        if res < 0 && t.err == 0 {
            t.err = res;
        }
        t.left -= 1;
        if t.left == 0 {
            self.finish(tag, done);
        }
    }

    /// Every part of tag `tag` is done.
    fn finish(&mut self, tag: u32, done: &mut Done) {
        let t = &mut self.tags[tag as usize];
        let io = t.io;
        let mut err = t.err;
        match io.op {
            IoOp::Write if err != 0 => {
                let vol = self.image.volume();
                let _ = self.image.lock().write_zeroes(vol, io.offset, io.len);
            }
            IoOp::Flush if err == 0 && !self.image.read_only() => {
                let mut img = self.image.lock();
                if img.has_uncommitted_changes() {
                    if let Err(e) = img.flush() {
                        err = -errno(&e);
                    }
                }
            }
            _ => {}
        }
        done.push(tag, err);
    }

    /// Takes what the inner engine reported and starts waiting parts, until nothing moves.
    fn pump(&mut self, ring: &mut Uring, done: &mut Done) -> io::Result<()> {
        loop {
            while let Some((inner, res)) = self.inner_done.0.pop() {
                self.part_done(inner, res, done);
            }
            while let Some(&tag) = self.waiting.front() {
                if self.free.is_empty() || !self.start(ring, tag)? {
                    break;
                }
                self.waiting.pop_front();
            }
            if self.inner_done.0.is_empty() {
                return Ok(());
            }
        }
    }
}

impl Engine for ParallaxEngine {
    unsafe fn submit(
        &mut self,
        ring: &mut Uring,
        io: BackendIo,
        done: &mut Done,
    ) -> io::Result<()> {
        let tag = io.tag;
        {
            let t = &mut self.tags[tag as usize];
            t.io = io;
            t.next = 0;
            t.left = 0;
            t.err = 0;
        }
        match io.op {
            IoOp::Read | IoOp::Write => {
                if let Err(e) = self.map(io) {
                    done.push(tag, e);
                    return Ok(());
                }
                let n = self.zero_fill(tag);
                if n == 0 {
                    done.push(tag, 0);
                    return Ok(());
                }
                self.tags[tag as usize].left = n;
            }
            IoOp::Flush => {
                let t = &mut self.tags[tag as usize];
                t.parts.clear();
                t.iov.clear();
                t.parts.push(Part {
                    machine: Some(0),
                    len: 0,
                    iov: 0,
                    iovcnt: 0,
                });
                t.left = 1;
            }
            IoOp::Discard { .. } => {
                let res = if self.image.read_only() {
                    -libc::EROFS
                } else {
                    let vol = self.image.volume();
                    match self.image.lock().write_zeroes(vol, io.offset, io.len) {
                        Ok(()) => 0,
                        Err(e) => -errno(&e),
                    }
                };
                done.push(tag, res);
                return Ok(());
            }
        }
        self.launch(ring, tag)?;
        self.pump(ring, done)
    }

    fn complete(&mut self, ring: &mut Uring, cqe: Cqe, done: &mut Done) -> io::Result<()> {
        self.inner.complete(ring, cqe, &mut self.inner_done)?;
        self.pump(ring, done)
    }

    fn describe(&self) -> String {
        format!("parallax over {}", self.inner.describe())
    }

    fn max_in_flight(&self) -> Option<u32> {
        self.inner
            .max_in_flight()
            .map(|n| (n / INNER_PER_TAG).max(1))
    }

    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.poll_fd()
    }

    fn on_poll(&mut self, ring: &mut Uring, done: &mut Done) -> io::Result<()> {
        self.inner.on_poll(ring, &mut self.inner_done)?;
        self.pump(ring, done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn cursor_cuts_iovecs_at_part_boundaries_and_merges_neighbours() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 8192];
        let src = [iov(&mut a), iov(&mut b)];
        let mut cur = Cursor {
            src: &src,
            i: 0,
            off: 0,
        };
        let mut out = Vec::new();
        assert!(cur.take(1024, &mut out, 0));
        assert!(cur.take(5120, &mut out, 1));
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].iov_len, 1024);
        assert_eq!(out[1].iov_len, 3072);
        assert_eq!(out[1].iov_base as usize, a.as_ptr() as usize + 1024);
        assert_eq!(out[2].iov_len, 2048);
        // Continuing the same part merges with the iovec it ended in.
        assert!(cur.take(1024, &mut out, 1));
        assert_eq!(out.len(), 3);
        assert_eq!(out[2].iov_len, 3072);
        assert!(!cur.take(8192, &mut out, 3), "more than the iovecs hold");
    }
}
