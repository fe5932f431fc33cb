//! The read mapping: guest bytes to where they are (this file, compressed, the backing image,
//! or zeroes), and the L2 entry access everything else uses.

use crate::cache::Kind;
use crate::entry::{self, be64_at, put_be64_at, Compressed, L2, OFFSET_MASK};
use crate::error::{corrupt, Error, Result};
use crate::image::Image;

/// Where a run of guest bytes is, for reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// At this offset of the image's file (contiguous for the whole run).
    Data {
        /// File offset of the run's first byte.
        offset: u64,
    },
    /// Reads as zeroes.
    Zero,
    /// Not allocated in this image: read the same guest range from the backing image.
    Backing,
    /// Inside one compressed cluster: inflate it ([`Image::read_compressed`]) and take the
    /// run's bytes from `skip` on.
    Compressed {
        /// The compressed data.
        data: Compressed,
        /// Offset of the run's first byte in the inflated cluster.
        skip: u64,
    },
}

/// A run of guest bytes with one [`Mapping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run (at least 1).
    pub len: u64,
    /// Where they are.
    pub mapping: Mapping,
}

/// Most clusters one mapping call looks at, so a call's work is bounded.
pub(crate) const MAX_RUN: u64 = 4096;

impl Image {
    /// The raw L2 entry of guest cluster `gc` (0 when its L2 table does not exist).
    pub(crate) fn l2_get(&mut self, gc: u64) -> Result<u64> {
        let Some(slice_off) = self.l2_slice(gc)? else {
            return Ok(0);
        };
        let s = self.slot(Kind::L2, slice_off)?;
        Ok(be64_at(
            self.cache.bytes(s),
            (gc % self.g.l2_per_slice) as usize,
        ))
    }

    /// Decoded L2 entry of guest cluster `gc`.
    pub(crate) fn l2_decoded(&mut self, gc: u64) -> Result<(u64, L2)> {
        let raw = self.l2_get(gc)?;
        Ok((raw, entry::l2_entry(raw, gc, self.g.bits, self.g.version)?))
    }

    /// Sets the L2 entry of guest cluster `gc`, whose L2 table exists.
    pub(crate) fn l2_set(&mut self, gc: u64, v: u64) -> Result<()> {
        let slice_off = self
            .l2_slice(gc)?
            .ok_or_else(|| Error::Invalid(format!("no L2 table for guest cluster {gc}")))?;
        let s = self.slot(Kind::L2, slice_off)?;
        let i = (gc % self.g.l2_per_slice) as usize;
        put_be64_at(self.cache.bytes_mut(s), i, v);
        Ok(())
    }

    /// Whether guest cluster `gc` has no L2 table.
    pub(crate) fn l2_missing(&self, gc: u64) -> bool {
        matches!(self.l2_slice(gc), Ok(None))
    }

    /// File offset of the L2 slice holding guest cluster `gc`'s entry.
    fn l2_slice(&self, gc: u64) -> Result<Option<u64>> {
        let l1i = gc / self.g.l2_entries;
        let e = *self
            .l1
            .get(l1i as usize)
            .ok_or_else(|| corrupt!("guest cluster {gc} lies beyond the L1 table"))?;
        let table = e & OFFSET_MASK;
        if table == 0 {
            return Ok(None);
        }
        let idx = gc % self.g.l2_entries;
        Ok(Some(table + (idx / self.g.l2_per_slice) * self.g.slice))
    }

    /// Where the guest bytes from `offset` are: the longest run (up to `len` bytes, and a
    /// bounded number of clusters) with one [`Mapping`]. Compressed runs stop at their
    /// cluster's end. No IO when the L2 slices are cached; no allocation.
    pub fn map_read(&mut self, offset: u64, len: u64) -> Result<Extent> {
        if len == 0 {
            return Err(Error::Invalid("empty read".into()));
        }
        self.check_range(offset, len)?;
        let g = self.g;
        let mut done = 0u64;
        let mut first: Option<Mapping> = None;
        let mut clusters = 0;
        while done < len && clusters < MAX_RUN {
            let pos = offset + done;
            let gc = pos >> g.bits;
            let within = pos & (g.cs - 1);
            let mut n = (g.cs - within).min(len - done);
            let (_, e) = self.l2_decoded(gc)?;
            let m = match e {
                L2::Unallocated => {
                    if pos < self.backing_size {
                        n = n.min(self.backing_size - pos);
                        Mapping::Backing
                    } else {
                        Mapping::Zero
                    }
                }
                L2::Zero(_) => Mapping::Zero,
                L2::Data { offset: host, .. } => {
                    let at = host + within;
                    if at >= self.file_size {
                        // A cluster (or its tail) past the end of the file reads as zeroes,
                        // as QEMU's file layer makes it.
                        Mapping::Zero
                    } else {
                        n = n.min(self.file_size - at);
                        Mapping::Data { offset: at }
                    }
                }
                L2::Compressed(c) => {
                    if done > 0 {
                        break;
                    }
                    return Ok(Extent {
                        len: n,
                        mapping: Mapping::Compressed {
                            data: c,
                            skip: within,
                        },
                    });
                }
            };
            match (first, m) {
                (None, _) => first = Some(m),
                (Some(Mapping::Data { offset: a }), Mapping::Data { offset: b })
                    if a + done == b => {}
                (Some(a), b) if a == b && !matches!(a, Mapping::Data { .. }) => {}
                _ => break,
            }
            done += n;
            clusters += 1;
        }
        Ok(Extent {
            len: done,
            mapping: first.unwrap_or(Mapping::Zero),
        })
    }

    /// Inflates the compressed cluster `data` and copies `out.len()` bytes from `skip` on.
    /// Keeps the last inflated cluster, so reading one cluster in pieces inflates it once.
    pub fn read_compressed(&mut self, data: Compressed, skip: u64, out: &mut [u8]) -> Result<()> {
        let end = skip
            .checked_add(out.len() as u64)
            .filter(|&e| e <= self.g.cs)
            .ok_or_else(|| Error::Invalid("read past the end of a compressed cluster".into()))?;
        if self.inflater.cached(data.offset).is_none() {
            if data.offset >= self.file_size {
                return Err(corrupt!(
                    "compressed cluster at {:#x} lies past the end of the file",
                    data.offset
                ));
            }
            // The last sector may extend past the end of the file.
            let n = data.len.min(self.file_size - data.offset) as usize;
            let storage = self.storage.clone();
            storage
                .read_at(self.inflater.input(n), data.offset)
                .map_err(|e| Error::io("reading a compressed cluster", e))?;
            self.inflater.inflate(data.offset)?;
        }
        let cluster = self.inflater.cached(data.offset).unwrap_or(&[]);
        let src = cluster
            .get(skip as usize..end as usize)
            .ok_or_else(|| Error::Invalid("compressed cluster not inflated".into()))?;
        out.copy_from_slice(src);
        Ok(())
    }
}
