//! The `aio:` engine: a raw file or block device through io_uring.
//!
//! Reads and writes are one `readv`/`writev` each, on a registered (fixed) file: the O_DIRECT
//! descriptor when the offset, every iovec's address and every length meet the file's
//! `STATX_DIOALIGN` (and, under `--direct auto`, the read continues no sequential stream:
//! `stream.rs`), the buffered one otherwise. A short transfer resumes where it stopped;
//! `EAGAIN`/`EINTR` are retried a few times. A flush is `fdatasync`. A discard punches a hole
//! in a file (`fallocate`) or, on a block device, is a `BLKDISCARD` ioctl issued at once
//! (io_uring has no portable discard for block devices before Linux 6.12; discards are rare).

use std::io;
use std::sync::Arc;

use io_uring::{opcode, types};

use super::stream::ReadStreams;
use super::AioImage;
use crate::driver::engine::{
    BackendIo, Cqe, Done, Engine, IoOp, Memory, UdRange, Uring, DEFAULT_LANES,
};
use crate::sys::file::{discard_fd, rw_nowait, Dir};

/// Of the engine's two fixed-file slots: the O_DIRECT descriptor (the buffered one if the
/// image has none).
const FILE_DIRECT: u32 = 0;
/// Of the engine's two fixed-file slots: the buffered descriptor.
const FILE_BUFFERED: u32 = 1;
const MAX_RETRIES: u8 = 16;

#[derive(Clone, Copy)]
struct Tag {
    io: BackendIo,
    /// First iovec not yet fully transferred.
    iov_start: u32,
    done_bytes: u64,
    retries: u8,
    /// A read of a sequential stream: through the page cache, whatever its alignment.
    stream: bool,
}

/// The engine of one ring over an [`AioImage`].
pub struct AioEngine {
    image: Arc<AioImage>,
    tags: Box<[Tag]>,
    /// User data of tag `t`'s operation: `ud.ud(t)`.
    ud: UdRange,
    /// The first of the engine's two fixed-file slots.
    files: u32,
    streams: ReadStreams,
}

impl AioEngine {
    /// An engine for `tags` concurrent IOs, registering the image's descriptors on `ring`.
    pub fn new(ring: &mut Uring, image: Arc<AioImage>, tags: u32) -> io::Result<Self> {
        let b = image.buffered_fd();
        let fds = [image.direct_fd().map(|(fd, _)| fd).unwrap_or(b), b];
        let files = ring.add_files(&fds)?;
        let ud = ring.reserve(u64::from(tags));
        let idle = Tag {
            io: BackendIo::IDLE,
            iov_start: 0,
            done_bytes: 0,
            retries: 0,
            stream: false,
        };
        Ok(AioEngine {
            image,
            tags: vec![idle; tags as usize].into_boxed_slice(),
            ud,
            files,
            streams: ReadStreams::default(),
        })
    }

    /// The image served.
    pub fn image(&self) -> &Arc<AioImage> {
        &self.image
    }

    fn iovs(&self, t: &Tag) -> &[libc::iovec] {
        if t.io.iovcnt == 0 {
            return &[];
        }
        // SAFETY: the scheduler guarantees the array stays valid (and is ours to read and
        // rewrite) while the tag is in flight (`Engine::submit`'s contract).
        unsafe { std::slice::from_raw_parts(t.io.iov, t.io.iovcnt as usize) }
    }

    fn choose_fd(&self, t: &Tag) -> types::Fixed {
        // Memory unmapped right after the IO never gets direct IO (see `Memory`).
        let stable = t.io.memory == Memory::Stable;
        if let Some((_, align)) = self.image.direct_fd().filter(|_| stable && !t.stream) {
            let a = u64::from(align);
            let off = t.io.offset + t.done_bytes;
            let aligned = off.is_multiple_of(a)
                && self.iovs(t)[t.iov_start as usize..].iter().all(|v| {
                    (v.iov_base as u64).is_multiple_of(a) && (v.iov_len as u64).is_multiple_of(a)
                });
            if aligned {
                return types::Fixed(self.files + FILE_DIRECT);
            }
        }
        types::Fixed(self.files + FILE_BUFFERED)
    }

