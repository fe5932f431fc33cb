//! `tap-ctl stats --prometheus`: the text exposition format node_exporter's textfile collector
//! reads, accepted by Prometheus's own checker (`promtool check metrics`, Debian's
//! `prometheus`), one series per VBD and counter, for one VBD or every VBD of the run
//! directory.

use std::io::Write;
use std::process::{Command, Stdio};

use tapdisk_e2e::{bin, run_ok};

fn promtool_accepts(text: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (tests/run.sh installs prometheus)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool refused it: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_output_passes_promtool_with_a_series_per_vbd() {
    let dir = tempfile::tempdir().unwrap();
    let rundir = dir.path().join("run");
    let tap_ctl = |args: &[&str]| {
        let mut c = Command::new(bin("tap-ctl"));
        c.args(args)
            .env("TAPDISK_RS_RUNDIR", &rundir)
            .env("TAPDISK_RS_TAPDISK", bin("tapdisk"));
        String::from_utf8_lossy(&run_ok(&mut c).stdout).into_owned()
    };
    let mut devices = Vec::new();
    // Two VBDs in two tapdisks; a quote and a backslash in one image name.
    for name in ["a.img", "b \"x\\y\".img"] {
        let img = dir.path().join(name);
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        devices.push(
            tap_ctl(&["create", "-a", &format!("aio:{}", img.display())])
                .trim()
                .to_owned(),
        );
    }
    for d in &devices {
        run_ok(Command::new(bin("td-bench")).args(["verify", "--device", d, "--requests", "300"]));
    }
    let all = tap_ctl(&["stats", "--prometheus"]);
    println!("{all}");
    promtool_accepts(&all);
    for m in ["0", "1"] {
        let reads = all
            .lines()
            .filter(|l| {
                l.starts_with("tapdisk_ring_requests_total{")
                    && l.contains(&format!("minor=\"{m}\""))
                    && l.contains("op=\"read\"")
            })
            .count();
        assert_eq!(reads, 1, "minor {m}: one read series");
    }
    assert_eq!(
        all.matches("# TYPE tapdisk_ring_requests_total counter")
            .count(),
        1
    );
    let one = tap_ctl(&["stats", "-m", "1", "--prometheus"]);
    promtool_accepts(&one);
    assert!(
        one.contains("image=\"aio:") && one.contains("b \\\"x\\\\x5cy\\\".img"),
        "{one}"
    );
    assert!(!one.contains("minor=\"0\""));
    for m in ["0", "1"] {
        tap_ctl(&["destroy", "-m", m]);
    }
}
