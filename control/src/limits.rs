//! The allowed range of every numeric setting, each written here once. tap-ctl, the daemon
//! and tapback check against these; blkif's limits come from blkif's own constants.

use crate::error::{Error, Result};

/// The allowed values of one numeric setting, and how to name it in an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// The setting, as the protocol names it (`max_segments`, `early.percent`).
    pub field: &'static str,
    /// The setting in words (`max segments`).
    pub what: &'static str,
    /// Unit after a number (` µs`), empty for counts.
    pub unit: &'static str,
    /// Smallest value allowed.
    pub min: u64,
    /// Largest value allowed.
    pub max: u64,
}

impl Limit {
    const fn new(
        field: &'static str,
        what: &'static str,
        unit: &'static str,
        min: u64,
        max: u64,
    ) -> Limit {
        Limit {
            field,
            what,
            unit,
            min,
            max,
        }
    }

    /// Whether `v` is allowed.
    pub fn contains(&self, v: u64) -> bool {
        (self.min..=self.max).contains(&v)
    }

    /// `Ok` if `v` is allowed, else the error naming the setting and the range.
    pub fn check(&self, v: impl Into<u64>) -> Result<()> {
        let value = v.into();
        if self.contains(value) {
            Ok(())
        } else {
            Err(Error::OutOfRange {
                field: self.field,
                what: self.what,
                unit: self.unit,
                value,
                min: self.min,
                max: self.max,
            })
        }
    }

    /// `v` checked and narrowed to the setting's type (a value too wide for it is out of
    /// range too).
    pub fn fit<T: TryFrom<u64>>(&self, v: u64) -> Result<T> {
        self.check(v)?;
        T::try_from(v).map_err(|_| Error::OutOfRange {
            field: self.field,
            what: self.what,
            unit: self.unit,
            value: v,
            min: self.min,
            max: self.max,
        })
    }

    /// `s` as a whole number within the range, narrowed to the setting's type (a command
    /// line's value parser).
    pub fn parse<T: TryFrom<u64>>(&self, s: &str) -> Result<T> {
        let n: u64 = s.trim().parse().map_err(|_| {
            Error::invalid(
                self.field,
                format!("{} '{s}' is not a whole number", self.what),
            )
        })?;
        self.fit(n)
    }

    /// The range as `MIN..=MAX`, for help texts.
    pub fn range(&self) -> String {
        format!("{}..={}", self.min, self.max)
    }
}

const PERCENT: u64 = 100;
const MILLION: u64 = 1_000_000;

const fn percent(field: &'static str, what: &'static str) -> Limit {
    Limit::new(field, what, "%", 0, PERCENT)
}

const fn ppm(field: &'static str, what: &'static str) -> Limit {
    Limit::new(field, what, " ppm", 0, MILLION)
}

// --- Rings (blkif's limits) -------------------------------------------------------------------

/// Ring order offered to local frontends: rings of up to `2^N` pages.
pub const MAX_RING_ORDER: Limit = Limit::new(
    "max_ring_order",
    "ring order",
    "",
    0,
    blkif::local::MAX_RING_ORDER as u64,
);
/// Segments per direct request offered (blkif's `BLKIF_MAX_SEGMENTS_PER_REQUEST`).
pub const MAX_SEGMENTS: Limit = Limit::new(
    "max_segments",
    "max segments",
    "",
    1,
    blkif::protocol::MAX_SEGMENTS_PER_REQUEST as u64,
);
/// Segments per indirect request offered (0: no `BLKIF_OP_INDIRECT`).
pub const MAX_INDIRECT_SEGMENTS: Limit = Limit::new(
    "max_indirect_segments",
    "max indirect segments",
    "",
    0,
    blkif::request::MAX_INDIRECT_SEGMENTS as u64,
);

// --- Scheduling -------------------------------------------------------------------------------

/// Largest IO the scheduler builds by merging, KiB.
pub const MAX_MERGE_KB: Limit = Limit::new("max_merge_kb", "max merge size", " KiB", 4, 65536);
/// How long a batch may wait to fill, µs (one second).
pub const BATCH_WAIT_US: Limit = Limit::new("batch_wait_us", "batch wait", " µs", 0, MILLION);
/// How long a ring loop polls before sleeping, µs.
pub const POLL_US: Limit = Limit::new("poll_us", "poll time", " µs", 0, 10_000);
/// Requests recorded per ring (0: no trace).
pub const TRACE: Limit = Limit::new("trace", "trace size", "", 0, 16_000_000);

// --- Drivers ----------------------------------------------------------------------------------

/// Metadata cache slots of a Parallax image or of each image of a VHD or qcow2 chain (0: the
/// driver's default; at most 4 GiB of Parallax cache, slots of qcow2 are at most 4 KiB too).
pub const CACHE_SLOTS: Limit = Limit::new("cache_slots", "cache slots", "", 0, 1 << 20);

/// Bytes of memory one metadata cache slot of a Parallax image costs (its 4 KiB block, its
/// bookkeeping and its map entry), for the memory check at open.
pub const CACHE_SLOT_BYTES: u64 = 4096 + 64;
/// Slots a Parallax image's cache has when `cache_slots` is 0.
pub const DEFAULT_CACHE_SLOTS: u64 = 128;

