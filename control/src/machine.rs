//! What the machine can give a tapdisk ([`Machine`]: memory and file descriptors, read from
//! `/proc` and the cgroup file system), and what a VBD's settings ask of it
//! ([`VbdSettings::memory_need`](crate::VbdSettings::memory_need)). The daemon checks every
//! `open` against the machine it runs on ([`VbdSettings::validate_on`](crate::VbdSettings::validate_on)),
//! so a size an operator gives that the machine cannot hold is refused with a message naming
//! the setting and what there is, instead of failing an allocation later.

use std::path::Path;

/// Bytes in a MiB.
pub const MIB: u64 = 1 << 20;

/// How much of something there is, and where that number comes from (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Room {
    /// How much.
    pub amount: u64,
    /// What limits it, in words (`available memory (MemAvailable)`).
    pub source: &'static str,
}

/// The resources a tapdisk process can still use. `None` where it cannot be told (no
/// `/proc`): then nothing is refused for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Machine {
    /// Bytes of memory it can still allocate: the least of the machine's available memory,
    /// what its cgroups' `memory.max` leave, and what its address-space limit leaves.
    pub memory: Option<Room>,
    /// File descriptors it can still open (its `RLIMIT_NOFILE` less those open).
    pub fds: Option<Room>,
}

impl Machine {
    /// The resources of the calling process, now.
    pub fn probe() -> Machine {
        let proc_ = Path::new("/proc");
        let sys = Path::new("/sys/fs/cgroup");
        Machine::read(proc_, sys)
    }

    /// As [`Machine::probe`], from a `/proc` and a cgroup file system rooted elsewhere
    /// (tests).
    pub fn read(proc_: &Path, cgroup_fs: &Path) -> Machine {
        let text = |p: &str| std::fs::read_to_string(proc_.join(p)).ok();
        let mut memory: Vec<Room> = Vec::new();
        if let Some(kb) = text("meminfo").and_then(|t| kib_field(&t, "MemAvailable:")) {
            memory.push(Room {
                amount: kb * 1024,
                source: "available memory (MemAvailable)",
            });
        }
        if let Some(room) = text("self/cgroup").and_then(|t| cgroup_room(&t, cgroup_fs)) {
            memory.push(Room {
                amount: room,
                source: "what the tapdisk's cgroup memory limit leaves",
            });
        }
        let limits = text("self/limits");
        if let (Some(Some(max)), Some(vm)) = (
            limits
                .as_deref()
                .and_then(|l| soft_limit(l, "Max address space")),
            text("self/status").and_then(|t| kib_field(&t, "VmSize:")),
        ) {
            memory.push(Room {
                amount: max.saturating_sub(vm * 1024),
                source: "what the tapdisk's address-space limit (RLIMIT_AS) leaves",
            });
        }
        let fds = match (
            limits
                .as_deref()
                .and_then(|l| soft_limit(l, "Max open files")),
            std::fs::read_dir(proc_.join("self/fd")).map(|d| d.count() as u64),
        ) {
            (Some(Some(max)), Ok(open)) => Some(Room {
                amount: max.saturating_sub(open),
                source: "file descriptors the tapdisk's RLIMIT_NOFILE leaves",
            }),
            _ => None,
        };
        Machine {
            memory: memory.into_iter().min_by_key(|r| r.amount),
            fds,
        }
    }
}

/// The value in KiB of a `/proc/meminfo`-style line `name  N kB`.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The soft limit of `/proc/self/limits` line `name`: `Some(None)` when unlimited.
fn soft_limit(text: &str, name: &str) -> Option<Option<u64>> {
    let rest = text.lines().find_map(|l| l.strip_prefix(name))?;
    match rest.split_whitespace().next()? {
        "unlimited" => Some(None),
        n => n.parse().ok().map(Some),
    }
}

/// What the memory limits of the tapdisk's cgroup (named in `/proc/self/cgroup`) and of its
/// ancestors leave: the least `limit - usage` among them. cgroup v2 (`0::/path`, with
/// `memory.max` and `memory.current`, at the root of `fs` or under `fs/unified`) and v1
/// (`N:memory:/path`, with `memory.limit_in_bytes` and `memory.usage_in_bytes` under
/// `fs/memory`).
fn cgroup_room(self_cgroup: &str, fs: &Path) -> Option<u64> {
    let mut room: Option<u64> = None;
    let mut take = |left: Option<u64>| {
        if let Some(l) = left {
            room = Some(room.map_or(l, |r| r.min(l)));
        }
    };
    for line in self_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if controllers.is_empty() {
            for root in [fs.to_path_buf(), fs.join("unified")] {
                take(hierarchy_room(&root, path, "memory.max", "memory.current"));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            take(hierarchy_room(
                &fs.join("memory"),
                path,
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            ));
        }
    }
    room
}

