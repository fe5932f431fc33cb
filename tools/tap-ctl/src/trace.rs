//! `tap-ctl trace`: write what a VBD's trace buffers recorded to a file.

use anyhow::{anyhow, Context, Result};
use clap::{Args, ValueEnum};
use tapdisk_control::proto::{Command, Reply, TraceFormat};

use super::{emit, Ctx, Target};

/// Examples shown by `tap-ctl trace --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl create -a aio:/var/lib/disks/vm1.img --trace 100000
  tap-ctl trace -m 0 -o vm1-trace.json          # open it in https://ui.perfetto.dev
  tap-ctl trace -m 0 -o raw.json --format raw   # the records, for scripts";

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Chrome trace-event JSON: one track per request, a slice per stage.
    Chrome,
    /// The raw records as JSON (id, op, sector, and ns timestamps of each stage).
    Raw,
}

/// Options of `trace`.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// The VBD (opened with --trace N, else there is nothing to write).
    #[command(flatten)]
    pub target: Target,
    /// File to write.
    #[arg(short, long, value_name = "FILE")]
    pub output: std::path::PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Chrome)]
    pub format: Format,
}

/// Asks the tapdisk to write the trace and reports what it wrote.
pub fn run(ctx: &Ctx, args: &TraceArgs) -> Result<()> {
    let path = std::path::absolute(&args.output)
        .with_context(|| format!("resolving {}", args.output.display()))?;
    let mut conn = ctx.connect_target(&args.target)?;
    let reply = conn.call(Command::Trace {
        minor: args.target.minor,
        path: path.display().to_string(),
        format: match args.format {
            Format::Chrome => TraceFormat::Chrome,
            Format::Raw => TraceFormat::Raw,
        },
    })?;
    match reply {
        Reply::Trace {
            path,
            requests,
            dropped,
        } => {
            let note = if requests == 0 {
                " (the VBD records nothing unless opened with --trace N)".to_string()
            } else if dropped > 0 {
                format!(", {dropped} more not recorded: the buffer was full")
            } else {
                String::new()
            };
            let path = tapdisk_control::escape::text(&path);
            emit(&format!("{path}: {requests} requests{note}\n"))
        }
        other => Err(anyhow!(
            "tapdisk {} sent an unexpected reply: {other:?}",
            conn.pid
        )),
    }
}
