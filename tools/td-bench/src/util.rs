//! Small helpers: duration and seed parsing, a fast seedable PRNG. Sizes are `td_cli`'s.

use std::time::Duration;

/// Parses a duration: a number (decimals allowed) with an optional unit `ms`, `s`, `m`, `h`;
/// a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let v: f64 = t[..end]
        .parse()
        .map_err(|_| format!("duration '{s}' does not start with a number (e.g. 10s, 500ms)"))?;
    let mult = match &t[end..] {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "duration '{s}' has an unknown unit (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(v * mult).map_err(|_| format!("duration '{s}' is out of range"))
}

/// SplitMix64 finaliser: a good 64-bit mixing function.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small, fast, seedable generator (SplitMix64). Not cryptographic; plenty for workloads.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`), by Lemire's multiply-shift.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    #[inline]
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `pct`/100.
    #[inline]
    pub fn percent(&mut self, pct: f64) -> bool {
        pct > 0.0 && (self.below(1_000_000) as f64) < pct * 10_000.0
    }
}

/// A seed from the clock and pid, for runs without `--seed`.
pub fn clock_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    mix64(t ^ (u64::from(std::process::id()) << 40))
}

/// Parses a seed: decimal or `0x` hexadecimal.
pub fn parse_seed(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("seed '{s}' is not a decimal or 0x-hexadecimal 64-bit number"))
}

/// Fills the first `bytes` of `path` (made `size` long) with non-zero data, so later reads
/// touch the storage and later writes overwrite allocated blocks.
pub fn prefill(path: &std::path::Path, size: u64, bytes: u64) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    if f.metadata()?.len() < size {
        f.set_len(size)?;
    }
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..bytes.min(size) >> 20 {
        w.write_all(&block)?;
    }
    w.flush()?;
    f.sync_all()?;
    Ok(())
}

/// Removes files when dropped (temporary images, also on error).
pub struct RemoveFiles(pub Vec<std::path::PathBuf>);

impl Drop for RemoveFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3 days").is_err());
    }

    #[test]
    fn seeds_and_rng() {
        assert_eq!(parse_seed("0x10"), Ok(16));
        assert_eq!(parse_seed("42"), Ok(42));
        assert!(parse_seed("x").is_err());
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut seen = [0u32; 10];
        for _ in 0..100_000 {
            seen[a.below(10) as usize] += 1;
        }
        assert!(
            seen.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{seen:?}"
        );
        for _ in 0..1000 {
            let v = a.range(3, 5);
            assert!((3..=5).contains(&v));
        }
        assert!(!a.percent(0.0));
        assert!(a.percent(100.0));
    }
}
