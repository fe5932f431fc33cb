//! The iSCSI header and data digest (RFC 7143 section 13.1): CRC32C (Castagnoli), computed by the
//! `crc32c` crate (SSE4.2 with three interleaved streams where the CPU has it, tables otherwise),
//! fed piece by piece (a data segment spread over iovecs, then its padding). The digest goes on
//! the wire as the little-endian bytes of the final CRC.

/// A running CRC32C over several pieces.
#[derive(Clone, Copy, Debug, Default)]
pub struct Crc32c(u32);

impl Crc32c {
    /// A fresh CRC.
    pub fn new() -> Crc32c {
        Crc32c(0)
    }

    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.0 = crc32c::crc32c_append(self.0, data);
    }

    /// The CRC of everything fed so far.
    pub fn finish(&self) -> u32 {
        self.0
    }

    /// The digest as it goes on the wire.
    pub fn digest(&self) -> [u8; 4] {
        self.0.to_le_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc(data: &[u8]) -> u32 {
        let mut c = Crc32c::new();
        c.update(data);
        c.finish()
    }

    #[test]
    fn known_vectors() {
        // RFC 3720 appendix B.4 examples and the usual check value.
        assert_eq!(crc(b"123456789"), 0xe306_9283);
        assert_eq!(crc(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0..32u8).collect();
        assert_eq!(crc(&inc), 0x46dd_794e);
        assert_eq!(Crc32c::new().finish(), 0);
    }

    #[test]
    fn pieces_give_the_whole_and_the_wire_order_is_little_endian() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let whole = crc(&data);
        let mut c = Crc32c::new();
        for piece in data.chunks(333) {
            c.update(piece);
        }
        assert_eq!(c.finish(), whole);
        let mut c = Crc32c::new();
        c.update(b"123456789");
        assert_eq!(c.digest(), [0x83, 0x92, 0x06, 0xe3]);
    }
}
