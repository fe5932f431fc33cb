//! The translating engine of one ring: mapping calls, then data IO on io_uring.
//!
//! Each read or write is translated, under the format's lock, into *parts*: runs of the
//! guest range contiguous in one file, or (reads only) zeroes. The iovecs of the IO are cut
//! at part boundaries into a per-tag array (pointers into the guest's pages, no data copied);
//! each part in a file becomes one IO of that file's inner engine (the `aio` engine, with its
//! O_DIRECT choice and short-transfer resume), and zero parts are filled here. Inline extents
//! (bytes the format produces itself) are filled while mapping. The IO completes when all its
//! parts have, with the first error; then a write's tickets are committed (or aborted, if any
//! part failed) under the lock.
//!
//! A flush is an `fdatasync` of file 0 through its inner engine when the format has no dirty
//! metadata, else the format's own flush, synchronously. A discard is the format's,
//! synchronously.
//!
//! # Allocation
//!
//! Per-tag part, iovec and ticket lists are vectors that keep their capacity: after each tag
//! has seen its largest (most fragmented) IO, the data path allocates nothing. Inner tags are
//! one pool shared by the files' engines (each engine is built for all of them); parts wait in
//! a FIFO of tags when the pool is empty.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use super::cursor::Cursor;
use super::{Format, Mapper, ReadMap, Translated};
use crate::driver::engine::{BackendIo, Cqe, Done, Engine, IoOp, Uring};
use crate::driver::Image;

/// Inner tags per outer tag.
pub const INNER_PER_TAG: u32 = 2;

/// A run of an IO: contiguous in a file, or zeroes.
#[derive(Clone, Copy, Debug)]
struct Part {
    /// `(file, byte offset)`; `None`: zeroes, no IO.
    at: Option<(u32, u64)>,
    len: u64,
    /// First iovec of the part in the tag's `iov`.
    iov: u32,
    iovcnt: u32,
}

struct Tag<T> {
    io: BackendIo,
    parts: Vec<Part>,
    iov: Vec<libc::iovec>,
    /// A write's tickets, in mapping order.
    tickets: Vec<T>,
    /// Next part to start.
    next: usize,
    /// Parts with IO not yet finished (started or not).
    left: usize,
    /// First error (negative errno), 0 if none.
    err: i32,
}

/// The engine of one ring over a [`Translated`] disk.
pub struct TranslateEngine<F: Format> {
    image: Arc<Translated<F>>,
    /// One engine per file of the disk ([`super::Disk::files`]).
    inner: Vec<Box<dyn Engine>>,
    tags: Box<[Tag<F::Ticket>]>,
    /// Per inner tag: the outer tag it works for.
    owner: Box<[u32]>,
    free: Vec<u32>,
    /// Tags with parts not started for want of inner tags, oldest first.
    waiting: VecDeque<u32>,
    inner_done: Done,
}

impl<F: Format> TranslateEngine<F> {
    /// An engine for `tags` concurrent IOs over `image`, registering its files on `ring`.
    pub fn new(image: Arc<Translated<F>>, ring: &mut Uring, tags: u32) -> io::Result<Self> {
        let inner_tags = tags.saturating_mul(INNER_PER_TAG);
        let inner = image
            .format()
            .disk()
            .files
            .iter()
            .map(|f| f.clone().engine(ring, inner_tags))
            .collect::<io::Result<Vec<_>>>()?;
        if inner.is_empty() {
            return Err(io::Error::other("a translated disk without files"));
        }
        let idle = || Tag {
            io: BackendIo::IDLE,
            parts: Vec::with_capacity(4),
            iov: Vec::with_capacity(16),
            tickets: Vec::with_capacity(2),
            next: 0,
            left: 0,
            err: 0,
        };
        Ok(TranslateEngine {
            image,
            inner,
            tags: (0..tags).map(|_| idle()).collect(),
            owner: vec![0; inner_tags as usize].into_boxed_slice(),
            free: (0..inner_tags).rev().collect(),
            waiting: VecDeque::with_capacity(tags as usize),
            inner_done: Done::with_capacity(inner_tags as usize),
        })
    }

