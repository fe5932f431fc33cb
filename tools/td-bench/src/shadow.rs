//! The verifier's model of the disk: what every sector should hold, and which sectors have a
//! request in flight.
//!
//! Every write gets a fresh generation number; a sector's expected content is a deterministic
//! function of (seed, sector, generation) ([`fill_sector`]), so the shadow only stores a `u32`
//! per sector. Generation [`ZERO`] means "all zeroes" (a fresh sparse image, or discarded);
//! [`UNKNOWN`] means "not checkable" (an existing image we did not write, or a write that
//! failed). The first 16 bytes of a pattern sector name its sector, generation and run, so a
//! mismatch can say whose data turned up instead.
//!
//! Two requests whose sector ranges overlap complete in an undefined order when one of them
//! writes, so the verifier never has both in flight: [`Shadow::can_read`] and
//! [`Shadow::can_write`] check a per-sector busy count before a request is issued.

use crate::util::mix64;

/// Bytes per blkif sector.
pub const SECTOR: usize = 512;
/// Generation of all-zero sectors.
pub const ZERO: u32 = 0;
/// Generation of sectors whose content is not known.
pub const UNKNOWN: u32 = u32::MAX;
/// Busy-count bit: a write (or discard) is in flight on the sector.
const WRITER: u16 = 0x8000;

/// What guest pages hold where the backend must not write (16 bytes, repeated).
pub const CANARY: &[u8; 16] = b"td-bench canary ";

/// The 32-bit tag of a run, stored in every pattern sector (never 0, so a zeroed header is
/// never mistaken for one).
pub fn run_tag(seed: u64) -> u32 {
    (mix64(seed ^ 0x7464_2d62_656e_6368) as u32) | 1
}

/// Writes the expected content of `sector` at generation `gen` into `out` (512 bytes).
/// `gen` must not be [`UNKNOWN`].
pub fn fill_sector(seed: u64, sector: u64, gen: u32, out: &mut [u8]) {
    debug_assert_eq!(out.len(), SECTOR);
    if gen == ZERO {
        out.fill(0);
        return;
    }
    out[0..8].copy_from_slice(&sector.to_le_bytes());
    out[8..12].copy_from_slice(&gen.to_le_bytes());
    out[12..16].copy_from_slice(&run_tag(seed).to_le_bytes());
    let mut x = mix64(seed ^ sector.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (u64::from(gen) << 17));
    for w in out[16..].chunks_exact_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        w.copy_from_slice(&mix64(x).to_le_bytes());
    }
}

/// Fills `out` with the canary pattern.
pub fn fill_canary(out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = CANARY[i % CANARY.len()];
    }
}

/// Says in words what a 512-byte sector that failed its check holds instead.
pub fn describe(seed: u64, data: &[u8]) -> String {
    if data.iter().all(|&b| b == 0) {
        return "zeroes".into();
    }
    if data.chunks(16).all(|c| c == &CANARY[..c.len()]) {
        return "the untouched canary (the backend did not write it)".into();
    }
    let word = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap_or([0; 8]));
    let tag = u32::from_le_bytes(data[12..16].try_into().unwrap_or([0; 4]));
    if tag == run_tag(seed) {
        let (sector, gen) = (word(0), word(8) as u32);
        let mut want = [0u8; SECTOR];
        fill_sector(seed, sector, gen, &mut want);
        if want[..] == data[..] {
            return format!("the data of sector {sector} generation {gen}");
        }
        return format!("a damaged copy of sector {sector} generation {gen}");
    }
    let head: Vec<String> = data[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("unrecognised bytes ({}...)", head.join(""))
}

/// A half-open sector range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// First sector.
    pub start: u64,
    /// Sectors.
    pub len: u64,
}

impl Range {
    fn idx(&self) -> std::ops::Range<usize> {
        self.start as usize..(self.start + self.len) as usize
    }
}

/// Expected generation and in-flight state of every sector.
#[derive(Debug)]
pub struct Shadow {
    gens: Vec<u32>,
    busy: Vec<u16>,
}

impl Shadow {
    /// A shadow of `sectors` sectors, all zero (`known_zero`) or all unknown.
    pub fn new(sectors: u64, known_zero: bool) -> Shadow {
        let n = sectors as usize;
        Shadow {
            gens: vec![if known_zero { ZERO } else { UNKNOWN }; n],
            busy: vec![0; n],
        }
    }

    /// Sectors covered.
    pub fn sectors(&self) -> u64 {
        self.gens.len() as u64
    }

    /// Expected generation of `sector`.
    pub fn gen(&self, sector: u64) -> u32 {
        self.gens[sector as usize]
    }

    /// Sets the expected generation of every sector of `r`.
    pub fn set(&mut self, r: Range, gen: u32) {
        self.gens[r.idx()].fill(gen);
    }

