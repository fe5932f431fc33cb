//! Volumes: the data path (mapping virtual ranges to the store), snapshots, clones, deletion,
//! discard, space accounting and defragmentation.
//!
//! A V2P tree maps a volume's virtual blocks to physical blocks: `v2p_levels` levels of
//! 512-entry nodes, the root at the top, leaves (level 0) pointing at data blocks. Each pointer
//! carries a *writable* bit, set only when the pointer is the target's sole reference. A write
//! walks down from the root; wherever it meets a read-only pointer it makes the target private
//! first: a node referenced once more is upgraded in place (its own pointers all made read-only,
//! since it was shared), a node referenced more than once is copied (the copy's pointers all
//! read-only, each target gaining a reference), and a data block is always copied. Taking a
//! snapshot or a clone copies only the root, with every pointer read-only, and marks the
//! source root's pointers read-only too.
//!
//! Why data blocks reached through a read-only pointer are copied even when nothing else
//! references them any more: data is written in place, not shadowed, and the last commit may
//! still share the block (say, with a snapshot deleted in this epoch); writing into it would
//! change that snapshot's data if the deletion never became durable.

use crate::backing::Backing;
use crate::cache::{Layer, Tree};
use crate::error::{Error, Result};
use crate::format::{
    BlockKind, Range, V2pEntry, VolumeKind, BLOCK, BLOCK_SHIFT, P2M_LEAF_BITS, V2P_BITS, V2P_FANOUT,
};
use crate::image::{Image, LeafMemo, VolumeId};
use crate::report::{DefragReport, Extent, Usage};

fn child_kind(level: u8) -> BlockKind {
    if level == 0 {
        BlockKind::Data
    } else {
        BlockKind::Node(level - 1)
    }
}

impl<B: Backing> Image<B> {
    /// Loads the volume's V2P root node, and the P2M path to it, into the metadata cache.
    ///
    /// Every IO of the volume starts at its root, so a server calls this when it opens the
    /// volume: the first guest IO then does not wait for those reads. The loads count as misses
    /// (once); a root already cached counts one hit.
    pub fn warm(&mut self, vol: VolumeId) -> Result<()> {
        let (root, _) = self.root_of(vol)?;
        let top = self.sb.v2p_levels - 1;
        self.guard(|img| img.v2p_get(root, top).map(|_| ()))
    }

