//! Byte sizes as the tools take and print them.

/// Parses a byte size: a number with an optional binary suffix `k`, `m`, `g`, `t` (either
/// case, optionally followed by `iB` or `B`): `512`, `4k`, `256M`, `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!(
            "size '{s}' does not start with a number (e.g. 4k, 256M, 1G)"
        ));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("size '{s}' is too large"))?;
    let unit = t[digits..].to_ascii_lowercase();
    let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("size '{s}' has an unknown unit (use k, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Formats a byte count the way the options take it (`4k`, `1M`, `1536`).
pub fn fmt_size(n: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "k")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// Formats a byte count for people: `512 B`, `1.5 KiB`, `154.6 MiB`.
pub fn fmt_bytes(n: u64) -> String {
    let mut v = n as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 {
            return if unit == "B" {
                format!("{n} B")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1024.0;
    }
    format!("{v:.1} TiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2gb"), Ok(2 << 30));
        assert!(parse_size("k").is_err());
        assert!(parse_size("4q").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(fmt_size(4096), "4k");
        assert_eq!(fmt_size(1536), "1536");
        assert_eq!(fmt_size(45056), "44k");
        assert_eq!(fmt_size(256 << 20), "256M");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_bytes(162_100_736), "154.6 MiB");
        assert_eq!(fmt_bytes(3 << 40), "3.0 TiB");
    }
}
