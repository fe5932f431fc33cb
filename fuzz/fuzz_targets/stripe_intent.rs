//! Damaged write-intent records (`stripe::intent::Record::decode`): arbitrary bytes, usually
//! with a correct checksum recomputed so the damage reaches the checks behind it. Never a panic
//! or an unbounded allocation; whatever decodes has its regions in range and ascending, and
//! round-trips through `encode`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stripe::intent::{Record, HEADER};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let region = 1u64 << 20;
    let size = (u64::from(mode) + 1) << 20;
    let mut b = body.to_vec();
    if mode & 1 == 0 && b.len() >= HEADER {
        // The header's sizes as the disk has them, and a checksum that matches.
        b[..8].copy_from_slice(b"TDSTWIR1");
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER as u32).to_le_bytes());
        b[16..24].copy_from_slice(&region.to_le_bytes());
        b[24..32].copy_from_slice(&size.to_le_bytes());
        b[48..52].copy_from_slice(&(size.div_ceil(region) as u32).to_le_bytes());
        let n = u32::from_le_bytes([b[52], b[53], b[54], b[55]]) as usize;
        let end = (HEADER + 4 * n.min(1 << 16)).min(b.len());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..60]), &b[HEADER..end]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(r) = Record::decode(&b, size, region) {
        assert!(r.marked.windows(2).all(|w| w[0] < w[1]));
        assert!(r.marked.iter().all(|&x| x < r.regions()));
        assert_eq!(Record::decode(&r.encode(), size, region).unwrap(), r);
    }
});
