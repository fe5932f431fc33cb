//! What faults to inject below the scheduler ([`FaultPlan`]), for testing; the injecting
//! engine is tapdisk's (`tapdisk::engine::fault`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits::{self, Limit};

/// What to inject: bad sector ranges (every IO touching one fails with EIO, every time) and
/// seeded random faults per IO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FaultPlan {
    /// Seed of the random faults.
    pub seed: u64,
    /// IOs failing at random, per million.
    pub fail_ppm: u32,
    /// IOs delayed at random, per million.
    pub delay_ppm: u32,
    /// How long a delayed IO is held back, µs.
    pub delay_us: u32,
    /// A failing write first writes the first half of its data (a torn write).
    pub tear: bool,
    /// Bad sector ranges `(first sector, sectors)`: every IO touching one fails.
    pub bad: Vec<(u64, u64)>,
}

impl FaultPlan {
    /// Whether an IO of `len` bytes at byte `offset` touches a bad range.
    pub fn hits_bad(&self, offset: u64, len: u64) -> bool {
        let (a, b) = (offset / 512, offset.saturating_add(len).div_ceil(512));
        self.bad
            .iter()
            .any(|&(s, n)| a < s.saturating_add(n) && s < b.max(a + 1))
    }

    /// Checks every value against its range ([`crate::limits`]).
    pub fn validate(&self) -> Result<()> {
        limits::FAULT_FAIL_PPM.check(self.fail_ppm)?;
        limits::FAULT_DELAY_PPM.check(self.delay_ppm)?;
        limits::FAULT_DELAY_US.check(self.delay_us)?;
        for &(_, n) in &self.bad {
            limits::FAULT_BAD_SECTORS.check(n)?;
        }
        Ok(())
    }
}

fn num<T: TryFrom<u64>>(v: &str, field: &'static str, what: &str, limit: &Limit) -> Result<T> {
    let n: u64 = v.parse().map_err(|_| {
        Error::invalid(
            field,
            format!("fault plan: {what} '{v}' is not a whole number"),
        )
    })?;
    limit.fit(n)
}

impl std::str::FromStr for FaultPlan {
    type Err = Error;
    /// `seed=N,fail=PPM,delay=PPM:US,tear,bad=SECTOR+COUNT;SECTOR+COUNT`.
    fn from_str(s: &str) -> Result<Self> {
        const ANY: Limit = Limit {
            field: "faults",
            what: "fault plan number",
            unit: "",
            min: 0,
            max: u64::MAX,
        };
        let mut p = FaultPlan::default();
        for part in s.split(',').filter(|x| !x.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            match k {
                "seed" => p.seed = num(v, "faults.seed", "seed", &ANY)?,
                "fail" => p.fail_ppm = num(v, "faults.fail_ppm", "fail", &limits::FAULT_FAIL_PPM)?,
                "delay" => {
                    let (a, b) = v.split_once(':').ok_or_else(|| {
                        Error::invalid(
                            "faults.delay_ppm",
                            format!("fault plan: delay='{v}' is not PPM:US"),
                        )
                    })?;
                    p.delay_ppm = num(a, "faults.delay_ppm", "delay", &limits::FAULT_DELAY_PPM)?;
                    p.delay_us = num(b, "faults.delay_us", "delay time", &limits::FAULT_DELAY_US)?;
                }
                "tear" => p.tear = true,
                "bad" => {
                    for r in v.split(';') {
                        let (a, b) = r.split_once('+').ok_or_else(|| {
                            Error::invalid(
                                "faults.bad",
                                format!("fault plan: bad range '{r}' is not SECTOR+COUNT"),
                            )
                        })?;
                        p.bad.push((
                            num(a, "faults.bad", "bad sector", &ANY)?,
                            num(b, "faults.bad", "bad count", &limits::FAULT_BAD_SECTORS)?,
                        ));
                    }
                }
                other => {
                    return Err(Error::invalid(
                        "faults",
                        format!(
                        "unknown fault plan item '{other}' (known: seed, fail, delay, tear, bad)"
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
    fn plans_parse() {
        let p: FaultPlan = "seed=7,fail=1000,delay=500:2000,tear,bad=100+8;5000+1"
            .parse()
            .unwrap();
        assert_eq!(p.seed, 7);
        assert_eq!(
            (p.fail_ppm, p.delay_ppm, p.delay_us, p.tear),
            (1000, 500, 2000, true)
        );
        assert_eq!(p.bad, vec![(100, 8), (5000, 1)]);
        assert!(p.hits_bad(100 * 512, 512));
        assert!(p.hits_bad(96 * 512, 4096));
        assert!(!p.hits_bad(108 * 512, 4096));
        assert!(!p.hits_bad(0, 100 * 512));
        assert!(!p.hits_bad(u64::MAX - 10, 100));
        assert!("bad=5".parse::<FaultPlan>().is_err());
        assert!("bad=5+0".parse::<FaultPlan>().is_err());
        assert!("nope=1".parse::<FaultPlan>().is_err());
        assert_eq!("".parse::<FaultPlan>().unwrap(), FaultPlan::default());
    }

    #[test]
    fn rates_above_a_million_are_refused() {
        let e = "fail=1000001".parse::<FaultPlan>().unwrap_err().to_string();
        assert_eq!(
            e,
            "fault fail rate 1000001 ppm is out of range: faults.fail_ppm takes 0..=1000000"
        );
        assert!("delay=10:20000000".parse::<FaultPlan>().is_err());
        let p = FaultPlan {
            delay_ppm: 2_000_000,
            ..FaultPlan::default()
        };
        assert_eq!(p.validate().unwrap_err().field(), Some("faults.delay_ppm"));
    }
}
