//! Metadata nodes through the cache: finding, loading, changing, moving and writing them.
//!
//! Every node access goes through here and touches one node at a time: a caller gets a slot,
//! reads or changes its bytes, and makes its next call. Any call may evict nodes (a dirty one
//! is written to its fresh block and its parent pointer takes the new checksum), so a slot
//! index is only used until the next call. This is what lets the cache work with a single
//! slot.
//!
//! Changing a node that is not fresh moves it first ([`Image::tree_mut`], [`Image::v2p_mut`]):
//! allocate a block, make the parent fresh, point the parent at the new block, and keep the
//! node's bytes (cached, or read once more from the old block, which stays intact until the
//! commit). A node that is not fresh has no fresh descendants, so nothing else touches it
//! while it moves.

use crate::backing::Backing;
use crate::cache::{Key, KeyKind, Tree};
use crate::error::{Error, Result};
use crate::format::{
    self, tree_capacity, BlockKind, P2mEntry, PtrKind, TreePtr, V2pEntry, BLOCK_SHIFT,
    MAX_TREE_LEVELS, P2M_LEAF_BITS, TREE_BITS,
};
use crate::image::Image;

fn ptr_kind(t: Tree) -> PtrKind {
    match t {
        Tree::P2m => PtrKind::P2m,
        Tree::Mfree | Tree::Pfree => PtrKind::Bitmap,
    }
}

pub(crate) fn tree_name(t: Tree) -> &'static str {
    match t {
        Tree::P2m => "P2M",
        Tree::Mfree => "machine bitmap",
        Tree::Pfree => "physical bitmap",
    }
}

fn describe(key: Key) -> String {
    match key.decode() {
        KeyKind::V2p(p) => format!("V2P node {p}"),
        KeyKind::Tree(t, l, i) => format!("{} node {i} of level {l}", tree_name(t)),
    }
}

fn internal(msg: String) -> Error {
    Error::Corrupt(format!("internal inconsistency: {msg}"))
}

impl<B: Backing> Image<B> {
    /// A free slot, evicting (and writing back) as needed.
    pub(crate) fn slot_for(&mut self) -> Result<u32> {
        loop {
            if let Some(s) = self.cache.take_free() {
                return Ok(s);
            }
            let v = self
                .cache
                .lru()
                .ok_or_else(|| internal("no slot to evict".into()))?;
            if self.cache.slot(v).dirty {
                // Writing it back may load its parent, which may take this very slot.
                self.writeback(v)?;
                continue;
            }
            self.cache.evict(v);
        }
    }

    /// A slot for a node that is not cached and cannot become cached while room is made.
    fn new_slot(&mut self, key: Key) -> Result<u32> {
        let s = self.slot_for()?;
        if self.cache.peek(key).is_some() {
            self.cache.release(s);
            return Err(internal(format!(
                "{} appeared while being created",
                describe(key)
            )));
        }
        Ok(s)
    }

    /// Writes the dirty node in slot `s` to its block and gives its parent the checksum.
    pub(crate) fn writeback(&mut self, s: u32) -> Result<()> {
        let slot = *self.cache.slot(s);
        if !slot.fresh {
            return Err(internal(format!(
                "{} changed without being moved",
                describe(slot.key)
            )));
        }
        self.backing
            .write_at(self.cache.buf(s), slot.machine << BLOCK_SHIFT)
            .map_err(|e| Error::io(format!("writing {}", describe(slot.key)), e))?;
        self.cache.slot_mut(s).dirty = false;
        self.cache.count_writeback();
        self.set_parent_crc(slot.key, slot.machine)
    }

