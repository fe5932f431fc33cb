//! The on-disk format: constants, and encoding and validation of every structure.
//!
//! [FORMAT.md](../FORMAT.md) draws each structure byte by byte; this module is its executable
//! form. All integers are little-endian. Decoders take bytes read from an image (untrusted: the
//! file may come from elsewhere, be truncated or be corrupt), check every field, and return a
//! plain-words reason when something is wrong; they never panic. Checksums are verified by the
//! caller, which knows where the expected value lives (the superblock checksums itself; every
//! other metadata block is checked against the CRC32C stored in the pointer that leads to it).

use std::fmt;

use crate::error::{Error, Result};

/// Bytes that break the format (the caller adds where they were).
fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}

/// A name or argument that breaks the format's rules.
fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// Bytes in a metadata block and in the unit the store is allocated in (a *machine block*).
pub const BLOCK: usize = 4096;
/// log2 of [`BLOCK`].
pub const BLOCK_SHIFT: u32 = 12;
/// The superblock's magic number.
pub const MAGIC: [u8; 8] = *b"PARALLAX";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Incompatible feature bits this build understands (none yet).
pub const INCOMPAT_KNOWN: u64 = 0;
/// Read-only-compatible feature bits this build understands (none yet).
pub const RO_COMPAT_KNOWN: u64 = 0;

/// Entries in a V2P radix node (8 bytes each).
pub const V2P_FANOUT: usize = 512;
/// log2 of [`V2P_FANOUT`].
pub const V2P_BITS: u32 = 9;
/// Fewest V2P levels an image has.
pub const MIN_V2P_LEVELS: u8 = 3;
/// Most V2P levels an image may have (2^45 data blocks).
pub const MAX_V2P_LEVELS: u8 = 5;
/// Pointers in an internal node of the P2M and bitmap trees (16 bytes each).
pub const TREE_FANOUT: usize = 256;
/// log2 of [`TREE_FANOUT`].
pub const TREE_BITS: u32 = 8;
/// log2 of the P2M entries in a P2M leaf (256 entries of 16 bytes).
pub const P2M_LEAF_BITS: u32 = 8;
/// log2 of the bits in a bitmap leaf (32768 bits).
pub const BITMAP_LEAF_BITS: u32 = 15;
/// Most levels a P2M or bitmap tree may have.
pub const MAX_TREE_LEVELS: u8 = 6;
/// Physical block numbers and machine block numbers are 48-bit.
pub const MAX_BLOCK_NUMBER: u64 = (1 << 48) - 1;
/// Smallest data block: 4 KiB.
pub const MIN_DATA_SHIFT: u8 = 12;
/// Largest data block: 64 KiB.
pub const MAX_DATA_SHIFT: u8 = 16;
/// Largest virtual size (64 PiB).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Most volumes (disks and snapshots) in one image.
pub const MAX_VOLUMES: u32 = 4096;
/// Longest volume name in bytes.
pub const NAME_MAX: usize = 64;
/// Bytes in one volume record.
pub const VOLUME_RECORD: usize = 128;
/// Volume records in one volume-table block.
pub const VOLUMES_PER_BLOCK: usize = 31;
/// Offset of the first record in a volume-table block.
const VOLUME_TABLE_HEADER: usize = 32;
/// Magic number of a volume-table block.
pub const VOLUME_TABLE_MAGIC: [u8; 8] = *b"PLXVOLS\0";
/// How far the physical block limit may exceed the store's block count.
pub const PHYS_SLACK: u64 = 1 << 16;
/// Offset of the superblock checksum.
const SB_CRC: usize = BLOCK - 4;

/// CRC32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(x)
}
fn get_u48(b: &[u8], off: usize) -> u64 {
    let mut x = [0u8; 8];
    x[..6].copy_from_slice(&b[off..off + 6]);
    u64::from_le_bytes(x)
}
fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
fn put_u48(b: &mut [u8], off: usize, v: u64) {
    debug_assert!(v <= MAX_BLOCK_NUMBER);
    b[off..off + 6].copy_from_slice(&v.to_le_bytes()[..6]);
}

/// The V2P levels a disk of `size` bytes with `2^shift`-byte blocks needs (at least three).
pub fn v2p_levels(size: u64, shift: u8) -> u8 {
    let blocks = size.div_ceil(1 << shift);
    let mut levels = MIN_V2P_LEVELS;
    while levels < MAX_V2P_LEVELS && blocks > 1u64 << (V2P_BITS * levels as u32) {
        levels += 1;
    }
    levels
}

/// Items (physical blocks or machine blocks) a tree of `levels` levels covers, when each
/// leaf covers `2^leaf_bits` items.
pub fn tree_capacity(levels: u8, leaf_bits: u32) -> u64 {
    let bits = leaf_bits + TREE_BITS * (levels.max(1) as u32 - 1);
    if bits >= 64 {
        u64::MAX
    } else {
        1 << bits
    }
}