    fn push_data(&mut self, ring: &mut Uring, tag: u32) -> io::Result<()> {
        let t = self.tags[tag as usize];
        let fd = self.choose_fd(&t);
        // SAFETY: `iov_start < iovcnt` while bytes remain, so the pointer is inside the array.
        let iov = unsafe { t.io.iov.add(t.iov_start as usize) };
        let cnt = t.io.iovcnt - t.iov_start;
        let off = t.io.offset + t.done_bytes;
        let e = match t.io.op {
            IoOp::Read => opcode::Readv::new(fd, iov, cnt).offset(off).build(),
            _ => opcode::Writev::new(fd, iov, cnt).offset(off).build(),
        };
        // SAFETY: the iovecs and the pages they point to stay valid until the tag completes
        // (the submit contract); the fixed files stay registered while `self.image` lives.
        unsafe { ring.push(&e.user_data(self.ud.ud(u64::from(tag)))) }
    }

    /// Moves what a buffered read or write of `tag` can move at once without waiting for a
    /// device (page-cache hits, tmpfs), on this thread: io_uring would hand such a transfer
    /// to a worker thread when it is large, two context switches for a memcpy. True if the
    /// whole IO is done.
    fn try_inline(&mut self, tag: u32) -> bool {
        let t = self.tags[tag as usize];
        // A file in memory has no device to wait for, whichever descriptor; elsewhere only
        // buffered IO can hit the page cache.
        let mem = self.image.memory_backed();
        if !mem && self.choose_fd(&t).0 != self.files + FILE_BUFFERED {
            return false;
        }
        let dir = match t.io.op {
            IoOp::Read => Dir::Read,
            IoOp::Write => Dir::Write,
            _ => return false,
        };
        loop {
            let t = self.tags[tag as usize];
            let left = t.io.len - t.done_bytes;
            if left == 0 {
                return true;
            }
            let iov = &self.iovs(&t)[t.iov_start as usize..];
            let fd = self.image.buffered_fd();
            // SAFETY: the iovecs and the memory they point at are ours for the transfer until
            // the tag is reported (the submit contract); nothing else touches them meanwhile.
            match unsafe { rw_nowait(fd, iov, t.io.offset + t.done_bytes, dir, mem) } {
                Ok(Some(n)) if n > 0 => self.advance(tag, n as u64),
                // Would block, end of file, or an error: io_uring does the rest (and reports
                // what goes wrong).
                _ => return false,
            }
        }
    }

    fn push_op(&mut self, ring: &mut Uring, tag: u32, done: &mut Done) -> io::Result<()> {
        let t = self.tags[tag as usize];
        match t.io.op {
            IoOp::Read | IoOp::Write => {
                if self.try_inline(tag) {
                    done.push(tag, 0);
                    return Ok(());
                }
                self.push_data(ring, tag)
            }
            IoOp::Flush => {
                let e = opcode::Fsync::new(types::Fixed(self.files + FILE_BUFFERED))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(self.ud.ud(u64::from(tag)));
                // SAFETY: no buffers; the fixed file stays registered.
                unsafe { ring.push(&e) }
            }
            IoOp::Discard { secure } => {
                if self.image.is_block_device() {
                    let r = discard_fd(
                        self.image.buffered_fd(),
                        true,
                        t.io.offset,
                        t.io.len,
                        secure,
                    );
                    let res = match r {
                        Ok(()) => 0,
                        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                    };
                    done.push(tag, res);
                    return Ok(());
                }
                let e = opcode::Fallocate::new(types::Fixed(self.files + FILE_BUFFERED), t.io.len)
                    .offset(t.io.offset)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
                    .user_data(self.ud.ud(u64::from(tag)));
                // SAFETY: no buffers; the fixed file stays registered.
                unsafe { ring.push(&e) }
            }
        }
    }

