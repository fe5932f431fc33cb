//! `tap-ctl stats`: the counters of a VBD.

use anyhow::{anyhow, Result};
use clap::Args;
use tapdisk_control::proto::{Command, Reply};

use super::{emit, Ctx, Target};

/// Examples shown by `tap-ctl stats --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl stats -m 0
  tap-ctl stats -m 0 | jq .ring";

/// Options of `stats`.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// The VBD.
    #[command(flatten)]
    pub target: Target,
}

/// Prints the VBD's counters as indented JSON.
pub fn run(ctx: &Ctx, args: &StatsArgs) -> Result<()> {
    let mut conn = ctx.connect_target(&args.target)?;
    let stats = match conn.call(Command::Stats {
        minor: args.target.minor,
    })? {
        Reply::Stats { stats } => stats,
        other => {
            return Err(anyhow!(
                "tapdisk {} sent an unexpected reply: {other:?}",
                conn.pid
            ))
        }
    };
    emit(&format!("{}\n", serde_json::to_string_pretty(&stats)?))
}
