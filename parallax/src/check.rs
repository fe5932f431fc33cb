//! `check`: verifies the last commit of an image and reports in plain words.
//!
//! It reads the store directly (not through an open image's cache) and verifies:
//!
//! - both superblock copies, and that the current one fits the store;
//! - every node of the P2M and both bitmap trees and every volume-table block: in the store,
//!   used once, and matching the checksum in the pointer that leads to it;
//! - every P2M entry: a known kind, a machine location inside the store, aligned, used once;
//! - every volume's V2P tree: node checksums (from the P2M entries), entry formats, that each
//!   pointer leads to a block of the right kind and level, and that a pointer reached through
//!   writable pointers only, and itself writable, is its target's only reference;
//! - reference counts: each physical block's count equals the pointers found to it, and no
//!   allocated block is unreferenced;
//! - both bitmaps: every block in use is marked, every marked block is in use (or reserved),
//!   and the used counts in the superblock match.
//!
//! Memory: about 9 bytes per physical block plus a bit per machine block.

use std::collections::HashMap;
use std::fmt;

use crate::backing::Backing;
use crate::error::{Error, Result};
use crate::format::{
    self, decode_volume_block, BlockKind, P2mEntry, PtrKind, Superblock, TreePtr, V2pEntry,
    VolumeKind, BLOCK, BLOCK_SHIFT, P2M_LEAF_BITS, TREE_BITS, V2P_FANOUT,
};
use crate::superblocks;

/// A progress callback for [`check()`]: what is being checked, units done, units in all.
pub type CheckProgress<'a> = &'a mut dyn FnMut(&str, u64, u64);

/// Most problems listed one by one; the rest are counted.
const MAX_LISTED: usize = 100;

/// What [`check()`] found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CheckReport {
    /// What each superblock copy holds, in words.
    pub superblocks: [String; 2],
    /// Generation of the current commit.
    pub generation: u64,
    /// Virtual size of the volumes.
    pub virtual_size: u64,
    /// Data block size.
    pub block_size: u64,
    /// Writable disks.
    pub disks: u64,
    /// Snapshots.
    pub snapshots: u64,
    /// Data blocks in use.
    pub data_blocks: u64,
    /// V2P nodes in use.
    pub v2p_nodes: u64,
    /// P2M and bitmap tree nodes.
    pub tree_nodes: u64,
    /// Volume-table blocks.
    pub volume_table_blocks: u64,
    /// Machine blocks in the store.
    pub store_blocks: u64,
    /// Machine blocks reserved for allocation (marked used, holding nothing yet).
    pub reserved_blocks: u64,
    /// The problems, in plain words (at most 100).
    pub problems: Vec<String>,
    /// Problems beyond those listed.
    pub unlisted: u64,
}

impl CheckReport {
    /// Whether no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Problems in all.
    pub fn problem_count(&self) -> u64 {
        self.problems.len() as u64 + self.unlisted
    }

    fn problem(&mut self, p: String) {
        if self.problems.len() < MAX_LISTED {
            self.problems.push(p);
        } else {
            self.unlisted += 1;
        }
    }
}

fn mib(blocks: u64, size: u64) -> String {
    format!("{:.1} MiB", (blocks * size) as f64 / (1 << 20) as f64)
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "generation {}: {} disk(s) and {} snapshot(s) of {} bytes in {}-byte blocks",
            self.generation, self.disks, self.snapshots, self.virtual_size, self.block_size
        )?;
        writeln!(
            f,
            "{} data blocks ({}), {} V2P nodes, {} P2M and bitmap nodes, {} volume-table blocks",
            self.data_blocks,
            mib(self.data_blocks, self.block_size),
            self.v2p_nodes,
            self.tree_nodes,
            self.volume_table_blocks
        )?;
        writeln!(
            f,
            "store: {} blocks ({}), {} reserved for allocation",
            self.store_blocks,
            mib(self.store_blocks, BLOCK as u64),
            self.reserved_blocks
        )?;
        writeln!(f, "superblock copy 0: {}", self.superblocks[0])?;
        writeln!(f, "superblock copy 1: {}", self.superblocks[1])?;
        if self.is_clean() {
            write!(f, "no problems found")
        } else {
            for p in &self.problems {
                writeln!(f, "problem: {p}")?;
            }
            if self.unlisted > 0 {
                writeln!(f, "... and {} more problems", self.unlisted)?;
            }
            write!(f, "{} problem(s) found", self.problem_count())
        }
    }
}

