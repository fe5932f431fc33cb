//! `tap-ctl unpause`: resume a paused VBD.

use anyhow::Result;
use clap::Args;
use nix::errno::Errno;
use tapdisk_control::proto::Command;

use super::args::validate_image;
use super::{Ctx, Target};
use crate::failure::fail;

/// Examples shown by `tap-ctl unpause --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl unpause -m 0
  tap-ctl unpause -p 4242 -m 0 -a aio:/var/lib/disks/vm1-snap.img   # switch images while paused";

/// Options of `unpause`.
#[derive(Debug, Clone, Args)]
pub struct UnpauseArgs {
    /// The VBD.
    #[command(flatten)]
    pub target: Target,
    /// Resume on this image instead, as TYPE:PATH; it must be the same size as the old one.
    #[arg(short = 'a', long = "args", value_name = "TYPE:PATH")]
    pub image: Option<String>,
    /// blktap3's secondary (mirror) image: not supported (refused).
    #[arg(short = '2', value_name = "PATH", help_heading = "blktap3's flags")]
    pub secondary: Option<String>,
    /// blktap3's changed-block-tracking log: not supported (refused).
    #[arg(short = 'c', value_name = "LOGFILE", help_heading = "blktap3's flags")]
    pub cbt_log: Option<String>,
}

/// Resumes the VBD.
pub fn run(ctx: &Ctx, args: &UnpauseArgs) -> Result<()> {
    if args.secondary.is_some() || args.cbt_log.is_some() {
        let what = if args.secondary.is_some() {
            "-2 (a secondary image)"
        } else {
            "-c (changed-block tracking)"
        };
        return Err(fail(
            Errno::EOPNOTSUPP,
            format!("blktap3's {what} is not supported by tapdisk-rs"),
        ));
    }
    let image = args.image.as_deref().map(validate_image).transpose()?;
    let mut conn = ctx.connect_target(&args.target)?;
    conn.done(Command::Unpause {
        minor: args.target.minor,
        image,
    })
}
