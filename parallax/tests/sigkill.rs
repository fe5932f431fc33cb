//! Kills a real writer process with SIGKILL at random points, many times, and checks the image
//! after each kill.
//!
//! The writer is this test binary run again (`PARALLAX_CRASH_CHILD=image`), executing
//! [`child`]: a seeded sequence of writes, flushes, snapshots and snapshot deletions through the
//! file backing, printing `F <op>` after each completed flush. The parent kills it after a random
//! delay, then checks the image (`check` must be clean), and verifies every sector of the disk:
//! it holds what it held at the last flush the parent saw, or a value written to it after that
//! flush. Every snapshot present holds exactly what the disk held when it was taken, and every
//! snapshot taken and flushed before that flush (and not deleted by then) is present. The
//! recovered image is the start of the next round.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parallax::{check, Disk, DiskOptions, DiskSpec, Rng, VolumeKind};

const SECTOR: u64 = 512;
const SIZE: u64 = 4 << 20;
const SECTORS: u64 = SIZE / SECTOR;
const OPS: usize = 4000;
const ROUNDS: u32 = 30;

#[derive(Clone, Debug)]
enum COp {
    Write {
        sector: u64,
        n: u64,
    },
    Flush,
    /// Snapshot named after the round and op, then flush.
    Snapshot,
    /// Delete this round's snapshot taken at op `at`, then flush.
    Delete {
        at: usize,
    },
    /// Delete every snapshot of earlier rounds, then flush.
    DeleteOld,
}

fn snap_name(round: u32, at: usize) -> String {
    format!("r{round}-{at}")
}

fn id_of(round: u32, op: usize) -> u32 {
    (round << 16) | (op as u32 + 1)
}

fn ops(seed: u64) -> Vec<COp> {
    let mut rng = Rng::new(seed);
    let mut v = vec![COp::DeleteOld];
    let mut snaps: Vec<usize> = Vec::new();
    while v.len() < OPS {
        let r = rng.below(100);
        let op = if r < 84 {
            let n = 1 + rng.below(64);
            COp::Write {
                sector: rng.below(SECTORS - n),
                n,
            }
        } else if r < 94 {
            COp::Flush
        } else if r < 97 || snaps.len() < 2 {
            snaps.push(v.len());
            COp::Snapshot
        } else {
            COp::Delete {
                at: snaps.remove(0),
            }
        };
        v.push(op);
    }
    v
}

fn fill(buf: &mut [u8], first: u64, id: u32) {
    for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
        let w = ((id as u64) << 32 | (first + i as u64)).to_le_bytes();
        for c in s.chunks_mut(8) {
            c.copy_from_slice(&w);
        }
    }
}

fn decode(s: &[u8], sector: u64) -> u32 {
    let w = u64::from_le_bytes(s[..8].try_into().unwrap());
    assert!(
        s.chunks(8).all(|c| c == w.to_le_bytes()),
        "sector {sector} is torn or garbage"
    );
    if w == 0 {
        return 0;
    }
    assert_eq!(
        w & 0xffff_ffff,
        sector,
        "sector {sector} holds another sector's data"
    );
    (w >> 32) as u32
}