/// A growable bit set.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u64) -> Bits {
        Bits(vec![0; n.div_ceil(64) as usize])
    }
    fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn set(&mut self, i: u64) {
        if let Some(w) = self.0.get_mut((i / 64) as usize) {
            *w |= 1 << (i % 64);
        }
    }
}

/// Describes a run of block numbers.
fn run(start: u64, len: u64) -> String {
    if len == 1 {
        format!("block {start}")
    } else {
        format!("blocks {start}..{}", start + len)
    }
}

/// Reports runs of `i` in `0..n` for which `pred` holds, as `what(run)`.
fn report_runs(
    r: &mut CheckReport,
    n: u64,
    mut pred: impl FnMut(u64) -> bool,
    what: impl Fn(String) -> String,
) {
    let mut i = 0;
    while i < n {
        if pred(i) {
            let s = i;
            while i < n && pred(i) {
                i += 1;
            }
            r.problem(what(run(s, i - s)));
        } else {
            i += 1;
        }
    }
}

struct Checker<'a, B: Backing> {
    backing: &'a B,
    sb: Superblock,
    r: CheckReport,
    /// Machine blocks claimed by something.
    used: Bits,
    /// Bitmaps as found.
    mfree: Bits,
    pfree: Bits,
    /// Per physical block: kind code (0 free, 1 data, 0x10+L node) and stored references.
    kind: Vec<u8>,
    refs: Vec<u32>,
    /// References found, saturating at u32::MAX.
    found: Vec<u32>,
    /// Where V2P nodes are: (machine, checksum).
    nodes: HashMap<u64, (u64, u32)>,
    progress: Option<CheckProgress<'a>>,
    buf: Vec<u8>,
}

