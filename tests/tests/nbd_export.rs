//! The NBD export with real clients: `tap-ctl create -a aio:IMG --nbd unix:SOCK`, qemu-io
//! pattern writes and reads, and `qemu-img compare` of an image written through NBD with one
//! written directly.

use std::path::Path;
use std::process::Command;

use tapdisk_e2e::*;

/// Destroys every tapdisk of the run directory at the end, even when the test fails.
struct Cleanup<'a>(&'a Path, u32);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = tap_ctl(self.0)
            .args(["destroy", "-m", &self.1.to_string()])
            .output();
    }
}

/// Writes of several sizes and alignments, as qemu-io commands.
const WRITES: &[&str] = &[
    "write -P 0x5a 0 1M",
    "write -P 0x11 1M 4k",
    "write -P 0x22 3M 64k",
    "write -P 0x33 5120 512",
    "write -P 0x44 7M 1M",
    "write -P 0x55 63M 1M",
    "write -z 3M 4k",
];

#[test]
fn qemu_io_and_qemu_img_compare_through_the_nbd_export() {
    let dir = tempfile::tempdir().unwrap();
    let rundir = dir.path().join("run");
    let img = dir.path().join("through-nbd.img");
    let direct = dir.path().join("direct.img");
    for p in [&img, &direct] {
        std::fs::File::create(p).unwrap().set_len(64 << 20).unwrap();
    }
    let sock = dir.path().join("nbd.sock");
    let out = run_ok(
        tap_ctl(&rundir)
            .args(["create", "-a"])
            .arg(format!("aio:{}", img.display()))
            .arg("--nbd")
            .arg(format!("unix:{}", sock.display())),
    );
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(device.ends_with("tapdev0"), "create printed {device:?}");
    let _cleanup = Cleanup(&rundir, 0);
    let uri = format!("nbd+unix:///?socket={}", sock.display());

    // The acceptance command.
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "read -P 0x5a 0 1M",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("wrote 1048576/1048576 bytes") && text.contains("read 1048576/1048576 bytes"),
        "{text}"
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");

    // The same writes through NBD and directly; then the images must be identical.
    let mut through = Command::new("qemu-io");
    through.args(["-f", "raw", &uri]);
    let mut local = Command::new("qemu-io");
    local.args(["-f", "raw"]).arg(&direct);
    for w in WRITES {
        through.args(["-c", w]);
        local.args(["-c", w]);
    }
    run_ok(&mut through);
    run_ok(&mut local);
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &uri])
            .arg(&direct),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"));
    // A difference is found (the comparison can fail).
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(&direct)
            .args(["-c", "write -P 0x99 2M 512"]),
    );
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&direct)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // nbdinfo sees the size; pattern reads of every write come back.
    let out = run_ok(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (64u64 << 20).to_string()
    );
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "read -P 0x55 63M 1M",
        "-c",
        "read -P 0x22 3149824 4k",
        "-c",
        "read -P 0 3M 4k",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(
        text.contains("read 4096/4096 bytes at offset 3149824"),
        "{text}"
    );

    // After destroy, the file on disk equals what went through.
    run_ok(tap_ctl(&rundir).args(["destroy", "-m", "0"]));
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw"]).arg(&img).args([
        "-c",
        "read -P 0x44 7M 1M",
        "-c",
        "read -P 0x11 1M 4k",
    ]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
}

#[test]
fn nbdcopy_over_tcp_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let rundir = dir.path().join("run");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let src = dir.path().join("src.bin");
    let data: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    // Pick a free port, then hand it to tapdisk.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    run_ok(
        tap_ctl(&rundir)
            .args(["create", "-m", "3", "-a"])
            .arg(format!("aio:{}", img.display()))
            .arg("--nbd")
            .arg(format!("tcp:127.0.0.1:{port}")),
    );
    let _cleanup = Cleanup(&rundir, 3);
    let uri = format!("nbd://127.0.0.1:{port}");
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    let back = dir.path().join("back.bin");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    let back = std::fs::read(&back).unwrap();
    assert_eq!(back.len(), 16 << 20);
    assert!(back[..data.len()] == data[..], "data read back differs");
    assert!(back[data.len()..].iter().all(|&b| b == 0));
}
