//! The settings of a VBD ([`VbdSettings`]): one type, built by tap-ctl from its command line,
//! sent in the `open` command, checked by the daemon with the same [`VbdSettings::validate`].

use serde::{Deserialize, Serialize};

use crate::early::EarlyPolicy;
use crate::error::{Error, Result};
use crate::faults::FaultPlan;
use crate::image::{DirectIo, Driver, ImageSpec};
use crate::limits;
use crate::machine::{Machine, MIB};
use crate::model::ModelParams;
use crate::nbd::NbdListen;

/// Per-VBD settings, given at open. Every number has its range in [`crate::limits`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VbdSettings {
    /// Refuse writes.
    pub read_only: bool,
    /// O_DIRECT policy for `aio:` images (and the stores of `parallax:` ones).
    pub direct: DirectIo,
    /// Xen rings with persistent grants: IO through the ring's own pages, the data copied
    /// from and to the guest's persistent pages (`staged`), or on the guest's pages (`direct`).
    pub persistent_io: blkif::xen::backend::PersistentIo,
    /// Largest ring order a local frontend may use ([`limits::MAX_RING_ORDER`]).
    pub max_ring_order: u8,
    /// Segments per direct request offered ([`limits::MAX_SEGMENTS`]).
    pub max_segments: u8,
    /// Segments per indirect request offered (0: no BLKIF_OP_INDIRECT;
    /// [`limits::MAX_INDIRECT_SEGMENTS`]).
    pub max_indirect_segments: u16,
    /// Sort and merge requests (the thesis's fix for request fragmentation).
    pub merge: bool,
    /// Largest merged IO, KiB ([`limits::MAX_MERGE_KB`]).
    pub max_merge_kb: u32,
    /// Requests taken from a ring per batch (0: half the requests the frontend keeps
    /// outstanding, at least 8, so that it refills while the rest are served; more than the
    /// ring holds means the ring size).
    pub max_batch: u32,
    /// Backend IOs in flight per ring at most (0: no limit unless the engine asks for one).
    pub max_ios: u32,
    /// Wait up to this many µs for a batch to fill before dispatching it (0: never;
    /// [`limits::BATCH_WAIT_US`]).
    pub batch_wait_us: u32,
    /// Record a trace of up to this many requests per ring (0: off; [`limits::TRACE`]).
    pub trace: u32,
    /// Serve through the thesis's disk model.
    pub model: Option<ModelParams>,
    /// Early read return for frontends that set up the early-read contract, and the
    /// host-side read cache.
    pub early: Option<EarlyPolicy>,
    /// Faults to inject below the scheduler (testing).
    pub faults: Option<FaultPlan>,
    /// Also export the disk over NBD.
    pub nbd: Option<NbdListen>,
    /// Before a ring loop sleeps, it polls the ring for this many µs (0: never;
    /// [`limits::POLL_US`]). Trades CPU for latency under dense load, like QEMU's iothread
    /// `poll-max-ns`.
    pub poll_us: u32,
    /// Metadata cache slots of a `parallax:` image (4 KiB nodes; 0: the driver's default,
    /// 128), of each image of a `vhd:` chain (512-byte BAT and bitmap sectors; 0: 1024) or of
    /// each image of a `qcow2:` chain (L2 and refcount slices of up to 4 KiB; 0: the qcow2
    /// library's default) ([`limits::CACHE_SLOTS`]).
    pub cache_slots: u32,
    /// A `stripe:` image's iSCSI connections are driven by each ring loop's own thread
    /// instead of one IO thread per server.
    pub iscsi_inline: bool,
    /// Serve an `aio:` image even if another VBD or process holds its lock (a read-write VBD
    /// locks its image exclusively, a read-only one shared); the VBD then serves it unlocked.
    pub force_share: bool,
    /// A `stripe:` image kept in etcd is opened even if another tapdisk (on any host) holds
    /// it: this one takes the writer role over and fences the other at the targets (the
    /// hand-off of a live disk; see docs/operations.md).
    pub takeover: bool,
}