impl<B: Backing> Checker<'_, B> {
    fn claim(&mut self, start: u64, len: u64, what: &dyn Fn() -> String) -> bool {
        if start < 2 || start.saturating_add(len) > self.sb.store_blocks {
            self.r.problem(format!(
                "{} is at machine {} outside the store ({} blocks)",
                what(),
                run(start, len),
                self.sb.store_blocks
            ));
            return false;
        }
        let mut ok = true;
        for b in start..start + len {
            if self.used.get(b) {
                ok = false;
            }
            self.used.set(b);
        }
        if !ok {
            self.r.problem(format!(
                "{} uses machine {} which something else uses too",
                what(),
                run(start, len)
            ));
        }
        ok
    }

    fn read(&mut self, machine: u64, crc: Option<u32>, what: &dyn Fn() -> String) -> bool {
        let r = self.backing.read_at(&mut self.buf, machine << BLOCK_SHIFT);
        if let Err(e) = r {
            self.r.problem(format!(
                "{} at machine block {machine}: read error: {e}",
                what()
            ));
            return false;
        }
        if let Some(crc) = crc {
            let got = format::crc32c(&self.buf);
            if got != crc {
                self.r.problem(format!(
                    "{} at machine block {machine}: checksum mismatch (expected {crc:#010x}, found {got:#010x})",
                    what()
                ));
                return false;
            }
        }
        true
    }

    fn tick(&mut self, what: &str, done: u64, total: u64) {
        if let Some(p) = self.progress.as_mut() {
            p(what, done, total);
        }
    }

    /// Walks a P2M or bitmap tree; `leaf(checker, index, bytes)` sees each leaf.
    fn walk_tree(
        &mut self,
        name: &'static str,
        kind: PtrKind,
        ptr: TreePtr,
        level: u8,
        index: u64,
        leaf: &mut dyn FnMut(&mut Self, u64),
    ) {
        if ptr.is_null() {
            return;
        }
        let what = move || format!("{name} node {index} of level {level}");
        if !self.claim(ptr.machine, 1, &what) || !self.read(ptr.machine, Some(ptr.crc), &what) {
            return;
        }
        self.r.tree_nodes += 1;
        if level == 0 {
            leaf(self, index);
            return;
        }
        let node = self.buf.clone();
        for i in 0..256u64 {
            let off = i as usize * 16;
            match TreePtr::decode(&node[off..off + 16], kind) {
                Ok(p) => self.walk_tree(name, kind, p, level - 1, (index << TREE_BITS) | i, leaf),
                Err(e) => self
                    .r
                    .problem(format!("{}, pointer {i}: {}", what(), e.detail())),
            }
        }
    }

    fn bitmap_leaf(&mut self, index: u64, into_pfree: bool) {
        let base = index << format::BITMAP_LEAF_BITS;
        let limit = if into_pfree {
            self.sb.phys_limit
        } else {
            self.sb.store_blocks
        };
        for w in 0..BLOCK / 8 {
            let mut word =
                u64::from_le_bytes(self.buf[w * 8..w * 8 + 8].try_into().unwrap_or([0; 8]));
            while word != 0 {
                let b = base + (w * 64) as u64 + word.trailing_zeros() as u64;
                word &= word - 1;
                if b >= limit {
                    self.r.problem(format!(
                        "{} bitmap marks block {b}, beyond its limit {limit}",
                        if into_pfree { "physical" } else { "machine" }
                    ));
                    return;
                }
                if into_pfree {
                    self.pfree.set(b);
                } else {
                    self.mfree.set(b);
                }
            }
        }
    }

    fn p2m_leaf(&mut self, index: u64) {
        let run_len = self.sb.data_run();
        for i in 0..256u64 {
            let p = (index << P2M_LEAF_BITS) | i;
            let off = i as usize * 16;
            let e = match P2mEntry::decode(&self.buf[off..off + 16]) {
                Ok(e) => e,
                Err(e) => {
                    self.r
                        .problem(format!("P2M entry of physical block {p}: {}", e.detail()));
                    continue;
                }
            };
            if e.kind == BlockKind::Free {
                continue;
            }
            if p == 0 || p >= self.sb.phys_limit {
                self.r.problem(format!(
                    "P2M entry of physical block {p}, beyond the limit {}, is in use",
                    self.sb.phys_limit
                ));
                continue;
            }
            let (code, len) = match e.kind {
                BlockKind::Data => (1u8, run_len),
                BlockKind::Node(l) => (0x10 + l, 1),
                BlockKind::Free => continue,
            };
            if code == 1 && e.machine % run_len != 0 {
                self.r.problem(format!(
                    "data block {p} at machine block {} is not aligned to the block size",
                    e.machine
                ));
            }
            let buf = std::mem::take(&mut self.buf);
            let claimed = self.claim(e.machine, len, &|| format!("physical block {p}"));
            self.buf = buf;
            if !claimed {
                continue;
            }
            self.kind[p as usize] = code;
            self.refs[p as usize] = e.refs;
            if let BlockKind::Node(_) = e.kind {
                self.nodes.insert(p, (e.machine, e.crc));
            }
        }
    }

    /// Walks V2P node `p` of `level`; `writable_path`: reached through writable pointers only.
    fn walk_v2p(&mut self, p: u64, level: u8, writable_path: bool, vol: &str) {
        let Some(&(machine, crc)) = self.nodes.get(&p) else {
            return;
        };
        let what = move || format!("V2P node {p} (level {level})");
        if !self.read(machine, Some(crc), &what) {
            return;
        }
        self.r.v2p_nodes += 1;
        if self.r.v2p_nodes.is_multiple_of(4096) {
            let n = self.r.v2p_nodes;
            self.tick("V2P nodes", n, self.nodes.len() as u64);
        }
        let node = self.buf.clone();
        let child_code = if level == 0 { 1 } else { 0x10 + level - 1 };
        for i in 0..V2P_FANOUT {
            let e = match V2pEntry::decode(V2pEntry::raw_at(&node, i)) {
                Ok(e) => e,
                Err(e) => {
                    self.r
                        .problem(format!("{}, entry {i}: {}", what(), e.detail()));
                    continue;
                }
            };
            if e.phys == 0 {
                continue;
            }
            let c = e.phys;
            if c >= self.sb.phys_limit {
                self.r.problem(format!(
                    "{}, entry {i}, points at physical block {c} beyond the limit {}",
                    what(),
                    self.sb.phys_limit
                ));
                continue;
            }
            let code = self.kind[c as usize];
            if code != child_code {
                self.r.problem(format!(
                    "{}, entry {i}, points at physical block {c}, which is {} instead of {}",
                    what(),
                    code_name(code),
                    code_name(child_code)
                ));
                continue;
            }
            if e.writable && writable_path && self.refs[c as usize] != 1 {
                self.r.problem(format!(
                    "volume '{vol}': {}, entry {i}, is writable but physical block {c} has {} references",
                    what(),
                    self.refs[c as usize]
                ));
            }
            let f = &mut self.found[c as usize];
            *f = f.saturating_add(1);
            if *f == 1 && level > 0 {
                self.walk_v2p(c, level - 1, writable_path && e.writable, vol);
            }
        }
    }
}

