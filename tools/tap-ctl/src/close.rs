//! `tap-ctl close`: close a VBD, leaving its tapdisk running.

use anyhow::Result;
use clap::Args;
use tapdisk_control::proto::Command;

use super::{Ctx, Target};

/// Examples shown by `tap-ctl close --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl close -m 0
  tap-ctl close -m 0 -p 4242";

/// Options of `close`.
#[derive(Debug, Clone, Args)]
pub struct CloseArgs {
    /// The VBD.
    #[command(flatten)]
    pub target: Target,
}

/// Closes the VBD.
pub fn run(ctx: &Ctx, args: &CloseArgs) -> Result<()> {
    let mut conn = ctx.connect_target(&args.target)?;
    conn.done(Command::Close {
        minor: args.target.minor,
    })
}
