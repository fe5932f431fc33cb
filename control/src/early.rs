//! When tapdisk answers a read early ([`EarlyPolicy`]); the mechanism is tapdisk's
//! (`tapdisk::early`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits::{self, Limit};

/// When to answer a read early. Every `Some` is a rule; the read is answered when any rule
/// holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EarlyPolicy {
    /// Answer once this percent of the read's pages are filled.
    pub percent: Option<u8>,
    /// Answer once the first `.0` percent of the pages are filled and `.1` percent of the
    /// rest.
    pub first_then: Option<(u8, u8)>,
    /// Answer once at most this many of the read's chunk IOs are outstanding.
    pub outstanding: Option<u32>,
    /// Answer once the estimated time to fill the rest is at most this many µs.
    pub eta_us: Option<u32>,
    /// After `.0` reads in a row that each start where the previous ended, the stream is
    /// read-ahead: its reads are answered once their first `.1` percent are filled.
    pub sequential: Option<(u32, u8)>,
    /// Reads are fetched in chunk IOs of at most this many KiB, in order (default 64).
    pub chunk_kb: u32,
    /// Host-side read cache, MiB (0: none).
    pub cache_mb: u32,
}

impl Default for EarlyPolicy {
    fn default() -> Self {
        EarlyPolicy {
            percent: None,
            first_then: None,
            outstanding: None,
            eta_us: None,
            sequential: None,
            chunk_kb: 64,
            cache_mb: 0,
        }
    }
}

impl EarlyPolicy {
    /// Whether any rule is set.
    pub fn answers_early(&self) -> bool {
        self.percent.is_some()
            || self.first_then.is_some()
            || self.outstanding.is_some()
            || self.eta_us.is_some()
            || self.sequential.is_some()
    }

    /// Checks every value against its range ([`crate::limits`]).
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.percent {
            limits::EARLY_PERCENT.check(p)?;
        }
        if let Some((a, b)) = self.first_then {
            limits::EARLY_FIRST.check(a)?;
            limits::EARLY_REST.check(b)?;
        }
        if let Some((run, p)) = self.sequential {
            limits::EARLY_SEQ_RUN.check(run)?;
            limits::EARLY_SEQ_PERCENT.check(p)?;
        }
        limits::EARLY_CHUNK_KB.check(self.chunk_kb)?;
        limits::EARLY_CACHE_MB.check(self.cache_mb)
    }
}

/// `v` as a whole number within `limit`.
fn num<T: TryFrom<u64>>(v: &str, limit: &Limit) -> Result<T> {
    limit.parse(v)
}

impl std::str::FromStr for EarlyPolicy {
    type Err = Error;
    /// `percent=25,first=10+20,outstanding=2,eta=500,seq=4:10,chunk=64,cache=64` (any
    /// subset; `off` for none).
    fn from_str(s: &str) -> Result<Self> {
        let mut p = EarlyPolicy::default();
        if s == "off" || s.is_empty() {
            return Ok(p);
        }
        let any = |v: &str, what: &str| -> Result<u32> {
            v.parse::<u32>()
                .map_err(|_| Error::invalid("early", format!("{what} '{v}' is not a whole number")))
        };
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                Error::invalid(
                    "early",
                    format!("early-read rule '{part}' is not NAME=VALUE (e.g. percent=25)"),
                )
            })?;
            match k {
                "percent" => p.percent = Some(num(v, &limits::EARLY_PERCENT)?),
                "first" => {
                    let (a, b) = v.split_once('+').ok_or_else(|| {
                        Error::invalid(
                            "early.first_then",
                            format!("first='{v}' is not X+Y (e.g. first=10+20)"),
                        )
                    })?;
                    p.first_then =
                        Some((num(a, &limits::EARLY_FIRST)?, num(b, &limits::EARLY_REST)?));
                }
                "outstanding" => p.outstanding = Some(any(v, "outstanding")?),
                "eta" => p.eta_us = Some(any(v, "eta")?),
                "seq" => {
                    let (a, b) = v.split_once(':').ok_or_else(|| {
                        Error::invalid(
                            "early.sequential",
                            format!("seq='{v}' is not RUN:PERCENT (e.g. seq=4:10)"),
                        )
                    })?;
                    p.sequential = Some((
                        num(a, &limits::EARLY_SEQ_RUN)?,
                        num(b, &limits::EARLY_SEQ_PERCENT)?,
                    ));
                }
                "chunk" => p.chunk_kb = num(v, &limits::EARLY_CHUNK_KB)?,
                "cache" => p.cache_mb = num(v, &limits::EARLY_CACHE_MB)?,
                other => {
                    return Err(Error::invalid(
                        "early",
                        format!(
                            "unknown early-read rule '{other}' (known: percent, first, \
                             outstanding, eta, seq, chunk, cache)"
                        ),
                    ))
                }
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_strings() {
        let p: EarlyPolicy =
            "percent=25,first=10+20,outstanding=2,eta=500,seq=4:10,chunk=128,cache=64"
                .parse()
                .unwrap();
        assert_eq!(p.percent, Some(25));
        assert_eq!(p.first_then, Some((10, 20)));
        assert_eq!(p.sequential, Some((4, 10)));
        assert_eq!((p.chunk_kb, p.cache_mb), (128, 64));
        assert!(p.answers_early());
        assert!(p.validate().is_ok());
        assert!(!"off".parse::<EarlyPolicy>().unwrap().answers_early());
        for bad in [
            "percent=101",
            "percent=300",
            "first=10",
            "seq=4",
            "seq=0:10",
            "chunk=1",
            "cache=100000",
            "bogus=1",
            "percent",
        ] {
            assert!(bad.parse::<EarlyPolicy>().is_err(), "{bad}");
        }
        assert_eq!(
            "percent=101"
                .parse::<EarlyPolicy>()
                .unwrap_err()
                .to_string(),
            "early-read percent 101% is out of range: early.percent takes 0..=100"
        );
    }

    #[test]
    fn values_from_elsewhere_are_checked() {
        let p = EarlyPolicy {
            percent: Some(250),
            ..EarlyPolicy::default()
        };
        assert_eq!(p.validate().unwrap_err().field(), Some("early.percent"));
        let p = EarlyPolicy {
            chunk_kb: 0,
            ..EarlyPolicy::default()
        };
        assert_eq!(p.validate().unwrap_err().field(), Some("early.chunk_kb"));
    }
}
