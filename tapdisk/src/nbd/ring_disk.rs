//! An NBD connection's disk: a local-transport ring attached to the VBD.
//!
//! The connection is a frontend like any other: its requests become blkif requests on a ring
//! of its own, which the VBD serves with a ring loop (validation, the scheduler, the driver's
//! engine). Its "guest memory" is a sealed memfd laid out as:
//!
//! | pages | what |
//! | --- | --- |
//! | `0 .. DATA_PAGES` | data buffers, handed out first-fit in page runs ([`PageRuns`]) |
//! | `ZERO_PAGE` | a page never written: every segment of a write-zeroes points at it |
//! | `BOUNCE .. BOUNCE + BOUNCE_PAGES` | read-modify-write of requests not aligned to 512 bytes |
//! | `DESC ..` | the indirect descriptor pages of each ring slot |
//!
//! The memfd is sparse: only pages a request touched use memory, and an idle connection gives
//! back all but the first MiB ([`Disk::release_idle`]).
//!
//! A read or write of N bytes becomes ceil(N / chunk) blkif requests (chunk: the VBD's
//! indirect segment limit, or 11 pages without indirect requests), a flush one
//! FLUSH_DISKCACHE, a trim DISCARDs of its whole sectors, a write-zeroes writes of the zero
//! page; FUA is a flush after the data. A request whose ends are not on a 512-byte boundary is
//! done alone: the connection's other requests finish first, then the sectors around it are
//! read, patched and written (the bounce pages), so no partial sector is ever written with
//! stale bytes. The blkif ids are ring slot numbers ([`Part`]s), unique while in flight.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

use blkif::local::{FrontRequest, FrontendConfig, LocalFrontend};
use blkif::protocol::{
    op, status, Response, Segment, PAGE_SIZE, SECTOR_SIZE, SEGMENTS_PER_INDIRECT_FRAME,
};
use blkif::request::DiskInfo;
use blkif::Abi;

use super::disk::{Buf, Cmd, Completion, Disk, Op};
use super::pages::PageRuns;
use super::proto::{EINVAL, EIO, MAX_PAYLOAD};

const PAGE: u64 = PAGE_SIZE as u64;
const SECTOR: u64 = SECTOR_SIZE;
/// Pages of data buffers: two of the largest requests, so one never waits for the other.
const DATA_PAGES: u32 = 2 * (MAX_PAYLOAD / PAGE_SIZE as u32) + 16;
/// The page of zeroes.
const ZERO_PAGE: u32 = DATA_PAGES;
/// The bounce buffer of unaligned requests: the largest request and the sector on each side.
const BOUNCE: u32 = ZERO_PAGE + 1;
const BOUNCE_PAGES: u32 = MAX_PAYLOAD / PAGE_SIZE as u32 + 2;
/// The first descriptor page.
const DESC: u32 = BOUNCE + BOUNCE_PAGES;
/// Descriptor pages per ring slot (enough for 4096 segments).
const DESC_PER_SLOT: u32 = blkif::protocol::MAX_INDIRECT_PAGES_PER_REQUEST as u32;
/// Buffer pages an idle connection keeps.
const KEEP_IDLE_PAGES: u32 = (super::stream::KEEP_IDLE / PAGE_SIZE) as u32;
// The layout holds the largest requests the protocol allows: two in flight at once, and an
// unaligned one with a sector on each side in the bounce pages.
const _: () = {
    assert!(DATA_PAGES >= 2 * (MAX_PAYLOAD / PAGE_SIZE as u32));
    assert!(BOUNCE_PAGES as u64 * PAGE >= MAX_PAYLOAD as u64 + 2 * SECTOR);
};

/// A ring of 4 pages: 128 slots (at most 32 per page for every ABI).
pub const RING_ORDER: u8 = 2;

/// The ring slots a ring of `order` can have at most.
fn max_slots(order: u8) -> u32 {
    32 << order
}

/// What a ring slot in flight works for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Free,
    /// A piece of request `usize` of `ops`.
    Of(u32),
    /// A step of the read-modify-write under way.
    Sync,
}

/// Where a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Data,
    /// Its data is written; the FUA flush is in flight.
    FuaFlush,
}

struct OpState {
    cookie: u64,
    cmd: Cmd,
    buf: Option<Buf>,
    fua: bool,
    parts_left: u32,
    failed: bool,
    phase: Phase,
}