/// The writer: runs when `PARALLAX_CRASH_CHILD` names an image; otherwise does nothing.
#[test]
fn child() {
    let Ok(path) = std::env::var("PARALLAX_CRASH_CHILD") else {
        return;
    };
    let seed: u64 = std::env::var("PARALLAX_CRASH_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let round: u32 = std::env::var("PARALLAX_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let spec: DiskSpec = path.parse().unwrap();
    let mut disk = Disk::open(&spec, DiskOptions::default()).unwrap();
    let mut buf = vec![0u8; 64 * SECTOR as usize];
    for (i, op) in ops(seed).into_iter().enumerate() {
        match op {
            COp::Write { sector, n } => {
                let b = &mut buf[..(n * SECTOR) as usize];
                fill(b, sector, id_of(round, i));
                disk.write_at(sector * SECTOR, b).unwrap();
                continue;
            }
            COp::Flush => {}
            COp::Snapshot => {
                let v = disk.volume_id();
                disk.image_mut().snapshot(v, &snap_name(round, i)).unwrap();
            }
            COp::Delete { at } => {
                let img = disk.image_mut();
                let v = img.volume(&snap_name(round, at)).unwrap();
                img.delete(v).unwrap();
            }
            COp::DeleteOld => {
                let img = disk.image_mut();
                let old: Vec<_> = img
                    .volumes()
                    .iter()
                    .filter(|v| v.kind == VolumeKind::Snapshot)
                    .map(|v| v.name.clone())
                    .collect();
                for name in old {
                    let v = img.volume(&name).unwrap();
                    img.delete(v).unwrap();
                }
            }
        }
        disk.flush().unwrap();
        println!("F {i}");
    }
}

fn read_volume(disk: &mut Disk, vol: &str) -> Vec<u32> {
    let img = disk.image_mut();
    let v = img.volume(vol).unwrap();
    let mut b = vec![0u8; SIZE as usize];
    img.read_at(v, 0, &mut b).unwrap();
    b.chunks(SECTOR as usize)
        .enumerate()
        .map(|(i, s)| decode(s, i as u64))
        .collect()
}

fn run_child(image: &Path, seed: u64, round: u32, kill_after: Duration) -> Option<usize> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env("PARALLAX_CRASH_CHILD", image)
        .env("PARALLAX_CRASH_SEED", seed.to_string())
        .env("PARALLAX_CRASH_ROUND", round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("F ") {
                let _ = tx.send(n.parse::<usize>().unwrap());
            }
        }
    });
    // The clock runs from its first flush (its start-up time varies with the machine).
    let mut last = rx.recv_timeout(Duration::from_secs(10)).ok();
    let start = Instant::now();
    while start.elapsed() < kill_after {
        if let Ok(n) = rx.recv_timeout(Duration::from_millis(1)) {
            last = Some(n);
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    // Flushes the child reported before it died count too; the parent may see them late, as
    // a guest sees a completion after the backend died. Only what was seen is required.
    while let Ok(n) = rx.try_recv() {
        last = Some(n);
    }
    last
}

#[test]
fn sigkill_during_writes_and_flushes() {
    if std::env::var("PARALLAX_CRASH_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.plx");
    let mut o = parallax::CreateOptions::new(SIZE);
    o.cache_slots = 16;
    drop(Disk::create(&path, &o).unwrap());
    let mut rng = Rng::new(0x5eed_c0de);
    let mut base: Vec<u32> = vec![0; SECTORS as usize];
    // Snapshots present after the last round, with their content.
    let mut snaps: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut kills_mid_flush = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut rounds = 0;
    for round in 1..=ROUNDS {
        if Instant::now() > deadline {
            break;
        }
        rounds += 1;
        let seed = rng.next_u64();
        let kill_after = Duration::from_millis(rng.below(100));
        let last = run_child(&path, seed, round, kill_after);
        let seq = ops(seed);

        // What the disk must hold, and what else each sector may hold.
        let mut at_flush = base.clone();
        let mut maybe: HashMap<u64, HashSet<u32>> = HashMap::new();
        let mut expect_snaps: BTreeMap<String, Vec<u32>> = snaps.clone();
        let mut required: HashSet<String> = HashSet::new();
        let mut must_be_gone: HashSet<String> = HashSet::new();
        let mut cur = base.clone();
        for (i, op) in seq.iter().enumerate() {
            let durable = last.is_some_and(|l| i <= l);
            match op {
                COp::Write { sector, n } => {
                    for s in *sector..sector + n {
                        cur[s as usize] = id_of(round, i);
                        if durable {
                            at_flush[s as usize] = id_of(round, i);
                        } else {
                            maybe.entry(s).or_default().insert(id_of(round, i));
                        }
                    }
                }
                COp::Snapshot => {
                    let name = snap_name(round, i);
                    expect_snaps.insert(name.clone(), cur.clone());
                    if durable {
                        required.insert(name);
                    }
                }
                COp::Delete { at } => {
                    // A delete after the last flush seen may have been committed too, its
                    // acknowledgement lost with the process.
                    required.remove(&snap_name(round, *at));
                    if durable {
                        must_be_gone.insert(snap_name(round, *at));
                    }
                }
                COp::DeleteOld => {
                    if durable {
                        must_be_gone.extend(snaps.keys().cloned());
                    }
                }
                COp::Flush => {}
            }
        }

        let b = parallax::FileBacking::open(&path, true).unwrap();
        let r = check(&b, None).unwrap();
        assert!(r.is_clean(), "round {round}: check after SIGKILL: {r}");
        drop(b);
        let spec: DiskSpec = path.to_str().unwrap().parse().unwrap();
        let mut disk = Disk::open(&spec, DiskOptions::default()).unwrap();
        let got = read_volume(&mut disk, "base");
        for (s, &id) in got.iter().enumerate() {
            let ok = id == at_flush[s] || maybe.get(&(s as u64)).is_some_and(|m| m.contains(&id));
            assert!(
                ok,
                "round {round}: sector {s} holds write {id:#x}; at the last seen flush ({last:?}) it held {:#x}",
                at_flush[s]
            );
        }
        let present: Vec<String> = disk
            .image()
            .volumes()
            .iter()
            .filter(|v| v.kind == VolumeKind::Snapshot)
            .map(|v| v.name.clone())
            .collect();
        for name in &required {
            assert!(
                present.contains(name),
                "round {round}: snapshot {name} is missing"
            );
        }
        let mut now = BTreeMap::new();
        for name in present {
            assert!(
                !must_be_gone.contains(&name),
                "round {round}: snapshot {name} came back"
            );
            let want = expect_snaps
                .get(&name)
                .unwrap_or_else(|| panic!("round {round}: unknown snapshot {name}"));
            let content = read_volume(&mut disk, &name);
            assert!(&content == want, "round {round}: snapshot {name} changed");
            now.insert(name, content);
        }
        if last.is_some() && maybe.values().any(|m| !m.is_empty()) {
            kills_mid_flush += 1;
        }
        snaps = now;
        base = got;
    }
    eprintln!("{rounds} SIGKILL rounds, {kills_mid_flush} with unflushed writes at the kill");
    assert!(rounds >= 5, "only {rounds} rounds ran");
    assert!(kills_mid_flush >= rounds / 2);
}