    /// Translates read or write `io` into parts of its tag (and a write's tickets). Errors
    /// are negative errnos; a write that fails here has aborted what it mapped.
    fn map(&mut self, io: BackendIo) -> Result<(), i32> {
        let write = io.op == IoOp::Write;
        let format = self.image.format();
        if write && format.disk().read_only {
            return Err(-libc::EROFS);
        }
        let files = format.disk().files.len();
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
        let mut cur = Cursor::new(src);
        let end = io.offset.checked_add(io.len).ok_or(-libc::EINVAL)?;
        let mut m = format.lock();
        let mut off = io.offset;
        while off < end {
            let want = end - off;
            let (len, at) = if write {
                match m.map_write(off, want) {
                    Ok(w) => {
                        if let Some(k) = w.ticket {
                            t.tickets.push(k);
                        }
                        (w.len, Some((0, w.offset)))
                    }
                    Err(e) => {
                        for k in t.tickets.drain(..) {
                            m.abort(k);
                        }
                        if off > io.offset {
                            m.write_failed(io.offset, off - io.offset);
                        }
                        return Err(-e);
                    }
                }
            } else {
                let e = m.map_read(off, want).map_err(|e| -e)?;
                if e.len == 0 || e.len > want {
                    return Err(-libc::EIO);
                }
                match e.map {
                    ReadMap::Data { file, offset } if file < files => {
                        (e.len, Some((file as u32, offset)))
                    }
                    ReadMap::Data { .. } => return Err(-libc::EIO),
                    ReadMap::Zero => (e.len, None),
                    ReadMap::Inline(what) => {
                        // Filled now, under the lock; the iovecs are not kept.
                        let start = t.iov.len();
                        if !cur.take(e.len, &mut t.iov, start) {
                            return Err(-libc::EINVAL);
                        }
                        let mut skip = 0;
                        for v in t.iov.drain(start..) {
                            // SAFETY: the iovec points into the guest's pages this read fills,
                            // ours to write until the tag completes (submit contract).
                            let out = unsafe {
                                std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len)
                            };
                            m.read_inline(what, skip, out).map_err(|e| -e)?;
                            skip += v.iov_len as u64;
                        }
                        off += e.len;
                        continue;
                    }
                }
            };
            if len == 0 || len > want {
                for k in t.tickets.drain(..) {
                    m.abort(k);
                }
                return Err(-libc::EIO);
            }
            let start = t.iov.len();
            let contiguous = match t.parts.last() {
                Some(p) => match (p.at, at) {
                    (Some((fa, a)), Some((fb, b))) => fa == fb && a + p.len == b,
                    (None, None) => true,
                    _ => false,
                },
                None => false,
            };
            let (first, part) = if contiguous {
                let p = t.parts.len() - 1;
                (t.parts[p].iov as usize, p)
            } else {
                t.parts.push(Part {
                    at,
                    len: 0,
                    iov: start as u32,
                    iovcnt: 0,
                });
                (start, t.parts.len() - 1)
            };
            if !cur.take(len, &mut t.iov, first) {
                for k in t.tickets.drain(..) {
                    m.abort(k);
                }
                return Err(-libc::EINVAL);
            }
            let p = &mut t.parts[part];
            p.len += len;
            p.iovcnt = (t.iov.len() - first) as u32;
            off += len;
        }
        Ok(())
    }

    /// Fills the zero parts of tag `tag`; returns the parts needing IO.
    fn zero_fill(&mut self, tag: u32) -> usize {
        let t = &self.tags[tag as usize];
        let mut io = 0;
        for p in &t.parts {
            if p.at.is_some() {
                io += 1;
                continue;
            }
            for v in &t.iov[p.iov as usize..(p.iov + p.iovcnt) as usize] {
                // SAFETY: the iovec points into the guest's pages this read fills, ours to
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
            while t.next < t.parts.len() && t.parts[t.next].at.is_none() {
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
            let (file, offset) = p.at.unwrap_or((0, 0));
            let (iov, iovcnt) = if t.io.op == IoOp::Flush {
                (std::ptr::null_mut(), 0)
            } else {
                // SAFETY: `p.iov + p.iovcnt <= iov.len()`: the part's iovecs are in the array.
                (unsafe { t.iov.as_mut_ptr().add(p.iov as usize) }, p.iovcnt)
            };
            let b = BackendIo {
                tag: inner,
                op: t.io.op,
                offset,
                len: p.len,
                iov,
                iovcnt,
                memory: t.io.memory,
            };
            let e = &mut self.inner[file as usize];
            // SAFETY: the part's iovecs live in `t.iov`, which is neither cleared nor grown
            // until the tag is done, and point at the guest's pages, which stay valid until
            // then (our own submit contract); the inner engine may rewrite them.
            unsafe { e.submit(ring, b, &mut self.inner_done)? };
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

    /// Every part of tag `tag` is done: commit or abort a write's tickets, report.
    fn finish(&mut self, tag: u32, done: &mut Done) {
        let t = &mut self.tags[tag as usize];
        let mut err = t.err;
        if t.io.op == IoOp::Write && (err != 0 || !t.tickets.is_empty()) {
            let mut m = self.image.format().lock();
            for k in t.tickets.drain(..) {
                if err == 0 {
                    if let Err(e) = m.commit(k) {
                        err = -e;
                    }
                } else {
                    m.abort(k);
                }
            }
            if err != 0 {
                m.write_failed(t.io.offset, t.io.len);
            }
        }
        done.push(tag, err);
    }

    /// Takes what the inner engines reported and starts waiting parts, until nothing moves.
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

    /// A flush: the format's own if its metadata is dirty (reported at once), else an
    /// `fdatasync` of file 0 as the tag's one part.
    fn flush(&mut self, tag: u32, done: &mut Done) -> bool {
        let format = self.image.format();
        if !format.disk().read_only {
            let mut m = format.lock();
            if m.metadata_dirty() {
                let res = m.flush().map_or_else(|e| -e, |()| 0);
                done.push(tag, res);
                return false;
            }
        }
        let t = &mut self.tags[tag as usize];
        t.parts.clear();
        t.iov.clear();
        t.parts.push(Part {
            at: Some((0, 0)),
            len: 0,
            iov: 0,
            iovcnt: 0,
        });
        t.left = 1;
        true
    }
}

impl<F: Format> Engine for TranslateEngine<F> {
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
            t.tickets.clear();
        }
        match io.op {
            IoOp::Read | IoOp::Write => {
                if let Err(e) = self.map(io) {
                    done.push(tag, e);
                    return Ok(());
                }
                let n = self.zero_fill(tag);
                if n == 0 {
                    self.finish(tag, done);
                    return Ok(());
                }
                self.tags[tag as usize].left = n;
            }
            IoOp::Flush => {
                if !self.flush(tag, done) {
                    return Ok(());
                }
            }
            IoOp::Discard { .. } => {
                let format = self.image.format();
                let res = if format.disk().read_only {
                    -libc::EROFS
                } else {
                    format
                        .lock()
                        .discard(io.offset, io.len)
                        .map_or_else(|e| -e, |()| 0)
                };
                done.push(tag, res);
                return Ok(());
            }
        }
        self.launch(ring, tag)?;
        self.pump(ring, done)
    }

    fn complete(&mut self, ring: &mut Uring, cqe: Cqe, done: &mut Done) -> io::Result<()> {
        // Each file's engine takes the completions in its own range and ignores the rest.
        for e in &mut self.inner {
            e.complete(ring, cqe, &mut self.inner_done)?;
        }
        self.pump(ring, done)
    }

    fn lanes(&self) -> u32 {
        // The data IO goes to the files' engines; the leaf's decides the parallelism.
        self.inner[0].lanes()
    }

    fn describe(&self) -> String {
        let n = self.inner.len();
        let files = if n == 1 {
            "1 file".to_string()
        } else {
            format!("{n} files")
        };
        format!(
            "{} over {} ({files})",
            self.image.format().name(),
            self.inner[0].describe()
        )
    }
}