/// A blkif request to queue.
enum Req {
    /// A read or write of `pages` whole or partial pages starting at guest page `first`; the
    /// last page holds `last_sectors` sectors.
    Data {
        write: bool,
        sector: u64,
        first: u32,
        pages: u32,
        last_sectors: u8,
        /// Every segment is the zero page.
        zeroes: bool,
    },
    Flush,
    Discard {
        sector: u64,
        sectors: u64,
    },
}

/// An NBD connection's ring into its VBD.
pub struct RingDisk {
    front: LocalFrontend,
    info: DiskInfo,
    /// Segments per blkif request.
    chunk: u32,
    pages: PageRuns,
    parts: Box<[Part]>,
    free_parts: Vec<u32>,
    ops: Vec<Option<OpState>>,
    free_ops: Vec<u32>,
    done: VecDeque<Completion>,
    /// Parts of the read-modify-write under way, and whether one failed.
    sync_left: u32,
    sync_failed: bool,
    /// Requests queued on the ring and not yet published.
    queued: bool,
    // Scratch.
    segs: Vec<Segment>,
    responses: Vec<Response>,
    in_flight: usize,
}

impl RingDisk {
    /// Attaches a ring over `sock`, whose other end the VBD serves.
    pub fn attach(sock: UnixStream) -> io::Result<RingDisk> {
        let slots = max_slots(RING_ORDER);
        let cfg = FrontendConfig {
            abi: Abi::NATIVE,
            ring_order: RING_ORDER,
            mem_pages: DESC + slots * DESC_PER_SLOT,
            early_read: false,
        };
        let front = LocalFrontend::attach(sock, cfg).map_err(io::Error::other)?;
        let info = *front.info();
        let n = front.ring_size();
        let chunk = if info.max_indirect_segments > 0 {
            u32::from(info.max_indirect_segments)
        } else {
            u32::from(info.max_segments).max(1)
        };
        Ok(RingDisk {
            front,
            info,
            chunk,
            pages: PageRuns::new(DATA_PAGES),
            parts: vec![Part::Free; n as usize].into_boxed_slice(),
            free_parts: (0..n).rev().collect(),
            ops: (0..n).map(|_| None).collect(),
            free_ops: (0..n).rev().collect(),
            done: VecDeque::with_capacity(n as usize),
            sync_left: 0,
            sync_failed: false,
            queued: false,
            segs: Vec::with_capacity(blkif::request::MAX_INDIRECT_SEGMENTS as usize),
            responses: Vec::with_capacity(n as usize),
            in_flight: 0,
        })
    }

