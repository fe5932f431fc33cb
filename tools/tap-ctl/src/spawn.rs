//! `tap-ctl spawn`: start a tapdisk with no VBD.

use anyhow::Result;
use clap::Args;

use super::{emit, Ctx};

/// Examples shown by `tap-ctl spawn --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl spawn                                   # prints the pid, e.g. 4242
  tap-ctl open -p 4242 -a aio:/var/lib/disks/vm1.img
  tap-ctl --rundir /tmp/td spawn                  # a private run directory";

/// Options of `spawn` (none besides the global ones).
#[derive(Debug, Clone, Args)]
pub struct SpawnArgs {}

/// Starts a tapdisk and prints its pid (within 10 s, or fails saying what it waited for).
pub fn run(ctx: &Ctx, _args: &SpawnArgs) -> Result<()> {
    let pid = ctx.spawn()?;
    emit(&format!("{pid}\n"))
}
