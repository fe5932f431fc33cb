//! Interop with blktap3 itself, both ways: chains made by blktap's vhd-util and written
//! through blktap's tapdisk (NBD export) read the same through our library; chains we make
//! and write pass blktap's `vhd-util check` and read back the same through blktap's tapdisk;
//! `vhd-util query` and `read -p` of ours and theirs agree. Skipped (with a message) where
//! the peers folder is absent.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const SIZE_MB: u64 = 24;

/// Writes through blktap's tapdisk with qemu-io; returns the patterns written.
fn blktap_writes(prefix: &Path, image: &Path, rng: &mut Rng, model: &mut [u8]) {
    let serve = BlktapServe::new(prefix, image);
    let mut cmd = Command::new("qemu-io");
    cmd.arg("--image-opts").arg(serve.qemu_opts());
    for _ in 0..6 {
        let len = 512 * (1 + rng.below(6000));
        let off = rng.below((model.len() as u64 - len) / 512) * 512;
        let pat = 1 + rng.below(254) as u8;
        cmd.arg("-c").arg(format!("write -P {pat} {off} {len}"));
        model[off as usize..(off + len) as usize].fill(pat);
    }
    cmd.arg("-c").arg("flush");
    run(&mut cmd);
    let back = serve.read_all(image.parent().unwrap());
    assert!(
        back == model,
        "blktap's own export reads back differently at {:?}",
        first_diff(&back, model)
    );
}

#[test]
fn blktap_chains_read_the_same_through_our_library() {
    let Some(p) = blktap() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut model = vec![0u8; (SIZE_MB << 20) as usize];
    let mut rng = Rng(42);
    let base = d.join("base.vhd");
    run(bt(&p, "bin/vhd-util")
        .args(["create", "-s", &SIZE_MB.to_string(), "-n"])
        .arg(&base));
    blktap_writes(&p, &base, &mut rng, &mut model);
    let mut models = vec![model.clone()];
    let mut leaf = base.clone();
    for i in 1..=4 {
        let next = d.join(format!("snap{i}.vhd"));
        run(bt(&p, "bin/vhd-util")
            .args(["snapshot", "-n"])
            .arg(&next)
            .arg("-p")
            .arg(&leaf));
        blktap_writes(&p, &next, &mut rng, &mut model);
        models.push(model.clone());
        leaf = next;
    }
    // Every level through our library.
    for (i, m) in models.iter().enumerate() {
        let f = if i == 0 {
            base.clone()
        } else {
            d.join(format!("snap{i}.vhd"))
        };
        let got = read_chain(&f);
        assert!(got == *m, "level {i} differs at {:?}", first_diff(&got, m));
        let out = stdout(Command::new(ours()).args(["check", "-n"]).arg(&f));
        assert!(out.contains("is valid"), "{out}");
    }
    // We can write on top of blktap's leaf; blktap still reads it all and checks it clean.
    let writes = vec![
        (1000u64, rng.bytes(3 << 20)),
        (7 << 20, rng.bytes(512)),
        ((SIZE_MB << 20) - 4096, rng.bytes(4096)),
    ];
    write_chain(&leaf, &writes);
    for (o, w) in &writes {
        model[*o as usize..*o as usize + w.len()].copy_from_slice(w);
    }
    let out = stdout(bt(&p, "bin/vhd-util").args(["check", "-n"]).arg(&leaf));
    assert!(out.contains("is valid"), "{out}");
    let serve = BlktapServe::new(&p, &leaf);
    let back = serve.read_all(d);
    assert!(
        back == model,
        "blktap reads our writes differently at {:?}",
        first_diff(&back, &model)
    );
}

#[test]
fn our_chains_pass_blktap_check_and_read_the_same_through_blktap_tapdisk() {
    let Some(p) = blktap() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = SIZE_MB << 20;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(7);
    let mut leaf = d.join("l0.vhd");
    run(Command::new(ours())
        .args(["create", "-s", &SIZE_MB.to_string(), "-n"])
        .arg(&leaf));
    for i in 1..=5 {
        let mut writes = Vec::new();
        for _ in 0..5 {
            let len = 1 + rng.below(2 << 20) as usize;
            let off = rng.below(size - len as u64);
            writes.push((off, rng.bytes(len)));
        }
        write_chain(&leaf, &writes);
        for (o, w) in &writes {
            model[*o as usize..*o as usize + w.len()].copy_from_slice(w);
        }
        let out = stdout(bt(&p, "bin/vhd-util").args(["check", "-n"]).arg(&leaf));
        assert!(out.contains("is valid"), "blktap check: {out}");
        let serve = BlktapServe::new(&p, &leaf);
        let back = serve.read_all(d);
        assert!(
            back == model,
            "level {i}: blktap's tapdisk reads differently at {:?}",
            first_diff(&back, &model)
        );
        drop(serve);
        let next = d.join(format!("l{i}.vhd"));
        run(Command::new(ours())
            .args(["snapshot", "-n"])
            .arg(&next)
            .arg("-p")
            .arg(&leaf));
        leaf = next;
    }
    // blktap's tapdisk writes on top of our chain; we read its writes.
    blktap_writes(&p, &leaf, &mut rng, &mut model);
    let got = read_chain(&leaf);
    assert!(
        got == model,
        "we read blktap's writes differently at {:?}",
        first_diff(&got, &model)
    );
}

