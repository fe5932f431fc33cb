//! A store that injects IO errors and simulates crashes, for tests.
//!
//! [`FaultBacking`] keeps two versions of the bytes: what a reader sees now, and what is
//! durable (everything up to the last completed flush). [`FaultBacking::crash`] returns the
//! store as a power cut would leave it: the durable bytes plus, for every write since the last
//! flush, chosen by a seeded generator, nothing, all of it, or some of its 512-byte sectors
//! (a torn write). [`FaultBacking::fail_after`] makes the n-th following operation fail.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backing::{Backing, MemBacking};

/// A small deterministic generator (SplitMix64) for tests, crash points and benchmarks.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Which operations [`FaultBacking::fail_after`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOps {
    /// Reads only.
    Reads,
    /// Writes and size changes only.
    Writes,
    /// Flushes only.
    Flushes,
    /// Everything.
    All,
}

#[derive(Debug)]
struct Pending {
    offset: u64,
    data: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
    pending_grow: Option<u64>,
    countdown: Option<(u64, FaultOps, bool)>,
    injected: u64,
    writes: u64,
    flushes: u64,
}

/// A fault-injecting, crash-simulating store. Clones share their state.
#[derive(Clone, Debug, Default)]
pub struct FaultBacking {
    state: Arc<Mutex<State>>,
}

impl FaultBacking {
    /// An empty store.
    pub fn new() -> FaultBacking {
        FaultBacking::default()
    }

    /// A store holding `bytes`, all durable.
    pub fn from_bytes(bytes: Vec<u8>) -> FaultBacking {
        let s = State {
            current: bytes.clone(),
            durable: bytes,
            ..State::default()
        };
        FaultBacking {
            state: Arc::new(Mutex::new(s)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the `n`-th following operation of kind `ops` fail with an IO error (n = 0: the
    /// next one); with `sticky`, every later one fails too.
    pub fn fail_after(&self, n: u64, ops: FaultOps, sticky: bool) {
        self.lock().countdown = Some((n, ops, sticky));
    }

    /// Stops injecting errors.
    pub fn heal(&self) {
        self.lock().countdown = None;
    }

    /// Errors injected so far.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// Writes and flushes seen so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.writes, s.flushes)
    }

    /// Writes since the last flush.
    pub fn unflushed(&self) -> usize {
        self.lock().pending.len()
    }

    /// The bytes a reader sees now.
    pub fn current(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// The store after a simulated power cut, as a new, healthy store: durable bytes, plus
    /// each unflushed write dropped, applied, or torn at 512-byte sectors, as `seed` decides.
    pub fn crash(&self, seed: u64) -> FaultBacking {
        let s = self.lock();
        let mut rng = Rng::new(seed);
        let mut bytes = s.durable.clone();
        if let Some(g) = s.pending_grow {
            if rng.below(2) == 0 && g as usize > bytes.len() {
                bytes.resize(g as usize, 0);
            }
        }
        for w in &s.pending {
            let start = w.offset as usize;
            match rng.below(3) {
                0 => continue,
                1 => apply(&mut bytes, start, &w.data),
                _ => {
                    for (i, sector) in w.data.chunks(512).enumerate() {
                        if rng.below(2) == 0 {
                            apply(&mut bytes, start + i * 512, sector);
                        }
                    }
                }
            }
        }
        FaultBacking::from_bytes(bytes)
    }

    /// The durable bytes as an in-memory store (a crash that lost every unflushed write).
    pub fn durable(&self) -> MemBacking {
        MemBacking::from_bytes(self.lock().durable.clone())
    }

    fn check(&self, s: &mut State, kind: FaultOps) -> io::Result<()> {
        if let Some((n, ops, sticky)) = s.countdown {
            if ops == FaultOps::All || ops == kind {
                if n == 0 {
                    s.injected += 1;
                    if !sticky {
                        s.countdown = None;
                    }
                    return Err(io::Error::other("injected IO error"));
                }
                s.countdown = Some((n - 1, ops, sticky));
            }
        }
        Ok(())
    }
}

fn apply(bytes: &mut Vec<u8>, start: usize, data: &[u8]) {
    let end = start + data.len();
    if end > bytes.len() {
        bytes.resize(end, 0);
    }
    bytes[start..end].copy_from_slice(data);
}

impl Backing for FaultBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        self.check(&mut s, FaultOps::Reads)?;
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        if end > s.current.len() {
            return Err(eof());
        }
        buf.copy_from_slice(&s.current[start..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        self.check(&mut s, FaultOps::Writes)?;
        let start = usize::try_from(offset).map_err(|_| eof())?;
        apply(&mut s.current, start, buf);
        s.pending.push(Pending {
            offset,
            data: buf.to_vec(),
        });
        s.writes += 1;
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let mut s = self.lock();
        self.check(&mut s, FaultOps::Flushes)?;
        let pending = std::mem::take(&mut s.pending);
        if let Some(g) = s.pending_grow.take() {
            if g as usize > s.durable.len() {
                s.durable.resize(g as usize, 0);
            }
        }
        for w in pending {
            apply(&mut s.durable, w.offset as usize, &w.data);
        }
        s.flushes += 1;
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        let mut s = self.lock();
        self.check(&mut s, FaultOps::Writes)?;
        let size = usize::try_from(size).map_err(|_| eof())?;
        if size > s.current.len() {
            s.current.resize(size, 0);
            let g = s.pending_grow.unwrap_or(0).max(size as u64);
            s.pending_grow = Some(g);
        }
        Ok(())
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "beyond the end of the store")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_flushed_writes_and_some_of_the_rest() {
        let f = FaultBacking::new();
        f.write_at(&[1u8; 1024], 0).unwrap();
        f.flush().unwrap();
        f.write_at(&[2u8; 1024], 0).unwrap();
        let mut seen = std::collections::HashSet::new();
        for seed in 0..64 {
            let c = f.crash(seed);
            let mut b = [0u8; 1024];
            c.read_at(&mut b, 0).unwrap();
            // Each sector is the old or the new value.
            for s in b.chunks(512) {
                assert!(s.iter().all(|&x| x == s[0]) && (s[0] == 1 || s[0] == 2));
            }
            seen.insert((b[0], b[512]));
        }
        assert_eq!(seen.len(), 4, "dropped, applied and torn all happen");
    }

    #[test]
    fn injected_errors_fire_once_or_stick() {
        let f = FaultBacking::new();
        f.fail_after(1, FaultOps::Writes, false);
        f.write_at(&[1], 0).unwrap();
        assert!(f.write_at(&[1], 0).is_err());
        f.write_at(&[1], 0).unwrap();
        f.fail_after(0, FaultOps::Flushes, true);
        assert!(f.flush().is_err());
        assert!(f.flush().is_err());
        f.write_at(&[1], 0).unwrap();
        f.heal();
        f.flush().unwrap();
        assert_eq!(f.injected(), 3);
    }
}