/// Fewest levels a tree needs to cover `items` items.
pub fn tree_levels_for(items: u64, leaf_bits: u32) -> u8 {
    let mut levels = 1;
    while tree_capacity(levels, leaf_bits) < items {
        levels += 1;
    }
    levels
}

/// What a [`TreePtr`] points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PtrKind {
    /// A node of the P2M tree.
    P2m,
    /// A node of a bitmap tree (machine or physical allocation).
    Bitmap,
    /// A block of the volume table.
    VolumeTable,
}

impl PtrKind {
    fn code(self) -> u8 {
        match self {
            PtrKind::P2m => 0x10,
            PtrKind::Bitmap => 0x20,
            PtrKind::VolumeTable => 0x30,
        }
    }
}

/// A 16-byte pointer to a metadata block, carrying the block's checksum.
///
/// ```text
/// 0  6  machine block number (u48), 0 = null
/// 6  1  store: 0 = this image's backing store (other values reserved for remote extents)
/// 7  1  kind: 0x10 P2M node, 0x20 bitmap node, 0x30 volume-table block (0 when null)
/// 8  4  reserved, zero
/// 12 4  CRC32C of the 4096-byte block pointed at
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreePtr {
    /// Machine block number; 0 means null.
    pub machine: u64,
    /// Checksum of the block.
    pub crc: u32,
}

impl TreePtr {
    /// The null pointer.
    pub const NULL: TreePtr = TreePtr { machine: 0, crc: 0 };

    /// Whether this is the null pointer.
    pub fn is_null(&self) -> bool {
        self.machine == 0
    }

    /// Decodes 16 bytes that should hold a pointer of `kind`.
    pub fn decode(b: &[u8], kind: PtrKind) -> Result<TreePtr> {
        let machine = get_u48(b, 0);
        let store = b[6];
        let k = b[7];
        let reserved = get_u32(b, 8);
        let crc = get_u32(b, 12);
        if machine == 0 {
            if b[..16].iter().any(|&x| x != 0) {
                return Err(corrupt("null pointer with non-zero fields"));
            }
            return Ok(TreePtr::NULL);
        }
        if store != 0 {
            return Err(corrupt(format!(
                "pointer names store {store}, but remote stores are not supported"
            )));
        }
        if k != kind.code() {
            return Err(corrupt(format!(
                "pointer has kind {k:#04x}, expected {:#04x}",
                kind.code()
            )));
        }
        if reserved != 0 {
            return Err(corrupt("pointer has non-zero reserved bytes"));
        }
        if machine < 2 {
            return Err(corrupt(format!(
                "pointer to machine block {machine} (a superblock)"
            )));
        }
        Ok(TreePtr { machine, crc })
    }

    /// Encodes into 16 bytes.
    pub fn encode(&self, kind: PtrKind, b: &mut [u8]) {
        b[..16].fill(0);
        if self.is_null() {
            return;
        }
        put_u48(b, 0, self.machine);
        b[7] = kind.code();
        put_u32(b, 12, self.crc);
    }
}

/// What a physical block holds, as its P2M entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Unallocated physical block number.
    Free,
    /// A data block.
    Data,
    /// A V2P node of the given level (0 = leaf, whose entries point at data blocks).
    Node(u8),
}

/// A 16-byte P2M entry: where physical block `p` lives, how many pointers reference it, and for
/// V2P nodes their checksum.
///
/// ```text
/// 0  6  machine block number of the block's first 4 KiB (u48)
/// 6  1  store: 0 = this image's backing store (other values reserved for remote extents)
/// 7  1  kind: 0 free, 1 data block, 0x10 + L V2P node of level L
/// 8  4  reference count (u32; 0 only when free)
/// 12 4  CRC32C of the V2P node (0 for data blocks)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct P2mEntry {
    /// First machine block.
    pub machine: u64,
    /// What the block is.
    pub kind: BlockKind,
    /// References to it.
    pub refs: u32,
    /// Checksum of a V2P node.
    pub crc: u32,
}

impl P2mEntry {
    /// A free entry.
    pub const FREE: P2mEntry = P2mEntry {
        machine: 0,
        kind: BlockKind::Free,
        refs: 0,
        crc: 0,
    };