    /// Puts into the parent pointer of `key` (at `machine`) the checksum of what the store
    /// holds for it now.
    ///
    /// The parent is found first: finding it may evict nodes, whose write-backs may change and
    /// write this node again (and set the parent themselves). So the checksum is taken after:
    /// from the cached bytes if the node is cached and clean, from the store if it is not
    /// cached, and not at all if it is dirty again (its next write-back will set it).
    fn set_parent_crc(&mut self, key: Key, machine: u64) -> Result<()> {
        enum At {
            Root(Tree),
            P2m(u32, usize),
            Tree(u32, usize, Tree),
        }
        let at = match key.decode() {
            KeyKind::V2p(p) => {
                let s = self.tree_mut(Tree::P2m, 0, p >> P2M_LEAF_BITS)?;
                At::P2m(s, (p as usize & 0xff) * 16)
            }
            KeyKind::Tree(t, level, index) => {
                if level + 1 >= self.tree_levels(t) {
                    At::Root(t)
                } else {
                    let s = self.tree_mut(t, level + 1, index >> TREE_BITS)?;
                    At::Tree(s, (index as usize & 0xff) * 16, t)
                }
            }
        };
        let crc = match self.cache.peek(key) {
            Some(s) if self.cache.slot(s).machine == machine => {
                if self.cache.slot(s).dirty {
                    return Ok(());
                }
                format::crc32c(self.cache.buf(s))
            }
            Some(_) => return Err(internal(format!("{} moved twice", describe(key)))),
            None => {
                let mut b = self.take_scratch();
                self.backing
                    .read_at(&mut b[..], machine << BLOCK_SHIFT)
                    .map_err(|e| Error::io(format!("reading back {}", describe(key)), e))?;
                let crc = format::crc32c(&b[..]);
                self.give_scratch(b);
                crc
            }
        };
        let mismatch = || {
            internal(format!(
                "the pointer to {} does not lead to machine block {machine}",
                describe(key)
            ))
        };
        match at {
            At::Root(t) => {
                let r = self.root_ptr_mut(t);
                if r.machine != machine {
                    return Err(mismatch());
                }
                r.crc = crc;
                self.changed = true;
            }
            At::P2m(s, off) => {
                let buf = self.cache.buf_mut(s);
                let mut e =
                    P2mEntry::decode(&buf[off..off + 16]).map_err(|e| e.within(describe(key)))?;
                if e.machine != machine || !matches!(e.kind, BlockKind::Node(_)) {
                    return Err(mismatch());
                }
                e.crc = crc;
                e.encode(&mut buf[off..off + 16]);
            }
            At::Tree(s, off, t) => {
                let buf = self.cache.buf_mut(s);
                let mut p = TreePtr::decode(&buf[off..off + 16], ptr_kind(t))
                    .map_err(|e| e.within(describe(key)))?;
                if p.machine != machine {
                    return Err(mismatch());
                }
                p.crc = crc;
                p.encode(ptr_kind(t), &mut buf[off..off + 16]);
            }
        }
        Ok(())
    }

    /// Reads `key` from machine block `machine` into a slot, checking it against `crc` (no
    /// check for fresh blocks, which this process wrote in this epoch).
    fn load(&mut self, key: Key, machine: u64, crc: Option<u32>) -> Result<u32> {
        if machine < 2 || machine >= self.sb.store_blocks {
            return Err(Error::Corrupt(format!(
                "{} at machine block {machine} is outside the store ({} blocks)",
                describe(key),
                self.sb.store_blocks
            )));
        }
        let s = self.slot_for()?;
        // Making room may have written back a child of this node, which loads it.
        if let Some(have) = self.cache.peek(key) {
            self.cache.release(s);
            return Ok(have);
        }
        let r = self
            .backing
            .read_at(self.cache.buf_mut(s), machine << BLOCK_SHIFT);
        if let Err(e) = r {
            self.cache.release(s);
            return Err(Error::io(format!("reading {}", describe(key)), e));
        }
        self.cache.count_miss(key);
        if let Some(crc) = crc {
            let got = format::crc32c(self.cache.buf(s));
            if got != crc {
                self.cache.release(s);
                return Err(Error::Corrupt(format!(
                    "{} at machine block {machine}: checksum mismatch (expected {crc:#010x}, found {got:#010x})",
                    describe(key)
                )));
            }
        }
        let fresh = self.fresh.contains(&machine);
        self.cache.install(s, key, machine, false, fresh);
        Ok(s)
    }

    /// The pointer to tree node `(level, index)`: in its parent, or the root pointer.
    fn tree_ptr_of(&mut self, t: Tree, level: u8, index: u64) -> Result<TreePtr> {
        let levels = self.tree_levels(t);
        if level + 1 >= levels {
            if level + 1 > levels || index != 0 {
                return Ok(TreePtr::NULL);
            }
            return Ok(self.root_ptr(t));
        }
        match self.tree_get(t, level + 1, index >> TREE_BITS)? {
            None => Ok(TreePtr::NULL),
            Some(s) => {
                let off = (index as usize & 0xff) * 16;
                TreePtr::decode(&self.cache.buf(s)[off..off + 16], ptr_kind(t)).map_err(|e| {
                    e.within(format_args!(
                        "{} node {} of level {}, entry {}",
                        tree_name(t),
                        index >> TREE_BITS,
                        level + 1,
                        index & 0xff
                    ))
                })
            }
        }
    }

