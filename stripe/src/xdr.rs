//! XDR (RFC 4506): the external data representation ONC RPC carries.
//!
//! Everything is big-endian and padded to 4 bytes. [`Enc`] appends to a growing buffer;
//! [`Dec`] reads from a borrowed slice that came from the network, so every length in it is
//! checked against both the declared maximum of the field and the bytes that are really there
//! before anything is allocated, and padding must be zero (RFC 4506 section 3: the sender sets
//! it to zero; we refuse anything else rather than guess).

use thiserror::Error;

/// Why XDR bytes could not be decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum XdrError {
    /// The bytes end inside an item.
    #[error("XDR data ends early (needed {needed} more bytes)")]
    Short {
        /// Bytes missing.
        needed: usize,
    },
    /// A variable-length item is longer than its declared maximum.
    #[error("XDR {what} of {len} bytes or items exceeds the maximum {max}")]
    TooLong {
        /// What was being read.
        what: &'static str,
        /// Its length.
        len: u32,
        /// The maximum.
        max: u32,
    },
    /// A value outside its type (a bool other than 0/1, an unknown enum value).
    #[error("XDR {what}: bad value {value}")]
    BadValue {
        /// What was being read.
        what: &'static str,
        /// The value.
        value: u32,
    },
    /// Non-zero padding bytes.
    #[error("XDR padding is not zero")]
    Padding,
    /// A string that is not UTF-8.
    #[error("XDR string is not UTF-8")]
    NotUtf8,
    /// Bytes left after the last item.
    #[error("{0} bytes left over after the XDR data")]
    Trailing(usize),
}

/// Bytes of padding after `len` bytes of opaque data.
fn pad(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// An XDR encoder.
#[derive(Debug, Default, Clone)]
pub struct Enc {
    buf: Vec<u8>,
}

impl Enc {
    /// An empty encoder.
    pub fn new() -> Enc {
        Enc::default()
    }

    /// An encoder that appends to `buf`.
    pub fn with(buf: Vec<u8>) -> Enc {
        Enc { buf }
    }

    /// The encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// The bytes so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// `unsigned int`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `int`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `unsigned hyper`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `bool`.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u32(u32::from(v))
    }

    /// Fixed-length `opaque[n]` (the length is not sent).
    pub fn fixed(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self.buf.resize(self.buf.len() + pad(b.len()), 0);
        self
    }

    /// Variable-length `opaque<>`. Callers keep `b` within the field's maximum.
    pub fn opaque(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.fixed(b)
    }

    /// `string<>`.
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.opaque(s.as_bytes())
    }
}

/// An XDR decoder over untrusted bytes.
#[derive(Debug, Clone)]
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    /// A decoder over `buf`.
    pub fn new(buf: &'a [u8]) -> Dec<'a> {
        Dec { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The bytes not yet read.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), XdrError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(XdrError::Trailing(n)),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], XdrError> {
        if self.remaining() < n {
            return Err(XdrError::Short {
                needed: n - self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// `unsigned int`.
    pub fn u32(&mut self) -> Result<u32, XdrError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// `int`.
    pub fn i32(&mut self) -> Result<i32, XdrError> {
        Ok(self.u32()? as i32)
    }

    /// `unsigned hyper`.
    pub fn u64(&mut self) -> Result<u64, XdrError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// `bool`.
    pub fn bool(&mut self) -> Result<bool, XdrError> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(XdrError::BadValue {
                what: "bool",
                value: v,
            }),
        }
    }

    /// Fixed-length `opaque[n]`.
    pub fn fixed(&mut self, n: usize) -> Result<&'a [u8], XdrError> {
        let b = self.take(n)?;
        if self.take(pad(n))?.iter().any(|&x| x != 0) {
            return Err(XdrError::Padding);
        }
        Ok(b)
    }

    /// Variable-length `opaque<max>`.
    pub fn opaque(&mut self, max: u32, what: &'static str) -> Result<&'a [u8], XdrError> {
        let len = self.u32()?;
        if len > max {
            return Err(XdrError::TooLong { what, len, max });
        }
        self.fixed(len as usize)
    }

    /// `string<max>` (UTF-8 required).
    pub fn string(&mut self, max: u32, what: &'static str) -> Result<String, XdrError> {
        let b = self.opaque(max, what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| XdrError::NotUtf8)
    }

    /// The count of a variable-length array `T<max>` whose items take at least `min_item`
    /// bytes each; checked against what is left, so a hostile count allocates nothing.
    pub fn array_len(
        &mut self,
        max: u32,
        min_item: usize,
        what: &'static str,
    ) -> Result<usize, XdrError> {
        let n = self.u32()?;
        if n > max {
            return Err(XdrError::TooLong { what, len: n, max });
        }
        let need = (n as usize).saturating_mul(min_item.max(1));
        if need > self.remaining() {
            return Err(XdrError::Short {
                needed: need - self.remaining(),
            });
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let mut e = Enc::new();
        e.u32(7)
            .i32(-2)
            .u64(1 << 40)
            .bool(true)
            .string("abcde")
            .opaque(&[]);
        let b = e.into_bytes();
        // 4 + 4 + 8 + 4 + (4 + 5 + 3 pad) + 4
        assert_eq!(b.len(), 36);
        assert_eq!(&b[20..24], &[0, 0, 0, 5]);
        assert_eq!(&b[29..32], &[0, 0, 0]);
        let mut d = Dec::new(&b);
        assert_eq!(d.u32().unwrap(), 7);
        assert_eq!(d.i32().unwrap(), -2);
        assert_eq!(d.u64().unwrap(), 1 << 40);
        assert!(d.bool().unwrap());
        assert_eq!(d.string(16, "s").unwrap(), "abcde");
        assert_eq!(d.opaque(0, "o").unwrap(), b"");
        d.finish().unwrap();
    }

    #[test]
    fn hostile_input() {
        // A string longer than its maximum, and one longer than the data.
        let mut e = Enc::new();
        e.string("abcdefgh");
        let b = e.into_bytes();
        assert!(matches!(
            Dec::new(&b).string(4, "name"),
            Err(XdrError::TooLong { len: 8, max: 4, .. })
        ));
        assert!(matches!(
            Dec::new(&b[..10]).string(16, "name"),
            Err(XdrError::Short { .. })
        ));
        // Non-zero padding.
        let mut e = Enc::new();
        e.string("abc");
        let mut b = e.into_bytes();
        b[7] = 1;
        assert_eq!(Dec::new(&b).string(8, "s"), Err(XdrError::Padding));
        // A bool of 2, an array count that cannot fit, bad UTF-8, trailing bytes.
        assert!(Dec::new(&[0, 0, 0, 2]).bool().is_err());
        assert!(Dec::new(&[0, 0, 0xff, 0xff])
            .array_len(1 << 20, 8, "a")
            .is_err());
        assert_eq!(
            Dec::new(&[0, 0, 0, 1, 0xff, 0, 0, 0]).string(8, "s"),
            Err(XdrError::NotUtf8)
        );
        let d = Dec::new(&[0, 0]);
        assert_eq!(d.finish(), Err(XdrError::Trailing(2)));
    }
}
