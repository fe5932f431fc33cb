//! The settings of a VBD ([`VbdSettings`]): one type, built by tap-ctl from its command line,
//! sent in the `open` command, checked by the daemon with the same [`VbdSettings::validate`].

use serde::{Deserialize, Serialize};

use crate::early::EarlyPolicy;
use crate::error::{Error, Result};
use crate::faults::FaultPlan;
use crate::image::{DirectIo, Driver, ImageSpec};
use crate::limits;
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
    /// Requests taken from a ring per batch (0: the ring size; more than the ring holds
    /// means the ring size).
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
}

impl VbdSettings {
    /// What a VBD gets unless told otherwise.
    pub const DEFAULT: VbdSettings = VbdSettings {
        read_only: false,
        direct: DirectIo::Auto,
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
        if self.iscsi_inline && image.driver != Driver::Stripe {
            return Err(Error::invalid(
                "iscsi_inline",
                "inline iSCSI is for stripe: images only",
            ));
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
    }

    #[test]
    fn unknown_settings_are_refused() {
        assert!(serde_json::from_str::<VbdSettings>(r#"{"poll":5}"#).is_err());
        let s: VbdSettings = serde_json::from_str(r#"{"poll_us":5}"#).unwrap();
        assert_eq!(s.poll_us, 5);
    }
}
