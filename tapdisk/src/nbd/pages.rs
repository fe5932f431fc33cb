//! First-fit allocation of runs of pages: the data buffers of an NBD connection's ring.

/// First-fit allocation of page runs in `0..n`.
pub(super) struct PageRuns {
    used: Vec<u64>,
    n: u32,
    /// Where the next search starts.
    pub(super) hint: u32,
    /// One past the highest page handed out since the last release.
    pub(super) high: u32,
}

impl PageRuns {
    pub(super) fn new(n: u32) -> PageRuns {
        PageRuns {
            used: vec![0; n.div_ceil(64) as usize],
            n,
            hint: 0,
            high: 0,
        }
    }

    pub(super) fn is_used(&self, p: u32) -> bool {
        self.used[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    fn set(&mut self, first: u32, len: u32, used: bool) {
        for p in first..first + len {
            let (w, b) = ((p / 64) as usize, p % 64);
            if used {
                self.used[w] |= 1 << b;
            } else {
                self.used[w] &= !(1 << b);
            }
        }
    }

    /// A run of `len` free pages, marked used.
    pub(super) fn alloc(&mut self, len: u32) -> Option<u32> {
        if len == 0 || len > self.n {
            return None;
        }
        for start in [self.hint, 0] {
            let mut p = start;
            while p + len <= self.n {
                match (p..p + len).rev().find(|&q| self.is_used(q)) {
                    Some(q) => p = q + 1,
                    None => {
                        self.set(p, len, true);
                        self.hint = p + len;
                        self.high = self.high.max(p + len);
                        return Some(p);
                    }
                }
            }
        }
        None
    }

    pub(super) fn free(&mut self, first: u32, len: u32) {
        self.set(first, len, false);
        self.hint = self.hint.min(first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_runs_are_first_fit_and_reused() {
        let mut r = PageRuns::new(10);
        assert_eq!(r.alloc(4), Some(0));
        assert_eq!(r.alloc(4), Some(4));
        assert_eq!(r.alloc(4), None);
        r.free(0, 4);
        assert_eq!(r.alloc(3), Some(0));
        assert_eq!(r.alloc(2), Some(8));
        assert_eq!(r.alloc(1), Some(3));
        assert_eq!(r.alloc(1), None);
        assert_eq!(r.high, 10);
        assert_eq!(r.alloc(0), None);
        assert_eq!(r.alloc(11), None);
    }
}
