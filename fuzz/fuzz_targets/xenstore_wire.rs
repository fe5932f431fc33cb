//! xenstore wire messages as they come back from the daemon (payloads largely written by
//! guests): headers, string lists and watch events decode or are refused, never panic, and a
//! header never admits a payload over the protocol's 4 KiB.
#![no_main]
use blkif::xen::xenstore::{parse_header, parse_watch_event, split_strings, PAYLOAD_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 16 {
        let mut h = [0u8; 16];
        h.copy_from_slice(&data[..16]);
        if let Ok((_, _, _, len)) = parse_header(&h) {
            assert!(len <= PAYLOAD_MAX);
        }
    }
    if let Ok(v) = split_strings(data) {
        assert!(v.iter().all(|s| !s.contains('\0')));
    }
    let _ = parse_watch_event(data);
});
