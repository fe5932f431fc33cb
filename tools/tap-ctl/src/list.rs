//! `tap-ctl list`: tapdisks, their VBDs, allocated minors and dead tapdisks, in blktap3's
//! lines (what Xen's `block-tap` and xapi's storage manager parse).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

use anyhow::Result;
use clap::Args;
use nix::errno::Errno;
use serde_json::json;
use tapdisk_control::escape;
use tapdisk_control::minor::{self, Marker, MinorRecord};
use tapdisk_control::process::pid_alive;
use tapdisk_control::proto::{flags, VbdSummary};
use tapdisk_control::{client, ImageSpec};

use crate::ctx::shown;
use crate::failure::fail;
use crate::{emit, one_line, Ctx};

/// Examples shown by `tap-ctl list --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl list
      pid=4242 minor=0 state=0 args=aio:/var/lib/disks/vm1.img
      pid=4242 minor=1 state=0x28 args=aio:/dev/vg0/vm2
      pid=4300
      minor=5
      minor=3 state=0x1 args=aio:/srv/vm3.img     (and on stderr: its tapdisk is dead)
  tap-ctl list -m 1
  tap-ctl list -t aio -f /var/lib/disks/vm1.img     # as Xen's block-tap finds a disk
  tap-ctl list --long      # also nbd=ADDRESS and xen=dom<d>/<dev>(<vdev>):order<o>x<q>q:<state>
  tap-ctl list -p 4242 --json     # also device, rings, size, read_only, NBD socket";

/// Options of `list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only this tapdisk.
    #[arg(short, long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Only the VBD with this minor number.
    #[arg(short, long, value_name = "MINOR")]
    pub minor: Option<u32>,
    /// Only VBDs of this image type (aio, parallax, stripe).
    #[arg(short = 't', long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// Only VBDs of this image (the PATH of TYPE:PATH, exactly).
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: Option<OsString>,
    /// Add our fields to each VBD's line: nbd=ADDRESS (an --nbd export) and xen=... per Xen
    /// frontend; a dead VBD gets dead_pid=PID.
    #[arg(short = 'l', long)]
    pub long: bool,
    /// Print JSON instead of lines: [{"pid": PID, "vbds": [...]}, ...], dead tapdisks with
    /// "dead": true, allocated minors no tapdisk serves as {"minor": N}.
    #[arg(long)]
    pub json: bool,
}

/// One line of the listing.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A VBD of a live tapdisk.
    Vbd {
        /// The tapdisk.
        pid: u32,
        /// The VBD.
        vbd: Box<VbdSummary>,
    },
    /// A live tapdisk with no VBD.
    Idle {
        /// The tapdisk.
        pid: u32,
    },
    /// A VBD whose tapdisk died: its minor's marker names it.
    Dead {
        /// The minor.
        minor: u32,
        /// What the dead tapdisk wrote: its pid and image.
        record: MinorRecord,
    },
    /// A dead tapdisk that held no minor (its control socket was left).
    DeadIdle {
        /// Its pid.
        pid: u32,
    },
    /// An allocated minor no listed tapdisk serves.
    Orphan {
        /// The minor.
        minor: u32,
    },
}

impl Row {
    fn pid(&self) -> Option<u32> {
        match self {
            Row::Vbd { pid, .. } | Row::Idle { pid } | Row::DeadIdle { pid } => Some(*pid),
            Row::Dead { record, .. } => Some(record.pid),
            Row::Orphan { .. } => None,
        }
    }
    fn minor(&self) -> Option<u32> {
        match self {
            Row::Vbd { vbd, .. } => Some(vbd.minor),
            Row::Dead { minor, .. } | Row::Orphan { minor } => Some(*minor),
            Row::Idle { .. } | Row::DeadIdle { .. } => None,
        }
    }
    fn image(&self) -> Option<&ImageSpec> {
        match self {
            Row::Vbd { vbd, .. } => Some(&vbd.image),
            Row::Dead { record, .. } => record.image.as_ref(),
            _ => None,
        }
    }
}