    /// The disk as the VBD described it.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn mem(&mut self, first_page: u32, len: usize) -> &mut [u8] {
        let off = first_page as usize * PAGE_SIZE;
        assert!(off + len <= self.front.mem_pages() as usize * PAGE_SIZE);
        // SAFETY: the range is inside guest memory (asserted), which this frontend maps for
        // as long as it lives; the pages belong to a buffer or the bounce area, which no
        // request in flight writes while the caller holds the returned slice (reads land in a
        // buffer before its completion hands the buffer back, and the bounce area is only
        // touched between the steps of a read-modify-write).
        unsafe { std::slice::from_raw_parts_mut(self.front.mem_ptr().as_ptr().add(off), len) }
    }

    /// Queues one blkif request for `part`.
    fn queue(&mut self, part: u32, req: &Req) -> io::Result<()> {
        let ok = match *req {
            Req::Data {
                write,
                sector,
                first,
                pages,
                last_sectors,
                zeroes,
            } => {
                self.segs.clear();
                for j in 0..pages {
                    let last = if j + 1 == pages { last_sectors - 1 } else { 7 };
                    self.segs.push(Segment {
                        gref: if zeroes { ZERO_PAGE } else { first + j },
                        first_sect: 0,
                        last_sect: last,
                        pad: 0,
                    });
                }
                let opc = if write { op::WRITE } else { op::READ };
                let id = u64::from(part);
                if self.segs.len() <= usize::from(self.info.max_segments) {
                    self.front.queue(&FrontRequest::Rw {
                        op: opc,
                        id,
                        sector,
                        segments: &self.segs,
                    })
                } else {
                    let desc_first = DESC + part * DESC_PER_SLOT;
                    let n = self.segs.len().div_ceil(SEGMENTS_PER_INDIRECT_FRAME) as u32;
                    let indirect: [u32; DESC_PER_SLOT as usize] =
                        std::array::from_fn(|i| desc_first + i as u32);
                    self.front.queue(&FrontRequest::Indirect {
                        op: opc,
                        id,
                        sector,
                        indirect: &indirect[..n as usize],
                        segments: &self.segs,
                    })
                }
            }
            Req::Flush => self.front.queue(&FrontRequest::Rw {
                op: op::FLUSH_DISKCACHE,
                id: u64::from(part),
                sector: 0,
                segments: &[],
            }),
            Req::Discard { sector, sectors } => self.front.queue(&FrontRequest::Discard {
                id: u64::from(part),
                sector,
                nr_sectors: sectors,
                secure: false,
            }),
        };
        if !ok {
            // A free part means a free slot: the ring has as many slots as there are parts.
            return Err(io::Error::other("the NBD ring is full with a slot free"));
        }
        self.queued = true;
        Ok(())
    }

    /// A free part, waiting for responses if all are in flight.
    fn take_part(&mut self, owner: Part) -> io::Result<u32> {
        loop {
            if let Some(p) = self.free_parts.pop() {
                self.parts[p as usize] = owner;
                return Ok(p);
            }
            self.wait_responses()?;
        }
    }

    /// Issues `req` for request `oi` (counted in its parts).
    fn issue(&mut self, oi: u32, req: Req) -> io::Result<()> {
        let p = self.take_part(Part::Of(oi))?;
        if let Some(o) = self.ops[oi as usize].as_mut() {
            o.parts_left += 1;
        }
        self.queue(p, &req)
    }

    /// Issues `req` as a step of the read-modify-write.
    fn issue_sync(&mut self, req: Req) -> io::Result<()> {
        let p = self.take_part(Part::Sync)?;
        self.sync_left += 1;
        self.queue(p, &req)
    }

    /// Reads or writes `len` bytes (whole sectors) at `offset` from guest pages starting at
    /// `first`, as requests of at most `chunk` pages; `zeroes`: every page is the zero page.
    fn data_reqs(
        &mut self,
        oi: Option<u32>,
        write: bool,
        offset: u64,
        len: u64,
        first: u32,
        zeroes: bool,
    ) -> io::Result<()> {
        let chunk = u64::from(self.chunk) * PAGE;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk);
            let pages = n.div_ceil(PAGE) as u32;
            let last = n - (u64::from(pages) - 1) * PAGE;
            let req = Req::Data {
                write,
                sector: (offset + done) / SECTOR,
                first: if zeroes {
                    ZERO_PAGE
                } else {
                    first + (done / PAGE) as u32
                },
                pages,
                last_sectors: (last / SECTOR) as u8,
                zeroes,
            };
            match oi {
                Some(oi) => self.issue(oi, req)?,
                None => self.issue_sync(req)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Publishes what is queued.
    fn publish(&mut self) -> io::Result<()> {
        if self.queued {
            self.queued = false;
            self.front.push()?;
        }
        Ok(())
    }

    /// Publishes, waits until responses come, and handles them.
    fn wait_responses(&mut self) -> io::Result<()> {
        self.publish()?;
        self.front.wait(None)?;
        self.take_responses()
    }

    /// Handles every response published so far.
    fn take_responses(&mut self) -> io::Result<()> {
        let mut rs = std::mem::take(&mut self.responses);
        self.front.poll(|r| rs.push(r));
        for r in rs.drain(..) {
            self.part_done(r)?;
        }
        self.responses = rs;
        Ok(())
    }

    fn part_done(&mut self, r: Response) -> io::Result<()> {
        let Some(part) = usize::try_from(r.id)
            .ok()
            .and_then(|i| self.parts.get(i).copied())
        else {
            return Err(io::Error::other(format!(
                "the VBD answered unknown request {}",
                r.id
            )));
        };
        let ok = r.status == status::OKAY;
        self.parts[r.id as usize] = Part::Free;
        self.free_parts.push(r.id as u32);
        match part {
            Part::Free => Err(io::Error::other(format!(
                "the VBD answered request {} twice",
                r.id
            ))),
            Part::Sync => {
                self.sync_left -= 1;
                self.sync_failed |= !ok;
                Ok(())
            }
            Part::Of(oi) => {
                let Some(o) = self.ops[oi as usize].as_mut() else {
                    return Ok(());
                };
                o.failed |= !ok;
                o.parts_left -= 1;
                if o.parts_left == 0 {
                    self.op_parts_done(oi)?;
                }
                Ok(())
            }
        }
    }

    /// Every part of request `oi` is done: its FUA flush next, or its completion.
    fn op_parts_done(&mut self, oi: u32) -> io::Result<()> {
        let Some(o) = self.ops[oi as usize].as_mut() else {
            return Ok(());
        };
        if o.fua && !o.failed && o.phase == Phase::Data {
            o.phase = Phase::FuaFlush;
            return self.issue(oi, Req::Flush);
        }
        self.complete(oi, Ok(()));
        Ok(())
    }

    /// Request `oi` is finished (`Ok` unless a part failed).
    fn complete(&mut self, oi: u32, result: Result<(), u32>) {
        if let Some(o) = self.ops[oi as usize].take() {
            let result = if o.failed { Err(EIO) } else { result };
            self.done.push_back(Completion {
                cookie: o.cookie,
                cmd: o.cmd,
                result,
                buf: o.buf,
            });
            self.free_ops.push(oi);
        }
    }

    /// Waits until every part in flight is done.
    fn drain(&mut self) -> io::Result<()> {
        while self.free_parts.len() < self.parts.len() {
            self.wait_responses()?;
        }
        Ok(())
    }

    /// Runs what is queued as read-modify-write steps to the end; false if one failed.
    fn run_sync(&mut self) -> io::Result<bool> {
        while self.sync_left > 0 {
            self.wait_responses()?;
        }
        Ok(!std::mem::take(&mut self.sync_failed))
    }

    /// Request `oi`, whose ends are not both on sector boundaries (or a write-zeroes), done
    /// alone through the bounce pages. Returns the result.
    fn unaligned(
        &mut self,
        oi: u32,
        cmd: Cmd,
        offset: u64,
        len: u64,
    ) -> io::Result<Result<(), u32>> {
        self.drain()?;
        let a = offset / SECTOR * SECTOR;
        let b = (offset + len).div_ceil(SECTOR) * SECTOR;
        let skip = (offset - a) as usize;
        let buf_page = self.ops[oi as usize]
            .as_ref()
            .and_then(|o| o.buf.as_ref().map(|b| b.id));
        // The whole sectors the request touches: at most the largest payload and a sector on
        // each side, which the bounce pages hold.
        if cmd == Cmd::WriteZeroes {
            // The partial sectors at the ends through the bounce pages, the middle from the
            // zero page.
            let head_end = (a + SECTOR).min(b);
            let tail_start = (b - SECTOR).max(head_end);
            for (s, e) in [(a, head_end), (tail_start, b)] {
                if s >= e {
                    continue;
                }
                self.data_reqs(None, false, s, e - s, BOUNCE, false)?;
                if !self.run_sync()? {
                    return Ok(Err(EIO));
                }
                let (z0, z1) = (offset.max(s), (offset + len).min(e));
                let sector = self.mem(BOUNCE, SECTOR as usize);
                sector[(z0 - s) as usize..(z1 - s) as usize].fill(0);
                self.data_reqs(None, true, s, e - s, BOUNCE, false)?;
                if !self.run_sync()? {
                    return Ok(Err(EIO));
                }
            }
            if tail_start > head_end {
                self.data_reqs(None, true, head_end, tail_start - head_end, ZERO_PAGE, true)?;
            }
            return Ok(if self.run_sync()? { Ok(()) } else { Err(EIO) });
        }
        let Some(buf_page) = buf_page else {
            return Ok(Err(EINVAL));
        };
        let span = (b - a) as usize;
        match cmd {
            Cmd::Read => {
                self.data_reqs(None, false, a, b - a, BOUNCE, false)?;
                if !self.run_sync()? {
                    return Ok(Err(EIO));
                }
                let tmp = self.mem(BOUNCE, span)[skip..skip + len as usize].to_vec();
                self.mem(buf_page, len as usize).copy_from_slice(&tmp);
            }
            Cmd::Write => {
                // The sectors around the client's bytes as they are, then its bytes over them.
                self.data_reqs(None, false, a, b - a, BOUNCE, false)?;
                if !self.run_sync()? {
                    return Ok(Err(EIO));
                }
                let data = self.mem(buf_page, len as usize).to_vec();
                self.mem(BOUNCE, span)[skip..skip + len as usize].copy_from_slice(&data);
                self.data_reqs(None, true, a, b - a, BOUNCE, false)?;
                if !self.run_sync()? {
                    return Ok(Err(EIO));
                }
            }
            _ => return Ok(Err(EINVAL)),
        }
        Ok(Ok(()))
    }
}

