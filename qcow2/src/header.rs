//! The image header (the start of cluster 0) and its extensions: parsed from untrusted bytes
//! and validated field by field, with an error naming the field.
//!
//! FORMAT.md draws every byte. What this module refuses, and why:
//! - versions other than 2 and 3, cluster sizes outside 512 B..2 MiB (QEMU's own range);
//! - encryption (`crypt_method`), external data files, extended L2 entries, compression
//!   types other than deflate and unknown incompatible feature bits: refused at open, naming
//!   the feature (from the image's feature name table when it has one);
//! - tables QEMU itself would not open: an L1 table over 32 MiB or too small for the virtual
//!   size, a refcount table over 8 MiB or empty, more than 65536 snapshots;
//! - any table offset that is not cluster-aligned or whose table does not lie inside the file.
//!
//! The dirty and corrupt bits are accepted here; [`crate::Image`] decides what they allow.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use crate::error::{corrupt, Error, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size QEMU allows (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU allows (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the L1 table (bytes).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (bytes).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name the format allows.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Shortest version 3 header.
pub const V3_HEADER_LEN: u32 = 104;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent (lazy refcounts, not closed cleanly).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is known to be corrupt: no writes.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// A compression type other than deflate.
    pub const COMPRESSION: u64 = 1 << 3;
    /// Extended L2 entries (subclusters).
    pub const EXTENDED_L2: u64 = 1 << 4;
}
/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts may be used.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}
/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a raw image.
    pub const RAW_EXTERNAL: u64 = 1 << 1;
}

/// Header extension types.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    /// Persistent dirty bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const ENCRYPTION: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Byte offsets of header fields this library rewrites.
pub(crate) mod field {
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const AUTOCLEAR: u64 = 88;
}

/// Which feature bitmap a feature name describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum FeatureKind {
    /// `incompatible_features`.
    Incompatible,
    /// `compatible_features`.
    Compatible,
    /// `autoclear_features`.
    Autoclear,
}

/// One entry of the feature name table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FeatureName {
    /// The bitmap.
    pub kind: FeatureKind,
    /// The bit (0..=63).
    pub bit: u8,
    /// The name (lossy UTF-8).
    pub name: String,
}

/// A parsed, validated header.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual size in bytes as stored (the disk is `size` rounded down to 512 bytes, as in
    /// QEMU).
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Where the L1 table starts.
    pub l1_table_offset: u64,
    /// Where the refcount table starts.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table starts.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (0..=6; 4 for version 2).
    pub refcount_order: u32,
    /// Bytes of the header proper (72 for version 2).
    pub header_length: u32,
    /// The backing file name as stored (relative names are relative to the image's
    /// directory).
    pub backing_file: Option<PathBuf>,
    /// The backing file format from the header extension ("qcow2", "raw", ...).
    pub backing_format: Option<String>,
    /// The feature name table.
    pub feature_names: Vec<FeatureName>,
    /// Types of header extensions this library does not know (skipped).
    pub unknown_extensions: Vec<u32>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (be32(b, at) as u64) << 32 | be32(b, at + 4) as u64
}

