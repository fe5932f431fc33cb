//! Slow-storage models for experiments ([`ModelParams`]); the engines that hold completions
//! back are tapdisk's (`tapdisk::engine::model`).
//!
//! - **Spindle** (the thesis's disk): one IO at a time, in arrival order, each costing
//!   `X + Y × size`, plus a positioning delay when it does not start where the previous one
//!   ended. The thesis (Table 3.1, direct writes of 4 KB to 1 MB on a Seagate 7200.11) fits
//!   X ≈ 335 µs and Y ≈ 4 µs per KB; those are the defaults, with 4170 µs (half a revolution
//!   at 7200 rpm, the mean rotational latency) to reposition.
//! - **Link** (remote storage behind a network link): IOs are in flight together; their data
//!   crosses one link of a given bandwidth one after another, and each completes a fixed
//!   latency after its last byte is through.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits;

/// A model's constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelParams {
    /// One spindle.
    Spindle {
        /// Fixed cost of every IO, µs (thesis: 335).
        x_us: u32,
        /// Transfer cost, ns per KiB (thesis: about 4 µs per KB = 4000).
        y_ns_per_kb: u32,
        /// Added when an IO does not start where the previous one ended, µs.
        seek_us: u32,
    },
    /// A network link to remote storage.
    Link {
        /// Time from the last byte sent to the completion, µs.
        latency_us: u32,
        /// Link bandwidth, MB/s (10^6 bytes).
        mb_s: u32,
    },
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams::Spindle {
            x_us: 335,
            y_ns_per_kb: 4000,
            seek_us: 4170,
        }
    }
}

impl std::fmt::Display for ModelParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ModelParams::Spindle {
                x_us,
                y_ns_per_kb,
                seek_us,
            } => write!(
                f,
                "model disk X={x_us} µs Y={y_ns_per_kb} ns/KB seek={seek_us} µs"
            ),
            ModelParams::Link { latency_us, mb_s } => {
                write!(f, "model link {mb_s} MB/s, {latency_us} µs latency")
            }
        }
    }
}

impl std::str::FromStr for ModelParams {
    type Err = Error;
    /// `default` (the thesis's spindle), `X_US,Y_NS_PER_KB,SEEK_US` (a spindle), or
    /// `link:LATENCY_US,MB_S`.
    fn from_str(s: &str) -> Result<Self> {
        if s == "default" || s == "spindle" || s.is_empty() {
            return Ok(ModelParams::default());
        }
        let bad = |why: String| Error::invalid("model", why);
        let (link, body) = match s.strip_prefix("link:") {
            Some(b) => (true, b),
            None => (false, s),
        };
        let v: Vec<&str> = body.split(',').collect();
        let num = |i: usize, what: &str| -> Result<u32> {
            v.get(i)
                .ok_or_else(|| bad(format!("model '{s}' lacks {what}")))?
                .trim()
                .parse::<u32>()
                .map_err(|_| bad(format!("model '{s}': {what} is not a whole number")))
        };
        let p = if link {
            if v.len() != 2 {
                return Err(bad(format!(
                    "model '{s}' is not link:LATENCY_US,MB_S (e.g. link:2000,100)"
                )));
            }
            ModelParams::Link {
                latency_us: num(0, "the latency")?,
                mb_s: num(1, "the bandwidth")?,
            }
        } else {
            if v.len() != 3 {
                return Err(bad(format!(
                    "model '{s}' is not X_US,Y_NS_PER_KB,SEEK_US (e.g. 335,4000,4170), \
                     link:LATENCY_US,MB_S or 'default'"
                )));
            }
            ModelParams::Spindle {
                x_us: num(0, "X")?,
                y_ns_per_kb: num(1, "Y")?,
                seek_us: num(2, "the seek time")?,
            }
        };
        p.validate()?;
        Ok(p)
    }
}

impl ModelParams {
    /// A spindle's service time of an IO of `len` bytes, ns, `sequential` if it starts where
    /// the previous one ended (a link: its transfer time).
    pub fn service_ns(&self, len: u64, sequential: bool) -> u64 {
        match *self {
            ModelParams::Spindle {
                x_us,
                y_ns_per_kb,
                seek_us,
            } => {
                let mut t = u64::from(x_us) * 1000 + u64::from(y_ns_per_kb) * len / 1024;
                if !sequential {
                    t += u64::from(seek_us) * 1000;
                }
                t
            }
            ModelParams::Link { mb_s, .. } => len * 1000 / u64::from(mb_s.max(1)),
        }
    }

    /// Checks every value against its range ([`crate::limits`]).
    pub fn validate(&self) -> Result<()> {
        match *self {
            ModelParams::Spindle { .. } => Ok(()),
            ModelParams::Link { mb_s, .. } => limits::MODEL_LINK_MB_S.check(mb_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_times_follow_table_3_1() {
        let m = ModelParams::default();
        // Thesis Table 3.1: 4 KB 345 µs, 128 KB 887, 512 KB 2383 (sequential dd).
        for (kb, thesis) in [(4u64, 345.0), (128, 887.0), (512, 2383.0)] {
            let us = m.service_ns(kb * 1024, true) as f64 / 1000.0;
            assert!(
                (us - thesis).abs() / thesis < 0.2,
                "{kb} KB: {us} vs {thesis}"
            );
        }
        assert_eq!(m.service_ns(0, false), (335 + 4170) * 1000);
        let l: ModelParams = "link:2000,100".parse().unwrap();
        // 1 MB at 100 MB/s: 10.49 ms on the wire.
        assert_eq!(l.service_ns(1 << 20, true), 10_485_760);
    }

    #[test]
    fn params_parse() {
        let parse = |s: &str| s.parse::<ModelParams>();
        assert_eq!(parse("default").unwrap(), ModelParams::default());
        assert_eq!(
            parse("100,2000,0").unwrap(),
            ModelParams::Spindle {
                x_us: 100,
                y_ns_per_kb: 2000,
                seek_us: 0
            }
        );
        assert_eq!(
            parse("link:500,250").unwrap(),
            ModelParams::Link {
                latency_us: 500,
                mb_s: 250
            }
        );
        let err = |s: &str| parse(s).unwrap_err().to_string();
        assert!(err("1,2").contains("X_US,Y_NS_PER_KB"));
        assert!(err("a,2,3").contains("X is not"));
        assert!(parse("link:1").is_err());
        assert!(err("link:1,0").contains("model.mb_s takes 1..="));
        assert_eq!(
            ModelParams::Link {
                latency_us: 2000,
                mb_s: 100
            }
            .to_string(),
            "model link 100 MB/s, 2000 µs latency"
        );
    }
}