    /// A cached tree node (P2M leaves through their hint).
    #[inline]
    fn cached(&mut self, t: Tree, level: u8, key: Key) -> Option<u32> {
        if t == Tree::P2m && level == 0 {
            self.cache.lookup_hinted(key, &mut self.hint_p2m)
        } else {
            self.cache.lookup(key)
        }
    }

    /// Tree node `(level, index)` for reading; `None` if it does not exist (all zero).
    pub(crate) fn tree_get(&mut self, t: Tree, level: u8, index: u64) -> Result<Option<u32>> {
        let key = Key::tree(t, level, index);
        if let Some(s) = self.cached(t, level, key) {
            return Ok(Some(s));
        }
        let ptr = self.tree_ptr_of(t, level, index)?;
        if ptr.is_null() {
            return Ok(None);
        }
        let crc = (!self.fresh.contains(&ptr.machine)).then_some(ptr.crc);
        self.load(key, ptr.machine, crc).map(Some)
    }

    /// Tree node `(level, index)` for changing: created if absent, moved if not fresh, marked
    /// dirty.
    pub(crate) fn tree_mut(&mut self, t: Tree, level: u8, index: u64) -> Result<u32> {
        let key = Key::tree(t, level, index);
        if let Some(s) = self.cached(t, level, key) {
            if self.cache.slot(s).fresh {
                self.cache.slot_mut(s).dirty = true;
                self.changed = true;
                return Ok(s);
            }
        }
        self.writable()?;
        let shift = Self::leaf_bits(t) + TREE_BITS * level as u32;
        self.grow_tree(t, (index << shift) + 1)?;
        let mut spare = None;
        let r = self.tree_mut_slow(t, level, index, key, &mut spare);
        if let Some(m) = spare {
            self.free_machine(m, 1);
        }
        r
    }

    fn tree_mut_slow(
        &mut self,
        t: Tree,
        level: u8,
        index: u64,
        key: Key,
        spare: &mut Option<u64>,
    ) -> Result<u32> {
        loop {
            let ptr = self.tree_ptr_of(t, level, index)?;
            if !ptr.is_null() && self.fresh.contains(&ptr.machine) {
                let s = match self.cache.peek(key) {
                    Some(s) => s,
                    None => self.load(key, ptr.machine, None)?,
                };
                let slot = self.cache.slot_mut(s);
                slot.dirty = true;
                slot.fresh = true;
                self.changed = true;
                return Ok(s);
            }
            let Some(m) = *spare else {
                // Allocating may reserve space, which may change this very node: look again.
                *spare = Some(self.alloc_meta()?);
                continue;
            };
            if level + 1 < self.tree_levels(t) {
                self.tree_mut(t, level + 1, index >> TREE_BITS)?;
                if self.tree_ptr_of(t, level, index)? != ptr {
                    continue;
                }
            }
            // The parent is fresh and nothing else will touch this node until it is in place.
            *spare = None;
            self.set_tree_ptr(t, level, index, TreePtr { machine: m, crc: 0 })?;
            let s = if ptr.is_null() {
                let s = self.new_slot(key)?;
                self.cache.buf_mut(s).fill(0);
                self.cache.install(s, key, m, true, true);
                s
            } else {
                let s = match self.cache.peek(key) {
                    Some(s) => s,
                    None => self.load(key, ptr.machine, Some(ptr.crc))?,
                };
                let slot = self.cache.slot_mut(s);
                slot.machine = m;
                slot.dirty = true;
                slot.fresh = true;
                self.free_machine(ptr.machine, 1);
                s
            };
            self.changed = true;
            return Ok(s);
        }
    }

    fn set_tree_ptr(&mut self, t: Tree, level: u8, index: u64, ptr: TreePtr) -> Result<()> {
        if level + 1 >= self.tree_levels(t) {
            *self.root_ptr_mut(t) = ptr;
            self.changed = true;
            return Ok(());
        }
        let s = self.tree_mut(t, level + 1, index >> TREE_BITS)?;
        let off = (index as usize & 0xff) * 16;
        ptr.encode(ptr_kind(t), &mut self.cache.buf_mut(s)[off..off + 16]);
        Ok(())
    }

