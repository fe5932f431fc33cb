//! The internal snapshot table: read and validated, so an image with snapshots opens (for
//! reading its active state); nothing else of snapshots is implemented, and such images open
//! only read-only.

use crate::error::{corrupt, Error, Result};
use crate::header::MAX_L1_BYTES;
use crate::storage::Storage;

/// QEMU's limit on the snapshot table's size.
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// QEMU's limit on a snapshot's extra data.
const MAX_EXTRA: u32 = 1024;

/// One internal snapshot, as the table describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    /// Its unique ID string.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Where its L1 table starts.
    pub l1_table_offset: u64,
    /// Entries of its L1 table.
    pub l1_size: u32,
    /// Seconds since the epoch when it was taken.
    pub date_sec: u32,
    /// Bytes of saved VM state (0: a disk-only snapshot).
    pub vm_state_size: u64,
    /// The virtual disk size when it was taken, if recorded.
    pub disk_size: Option<u64>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    (be32(b, at) as u64) << 32 | be32(b, at + 4) as u64
}

/// Reads `count` entries at `offset` of `storage` (`file_size` bytes, clusters of
/// `cluster_bits`), checking every field.
pub fn read_table(
    storage: &dyn Storage,
    offset: u64,
    count: u32,
    cluster_bits: u32,
    version: u32,
    file_size: u64,
) -> Result<Vec<Snapshot>> {
    let cs = 1u64 << cluster_bits;
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut at = offset;
    let limit = offset.saturating_add(MAX_TABLE_BYTES).min(file_size);
    let io = |e| Error::io("reading the snapshot table", e);
    for i in 0..count {
        if at.checked_add(40).is_none_or(|e| e > limit) {
            return Err(corrupt!(
                "snapshot table entry {i} at {at:#x} runs past the end of the table or file"
            ));
        }
        let mut fixed = [0u8; 40];
        storage.read_at(&mut fixed, at).map_err(io)?;
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = be16(&fixed, 12) as u64;
        let name_len = be16(&fixed, 14) as u64;
        let extra = be32(&fixed, 36);
        if extra > MAX_EXTRA {
            return Err(corrupt!(
                "snapshot {i}: extra data size {extra} (at most {MAX_EXTRA})"
            ));
        }
        if version >= 3 && extra < 16 {
            return Err(corrupt!(
                "snapshot {i}: extra data size {extra} (version 3 needs at least 16)"
            ));
        }
        let var = extra as u64 + id_len + name_len;
        let end = at + 40 + var;
        if end > limit {
            return Err(corrupt!(
                "snapshot table entry {i} at {at:#x} runs past the end of the table or file"
            ));
        }
        let mut rest = vec![0u8; var as usize];
        storage.read_at(&mut rest, at + 40).map_err(io)?;
        let l1_bytes = l1_size as u64 * 8;
        if !l1_table_offset.is_multiple_of(cs)
            || l1_bytes > MAX_L1_BYTES
            || l1_table_offset
                .checked_add(l1_bytes)
                .is_none_or(|e| e > file_size)
        {
            return Err(corrupt!(
                "snapshot {i}: L1 table at {l1_table_offset:#x} with {l1_size} entries is \
                 unaligned, too large or outside the file"
            ));
        }
        let (vm_state_size, disk_size) = {
            let e = &rest[..extra as usize];
            let vm = if e.len() >= 8 {
                be64(e, 0)
            } else {
                be32(&fixed, 32) as u64
            };
            (vm, (e.len() >= 16).then(|| be64(e, 8)))
        };
        let s = extra as usize;
        let id = String::from_utf8_lossy(&rest[s..s + id_len as usize]).into_owned();
        let n = s + id_len as usize;
        let name = String::from_utf8_lossy(&rest[n..n + name_len as usize]).into_owned();
        out.push(Snapshot {
            id,
            name,
            l1_table_offset,
            l1_size,
            date_sec: be32(&fixed, 16),
            vm_state_size,
            disk_size,
        });
        at = (end).next_multiple_of(8);
    }
    Ok(out)
}
