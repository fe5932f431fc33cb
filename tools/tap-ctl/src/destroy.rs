//! `tap-ctl destroy`: close a VBD, stop its tapdisk once idle, free its minor; or clean up
//! after a tapdisk that died.

use anyhow::Result;
use clap::Args;
use tapdisk_control::minor::{self, Marker};

use crate::close::{close, Closed};
use crate::{Ctx, Target};

/// Examples shown by `tap-ctl destroy --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl destroy -m 0
  tap-ctl destroy -p 4242 -m 0          # as Xen's block-tap does
  tap-ctl destroy -m 3                  # minor 3's tapdisk was killed: remove what it left";

/// Options of `destroy`.
#[derive(Debug, Clone, Args)]
pub struct DestroyArgs {
    /// The VBD.
    #[command(flatten)]
    pub target: Target,
    /// Give up the close after SECONDS.
    #[arg(short = 't', long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// Closes the VBD (cleaning up if its tapdisk is dead); if its tapdisk then serves none,
/// shuts it down and waits for it to exit; then frees the minor.
pub fn run(ctx: &Ctx, args: &DestroyArgs) -> Result<()> {
    let m = args.target.minor;
    ctx.require_rundir()?;
    let marker = minor::inspect(&ctx.rundir, m)?;
    if args.target.pid.is_none() && marker == Marker::Allocated {
        // Allocated, never opened: nothing to close.
        minor::free(&ctx.rundir, m)?;
        return Ok(());
    }
    if let Closed::Live(pid) = close(ctx, &args.target, args.timeout, false)? {
        let idle = ctx.connect(pid).and_then(|mut c| c.list())?.is_empty();
        if idle {
            ctx.stop(pid, false)?;
        }
    }
    // A minor allocated with 'tap-ctl allocate' outlives the VBD; one the tapdisk made for
    // itself is gone already.
    if matches!(
        minor::inspect(&ctx.rundir, m)?,
        Marker::Allocated | Marker::Dead(_)
    ) {
        if let Some(dead) = minor::free(&ctx.rundir, m)? {
            ctx.clean_dead(dead.pid, m);
        }
    }
    Ok(())
}
