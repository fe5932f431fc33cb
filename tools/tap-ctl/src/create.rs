//! `tap-ctl create`: start a tapdisk and open a VBD in it.

use anyhow::Result;
use clap::Args;

use super::{emit, one_line, Ctx, DiskArgs};
use crate::failure::{exit_code, with_code};

/// Examples shown by `tap-ctl create --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl create -a aio:/var/lib/disks/vm1.img    # prints e.g. /run/blktap-control/tapdisk-rs/vbd/tapdev0
  tap-ctl create -a aio:/dev/vg0/vm2 -R -m 7      # read-only, as minor 7
  tap-ctl create -a aio:vm3.img --nbd tcp:127.0.0.1:10809 --direct off";

/// Options of `create`.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// Minor number for the VBD; the lowest free one if omitted.
    #[arg(short, long, value_name = "MINOR")]
    pub minor: Option<u32>,
    /// The image and its settings.
    #[command(flatten)]
    pub disk: DiskArgs,
}

/// Spawns a tapdisk, opens the VBD and prints its device; undoes the spawn if the open fails.
pub fn run(ctx: &Ctx, args: &CreateArgs) -> Result<()> {
    let disk = args.disk.validate()?;
    if let Some(m) = args.minor {
        ctx.check_minor_free(m)?;
    }
    let image = disk.image.clone();
    let pid = ctx.spawn()?;
    match ctx.connect(pid).and_then(|mut c| c.open(args.minor, disk)) {
        Ok(vbd) => emit(&format!("{}\n", tapdisk_control::escape::text(&vbd.device))),
        Err(e) => {
            let undone = match ctx.stop(pid, true) {
                Ok(()) => format!("the tapdisk started for it (pid {pid}) was stopped"),
                Err(e2) => format!("and stopping tapdisk {pid} failed too: {}", one_line(&e2)),
            };
            Err(with_code(
                exit_code(&e),
                format!("cannot open {image}: {}; {undone}", one_line(&e)),
            ))
        }
    }
}