// --- Tracing ----------------------------------------------------------------------------------

/// Bytes of memory one traced request costs per ring (its record and its batch's), for the
/// memory check at open (tapdisk's trace records fit: a test there says so).
pub const TRACE_RECORD_BYTES: u64 = 128;

// --- File descriptors -------------------------------------------------------------------------

/// File descriptors a VBD needs when it opens (image, device socket, NBD listener, wake-ups)
/// and for a first ring; an open is refused with fewer left.
pub const VBD_FDS: u64 = 32;

// --- Early read return ------------------------------------------------------------------------

/// Percentage of a read filled before it is answered.
pub const EARLY_PERCENT: Limit = percent("early.percent", "early-read percent");
/// The first part of `first=X+Y`.
pub const EARLY_FIRST: Limit = percent("early.first_then", "early-read first");
/// The second part of `first=X+Y`.
pub const EARLY_REST: Limit = percent("early.first_then", "early-read rest");
/// Sequential reads in a row that make a stream read-ahead.
pub const EARLY_SEQ_RUN: Limit = Limit::new(
    "early.sequential",
    "early-read seq run",
    "",
    1,
    u32::MAX as u64,
);
/// Percentage of a read-ahead stream's read filled before it is answered.
pub const EARLY_SEQ_PERCENT: Limit = percent("early.sequential", "early-read seq percent");
/// Chunk IOs a read is fetched in, KiB.
pub const EARLY_CHUNK_KB: Limit =
    Limit::new("early.chunk_kb", "early-read chunk", " KiB", 4, 16384);
/// Host-side read cache, MiB (preallocated when the VBD opens; the daemon also checks it
/// against the memory it can have).
pub const EARLY_CACHE_MB: Limit =
    Limit::new("early.cache_mb", "early-read cache", " MiB", 0, 65536);
/// Bytes of memory one 4 KiB block of the early-read cache costs (the block, its key, its
/// flags and its map entry).
pub const EARLY_CACHE_BLOCK_BYTES: u64 = 4096 + 48;

// --- Fault injection --------------------------------------------------------------------------

/// IOs failing at random, per million.
pub const FAULT_FAIL_PPM: Limit = ppm("faults.fail_ppm", "fault fail rate");
/// IOs delayed at random, per million.
pub const FAULT_DELAY_PPM: Limit = ppm("faults.delay_ppm", "fault delay rate");
/// How long a delayed IO is held back, µs (ten seconds).
pub const FAULT_DELAY_US: Limit =
    Limit::new("faults.delay_us", "fault delay", " µs", 0, 10 * MILLION);
/// Sectors in a bad range.
pub const FAULT_BAD_SECTORS: Limit =
    Limit::new("faults.bad", "bad range length", " sectors", 1, u64::MAX);

// --- Disk model -------------------------------------------------------------------------------

/// A link model's bandwidth, MB/s.
pub const MODEL_LINK_MB_S: Limit = Limit::new(
    "model.mb_s",
    "model link bandwidth",
    " MB/s",
    1,
    u32::MAX as u64,
);

// --- NBD export -------------------------------------------------------------------------------

/// Bytes of a unix socket path (`sun_path` holds 108 with the NUL).
pub const NBD_UNIX_PATH: Limit = Limit::new("nbd", "NBD socket path length", " bytes", 1, 107);

// --- Xen (tapback) ----------------------------------------------------------------------------

/// Ring order offered to Xen frontends (`max-ring-page-order`).
pub const XEN_MAX_RING_ORDER: Limit = Limit::new(
    "max_ring_order",
    "Xen ring order",
    "",
    0,
    blkif::xen::MAX_RING_ORDER as u64,
);
/// Queues offered to Xen frontends (`multi-queue-max-queues`).
pub const XEN_MAX_QUEUES: Limit =
    Limit::new("max_queues", "queues", "", 1, blkif::xen::MAX_QUEUES as u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_setting_and_the_range() {
        assert!(MAX_SEGMENTS.check(11u8).is_ok());
        let e = MAX_SEGMENTS.check(12u8).unwrap_err();
        assert_eq!(
            e.to_string(),
            "max segments 12 is out of range: max_segments takes 1..=11"
        );
        assert_eq!(e.field(), Some("max_segments"));
        let e = POLL_US.check(u32::MAX).unwrap_err().to_string();
        assert_eq!(
            e,
            "poll time 4294967295 µs is out of range: poll_us takes 0..=10000"
        );
        assert_eq!(MAX_RING_ORDER.fit::<u8>(8).unwrap(), 8);
        assert!(MAX_RING_ORDER.fit::<u8>(300).is_err());
        assert_eq!(MAX_INDIRECT_SEGMENTS.range(), "0..=4096");
        assert_eq!(MAX_SEGMENTS.parse::<u8>("11").unwrap(), 11);
        assert!(MAX_SEGMENTS.parse::<u8>("12").is_err());
        assert!(MAX_SEGMENTS
            .parse::<u8>("x")
            .unwrap_err()
            .to_string()
            .contains("max segments 'x' is not a whole number"));
        assert_eq!(XEN_MAX_RING_ORDER.range(), "0..=4");
    }
}
