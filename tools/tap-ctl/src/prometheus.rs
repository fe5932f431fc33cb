//! `tap-ctl stats --prometheus`: the counters of VBDs in Prometheus's text exposition format
//! (for node_exporter's textfile collector), one series per VBD and counter, labelled with
//! the tapdisk's `pid`, the VBD's `minor` and its `image`.

use std::fmt::Write;

use serde_json::Value;
use tapdisk_control::escape;

/// One VBD's counters (the JSON `tap-ctl stats` prints) and who serves it.
pub struct VbdStats<'a> {
    /// The tapdisk.
    pub pid: u32,
    /// The VBD.
    pub minor: u32,
    /// Its counters.
    pub stats: &'a Value,
}

/// A metric family: its name, type, help, and how to read its samples from a VBD's JSON.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    /// `(name suffix, extra labels, JSON pointer, scale)`: one sample per entry.
    samples: &'static [(&'static str, &'static str, &'static str, f64)],
}

const US: f64 = 1e-6;
const SECTOR: f64 = 512.0;

const FAMILIES: &[Family] = &[
    Family {
        name: "tapdisk_vbd_state_flags",
        kind: "gauge",
        help: "blktap3's state flags of the VBD (0 running, 0x10 pausing, 0x20 paused).",
        samples: &[("", "", "/state_flags", 1.0)],
    },
    Family {
        name: "tapdisk_vbd_size_bytes",
        kind: "gauge",
        help: "Size of the disk.",
        samples: &[("", "", "/sectors", SECTOR)],
    },
    Family {
        name: "tapdisk_vbd_rings",
        kind: "gauge",
        help: "Rings attached now.",
        samples: &[("", "", "/rings", 1.0)],
    },
    Family {
        name: "tapdisk_vbd_rings_attached_total",
        kind: "counter",
        help: "Rings attached since the VBD opened.",
        samples: &[("", "", "/rings_total", 1.0)],
    },
    Family {
        name: "tapdisk_ring_requests_total",
        kind: "counter",
        help: "Ring requests completed, by operation.",
        samples: &[
            ("", "op=\"read\"", "/ring/read/requests", 1.0),
            ("", "op=\"write\"", "/ring/write/requests", 1.0),
            ("", "op=\"flush\"", "/ring/flush/requests", 1.0),
            ("", "op=\"discard\"", "/ring/discard/requests", 1.0),
        ],
    },
    Family {
        name: "tapdisk_ring_bytes_total",
        kind: "counter",
        help: "Bytes moved or discarded by ring requests, by operation.",
        samples: &[
            ("", "op=\"read\"", "/ring/read/sectors", SECTOR),
            ("", "op=\"write\"", "/ring/write/sectors", SECTOR),
            ("", "op=\"discard\"", "/ring/discard/sectors", SECTOR),
        ],
    },
    Family {
        name: "tapdisk_ring_request_errors_total",
        kind: "counter",
        help: "Ring requests answered with an error, by operation.",
        samples: &[
            ("", "op=\"read\"", "/ring/read/errors", 1.0),
            ("", "op=\"write\"", "/ring/write/errors", 1.0),
            ("", "op=\"flush\"", "/ring/flush/errors", 1.0),
            ("", "op=\"discard\"", "/ring/discard/errors", 1.0),
        ],
    },
    Family {
        name: "tapdisk_ring_bad_requests_total",
        kind: "counter",
        help: "Malformed requests refused (the frontend's fault).",
        samples: &[("", "", "/ring/bad_requests", 1.0)],
    },
    Family {
        name: "tapdisk_ring_unsupported_requests_total",
        kind: "counter",
        help: "Requests with an operation not offered.",
        samples: &[("", "", "/ring/unsupported", 1.0)],
    },
    Family {
        name: "tapdisk_ring_io_errors_total",
        kind: "counter",
        help: "Backend IOs that failed.",
        samples: &[("", "", "/ring/io_errors", 1.0)],
    },
    Family {
        name: "tapdisk_ring_in_flight_requests",
        kind: "gauge",
        help: "Requests accepted and not answered yet.",
        samples: &[("", "", "/ring/in_flight", 1.0)],
    },
    Family {
        name: "tapdisk_ring_waiting_requests",
        kind: "gauge",
        help: "Requests held in the scheduler.",
        samples: &[("", "", "/ring/waiting", 1.0)],
    },
    Family {
        name: "tapdisk_ring_backend_ios_in_flight",
        kind: "gauge",
        help: "Backend IOs in flight.",
        samples: &[("", "", "/ring/ios_in_flight", 1.0)],
    },
    Family {
        name: "tapdisk_ring_backend_ios_total",
        kind: "counter",
        help: "Backend IOs the scheduler issued (after merging).",
        samples: &[("", "", "/ring/sched/backend_ios", 1.0)],
    },
    Family {
        name: "tapdisk_ring_uring_submits_total",
        kind: "counter",
        help: "io_uring submit calls.",
        samples: &[("", "", "/ring/submits", 1.0)],
    },
    Family {
        name: "tapdisk_ring_notifications_total",
        kind: "counter",
        help: "Notifications sent to frontends.",
        samples: &[("", "", "/ring/notifies", 1.0)],
    },
    Family {
        name: "tapdisk_ring_latency_seconds",
        kind: "summary",
        help: "Ring request latency (pop to response) over the VBD's life.",
        samples: &[
            ("", "quantile=\"0.5\"", "/ring/latency/p50_us", US),
            ("", "quantile=\"0.9\"", "/ring/latency/p90_us", US),
            ("", "quantile=\"0.99\"", "/ring/latency/p99_us", US),
            ("", "quantile=\"0.999\"", "/ring/latency/p999_us", US),
            ("_count", "", "/ring/latency/count", 1.0),
        ],
    },
    Family {
        name: "tapdisk_ring_latency_max_seconds",
        kind: "gauge",
        help: "Largest ring request latency over the VBD's life.",
        samples: &[("", "", "/ring/latency/max_us", US)],
    },
    Family {
        name: "tapdisk_nbd_connections",
        kind: "gauge",
        help: "NBD clients connected, by export.",
        samples: &[
            ("", "export=\"socket\"", "/nbd_socket/connections", 1.0),
            ("", "export=\"nbd\"", "/nbd/connections", 1.0),
        ],
    },
    Family {
        name: "tapdisk_nbd_requests_total",
        kind: "counter",
        help: "NBD requests, by export and operation.",
        samples: &[
            (
                "",
                "export=\"socket\",op=\"read\"",
                "/nbd_socket/counters/reads",
                1.0,
            ),
            (
                "",
                "export=\"socket\",op=\"write\"",
                "/nbd_socket/counters/writes",
                1.0,
            ),
            (
                "",
                "export=\"socket\",op=\"flush\"",
                "/nbd_socket/counters/flushes",
                1.0,
            ),
            (
                "",
                "export=\"socket\",op=\"discard\"",
                "/nbd_socket/counters/discards",
                1.0,
            ),
            ("", "export=\"nbd\",op=\"read\"", "/nbd/counters/reads", 1.0),
            (
                "",
                "export=\"nbd\",op=\"write\"",
                "/nbd/counters/writes",
                1.0,
            ),
            (
                "",
                "export=\"nbd\",op=\"flush\"",
                "/nbd/counters/flushes",
                1.0,
            ),
            (
                "",
                "export=\"nbd\",op=\"discard\"",
                "/nbd/counters/discards",
                1.0,
            ),
        ],
    },
    Family {
        name: "tapdisk_nbd_bytes_total",
        kind: "counter",
        help: "NBD payload bytes, by export and operation.",
        samples: &[
            (
                "",
                "export=\"socket\",op=\"read\"",
                "/nbd_socket/counters/read_bytes",
                1.0,
            ),
            (
                "",
                "export=\"socket\",op=\"write\"",
                "/nbd_socket/counters/write_bytes",
                1.0,
            ),
            (
                "",
                "export=\"nbd\",op=\"read\"",
                "/nbd/counters/read_bytes",
                1.0,
            ),
            (
                "",
                "export=\"nbd\",op=\"write\"",
                "/nbd/counters/write_bytes",
                1.0,
            ),
        ],
    },
    Family {
        name: "tapdisk_nbd_errors_total",
        kind: "counter",
        help: "NBD requests answered with an error, by export.",
        samples: &[
            ("", "export=\"socket\"", "/nbd_socket/counters/errors", 1.0),
            ("", "export=\"nbd\"", "/nbd/counters/errors", 1.0),
        ],
    },
];