/// The PATH part of `TYPE:PATH` as blktap3 prints and matches it (a Parallax volume after
/// `@`), as bytes.
fn file_part(spec: &ImageSpec) -> OsString {
    let mut f = spec.path.clone().into_os_string();
    if let Some(v) = &spec.volume {
        f.push("@");
        f.push(v);
    }
    f
}

/// `args=TYPE:PATH`, escaped.
fn args_field(spec: &ImageSpec) -> String {
    format!(
        "args={}:{}",
        spec.driver.name(),
        escape::bytes(file_part(spec).as_bytes())
    )
}

/// blktap3's `%#x`: `0`, `0x20`.
fn hex(state: u32) -> String {
    if state == 0 {
        "0".into()
    } else {
        format!("{state:#x}")
    }
}

/// Whether `row` passes the filters, as blktap3's list applies them.
pub fn matches(row: &Row, a: &ListArgs) -> bool {
    if a.minor.is_some_and(|m| row.minor() != Some(m)) {
        return false;
    }
    if a.pid.is_some_and(|p| row.pid() != Some(p)) {
        return false;
    }
    if let Some(t) = &a.kind {
        if row.image().is_none_or(|i| i.driver.name() != t) {
            return false;
        }
    }
    if let Some(f) = &a.file {
        if row.image().is_none_or(|i| &file_part(i) != f) {
            return false;
        }
    }
    true
}

/// Everything in the run directory: live tapdisks' VBDs, then minors no live tapdisk serves.
/// Returns the rows and the failures of tapdisks that are alive but did not answer.
pub fn gather(ctx: &Ctx, only_pid: Option<u32>) -> Result<(Vec<Row>, Vec<anyhow::Error>)> {
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    if !ctx.rundir.0.is_dir() {
        return Ok((rows, failures));
    }
    let pids = match only_pid {
        Some(p) => vec![p],
        None => client::control_pids(&ctx.rundir)?,
    };
    let mut served = BTreeSet::new();
    let mut dead = BTreeSet::new();
    for pid in pids {
        match ctx.connect(pid).and_then(|mut c| c.list()) {
            Ok(vbds) if vbds.is_empty() => rows.push(Row::Idle { pid }),
            Ok(vbds) => {
                for v in vbds {
                    served.insert(v.minor);
                    rows.push(Row::Vbd {
                        pid,
                        vbd: Box::new(v),
                    });
                }
            }
            // blktap3 lists nothing for a pid that is no tapdisk.
            Err(_) if !minor::is_socket(&ctx.rundir.ctl_socket(pid)) => {}
            Err(_) if !pid_alive(pid) => {
                dead.insert(pid);
            }
            Err(e) => failures.push(e),
        }
    }
    for m in minor::markers(&ctx.rundir)? {
        if served.contains(&m) {
            continue;
        }
        match minor::inspect(&ctx.rundir, m)? {
            Marker::Dead(record) => {
                dead.remove(&record.pid);
                rows.push(Row::Dead { minor: m, record });
            }
            Marker::Held(_) | Marker::Allocated => rows.push(Row::Orphan { minor: m }),
            Marker::Missing => {}
        }
    }
    rows.extend(dead.into_iter().map(|pid| Row::DeadIdle { pid }));
    Ok((rows, failures))
}