fn code_name(code: u8) -> String {
    match code {
        0 => "free".into(),
        1 => "a data block".into(),
        c => format!("a V2P node of level {}", c - 0x10),
    }
}

/// Verifies the last commit of the image on `backing`. `Err` only when the image cannot be
/// examined at all (not a Parallax image, both superblocks damaged, IO errors on them);
/// everything else is in the report.
pub fn check<'a, B: Backing>(
    backing: &'a B,
    progress: Option<CheckProgress<'a>>,
) -> Result<CheckReport> {
    let copies = superblocks::read(backing)?;
    let sb = copies.sb.clone();
    let size = backing
        .size()
        .map_err(|e| Error::io("reading the store size", e))?;
    let mut r = CheckReport {
        superblocks: [copies.describe(0), copies.describe(1)],
        generation: sb.generation,
        virtual_size: sb.virtual_size,
        block_size: sb.data_block(),
        store_blocks: sb.store_blocks,
        ..CheckReport::default()
    };
    if let Some(damage) = copies.damage() {
        r.problem(damage);
    }
    let need = sb.store_blocks << BLOCK_SHIFT;
    if size < need {
        r.problem(format!(
            "the image is truncated: its store needs {need} bytes but holds {size}"
        ));
        return Ok(r);
    }
    let phys = sb.phys_limit;
    let mut c = Checker {
        backing,
        r,
        used: Bits::new(sb.store_blocks),
        mfree: Bits::new(sb.store_blocks),
        pfree: Bits::new(phys),
        kind: vec![0; phys as usize],
        refs: vec![0; phys as usize],
        found: vec![0; phys as usize],
        nodes: HashMap::new(),
        progress,
        buf: vec![0u8; BLOCK],
        sb: sb.clone(),
    };
    c.used.set(0);
    c.used.set(1);

    // The allocation bitmaps and the P2M tree.
    c.tick("bitmaps", 0, 0);
    c.walk_tree(
        "machine bitmap",
        PtrKind::Bitmap,
        sb.mfree_root,
        sb.mfree_levels - 1,
        0,
        &mut |c, i| c.bitmap_leaf(i, false),
    );
    c.walk_tree(
        "physical bitmap",
        PtrKind::Bitmap,
        sb.pfree_root,
        sb.pfree_levels - 1,
        0,
        &mut |c, i| c.bitmap_leaf(i, true),
    );
    c.tick("P2M", 0, 0);
    c.walk_tree(
        "P2M",
        PtrKind::P2m,
        sb.p2m_root,
        sb.p2m_levels - 1,
        0,
        &mut |c, i| c.p2m_leaf(i),
    );

    // The volume table.
    let mut volumes = Vec::new();
    let mut ptr = sb.volumes;
    let mut index = 0u32;
    while !ptr.is_null() && index < sb.volume_blocks {
        let what = move || format!("volume table block {index}");
        if !c.claim(ptr.machine, 1, &what) || !c.read(ptr.machine, Some(ptr.crc), &what) {
            break;
        }
        c.r.volume_table_blocks += 1;
        match decode_volume_block(&c.buf, index) {
            Ok(b) => {
                volumes.extend(b.records);
                ptr = b.next;
            }
            Err(e) => {
                c.r.problem(e.detail());
                break;
            }
        }
        index += 1;
    }
    if volumes.len() != sb.volume_count as usize {
        c.r.problem(format!(
            "the volume table holds {} volumes, the superblock says {}",
            volumes.len(),
            sb.volume_count
        ));
    }

    // Every volume's V2P tree.
    let top = sb.v2p_levels - 1;
    let mut names = std::collections::HashSet::new();
    for v in &volumes {
        match v.kind {
            VolumeKind::Disk => c.r.disks += 1,
            VolumeKind::Snapshot => c.r.snapshots += 1,
        }
        if !names.insert(v.name.clone()) {
            c.r.problem(format!("volume name '{}' is used twice", v.name));
        }
        if v.root >= phys || c.kind[v.root as usize] != 0x10 + top {
            c.r.problem(format!(
                "volume '{}' has root {}, which is not a V2P node of level {top}",
                v.name, v.root
            ));
            continue;
        }
        let f = &mut c.found[v.root as usize];
        *f = f.saturating_add(1);
        if *f > 1 {
            c.r.problem(format!(
                "volume '{}' shares its root node with another volume",
                v.name
            ));
            continue;
        }
        c.walk_v2p(v.root, top, v.kind == VolumeKind::Disk, &v.name);
    }

    // Reference counts and the physical bitmap.
    c.tick("references", 0, 0);
    let in_reserve = |r: format::Range, x: u64| r.start <= x && x < r.end;
    for p in 1..phys {
        let (code, refs, found) = (c.kind[p as usize], c.refs[p as usize], c.found[p as usize]);
        if code == 1 {
            c.r.data_blocks += 1;
        }
        if code == 0 {
            if found > 0 {
                c.r.problem(format!(
                    "physical block {p} is referenced {found} time(s) but its P2M entry is free"
                ));
            }
        } else if found == 0 {
            c.r.problem(format!(
                "physical block {p} ({}) has {refs} reference(s) recorded but nothing points at it",
                code_name(code)
            ));
        } else if found != refs {
            c.r.problem(format!(
                "physical block {p} ({}) has {refs} reference(s) recorded but {found} found",
                code_name(code)
            ));
        }
    }
    let (kinds, pfree, reserve, node_reserve) =
        (&c.kind, &c.pfree, sb.phys_reserve, sb.node_phys_reserve);
    let mut probs = CheckReport::default();
    report_runs(
        &mut probs,
        phys,
        |p| p > 0 && kinds[p as usize] != 0 && !pfree.get(p),
        |s| format!("physical {s} in use but marked free in the physical bitmap"),
    );
    report_runs(
        &mut probs,
        phys,
        |p| {
            p > 0
                && kinds[p as usize] == 0
                && pfree.get(p)
                && !in_reserve(reserve, p)
                && !in_reserve(node_reserve, p)
        },
        |s| format!("physical {s} marked allocated but unused"),
    );
    if !c.pfree.get(0) {
        probs.problem("physical block 0 (the null pointer) is not marked allocated".into());
    }

    // The machine bitmap: reservations count as used.
    for res in [sb.data_reserve, sb.meta_reserve] {
        if !res.is_empty() {
            c.r.reserved_blocks += res.len();
            let (s, l) = (res.start, res.len());
            c.claim(s, l, &|| "a reservation".to_string());
        }
    }
    let (used, mfree) = (&c.used, &c.mfree);
    report_runs(
        &mut probs,
        sb.store_blocks,
        |b| used.get(b) && !mfree.get(b),
        |s| format!("machine {s} in use but marked free in the machine bitmap"),
    );
    report_runs(
        &mut probs,
        sb.store_blocks,
        |b| !used.get(b) && mfree.get(b),
        |s| format!("machine {s} marked used but nothing uses it"),
    );
    let count = |b: &Bits| b.0.iter().map(|w| w.count_ones() as u64).sum::<u64>();
    let (m, p) = (count(&c.mfree), count(&c.pfree));
    if m != sb.used_machine {
        probs.problem(format!(
            "the superblock counts {} used machine blocks, the bitmap {m}",
            sb.used_machine
        ));
    }
    if p != sb.used_phys {
        probs.problem(format!(
            "the superblock counts {} used physical blocks, the bitmap {p}",
            sb.used_phys
        ));
    }
    for x in probs.problems {
        c.r.problem(x);
    }
    c.r.unlisted += probs.unlisted;
    Ok(c.r)
}

