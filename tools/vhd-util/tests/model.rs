//! The model test: a chain of 30 snapshots made with our vhd-util, random writes (512 B to
//! 4 MiB, some not sector aligned) between them through the library, read back at every level
//! against a raw reference; then the whole chain coalesced into its base, which must read as
//! the leaf did. Where blktap3 is available its `vhd-util check` and `read` agree.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const SIZE_MB: u64 = 48;
const LEVELS: usize = 30;

/// One level's writes: (offset, seed, length).
type Writes = Vec<(u64, u64, usize)>;

fn data(seed: u64, len: usize) -> Vec<u8> {
    Rng(seed | 1).bytes(len)
}

fn model_at(levels: &[Writes], upto: usize) -> Vec<u8> {
    let mut m = vec![0u8; (SIZE_MB << 20) as usize];
    for w in &levels[..=upto] {
        for &(off, seed, len) in w {
            m[off as usize..off as usize + len].copy_from_slice(&data(seed, len));
        }
    }
    m
}

fn level_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("level{i:02}.vhd"))
}

#[test]
fn thirty_snapshots_read_as_the_model_at_every_level_and_coalesce_to_the_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = SIZE_MB << 20;
    run(Command::new(ours())
        .args(["create", "-s", &SIZE_MB.to_string(), "-n"])
        .arg(level_path(d, 0)));
    let mut rng = Rng(0x5eed_cafe);
    let mut levels: Vec<Writes> = Vec::new();
    for i in 0..=LEVELS {
        // Writes into level i, then (below the top) a snapshot on top of it.
        let mut w = Writes::new();
        for _ in 0..(3 + rng.below(4)) {
            let len = match rng.below(4) {
                0 => 512,
                1 => 4 << 20,
                2 => 512 * (1 + rng.below(64)) as usize,
                _ => 1 + rng.below(3 << 20) as usize, // not whole sectors
            };
            let mut off = rng.below(size - len as u64);
            if rng.below(2) == 0 {
                off &= !511;
            }
            w.push((off, rng.next(), len));
        }
        let writes: Vec<(u64, Vec<u8>)> = w.iter().map(|&(o, s, l)| (o, data(s, l))).collect();
        write_chain(&level_path(d, i), &writes);
        levels.push(w);
        if i < LEVELS {
            run(Command::new(ours())
                .args(["snapshot", "-n"])
                .arg(level_path(d, i + 1))
                .arg("-p")
                .arg(level_path(d, i)));
            run(Command::new(ours())
                .args(["set", "-f", "hidden", "-v", "1", "-n"])
                .arg(level_path(d, i)));
        }
    }
    let depth = stdout(
        Command::new(ours())
            .args(["query", "-d", "-n"])
            .arg(level_path(d, LEVELS)),
    );
    assert_eq!(depth.trim(), format!("chain depth: {}", LEVELS + 1));
    // Every level reads as the model did when it was snapshotted.
    for i in 0..=LEVELS {
        let got = read_chain(&level_path(d, i));
        let want = model_at(&levels, i);
        assert!(
            got == want,
            "level {i} differs at byte {:?}",
            first_diff(&got, &want)
        );
    }
    let leaf_model = model_at(&levels, LEVELS);
    if let Some(bt_prefix) = blktap() {
        for i in 0..=LEVELS {
            let out = stdout(
                bt(&bt_prefix, "bin/vhd-util")
                    .args(["check", "-n"])
                    .arg(level_path(d, i)),
            );
            assert!(out.contains("is valid"), "blktap check of level {i}: {out}");
        }
        // blktap's own reader, through the whole chain.
        let out = run(bt(&bt_prefix, "bin/vhd-util")
            .args(["read", "-r", "0", "-c", &(size / 512).to_string(), "-n"])
            .arg(level_path(d, LEVELS)));
        assert!(
            out.stdout == leaf_model,
            "blktap reads the leaf differently at {:?}",
            first_diff(&out.stdout, &leaf_model)
        );
    }
    // Coalesce the whole chain down into the base.
    for i in (1..=LEVELS).rev() {
        let out = stdout(
            Command::new(ours())
                .args(["coalesce", "-n"])
                .arg(level_path(d, i)),
        );
        assert!(
            out.starts_with("Coalesced ") && out.trim_end().ends_with(" sectors"),
            "{out}"
        );
    }
    let base = read_chain(&level_path(d, 0));
    assert!(
        base == leaf_model,
        "coalesced base differs at {:?}",
        first_diff(&base, &leaf_model)
    );
    let out = stdout(
        Command::new(ours())
            .args(["check", "-n"])
            .arg(level_path(d, 0)),
    );
    assert!(out.contains("is valid"), "{out}");
    if let Some(bt_prefix) = blktap() {
        let out = stdout(
            bt(&bt_prefix, "bin/vhd-util")
                .args(["check", "-n"])
                .arg(level_path(d, 0)),
        );
        assert!(
            out.contains("is valid"),
            "blktap check of the coalesced base: {out}"
        );
    }
}
