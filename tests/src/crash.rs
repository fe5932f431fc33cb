//! What the crash tests share: a seeded generator, sector contents that tell which write they
//! came from, and what a sector may hold after a crash.

/// Bytes per sector.
pub const SECTOR: u64 = 512;

/// xorshift64*, seeded.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value below `n` (which must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Sector `s` as write `id` writes it: the id and the sector number, repeated.
pub fn sector_data(id: u32, s: u64, out: &mut [u8]) {
    for (i, c) in out.chunks_exact_mut(8).enumerate() {
        c[..4].copy_from_slice(&id.to_le_bytes());
        c[4..].copy_from_slice(&((s as u32) ^ (i as u32)).to_le_bytes());
    }
}

/// Fills `out` as write `id` writes the sectors from `first` on.
pub fn sectors_data(id: u32, first: u64, out: &mut [u8]) {
    for (k, c) in out.chunks_mut(SECTOR as usize).enumerate() {
        sector_data(id, first + k as u64, c);
    }
}

/// Which write a sector's bytes came from (0: zeroes, never written); `None` if they match no
/// write (torn or garbage).
pub fn sector_id(s: u64, b: &[u8]) -> Option<u32> {
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut want = [0u8; SECTOR as usize];
    sector_data(id, s, &mut want);
    (want[..] == *b).then_some(id)
}

/// What a sector may hold after a crash.
#[derive(Clone, Debug, Default)]
pub struct SectorModel {
    /// Its content at the last completed flush (a write id; 0: zeroes).
    pub durable: u32,
    /// Writes to it since: `(submission sequence, id)`.
    pub since: Vec<(u64, u32)>,
}

impl SectorModel {
    /// Whether a sector found holding `got` ([`sector_id`]) is allowed: its content at the
    /// last flush, or a write made since.
    fn allows(&self, got: Option<u32>) -> bool {
        got.is_some_and(|g| g == self.durable || self.since.iter().any(|&(_, i)| i == g))
    }
}

/// A range of 1 to 64 sectors of a disk of `sectors` (at least 64) for a crash test's next
/// write: `(first, count)`, half of the time starting on a 4 KiB boundary.
pub fn random_range(rng: &mut Rng, sectors: u64) -> (u64, u64) {
    let n = 1 + rng.below(64);
    let s = if rng.below(2) == 0 {
        rng.below(sectors - 64) & !7
    } else {
        rng.below(sectors - n)
    };
    (s, n)
}

/// Checks the whole disk `disk` read after crash round `round` against `model`: every sector
/// holds its content at the last completed flush or a write made since. Then the model starts
/// the next round from what the disk holds now.
pub fn check_after_crash(round: u32, disk: &[u8], model: &mut [SectorModel]) {
    for (s, m) in model.iter_mut().enumerate() {
        let b = &disk[s * SECTOR as usize..(s + 1) * SECTOR as usize];
        let got = sector_id(s as u64, b);
        assert!(
            m.allows(got),
            "round {round}: sector {s} holds {got:?}; at the last flush it held write {}, \
             written since: {:?}",
            m.durable,
            m.since
        );
        m.durable = got.unwrap_or(0);
        m.since.clear();
    }
}