    /// Decodes 16 bytes.
    pub fn decode(b: &[u8]) -> Result<P2mEntry> {
        let machine = get_u48(b, 0);
        let store = b[6];
        let k = b[7];
        let refs = get_u32(b, 8);
        let crc = get_u32(b, 12);
        let kind = match k {
            0 => {
                if b[..16].iter().any(|&x| x != 0) {
                    return Err(corrupt("free P2M entry with non-zero fields"));
                }
                return Ok(P2mEntry::FREE);
            }
            1 => BlockKind::Data,
            0x10..=0x14 => BlockKind::Node(k - 0x10),
            _ => return Err(corrupt(format!("P2M entry has unknown kind {k:#04x}"))),
        };
        if store != 0 {
            return Err(corrupt(format!(
                "P2M entry names store {store}, but remote stores are not supported"
            )));
        }
        if machine < 2 {
            return Err(corrupt(format!(
                "P2M entry points at machine block {machine} (a superblock)"
            )));
        }
        if refs == 0 {
            return Err(corrupt("allocated P2M entry with zero references"));
        }
        if kind == BlockKind::Data && crc != 0 {
            return Err(corrupt("P2M entry of a data block has a checksum"));
        }
        Ok(P2mEntry {
            machine,
            kind,
            refs,
            crc,
        })
    }

    /// Encodes into 16 bytes.
    pub fn encode(&self, b: &mut [u8]) {
        b[..16].fill(0);
        let k = match self.kind {
            BlockKind::Free => return,
            BlockKind::Data => 1,
            BlockKind::Node(l) => 0x10 + l,
        };
        put_u48(b, 0, self.machine);
        b[7] = k;
        put_u32(b, 8, self.refs);
        put_u32(b, 12, self.crc);
    }
}

/// An 8-byte V2P entry: a physical block number and the writable bit.
///
/// ```text
/// bits 0..48   physical block number (0 = nothing mapped)
/// bits 48..63  reserved, zero
/// bit  63      writable: set only when this pointer is the block's sole reference
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V2pEntry {
    /// Physical block number, 0 = unmapped.
    pub phys: u64,
    /// The writable bit.
    pub writable: bool,
}

/// The writable bit of a V2P entry.
pub const V2P_WRITABLE: u64 = 1 << 63;

impl V2pEntry {
    /// The unmapped entry.
    pub const NONE: V2pEntry = V2pEntry {
        phys: 0,
        writable: false,
    };

    /// Decodes a raw entry.
    #[inline]
    pub fn decode(raw: u64) -> Result<V2pEntry> {
        let phys = raw & MAX_BLOCK_NUMBER;
        if raw & !(MAX_BLOCK_NUMBER | V2P_WRITABLE) != 0 {
            return Err(corrupt(format!(
                "V2P entry {raw:#018x} has reserved bits set"
            )));
        }
        if phys == 0 && raw != 0 {
            return Err(corrupt("unmapped V2P entry with the writable bit"));
        }
        Ok(V2pEntry {
            phys,
            writable: raw & V2P_WRITABLE != 0,
        })
    }

    /// Encodes into a raw entry.
    #[inline]
    pub fn encode(&self) -> u64 {
        if self.phys == 0 {
            0
        } else {
            self.phys | if self.writable { V2P_WRITABLE } else { 0 }
        }
    }

    /// Reads entry `i` of a V2P node.
    #[inline]
    pub fn raw_at(node: &[u8], i: usize) -> u64 {
        get_u64(node, i * 8)
    }

    /// Writes entry `i` of a V2P node.
    #[inline]
    pub fn put_raw_at(node: &mut [u8], i: usize, raw: u64) {
        put_u64(node, i * 8, raw)
    }
}

/// A half-open range `[start, end)` of block numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// First.
    pub start: u64,
    /// One past the last.
    pub end: u64,
}

impl Range {
    /// Blocks in the range.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }
    fn decode(b: &[u8], off: usize) -> Range {
        Range {
            start: get_u64(b, off),
            end: get_u64(b, off + 8),
        }
    }
    fn encode(&self, b: &mut [u8], off: usize) {
        put_u64(b, off, self.start);
        put_u64(b, off + 8, self.end);
    }
}

