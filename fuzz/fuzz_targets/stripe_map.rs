//! Damaged mapping files: arbitrary text (usually with its checksum line recomputed so the
//! damage reaches the parser behind it) through `StripeMap::parse`. Never a panic or an
//! unbounded allocation; whatever parses, validates and round-trips through `to_text`, and
//! its layout arithmetic stays inside the extents for every offset tried. The same bytes go
//! through the stale-marks parser too (`stripe::path::parse_stale_marks`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use stripe::map::StripeMap;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    // Marks for a disk of up to 256 extents and 4 replicas: only in-range marks come out.
    let (extents, replicas) = (usize::from(mode), usize::from(mode >> 6) + 1);
    let marks = stripe::path::parse_stale_marks(body, extents, replicas);
    assert_eq!(marks.len(), extents * replicas);
    let mut bytes = body.to_vec();
    if mode & 1 == 0 {
        // Most inputs: a correct checksum line after the body.
        if !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(format!("crc32c {crc:08x}\n").as_bytes());
    }
    if let Ok(m) = StripeMap::parse(&bytes) {
        m.check().expect("a parsed map validates");
        let again = StripeMap::parse(m.to_text().as_bytes()).expect("round trip");
        assert_eq!(again, m);
        let g = m.geometry;
        for k in 0..64u64 {
            let off = (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) % g.size) & !511;
            let l = g.locate(off);
            assert!((l.index as usize) < m.extents.len());
            assert!(l.offset + l.run <= g.extent_size);
        }
    }
});
