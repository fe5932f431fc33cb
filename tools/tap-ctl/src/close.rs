//! `tap-ctl close`: close a VBD, leaving its tapdisk running (until `detach`).

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use nix::errno::Errno;
use tapdisk_control::minor::{self, Marker};
use tapdisk_control::process::pid_alive;
use tapdisk_control::proto::Command;

use crate::ctx::{wait_gone, EXIT_TIMEOUT};
use crate::failure::{exit_code, fail};
use crate::{one_line, Ctx, Target};

/// Examples shown by `tap-ctl close --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl close -m 0
  tap-ctl close -p 4242 -m 0 -t 120       # as xapi's storage manager does
  tap-ctl close -p 4242 -m 0 -t 30 -f     # kill the tapdisk if the close takes longer
  tap-ctl close -m 3                      # minor 3's tapdisk died: clean up its sockets";

/// Options of `close`.
#[derive(Debug, Clone, Args)]
pub struct CloseArgs {
    /// The VBD.
    #[command(flatten)]
    pub target: Target,
    /// Give up after SECONDS (the whole exchange; 75 by default).
    #[arg(short = 't', long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// If the close fails or times out and the VBD is the tapdisk's only one, kill the
    /// tapdisk (blktap3's forced shutdown: IO in flight is abandoned).
    #[arg(short = 'f', long)]
    pub force: bool,
}

/// How a close went: the tapdisk lives on, or it is dead and was cleaned up after.
pub enum Closed {
    /// The tapdisk closed the VBD.
    Live(u32),
    /// The tapdisk was dead (or was killed by `-f`); its sockets are gone.
    Dead,
}

/// Closes the VBD.
pub fn run(ctx: &Ctx, args: &CloseArgs) -> Result<()> {
    close(ctx, &args.target, args.timeout, args.force).map(drop)
}

/// Closes `target`, within `timeout` seconds if given; with `force`, kills a tapdisk that
/// serves only this VBD and does not close it in time. A tapdisk found dead is cleaned up
/// after: its sockets go, and the minor's marker forgets it (the minor stays allocated).
pub fn close(ctx: &Ctx, target: &Target, timeout: Option<u64>, force: bool) -> Result<Closed> {
    let m = target.minor;
    ctx.require_rundir()?;
    let marker = minor::inspect(&ctx.rundir, m)?;
    let pid = match (target.pid, &marker) {
        (Some(p), _) => p,
        (None, Marker::Dead(r)) => r.pid,
        (None, _) => ctx.resolve(target)?,
    };
    if let Marker::Dead(r) = &marker {
        if r.pid == pid {
            ctx.clean_dead(pid, m);
            ctx.forget_dead(m);
            return Ok(Closed::Dead);
        }
    }
    let mut conn = match ctx.connect(pid) {
        Ok(c) => c,
        Err(e) if exit_code(&e) == Errno::ESRCH as i32 && !pid_alive(pid) => {
            ctx.clean_dead(pid, m);
            ctx.forget_dead(m);
            return Ok(Closed::Dead);
        }
        Err(e) => return Err(e),
    };
    let cmd = Command::Close { minor: m };
    let limit = timeout.map_or(cmd.deadline(), Duration::from_secs);
    match conn.done_within(limit, cmd) {
        Ok(()) => Ok(Closed::Live(pid)),
        // It died under us (killed just before, its socket not yet gone; `Ctx` tells): what a
        // dead one gets.
        Err(e) if exit_code(&e) == Errno::ESRCH as i32 => {
            ctx.clean_dead(pid, m);
            ctx.forget_dead(m);
            Ok(Closed::Dead)
        }
        Err(e) if force => {
            let alone = conn
                .list()
                .map(|v| v.iter().all(|v| v.minor == m))
                .unwrap_or(true);
            if !alone {
                return Err(e.context(format!(
                    "not killing tapdisk {pid} for -f: it serves other VBDs"
                )));
            }
            drop(conn);
            if let Ok(p) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if !wait_gone(pid, EXIT_TIMEOUT) {
                return Err(fail(
                    Errno::ETIMEDOUT,
                    format!(
                        "tapdisk {pid} did not die within {} s of SIGKILL (after: {})",
                        EXIT_TIMEOUT.as_secs(),
                        one_line(&e)
                    ),
                ));
            }
            ctx.clean_dead(pid, m);
            ctx.forget_dead(m);
            Ok(Closed::Dead)
        }
        Err(e) => Err(e),
    }
}