/// Lists what the run directory holds. A dead tapdisk is listed (`state=0x1`), reported on
/// stderr, and makes the exit status ESRCH; a tapdisk that does not answer is reported after
/// the others are listed, with its error's status.
pub fn run(ctx: &Ctx, args: &ListArgs) -> Result<()> {
    let (rows, mut failures) = gather(ctx, args.pid)?;
    let rows: Vec<Row> = rows.into_iter().filter(|r| matches(r, args)).collect();
    let text = if args.json {
        format_json(&rows)?
    } else {
        format_text(&rows, args.long)
    };
    emit::<anyhow::Error>(&text)?;
    for r in &rows {
        match r {
            Row::Dead { minor, record } => failures.push(fail(
                Errno::ESRCH,
                format!(
                    "minor {minor}: tapdisk {} serving {} is dead (killed or crashed; its log: \
                     {}); 'tap-ctl destroy -m {minor}' cleans up after it",
                    record.pid,
                    record.image.as_ref().map_or("it".into(), |i| i.to_string()),
                    shown(&ctx.rundir.log_file(record.pid)),
                ),
            )),
            Row::DeadIdle { pid } => {
                // It held no minor: nothing of it is left to recover but its socket.
                ctx.clean_process(*pid);
                failures.push(fail(
                    Errno::ESRCH,
                    format!(
                        "tapdisk {pid} is dead (killed or crashed; its log: {}); it served no \
                         VBD, and its stale control socket was removed",
                        shown(&ctx.rundir.log_file(*pid)),
                    ),
                ));
            }
            _ => {}
        }
    }
    match failures.pop() {
        None => Ok(()),
        Some(last) => {
            for e in &failures {
                eprintln!("tap-ctl: {}", escape::text(&one_line(e)));
            }
            Err(last)
        }
    }
}

