//! The write mapping: guest bytes to where the data goes, allocating clusters when needed,
//! and the tickets that link new clusters into their L2 tables once the data is written.

use crate::entry::{self, COPIED, L2};
use crate::error::{corrupt, Error, Result};
use crate::image::{Image, Pending, Source, Ticket};
use crate::map::MAX_RUN;

/// Reads guest bytes of a backing image (for the part of a new cluster a write does not
/// cover). Bytes past the backing image's end read as zeroes.
pub trait GuestReader {
    /// Fills `buf` with the guest bytes at `offset`.
    fn read_guest(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// Where a run of a write goes.
#[derive(Debug)]
#[must_use = "a ticket must be committed or aborted"]
pub struct WriteExtent {
    /// Bytes of the write this run takes (at least 1).
    pub len: u64,
    /// File offset to write them at (contiguous for the whole run).
    pub offset: u64,
    /// For runs into newly allocated clusters: hand it to [`Image::commit`] once the data
    /// write completed, or to [`Image::abort`] if it failed. `None`: the clusters were
    /// already allocated, nothing to do afterwards.
    pub ticket: Option<Ticket>,
}

impl Image {
    /// Where to write guest bytes from `offset`: the longest run (up to `len` bytes) that is
    /// contiguous in the file.
    ///
    /// Clusters already allocated with a refcount of one are written in place (no ticket).
    /// Otherwise (unallocated, zero, compressed, or shared) the run gets new clusters: their
    /// refcounts are raised in the cache, and a cluster the write covers only partly is
    /// first filled, synchronously, with what the guest reads there now (the backing image's
    /// bytes through `backing`, the old or inflated cluster, or zeroes; nothing for a cluster
    /// past the old end of the file whose content is zeroes anyway). The L2 entries change
    /// only at [`Image::commit`]; until then reads still see the old content, which is what
    /// the new clusters hold outside the write.
    ///
    /// A write into a cluster whose allocation is still in flight joins it (the same host
    /// cluster, a ticket of its own).
    pub fn map_write(
        &mut self,
        offset: u64,
        len: u64,
        backing: Option<&dyn GuestReader>,
    ) -> Result<WriteExtent> {
        self.check_writable()?;
        if len == 0 {
            return Err(Error::Invalid("empty write".into()));
        }
        self.check_range(offset, len)?;
        let g = self.g;
        let gc0 = offset >> g.bits;
        let within = offset & (g.cs - 1);
        if let Some(p) = self.pending.get_mut(&gc0) {
            p.writers += 1;
            return Ok(WriteExtent {
                len: (g.cs - within).min(len),
                offset: p.host + within,
                ticket: Some(Ticket {
                    first: gc0,
                    count: 1,
                }),
            });
        }
        let (raw0, e0) = self.l2_decoded(gc0)?;
        if let L2::Data {
            offset: host,
            copied: true,
        } = e0
        {
            return self.in_place(offset, len, host);
        }
        // Clusters to allocate: this one and the following ones that also need it, in the
        // same L2 table.
        let end = offset + len;
        let last_gc = (end - 1) >> g.bits;
        let table_end = (gc0 / g.l2_entries + 1) * g.l2_entries;
        let mut want = 1;
        while gc0 + want <= last_gc && gc0 + want < table_end && want < MAX_RUN {
            let gc = gc0 + want;
            if self.pending.contains_key(&gc) {
                break;
            }
            match self.l2_decoded(gc)?.1 {
                L2::Data { copied: true, .. } => break,
                L2::Zero(Some(_)) if self.l2_get(gc)? & COPIED != 0 => break,
                _ => want += 1,
            }
        }
        self.ensure_l2_table(gc0)?;
        // A preallocated zero cluster of our own is reused in place.
        let (host0, got, reused) = match e0 {
            L2::Zero(Some(h)) if raw0 & COPIED != 0 => (h >> g.bits, 1, true),
            _ => {
                let (c, n) = self.alloc(want)?;
                (c, n, false)
            }
        };
        let fresh = match if reused {
            self.cover((host0 + 1) << g.bits).map(|()| false)
        } else {
            self.claim(host0, got)
        } {
            Ok(f) => f,
            Err(e) => {
                self.release_new(host0, got, reused);
                return Err(e);
            }
        };
        for i in 0..got {
            let gc = gc0 + i;
            let host = (host0 + i) << g.bits;
            let (raw, e) = if i == 0 {
                (raw0, e0)
            } else {
                self.l2_decoded(gc)?
            };
            let cstart = gc << g.bits;
            let partial = offset > cstart || end < cstart + g.cs;
            if partial {
                let src = match e {
                    L2::Unallocated if cstart < self.backing_size => Source::Backing,
                    L2::Unallocated | L2::Zero(_) => Source::Zero,
                    L2::Data { offset, .. } => Source::OldCluster(offset),
                    L2::Compressed(c) => Source::Compressed(c),
                };
                if let Err(err) = self.fill(host, cstart, src, fresh, backing) {
                    self.release_new(host0, got, reused);
                    return Err(err);
                }
            }
            self.pending.insert(
                gc,
                Pending {
                    host,
                    writers: 1,
                    linked: false,
                    reused,
                    old: raw,
                },
            );
        }
        Ok(WriteExtent {
            len: ((got << g.bits) - within).min(len),
            offset: (host0 << g.bits) + within,
            ticket: Some(Ticket {
                first: gc0,
                count: got,
            }),
        })
    }

    /// The in-place run from `offset` (its first cluster is at `host`).
    fn in_place(&mut self, offset: u64, len: u64, host: u64) -> Result<WriteExtent> {
        let g = self.g;
        let gc0 = offset >> g.bits;
        let within = offset & (g.cs - 1);
        let mut run = (g.cs - within).min(len);
        let mut clusters = 1;
        while run < len && clusters < MAX_RUN {
            let gc = gc0 + clusters;
            if self.pending.contains_key(&gc) {
                break;
            }
            match self.l2_decoded(gc)?.1 {
                L2::Data {
                    offset: h,
                    copied: true,
                } if h == host + (clusters << g.bits) => {}
                _ => break,
            }
            run = (run + g.cs).min(len);
            clusters += 1;
        }
        // Clusters past the end of the file (written by someone else's crashed process):
        // make the file cover them, so reads of them stay exact.
        self.cover(host + (clusters << g.bits))?;
        Ok(WriteExtent {
            len: run,
            offset: host + within,
            ticket: None,
        })
    }

    /// Makes guest cluster `gc`'s L2 table exist (a new, zeroed one if it did not).
    pub(crate) fn ensure_l2_table(&mut self, gc: u64) -> Result<()> {
        let l1i = (gc / self.g.l2_entries) as usize;
        let e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| corrupt!("guest cluster {gc} lies beyond the L1 table"))?;
        let (table, copied) = entry::l1_entry(e, l1i as u64, self.g.bits)?;
        if table != 0 {
            if !copied {
                return Err(Error::Unsupported(format!(
                    "L1 entry {l1i}: the L2 table is shared (copied bit clear); writing would \
                     need copy-on-write of L2 tables"
                )));
            }
            return Ok(());
        }
        let (c, _) = self.alloc(1)?;
        if let Err(e) = self.claim_meta(c) {
            self.release_new(c, 1, false);
            return Err(e);
        }
        self.l1[l1i] = (c << self.g.bits) | COPIED;
        self.l1_dirty.mark(l1i);
        Ok(())
    }

    /// Fills the new cluster at `host` with what guest cluster `cstart` reads now.
    fn fill(
        &mut self,
        host: u64,
        cstart: u64,
        src: Source,
        fresh: bool,
        backing: Option<&dyn GuestReader>,
    ) -> Result<()> {
        let cs = self.g.cs as usize;
        let mut buf = std::mem::take(&mut self.fill_buf);
        buf.resize(cs, 0);
        let r = (|| {
            match src {
                Source::Zero if fresh => return Ok(()),
                Source::Zero => buf.fill(0),
                Source::Backing => match backing {
                    Some(b) => b.read_guest(cstart, &mut buf)?,
                    None => buf.fill(0),
                },
                Source::OldCluster(at) => self
                    .storage
                    .read_at(&mut buf, at)
                    .map_err(|e| Error::io("reading a cluster to copy", e))?,
                Source::Compressed(c) => self.read_compressed(c, 0, &mut buf)?,
            }
            self.storage
                .write_at(&buf, host)
                .map_err(|e| Error::io("filling a new cluster", e))
        })();
        self.fill_buf = buf;
        r
    }

    /// Gives back clusters allocated by a mapping that failed before any ticket existed.
    fn release_new(&mut self, host0: u64, n: u64, reused: bool) {
        if reused {
            return;
        }
        for c in host0..host0 + n {
            if let Err(e) = self.decref(c) {
                self.fail(e);
            }
        }
    }

    /// The data of `ticket`'s write completed: link its clusters into their L2 tables (in
    /// the cache), if another write into them has not already. The clusters they replace
    /// (compressed or shared ones) are freed once the change is durable.
    pub fn commit(&mut self, ticket: Ticket) -> Result<()> {
        let mut first_err = None;
        for gc in ticket.first..ticket.first + ticket.count {
            if let Err(e) = self.commit_one(gc) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn commit_one(&mut self, gc: u64) -> Result<()> {
        let p = self
            .pending
            .get_mut(&gc)
            .ok_or_else(|| Error::Invalid(format!("no allocation in flight for cluster {gc}")))?;
        p.writers -= 1;
        let p = *p;
        let mut r = Ok(());
        if !p.linked {
            r = self.link(gc, p);
            if r.is_ok() {
                if let Some(q) = self.pending.get_mut(&gc) {
                    q.linked = true;
                }
            }
        }
        if p.writers == 0 {
            self.pending.remove(&gc);
            if r.is_err() && !p.reused {
                let _ = self.decref(p.host >> self.g.bits);
            }
        }
        r
    }

    /// Points guest cluster `gc`'s L2 entry at its new cluster.
    fn link(&mut self, gc: u64, p: Pending) -> Result<()> {
        let now = self.l2_get(gc)?;
        if now != p.old {
            return Err(self.fail(corrupt!(
                "L2 entry of guest cluster {gc} changed while its allocation was in flight"
            )));
        }
        self.l2_set(gc, p.host | COPIED)?;
        self.linked_since_sync = true;
        match entry::l2_entry(p.old, gc, self.g.bits, self.g.version)? {
            L2::Data { offset, .. } => self.defer_free(offset, 1),
            L2::Zero(Some(h)) if !p.reused => self.defer_free(h, 1),
            L2::Compressed(c) => {
                let (off, n) = c.clusters(self.g.bits);
                self.defer_free(off, n);
            }
            _ => {}
        }
        Ok(())
    }

    /// The data write of `ticket` failed: its clusters are given back unless another write
    /// into them committed. What the failed write's range reads afterwards is unspecified
    /// (old or new bytes), never another cluster's data.
    pub fn abort(&mut self, ticket: Ticket) {
        for gc in ticket.first..ticket.first + ticket.count {
            let Some(p) = self.pending.get_mut(&gc) else {
                continue;
            };
            p.writers -= 1;
            if p.writers == 0 {
                let p = *p;
                self.pending.remove(&gc);
                if !p.linked && !p.reused {
                    if let Err(e) = self.decref(p.host >> self.g.bits) {
                        self.fail(e);
                    }
                }
            }
        }
    }
}
