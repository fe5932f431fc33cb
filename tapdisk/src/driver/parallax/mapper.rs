//! Parallax's mapping calls as the translating engine asks for them
//! ([`crate::driver::translate::Mapper`]).
//!
//! Reads map to the store (file 0) or to zeroes (never written). Writes map to blocks of the
//! volume's own: a write covering only part of a block that must be allocated or copied
//! (shared with a snapshot) fills the rest of the block first, synchronously (the library's
//! rule: zeroes, or the old content); guests write whole 4 KiB pages, so this is the
//! exception. Parallax has no tickets: its metadata changes at the mapping call, so a write
//! that fails has its range zeroed (best effort), and blocks it allocated never show what the
//! store held before. A flush is a commit when anything changed since the last one (data
//! synced first, then the new roots), else an `fdatasync`; a discard makes the range read as
//! zeroes (whole blocks freed, the ends of partly covered blocks written with zeroes).

use std::convert::Infallible;
use std::sync::MutexGuard;

use parallax::{FileBacking, VolumeId};

use super::errno;
use crate::driver::translate::{Errno, Mapper, ReadExtent, ReadMap, WriteExtent};

/// The image of a volume, locked.
pub struct ParallaxMapper<'a> {
    pub(super) img: MutexGuard<'a, parallax::Image<FileBacking>>,
    pub(super) vol: VolumeId,
}

impl Mapper for ParallaxMapper<'_> {
    type Ticket = Infallible;
    type Inline = Infallible;

    fn map_read(&mut self, offset: u64, len: u64) -> Result<ReadExtent<Infallible>, Errno> {
        let e = self
            .img
            .map_read(self.vol, offset, len)
            .map_err(|e| errno(&e))?;
        let map = match e.machine {
            Some(m) => ReadMap::Data { file: 0, offset: m },
            None => ReadMap::Zero,
        };
        Ok(ReadExtent { len: e.len, map })
    }

    fn read_inline(&mut self, what: Infallible, _: u64, _: &mut [u8]) -> Result<(), Errno> {
        match what {}
    }

    fn map_write(&mut self, offset: u64, len: u64) -> Result<WriteExtent<Infallible>, Errno> {
        let e = self
            .img
            .map_write(self.vol, offset, len)
            .map_err(|e| errno(&e))?;
        let m = e.machine.ok_or(libc::EIO)?;
        Ok(WriteExtent {
            len: e.len,
            offset: m,
            ticket: None,
        })
    }

    fn commit(&mut self, ticket: Infallible) -> Result<(), Errno> {
        match ticket {}
    }

    fn abort(&mut self, ticket: Infallible) {
        match ticket {}
    }

    fn write_failed(&mut self, offset: u64, len: u64) {
        let _ = self.img.write_zeroes(self.vol, offset, len);
    }

    fn metadata_dirty(&self) -> bool {
        self.img.has_uncommitted_changes()
    }

    fn flush(&mut self) -> Result<(), Errno> {
        self.img.flush().map_err(|e| errno(&e))
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        self.img
            .write_zeroes(self.vol, offset, len)
            .map_err(|e| errno(&e))
    }
}
