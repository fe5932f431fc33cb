//! `tap-ctl pause`: quiesce a VBD.

use anyhow::Result;
use clap::Args;
use tapdisk_control::proto::Command;

use super::{Ctx, Target};

/// Examples shown by `tap-ctl pause --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl pause -m 0      # returns once minor 0 has no IO in flight
  tap-ctl list -m 0       # ... state=paused ...
  tap-ctl unpause -m 0";

/// Options of `pause`.
#[derive(Debug, Clone, Args)]
pub struct PauseArgs {
    /// The VBD.
    #[command(flatten)]
    pub target: Target,
}

/// Pauses the VBD; the tapdisk answers once it is quiet.
pub fn run(ctx: &Ctx, args: &PauseArgs) -> Result<()> {
    let mut conn = ctx.connect_target(&args.target)?;
    conn.done(Command::Pause {
        minor: args.target.minor,
    })
}
