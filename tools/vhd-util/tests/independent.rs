//! Interop with tools that share no code with blktap or us: QEMU's `vpc` driver (qemu-img,
//! qemu-io) and libvhdi (vhdiinfo, vhdimount).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const MB: u64 = 1 << 20;

/// Raw bytes of an image as qemu-img converts them.
fn qemu_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.qemu.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(img)
        .arg(&out));
    std::fs::read(&out).unwrap()
}

#[test]
fn qemu_vpc_images_open_and_read_through_our_library() {
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("skipping: qemu-img/qemu-io not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["dynamic", "fixed"] {
        let img = d.join(format!("q-{sub}.vhd"));
        run(Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &format!("subformat={sub}"),
            ])
            .arg(&img)
            .arg("40M"));
        let mut rng = Rng(3);
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "vpc"]).arg(&img);
        for _ in 0..8 {
            let len = 512 * (1 + rng.below(5000));
            let off = rng.below((30 * MB) / 512) * 512;
            cmd.arg("-c")
                .arg(format!("write -P {} {off} {len}", 1 + rng.below(250)));
        }
        run(&mut cmd);
        let want = qemu_raw(&img, d);
        let got = read_chain(&img);
        assert_eq!(got.len(), want.len(), "{sub}: size");
        assert!(
            got == want,
            "{sub}: differs at {:?}",
            first_diff(&got, &want)
        );
        // And we can write into QEMU's image; QEMU reads our writes.
        write_chain(&img, &[(123_456, vec![0x5a; 3 * MB as usize + 77])]);
        let want = qemu_raw(&img, d);
        let got = read_chain(&img);
        assert!(
            got == want,
            "{sub} after our write: differs at {:?}",
            first_diff(&got, &want)
        );
    }
}

#[test]
fn our_images_pass_qemu_img_info_and_compare() {
    if !have("qemu-img") {
        eprintln!("skipping: qemu-img not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for fixed in [false, true] {
        let img = d.join(format!("ours-{fixed}.vhd"));
        let mut c = Command::new(ours());
        c.args(["create", "-s", "30", "-n"]).arg(&img);
        if fixed {
            c.arg("-r");
        }
        run(&mut c);
        let mut rng = Rng(11);
        let mut model = vec![0u8; 30 * MB as usize];
        let mut writes = Vec::new();
        for _ in 0..10 {
            let len = 1 + rng.below(3 * MB) as usize;
            let off = rng.below(30 * MB - len as u64);
            let b = rng.bytes(len);
            model[off as usize..off as usize + len].copy_from_slice(&b);
            writes.push((off, b));
        }
        write_chain(&img, &writes);
        let info = stdout(
            Command::new("qemu-img")
                .args(["info", "--output=json", "-f", "vpc"])
                .arg(&img),
        );
        assert!(
            info.contains(&format!("\"virtual-size\": {}", 30 * MB)),
            "{info}"
        );
        let raw = d.join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        let out = stdout(
            Command::new("qemu-img")
                .args(["compare", "-f", "vpc", "-F", "raw"])
                .arg(&img)
                .arg(&raw),
        );
        assert!(out.contains("Images are identical"), "{out}");
    }
}

/// Mounts `img` with vhdimount; returns the mount point's files (vhdi1 is the base, the
/// highest number the image itself) or `None` where FUSE does not work here.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount").arg("-u").arg(&self.0).output();
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

fn vhdimount(img: &Path, at: &Path) -> Option<Mount> {
    if !Path::new("/dev/fuse").exists() {
        return None;
    }
    std::fs::create_dir_all(at).ok()?;
    let st = Command::new("vhdimount").arg(img).arg(at).output().ok()?;
    if !st.status.success() {
        eprintln!("vhdimount failed: {}", String::from_utf8_lossy(&st.stderr));
        return None;
    }
    Some(Mount(at.to_path_buf()))
}

#[test]
fn libvhdi_reads_our_dynamic_and_differencing_images() {
    if !have("vhdiinfo") {
        eprintln!("skipping: libvhdi-utils (vhdiinfo) not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.vhd");
    let snap = d.join("snap.vhd");
    run(Command::new(ours())
        .args(["create", "-s", "16", "-n"])
        .arg(&base));
    let mut rng = Rng(5);
    write_chain(
        &base,
        &[
            (0, rng.bytes(5 * MB as usize)),
            (9 * MB, rng.bytes(100_000)),
        ],
    );
    run(Command::new(ours())
        .args(["snapshot", "-n"])
        .arg(&snap)
        .arg("-p")
        .arg(&base));
    write_chain(
        &snap,
        &[
            (4 * MB - 512, rng.bytes(MB as usize + 1024)),
            (15 * MB, rng.bytes(4096)),
        ],
    );
    let info = stdout(Command::new("vhdiinfo").arg(&base));
    assert!(
        info.contains("Dynamic") && info.contains("16 MiB"),
        "{info}"
    );
    let info = stdout(Command::new("vhdiinfo").arg(&snap));
    assert!(
        info.contains("Differential") && info.contains("Parent filename\t\t: base.vhd"),
        "{info}"
    );
    let uuid = stdout(Command::new(ours()).args(["read", "-p", "-n"]).arg(&base));
    let uuid = uuid
        .lines()
        .find(|l| l.starts_with("UUID"))
        .unwrap()
        .split(": ")
        .nth(1)
        .unwrap()
        .to_string();
    assert!(
        info.contains(&format!("Parent identifier\t: {uuid}")),
        "{info}\n{uuid}"
    );
    // vhdimount reads the data, the differencing disk through its parent.
    let Some(m) = vhdimount(&snap, &d.join("mnt")) else {
        eprintln!("skipping the vhdimount part: FUSE is not usable here");
        return;
    };
    let leaf = std::fs::read(m.0.join("vhdi2")).unwrap();
    let want = read_chain(&snap);
    assert!(
        leaf == want,
        "vhdimount reads the snapshot differently at {:?}",
        first_diff(&leaf, &want)
    );
    let parent = std::fs::read(m.0.join("vhdi1")).unwrap();
    let want = read_chain(&base);
    assert!(
        parent == want,
        "vhdimount reads the base differently at {:?}",
        first_diff(&parent, &want)
    );
}