/// The superblock (two copies, machine blocks 0 and 1; the valid copy with the higher
/// generation is current).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Incompatible features (a reader that does not know a bit must refuse the image).
    pub incompat: u64,
    /// Read-only-compatible features (a writer that does not know a bit must refuse).
    pub ro_compat: u64,
    /// Compatible features (may be ignored).
    pub compat: u64,
    /// Random identifier of the image.
    pub uuid: [u8; 16],
    /// Commit number, 1 for a new image, +1 per commit.
    pub generation: u64,
    /// When the image was created (seconds since the Unix epoch).
    pub created: u64,
    /// When this generation was committed.
    pub committed: u64,
    /// Virtual size of every volume, in bytes.
    pub virtual_size: u64,
    /// log2 of the data block size.
    pub data_shift: u8,
    /// Levels of every V2P tree.
    pub v2p_levels: u8,
    /// Levels of the P2M tree.
    pub p2m_levels: u8,
    /// Levels of the machine bitmap tree.
    pub mfree_levels: u8,
    /// Levels of the physical bitmap tree.
    pub pfree_levels: u8,
    /// Machine blocks in the store (its length is `store_blocks * 4096` bytes or more).
    pub store_blocks: u64,
    /// Physical block numbers in use are below this.
    pub phys_limit: u64,
    /// Bits set in the machine bitmap.
    pub used_machine: u64,
    /// Bits set in the physical bitmap.
    pub used_phys: u64,
    /// The next volume id to hand out.
    pub next_volume_id: u64,
    /// Volumes in the volume table.
    pub volume_count: u32,
    /// Blocks in the volume-table chain.
    pub volume_blocks: u32,
    /// Root of the P2M tree.
    pub p2m_root: TreePtr,
    /// Root of the machine bitmap tree.
    pub mfree_root: TreePtr,
    /// Root of the physical bitmap tree.
    pub pfree_root: TreePtr,
    /// First block of the volume table.
    pub volumes: TreePtr,
    /// Machine blocks reserved for data (bits set, not yet referenced).
    pub data_reserve: Range,
    /// Machine blocks reserved for metadata (bits set, not yet referenced).
    pub meta_reserve: Range,
    /// Physical block numbers reserved for data blocks (bits set, not yet referenced).
    pub phys_reserve: Range,
    /// Physical block numbers reserved for V2P nodes (kept apart from data blocks so that
    /// the P2M entries of nodes share a few P2M leaves).
    pub node_phys_reserve: Range,
}

/// Why a superblock copy was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SuperblockError {
    /// The magic number is not there: not a Parallax image.
    BadMagic,
    /// The checksum does not match (torn or corrupt write).
    BadChecksum,
    /// A version or feature this build does not know.
    Unsupported(String),
    /// A field is out of range or inconsistent.
    Invalid(String),
}

impl fmt::Display for SuperblockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SuperblockError::BadMagic => write!(f, "no Parallax magic number"),
            SuperblockError::BadChecksum => write!(f, "checksum mismatch"),
            SuperblockError::Unsupported(m) | SuperblockError::Invalid(m) => f.write_str(m),
        }
    }
}

impl Superblock {
    /// Data block size in bytes.
    pub fn data_block(&self) -> u64 {
        1 << self.data_shift
    }

    /// Machine blocks per data block.
    pub fn data_run(&self) -> u64 {
        1 << (self.data_shift as u32 - BLOCK_SHIFT)
    }

