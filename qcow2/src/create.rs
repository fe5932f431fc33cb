//! Creating an empty image (for tests, the fuzz target's seeds and tools; `qemu-img create`
//! makes the same layout): header, refcount table, refcount blocks, L1 table, each from a
//! cluster boundary, every one of those clusters with refcount 1.

use std::path::PathBuf;

use crate::entry::{put_be64_at, Refcounts};
use crate::error::{Error, Result};
use crate::header::{self, ext, Header, MAX_L1_BYTES};
use crate::storage::Storage;

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512).
    pub size: u64,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// log2 of the refcount width (0..=6; must be 4 for version 2).
    pub refcount_order: u32,
    /// 2 or 3.
    pub version: u32,
    /// Backing file name and format.
    pub backing: Option<(PathBuf, Option<String>)>,
}

impl CreateOptions {
    /// Version 3, 64 KiB clusters, 16-bit refcounts, no backing file.
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            cluster_bits: 16,
            refcount_order: 4,
            version: 3,
            backing: None,
        }
    }
}

/// Writes a new, empty image into `storage` (which should be empty).
pub fn create(storage: &dyn Storage, o: &CreateOptions) -> Result<()> {
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&o.cluster_bits)
        || o.refcount_order > 6
        || !(o.version == 3 || (o.version == 2 && o.refcount_order == 4))
    {
        return Err(Error::Invalid(format!(
            "cannot create version {} with cluster_bits {} and refcount_order {}",
            o.version, o.cluster_bits, o.refcount_order
        )));
    }
    let cs = 1u64 << o.cluster_bits;
    let size = o.size.next_multiple_of(512);
    let l1_size = size.div_ceil(cs).div_ceil(cs / 8);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(Error::Invalid(format!(
            "size {size} needs an L1 table over 32 MiB"
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let rc = Refcounts::new(o.refcount_order);
    let per_block = rc.per(cs);
    // header | refcount table | refcount blocks | L1 table
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + l1_clusters;
        let (nrb, nrt) = (
            total.div_ceil(per_block),
            (total.div_ceil(per_block) * 8).div_ceil(cs),
        );
        if (nrb, nrt) == (rb, rt) {
            break;
        }
        (rb, rt) = (nrb.max(rb), nrt.max(rt));
    }
    let total = 1 + rt + rb + l1_clusters;
    let header_len = if o.version == 3 { 112 } else { 72 };
    let h = Header {
        version: o.version,
        cluster_bits: o.cluster_bits,
        size,
        l1_size: l1_size as u32,
        l1_table_offset: (1 + rt + rb) * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: rt as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: o.refcount_order,
        header_length: header_len,
        backing_file: None,
        backing_format: None,
        feature_names: Vec::new(),
        unknown_extensions: Vec::new(),
    };
    let mut first = vec![0u8; cs as usize];
    let mut exts = Vec::new();
    if let Some((_, Some(fmt))) = &o.backing {
        exts.extend_from_slice(&ext::BACKING_FORMAT.to_be_bytes());
        exts.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
        exts.extend_from_slice(fmt.as_bytes());
        exts.resize(exts.len().next_multiple_of(8), 0);
    }
    exts.extend_from_slice(&[0u8; 8]);
    let name_at = header_len as u64 + exts.len() as u64;
    let backing = match &o.backing {
        Some((name, _)) => {
            use std::os::unix::ffi::OsStrExt;
            let b = name.as_os_str().as_bytes();
            if b.is_empty()
                || b.len() > header::MAX_BACKING_NAME as usize
                || name_at + b.len() as u64 > cs
            {
                return Err(Error::Invalid("backing file name too long or empty".into()));
            }
            first[name_at as usize..name_at as usize + b.len()].copy_from_slice(b);
            Some((name_at, b.len() as u32))
        }
        None => None,
    };
    let hb = header::encode(&h, backing);
    first[..hb.len()].copy_from_slice(&hb);
    if o.version == 3 {
        first[header_len as usize..name_at as usize].copy_from_slice(&exts);
    }
    let io = |e| Error::io("creating the image", e);
    storage.write_at(&first, 0).map_err(io)?;
    // Refcount table and blocks.
    let mut table = vec![0u8; (rt * cs) as usize];
    for j in 0..rb {
        put_be64_at(&mut table, j as usize, (1 + rt + j) * cs);
    }
    storage.write_at(&table, cs).map_err(io)?;
    let mut block = vec![0u8; cs as usize];
    for j in 0..rb {
        block.fill(0);
        for c in j * per_block..((j + 1) * per_block).min(total) {
            rc.set(&mut block, (c - j * per_block) as usize, 1);
        }
        storage.write_at(&block, (1 + rt + j) * cs).map_err(io)?;
    }
    let l1 = vec![0u8; (l1_clusters * cs) as usize];
    storage.write_at(&l1, h.l1_table_offset).map_err(io)?;
    storage.flush().map_err(io)
}
