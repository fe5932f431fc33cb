//! The command line: blktap's verbs and single-letter flags, with help a new operator can
//! follow.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// VHD images as blktap and xapi use them: create disks and snapshots, inspect them, check
/// and repair them, fold a snapshot back into its parent.
///
/// Sizes given with -s and -S are MiB and are rounded up to whole 2 MiB blocks, as blktap's
/// vhd-util rounds them. A snapshot is a differencing disk: it records only what is written
/// after it was taken and reads everything else from its parent, which must then never be
/// written again (mark it hidden). Examples:
///
///   vhd-util create -n base.vhd -s 10240          a 10 GiB dynamic disk
///   vhd-util snapshot -n snap1.vhd -p base.vhd    new leaf over base.vhd
///   vhd-util set -n base.vhd -f hidden -v 1       base.vhd is now history
///   vhd-util query -n snap1.vhd -vsfp             size (MiB), file size, parent, hidden
///   vhd-util check -n snap1.vhd                   "snap1.vhd is valid" or the problems
///   vhd-util coalesce -n snap1.vhd                copy snap1's data into base.vhd
#[derive(Parser, Debug)]
#[command(name = "vhd-util", disable_version_flag = true, verbatim_doc_comment)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new dynamic disk (or a fixed one with -r).
    Create(CreateArgs),
    /// Create a differencing disk (a snapshot's new leaf) over a parent.
    Snapshot(SnapshotArgs),
    /// Print facts about an image, one per line, in a fixed order: -v -s -p -f -m -d -a -S.
    Query(QueryArgs),
    /// Print headers, the block allocation bitmap, or data.
    Read(ReadArgs),
    /// Set a footer field: `hidden` (0 or 1) or the batmap `marker`.
    Set(SetArgs),
    /// Check an image's metadata; prints "NAME is valid" or each problem.
    Check(CheckArgs),
    /// Copy everything a differencing disk wrote into its parent (nothing may use the parent
    /// meanwhile). Prints "Coalesced N sectors".
    Coalesce(CoalesceArgs),
    /// Grow the virtual size, offline: -f within the room reserved by -S at creation; -j
    /// JOURNAL beyond it (blocks in the way move to the end of the file; the metadata is
    /// journaled, so `revert` can undo a resize a crash interrupted).
    Resize(ResizeArgs),
    /// Rewrite the footer at the end of the file from the copy at its start (after a crash
    /// left it missing), and a damaged batmap.
    Repair(NameArgs),
    /// Dangerous edits: a new parent (-p), the file size (-s), drop all data (-z).
    Modify(ModifyArgs),
    /// List images matching a pattern with their size, hidden flag and parent.
    Scan(ScanArgs),
    /// Undo a journaled resize that a crash interrupted: the image is as before it.
    Revert(RevertArgs),
}

#[derive(Args, Debug)]
pub struct NameArgs {
    /// The image.
    #[arg(short = 'n', value_name = "FILE")]
    pub name: PathBuf,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The new image (must not exist).
    #[arg(short = 'n', value_name = "FILE")]
    pub name: PathBuf,
    /// Virtual size in MiB.
    #[arg(short = 's', value_name = "MB")]
    pub size: u64,
    /// Reserve all space now: a fixed disk.
    #[arg(short = 'r')]
    pub reserve: bool,
    /// Reserve metadata room to grow up to this many MiB later without moving data.
    #[arg(short = 'S', value_name = "MB", default_value_t = 0)]
    pub max_size: u64,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// The new differencing disk (must not exist).
    #[arg(short = 'n', value_name = "FILE")]
    pub name: PathBuf,
    /// Its parent. An empty differencing parent is skipped for the first non-empty one
    /// below it, unless -e.
    #[arg(short = 'p', value_name = "PARENT")]
    pub parent: PathBuf,
    /// The parent is a raw file, not a VHD.
    #[arg(short = 'm')]
    pub raw_parent: bool,
    /// Link to the parent given even if it is empty.
    #[arg(short = 'e')]
    pub link_empty: bool,
    /// Reserve metadata room to grow up to this many MiB.
    #[arg(short = 'S', value_name = "MB", default_value_t = 0)]
    pub max_size: u64,
    /// Refuse if the new chain would be deeper than this.
    #[arg(short = 'l', value_name = "DEPTH", default_value_t = 0)]
    pub limit: usize,
}

#[derive(Args, Debug)]
pub struct QueryArgs {
    /// The image.
    #[arg(short = 'n', value_name = "FILE")]
    pub name: PathBuf,
    /// Virtual size in MiB.
    #[arg(short = 'v')]
    pub virt: bool,
    /// Physical size in bytes (metadata and data up to and including the footer).
    #[arg(short = 's')]
    pub phys: bool,
    /// The parent's path, or "FILE has no parent".
    #[arg(short = 'p')]
    pub parent: bool,
    /// Fields: "hidden: N".
    #[arg(short = 'f')]
    pub fields: bool,
    /// "marker: N" (the batmap marker).
    #[arg(short = 'm')]
    pub marker: bool,
    /// "chain depth: N" (images in the chain, this one included).
    #[arg(short = 'd')]
    pub depth: bool,
    /// Allocated 2 MiB blocks.
    #[arg(short = 'a')]
    pub allocated: bool,
    /// Largest virtual size in MiB reachable by a fast resize.
    #[arg(short = 'S')]
    pub max_fast: bool,
    /// With -p: print the parent locator as stored, without resolving it.
    #[arg(short = 'u')]
    pub unresolved: bool,
}

