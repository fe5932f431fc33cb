//! The keys a blkfront writes under `/local/domain/<domid>/device/vbd/<devid>/`, parsed and
//! checked. The guest writes them, so every value is untrusted text.
//!
//! One queue: `ring-ref` (order 0) or `ring-page-order` + `ring-ref0..ring-ref{2^order - 1}`,
//! and `event-channel`. Several queues (`multi-queue-num-queues = N`): the same keys under
//! `queue-0/` .. `queue-{N-1}/`, with `ring-page-order` shared at the top. `protocol` names
//! the ring layout (`x86_32-abi` or `x86_64-abi`; absent means the backend's native one).

use crate::protocol::{Abi, GrantRef};

/// What this backend accepts.
#[derive(Clone, Copy, Debug)]
pub struct KeyLimits {
    /// Largest `ring-page-order` (the backend advertised `max-ring-page-order`).
    pub max_ring_order: u8,
    /// Largest `multi-queue-num-queues` (advertised as `multi-queue-max-queues`).
    pub max_queues: u32,
}

/// One queue's ring.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueKeys {
    /// Grant references of the ring pages, in order.
    pub ring_refs: Vec<GrantRef>,
    /// The frontend's event-channel port.
    pub evtchn: u32,
}

/// Everything a backend needs to connect to a frontend's rings.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrontendRings {
    /// Ring layout.
    pub abi: Abi,
    /// Each ring has `2^ring_order` pages.
    pub ring_order: u8,
    /// One entry per queue.
    pub queues: Vec<QueueKeys>,
    /// The frontend wants persistent grants.
    pub persistent: bool,
}

pub use crate::error::KeyError;

fn bad(key: &str, value: &str, why: &'static str) -> KeyError {
    KeyError::Bad {
        key: key.to_owned(),
        value: value.chars().take(64).collect(),
        why,
    }
}

/// Parses an unsigned decimal number as xenbus_scanf("%u") would accept it, strictly.
fn number(key: &str, value: &str) -> Result<u32, KeyError> {
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(key, value, "not an unsigned decimal number"));
    }
    value
        .parse::<u32>()
        .map_err(|_| bad(key, value, "out of range"))
}

/// Reads the frontend's keys through `get` (a key relative to the frontend's directory, e.g.
/// `queue-1/ring-ref0`) and checks them against `limits`.
pub fn parse(
    get: impl FnMut(&str) -> Option<String>,
    limits: KeyLimits,
) -> crate::Result<FrontendRings> {
    Ok(parse_keys(get, limits)?)
}

