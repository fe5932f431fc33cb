//! The keys a (hostile) guest's blkfront writes in xenstore: arbitrary key/value pairs, most of
//! them with the names tapback reads, must parse to rings within the limits or be refused.
#![no_main]
use arbitrary::Arbitrary;
use blkif::xen::frontend_keys::{parse, KeyLimits};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

const NAMES: &[&str] = &[
    "protocol",
    "multi-queue-num-queues",
    "ring-page-order",
    "feature-persistent",
    "ring-ref",
    "ring-ref0",
    "ring-ref1",
    "ring-ref15",
    "event-channel",
    "queue-0/ring-ref",
    "queue-0/ring-ref0",
    "queue-0/ring-ref1",
    "queue-0/event-channel",
    "queue-1/ring-ref0",
    "queue-1/ring-ref1",
    "queue-1/event-channel",
];

#[derive(Debug, Arbitrary)]
struct Input {
    pairs: Vec<(u8, String)>,
    extra: Vec<(String, String)>,
    max_ring_order: u8,
    max_queues: u8,
}

fuzz_target!(|inp: Input| {
    let mut m: HashMap<String, String> = inp.extra.into_iter().collect();
    for (k, v) in inp.pairs {
        m.insert(NAMES[k as usize % NAMES.len()].to_owned(), v);
    }
    let lim = KeyLimits {
        max_ring_order: inp.max_ring_order % 6,
        max_queues: u32::from(inp.max_queues % 20),
    };
    if let Ok(r) = parse(|k| m.get(k).cloned(), lim) {
        assert!(r.ring_order <= lim.max_ring_order);
        assert!(!r.queues.is_empty() && r.queues.len() as u32 <= lim.max_queues.max(1));
        for q in &r.queues {
            assert_eq!(q.ring_refs.len(), 1 << r.ring_order);
        }
    }
});
