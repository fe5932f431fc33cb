//! The VHD library's mapping calls as the translating engine asks for them
//! ([`crate::driver::translate::Mapper`]), on a chain under its mutex.
//!
//! Reads map to the leaf (file 0) or a parent (file N for the Nth parent) where the bitmaps
//! say the sectors are, or to zeroes. Writes map into the leaf's blocks, allocating a block
//! (footer moved behind it first) when needed; each gets a [`vhd::Ticket`] that sets the
//! sector bitmap bits once the data is written, or is dropped if it was not (the sectors then
//! still read from the parent, or as zeroes).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::MutexGuard;

use crate::driver::translate::{Errno, Mapper, ReadExtent, ReadMap, WriteExtent};

/// A chain, locked.
pub struct VhdMapper<'a> {
    pub(super) chain: MutexGuard<'a, vhd::Chain>,
    /// Blocks dropped by discards (the image's counter).
    pub(super) dropped: &'a AtomicU64,
}

fn errno(e: &vhd::Error) -> Errno {
    e.errno()
}

impl Mapper for VhdMapper<'_> {
    type Ticket = vhd::Ticket;
    type Inline = Infallible;

    fn map_read(&mut self, offset: u64, len: u64) -> Result<ReadExtent<Infallible>, Errno> {
        let e = self.chain.map_read(offset, len).map_err(|e| errno(&e))?;
        let map = match e.map {
            vhd::chain::ChainMapping::Data { level, file_offset } => ReadMap::Data {
                file: level,
                offset: file_offset,
            },
            vhd::chain::ChainMapping::Zero => ReadMap::Zero,
        };
        Ok(ReadExtent { len: e.len, map })
    }

    fn read_inline(&mut self, what: Infallible, _: u64, _: &mut [u8]) -> Result<(), Errno> {
        match what {}
    }

    fn map_write(&mut self, offset: u64, len: u64) -> Result<WriteExtent<vhd::Ticket>, Errno> {
        let w = self
            .chain
            .leaf()
            .map_write(offset, len)
            .map_err(|e| errno(&e))?;
        Ok(WriteExtent {
            len: w.len,
            offset: w.file_offset,
            ticket: Some(w.ticket),
        })
    }

    fn commit(&mut self, ticket: vhd::Ticket) -> Result<(), Errno> {
        self.chain.leaf().commit(ticket).map_err(|e| errno(&e))
    }

    fn abort(&mut self, ticket: vhd::Ticket) {
        // Its bits stay clear: the sectors read as before the write.
        let _ = ticket;
    }

    fn metadata_dirty(&self) -> bool {
        self.chain.leaf_ref().metadata_dirty()
    }

    fn flush(&mut self) -> Result<(), Errno> {
        self.chain.flush().map_err(|e| errno(&e))
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        let n = self.chain.discard(offset, len).map_err(|e| errno(&e))?;
        self.dropped.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}
