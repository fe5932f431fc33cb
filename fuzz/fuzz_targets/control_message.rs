//! Control-socket messages: whatever parses must serialise back to something that parses to
//! the same command (the daemon answers malformed lines with an error reply).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tapdisk_control::proto::RequestMsg;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<RequestMsg>(data) {
        let again = serde_json::to_vec(&m).expect("serialise");
        let back: RequestMsg = serde_json::from_slice(&again).expect("reparse");
        assert_eq!(back, m);
    }
});