    /// Adds levels on top of `t` until it covers `items` items.
    pub(crate) fn grow_tree(&mut self, t: Tree, items: u64) -> Result<()> {
        while tree_capacity(self.tree_levels(t), Self::leaf_bits(t)) < items {
            let levels = self.tree_levels(t);
            if levels >= MAX_TREE_LEVELS {
                return Err(Error::NoSpace(format!(
                    "the {} tree cannot grow beyond {MAX_TREE_LEVELS} levels",
                    tree_name(t)
                )));
            }
            let m = self.alloc_meta()?;
            if self.tree_levels(t) != levels {
                self.free_machine(m, 1);
                continue;
            }
            let s = self.new_slot(Key::tree(t, levels, 0))?;
            let old = self.root_ptr(t);
            let buf = self.cache.buf_mut(s);
            buf.fill(0);
            old.encode(ptr_kind(t), &mut buf[..16]);
            self.cache
                .install(s, Key::tree(t, levels, 0), m, true, true);
            *self.root_ptr_mut(t) = TreePtr { machine: m, crc: 0 };
            *self.tree_levels_mut(t) = levels + 1;
            self.changed = true;
        }
        Ok(())
    }

    /// The P2M entry of physical block `p`.
    pub(crate) fn p2m_get(&mut self, p: u64) -> Result<P2mEntry> {
        if p == 0 || p >= self.sb.phys_limit {
            return Err(Error::Corrupt(format!(
                "physical block {p} is outside 1..{}",
                self.sb.phys_limit
            )));
        }
        let Some(s) = self.tree_get(Tree::P2m, 0, p >> P2M_LEAF_BITS)? else {
            return Ok(P2mEntry::FREE);
        };
        self.p2m_entry_in(s, p)
    }

    /// Entry `p` of the P2M leaf in slot `s`, checked.
    #[inline]
    pub(crate) fn p2m_entry_in(&self, s: u32, p: u64) -> Result<P2mEntry> {
        let off = (p as usize & 0xff) * 16;
        let e = P2mEntry::decode(&self.cache.buf(s)[off..off + 16])
            .map_err(|e| e.within(format_args!("P2M entry of physical block {p}")))?;
        let len = match e.kind {
            BlockKind::Free => return Ok(e),
            BlockKind::Data => self.sb.data_run(),
            BlockKind::Node(_) => 1,
        };
        if e.machine.saturating_add(len) > self.sb.store_blocks
            || (e.kind == BlockKind::Data && e.machine % len != 0)
        {
            return Err(Error::Corrupt(format!(
                "P2M entry of physical block {p} points at machine block {}, outside the store or misaligned",
                e.machine
            )));
        }
        Ok(e)
    }

    /// Changes the P2M entry of physical block `p` with `f`.
    pub(crate) fn p2m_update(
        &mut self,
        p: u64,
        f: impl FnOnce(&mut P2mEntry) -> Result<()>,
    ) -> Result<()> {
        if p == 0 || p >= self.sb.phys_limit {
            return Err(Error::Corrupt(format!(
                "physical block {p} is outside 1..{}",
                self.sb.phys_limit
            )));
        }
        let s = self.tree_mut(Tree::P2m, 0, p >> P2M_LEAF_BITS)?;
        let off = (p as usize & 0xff) * 16;
        let buf = self.cache.buf_mut(s);
        let mut e = P2mEntry::decode(&buf[off..off + 16])
            .map_err(|e| e.within(format_args!("P2M entry of physical block {p}")))?;
        f(&mut e)?;
        e.encode(&mut buf[off..off + 16]);
        Ok(())
    }

    /// Sets the P2M entry of physical block `p`.
    pub(crate) fn p2m_set(&mut self, p: u64, e: P2mEntry) -> Result<()> {
        self.p2m_update(p, |x| {
            *x = e;
            Ok(())
        })
    }

    /// V2P node `p` (of `level`) for reading.
    pub(crate) fn v2p_get(&mut self, p: u64, level: u8) -> Result<u32> {
        let key = Key::v2p(p);
        if let Some(s) = self.cache.lookup_hinted(key, &mut self.hint_v2p) {
            return Ok(s);
        }
        let e = self.node_entry(p, level)?;
        let crc = (!self.fresh.contains(&e.machine)).then_some(e.crc);
        self.load(key, e.machine, crc)
    }