/// A label value: escaped for our lines first (control characters), then for Prometheus
/// (backslash, double quote, newline).
fn label(v: &str) -> String {
    let mut out = String::new();
    for c in escape::text(v).chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A number as Prometheus writes it.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// The text exposition of `vbds`: each family once, with a sample per VBD (and per label
/// set) whose value the VBD's JSON has.
pub fn render(vbds: &[VbdStats<'_>]) -> String {
    let mut out = String::new();
    for f in FAMILIES {
        let mut lines = String::new();
        for v in vbds {
            let image = v.stats.get("image").and_then(Value::as_str).unwrap_or("");
            let base = format!(
                "pid=\"{}\",minor=\"{}\",image=\"{}\"",
                v.pid,
                v.minor,
                label(image)
            );
            for (suffix, extra, pointer, scale) in f.samples {
                let Some(x) = v.stats.pointer(pointer).and_then(Value::as_f64) else {
                    continue;
                };
                // Microseconds are divided (not multiplied by 1e-6) to print exactly.
                let x = if *scale < 1.0 {
                    x / (1.0 / scale).round()
                } else {
                    x * scale
                };
                let sep = if extra.is_empty() { "" } else { "," };
                let _ = writeln!(
                    lines,
                    "{}{suffix}{{{base}{sep}{extra}}} {}",
                    f.name,
                    number(x)
                );
            }
        }
        if !lines.is_empty() {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            out.push_str(&lines);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_series_per_vbd_and_counter() {
        let a = serde_json::json!({
            "image": "aio:/x\"y\n.img", "state_flags": 32, "sectors": 8, "rings": 1, "rings_total": 2,
            "ring": {"read": {"requests": 3, "sectors": 16, "errors": 0},
                     "latency": {"p50_us": 12.5, "p90_us": 20.0, "p99_us": 30.0, "p999_us": 40.0, "max_us": 50.0}},
            "nbd": {"connections": 0, "counters": null},
            "nbd_socket": {"connections": 1, "counters": {"reads": 4, "read_bytes": 4096}},
        });
        let b = serde_json::json!({"image": "aio:/b.img", "ring": {"read": {"requests": 7}}});
        let text = render(&[
            VbdStats {
                pid: 10,
                minor: 0,
                stats: &a,
            },
            VbdStats {
                pid: 11,
                minor: 1,
                stats: &b,
            },
        ]);
        assert!(text.contains(
            "tapdisk_ring_requests_total{pid=\"10\",minor=\"0\",image=\"aio:/x\\\"y\\\\x0a.img\",op=\"read\"} 3\n"
        ), "{text}");
        assert!(text.contains(
            "tapdisk_ring_requests_total{pid=\"11\",minor=\"1\",image=\"aio:/b.img\",op=\"read\"} 7\n"
        ));
        assert!(text.contains("tapdisk_ring_bytes_total{pid=\"10\",minor=\"0\",image=\"aio:/x\\\"y\\\\x0a.img\",op=\"read\"} 8192\n"));
        assert!(text.contains("quantile=\"0.5\"} 0.0000125\n"), "{text}");
        assert_eq!(
            text.matches("# TYPE tapdisk_ring_requests_total counter")
                .count(),
            1
        );
        assert!(!text.contains("tapdisk_nbd_requests_total{pid=\"10\",minor=\"0\",image=\"aio:/x\\\"y\\\\x0a.img\",export=\"nbd\""));
    }
}