    /// Data blocks (virtual) in a volume.
    pub fn virtual_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.data_block())
    }

    /// Encodes into a 4096-byte block, with its checksum.
    pub fn encode(&self) -> Box<[u8; BLOCK]> {
        let mut b = Box::new([0u8; BLOCK]);
        b[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut b[..], 8, VERSION);
        put_u32(&mut b[..], 12, BLOCK as u32);
        put_u64(&mut b[..], 16, self.incompat);
        put_u64(&mut b[..], 24, self.ro_compat);
        put_u64(&mut b[..], 32, self.compat);
        b[40..56].copy_from_slice(&self.uuid);
        put_u64(&mut b[..], 56, self.generation);
        put_u64(&mut b[..], 64, self.created);
        put_u64(&mut b[..], 72, self.committed);
        put_u64(&mut b[..], 80, self.virtual_size);
        b[88] = self.data_shift;
        b[89] = self.v2p_levels;
        b[90] = self.p2m_levels;
        b[91] = self.mfree_levels;
        b[92] = self.pfree_levels;
        put_u64(&mut b[..], 96, self.store_blocks);
        put_u64(&mut b[..], 104, self.phys_limit);
        put_u64(&mut b[..], 112, self.used_machine);
        put_u64(&mut b[..], 120, self.used_phys);
        put_u64(&mut b[..], 128, self.next_volume_id);
        put_u32(&mut b[..], 136, self.volume_count);
        put_u32(&mut b[..], 140, self.volume_blocks);
        self.p2m_root.encode(PtrKind::P2m, &mut b[144..160]);
        self.mfree_root.encode(PtrKind::Bitmap, &mut b[160..176]);
        self.pfree_root.encode(PtrKind::Bitmap, &mut b[176..192]);
        self.volumes.encode(PtrKind::VolumeTable, &mut b[192..208]);
        self.data_reserve.encode(&mut b[..], 208);
        self.meta_reserve.encode(&mut b[..], 224);
        self.phys_reserve.encode(&mut b[..], 240);
        self.node_phys_reserve.encode(&mut b[..], 256);
        let crc = crc32c(&b[..SB_CRC]);
        put_u32(&mut b[..], SB_CRC, crc);
        b
    }

    /// Decodes and validates a superblock copy (its fields among themselves; the caller
    /// checks them against the store's real size).
    pub fn decode(b: &[u8]) -> std::result::Result<Superblock, SuperblockError> {
        use SuperblockError::*;
        if b.len() < BLOCK || b[0..8] != MAGIC {
            return Err(BadMagic);
        }
        if crc32c(&b[..SB_CRC]) != get_u32(b, SB_CRC) {
            return Err(BadChecksum);
        }
        let version = get_u32(b, 8);
        if version != VERSION {
            return Err(Unsupported(format!(
                "format version {version} (this build reads version {VERSION})"
            )));
        }
        if get_u32(b, 12) != BLOCK as u32 {
            return Err(Invalid(format!(
                "superblock size {} (expected {BLOCK})",
                get_u32(b, 12)
            )));
        }
        let incompat = get_u64(b, 16);
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(Unsupported(format!(
                "unknown incompatible features {:#x}",
                incompat & !INCOMPAT_KNOWN
            )));
        }
        if b[93..96].iter().any(|&x| x != 0) || b[272..SB_CRC].iter().any(|&x| x != 0) {
            return Err(Invalid("reserved superblock bytes are not zero".into()));
        }
        let ptr = |off: usize, kind: PtrKind, what: &str| {
            TreePtr::decode(&b[off..off + 16], kind)
                .map_err(|e| Invalid(format!("{what}: {}", e.detail())))
        };
        let sb = Superblock {
            incompat,
            ro_compat: get_u64(b, 24),
            compat: get_u64(b, 32),
            uuid: b[40..56].try_into().unwrap_or([0; 16]),
            generation: get_u64(b, 56),
            created: get_u64(b, 64),
            committed: get_u64(b, 72),
            virtual_size: get_u64(b, 80),
            data_shift: b[88],
            v2p_levels: b[89],
            p2m_levels: b[90],
            mfree_levels: b[91],
            pfree_levels: b[92],
            store_blocks: get_u64(b, 96),
            phys_limit: get_u64(b, 104),
            used_machine: get_u64(b, 112),
            used_phys: get_u64(b, 120),
            next_volume_id: get_u64(b, 128),
            volume_count: get_u32(b, 136),
            volume_blocks: get_u32(b, 140),
            p2m_root: ptr(144, PtrKind::P2m, "P2M root")?,
            mfree_root: ptr(160, PtrKind::Bitmap, "machine bitmap root")?,
            pfree_root: ptr(176, PtrKind::Bitmap, "physical bitmap root")?,
            volumes: ptr(192, PtrKind::VolumeTable, "volume table")?,
            data_reserve: Range::decode(b, 208),
            meta_reserve: Range::decode(b, 224),
            phys_reserve: Range::decode(b, 240),
            node_phys_reserve: Range::decode(b, 256),
        };
        sb.validate().map_err(|e| Invalid(e.detail()))?;
        Ok(sb)
    }

    /// Checks the fields among themselves.
    pub fn validate(&self) -> Result<()> {
        if self.generation == 0 {
            return Err(corrupt("generation 0"));
        }
        if !(MIN_DATA_SHIFT..=MAX_DATA_SHIFT).contains(&self.data_shift) {
            return Err(corrupt(format!(
                "data block size 2^{} is not between 4 KiB and 64 KiB",
                self.data_shift
            )));
        }
        if self.virtual_size == 0
            || !self.virtual_size.is_multiple_of(512)
            || self.virtual_size > MAX_VIRTUAL_SIZE
        {
            return Err(corrupt(format!(
                "virtual size {} is invalid",
                self.virtual_size
            )));
        }
        let want = v2p_levels(self.virtual_size, self.data_shift);
        if self.v2p_levels != want {
            return Err(corrupt(format!(
                "V2P levels {} do not match the virtual size (expected {want})",
                self.v2p_levels
            )));
        }
        if self.store_blocks < 2 || self.store_blocks > MAX_BLOCK_NUMBER {
            return Err(corrupt(format!(
                "store size {} blocks is invalid",
                self.store_blocks
            )));
        }
        // Every physical block in use holds a machine block of its own, so the limit stays
        // within the store size plus a reservation or two.
        if self.phys_limit < 1
            || self.phys_limit > MAX_BLOCK_NUMBER
            || self.phys_limit > self.store_blocks + PHYS_SLACK
        {
            return Err(corrupt(format!(
                "physical block limit {} is invalid",
                self.phys_limit
            )));
        }
        for (name, levels, leaf_bits, items) in [
            ("P2M", self.p2m_levels, P2M_LEAF_BITS, self.phys_limit),
            (
                "machine bitmap",
                self.mfree_levels,
                BITMAP_LEAF_BITS,
                self.store_blocks,
            ),
            (
                "physical bitmap",
                self.pfree_levels,
                BITMAP_LEAF_BITS,
                self.phys_limit,
            ),
        ] {
            if !(1..=MAX_TREE_LEVELS).contains(&levels) {
                return Err(corrupt(format!("{name} tree has {levels} levels")));
            }
            if tree_capacity(levels, leaf_bits) < items {
                return Err(corrupt(format!(
                    "{name} tree of {levels} levels is too small for {items} blocks"
                )));
            }
        }
        if self.used_machine > self.store_blocks {
            return Err(corrupt("more machine blocks used than the store holds"));
        }
        if self.used_phys > self.phys_limit {
            return Err(corrupt("more physical blocks used than the limit"));
        }
        if self.volume_count > MAX_VOLUMES {
            return Err(corrupt(format!(
                "{} volumes (at most {MAX_VOLUMES})",
                self.volume_count
            )));
        }
        let blocks = (self.volume_count as usize).div_ceil(VOLUMES_PER_BLOCK) as u32;
        if self.volume_blocks != blocks || self.volumes.is_null() != (blocks == 0) {
            return Err(corrupt("volume table size does not match the volume count"));
        }
        for (name, p) in [
            ("P2M root", self.p2m_root),
            ("machine bitmap root", self.mfree_root),
            ("physical bitmap root", self.pfree_root),
            ("volume table", self.volumes),
        ] {
            if p.machine >= self.store_blocks {
                return Err(corrupt(format!(
                    "{name} at machine block {} is beyond the store ({} blocks)",
                    p.machine, self.store_blocks
                )));
            }
        }
        for (name, r, limit) in [
            ("data reservation", self.data_reserve, self.store_blocks),
            ("metadata reservation", self.meta_reserve, self.store_blocks),
            ("physical reservation", self.phys_reserve, self.phys_limit),
            ("node reservation", self.node_phys_reserve, self.phys_limit),
        ] {
            if r.start > r.end || r.end > limit || (r.start < 2 && !r.is_empty()) {
                return Err(corrupt(format!(
                    "{name} [{}, {}) is invalid",
                    r.start, r.end
                )));
            }
        }
        Ok(())
    }
}