/// Recomputes, in place, every checksum reachable from each superblock copy that has the magic
/// number: V2P node checksums in P2M entries, tree pointers, the volume-table chain, the
/// superblock's own. For fuzzing and tests: damaged images then get past the checksums to the
/// checks behind them. Bounded work on any input (each block is visited once per tree).
#[doc(hidden)]
pub fn refresh_checksums(img: &mut [u8]) {
    let nblocks = (img.len() / BLOCK) as u64;
    // The copy with the magic number and the higher generation (the other one's trees may
    // point at blocks reused since).
    let gen = |img: &[u8], c: usize| -> Option<u64> {
        let sb = c * BLOCK;
        (img.len() >= sb + BLOCK && img[sb..sb + 8] == format::MAGIC)
            .then(|| u64::from_le_bytes(img[sb + 56..sb + 64].try_into().unwrap_or([0; 8])))
    };
    let copy = match (gen(img, 0), gen(img, 1)) {
        (Some(a), Some(b)) if b > a => Some(1),
        (Some(_), _) => Some(0),
        (None, Some(_)) => Some(1),
        (None, None) => None,
    };
    if let Some(copy) = copy {
        let sb = copy * BLOCK;
        let levels = |i: usize| img[sb + i].clamp(1, format::MAX_TREE_LEVELS);
        let (p2m, mfree, pfree) = (levels(90), levels(91), levels(92));
        for (off, lv, p2m_tree) in [(144, p2m, true), (160, mfree, false), (176, pfree, false)] {
            let mut seen = Bits::new(nblocks);
            fix_tree(img, nblocks, sb + off, lv - 1, p2m_tree, &mut seen);
        }
        // The volume table, last block first.
        let count = u32::from_le_bytes(img[sb + 140..sb + 144].try_into().unwrap_or([0; 4]));
        let mut chain = Vec::new();
        let mut at = sb + 192;
        while chain.len() < count.min(format::MAX_VOLUMES) as usize {
            let m = ptr_machine(img, at);
            if m == 0 || m >= nblocks {
                break;
            }
            chain.push(at);
            at = m as usize * BLOCK + 16;
        }
        for &ptr_at in chain.iter().rev() {
            set_ptr_crc(img, ptr_at);
        }
        let crc = format::crc32c(&img[sb..sb + BLOCK - 4]);
        img[sb + BLOCK - 4..sb + BLOCK].copy_from_slice(&crc.to_le_bytes());
    }
}