impl VbdSettings {
    /// What a VBD gets unless told otherwise.
    pub const DEFAULT: VbdSettings = VbdSettings {
        read_only: false,
        direct: DirectIo::Auto,
        persistent_io: blkif::xen::backend::PersistentIo::Staged,
        max_ring_order: blkif::local::MAX_RING_ORDER,
        max_segments: blkif::protocol::MAX_SEGMENTS_PER_REQUEST as u8,
        // 1 MiB per request, as Linux blkback offers.
        max_indirect_segments: 256,
        merge: true,
        max_merge_kb: 1024,
        max_batch: 0,
        max_ios: 0,
        batch_wait_us: 0,
        trace: 0,
        model: None,
        early: None,
        faults: None,
        nbd: None,
        poll_us: 0,
        cache_slots: 0,
        iscsi_inline: false,
        force_share: false,
        takeover: false,
    };

    /// Checks every setting against its range; the error names the first one that is not
    /// (its protocol name, its value and the range allowed).
    pub fn validate(&self) -> Result<()> {
        limits::MAX_RING_ORDER.check(self.max_ring_order)?;
        limits::MAX_SEGMENTS.check(self.max_segments)?;
        limits::MAX_INDIRECT_SEGMENTS.check(self.max_indirect_segments)?;
        limits::MAX_MERGE_KB.check(self.max_merge_kb)?;
        limits::BATCH_WAIT_US.check(self.batch_wait_us)?;
        limits::TRACE.check(self.trace)?;
        limits::POLL_US.check(self.poll_us)?;
        limits::CACHE_SLOTS.check(self.cache_slots)?;
        if let Some(m) = &self.model {
            m.validate()?;
        }
        if let Some(e) = &self.early {
            e.validate()?;
        }
        if let Some(f) = &self.faults {
            f.validate()?;
        }
        if let Some(n) = &self.nbd {
            n.validate()?;
        }
        Ok(())
    }

    /// [`VbdSettings::validate`], then `image` itself, then the settings that only one
    /// driver takes.
    pub fn validate_for(&self, image: &ImageSpec) -> Result<()> {
        self.validate()?;
        image.validate()?;
        if self.cache_slots != 0
            && !matches!(image.driver, Driver::Parallax | Driver::Vhd | Driver::Qcow2)
        {
            return Err(Error::invalid(
                "cache_slots",
                "cache slots are for parallax:, vhd: and qcow2: images only",
            ));
        }
        if self.takeover && image.driver != Driver::Stripe {
            return Err(Error::invalid(
                "takeover",
                "taking a disk over is for stripe: images only",
            ));
        }
        if self.iscsi_inline && image.driver != Driver::Stripe {
            return Err(Error::invalid(
                "iscsi_inline",
                "inline iSCSI is for stripe: images only",
            ));
        }
        if self.force_share && image.driver != Driver::Aio {
            return Err(Error::invalid(
                "force_share",
                "force_share is for aio: images only (Parallax images and stripe mapping \
                 files are always locked)",
            ));
        }
        Ok(())
    }
}

/// The memory a VBD's settings make it allocate, by setting (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryNeed {
    /// The early-read cache (`early.cache_mb`), allocated when the VBD opens.
    pub early_cache: u64,
    /// The metadata cache of a Parallax image (`cache_slots`), allocated when it opens.
    pub cache_slots: u64,
    /// The trace buffer of each ring (`trace`), allocated when the ring attaches.
    pub trace_per_ring: u64,
}

impl MemoryNeed {
    /// What opening the VBD and attaching its first ring allocate.
    pub fn at_open(&self) -> u64 {
        self.early_cache
            .saturating_add(self.cache_slots)
            .saturating_add(self.trace_per_ring)
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(MIB))
}

impl VbdSettings {
    /// The memory these settings make a VBD of `image` allocate.
    pub fn memory_need(&self, image: &ImageSpec) -> MemoryNeed {
        let slots = match (image.driver, self.cache_slots) {
            (Driver::Parallax, 0) => limits::DEFAULT_CACHE_SLOTS,
            (Driver::Parallax, n) => u64::from(n),
            _ => 0,
        };
        let blocks = self.early.map_or(0, |e| u64::from(e.cache_mb) * MIB / 4096);
        MemoryNeed {
            early_cache: blocks.saturating_mul(limits::EARLY_CACHE_BLOCK_BYTES),
            cache_slots: slots.saturating_mul(limits::CACHE_SLOT_BYTES),
            trace_per_ring: u64::from(self.trace).saturating_mul(limits::TRACE_RECORD_BYTES),
        }
    }

