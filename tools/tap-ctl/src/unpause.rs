//! `tap-ctl unpause`: resume a paused VBD.

use anyhow::Result;
use clap::Args;
use tapdisk_control::proto::Command;

use super::args::validate_image;
use super::{Ctx, Target};

/// Examples shown by `tap-ctl unpause --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl unpause -m 0
  tap-ctl unpause -m 0 -a aio:/var/lib/disks/vm1-snap.img   # switch images while paused";

/// Options of `unpause`.
#[derive(Debug, Clone, Args)]
pub struct UnpauseArgs {
    /// The VBD.
    #[command(flatten)]
    pub target: Target,
    /// Resume on this image instead, as TYPE:PATH; it must be the same size as the old one.
    #[arg(short = 'a', long = "args", value_name = "TYPE:PATH")]
    pub image: Option<String>,
}

/// Resumes the VBD.
pub fn run(ctx: &Ctx, args: &UnpauseArgs) -> Result<()> {
    let image = args.image.as_deref().map(validate_image).transpose()?;
    let mut conn = ctx.connect_target(&args.target)?;
    conn.done(Command::Unpause {
        minor: args.target.minor,
        image,
    })
}