/// The least `limit - usage` of the cgroup at `path` under `root` and its ancestors, from
/// the files `limit` (a number, or `max`) and `usage`.
fn hierarchy_room(root: &Path, path: &str, limit: &str, usage: &str) -> Option<u64> {
    let mut room: Option<u64> = None;
    let mut dir = root.to_path_buf();
    let parts = path.split('/').filter(|p| !p.is_empty() && *p != "..");
    for part in std::iter::once("").chain(parts) {
        if !part.is_empty() {
            dir.push(part);
        }
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        let Some(max) = read(limit).and_then(|m| m.trim().parse::<u64>().ok()) else {
            continue;
        };
        let used = read(usage)
            .and_then(|c| c.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let left = max.saturating_sub(used);
        room = Some(room.map_or(left, |r| r.min(left)));
    }
    room
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_and_cgroup_files_are_read() {
        let d = tempfile::tempdir().unwrap();
        let (p, cg) = (d.path().join("proc"), d.path().join("cg"));
        std::fs::create_dir_all(p.join("self/fd")).unwrap();
        for i in 0..3 {
            std::fs::write(p.join(format!("self/fd/{i}")), "").unwrap();
        }
        std::fs::write(
            p.join("meminfo"),
            "MemTotal: 100 kB\nMemAvailable:   8000 kB\n",
        )
        .unwrap();
        std::fs::write(
            p.join("self/limits"),
            "Limit                     Soft Limit           Hard Limit           Units\n\
             Max open files            40                   4096                 files\n\
             Max address space         unlimited            unlimited            bytes\n",
        )
        .unwrap();
        std::fs::write(p.join("self/status"), "VmSize:\t  1000 kB\n").unwrap();
        std::fs::write(p.join("self/cgroup"), "0::/system.slice/td.service\n").unwrap();
        let m = Machine::read(&p, &cg);
        assert_eq!(m.memory.as_ref().unwrap().amount, 8000 * 1024);
        assert_eq!(m.fds.as_ref().unwrap().amount, 37);
        // A cgroup limit lower than the machine's available memory wins, and an ancestor's
        // lower limit wins over its child's.
        let svc = cg.join("system.slice/td.service");
        std::fs::create_dir_all(&svc).unwrap();
        std::fs::write(svc.join("memory.max"), "max\n").unwrap();
        std::fs::write(cg.join("system.slice/memory.max"), "4194304\n").unwrap();
        std::fs::write(cg.join("system.slice/memory.current"), "1048576\n").unwrap();
        let m = Machine::read(&p, &cg);
        assert_eq!(m.memory.as_ref().unwrap().amount, 3 << 20);
        assert!(m.memory.unwrap().source.contains("cgroup"));
        // cgroup v1's memory controller, on a hybrid system.
        std::fs::write(p.join("self/cgroup"), "4:memory:/api/x\n1:cpu:/\n0::/\n").unwrap();
        let v1 = cg.join("memory/api/x");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "3145728\n").unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "1048576\n").unwrap();
        let m = Machine::read(&p, &cg);
        assert_eq!(m.memory.as_ref().unwrap().amount, 2 << 20);
        // An address-space limit counts what is mapped already.
        std::fs::write(
            p.join("self/limits"),
            "Max address space         2097152              unlimited            bytes\n",
        )
        .unwrap();
        let m = Machine::read(&p, &cg);
        assert_eq!(m.memory.as_ref().unwrap().amount, 2097152 - 1000 * 1024);
        assert!(m.memory.unwrap().source.contains("RLIMIT_AS"));
        assert_eq!(m.fds, None, "no open-files line");
        // Nothing readable: nothing known.
        assert_eq!(
            Machine::read(&d.path().join("none"), &cg),
            Machine::default()
        );
    }

    #[test]
    fn this_process_is_probed() {
        let m = Machine::probe();
        assert!(m.memory.is_some_and(|r| r.amount > 0));
        assert!(m.fds.is_some_and(|r| r.amount > 0));
    }
}
