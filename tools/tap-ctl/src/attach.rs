//! `tap-ctl attach` and `tap-ctl detach`: blktap3's two steps around `open` and `close`.
//!
//! In blktap3 `attach` makes an empty VBD for an allocated minor in a tapdisk and `detach`
//! removes it, the tapdisk exiting with its last VBD. A tapdisk-rs VBD comes to be at `open`
//! (which takes the minor's marker), so `attach` checks what `open` will need (the tapdisk
//! answers, the minor is allocated and free) and `detach` stops a tapdisk left with no VBD.

use anyhow::Result;
use clap::Args;
use nix::errno::Errno;
use tapdisk_control::minor::{self, Marker};
use tapdisk_control::process::pid_alive;

use crate::failure::{exit_code, fail};
use crate::Ctx;

/// Examples shown by `tap-ctl attach --help`.
pub const ATTACH_EXAMPLES: &str = "\
Examples:
  tap-ctl allocate                       # /run/blktap-control/tapdisk/tapdisk-0
  tap-ctl spawn                          # 4242
  tap-ctl attach -p 4242 -m 0
  tap-ctl open -p 4242 -m 0 -a aio:/var/lib/disks/vm1.img";

/// Examples shown by `tap-ctl detach --help`.
pub const DETACH_EXAMPLES: &str = "\
Examples:
  tap-ctl close -p 4242 -m 0
  tap-ctl detach -p 4242 -m 0            # tapdisk 4242 exits if it serves nothing else
  tap-ctl free -m 0";

/// Options of `attach` and `detach`.
#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    /// The tapdisk.
    #[arg(short, long, value_name = "PID")]
    pub pid: u32,
    /// The minor.
    #[arg(short, long, value_name = "MINOR")]
    pub minor: u32,
}

/// Checks that tapdisk `pid` answers and that minor `minor` is allocated and free for it.
pub fn attach(ctx: &Ctx, a: &AttachArgs) -> Result<()> {
    let mut conn = ctx.connect(a.pid)?;
    if conn.list()?.iter().any(|v| v.minor == a.minor) {
        return Err(fail(
            Errno::EEXIST,
            format!("tapdisk {}: minor {} is attached already", a.pid, a.minor),
        ));
    }
    match minor::inspect(&ctx.rundir, a.minor)? {
        Marker::Missing => Err(fail(
            Errno::ENOENT,
            format!(
                "minor {} is not allocated ('tap-ctl allocate' first)",
                a.minor
            ),
        )),
        Marker::Held(r) => Err(tapdisk_control::Error::MinorInUse {
            minor: a.minor,
            owner: r.map(|r| r.pid),
        }
        .into()),
        Marker::Allocated | Marker::Dead(_) => Ok(()),
    }
}

/// Fails if tapdisk `pid` still has minor `minor` open; stops the tapdisk if it serves no VBD
/// any more. A dead tapdisk is cleaned up after instead.
pub fn detach(ctx: &Ctx, a: &AttachArgs) -> Result<()> {
    let mut conn = match ctx.connect(a.pid) {
        Ok(c) => c,
        Err(e) if exit_code(&e) == Errno::ESRCH as i32 && !pid_alive(a.pid) => {
            ctx.clean_dead(a.pid, a.minor);
            ctx.forget_dead(a.minor);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let vbds = conn.list()?;
    if vbds.iter().any(|v| v.minor == a.minor) {
        return Err(fail(
            Errno::EBUSY,
            format!(
                "tapdisk {}: minor {} is still open ('tap-ctl close -p {} -m {}' first)",
                a.pid, a.minor, a.pid, a.minor
            ),
        ));
    }
    if vbds.is_empty() {
        drop(conn);
        ctx.stop(a.pid, false)?;
    }
    Ok(())
}
