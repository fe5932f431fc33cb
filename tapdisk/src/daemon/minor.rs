//! Minor numbers: the daemon's side of the markers `<rundir>/minors/N` (their lock, record and
//! takeover of a dead tapdisk's claim are in [`tapdisk_control::minor`], shared with tap-ctl).

use tapdisk_control::minor::{self, MinorRecord};
use tapdisk_control::RunDir;

pub use tapdisk_control::minor::MinorClaim;

use crate::error::Result;

/// Claims `wanted`, or the lowest free minor, for a VBD of this process serving `image`.
pub fn claim_minor(
    rundir: &RunDir,
    wanted: Option<u32>,
    image: &tapdisk_control::ImageSpec,
) -> Result<MinorClaim> {
    let record = MinorRecord {
        pid: std::process::id(),
        image: Some(image.clone()),
    };
    Ok(minor::claim(rundir, wanted, &record)?)
}
