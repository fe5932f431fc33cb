//! Minor numbers: a claim is the file `<rundir>/minors/N` holding the claimant's pid,
//! created with `O_EXCL`; a claim whose process is gone is taken over.

use std::io::Write;
use std::path::PathBuf;

use tapdisk_control::RunDir;

use crate::error::{Error, IoContext, Result};

/// A claim on a minor number: the file `<rundir>/minors/N` holding our pid, removed on drop.
#[derive(Debug)]
pub struct MinorClaim {
    /// The number.
    pub minor: u32,
    path: PathBuf,
}

impl Drop for MinorClaim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Claims `wanted`, or the lowest free minor.
pub fn claim_minor(rundir: &RunDir, wanted: Option<u32>) -> Result<MinorClaim> {
    let me = std::process::id();
    let try_one = |m: u32| -> Result<Option<MinorClaim>> {
        let path = rundir.minor_dir().join(m.to_string());
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    writeln!(f, "{me}").doing(|| format!("claiming {}", path.display()))?;
                    return Ok(Some(MinorClaim { minor: m, path }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    match owner.trim().parse::<u32>() {
                        Ok(pid) if pid_alive(pid) => return Ok(None),
                        // A claim left by a dead tapdisk (or half written): reclaim it.
                        _ => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(Error::io(format!("claiming {}", path.display()), e)),
            }
        }
        Ok(None)
    };
    match wanted {
        Some(m) => try_one(m)?.ok_or_else(|| {
            let owner =
                std::fs::read_to_string(rundir.minor_dir().join(m.to_string())).unwrap_or_default();
            Error::MinorInUse {
                minor: m,
                owner: owner.trim().to_owned(),
            }
        }),
        None => {
            for m in 0..(1 << 20) {
                if let Some(c) = try_one(m)? {
                    return Ok(c);
                }
            }
            Err(Error::NoFreeMinor)
        }
    }
}