    /// Skips `n` transferred bytes of tag `tag`'s iovecs.
    fn advance(&mut self, tag: u32, mut n: u64) {
        let t = &mut self.tags[tag as usize];
        t.done_bytes += n;
        while n > 0 && t.iov_start < t.io.iovcnt {
            // SAFETY: `iov_start < iovcnt`: inside the array we may rewrite (submit contract).
            let v = unsafe { &mut *t.io.iov.add(t.iov_start as usize) };
            let l = v.iov_len as u64;
            if n >= l {
                n -= l;
                t.iov_start += 1;
            } else {
                // SAFETY: `n < iov_len`, so the new base stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n as usize) }.cast();
                v.iov_len -= n as usize;
                n = 0;
            }
        }
    }
}

impl Engine for AioEngine {
    fn lanes(&self) -> u32 {
        // A file in memory is copied on this thread, one IO after another: fewer, larger
        // IOs are fewer system calls. Elsewhere the device's queues work side by side.
        if self.image.memory_backed() {
            1
        } else {
            DEFAULT_LANES
        }
    }

    unsafe fn submit(
        &mut self,
        ring: &mut Uring,
        io: BackendIo,
        done: &mut Done,
    ) -> io::Result<()> {
        let stream = io.op == IoOp::Read
            && self.image.cache_streams()
            && self.streams.note(io.offset, io.len);
        if stream {
            self.image.count_stream_read();
        }
        self.tags[io.tag as usize] = Tag {
            io,
            iov_start: 0,
            done_bytes: 0,
            retries: 0,
            stream,
        };
        self.push_op(ring, io.tag, done)
    }

    fn complete(&mut self, ring: &mut Uring, cqe: Cqe, done: &mut Done) -> io::Result<()> {
        let Some(tag) = self.ud.index(cqe.ud) else {
            return Ok(());
        };
        let tag = tag as u32;
        let res = cqe.res;
        if res == -libc::EAGAIN || res == -libc::EINTR {
            let t = &mut self.tags[tag as usize];
            if t.retries < MAX_RETRIES {
                t.retries += 1;
                return self.push_op(ring, tag, done);
            }
        }
        if res < 0 {
            done.push(tag, res);
            return Ok(());
        }
        let t = self.tags[tag as usize];
        if matches!(t.io.op, IoOp::Read | IoOp::Write) {
            let left = t.io.len - t.done_bytes;
            let n = res as u64;
            if n < left {
                if n == 0 {
                    // End of file inside a validated range: the image shrank under us.
                    done.push(tag, -libc::EIO);
                    return Ok(());
                }
                self.advance(tag, n);
                return self.push_data(ring, tag);
            }
        }
        done.push(tag, 0);
        Ok(())
    }