/// Lines of `query` that sm parses, for both tools.
fn queries(p: &Path, f: &Path) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for flags in [
        "-v", "-s", "-p", "-f", "-d", "-a", "-S", "-m", "-vsf", "-vsfp", "-vsafp",
    ] {
        let a = Command::new(ours())
            .args(["query", "--debug", flags, "-n"])
            .arg(f)
            .output()
            .unwrap();
        let b = bt(p, "bin/vhd-util")
            .args(["query", "--debug", flags, "-n"])
            .arg(f)
            .output()
            .unwrap();
        // Where blktap refuses (-a of a fixed disk), so must we; otherwise the same text.
        let show = |o: &std::process::Output| match o.status.success() {
            true => String::from_utf8_lossy(&o.stdout).into_owned(),
            false => "(failed)".to_string(),
        };
        v.push((format!("query {flags} {}: ours", f.display()), show(&a)));
        v.push((format!("query {flags} {}: blktap", f.display()), show(&b)));
    }
    v
}

#[test]
fn query_and_read_output_agree_with_blktap() {
    let Some(p) = blktap() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut files = Vec::new();
    // Made by each tool: dynamic, with data, a snapshot, hidden, fixed.
    for (tool, tag) in [(None, "o"), (Some(&p), "b")] {
        let cmd = |args: &[&str]| -> Command {
            let mut c = match tool {
                None => Command::new(ours()),
                Some(p) => bt(p, "bin/vhd-util"),
            };
            c.args(args);
            c
        };
        let base = d.join(format!("{tag}-base.vhd"));
        let snap = d.join(format!("{tag}-snap.vhd"));
        let fixed = d.join(format!("{tag}-fixed.vhd"));
        run(cmd(&["create", "-s", "20", "-S", "64", "-n"]).arg(&base));
        write_chain(&base, &[(3 << 20, vec![9u8; 5 << 20])]);
        run(cmd(&["snapshot", "-n"]).arg(&snap).arg("-p").arg(&base));
        run(cmd(&["set", "-f", "hidden", "-v", "1", "-n"]).arg(&base));
        run(cmd(&["create", "-r", "-s", "6", "-n"]).arg(&fixed));
        files.extend([base, snap, fixed]);
    }
    for f in &files {
        let q = queries(&p, f);
        for pair in q.chunks(2) {
            assert_eq!(pair[0].1, pair[1].1, "{} vs {}", pair[0].0, pair[1].0);
        }
        // blktap's `read -p` fails on fixed disks (it reads a BAT first); ours prints them.
        let a = stdout(Command::new(ours()).args(["read", "-p", "-n"]).arg(f));
        let b = bt(&p, "bin/vhd-util")
            .args(["read", "-p", "-n"])
            .arg(f)
            .output()
            .unwrap();
        if b.status.success() {
            assert_eq!(
                a,
                String::from_utf8_lossy(&b.stdout),
                "read -p of {}",
                f.display()
            );
        }
        let a = Command::new(ours())
            .args(["read", "-B", "-n"])
            .arg(f)
            .output()
            .unwrap();
        let b = bt(&p, "bin/vhd-util")
            .args(["read", "-B", "-n"])
            .arg(f)
            .output()
            .unwrap();
        assert_eq!(
            a.status.success(),
            b.status.success(),
            "read -B of {}",
            f.display()
        );
        if b.status.success() {
            assert_eq!(a.stdout, b.stdout, "read -B of {}", f.display());
        }
        // sm reads check's exit status; blktap prints nothing for a fixed disk.
        let a = stdout(Command::new(ours()).args(["check", "-n"]).arg(f));
        let b = stdout(bt(&p, "bin/vhd-util").args(["check", "-n"]).arg(f));
        if !b.is_empty() {
            assert_eq!(a, b, "check of {}", f.display());
        }
    }
    // Coalesce prints what sm matches (blktap prints no newline).
    for tag in ["o", "b"] {
        let snap = d.join(format!("{tag}-snap.vhd"));
        write_chain(&snap, &[(0, vec![1u8; 4096])]);
        let a = stdout(Command::new(ours()).args(["coalesce", "-n"]).arg(&snap));
        assert_eq!(a.trim_end(), "Coalesced 8 sectors");
    }
    let snap = d.join("b-snap.vhd");
    let b = stdout(bt(&p, "bin/vhd-util").args(["coalesce", "-n"]).arg(&snap));
    assert_eq!(b.trim_end(), "Coalesced 8 sectors");
}

#[test]
fn discarded_blocks_read_as_zero_through_blktap_and_pass_its_check() {
    let Some(p) = blktap() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhd");
    run(Command::new(ours())
        .args(["create", "-s", "16", "-n"])
        .arg(&img));
    let mut rng = Rng(9);
    let data = rng.bytes(10 << 20);
    write_chain(&img, &[(0, data.clone())]);
    let set = vhd::ParentSet::new();
    let mut c = vhd::Chain::open(&img, &vhd::ChainOptions::default(), &set).unwrap();
    // 3 MiB .. 9 MiB covers blocks 2, 3 wholly (4 MiB .. 8 MiB).
    assert_eq!(c.discard(3 << 20, 6 << 20).unwrap(), 2);
    drop(c);
    let mut model = vec![0u8; 16 << 20];
    model[..10 << 20].copy_from_slice(&data);
    model[4 << 20..8 << 20].fill(0);
    let out = stdout(bt(&p, "bin/vhd-util").args(["check", "-n"]).arg(&img));
    assert!(out.contains("is valid"), "{out}");
    let serve = BlktapServe::new(&p, &img);
    let back = serve.read_all(dir.path());
    assert!(
        back == model,
        "blktap reads the discarded image differently at {:?}",
        first_diff(&back, &model)
    );
}
