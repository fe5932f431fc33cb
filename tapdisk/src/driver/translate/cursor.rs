//! Cutting an IO's iovecs at extent boundaries: pointers into the guest's pages, no data
//! copied.

/// Walks the iovecs of an IO, handing out slices of them.
pub(super) struct Cursor<'a> {
    src: &'a [libc::iovec],
    i: usize,
    off: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the first byte of `src`.
    pub(super) fn new(src: &'a [libc::iovec]) -> Cursor<'a> {
        Cursor { src, i: 0, off: 0 }
    }

    /// Appends iovecs covering the next `n` bytes to `out`, merging with the last one when
    /// contiguous and at or after index `first` (the start of the run being built). False if
    /// the iovecs hold fewer bytes.
    pub(super) fn take(&mut self, mut n: u64, out: &mut Vec<libc::iovec>, first: usize) -> bool {
        while n > 0 {
            let Some(v) = self.src.get(self.i) else {
                return false;
            };
            let avail = v.iov_len - self.off;
            let k = (avail as u64).min(n) as usize;
            // SAFETY: `off + k <= iov_len`: the pointer stays inside the iovec's buffer.
            let base = unsafe { v.iov_base.cast::<u8>().add(self.off) };
            let mine = out.len() > first;
            match out.last_mut() {
                Some(l) if mine && l.iov_base as usize + l.iov_len == base as usize => {
                    l.iov_len += k
                }
                _ => out.push(libc::iovec {
                    iov_base: base.cast(),
                    iov_len: k,
                }),
            }
            self.off += k;
            n -= k as u64;
            if self.off == v.iov_len {
                self.i += 1;
                self.off = 0;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::file::iov;

    #[test]
    fn cursor_cuts_iovecs_at_part_boundaries_and_merges_neighbours() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 8192];
        let src = [iov(&mut a), iov(&mut b)];
        let mut cur = Cursor::new(&src);
        let mut out = Vec::new();
        assert!(cur.take(1024, &mut out, 0));
        assert!(cur.take(5120, &mut out, 1));
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].iov_len, 1024);
        assert_eq!(out[1].iov_len, 3072);
        assert_eq!(out[1].iov_base as usize, a.as_ptr() as usize + 1024);
        assert_eq!(out[2].iov_len, 2048);
        // Continuing the same part merges with the iovec it ended in.
        assert!(cur.take(1024, &mut out, 1));
        assert_eq!(out.len(), 3);
        assert_eq!(out[2].iov_len, 3072);
        assert!(!cur.take(8192, &mut out, 3), "more than the iovecs hold");
    }
}