    fn node_entry(&mut self, p: u64, level: u8) -> Result<P2mEntry> {
        let e = self.p2m_get(p)?;
        if e.kind != BlockKind::Node(level) {
            return Err(Error::Corrupt(format!(
                "physical block {p} should be a V2P node of level {level}, but its P2M entry says {:?}",
                e.kind
            )));
        }
        Ok(e)
    }

    /// V2P node `p` (of `level`) for changing: moved if not fresh, marked dirty.
    pub(crate) fn v2p_mut(&mut self, p: u64, level: u8) -> Result<u32> {
        let key = Key::v2p(p);
        if level > 0 {
            self.v2p_epoch += 1;
        }
        if let Some(s) = self.cache.lookup_hinted(key, &mut self.hint_v2p) {
            if self.cache.slot(s).fresh {
                self.cache.slot_mut(s).dirty = true;
                self.changed = true;
                return Ok(s);
            }
        }
        self.writable()?;
        let e = self.node_entry(p, level)?;
        if self.fresh.contains(&e.machine) {
            let s = match self.cache.peek(key) {
                Some(s) => s,
                None => self.load(key, e.machine, None)?,
            };
            let slot = self.cache.slot_mut(s);
            slot.dirty = true;
            slot.fresh = true;
            self.changed = true;
            return Ok(s);
        }
        // Allocation and P2M changes never touch V2P nodes, so `e` stays right.
        let m = self.alloc_meta()?;
        self.p2m_update(p, |x| {
            x.machine = m;
            x.crc = 0;
            Ok(())
        })?;
        let s = match self.cache.peek(key) {
            Some(s) => s,
            None => self.load(key, e.machine, Some(e.crc))?,
        };
        let slot = self.cache.slot_mut(s);
        slot.machine = m;
        slot.dirty = true;
        slot.fresh = true;
        self.free_machine(e.machine, 1);
        self.changed = true;
        Ok(s)
    }

    /// A new V2P node of `level`, holding `content` (or empty), with one reference.
    pub(crate) fn v2p_new(&mut self, level: u8, content: Option<&[u8]>) -> Result<u64> {
        self.writable()?;
        let p = self.alloc_phys(true)?;
        let m = self.alloc_meta()?;
        let old = self.p2m_get(p)?;
        if old.kind != BlockKind::Free {
            return Err(Error::Corrupt(format!(
                "physical block {p} is free in the bitmap but has a P2M entry"
            )));
        }
        self.p2m_set(
            p,
            P2mEntry {
                machine: m,
                kind: BlockKind::Node(level),
                refs: 1,
                crc: 0,
            },
        )?;
        let key = Key::v2p(p);
        if let Some(s) = self.cache.peek(key) {
            self.cache.remove(s);
        }
        let s = self.new_slot(key)?;
        match content {
            Some(c) => self.cache.buf_mut(s).copy_from_slice(c),
            None => self.cache.buf_mut(s).fill(0),
        }
        self.cache.install(s, key, m, true, true);
        self.changed = true;
        Ok(p)
    }

    /// A new data block with one reference: `(physical, machine)`.
    pub(crate) fn data_new(&mut self) -> Result<(u64, u64)> {
        let p = self.alloc_phys(false)?;
        let m = self.alloc_data()?;
        let old = self.p2m_get(p)?;
        if old.kind != BlockKind::Free {
            return Err(Error::Corrupt(format!(
                "physical block {p} is free in the bitmap but has a P2M entry"
            )));
        }
        self.p2m_set(
            p,
            P2mEntry {
                machine: m,
                kind: BlockKind::Data,
                refs: 1,
                crc: 0,
            },
        )?;
        Ok((p, m))
    }

    /// Entry `i` of V2P node `p` (of `level`).
    #[inline]
    pub(crate) fn v2p_entry(&mut self, p: u64, level: u8, i: usize) -> Result<V2pEntry> {
        let s = self.v2p_get(p, level)?;
        V2pEntry::decode(V2pEntry::raw_at(self.cache.buf(s), i))
            .map_err(|e| e.within(format_args!("V2P node {p}, entry {i}")))
    }

    /// Sets entry `i` of V2P node `p` (of `level`).
    pub(crate) fn set_v2p_entry(&mut self, p: u64, level: u8, i: usize, e: V2pEntry) -> Result<()> {
        let s = self.v2p_mut(p, level)?;
        V2pEntry::put_raw_at(self.cache.buf_mut(s), i, e.encode());
        Ok(())
    }
}