/// Built-in names of incompatible features, for images without a name table.
fn builtin_incompat_name(bit: u8) -> Option<&'static str> {
    Some(match bit {
        0 => "dirty bit",
        1 => "corrupt bit",
        2 => "external data file",
        3 => "compression type",
        4 => "extended L2 entries",
        _ => return None,
    })
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The virtual disk size the guest sees (rounded down to 512 bytes, as QEMU does).
    pub fn disk_size(&self) -> u64 {
        self.size & !511
    }

    /// Whether the image is marked dirty (lazy refcounts, not closed cleanly).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    /// Whether the image is marked corrupt.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    /// The name of an incompatible feature bit, from the image's table or built in.
    fn incompat_name(&self, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|f| f.kind == FeatureKind::Incompatible && f.bit == bit)
            .map(|f| f.name.clone())
            .or_else(|| builtin_incompat_name(bit).map(str::to_string))
            .unwrap_or_else(|| format!("unknown incompatible feature bit {bit}"))
    }

    /// Parses the header from `buf` (the first cluster of the file, or the whole file if it is
    /// shorter) and checks every field against `file_size`.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::NotQcow2(format!(
                "{} bytes are too short for a qcow2 header",
                buf.len()
            )));
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(Error::NotQcow2(format!("magic is {magic:#010x}")));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!(
                "version {version} (only 2 and 3 exist)"
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::Unsupported(format!(
                "cluster_bits {cluster_bits}: cluster sizes are 512 B to 2 MiB (9..=21)"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            unknown_extensions: Vec::new(),
        };
        let crypt_method = be32(buf, 32);
        let mut compression_type = 0u8;
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(corrupt!(
                    "file of {} bytes is too short for a version 3 header",
                    buf.len()
                ));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN || !h.header_length.is_multiple_of(8) {
                return Err(corrupt!(
                    "header_length {} (a version 3 header is at least 104 bytes, a multiple of 8)",
                    h.header_length
                ));
            }
            if h.header_length as u64 > cs || h.header_length as usize > buf.len() {
                return Err(corrupt!(
                    "header_length {} is larger than the first cluster",
                    h.header_length
                ));
            }
            if h.header_length > V3_HEADER_LEN {
                compression_type = buf[104];
            }
            if h.refcount_order > 6 {
                return Err(corrupt!(
                    "refcount_order {} (at most 6: 64-bit refcounts)",
                    h.refcount_order
                ));
            }
        }

        // The backing file name: inside the first cluster, after the extensions.
        let backing_offset = be64(buf, 8);
        let backing_size = be32(buf, 16);
        if backing_offset != 0 {
            if backing_size > MAX_BACKING_NAME {
                return Err(corrupt!(
                    "backing_file_size {backing_size} (at most {MAX_BACKING_NAME})"
                ));
            }
            let end = backing_offset
                .checked_add(backing_size as u64)
                .filter(|&e| e <= cs && e <= buf.len() as u64)
                .ok_or_else(|| {
                    corrupt!(
                        "backing_file_offset {backing_offset} + backing_file_size \
                         {backing_size} lies outside the first cluster"
                    )
                })?;
            if backing_offset < h.header_length as u64 {
                return Err(corrupt!(
                    "backing_file_offset {backing_offset} lies inside the header"
                ));
            }
            let name = &buf[backing_offset as usize..end as usize];
            if name.contains(&0) {
                return Err(corrupt!("backing file name contains a NUL byte"));
            }
            if !name.is_empty() {
                h.backing_file = Some(PathBuf::from(OsString::from_vec(name.to_vec())));
            }
        }
        let ext_end = if backing_offset != 0 {
            backing_offset
        } else {
            cs.min(buf.len() as u64)
        };
        h.parse_extensions(buf, h.header_length as u64, ext_end, crypt_method)?;

        // Features: refuse what we cannot read correctly, naming it.
        let known = incompat::DIRTY | incompat::CORRUPT;
        let refused = h.incompatible_features & !known;
        if refused != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| refused & (1 << b) != 0)
                .map(|b| {
                    let n = h.incompat_name(b);
                    if b == 3 {
                        format!("{n} ({})", compression_name(compression_type))
                    } else {
                        n
                    }
                })
                .collect();
            return Err(Error::Unsupported(names.join(", ")));
        }
        if compression_type != 0 {
            return Err(corrupt!(
                "compression_type {compression_type} without the compression type feature bit"
            ));
        }
        if crypt_method != 0 {
            return Err(Error::Unsupported(format!(
                "encryption (crypt_method {crypt_method}: {})",
                match crypt_method {
                    1 => "AES",
                    2 => "LUKS",
                    _ => "unknown",
                }
            )));
        }
        h.check_tables(file_size)?;
        Ok(h)
    }

    fn parse_extensions(
        &mut self,
        buf: &[u8],
        start: u64,
        end: u64,
        crypt_method: u32,
    ) -> Result<()> {
        if end > buf.len() as u64 {
            return Err(corrupt!(
                "header extension area ends at {end}, past the end of the file"
            ));
        }
        let mut seen: Vec<u32> = Vec::new();
        let mut off = start;
        while off < end {
            if end - off < 8 {
                return Err(corrupt!(
                    "header extension at {off}: its 8-byte header runs past {end}"
                ));
            }
            let ty = be32(buf, off as usize);
            let len = be32(buf, off as usize + 4) as u64;
            off += 8;
            if ty == ext::END {
                return Ok(());
            }
            if len > end - off {
                return Err(corrupt!(
                    "header extension {ty:#010x} at {}: length {len} runs past {end}",
                    off - 8
                ));
            }
            let data = &buf[off as usize..(off + len) as usize];
            let known = [
                ext::BACKING_FORMAT,
                ext::FEATURE_NAMES,
                ext::BITMAPS,
                ext::ENCRYPTION,
                ext::DATA_FILE,
            ];
            if known.contains(&ty) {
                if seen.contains(&ty) {
                    return Err(corrupt!("header extension {ty:#010x} appears twice"));
                }
                seen.push(ty);
            }
            match ty {
                ext::BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(corrupt!(
                            "backing format header extension: {len} bytes (at most 15)"
                        ));
                    }
                    let f = std::str::from_utf8(data)
                        .map_err(|_| corrupt!("backing format header extension is not UTF-8"))?;
                    self.backing_format = Some(f.to_string());
                }
                ext::FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let kind = match e[0] {
                            0 => FeatureKind::Incompatible,
                            1 => FeatureKind::Compatible,
                            2 => FeatureKind::Autoclear,
                            // Unknown kinds name nothing we check; skip them.
                            _ => continue,
                        };
                        let raw = &e[2..48];
                        let n = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                        self.feature_names.push(FeatureName {
                            kind,
                            bit: e[1] & 63,
                            name: String::from_utf8_lossy(&raw[..n]).into_owned(),
                        });
                    }
                }
                ext::ENCRYPTION if crypt_method == 0 => {
                    return Err(corrupt!(
                        "encryption header extension in an image without encryption"
                    ));
                }
                // Bitmaps are not used (and their autoclear bit is cleared before the first
                // write); the data file name matters only with the data file bit, refused.
                _ => {
                    if !known.contains(&ty) {
                        self.unknown_extensions.push(ty);
                    }
                }
            }
            off += len.next_multiple_of(8);
        }
        Ok(())
    }

    /// The tables the header points at: sizes QEMU accepts, aligned, inside the file.
    fn check_tables(&self, file_size: u64) -> Result<()> {
        let cs = self.cluster_size();
        let l2_entries = cs / 8;
        let inside = |what: &str, off: u64, len: u64| -> Result<()> {
            if !off.is_multiple_of(cs) {
                return Err(corrupt!("{what} {off:#x} is not aligned to a cluster"));
            }
            if off == 0 {
                return Err(corrupt!("{what} is 0 (the header's cluster)"));
            }
            match off.checked_add(len) {
                Some(end) if end <= file_size => Ok(()),
                _ => Err(corrupt!(
                    "{what} {off:#x}: its {len} bytes run past the end of the file ({file_size})"
                )),
            }
        };
        // L1: big enough for the disk, within QEMU's limit, inside the file.
        let clusters = self.size.div_ceil(cs);
        let needed = clusters.div_ceil(l2_entries);
        let l1_bytes = self.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt!(
                "l1_size {}: the L1 table would exceed 32 MiB",
                self.l1_size
            ));
        }
        if (self.l1_size as u64) < needed {
            return Err(corrupt!(
                "l1_size {} is too small for the virtual size {} (needs {needed})",
                self.l1_size,
                self.size
            ));
        }
        if self.l1_size > 0 {
            inside("l1_table_offset", self.l1_table_offset, l1_bytes)?;
        }
        // Refcount table.
        if self.refcount_table_clusters == 0 {
            return Err(corrupt!("refcount_table_clusters is 0"));
        }
        let rt_bytes = self.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt!(
                "refcount_table_clusters {}: the refcount table would exceed 8 MiB",
                self.refcount_table_clusters
            ));
        }
        inside(
            "refcount_table_offset",
            self.refcount_table_offset,
            rt_bytes,
        )?;
        // Snapshot table: entries are checked when it is read.
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt!(
                "nb_snapshots {} (at most {MAX_SNAPSHOTS})",
                self.nb_snapshots
            ));
        }
        if self.nb_snapshots > 0 {
            inside("snapshots_offset", self.snapshots_offset, 40)?;
        }
        Ok(())
    }
}