    fn describe(&self) -> String {
        "aio".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::engine::testing::{run, Step};
    use crate::driver::{Image, OpenOptionsImg};
    use tapdisk_control::DirectIo;

    #[test]
    fn unmapped_memory_never_gets_direct_io() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let opts = OpenOptionsImg {
            direct: DirectIo::Auto,
            ..Default::default()
        };
        let image = Arc::new(AioImage::open(&path, opts).unwrap());
        let Some((_, align)) = image.direct_fd() else {
            eprintln!("no O_DIRECT on /var/tmp here: nothing to check");
            return;
        };
        let mut ring = Uring::new(8).unwrap();
        let e = AioEngine::new(&mut ring, image, 1).unwrap();
        let mut buf = Aligned::new(4096, 4096.max(align as usize));
        let mut iov = [libc::iovec {
            iov_base: buf.bytes().as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        let mut t = e.tags[0];
        t.io.iov = iov.as_mut_ptr();
        t.io.iovcnt = 1;
        t.io.len = 4096;
        assert_eq!(
            e.choose_fd(&t).0,
            e.files + FILE_DIRECT,
            "aligned IO goes direct"
        );
        t.io.memory = Memory::UnmappedAfterIo;
        assert_eq!(
            e.choose_fd(&t).0,
            e.files + FILE_BUFFERED,
            "unless memory is unmapped after it"
        );
        t.io.memory = Memory::Stable;
        t.stream = true;
        assert_eq!(
            e.choose_fd(&t).0,
            e.files + FILE_BUFFERED,
            "nor a read of a sequential stream"
        );
    }

    #[test]
    fn sequential_reads_go_through_the_page_cache_under_auto_only() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("img");
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        for (direct, cached) in [(DirectIo::Auto, true), (DirectIo::On, false)] {
            let opts = OpenOptionsImg {
                direct,
                ..Default::default()
            };
            let opened = AioImage::open(&path, opts).ok();
            let Some(image) = opened.filter(|i| i.direct_fd().is_some()) else {
                eprintln!("no O_DIRECT on /var/tmp here: nothing to check");
                return;
            };
            assert_eq!(image.cache_streams(), cached, "{direct:?}");
            let mut ring = Uring::new(8).unwrap();
            let mut e = AioEngine::new(&mut ring, Arc::new(image), 1).unwrap();
            let mut buf = vec![0u8; 64 << 10];
            let mut via_cache = Vec::new();
            for i in 0..4u64 {
                let step = Step::read(i * (64 << 10), &mut buf);
                assert_eq!(run(&mut e, &mut ring, step), 0);
                let at = (i * (64 << 10)) as usize;
                assert_eq!(
                    buf[..],
                    data[at..at + (64 << 10)],
                    "read {i} under {direct:?}"
                );
                via_cache.push(e.tags[0].stream);
            }
            assert_eq!(via_cache, [false, false, cached, cached], "{direct:?}");
            let st = e.image().stats();
            assert_eq!(st["stream_reads"], if cached { 2 } else { 0 }, "{st}");
            assert_eq!(st["cache_streams"], cached, "{st}");
        }
    }

    /// A buffer aligned as O_DIRECT needs, freed on drop.
    struct Aligned(*mut u8, std::alloc::Layout);

    impl Aligned {
        fn new(len: usize, align: usize) -> Aligned {
            let layout = std::alloc::Layout::from_size_align(len, align).unwrap();
            // SAFETY: a non-zero size; freed in `drop` with the same layout.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!p.is_null());
            Aligned(p, layout)
        }
        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: `alloc_zeroed` gave `layout.size()` initialised bytes, ours alone.
            unsafe { std::slice::from_raw_parts_mut(self.0, self.1.size()) }
        }
    }

    impl Drop for Aligned {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout; no slice of it outlives `self`.
            unsafe { std::alloc::dealloc(self.0, self.1) };
        }
    }

    #[test]
    fn a_direct_write_is_seen_by_the_next_sequential_read_through_the_cache() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0xaa; 1 << 20]).unwrap();
        let Ok(image) = AioImage::open(&path, OpenOptionsImg::default()) else {
            return;
        };
        if !image.cache_streams() {
            eprintln!("no O_DIRECT on /var/tmp here: nothing to check");
            return;
        }
        let mut ring = Uring::new(8).unwrap();
        let mut e = AioEngine::new(&mut ring, Arc::new(image), 1).unwrap();
        const CHUNK: usize = 64 << 10;
        let mut buf = Aligned::new(CHUNK, 4096);
        let mut read_all = |e: &mut AioEngine, ring: &mut Uring, want: &dyn Fn(usize) -> u8| {
            for i in 0..8 {
                let step = Step::read((i * CHUNK) as u64, buf.bytes());
                assert_eq!(run(e, ring, step), 0);
                assert!(
                    buf.bytes().iter().all(|&b| b == want(i)),
                    "chunk {i}: stale data"
                );
            }
            assert!(
                e.tags[0].stream,
                "the last reads went through the page cache"
            );
        };
        read_all(&mut e, &mut ring, &|_| 0xaa);
        // Chunk 5 is in the page cache now; overwrite it with a direct write.
        let mut new = Aligned::new(CHUNK, 4096);
        new.bytes().fill(0x55);
        // Aligned offset, length and memory: the write takes the O_DIRECT descriptor.
        assert_eq!(
            run(
                &mut e,
                &mut ring,
                Step::write(5 * CHUNK as u64, new.bytes())
            ),
            0
        );
        read_all(&mut e, &mut ring, &|i| if i == 5 { 0x55 } else { 0xaa });
    }
}