    fn root_of(&self, vol: VolumeId) -> Result<(u64, VolumeKind)> {
        self.volumes
            .iter()
            .find(|v| v.id == vol.0)
            .map(|v| (v.root, v.kind))
            .ok_or_else(|| Error::NoSuchVolume(format!("#{}", vol.0)))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= self.sb.virtual_size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range of {len} bytes at {offset} is empty or beyond the disk size {}",
                self.sb.virtual_size
            ))),
        }
    }

    fn digit(vb: u64, level: u8) -> usize {
        ((vb >> (V2P_BITS * level as u32)) as usize) & (V2P_FANOUT - 1)
    }

    /// The machine block of data block `p`.
    #[inline]
    fn data_machine(&mut self, p: u64) -> Result<u64> {
        let e = self.p2m_get(p)?;
        if e.kind != BlockKind::Data {
            return Err(Error::Corrupt(format!(
                "physical block {p} should be a data block, but its P2M entry says {:?}",
                e.kind
            )));
        }
        Ok(e.machine)
    }

    /// Where `len` bytes at `offset` of volume `vol` are, for reading: the longest prefix that
    /// is either unwritten or contiguous in the store.
    pub fn map_read(&mut self, vol: VolumeId, offset: u64, len: u64) -> Result<Extent> {
        let (root, _) = self.root_of(vol)?;
        self.check_range(offset, len)?;
        self.guard(|img| img.map_read_inner(root, offset, len))
    }

    fn map_read_inner(&mut self, root: u64, offset: u64, len: u64) -> Result<Extent> {
        let shift = self.sb.data_shift as u32;
        let bs = 1u64 << shift;
        let vb = offset >> shift;
        let head = offset & (bs - 1);
        let blocks = ((offset + len - 1) >> shift) - vb + 1;
        let extent = |k: u64, machine: Option<u64>| Extent {
            len: ((k << shift) - head).min(len),
            machine,
        };
        let leaf_index = vb >> V2P_BITS;
        let node = match self.memo {
            Some(m)
                if m.root == root && m.leaf_index == leaf_index && m.epoch == self.v2p_epoch =>
            {
                m.leaf
            }
            _ => {
                let mut node = root;
                for level in (1..self.sb.v2p_levels).rev() {
                    let e = self.v2p_entry(node, level, Self::digit(vb, level))?;
                    if e.phys == 0 {
                        let span = 1u64 << (V2P_BITS * level as u32);
                        let k = (span - (vb & (span - 1))).min(blocks);
                        return Ok(extent(k, None));
                    }
                    node = e.phys;
                }
                self.memo = Some(LeafMemo {
                    root,
                    leaf_index,
                    leaf: node,
                    writable: false,
                    epoch: self.v2p_epoch,
                });
                node
            }
        };
        let i0 = Self::digit(vb, 0);
        let n = blocks.min((V2P_FANOUT - i0) as u64) as usize;
        self.leaf_entries(node, i0, n)?;
        let first = self.entry(node, i0, 0)?;
        if first.phys == 0 {
            let k = (1..n).find(|&k| self.entries[k] != 0).unwrap_or(n);
            return Ok(extent(k as u64, None));
        }
        let mut cur = None;
        let m0 = self.data_machine_at(first.phys, &mut cur)?;
        let run = self.sb.data_run();
        let mut k = 1;
        while k < n {
            let e = self.entry(node, i0, k)?;
            if e.phys == 0 || self.data_machine_at(e.phys, &mut cur)? != m0 + k as u64 * run {
                break;
            }
            k += 1;
        }
        Ok(extent(k as u64, Some((m0 << BLOCK_SHIFT) + head)))
    }

    /// Copies entries `i0..i0 + n` of leaf `leaf` into `self.entries` (a lookup each).
    fn leaf_entries(&mut self, leaf: u64, i0: usize, n: usize) -> Result<()> {
        let s = self.v2p_get(leaf, 0)?;
        let (cache, entries) = (&self.cache, &mut self.entries);
        let buf = cache.buf(s);
        entries.clear();
        entries.extend((i0..i0 + n).map(|i| V2pEntry::raw_at(buf, i)));
        if n > 1 {
            self.cache.count_lookups(Layer::V2p, n as u64 - 1);
        }
        Ok(())
    }

    /// Copied entry `k` (entry `i0 + k` of leaf `leaf`), decoded.
    #[inline]
    fn entry(&self, leaf: u64, i0: usize, k: usize) -> Result<V2pEntry> {
        V2pEntry::decode(self.entries[k])
            .map_err(|e| e.within(format_args!("V2P node {leaf}, entry {}", i0 + k)))
    }

    /// The machine block of data block `p`, through `cur`: the P2M leaf used last (valid as long
    /// as nothing else touched the cache since).
    #[inline]
    fn data_machine_at(&mut self, p: u64, cur: &mut Option<(u64, u32)>) -> Result<u64> {
        let li = p >> P2M_LEAF_BITS;
        let s = match *cur {
            Some((l, s)) if l == li => {
                self.cache.count_lookups(Layer::P2m, 1);
                s
            }
            _ => {
                if p == 0 || p >= self.sb.phys_limit {
                    return Err(Error::Corrupt(format!(
                        "physical block {p} is outside 1..{}",
                        self.sb.phys_limit
                    )));
                }
                let Some(s) = self.tree_get(Tree::P2m, 0, li)? else {
                    return Err(Error::Corrupt(format!("data block {p} has no P2M entry")));
                };
                *cur = Some((li, s));
                s
            }
        };
        let e = self.p2m_entry_in(s, p)?;
        if e.kind != BlockKind::Data {
            return Err(Error::Corrupt(format!(
                "physical block {p} should be a data block, but its P2M entry says {:?}",
                e.kind
            )));
        }
        Ok(e.machine)
    }

    /// Where to write `len` bytes at `offset` of volume `vol`: the longest prefix that can be
    /// written with one IO at the returned store offset.
    ///
    /// Blocks not yet written, or shared (with a snapshot or a clone), are allocated first; the
    /// parts of such a block the write does not cover are filled here (zeroes, or the old
    /// content), synchronously, before this returns. The caller writes the data and must not
    /// [`Image::flush`] before that write completed. If that write fails, call
    /// [`Image::discard`] on the range so no block maps content that was never written.
    pub fn map_write(&mut self, vol: VolumeId, offset: u64, len: u64) -> Result<Extent> {
        let (root, kind) = self.root_of(vol)?;
        self.writable()?;
        if kind == VolumeKind::Snapshot {
            return Err(Error::ReadOnly(format!(
                "snapshot '{}'",
                self.volume_info(vol)?.name
            )));
        }
        self.check_range(offset, len)?;
        self.guard(|img| img.map_write_inner(root, offset, len))
    }

    fn map_write_inner(&mut self, root: u64, offset: u64, len: u64) -> Result<Extent> {
        let shift = self.sb.data_shift as u32;
        let bs = 1u64 << shift;
        let run = self.sb.data_run();
        let vb = offset >> shift;
        let head = offset & (bs - 1);
        let last = (offset + len - 1) >> shift;
        let tail_end = ((offset + len - 1) & (bs - 1)) + 1;
        let leaf = self.leaf_for_write(root, vb)?;
        let i0 = Self::digit(vb, 0);
        let n = (last - vb + 1).min((V2P_FANOUT - i0) as u64) as usize;
        self.leaf_entries(leaf, i0, n)?;
        let mut cur = None;
        let mut m0 = 0;
        let mut k = 0;
        while k < n {
            let want = |m0: u64| m0 + k as u64 * run;
            let e = self.entry(leaf, i0, k)?;
            let m = if e.writable {
                let m = self.data_machine_at(e.phys, &mut cur)?;
                if k > 0 && m != want(m0) {
                    break;
                }
                m
            } else {
                if k > 0 && self.next_data() != Some(want(m0)) {
                    break;
                }
                cur = None;
                let lo = if k == 0 { head } else { 0 };
                let hi = if vb + k as u64 == last { tail_end } else { bs };
                let (p, m) = self.data_new()?;
                if e.phys == 0 {
                    self.zero_fill(m, lo, hi)?;
                } else {
                    if lo != 0 || hi != bs {
                        let old = self.data_machine(e.phys)?;
                        self.copy_data(old, m)?;
                    }
                    self.drop_ref(e.phys, BlockKind::Data)?;
                }
                self.set_v2p_entry(
                    leaf,
                    0,
                    i0 + k,
                    V2pEntry {
                        phys: p,
                        writable: true,
                    },
                )?;
                m
            };
            if k == 0 {
                m0 = m;
            }
            k += 1;
        }
        Ok(Extent {
            len: ((k as u64) << shift).saturating_sub(head).min(len),
            machine: Some((m0 << BLOCK_SHIFT) + head),
        })
    }

    /// Writes zeroes over the parts of the data block at machine block `m` outside `lo..hi`.
    fn zero_fill(&mut self, m: u64, lo: u64, hi: u64) -> Result<()> {
        let bs = self.sb.data_block();
        let base = m << BLOCK_SHIFT;
        for (from, to) in [(0, lo), (hi, bs)] {
            if to > from {
                self.backing
                    .write_at(&self.zeroes[..(to - from) as usize], base + from)
                    .map_err(|e| Error::io("filling a new block with zeroes", e))?;
            }
        }
        Ok(())
    }

    /// Copies the data block at machine block `from` to machine block `to`.
    pub(crate) fn copy_data(&mut self, from: u64, to: u64) -> Result<()> {
        self.backing
            .read_at(&mut self.fill, from << BLOCK_SHIFT)
            .map_err(|e| Error::io("reading a block to copy it", e))?;
        self.backing
            .write_at(&self.fill, to << BLOCK_SHIFT)
            .map_err(|e| Error::io("writing the copy of a block", e))
    }

    /// The leaf covering virtual block `vb`, private to this volume and reached through
    /// writable pointers only, creating and copying nodes on the way.
    fn leaf_for_write(&mut self, root: u64, vb: u64) -> Result<u64> {
        let leaf_index = vb >> V2P_BITS;
        if let Some(m) = self.memo {
            if m.writable
                && m.root == root
                && m.leaf_index == leaf_index
                && m.epoch == self.v2p_epoch
            {
                return Ok(m.leaf);
            }
        }
        let mut node = root;
        for level in (1..self.sb.v2p_levels).rev() {
            let i = Self::digit(vb, level);
            let e = self.v2p_entry(node, level, i)?;
            let child = if e.writable {
                e.phys
            } else {
                let c = if e.phys == 0 {
                    self.v2p_new(level - 1, None)?
                } else {
                    self.make_private(e.phys, level - 1)?
                };
                self.set_v2p_entry(
                    node,
                    level,
                    i,
                    V2pEntry {
                        phys: c,
                        writable: true,
                    },
                )?;
                c
            };
            node = child;
        }
        self.memo = Some(LeafMemo {
            root,
            leaf_index,
            leaf: node,
            writable: true,
            epoch: self.v2p_epoch,
        });
        Ok(node)
    }

    /// Node `p` (of `level`), reached through a read-only pointer, made private: upgraded in
    /// place when nothing else references it, copied otherwise.
    fn make_private(&mut self, p: u64, level: u8) -> Result<u64> {
        let e = self.p2m_get(p)?;
        if e.kind != BlockKind::Node(level) {
            return Err(Error::Corrupt(format!(
                "physical block {p} should be a V2P node of level {level}, but its P2M entry says {:?}",
                e.kind
            )));
        }
        if e.refs == 1 {
            let s = self.v2p_mut(p, level)?;
            let buf = self.cache.buf_mut(s);
            for i in 0..V2P_FANOUT {
                let raw = V2pEntry::raw_at(buf, i);
                V2pEntry::put_raw_at(buf, i, raw & !crate::format::V2P_WRITABLE);
            }
            return Ok(p);
        }
        let c = self.copy_node(p, level)?;
        self.drop_ref(p, BlockKind::Node(level))?;
        Ok(c)
    }

    /// A new node holding node `p`'s pointers, all read-only, each target gaining a reference.
    fn copy_node(&mut self, p: u64, level: u8) -> Result<u64> {
        let mut buf = self.take_scratch();
        let s = self.v2p_get(p, level)?;
        buf.copy_from_slice(self.cache.buf(s));
        for i in 0..V2P_FANOUT {
            let e = V2pEntry::decode(V2pEntry::raw_at(&buf[..], i))
                .map_err(|e| e.within(format_args!("V2P node {p}, entry {i}")))?;
            if e.phys != 0 {
                self.add_ref(e.phys, child_kind(level))?;
                V2pEntry::put_raw_at(&mut buf[..], i, e.phys);
            }
        }
        let c = self.v2p_new(level, Some(&buf[..]))?;
        self.give_scratch(buf);
        Ok(c)
    }

    fn add_ref(&mut self, p: u64, kind: BlockKind) -> Result<()> {
        self.p2m_update(p, |e| {
            if e.kind != kind {
                return Err(Error::Corrupt(format!(
                    "physical block {p} should be {kind:?}, but its P2M entry says {:?}",
                    e.kind
                )));
            }
            e.refs = e.refs.checked_add(1).ok_or_else(|| {
                Error::NoSpace(format!("physical block {p} has too many references"))
            })?;
            Ok(())
        })
    }

    /// Drops a reference to physical block `p`, which must be of `kind`; frees it (and, for a
    /// node, drops its own references) when it was the last. Returns the data blocks freed.
    pub(crate) fn drop_ref(&mut self, p: u64, kind: BlockKind) -> Result<u64> {
        let e = self.p2m_get(p)?;
        if e.kind != kind {
            return Err(Error::Corrupt(format!(
                "physical block {p} should be {kind:?}, but its P2M entry says {:?}",
                e.kind
            )));
        }
        if e.refs > 1 {
            return self
                .p2m_update(p, |e| {
                    e.refs -= 1;
                    Ok(())
                })
                .map(|_| 0);
        }
        let mut freed = 0;
        match kind {
            BlockKind::Node(level) => {
                let mut buf = self.take_scratch();
                let s = self.v2p_get(p, level)?;
                buf.copy_from_slice(self.cache.buf(s));
                for i in 0..V2P_FANOUT {
                    let c = V2pEntry::decode(V2pEntry::raw_at(&buf[..], i))
                        .map_err(|e| e.within(format_args!("V2P node {p}, entry {i}")))?;
                    if c.phys != 0 {
                        freed += self.drop_ref(c.phys, child_kind(level))?;
                    }
                }
                self.give_scratch(buf);
                if let Some(s) = self.cache.peek(crate::cache::Key::v2p(p)) {
                    self.cache.remove(s);
                }
                self.v2p_epoch += 1;
                self.free_machine(e.machine, 1);
                self.tick("freeing", 1);
            }
            _ => {
                self.free_machine(e.machine, self.sb.data_run());
                freed = 1;
            }
        }
        self.p2m_set(p, crate::format::P2mEntry::FREE)?;
        self.free_phys(p);
        Ok(freed)
    }

    /// Reads `buf.len()` bytes at `offset` of volume `vol` (through the store).
    pub fn read_at(&mut self, vol: VolumeId, mut offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let ext = self.map_read(vol, offset, (buf.len() - done) as u64)?;
            let n = ext.len as usize;
            let part = &mut buf[done..done + n];
            match ext.machine {
                None => part.fill(0),
                Some(m) => self
                    .backing
                    .read_at(part, m)
                    .map_err(|e| Error::io(format!("reading data at store offset {m}"), e))?,
            }
            done += n;
            offset += n as u64;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` of volume `vol` (through the store). Durable after the next
    /// [`Image::flush`].
    pub fn write_at(&mut self, vol: VolumeId, mut offset: u64, buf: &[u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let ext = self.map_write(vol, offset, (buf.len() - done) as u64)?;
            let n = ext.len as usize;
            let m = ext.machine.unwrap_or(0);
            if let Err(e) = self.backing.write_at(&buf[done..done + n], m) {
                // The blocks are mapped now: stop rather than let them show stale bytes.
                let e = Error::io(format!("writing data at store offset {m}"), e);
                self.stop(e.to_string());
                return Err(e);
            }
            done += n;
            offset += n as u64;
        }
        Ok(())
    }

    /// Frees the whole data blocks inside `len` bytes at `offset` of volume `vol` (they read as
    /// zeroes afterwards; partly covered blocks keep their content). Returns the data blocks
    /// given back to the store.
    pub fn discard(&mut self, vol: VolumeId, offset: u64, len: u64) -> Result<u64> {
        let (root, kind) = self.root_of(vol)?;
        self.writable()?;
        if kind == VolumeKind::Snapshot {
            return Err(Error::ReadOnly(format!(
                "snapshot '{}'",
                self.volume_info(vol)?.name
            )));
        }
        self.check_range(offset, len)?;
        let bs = self.sb.data_block();
        let start = offset.div_ceil(bs);
        let end = (offset + len) / bs;
        if start >= end {
            return Ok(0);
        }
        let top = self.sb.v2p_levels - 1;
        self.guard(|img| img.discard_node(root, top, 0, start, end))
    }

    /// Makes `len` bytes at `offset` of volume `vol` read as zeroes: the whole blocks are
    /// discarded (freed), the parts of blocks at either end written with zeroes (through the
    /// store, synchronously). A zero-length range does nothing.
    pub fn write_zeroes(&mut self, vol: VolumeId, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.sb.virtual_size)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "range of {len} bytes at {offset} is beyond the disk size {}",
                    self.sb.virtual_size
                ))
            })?;
        if len == 0 {
            return Ok(());
        }
        let bs = self.sb.data_block();
        let first = offset.div_ceil(bs) * bs;
        let last = end / bs * bs;
        if first >= last {
            return self.write_zero_bytes(vol, offset, end);
        }
        self.write_zero_bytes(vol, offset, first)?;
        self.discard(vol, first, last - first)?;
        self.write_zero_bytes(vol, last, end)
    }

    fn write_zero_bytes(&mut self, vol: VolumeId, from: u64, to: u64) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        // Less than one data block (the ends of a range). Not a hot path: discards are rare.
        let zeroes = vec![0u8; (to - from) as usize];
        self.write_at(vol, from, &zeroes)
    }

    fn discard_node(
        &mut self,
        node: u64,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
    ) -> Result<u64> {
        let span = 1u64 << (V2P_BITS * level as u32);
        let i0 = ((start - base) / span) as usize;
        let i1 = ((end - 1 - base) / span) as usize;
        let mut freed = 0;
        for i in i0..=i1.min(V2P_FANOUT - 1) {
            let cb = base + i as u64 * span;
            let ce = cb + span;
            let e = self.v2p_entry(node, level, i)?;
            if e.phys == 0 {
                continue;
            }
            if start <= cb && ce <= end {
                self.set_v2p_entry(node, level, i, V2pEntry::NONE)?;
                freed += self.drop_ref(e.phys, child_kind(level))?;
            } else {
                let c = if e.writable {
                    e.phys
                } else {
                    let c = self.make_private(e.phys, level - 1)?;
                    self.set_v2p_entry(
                        node,
                        level,
                        i,
                        V2pEntry {
                            phys: c,
                            writable: true,
                        },
                    )?;
                    c
                };
                freed += self.discard_node(c, level - 1, cb, start.max(cb), end.min(ce))?;
            }
        }
        Ok(freed)
    }

    /// Takes a read-only snapshot of volume `vol` named `name`. Constant time: one node is
    /// copied. Durable with the next [`Image::flush`].
    pub fn snapshot(&mut self, vol: VolumeId, name: &str) -> Result<VolumeId> {
        self.take_copy(vol, name, VolumeKind::Snapshot)
    }

    /// Makes a new writable disk named `name` sharing every block with volume `vol` (usually
    /// a snapshot). Constant time. Durable with the next [`Image::flush`].
    pub fn clone_volume(&mut self, vol: VolumeId, name: &str) -> Result<VolumeId> {
        self.take_copy(vol, name, VolumeKind::Disk)
    }

    fn take_copy(&mut self, vol: VolumeId, name: &str, kind: VolumeKind) -> Result<VolumeId> {
        self.writable()?;
        let (root, src_kind) = self.root_of(vol)?;
        self.check_new_name(name)?;
        let top = self.sb.v2p_levels - 1;
        self.guard(|img| {
            let copy = img.copy_node(root, top)?;
            if src_kind == VolumeKind::Disk {
                // Every block below is shared now: the source's pointers become read-only.
                let s = img.v2p_mut(root, top)?;
                let buf = img.cache.buf_mut(s);
                for i in 0..V2P_FANOUT {
                    let raw = V2pEntry::raw_at(buf, i);
                    V2pEntry::put_raw_at(buf, i, raw & !crate::format::V2P_WRITABLE);
                }
            }
            img.add_volume(name, copy, kind, vol.0)
        })
    }

    /// Deletes volume `vol`, freeing every block only it referenced (given back to the store
    /// by the next [`Image::flush`]). Returns the data blocks freed.
    pub fn delete(&mut self, vol: VolumeId) -> Result<u64> {
        self.writable()?;
        let (root, _) = self.root_of(vol)?;
        let top = self.sb.v2p_levels - 1;
        self.guard(|img| {
            img.volumes.retain(|v| v.id != vol.0);
            img.volumes_dirty = true;
            img.changed = true;
            img.drop_ref(root, BlockKind::Node(top))
        })
    }

    /// Renames volume `vol`.
    pub fn rename(&mut self, vol: VolumeId, name: &str) -> Result<()> {
        self.writable()?;
        self.root_of(vol)?;
        self.check_new_name(name)?;
        if let Some(v) = self.volumes.iter_mut().find(|v| v.id == vol.0) {
            v.name = name.to_string();
        }
        self.volumes_dirty = true;
        self.changed = true;
        Ok(())
    }

    /// Space volume `vol` uses (walks its whole tree).
    pub fn usage(&mut self, vol: VolumeId) -> Result<Usage> {
        let (root, _) = self.root_of(vol)?;
        let top = self.sb.v2p_levels - 1;
        self.guard(|img| {
            let mut u = Usage::default();
            img.usage_node(root, top, true, &mut u)?;
            Ok(u)
        })
    }

    fn usage_node(&mut self, p: u64, level: u8, exclusive: bool, u: &mut Usage) -> Result<()> {
        let refs = self.p2m_get(p)?.refs;
        let exclusive = exclusive && refs == 1;
        u.nodes += 1;
        self.tick("walking", 1);
        let mut buf = self.take_scratch();
        let s = self.v2p_get(p, level)?;
        buf.copy_from_slice(self.cache.buf(s));
        for i in 0..V2P_FANOUT {
            let e = V2pEntry::decode(V2pEntry::raw_at(&buf[..], i))
                .map_err(|e| e.within(format_args!("V2P node {p}, entry {i}")))?;
            if e.phys == 0 {
                continue;
            }
            if level == 0 {
                u.mapped_blocks += 1;
                if exclusive {
                    let d = self.p2m_get(e.phys)?;
                    if d.kind != BlockKind::Data {
                        return Err(Error::Corrupt(format!(
                            "physical block {} should be a data block",
                            e.phys
                        )));
                    }
                    if d.refs == 1 {
                        u.exclusive_blocks += 1;
                    }
                }
            } else {
                self.usage_node(e.phys, level - 1, exclusive, u)?;
            }
        }
        self.give_scratch(buf);
        Ok(())
    }

    /// Calls `f(physical, machine)` for every data block of volume `vol`, in virtual order.
    fn for_each_block(
        &mut self,
        root: u64,
        f: &mut dyn FnMut(&mut Self, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let top = self.sb.v2p_levels - 1;
        self.for_each_below(root, top, f)
    }

    /// [`Image::for_each_block`] below node `p` of `level` (depth first, in virtual order).
    fn for_each_below(
        &mut self,
        p: u64,
        level: u8,
        f: &mut dyn FnMut(&mut Self, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut buf = self.take_scratch();
        let s = self.v2p_get(p, level)?;
        buf.copy_from_slice(self.cache.buf(s));
        for i in 0..V2P_FANOUT {
            let e = V2pEntry::decode(V2pEntry::raw_at(&buf[..], i))
                .map_err(|e| e.within(format_args!("V2P node {p}, entry {i}")))?;
            if e.phys == 0 {
                continue;
            }
            if level == 0 {
                let m = self.data_machine(e.phys)?;
                f(self, e.phys, m)?;
            } else {
                self.for_each_below(e.phys, level - 1, f)?;
            }
        }
        self.give_scratch(buf);
        Ok(())
    }

    /// Machine-contiguous runs of volume `vol`'s data, in virtual order.
    pub fn extents(&mut self, vol: VolumeId) -> Result<u64> {
        let (root, _) = self.root_of(vol)?;
        let run = self.sb.data_run();
        self.guard(|img| {
            let mut n = 0;
            let mut prev: Option<u64> = None;
            img.for_each_block(root, &mut |_, _, m| {
                if prev != Some(m.wrapping_sub(run)) {
                    n += 1;
                }
                prev = Some(m);
                Ok(())
            })?;
            Ok(n)
        })
    }

    /// Moves volume `vol`'s data blocks, in virtual order, into one contiguous run of the
    /// store. Only P2M entries change: every V2P tree, including those of snapshots and
    /// clones sharing the blocks, stays as it was. Commits as it goes.
    pub fn defrag(&mut self, vol: VolumeId) -> Result<DefragReport> {
        self.writable()?;
        let (root, _) = self.root_of(vol)?;
        let before = self.extents(vol)?;
        let mapped = self.usage(vol)?.mapped_blocks;
        let run = self.sb.data_run();
        self.guard(|img| {
            img.commit()?;
            img.drop_data_reservation();
            let need = mapped * run;
            let limit = img.sb.store_blocks;
            let region =
                match img.find_free(crate::cache::Tree::Mfree, 2, limit, need, need, run)? {
                    Some(r) if need > 0 => r,
                    _ => img.extend(crate::cache::Tree::Mfree, need.max(run), run)?,
                };
            img.set_data_reservation(Range {
                start: region.start,
                end: region.start + need.max(run),
            });
            let mut moved = 0u64;
            img.for_each_block(root, &mut |img, p, m| {
                let to = img.alloc_data()?;
                img.copy_data(m, to)?;
                img.p2m_update(p, |e| {
                    e.machine = to;
                    Ok(())
                })?;
                img.free_machine(m, run);
                moved += 1;
                img.tick("moving", 1);
                if moved.is_multiple_of(4096) {
                    img.commit()?;
                }
                Ok(())
            })?;
            img.commit()?;
            Ok(moved)
        })
        .and_then(|moved| {
            Ok(DefragReport {
                moved,
                extents_before: before,
                extents_after: self.extents(vol)?,
            })
        })
    }

    /// Reports `n` more units of `what` to the progress callback, if one is set.
    pub(crate) fn tick(&mut self, what: &'static str, n: u64) {
        if let Some(p) = self.progress.as_mut() {
            p.done += n;
            if p.done % 1024 == 0 || p.done < 1024 && p.done.is_power_of_two() {
                (p.f)(what, p.done, p.total);
            }
        }
    }
}

// Keep the 4 KiB node size and the 512-entry fanout in step.
const _: () = assert!(V2P_FANOUT * 8 == BLOCK);
