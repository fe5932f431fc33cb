//! `tap-ctl allocate` and `tap-ctl free`: minor numbers, as blktap3 keeps them
//! ([`tapdisk_control::minor`]).

use anyhow::Result;
use clap::Args;
use nix::errno::Errno;
use tapdisk_control::minor;

use crate::ctx::shown;
use crate::failure::fail;
use crate::{emit, Ctx};

/// Examples shown by `tap-ctl allocate --help`.
pub const ALLOCATE_EXAMPLES: &str = "\
Examples:
  tap-ctl allocate            # /run/blktap-control/tapdisk/tapdisk-0: minor 0 is yours
  tap-ctl free -m 0";

/// Examples shown by `tap-ctl free --help`.
pub const FREE_EXAMPLES: &str = "\
Examples:
  tap-ctl free -m 0           # after close and detach, as xapi's storage manager does
  tap-ctl free -m 3           # also cleans up after a tapdisk that died serving minor 3";

/// Options of `allocate` (none besides the global ones).
#[derive(Debug, Clone, Args)]
pub struct AllocateArgs {}

/// Options of `free`.
#[derive(Debug, Clone, Args)]
pub struct FreeArgs {
    /// The minor to free.
    #[arg(short, long, value_name = "MINOR")]
    pub minor: u32,
}

/// Allocates the lowest free minor and prints its marker's path.
pub fn allocate(ctx: &Ctx, _args: &AllocateArgs) -> Result<()> {
    ctx.create_rundir()?;
    let m = minor::allocate(&ctx.rundir)?;
    emit(&format!("{}\n", shown(&ctx.rundir.minor_marker(m))))
}

/// Frees a minor no live process holds; cleans up after a tapdisk that died holding it.
pub fn free(ctx: &Ctx, args: &FreeArgs) -> Result<()> {
    let m = args.minor;
    if !ctx.rundir.minor_dir().is_dir() {
        return Err(tapdisk_control::Error::NotAllocated(m).into());
    }
    match minor::free(&ctx.rundir, m) {
        Ok(Some(dead)) => {
            ctx.clean_dead(dead.pid, m);
            Ok(())
        }
        Ok(None) => Ok(()),
        // blktap3's free fails with EWOULDBLOCK on a marker its tapdisk holds.
        Err(tapdisk_control::Error::MinorInUse { owner, .. }) => Err(fail(
            Errno::EAGAIN,
            format!(
                "minor {m} is in use{}: close it first ('tap-ctl destroy -m {m}')",
                owner
                    .map(|p| format!(" by tapdisk {p}"))
                    .unwrap_or_default()
            ),
        )),
        Err(e) => Err(e.into()),
    }
}
