//! `tap-ctl open`: open a VBD in a running tapdisk.

use anyhow::{anyhow, Result};
use clap::Args;

use super::{emit, one_line, Ctx, DiskArgs};

/// Examples shown by `tap-ctl open --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl open -p 4242 -a aio:/var/lib/disks/vm1.img   # prints e.g. /run/tapdisk-rs/vbd/tapdev0
  tap-ctl open -p 4242 -m 3 -a aio:/dev/vg0/vm1 --ring-order 4 --max-segments 8";

/// Options of `open`.
#[derive(Debug, Clone, Args)]
pub struct OpenArgs {
    /// Pid of the tapdisk to open the VBD in (from 'tap-ctl spawn' or 'tap-ctl list').
    #[arg(short, long, value_name = "PID")]
    pub pid: u32,
    /// Minor number for the VBD; the lowest free one if omitted.
    #[arg(short, long, value_name = "MINOR")]
    pub minor: Option<u32>,
    /// The image and its settings.
    #[command(flatten)]
    pub disk: DiskArgs,
}

/// Opens the VBD and prints its device.
pub fn run(ctx: &Ctx, args: &OpenArgs) -> Result<()> {
    let disk = args.disk.validate()?;
    let image = disk.image.clone();
    let mut conn = ctx.connect(args.pid)?;
    let vbd = conn.open(args.minor, disk).map_err(|e| {
        anyhow!(
            "tapdisk {}: cannot open {image}: {}",
            args.pid,
            one_line(&e)
        )
    })?;
    emit(&format!("{}\n", vbd.device))
}