/// Whether a volume can be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// A writable disk (the image's first disk, or a clone).
    Disk,
    /// A read-only snapshot.
    Snapshot,
}

impl fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VolumeKind::Disk => "disk",
            VolumeKind::Snapshot => "snapshot",
        })
    }
}

/// One volume (a disk or a snapshot) in the volume table.
///
/// ```text
/// 0  8  volume id (unique, never reused)
/// 8  8  physical block number of the V2P root node
/// 16 8  created, seconds since the Unix epoch
/// 24 8  parent volume id (the volume it was snapshotted or cloned from; 0 = none)
/// 32 1  kind: 1 disk (writable), 2 snapshot (read-only)
/// 33 1  name length, 1..=64
/// 34 30 reserved, zero
/// 64 64 name, UTF-8, zero-padded
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Unique id.
    pub id: u64,
    /// Physical block number of the root V2P node.
    pub root: u64,
    /// Creation time.
    pub created: u64,
    /// The volume this one was taken from (0 = none).
    pub parent: u64,
    /// Disk or snapshot.
    pub kind: VolumeKind,
    /// Name.
    pub name: String,
}

/// Checks a volume name: 1 to 64 bytes of letters, digits, `-`, `_`, `.` and `+`, not starting
/// with `.` or `-`.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(invalid(format!(
            "volume name '{name}' must be 1 to {NAME_MAX} bytes long"
        )));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(invalid(format!(
            "volume name '{name}' must not start with '.' or '-'"
        )));
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"-_.+:".contains(&c))
    {
        return Err(invalid(format!(
            "volume name '{name}' may contain only letters, digits and - _ . + :"
        )));
    }
    Ok(())
}

impl VolumeRecord {
    fn decode(b: &[u8]) -> Result<VolumeRecord> {
        let id = get_u64(b, 0);
        let root = get_u64(b, 8);
        let kind = match b[32] {
            1 => VolumeKind::Disk,
            2 => VolumeKind::Snapshot,
            k => return Err(corrupt(format!("volume record has unknown kind {k}"))),
        };
        let len = b[33] as usize;
        if id == 0 {
            return Err(corrupt("volume record with id 0"));
        }
        if root == 0 || root > MAX_BLOCK_NUMBER {
            return Err(corrupt(format!("volume {id} has invalid root {root}")));
        }
        if len == 0 || len > NAME_MAX {
            return Err(corrupt(format!("volume {id} has a name of {len} bytes")));
        }
        if b[34..64].iter().any(|&x| x != 0) || b[64 + len..128].iter().any(|&x| x != 0) {
            return Err(corrupt(format!("volume {id} has non-zero reserved bytes")));
        }
        let name = std::str::from_utf8(&b[64..64 + len])
            .map_err(|_| corrupt(format!("volume {id} has a name that is not UTF-8")))?
            .to_string();
        check_name(&name).map_err(|e| corrupt(format!("volume {id}: {}", e.detail())))?;
        Ok(VolumeRecord {
            id,
            root,
            created: get_u64(b, 16),
            parent: get_u64(b, 24),
            kind,
            name,
        })
    }

