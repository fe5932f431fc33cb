//! `tap-ctl pause`: quiesce a VBD.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use tapdisk_control::proto::Command;

use super::{Ctx, Target};

/// Examples shown by `tap-ctl pause --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl pause -m 0      # returns once minor 0 has no IO in flight
  tap-ctl list -m 0       # ... state=0x28 (paused, quiesced) ...
  tap-ctl unpause -m 0";

/// Options of `pause`.
#[derive(Debug, Clone, Args)]
pub struct PauseArgs {
    /// The VBD.
    #[command(flatten)]
    pub target: Target,
    /// Give up after SECONDS (the whole exchange; 75 by default: the tapdisk itself gives up
    /// after 30 s for NBD requests and 30 s for the rings).
    #[arg(short = 't', long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// Pauses the VBD; the tapdisk answers once it is quiet.
pub fn run(ctx: &Ctx, args: &PauseArgs) -> Result<()> {
    let mut conn = ctx.connect_target(&args.target)?;
    let cmd = Command::Pause {
        minor: args.target.minor,
    };
    let limit = args.timeout.map_or(cmd.deadline(), Duration::from_secs);
    conn.done_within(limit, cmd)
}
