//! The tap-ctl contract of blktap3's callers: `tests/compat/tapctl-contract.py` drives tap-ctl
//! exactly as Xen's `block-tap` hotplug script and xapi's storage manager (`TapCtl` in
//! `blktap2.py`) do, parsing the output their way, in the run directory both hard-code
//! (`/run/blktap-control`). It runs against our tap-ctl, then against blktap3's own (the
//! reference, built by `tests/compat/blktap3.sh` from the peers folder; skipped with a message
//! where that folder is absent, as on a user's machine).

use std::path::{Path, PathBuf};
use std::process::Command;

use tapdisk_e2e::bin;

fn compat(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("compat")
        .join(name)
}

/// Runs the contract script against `tap_ctl`; returns its output, failing the test (with the
/// output) unless every step passed.
fn contract(tap_ctl: &Path, envs: &[(&str, PathBuf)]) -> String {
    let mut cmd = Command::new("python3");
    cmd.arg(compat("tapctl-contract.py"))
        .arg("--tap-ctl")
        .arg(tap_ctl)
        .env_remove("TAPDISK_RS_RUNDIR");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .expect("running python3 (tests/run.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "contract failed:\n{text}");
    assert!(text.contains(" passed, 0 failed"), "{text}");
    text
}

#[test]
fn blktap3_callers_drive_our_tap_ctl_and_blktap3s_alike() {
    let ours = contract(&bin("tap-ctl"), &[("TAPDISK_RS_TAPDISK", bin("tapdisk"))]);
    let steps = ours.lines().filter(|l| l.starts_with("STEP")).count();
    assert!(steps >= 18, "only {steps} steps ran");

    let built = Command::new("bash")
        .arg(compat("blktap3.sh"))
        .output()
        .expect("running tests/compat/blktap3.sh");
    match built.status.code() {
        Some(0) => {
            let prefix = PathBuf::from(String::from_utf8_lossy(&built.stdout).trim());
            let theirs = contract(
                &prefix.join("sbin/tap-ctl"),
                &[("LD_LIBRARY_PATH", prefix.join("lib"))],
            );
            let their_steps = theirs.lines().filter(|l| l.starts_with("STEP")).count();
            assert_eq!(steps, their_steps, "both ran the same steps");
        }
        Some(3) => println!(
            "blktap3 reference skipped: {}",
            String::from_utf8_lossy(&built.stderr).trim()
        ),
        _ => panic!(
            "building blktap3 failed: {}",
            String::from_utf8_lossy(&built.stderr)
        ),
    }
}