    fn encode(&self, b: &mut [u8]) {
        b[..VOLUME_RECORD].fill(0);
        put_u64(b, 0, self.id);
        put_u64(b, 8, self.root);
        put_u64(b, 16, self.created);
        put_u64(b, 24, self.parent);
        b[32] = match self.kind {
            VolumeKind::Disk => 1,
            VolumeKind::Snapshot => 2,
        };
        b[33] = self.name.len() as u8;
        b[64..64 + self.name.len()].copy_from_slice(self.name.as_bytes());
    }
}

/// One decoded block of the volume table.
#[derive(Debug)]
pub struct VolumeTableBlock {
    /// The records in it.
    pub records: Vec<VolumeRecord>,
    /// The next block.
    pub next: TreePtr,
}

/// Encodes block `index` of the volume table, holding `records`, followed by `next`.
///
/// ```text
/// 0  8  magic "PLXVOLS\0"
/// 8  4  index of this block in the chain
/// 12 2  records in this block, 1..=31
/// 14 2  reserved, zero
/// 16 16 pointer to the next block (kind 0x30), null in the last
/// 32    31 records of 128 bytes (unused ones zero), then zero to the end
/// ```
pub fn encode_volume_block(index: u32, records: &[VolumeRecord], next: TreePtr) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(&VOLUME_TABLE_MAGIC);
    put_u32(&mut b, 8, index);
    b[12..14].copy_from_slice(&(records.len() as u16).to_le_bytes());
    next.encode(PtrKind::VolumeTable, &mut b[16..32]);
    for (i, r) in records.iter().enumerate() {
        let off = VOLUME_TABLE_HEADER + i * VOLUME_RECORD;
        r.encode(&mut b[off..off + VOLUME_RECORD]);
    }
    b
}