    /// [`VbdSettings::validate_for`], then what the settings ask of the machine against what
    /// `machine` has: the memory the VBD allocates when it opens (each setting that drives a
    /// size, then their sum) and the file descriptors it needs. The error names the setting,
    /// what it asks for, and what there is.
    pub fn validate_on(&self, image: &ImageSpec, machine: &Machine) -> Result<()> {
        self.validate_for(image)?;
        if let Some(room) = &machine.memory {
            let need = self.memory_need(image);
            let there = || format!("{} of {}", mib(room.amount), room.source);
            let slots = need.cache_slots / limits::CACHE_SLOT_BYTES;
            let parts = [
                (
                    "early.cache_mb",
                    need.early_cache,
                    format!(
                        "an early-read cache of {} MiB",
                        self.early.map_or(0, |e| e.cache_mb)
                    ),
                ),
                (
                    "cache_slots",
                    need.cache_slots,
                    format!("{slots} Parallax metadata cache slots"),
                ),
                (
                    "trace",
                    need.trace_per_ring,
                    format!("a trace of {} requests per ring", self.trace),
                ),
            ];
            for (field, bytes, what) in &parts {
                if *bytes > room.amount {
                    return Err(Error::TooBig {
                        field,
                        what: format!("{what} ({field}: {} of memory)", mib(*bytes)),
                        room: there(),
                    });
                }
            }
            if need.at_open() > room.amount {
                let field = parts
                    .iter()
                    .max_by_key(|p| p.1)
                    .map_or("early.cache_mb", |p| p.0);
                return Err(Error::TooBig {
                    field,
                    what: format!(
                        "{} of caches and trace buffers together (early.cache_mb, cache_slots, \
                         trace)",
                        mib(need.at_open())
                    ),
                    room: there(),
                });
            }
        }
        if let Some(fds) = &machine.fds {
            if fds.amount < limits::VBD_FDS {
                return Err(Error::TooBig {
                    field: "fds",
                    what: format!("a VBD, which needs {} file descriptors,", limits::VBD_FDS),
                    room: format!(
                        "{} {} (close VBDs, or raise the limit: ulimit -n)",
                        fds.amount, fds.source
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Default for VbdSettings {
    fn default() -> Self {
        VbdSettings::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        VbdSettings::default().validate().unwrap();
        assert_eq!(VbdSettings::DEFAULT.max_ring_order, 8);
        assert_eq!(VbdSettings::DEFAULT.max_segments, 11);
    }

    #[test]
    fn every_range_is_checked() {
        let bad = |f: fn(&mut VbdSettings)| {
            let mut s = VbdSettings::default();
            f(&mut s);
            s.validate().unwrap_err()
        };
        let field = |f: fn(&mut VbdSettings)| bad(f).field().unwrap();
        assert_eq!(field(|s| s.max_ring_order = 9), "max_ring_order");
        assert_eq!(field(|s| s.max_segments = 0), "max_segments");
        assert_eq!(field(|s| s.max_segments = 12), "max_segments");
        assert_eq!(
            field(|s| s.max_indirect_segments = 4097),
            "max_indirect_segments"
        );
        assert_eq!(field(|s| s.max_merge_kb = 2), "max_merge_kb");
        assert_eq!(field(|s| s.batch_wait_us = 1_000_001), "batch_wait_us");
        assert_eq!(field(|s| s.trace = 16_000_001), "trace");
        assert_eq!(field(|s| s.poll_us = u32::MAX), "poll_us");
        assert_eq!(field(|s| s.cache_slots = (1 << 20) + 1), "cache_slots");
        assert_eq!(
            bad(|s| s.poll_us = 10_001).to_string(),
            "poll time 10001 µs is out of range: poll_us takes 0..=10000"
        );
        assert_eq!(
            field(|s| {
                s.early = Some(EarlyPolicy {
                    chunk_kb: 0,
                    ..EarlyPolicy::default()
                })
            }),
            "early.chunk_kb"
        );
        assert_eq!(
            field(|s| {
                s.model = Some(ModelParams::Link {
                    latency_us: 1,
                    mb_s: 0,
                })
            }),
            "model.mb_s"
        );
    }

    #[test]
    fn driver_settings_need_their_driver() {
        let aio: ImageSpec = "aio:/x".parse().unwrap();
        let plx: ImageSpec = "parallax:/x".parse().unwrap();
        let s = VbdSettings {
            cache_slots: 10,
            ..VbdSettings::default()
        };
        s.validate_for(&plx).unwrap();
        s.validate_for(&"qcow2:/x".parse().unwrap()).unwrap();
        assert_eq!(
            s.validate_for(&aio).unwrap_err().field(),
            Some("cache_slots")
        );
        let s = VbdSettings {
            iscsi_inline: true,
            ..VbdSettings::default()
        };
        assert!(s
            .validate_for(&aio)
            .unwrap_err()
            .to_string()
            .contains("stripe: images only"));
        let s = VbdSettings {
            force_share: true,
            ..VbdSettings::default()
        };
        s.validate_for(&aio).unwrap();
        assert_eq!(
            s.validate_for(&plx).unwrap_err().field(),
            Some("force_share")
        );
    }

    /// Sizes the machine cannot hold are refused, naming the setting and what there is;
    /// the same sizes pass on a machine that has the room.
    #[test]
    fn sizes_are_checked_against_the_machine() {
        use crate::machine::Room;
        let aio: ImageSpec = "aio:/x".parse().unwrap();
        let plx: ImageSpec = "parallax:/x".parse().unwrap();
        let small = Machine {
            memory: Some(Room {
                amount: 1 << 30,
                source: "available memory (MemAvailable)",
            }),
            fds: Some(Room {
                amount: 1000,
                source: "file descriptors the tapdisk's RLIMIT_NOFILE leaves",
            }),
        };
        let big = Machine {
            memory: Some(Room {
                amount: 1 << 40,
                source: "available memory (MemAvailable)",
            }),
            ..small.clone()
        };
        let early = VbdSettings {
            early: Some(EarlyPolicy {
                cache_mb: 2048,
                ..EarlyPolicy::default()
            }),
            ..VbdSettings::default()
        };
        let e = early.validate_on(&aio, &small).unwrap_err();
        assert_eq!(e.field(), Some("early.cache_mb"));
        assert_eq!(
            e.to_string(),
            "an early-read cache of 2048 MiB (early.cache_mb: 2072 MiB of memory) is more than \
             this tapdisk can have: 1024 MiB of available memory (MemAvailable)"
        );
        early.validate_on(&aio, &big).unwrap();
        let slots = VbdSettings {
            cache_slots: 1 << 20,
            ..VbdSettings::default()
        };
        assert_eq!(
            slots.validate_on(&plx, &small).unwrap_err().field(),
            Some("cache_slots")
        );
        slots.validate_on(&plx, &big).unwrap();
        let trace = VbdSettings {
            trace: 16_000_000,
            ..VbdSettings::default()
        };
        assert_eq!(
            trace.validate_on(&aio, &small).unwrap_err().field(),
            Some("trace")
        );
        // Each fits alone, not together.
        let both = VbdSettings {
            cache_slots: 200_000,
            trace: 4_000_000,
            ..VbdSettings::default()
        };
        let e = both.validate_on(&plx, &small).unwrap_err().to_string();
        assert!(e.contains("caches and trace buffers together"), "{e}");
        // The fixed ranges come first; out of descriptors is refused too.
        assert_eq!(
            VbdSettings {
                poll_us: u32::MAX,
                ..VbdSettings::default()
            }
            .validate_on(&aio, &big)
            .unwrap_err()
            .field(),
            Some("poll_us")
        );
        let no_fds = Machine {
            fds: Some(Room {
                amount: 3,
                source: "file descriptors the tapdisk's RLIMIT_NOFILE leaves",
            }),
            ..big.clone()
        };
        let e = VbdSettings::default()
            .validate_on(&aio, &no_fds)
            .unwrap_err();
        assert_eq!(e.field(), Some("fds"));
        assert!(e.to_string().contains("ulimit -n"), "{e}");
        // Nothing known about the machine: only the fixed ranges.
        early.validate_on(&aio, &Machine::default()).unwrap();
    }

    #[test]
    fn unknown_settings_are_refused() {
        assert!(serde_json::from_str::<VbdSettings>(r#"{"poll":5}"#).is_err());
        let s: VbdSettings = serde_json::from_str(r#"{"poll_us":5}"#).unwrap();
        assert_eq!(s.poll_us, 5);
    }
}