fn parse_keys(
    mut get: impl FnMut(&str) -> Option<String>,
    limits: KeyLimits,
) -> Result<FrontendRings, KeyError> {
    let abi = match get("protocol") {
        None => Abi::NATIVE,
        Some(p) => Abi::from_name(&p).ok_or_else(|| bad("protocol", &p, "unknown ring ABI"))?,
    };
    let nq = match get("multi-queue-num-queues") {
        None => 1,
        Some(v) => {
            let n = number("multi-queue-num-queues", &v)?;
            if n == 0 || n > limits.max_queues {
                return Err(bad(
                    "multi-queue-num-queues",
                    &v,
                    "outside 1..=multi-queue-max-queues",
                ));
            }
            n
        }
    };
    let order = match get("ring-page-order") {
        None => None,
        Some(v) => {
            let o = number("ring-page-order", &v)?;
            if o > u32::from(limits.max_ring_order) {
                return Err(bad("ring-page-order", &v, "above max-ring-page-order"));
            }
            Some(o as u8)
        }
    };
    let persistent = match get("feature-persistent") {
        None => false,
        Some(v) => number("feature-persistent", &v)? != 0,
    };
    let mut queues = Vec::with_capacity(nq as usize);
    for q in 0..nq {
        let dir = if nq == 1 {
            String::new()
        } else {
            format!("queue-{q}/")
        };
        let mut read = |k: String| -> Result<u32, KeyError> {
            let v = get(&k).ok_or_else(|| KeyError::Missing(k.clone()))?;
            number(&k, &v)
        };
        let ring_refs = match order {
            None => vec![read(format!("{dir}ring-ref"))?],
            Some(o) => (0..1u32 << o)
                .map(|i| read(format!("{dir}ring-ref{i}")))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let evtchn = read(format!("{dir}event-channel"))?;
        queues.push(QueueKeys { ring_refs, evtchn });
    }
    Ok(FrontendRings {
        abi,
        ring_order: order.unwrap_or(0),
        queues,
        persistent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const LIM: KeyLimits = KeyLimits {
        max_ring_order: 4,
        max_queues: 4,
    };

    fn run(kv: &[(&str, &str)]) -> Result<FrontendRings, KeyError> {
        let m: HashMap<String, String> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(|k| m.get(k).cloned(), LIM).map_err(|e| match e {
            crate::Error::FrontendKeys(k) => k,
            other => panic!("not a key error: {other}"),
        })
    }

    #[test]
    fn single_queue_order_zero() {
        let r = run(&[("ring-ref", "8"), ("event-channel", "15")]).unwrap();
        assert_eq!(r.abi, Abi::NATIVE);
        assert_eq!(r.ring_order, 0);
        assert_eq!(
            r.queues,
            vec![QueueKeys {
                ring_refs: vec![8],
                evtchn: 15
            }]
        );
    }

    #[test]
    fn multi_queue_multi_page() {
        let r = run(&[
            ("protocol", "x86_32-abi"),
            ("ring-page-order", "1"),
            ("multi-queue-num-queues", "2"),
            ("queue-0/ring-ref0", "10"),
            ("queue-0/ring-ref1", "11"),
            ("queue-0/event-channel", "5"),
            ("queue-1/ring-ref0", "12"),
            ("queue-1/ring-ref1", "13"),
            ("queue-1/event-channel", "6"),
            ("feature-persistent", "1"),
        ])
        .unwrap();
        assert_eq!(r.abi, Abi::X86_32);
        assert_eq!(r.ring_order, 1);
        assert!(r.persistent);
        assert_eq!(r.queues[1].ring_refs, vec![12, 13]);
        assert_eq!(r.queues[1].evtchn, 6);
    }

    #[test]
    fn hostile_values_are_refused() {
        let e = |kv: &[(&str, &str)]| run(kv).unwrap_err();
        assert!(matches!(e(&[("event-channel", "1")]), KeyError::Missing(k) if k == "ring-ref"));
        assert!(matches!(
            e(&[("ring-ref", "-1"), ("event-channel", "1")]),
            KeyError::Bad { .. }
        ));
        assert!(matches!(
            e(&[("ring-ref", "99999999999"), ("event-channel", "1")]),
            KeyError::Bad { .. }
        ));
        assert!(matches!(
            e(&[("ring-ref", " 1"), ("event-channel", "1")]),
            KeyError::Bad { .. }
        ));
        assert!(matches!(
            e(&[("ring-page-order", "5"), ("event-channel", "1")]),
            KeyError::Bad { .. }
        ));
        assert!(matches!(
            e(&[("multi-queue-num-queues", "0")]),
            KeyError::Bad { .. }
        ));
        assert!(matches!(
            e(&[("multi-queue-num-queues", "5")]),
            KeyError::Bad { .. }
        ));
        assert!(matches!(
            e(&[
                ("protocol", "arm-abi"),
                ("ring-ref", "1"),
                ("event-channel", "1")
            ]),
            KeyError::Bad { .. }
        ));
        let long = "9".repeat(5000);
        if let KeyError::Bad { value, .. } = e(&[("ring-ref", &long), ("event-channel", "1")]) {
            assert_eq!(value.len(), 64);
        } else {
            panic!("long value accepted");
        }
    }
}