/// One line per row, blktap3's fields first: `pid=P minor=M state=0xS args=TYPE:PATH`.
pub fn format_text(rows: &[Row], long: bool) -> String {
    let mut out = String::new();
    for r in rows {
        let line = match r {
            Row::Vbd { pid, vbd } => {
                let mut l = format!(
                    "pid={pid} minor={} state={} {}",
                    vbd.minor,
                    hex(vbd.state.blktap_flags()),
                    args_field(&vbd.image)
                );
                if long {
                    if let Some(nbd) = &vbd.nbd {
                        l.push_str(&format!(" nbd={}", escape::text(&nbd.to_string())));
                    }
                    for x in &vbd.xen {
                        // A Xen frontend: its domain and device, its rings, their state.
                        l.push_str(&format!(
                            " xen=dom{}/{}({}):order{}x{}q:{}",
                            x.domid,
                            x.devid,
                            if x.vdev.is_empty() {
                                "-".into()
                            } else {
                                escape::text(&x.vdev)
                            },
                            x.ring_order,
                            x.queues,
                            escape::text(&x.state.split_whitespace().collect::<Vec<_>>().join("_"))
                        ));
                    }
                }
                l
            }
            Row::Idle { pid } => format!("pid={pid}"),
            Row::Dead { minor, record } => {
                let mut l = format!("minor={minor} state={}", hex(flags::DEAD));
                if let Some(i) = &record.image {
                    l.push(' ');
                    l.push_str(&args_field(i));
                }
                if long {
                    l.push_str(&format!(" dead_pid={}", record.pid));
                }
                l
            }
            Row::DeadIdle { pid } => format!("pid={pid} state={}", hex(flags::DEAD)),
            Row::Orphan { minor } => format!("minor={minor}"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The rows as an indented JSON array: a tapdisk's VBDs under it.
pub fn format_json(rows: &[Row]) -> Result<String> {
    let mut out: Vec<serde_json::Value> = Vec::new();
    let mut last_pid = None;
    for r in rows {
        match r {
            Row::Vbd { pid, vbd } => {
                if last_pid != Some(*pid) {
                    out.push(json!({"pid": pid, "vbds": []}));
                    last_pid = Some(*pid);
                }
                if let Some(v) = out.last_mut().and_then(|t| t["vbds"].as_array_mut()) {
                    v.push(serde_json::to_value(vbd)?);
                }
            }
            Row::Idle { pid } => out.push(json!({"pid": pid, "vbds": []})),
            Row::Dead { minor, record } => out.push(json!({
                "pid": record.pid,
                "dead": true,
                "vbds": [{"minor": minor, "state": flags::DEAD,
                          "image": record.image.as_ref().map(|i| i.to_string())}],
            })),
            Row::DeadIdle { pid } => out.push(json!({"pid": pid, "dead": true, "vbds": []})),
            Row::Orphan { minor } => out.push(json!({"minor": minor})),
        }
        if !matches!(r, Row::Vbd { .. }) {
            last_pid = None;
        }
    }
    Ok(format!("{}\n", serde_json::to_string_pretty(&out)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tapdisk_control::proto::VbdState;

    fn vbd(minor: u32, state: VbdState, path: &str) -> Box<VbdSummary> {
        Box::new(VbdSummary {
            minor,
            state,
            image: format!("aio:{path}").parse().unwrap(),
            device: format!("/run/blktap-control/tapdisk-rs/vbd/tapdev{minor}"),
            nbd: None,
            nbd_socket: None,
            max_ring_order: 8,
            max_indirect_segments: 256,
            rings: 1,
            size: 1 << 30,
            read_only: false,
            xen: vec![],
        })
    }

    fn sample() -> Vec<Row> {
        vec![
            Row::Vbd {
                pid: 10,
                vbd: vbd(0, VbdState::Running, "/var/lib/d0.img"),
            },
            Row::Vbd {
                pid: 10,
                vbd: vbd(2, VbdState::Paused, "/var/lib/d2.img"),
            },
            Row::Idle { pid: 11 },
            Row::Dead {
                minor: 3,
                record: MinorRecord {
                    pid: 12,
                    image: Some("aio:/var/lib/d3.img".parse().unwrap()),
                },
            },
            Row::Orphan { minor: 4 },
        ]
    }

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        a: ListArgs,
    }

    fn args(a: &[&str]) -> ListArgs {
        Cmd::try_parse_from(std::iter::once("list").chain(a.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn blktap3_lines() {
        assert_eq!(
            format_text(&sample(), false),
            "pid=10 minor=0 state=0 args=aio:/var/lib/d0.img\n\
             pid=10 minor=2 state=0x28 args=aio:/var/lib/d2.img\n\
             pid=11\n\
             minor=3 state=0x1 args=aio:/var/lib/d3.img\n\
             minor=4\n"
        );
        assert_eq!(format_text(&[], false), "");
        let long = format_text(&sample(), true);
        assert!(long.contains("minor=3 state=0x1 args=aio:/var/lib/d3.img dead_pid=12\n"));
    }

    #[test]
    fn filters_as_blktap3() {
        let pick = |a: &[&str]| -> Vec<Option<u32>> {
            let a = args(a);
            sample()
                .iter()
                .filter(|r| matches(r, &a))
                .map(Row::minor)
                .collect()
        };
        assert_eq!(pick(&["-m", "2"]), vec![Some(2)]);
        assert_eq!(pick(&["-p", "10"]), vec![Some(0), Some(2)]);
        assert_eq!(pick(&["-p", "11"]), vec![None]);
        assert_eq!(pick(&["-t", "aio", "-f", "/var/lib/d2.img"]), vec![Some(2)]);
        assert_eq!(pick(&["-t", "vhd"]), Vec::<Option<u32>>::new());
        // A dead VBD matches its image, but its line has no pid= for a parser to reuse.
        assert_eq!(pick(&["-f", "/var/lib/d3.img"]), vec![Some(3)]);
    }

    #[test]
    fn forged_paths_stay_one_field_on_one_line() {
        let rows = vec![Row::Vbd {
            pid: 10,
            vbd: vbd(
                0,
                VbdState::Running,
                "/x.img\npid=1 minor=9 state=0 args=aio:/y",
            ),
        }];
        let text = format_text(&rows, true);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("args=aio:/x.img\\x0apid=1"), "{text}");
    }

    #[test]
    fn json_shape() {
        let v: serde_json::Value = serde_json::from_str(&format_json(&sample()).unwrap()).unwrap();
        assert_eq!(v[0]["pid"], 10);
        assert_eq!(v[0]["vbds"][1]["state"], "paused");
        assert_eq!(v[1]["vbds"].as_array().unwrap().len(), 0);
        assert_eq!(v[2]["dead"], true);
        assert_eq!(v[2]["pid"], 12);
        assert_eq!(v[3]["minor"], 4);
    }
}