fn compression_name(t: u8) -> String {
    match t {
        0 => "deflate".into(),
        1 => "zstd".into(),
        n => format!("type {n}"),
    }
}

/// Builds the bytes of a header (for [`crate::create`]): version 3 with a compression type
/// field (112 bytes), or version 2 (72 bytes); the caller appends extensions.
pub(crate) fn encode(h: &Header, backing: Option<(u64, u32)>) -> Vec<u8> {
    let mut b = Vec::with_capacity(112);
    b.extend_from_slice(&MAGIC.to_be_bytes());
    b.extend_from_slice(&h.version.to_be_bytes());
    let (bo, bs) = backing.unwrap_or((0, 0));
    b.extend_from_slice(&bo.to_be_bytes());
    b.extend_from_slice(&bs.to_be_bytes());
    b.extend_from_slice(&h.cluster_bits.to_be_bytes());
    b.extend_from_slice(&h.size.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&h.l1_size.to_be_bytes());
    b.extend_from_slice(&h.l1_table_offset.to_be_bytes());
    b.extend_from_slice(&h.refcount_table_offset.to_be_bytes());
    b.extend_from_slice(&h.refcount_table_clusters.to_be_bytes());
    b.extend_from_slice(&h.nb_snapshots.to_be_bytes());
    b.extend_from_slice(&h.snapshots_offset.to_be_bytes());
    if h.version >= 3 {
        b.extend_from_slice(&h.incompatible_features.to_be_bytes());
        b.extend_from_slice(&h.compatible_features.to_be_bytes());
        b.extend_from_slice(&h.autoclear_features.to_be_bytes());
        b.extend_from_slice(&h.refcount_order.to_be_bytes());
        b.extend_from_slice(&h.header_length.to_be_bytes());
        b.resize(h.header_length as usize, 0);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(cluster_bits: u32) -> Vec<u8> {
        let h = Header {
            version: 3,
            cluster_bits,
            size: 1 << 20,
            l1_size: 1,
            l1_table_offset: 3 << cluster_bits,
            refcount_table_offset: 1 << cluster_bits,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            backing_file: None,
            backing_format: None,
            feature_names: vec![],
            unknown_extensions: vec![],
        };
        let mut b = encode(&h, None);
        b.resize(1 << cluster_bits, 0);
        b
    }

    #[test]
    fn a_plain_header_parses() {
        let b = v3(16);
        let h = Header::parse(&b, 4 << 16).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.disk_size(), 1 << 20);
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: &[(usize, &[u8], &str)] = &[
            (0, b"QFI\xfa", "magic"),
            (4, &[0, 0, 0, 4], "version 4"),
            (20, &[0, 0, 0, 22], "cluster_bits 22"),
            (32, &[0, 0, 0, 2], "LUKS"),
            (36, &[0, 0, 0, 0], "l1_size 0"),
            (40, &[0, 0, 0, 0, 0, 3, 0, 1], "l1_table_offset"),
            (56, &[0, 0, 0, 0], "refcount_table_clusters is 0"),
            (79, &[4], "external data file"),
            (79, &[16], "extended L2 entries"),
            (79, &[32], "unknown incompatible feature bit 5"),
            (99, &[7], "refcount_order 7"),
            (103, &[100], "header_length 100"),
            (104, &[1], "compression_type 1"),
        ];
        for (at, bytes, want) in cases {
            let mut b = v3(16);
            b[*at..*at + bytes.len()].copy_from_slice(bytes);
            let e = Header::parse(&b, 4 << 16).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: got {e}");
        }
        // Tables past the end of the file.
        let e = Header::parse(&v3(16), 3 << 16).unwrap_err().to_string();
        assert!(e.contains("l1_table_offset"), "{e}");
    }

    #[test]
    fn zstd_is_refused_by_name() {
        let mut b = v3(16);
        b[79] = 8;
        b[104] = 1;
        let e = Header::parse(&b, 4 << 16).unwrap_err().to_string();
        assert!(e.contains("compression type (zstd)"), "{e}");
    }

    #[test]
    fn extensions_are_parsed_and_bounded() {
        let mut b = v3(16);
        let mut at = 112;
        let mut put = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            b[at..at + 4].copy_from_slice(&ty.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            b[at + 8..at + 8 + data.len()].copy_from_slice(data);
            at += 8 + data.len().next_multiple_of(8);
        };
        put(&mut b, ext::BACKING_FORMAT, b"qcow2");
        let mut names = vec![0u8; 96];
        names[1] = 5;
        names[2..7].copy_from_slice(b"shiny");
        names[48] = 1;
        put(&mut b, ext::FEATURE_NAMES, &names);
        put(&mut b, 0x1234_5678, b"whatever");
        let h = Header::parse(&b, 4 << 16).unwrap();
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(h.feature_names.len(), 2);
        assert_eq!(h.unknown_extensions, vec![0x1234_5678]);
        // The named unknown feature is reported by its name.
        b[79] = 32;
        let e = Header::parse(&b, 4 << 16).unwrap_err().to_string();
        assert!(e.contains("shiny"), "{e}");
        // An extension longer than the cluster.
        let mut c = v3(16);
        c[112..116].copy_from_slice(&ext::BITMAPS.to_be_bytes());
        c[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = Header::parse(&c, 4 << 16).unwrap_err().to_string();
        assert!(e.contains("runs past"), "{e}");
    }
}
