//! `tap-ctl open`: open a VBD in a running tapdisk.

use anyhow::Result;
use clap::Args;

use super::{emit, one_line, Ctx, DiskArgs};
use crate::failure::{exit_code, with_code};

/// Examples shown by `tap-ctl open --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl open -p 4242 -a aio:/var/lib/disks/vm1.img   # prints e.g. /run/blktap-control/tapdisk-rs/vbd/tapdev0
  tap-ctl open -p 4242 -m 3 -a aio:/dev/vg0/vm1 --ring-order 4 --max-segments 8
  tap-ctl open -p 4242 -m 0 -a aio:/srv/vm1.img -R -D   # blktap3's: read-only, no O_DIRECT";

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
        with_code(
            exit_code(&e),
            format!(
                "tapdisk {}: cannot open {image}: {}",
                args.pid,
                one_line(&e)
            ),
        )
    })?;
    emit(&format!("{}\n", tapdisk_control::escape::text(&vbd.device)))
}