#[derive(Args, Debug)]
pub struct ReadArgs {
    /// The image.
    #[arg(short = 'n', value_name = "FILE")]
    pub name: PathBuf,
    /// Print the footer, header, parent locators and batmap summaries.
    #[arg(short = 'p')]
    pub headers: bool,
    /// Write the block allocation bitmap (one bit per block, raw) to stdout.
    #[arg(short = 'B')]
    pub bat_bitmap: bool,
    /// Translate a logical sector to its place in the file.
    #[arg(short = 't', value_name = "SEC")]
    pub translate: Option<u64>,
    /// Print the BAT entry of a block.
    #[arg(short = 'b', value_name = "BLK")]
    pub bat: Option<u64>,
    /// Write -c sectors from sector SEC, read through the chain, to stdout.
    #[arg(short = 'r', value_name = "SEC")]
    pub read: Option<u64>,
    /// Write -c bytes from byte BYTE, read through the chain, to stdout.
    #[arg(short = 'R', value_name = "BYTE")]
    pub read_bytes: Option<u64>,
    /// How many units (sectors, bytes, blocks).
    #[arg(short = 'c', value_name = "NUM", default_value_t = 1)]
    pub count: u64,
    /// Print numbers in hex.
    #[arg(short = 'x')]
    pub hex: bool,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// The image.
    #[arg(short = 'n', value_name = "FILE")]
    pub name: PathBuf,
    /// `hidden` or `marker`.
    #[arg(short = 'f', value_name = "FIELD")]
    pub field: String,
    /// The value, 0..=255.
    #[arg(short = 'v', value_name = "VALUE")]
    pub value: u64,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The image.
    #[arg(short = 'n', value_name = "FILE")]
    pub name: PathBuf,
    /// Do not complain about a missing footer at the end of the file.
    #[arg(short = 'i')]
    pub ignore_missing_footer: bool,
    /// Do not check the parent.
    #[arg(short = 'I')]
    pub ignore_parent_uuid: bool,
    /// Ignore timestamps (accepted; timestamps only warn here).
    #[arg(short = 't')]
    pub ignore_timestamps: bool,
    /// Check the parents too, down the chain.
    #[arg(short = 'p')]
    pub parents: bool,
    /// Fast: skip the overlap check of the BAT (accepted; it is cheap here).
    #[arg(short = 'B')]
    pub fast: bool,
}

#[derive(Args, Debug)]
pub struct CoalesceArgs {
    /// The differencing disk to fold into its parent.
    #[arg(short = 'n', value_name = "FILE")]
    pub name: PathBuf,
    /// Sparse writes (accepted; writes are always sparse here).
    #[arg(short = 's')]
    pub sparse: bool,
    /// Progress (accepted, not printed).
    #[arg(short = 'p')]
    pub progress: bool,
}

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// The image (not in use).
    #[arg(short = 'n', value_name = "FILE")]
    pub name: PathBuf,
    /// New virtual size in MiB; never smaller than now.
    #[arg(short = 's', value_name = "MB")]
    pub size: u64,
    /// Journal file (must not exist; removed when the resize completes).
    #[arg(short = 'j', value_name = "JOURNAL", conflicts_with = "fast")]
    pub journal: Option<PathBuf>,
    /// Fast resize within the room reserved at creation.
    #[arg(short = 'f')]
    pub fast: bool,
}

#[derive(Args, Debug)]
pub struct ModifyArgs {
    /// The image.
    #[arg(short = 'n', value_name = "FILE")]
    pub name: PathBuf,
    /// Make this file the parent (rewrites uuid, name and locators).
    #[arg(short = 'p', value_name = "NEW_PARENT")]
    pub parent: Option<PathBuf>,
    /// With -p: the new parent is a raw file.
    #[arg(short = 'm')]
    pub raw_parent: bool,
    /// Put the footer at this byte size of the file.
    #[arg(short = 's', value_name = "BYTES")]
    pub phys_size: Option<u64>,
    /// Drop all data.
    #[arg(short = 'z')]
    pub zero: bool,
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    /// Glob of files to scan (e.g. '/sr/*.vhd'); FILES may follow too.
    #[arg(short = 'm', value_name = "PATTERN")]
    pub pattern: Option<String>,
    /// Fast (accepted).
    #[arg(short = 'f')]
    pub fast: bool,
    /// Go on after errors, printing them as scan-error lines.
    #[arg(short = 'c')]
    pub continue_on_error: bool,
    /// Also list the parents of the images found.
    #[arg(short = 'a')]
    pub parents: bool,
    /// Print full paths.
    #[arg(short = 'v')]
    pub verbose: bool,
    /// Print as a tree.
    #[arg(short = 'p')]
    pub pretty: bool,
    /// LVM volume group (not supported).
    #[arg(short = 'l', value_name = "VG")]
    pub volume_group: Option<String>,
    /// More files.
    pub files: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RevertArgs {
    /// The image.
    #[arg(short = 'n', value_name = "FILE")]
    pub name: PathBuf,
    /// The journal.
    #[arg(short = 'j', value_name = "JOURNAL")]
    pub journal: PathBuf,
}
