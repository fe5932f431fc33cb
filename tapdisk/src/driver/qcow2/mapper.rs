//! The qcow2 library's mapping calls as the translating engine asks for them
//! ([`crate::driver::translate::Mapper`]), on a chain under its mutex.
//!
//! Reads map to the leaf (file 0) or a backing image (file N for the Nth below the leaf)
//! where the L2 tables say the bytes are, to zeroes, or to a compressed cluster, which the
//! engine has us inflate into the guest's pages ([`ReadMap::Inline`]). Writes map into the
//! leaf's clusters; a write into a cluster the leaf does not have yet allocates one (the
//! library copies the rest of the cluster from the backing chain, or from the compressed
//! cluster it replaces, before it returns) and gets a [`qcow2::Ticket`] that links the cluster
//! into its L2 table once the data is written, or frees it if the write failed (the range then
//! reads as before).

use std::sync::MutexGuard;

use crate::driver::translate::{Errno, Mapper, ReadExtent, ReadMap, WriteExtent};

/// A chain, locked.
pub struct Qcow2Mapper<'a> {
    pub(super) chain: MutexGuard<'a, qcow2::Chain>,
}

/// A compressed cluster to inflate: in which image, and from which byte of the cluster the
/// extent starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compressed {
    layer: usize,
    data: qcow2::Compressed,
    skip: u64,
}

fn errno(e: &qcow2::Error) -> Errno {
    e.errno()
}

impl Mapper for Qcow2Mapper<'_> {
    type Ticket = qcow2::Ticket;
    type Inline = Compressed;

    fn map_read(&mut self, offset: u64, len: u64) -> Result<ReadExtent<Compressed>, Errno> {
        let e = self.chain.map_read(offset, len).map_err(|e| errno(&e))?;
        let map = match e.mapping {
            qcow2::Mapping::Data { offset } => ReadMap::Data {
                file: e.layer,
                offset,
            },
            qcow2::Mapping::Zero => ReadMap::Zero,
            qcow2::Mapping::Compressed { data, skip } => ReadMap::Inline(Compressed {
                layer: e.layer,
                data,
                skip,
            }),
            // A chain resolves backing references itself.
            qcow2::Mapping::Backing => return Err(libc::EIO),
        };
        Ok(ReadExtent { len: e.len, map })
    }

    fn read_inline(&mut self, what: Compressed, skip: u64, out: &mut [u8]) -> Result<(), Errno> {
        let from = what.skip.checked_add(skip).ok_or(libc::EINVAL)?;
        self.chain
            .read_compressed(what.layer, what.data, from, out)
            .map_err(|e| errno(&e))
    }

    fn map_write(&mut self, offset: u64, len: u64) -> Result<WriteExtent<qcow2::Ticket>, Errno> {
        let w = self.chain.map_write(offset, len).map_err(|e| errno(&e))?;
        Ok(WriteExtent {
            len: w.len,
            offset: w.offset,
            ticket: w.ticket,
        })
    }

    fn commit(&mut self, ticket: qcow2::Ticket) -> Result<(), Errno> {
        self.chain.commit(ticket).map_err(|e| errno(&e))
    }

    fn abort(&mut self, ticket: qcow2::Ticket) {
        self.chain.abort(ticket);
    }

    fn metadata_dirty(&self) -> bool {
        self.chain.leaf().has_unwritten_metadata()
    }

    fn flush(&mut self) -> Result<(), Errno> {
        self.chain.flush().map_err(|e| errno(&e))
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        self.chain.discard(offset, len).map_err(|e| errno(&e))
    }
}
