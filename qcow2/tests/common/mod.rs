//! Helpers of the interop tests: real `qemu-img` and `qemu-io` processes.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs `qemu-img` with `args`; panics with its output unless it exits 0.
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args, &[0])
}

/// Runs `qemu-io` with `args` (e.g. `-c "write -P 1 0 4k"`); panics unless it succeeds.
pub fn qemu_io(args: &[&str]) -> String {
    let out = run("qemu-io", args, &[0]);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {args:?}: {out}"
    );
    out
}

/// Runs `prog`, returning stdout; panics unless its exit code is in `ok`.
///
/// A test thread's fork (to start a process) briefly holds a copy of every descriptor of the
/// test binary, and with it the QEMU-style locks of an image another thread just closed: a
/// lock conflict is retried for a while.
pub fn run(prog: &str, args: &[&str], ok: &[i32]) -> String {
    let mut tries = 0;
    let out = loop {
        let out = Command::new(prog)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{prog} could not run: {e}"));
        let err = String::from_utf8_lossy(&out.stderr);
        if tries < 100 && err.contains("Failed to get") && err.contains("lock") {
            tries += 1;
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
        break out;
    };
    let code = out.status.code().unwrap_or(-1);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        ok.contains(&code),
        "{prog} {args:?} exited {code}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// What `qemu-img check --output=json` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Check {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
}

/// `qemu-img check` of a qcow2 image, parsed from its JSON output (exit codes 0, 2 and 3
/// carry a report).
pub fn check(path: &Path, repair_leaks: bool) -> Check {
    let p = path.to_str().unwrap();
    let mut args = vec!["check", "--output=json", "-f", "qcow2"];
    if repair_leaks {
        args.extend(["-r", "leaks"]);
    }
    args.push(p);
    let out = run("qemu-img", &args, &[0, 2, 3]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("check output {out}: {e}"));
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    Check {
        corruptions: n("corruptions"),
        leaks: n("leaks"),
        check_errors: n("check-errors"),
    }
}

/// The guest content of an image as `qemu-img convert -O raw` gives it.
pub fn qemu_raw(path: &Path, fmt: &str) -> Vec<u8> {
    let out = path.with_extension("qemu-raw");
    qemu_img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

/// A small deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A pattern for sector-granular checks: each 512-byte sector of a write holds its own
/// seed-derived bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len);
    v
}