fn ptr_machine(img: &[u8], at: usize) -> u64 {
    let mut m = [0u8; 8];
    m[..6].copy_from_slice(&img[at..at + 6]);
    u64::from_le_bytes(m)
}

/// Sets the checksum of the 16-byte pointer at `at` to that of the block it points at.
fn set_ptr_crc(img: &mut [u8], at: usize) {
    let m = ptr_machine(img, at) as usize;
    let crc = format::crc32c(&img[m * BLOCK..(m + 1) * BLOCK]);
    img[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
}

fn fix_tree(img: &mut [u8], nblocks: u64, at: usize, level: u8, p2m: bool, seen: &mut Bits) {
    let m = ptr_machine(img, at);
    if m < 2 || m >= nblocks || seen.get(m) {
        return;
    }
    seen.set(m);
    let base = m as usize * BLOCK;
    if level > 0 {
        for i in 0..256 {
            fix_tree(img, nblocks, base + i * 16, level - 1, p2m, seen);
        }
    } else if p2m {
        for i in 0..256 {
            let e = base + i * 16;
            if (0x10..=0x14).contains(&img[e + 7]) {
                let n = ptr_machine(img, e);
                if n >= 2 && n < nblocks {
                    let crc = format::crc32c(&img[n as usize * BLOCK..(n as usize + 1) * BLOCK]);
                    img[e + 12..e + 16].copy_from_slice(&crc.to_le_bytes());
                }
            }
        }
    }
    set_ptr_crc(img, at);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::MemBacking;
    use crate::image::{CreateOptions, Image};

    /// The machine block of V2P node `p` in `bytes` (through the current superblock).
    fn node_block(bytes: &[u8], p: u64) -> usize {
        let sb = [0, 1]
            .iter()
            .filter_map(|&c| Superblock::decode(&bytes[c * BLOCK..(c + 1) * BLOCK]).ok())
            .max_by_key(|s| s.generation)
            .unwrap();
        let mut node = sb.p2m_root.machine as usize;
        for l in (1..sb.p2m_levels).rev() {
            let i = ((p >> (8 + 8 * (l as u64 - 1))) & 0xff) as usize;
            node = ptr_machine(bytes, node * BLOCK + i * 16) as usize;
        }
        ptr_machine(bytes, node * BLOCK + (p as usize & 0xff) * 16) as usize
    }

    #[test]
    fn check_finds_a_writable_pointer_to_a_shared_block() {
        let mut img = Image::create(MemBacking::new(), &CreateOptions::new(4 << 20)).unwrap();
        let v = img.volume("base").unwrap();
        img.write_at(v, 0, &[1u8; 8192]).unwrap();
        img.snapshot(v, "s").unwrap();
        img.flush().unwrap();
        let root = img.volume_info(v).unwrap().root;
        let mut bytes = img.backing().to_bytes();
        let at = node_block(&bytes, root) * BLOCK;
        // Entry 0 of the disk's root is read-only (shared with the snapshot): make it writable.
        bytes[at + 7] |= 0x80;
        refresh_checksums(&mut bytes);
        let r = check(&MemBacking::from_bytes(bytes), None).unwrap();
        assert!(
            r.to_string().contains("is writable but physical block"),
            "{r}"
        );
    }

    #[test]
    fn refreshed_checksums_let_damage_through_to_the_deeper_checks() {
        let mut img = Image::create(MemBacking::new(), &CreateOptions::new(4 << 20)).unwrap();
        let v = img.volume("base").unwrap();
        img.write_at(v, 0, &[1u8; 65536]).unwrap();
        img.snapshot(v, "s").unwrap();
        img.flush().unwrap();
        let mut bytes = img.backing().to_bytes();
        refresh_checksums(&mut bytes);
        assert!(
            bytes == img.backing().to_bytes(),
            "nothing to refresh in a good image"
        );
        // A reference count off by one, checksums fixed: check names the block.
        let sb = Superblock::decode(&bytes[BLOCK..2 * BLOCK])
            .or_else(|_| Superblock::decode(&bytes[..BLOCK]))
            .unwrap();
        let mut p2m = sb.p2m_root.machine as usize;
        for _ in 1..sb.p2m_levels {
            p2m = ptr_machine(&bytes, p2m * BLOCK) as usize;
        }
        let e = p2m * BLOCK + 16 * 300 % 4096;
        bytes[e + 8] = bytes[e + 8].wrapping_add(1);
        refresh_checksums(&mut bytes);
        let r = check(&MemBacking::from_bytes(bytes), None).unwrap();
        assert!(!r.is_clean());
        assert!(!r.to_string().contains("checksum"), "{r}");
    }
}