impl Disk for RingDisk {
    fn alloc(&mut self, len: usize) -> Option<Buf> {
        let pages = len.div_ceil(PAGE_SIZE).max(1) as u32;
        self.pages.alloc(pages).map(|id| Buf { id, len })
    }

    fn data(&mut self, b: &Buf) -> &mut [u8] {
        self.mem(b.id, b.len)
    }

    fn free(&mut self, b: Buf) {
        self.pages
            .free(b.id, b.len.div_ceil(PAGE_SIZE).max(1) as u32);
    }

    fn submit(&mut self, o: Op) -> io::Result<()> {
        let oi = loop {
            if let Some(i) = self.free_ops.pop() {
                break i;
            }
            self.wait_responses()?;
        };
        let (cmd, offset, len) = (o.cmd, o.offset, o.len);
        let first = o.buf.as_ref().map_or(ZERO_PAGE, |b| b.id);
        self.ops[oi as usize] = Some(OpState {
            cookie: o.cookie,
            cmd,
            buf: o.buf,
            fua: o.fua,
            parts_left: 0,
            failed: false,
            phase: Phase::Data,
        });
        self.in_flight += 1;
        let aligned = offset % SECTOR == 0 && len % SECTOR == 0;
        match cmd {
            Cmd::Read | Cmd::Write if aligned => {
                self.data_reqs(Some(oi), cmd == Cmd::Write, offset, len, first, false)?
            }
            Cmd::WriteZeroes if aligned => {
                self.data_reqs(Some(oi), true, offset, len, ZERO_PAGE, true)?
            }
            Cmd::Read | Cmd::Write | Cmd::WriteZeroes => {
                let r = self.unaligned(oi, cmd, offset, len)?;
                if r.is_err() {
                    self.complete(oi, r);
                    return Ok(());
                }
            }
            Cmd::Flush => self.issue(oi, Req::Flush)?,
            Cmd::Trim => {
                // Only whole sectors can be freed; the rest of the range stays as it is.
                let s = offset.div_ceil(SECTOR);
                let e = (offset + len) / SECTOR;
                if s < e {
                    self.issue(
                        oi,
                        Req::Discard {
                            sector: s,
                            sectors: e - s,
                        },
                    )?;
                }
            }
        }
        if self.ops[oi as usize]
            .as_ref()
            .is_some_and(|o| o.parts_left == 0)
        {
            // Nothing was issued (an empty trim, an unaligned request done already).
            self.op_parts_done(oi)?;
        }
        Ok(())
    }

