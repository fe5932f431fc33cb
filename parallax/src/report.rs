//! What the volume operations report: where a range lives, the space a volume uses, what a
//! defragmentation did.

/// Where a virtual range lives, as the data path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes covered, from the offset asked for (at least 1, at most the length asked for).
    pub len: u64,
    /// Byte offset in the store of the first byte, or `None`: never written, reads as zeroes.
    pub machine: Option<u64>,
}

/// Space a volume uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Data blocks mapped.
    pub mapped_blocks: u64,
    /// Data blocks only this volume references (what deleting it gives back).
    pub exclusive_blocks: u64,
    /// V2P nodes in its tree.
    pub nodes: u64,
}

/// What [`crate::Image::defrag`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DefragReport {
    /// Data blocks moved.
    pub moved: u64,
    /// Machine-contiguous runs of the volume's data before.
    pub extents_before: u64,
    /// And after.
    pub extents_after: u64,
}
