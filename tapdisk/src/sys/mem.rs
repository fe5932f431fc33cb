//! Memory whose size a setting decides, allocated so that failing is an error the caller
//! reports (the VBD or ring that wanted it fails), never an abort of the process.

use std::alloc::Layout;
use std::collections::TryReserveError;

/// `len` zero bytes, or `None` if the memory cannot be had. Like `vec![0; len]`, the bytes
/// come from fresh zeroed pages the kernel maps when they are first touched, so a large
/// buffer costs only what is used of it.
pub fn try_zeroed_bytes(len: usize) -> Option<Box<[u8]>> {
    if len == 0 {
        return Some(Box::default());
    }
    let layout = Layout::array::<u8>(len).ok()?;
    // SAFETY: `layout` has a non-zero size (len > 0).
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a live allocation of the global allocator of `len` bytes with alignment 1
    // (the layout of `[u8; len]`, which is what the Box frees it with), every byte is zero (a
    // valid `u8`), and nothing else owns it.
    Some(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, len)) })
}

/// A vector of `len` copies of `value`, or the allocation error.
pub fn try_filled<T: Clone>(len: usize, value: T) -> Result<Vec<T>, TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)?;
    v.resize(len, value);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_bytes_are_zero_and_too_much_is_none() {
        let b = try_zeroed_bytes(1 << 20).unwrap();
        assert_eq!(b.len(), 1 << 20);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(try_zeroed_bytes(0).unwrap().len(), 0);
        // More than any machine has: refused, not an abort.
        assert!(try_zeroed_bytes(usize::MAX / 2).is_none());
        assert!(try_filled(usize::MAX / 16, 0u64).is_err());
        assert_eq!(try_filled(3, 7u8).unwrap(), vec![7, 7, 7]);
    }
}
