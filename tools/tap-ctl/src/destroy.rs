//! `tap-ctl destroy`: close a VBD and stop its tapdisk once idle.

use anyhow::Result;
use clap::Args;
use tapdisk_control::proto::Command;

use super::{Ctx, Target};

/// Examples shown by `tap-ctl destroy --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl destroy -m 0
  tap-ctl destroy -m 0 -p 4242";

/// Options of `destroy`.
#[derive(Debug, Clone, Args)]
pub struct DestroyArgs {
    /// The VBD.
    #[command(flatten)]
    pub target: Target,
}

/// Closes the VBD; if its tapdisk then serves none, shuts it down and waits for it to exit.
pub fn run(ctx: &Ctx, args: &DestroyArgs) -> Result<()> {
    let mut conn = ctx.connect_target(&args.target)?;
    conn.done(Command::Close {
        minor: args.target.minor,
    })?;
    if conn.list()?.is_empty() {
        let pid = conn.pid;
        drop(conn);
        ctx.stop(pid, false)?;
    }
    Ok(())
}
