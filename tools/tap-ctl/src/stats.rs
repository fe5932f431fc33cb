//! `tap-ctl stats`: the counters of a VBD, as one JSON line (blktap3's form, which xapi's
//! storage manager reads with one `readline`), indented JSON, or Prometheus text.

use anyhow::Result;
use clap::Args;
use nix::errno::Errno;
use tapdisk_control::proto::{Command, Reply};

use crate::failure::fail;
use crate::list::{gather, Row};
use crate::prometheus::{self, VbdStats};
use crate::{emit, Conn, Ctx, Target};

/// Examples shown by `tap-ctl stats --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl stats -p 4242 -m 0                 # one JSON line, as blktap3's
  tap-ctl stats -m 0 | jq .ring.latency
  tap-ctl stats -m 0 --pretty                # indented
  tap-ctl stats --prometheus > /var/lib/prometheus/node-exporter/tapdisk.prom.$$ &&
      mv /var/lib/prometheus/node-exporter/tapdisk.prom.$$ /var/lib/prometheus/node-exporter/tapdisk.prom
                                             # every VBD, for node_exporter's textfile collector";

/// Options of `stats`.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// Minor number of the VBD (required unless --prometheus, which then covers every VBD).
    #[arg(short, long, value_name = "MINOR")]
    pub minor: Option<u32>,
    /// Pid of the tapdisk serving the VBD (found through the run directory if omitted).
    #[arg(short, long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Indented JSON instead of one line.
    #[arg(long, conflicts_with = "prometheus")]
    pub pretty: bool,
    /// Prometheus text exposition format: one series per VBD and counter.
    #[arg(long)]
    pub prometheus: bool,
}

/// The counters of `minor` in tapdisk `conn`.
fn fetch(conn: &mut Conn, minor: u32) -> Result<serde_json::Value> {
    match conn.call(Command::Stats { minor })? {
        Reply::Stats { stats } => Ok(stats),
        other => Err(fail(
            Errno::EPROTO,
            format!("tapdisk {} sent an unexpected reply: {other:?}", conn.pid),
        )),
    }
}

/// Prints the VBD's counters (or every VBD's, in Prometheus format).
pub fn run(ctx: &Ctx, args: &StatsArgs) -> Result<()> {
    let Some(minor) = args.minor else {
        if !args.prometheus {
            return Err(fail(
                Errno::EINVAL,
                "stats needs -m MINOR (or --prometheus, for every VBD)",
            ));
        }
        return all_prometheus(ctx, args.pid);
    };
    let target = Target {
        minor,
        pid: args.pid,
    };
    let mut conn = ctx.connect_target(&target)?;
    let stats = fetch(&mut conn, minor)?;
    let text = if args.prometheus {
        prometheus::render(&[VbdStats {
            pid: conn.pid,
            minor,
            stats: &stats,
        }])
    } else if args.pretty {
        format!("{}\n", serde_json::to_string_pretty(&stats)?)
    } else {
        format!("{}\n", serde_json::to_string(&stats)?)
    };
    emit(&text)
}

/// Every live VBD of the run directory (or of tapdisk `pid`) in Prometheus format. A tapdisk
/// that does not answer is left out, and the failure reported after the output.
fn all_prometheus(ctx: &Ctx, pid: Option<u32>) -> Result<()> {
    let (rows, mut failures) = gather(ctx, pid)?;
    let mut collected = Vec::new();
    for r in rows {
        if let Row::Vbd { pid, vbd } = r {
            match ctx.connect(pid).and_then(|mut c| fetch(&mut c, vbd.minor)) {
                Ok(s) => collected.push((pid, vbd.minor, s)),
                Err(e) => failures.push(e),
            }
        }
    }
    let vbds: Vec<VbdStats<'_>> = collected
        .iter()
        .map(|(pid, minor, stats)| VbdStats {
            pid: *pid,
            minor: *minor,
            stats,
        })
        .collect();
    emit::<anyhow::Error>(&prometheus::render(&vbds))?;
    match failures.pop() {
        None => Ok(()),
        Some(e) => Err(e),
    }
}