    fn push(&mut self) -> io::Result<()> {
        self.publish()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        self.take_responses()?;
        self.in_flight -= self.done.len();
        out.extend(self.done.drain(..));
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn wait(&mut self) -> io::Result<()> {
        self.take_responses()?;
        while self.done.is_empty() && self.in_flight > 0 {
            self.wait_responses()?;
        }
        Ok(())
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.front.notify_fd())
    }

    fn gone_fd(&self) -> Option<RawFd> {
        Some(self.front.hangup_fd())
    }

    fn arm(&mut self) -> bool {
        if let Err(e) = self.front.ack_notify() {
            // The eventfd is ours; failing to read it leaves it readable: a spurious wake-up.
            let _ = e;
        }
        !self.done.is_empty() || !self.front.prepare_wait()
    }

    fn held(&self) -> u64 {
        u64::from(self.pages.high) * PAGE
    }

    fn release_idle(&mut self) {
        if self.in_flight > 0 || self.pages.high <= KEEP_IDLE_PAGES {
            return;
        }
        if (0..self.pages.high).any(|p| self.pages.is_used(p)) {
            return;
        }
        let to = self.pages.high as usize * PAGE_SIZE;
        let bounce = BOUNCE as usize * PAGE_SIZE;
        if self.front.release_mem(0, to).is_ok()
            && self
                .front
                .release_mem(bounce, BOUNCE_PAGES as usize * PAGE_SIZE)
                .is_ok()
        {
            self.pages.high = 0;
            self.pages.hint = 0;
        }
    }
}