/// Decodes block `index` of the volume table.
pub fn decode_volume_block(b: &[u8], index: u32) -> Result<VolumeTableBlock> {
    if b.len() < BLOCK || b[0..8] != VOLUME_TABLE_MAGIC {
        return Err(corrupt(format!(
            "volume table block {index} has no magic number"
        )));
    }
    if get_u32(b, 8) != index {
        return Err(corrupt(format!(
            "volume table block {index} says it is block {}",
            get_u32(b, 8)
        )));
    }
    let count = get_u16(b, 12) as usize;
    if count == 0 || count > VOLUMES_PER_BLOCK || get_u16(b, 14) != 0 {
        return Err(corrupt(format!(
            "volume table block {index} holds {count} records"
        )));
    }
    let next = TreePtr::decode(&b[16..32], PtrKind::VolumeTable)
        .map_err(|e| e.within(format_args!("volume table block {index}")))?;
    let end = VOLUME_TABLE_HEADER + count * VOLUME_RECORD;
    if b[end..BLOCK].iter().any(|&x| x != 0) {
        return Err(corrupt(format!(
            "volume table block {index} has bytes after its last record"
        )));
    }
    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        let off = VOLUME_TABLE_HEADER + i * VOLUME_RECORD;
        records.push(VolumeRecord::decode(&b[off..off + VOLUME_RECORD])?);
    }
    Ok(VolumeTableBlock { records, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decode_error_says_where_once_and_what() {
        let e = V2pEntry::decode(1 << 50)
            .unwrap_err()
            .within("V2P node 5, entry 3");
        let m = e.to_string();
        assert!(matches!(e, Error::Corrupt(_)), "{m}");
        assert!(
            m.starts_with("corrupt image: V2P node 5, entry 3: V2P entry 0x0004000000000000"),
            "{m}"
        );
        assert_eq!(m.matches("corrupt image").count(), 1, "{m}");
        let bad = check_name("").unwrap_err();
        assert!(matches!(bad, Error::Invalid(_)));
        assert_eq!(bad.detail(), bad.to_string());
    }

    fn sample_sb() -> Superblock {
        Superblock {
            incompat: 0,
            ro_compat: 0,
            compat: 0,
            uuid: [7; 16],
            generation: 3,
            created: 1_700_000_000,
            committed: 1_700_000_100,
            virtual_size: 1 << 30,
            data_shift: 12,
            v2p_levels: 3,
            p2m_levels: 2,
            mfree_levels: 1,
            pfree_levels: 1,
            store_blocks: 1000,
            phys_limit: 1024,
            used_machine: 100,
            used_phys: 90,
            next_volume_id: 3,
            volume_count: 2,
            volume_blocks: 1,
            p2m_root: TreePtr { machine: 5, crc: 9 },
            mfree_root: TreePtr {
                machine: 6,
                crc: 10,
            },
            pfree_root: TreePtr {
                machine: 7,
                crc: 11,
            },
            volumes: TreePtr {
                machine: 8,
                crc: 12,
            },
            data_reserve: Range { start: 10, end: 20 },
            meta_reserve: Range { start: 30, end: 40 },
            phys_reserve: Range { start: 50, end: 60 },
            node_phys_reserve: Range { start: 60, end: 70 },
        }
    }

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let sb = sample_sb();
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b[..]).unwrap(), sb);
        for i in [0usize, 9, 100, 300, 4095] {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert!(Superblock::decode(&bad[..]).is_err(), "byte {i}");
        }
        assert_eq!(
            Superblock::decode(&[0u8; BLOCK]),
            Err(SuperblockError::BadMagic)
        );
        assert!(Superblock::decode(&b[..100]).is_err());
    }

    #[test]
    fn superblock_validation_refuses_inconsistent_fields() {
        let mut sb = sample_sb();
        sb.v2p_levels = 4;
        assert!(sb.validate().is_err());
        let mut sb = sample_sb();
        sb.p2m_levels = 1;
        sb.phys_limit = 300;
        assert!(sb.validate().is_err());
        let mut sb = sample_sb();
        sb.p2m_root.machine = 1000;
        assert!(sb.validate().is_err());
        let mut sb = sample_sb();
        sb.volume_blocks = 2;
        assert!(sb.validate().is_err());
        let mut sb = sample_sb();
        sb.data_reserve = Range { start: 0, end: 4 };
        assert!(sb.validate().is_err());
    }

    #[test]
    fn levels() {
        assert_eq!(v2p_levels(1 << 20, 12), 3);
        assert_eq!(v2p_levels(512 << 30, 12), 3);
        assert_eq!(v2p_levels((512 << 30) + 4096, 12), 4);
        assert_eq!(v2p_levels(MAX_VIRTUAL_SIZE, 12), 5);
        assert_eq!(tree_levels_for(256, P2M_LEAF_BITS), 1);
        assert_eq!(tree_levels_for(257, P2M_LEAF_BITS), 2);
        assert_eq!(tree_levels_for(1 << 48, P2M_LEAF_BITS), 6);
        assert_eq!(tree_levels_for(1 << 48, BITMAP_LEAF_BITS), 6);
    }

    #[test]
    fn entries_round_trip() {
        let e = P2mEntry {
            machine: MAX_BLOCK_NUMBER,
            kind: BlockKind::Node(4),
            refs: u32::MAX,
            crc: 0xdead_beef,
        };
        let mut b = [0u8; 16];
        e.encode(&mut b);
        assert_eq!(P2mEntry::decode(&b).unwrap(), e);
        P2mEntry::FREE.encode(&mut b);
        assert_eq!(b, [0; 16]);
        assert_eq!(P2mEntry::decode(&b).unwrap(), P2mEntry::FREE);
        b[7] = 0x15;
        b[0] = 9;
        assert!(P2mEntry::decode(&b).is_err());

        let v = V2pEntry {
            phys: 12345,
            writable: true,
        };
        assert_eq!(V2pEntry::decode(v.encode()).unwrap(), v);
        assert!(V2pEntry::decode(1 << 50).is_err());
        assert!(V2pEntry::decode(V2P_WRITABLE).is_err());

        let p = TreePtr {
            machine: 77,
            crc: 5,
        };
        p.encode(PtrKind::P2m, &mut b);
        assert_eq!(TreePtr::decode(&b, PtrKind::P2m).unwrap(), p);
        assert!(TreePtr::decode(&b, PtrKind::Bitmap).is_err());
    }

    #[test]
    fn volume_table_round_trips() {
        let recs: Vec<_> = (1..=31)
            .map(|i| VolumeRecord {
                id: i,
                root: 100 + i,
                created: 5,
                parent: i - 1,
                kind: if i % 2 == 0 {
                    VolumeKind::Disk
                } else {
                    VolumeKind::Snapshot
                },
                name: format!("vol-{i}"),
            })
            .collect();
        let b = encode_volume_block(0, &recs, TreePtr { machine: 9, crc: 1 });
        let d = decode_volume_block(&b, 0).unwrap();
        assert_eq!(d.records, recs);
        assert_eq!(d.next, TreePtr { machine: 9, crc: 1 });
        assert!(decode_volume_block(&b, 1).is_err());
        let mut bad = b.clone();
        bad[32 + 64] = 0xff;
        assert!(decode_volume_block(&bad, 0).is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("snap-2024.01_a+b:c").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
