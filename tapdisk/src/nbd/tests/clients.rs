//! Interoperability with the real clients (qemu-io, qemu-img, nbdinfo, nbdcopy); these fail,
//! rather than skip, when a client is not installed.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// The path of `name`, or a failure saying what to install.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed but the NBD interoperability tests need it \
                 (Debian/Ubuntu: apt-get install qemu-utils libnbd-bin)"
            )
        })
}

/// Runs `cmd` with a deadline; returns stdout, failing the test with stderr on an error.
fn run(mut cmd: Command) -> String {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let t = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout.into_owned()
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run(c);
    // Older qemu-io exits 0 when a command fails; look at what it printed too.
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io said:\n{out}"
    );
    out
}

fn nbdinfo_size(uri: &str) -> u64 {
    let mut c = Command::new(tool("nbdinfo"));
    c.args(["--json", uri]);
    let out = run(c);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    v["exports"][0]["export-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no export-size in {out}"))
}

#[test]
fn qemu_io_writes_and_reads_over_unix() {
    let fx = Fixture::new(8 * MIB, false);
    let out = qemu_io(&fx.uri(), &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"]);
    assert!(out.contains("wrote 1048576/1048576 bytes"), "{out}");
    assert!(out.contains("read 1048576/1048576 bytes"), "{out}");
    let img = fx.image();
    assert!(img[..MIB as usize].iter().all(|&b| b == 0x5a));
    assert!(img[MIB as usize..].iter().all(|&b| b == 0));
    // Pattern mismatch must be detected (so the checks above mean something), FUA, zeroes,
    // discard and flush, through the named export.
    let named = format!("nbd+unix:///{EXPORT}?socket={}", fx.sock.display());
    qemu_io(
        &named,
        &[
            "write -f -P 0x33 1M 64k",
            "write -z 4k 4k",
            "discard 8k 4k",
            "flush",
            "read -P 0x33 1M 64k",
            "read -P 0 4k 8k",
        ],
    );
    let img = fx.image();
    assert!(img[4096..12288].iter().all(|&b| b == 0));
    assert!(img[MIB as usize..(MIB + 65536) as usize]
        .iter()
        .all(|&b| b == 0x33));
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw", &fx.uri(), "-c", "read -P 0x99 0 4k"]);
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || text.contains("Pattern verification failed"),
        "{text}"
    );
    wait_for("clients to leave", || fx.server().connections() == 0);
}

#[test]
fn nbdinfo_and_qemu_img_report_the_size() {
    let fx = Fixture::new(3 * MIB + 512, false);
    assert_eq!(nbdinfo_size(&fx.uri()), 3 * MIB + 512);
    let named = format!("nbd+unix:///{EXPORT}?socket={}", fx.sock.display());
    assert_eq!(nbdinfo_size(&named), 3 * MIB + 512);
    let mut c = Command::new(tool("nbdinfo"));
    c.args(["--list", "--json", &fx.uri()]);
    let out = run(c);
    assert!(out.contains(EXPORT), "{out}");
    let mut c = Command::new(tool("qemu-img"));
    c.args(["info", "--output=json", &fx.uri()]);
    let out = run(c);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img JSON");
    assert_eq!(v["virtual-size"].as_u64(), Some(3 * MIB + 512), "{out}");
}

#[test]
fn real_clients_over_tcp_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let server = NbdServer::start(
        &"tcp:127.0.0.1:0".parse().unwrap(),
        export(&img, false),
        test_log(),
    )
    .unwrap();
    let NbdListen::Tcp(addr) = server.local_addr() else {
        panic!("not tcp")
    };
    let uri = format!("nbd://127.0.0.1:{}/", addr.port());
    assert_eq!(nbdinfo_size(&uri), 2 * MIB);
    qemu_io(&uri, &["write -P 0xc3 512k 256k", "read -P 0xc3 512k 256k"]);
    let data = std::fs::read(&img).unwrap();
    assert!(data[512 << 10..768 << 10].iter().all(|&b| b == 0xc3));
    server.shutdown();
}

#[test]
fn nbdcopy_random_image() {
    let fx = Fixture::new(4 * MIB, false);
    let src = fx.img.with_file_name("random.bin");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..4 * MIB / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&src, &data).unwrap();
    let mut c = Command::new(tool("nbdcopy"));
    c.arg(&src).arg(fx.uri());
    run(c);
    let mut c = Command::new("cmp");
    c.arg(&src).arg(&fx.img);
    run(c);
    // And back out again.
    let back = fx.img.with_file_name("back.bin");
    let mut c = Command::new(tool("nbdcopy"));
    c.arg(fx.uri()).arg(&back);
    run(c);
    assert_eq!(std::fs::read(&back).unwrap(), data);
}