    /// Whether a read of `r` may be issued now (no write in flight on it).
    pub fn can_read(&self, r: Range) -> bool {
        self.busy[r.idx()].iter().all(|&b| b & WRITER == 0)
    }

    /// Whether a write of `r` may be issued now (nothing in flight on it).
    pub fn can_write(&self, r: Range) -> bool {
        self.busy[r.idx()].iter().all(|&b| b == 0)
    }

    /// Marks a read of `r` in flight.
    pub fn begin_read(&mut self, r: Range) {
        for b in &mut self.busy[r.idx()] {
            debug_assert!(*b & WRITER == 0 && *b < WRITER - 1);
            *b += 1;
        }
    }

    /// Marks a read of `r` done.
    pub fn end_read(&mut self, r: Range) {
        for b in &mut self.busy[r.idx()] {
            debug_assert!(*b & !WRITER > 0);
            *b -= 1;
        }
    }

    /// Marks a write of `r` in flight.
    pub fn begin_write(&mut self, r: Range) {
        for b in &mut self.busy[r.idx()] {
            debug_assert_eq!(*b, 0);
            *b = WRITER;
        }
    }

    /// Marks a write of `r` done.
    pub fn end_write(&mut self, r: Range) {
        for b in &mut self.busy[r.idx()] {
            debug_assert_eq!(*b, WRITER);
            *b = 0;
        }
    }

    /// Whether nothing is in flight anywhere (tests and final checks).
    pub fn idle(&self) -> bool {
        self.busy.iter().all(|&b| b == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, len: u64) -> Range {
        Range { start, len }
    }

    #[test]
    fn overlap_rules() {
        let mut s = Shadow::new(100, true);
        assert!(s.can_read(r(0, 100)) && s.can_write(r(0, 100)));
        s.begin_read(r(10, 10));
        assert!(s.can_read(r(15, 10)), "reads may overlap reads");
        assert!(
            !s.can_write(r(19, 5)),
            "a write may not overlap an in-flight read"
        );
        assert!(s.can_write(r(20, 5)), "adjacent is not overlapping");
        assert!(s.can_write(r(0, 10)));
        s.begin_read(r(15, 10));
        s.begin_write(r(30, 1));
        assert!(
            !s.can_read(r(25, 6)),
            "a read may not overlap an in-flight write"
        );
        assert!(!s.can_write(r(30, 1)), "nor may a write");
        assert!(s.can_read(r(31, 69)));
        s.end_read(r(10, 10));
        assert!(
            !s.can_write(r(15, 1)),
            "the second read still holds sector 15"
        );
        assert!(s.can_write(r(10, 5)));
        s.end_read(r(15, 10));
        s.end_write(r(30, 1));
        assert!(s.idle());
        assert!(s.can_write(r(0, 100)));
    }

    #[test]
    fn generations() {
        let mut s = Shadow::new(10, true);
        assert_eq!(s.gen(9), ZERO);
        s.set(r(2, 3), 7);
        assert_eq!((s.gen(1), s.gen(2), s.gen(4), s.gen(5)), (ZERO, 7, 7, ZERO));
        let u = Shadow::new(10, false);
        assert_eq!(u.gen(0), UNKNOWN);
        assert_eq!(u.sectors(), 10);
    }

    #[test]
    fn patterns_are_distinct_and_recognisable() {
        let seed = 0x1234;
        let mut a = [0u8; SECTOR];
        let mut b = [0u8; SECTOR];
        fill_sector(seed, 5, 1, &mut a);
        fill_sector(seed, 5, 1, &mut b);
        assert_eq!(a, b, "deterministic");
        for (sector, gen, s) in [(6, 1, seed), (5, 2, seed), (5, 1, seed + 1)] {
            fill_sector(s, sector, gen, &mut b);
            // Every 8-byte word of the body differs, not just the header.
            let same = a[16..]
                .chunks(8)
                .zip(b[16..].chunks(8))
                .filter(|(x, y)| x == y)
                .count();
            assert_eq!(same, 0, "sector {sector} gen {gen} seed {s}");
        }
        fill_sector(seed, 5, ZERO, &mut b);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(describe(seed, &b), "zeroes");
        fill_sector(seed, 77, 3, &mut b);
        assert_eq!(describe(seed, &b), "the data of sector 77 generation 3");
        b[300] ^= 1;
        assert_eq!(
            describe(seed, &b),
            "a damaged copy of sector 77 generation 3"
        );
        fill_canary(&mut b);
        assert!(describe(seed, &b).contains("canary"));
        b.fill(0xff);
        assert!(describe(seed, &b).starts_with("unrecognised bytes (ffff"));
    }
}
