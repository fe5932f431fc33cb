//! The synchronous executor: reads, writes, flushes and discards on a whole chain through
//! plain positional IO, built on exactly the mapping calls a block driver uses. Tools and
//! tests use it; byte ranges need not be sector aligned (partial sectors are read, patched and
//! written whole).

use crate::chain::{Chain, ChainMapping};
use crate::error::{Error, Result};
use crate::format::SECTOR;

/// Largest piece moved at once.
const PIECE: u64 = 4 << 20;

impl Chain {
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::Range(format!(
                "{len} bytes at {offset} reach beyond the {}-byte disk",
                self.size()
            ))),
        }
    }

    /// Reads whole sectors at a sector offset.
    fn read_sectors(&mut self, mut offset: u64, mut buf: &mut [u8]) -> Result<()> {
        while !buf.is_empty() {
            let e = self.map_read(offset, buf.len() as u64)?;
            let n = e.len as usize;
            let (now, rest) = buf.split_at_mut(n);
            match e.map {
                ChainMapping::Zero => now.fill(0),
                ChainMapping::Data {
                    level: 0,
                    file_offset,
                } => self
                    .leaf
                    .backing()
                    .read_at(now, file_offset)
                    .map_err(|err| Error::io(format!("reading {}", self.leaf.name()), err))?,
                ChainMapping::Data { level, file_offset } => {
                    self.parents[level - 1].read_data(now, file_offset)?
                }
            }
            offset += e.len;
            buf = rest;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` through the chain.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut off = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let head = off % SECTOR;
            let want = (buf.len() - done) as u64;
            if head != 0 || want < SECTOR {
                // A partial sector: read it whole.
                let mut sec = [0u8; SECTOR as usize];
                self.read_sectors(off - head, &mut sec)?;
                let n = (SECTOR - head).min(want) as usize;
                buf[done..done + n].copy_from_slice(&sec[head as usize..head as usize + n]);
                done += n;
                off += n as u64;
                continue;
            }
            let n = (want / SECTOR * SECTOR).min(PIECE) as usize;
            self.read_sectors(off, &mut buf[done..done + n])?;
            done += n;
            off += n as u64;
        }
        Ok(())
    }

    /// Writes whole sectors at a sector offset: map, write the data, commit.
    fn write_sectors(&mut self, mut offset: u64, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            let m = self.leaf.map_write(offset, buf.len() as u64)?;
            let (now, rest) = buf.split_at(m.len as usize);
            self.leaf
                .backing()
                .write_at(now, m.file_offset)
                .map_err(|e| Error::io(format!("writing {}", self.leaf.name()), e))?;
            self.leaf.commit(m.ticket)?;
            offset += m.len;
            buf = rest;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` into the leaf. Durable after [`Chain::flush`].
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.leaf.read_only() {
            return Err(Error::ReadOnly(self.leaf.name().to_string()));
        }
        self.check_range(offset, buf.len() as u64)?;
        let mut off = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let head = off % SECTOR;
            let want = (buf.len() - done) as u64;
            if head != 0 || want < SECTOR {
                let base = off - head;
                let mut sec = [0u8; SECTOR as usize];
                self.read_sectors(base, &mut sec)?;
                let n = (SECTOR - head).min(want) as usize;
                sec[head as usize..head as usize + n].copy_from_slice(&buf[done..done + n]);
                self.write_sectors(base, &sec)?;
                done += n;
                off += n as u64;
                continue;
            }
            let n = (want / SECTOR * SECTOR).min(PIECE) as usize;
            self.write_sectors(off, &buf[done..done + n])?;
            done += n;
            off += n as u64;
        }
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn flush(&mut self) -> Result<()> {
        self.leaf.flush()
    }

    /// Gives back the leaf's blocks that lie wholly inside the range where nothing below them
    /// in the chain has data, and punches their space; they then read as zeroes. Blocks over a
    /// parent's data are kept (dropping one would bring the parent's data back), and so are
    /// blocks only partly inside the range: discard is a hint. Returns the blocks dropped.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<u64> {
        self.check_range(offset, len)?;
        let start = offset.div_ceil(SECTOR) * SECTOR;
        let end = (offset + len) / SECTOR * SECTOR;
        if end <= start {
            return Ok(0);
        }
        let parents = self.parents.clone();
        let mut nothing_below = |o: u64, l: u64| -> Result<bool> {
            for p in &parents {
                if o >= p.size() {
                    continue;
                }
                let mut g = p.lock();
                match &mut *g {
                    crate::chain::ParentImage::Raw { .. } => return Ok(false),
                    crate::chain::ParentImage::Vhd(img) => {
                        if img.range_allocated(o, l)? {
                            return Ok(false);
                        }
                    }
                }
            }
            Ok(true)
        };
        self.leaf
            .discard_blocks(start, end - start, &mut nothing_below)
    }
}
