//! `tap-ctl list`: tapdisks and their VBDs.

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use tapdisk_control::client;
use tapdisk_control::proto::VbdSummary;

use super::{emit, one_line, Ctx};

/// Examples shown by `tap-ctl list --help`.
pub const EXAMPLES: &str = "\
Examples:
  tap-ctl list
      pid=4242 minor=0 state=running args=aio:/var/lib/disks/vm1.img
      pid=4242 minor=1 state=paused args=aio:/dev/vg0/vm2 nbd=unix:/run/vm2.nbd
      pid=4250 minor=2 state=running args=aio:/srv/vm3.img xen=dom5/51712(xvda):order4x2q:connected
      pid=4300 minor=- state=- args=-
  tap-ctl list -m 1
  tap-ctl list -p 4242 --json     # also device, rings, size and read_only";

/// Options of `list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only this tapdisk.
    #[arg(short, long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Only the VBD with this minor number.
    #[arg(short, long, value_name = "MINOR")]
    pub minor: Option<u32>,
    /// Print a JSON array of tapdisks, each {"pid": PID, "vbds": [...]}, instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// One tapdisk and its VBDs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TapdiskListing {
    /// Its pid.
    pub pid: u32,
    /// Its VBDs, by minor.
    pub vbds: Vec<VbdSummary>,
}

/// Lists the tapdisks of the run directory (or the one named). A tapdisk that does not answer
/// is reported on stderr after the others are listed, and the exit status is 1.
pub fn run(ctx: &Ctx, args: &ListArgs) -> Result<()> {
    let pids = match args.pid {
        Some(pid) => vec![pid],
        None => {
            ctx.require_rundir()?;
            client::discover(&ctx.rundir)?
        }
    };
    let mut listings = Vec::new();
    let mut failures = Vec::new();
    for pid in pids {
        match ctx.connect(pid).and_then(|mut c| c.list()) {
            Ok(vbds) => listings.push(TapdiskListing { pid, vbds }),
            Err(e) if args.pid.is_some() => return Err(e),
            Err(e) => failures.push(e),
        }
    }
    let listings = filter_minor(listings, args.minor);
    let text = if args.json {
        format_json(&listings)?
    } else {
        format_text(&listings)
    };
    emit::<anyhow::Error>(&text)?;
    match failures.pop() {
        None => Ok(()),
        Some(last) => {
            for e in &failures {
                eprintln!("tap-ctl: {}", one_line(e));
            }
            Err(last)
        }
    }
}

/// Keeps only the VBD `minor` (and the tapdisk serving it), if given.
pub fn filter_minor(mut listings: Vec<TapdiskListing>, minor: Option<u32>) -> Vec<TapdiskListing> {
    if let Some(m) = minor {
        for l in &mut listings {
            l.vbds.retain(|v| v.minor == m);
        }
        listings.retain(|l| !l.vbds.is_empty());
    }
    listings
}

/// One line per VBD, `pid=P minor=M state=S args=TYPE:PATH[ nbd=ADDRESS]`, and
/// `pid=P minor=- state=- args=-` for a tapdisk with none.
pub fn format_text(listings: &[TapdiskListing]) -> String {
    let mut out = String::new();
    for l in listings {
        if l.vbds.is_empty() {
            out.push_str(&format!("pid={} minor=- state=- args=-\n", l.pid));
        }
        for v in &l.vbds {
            out.push_str(&format!(
                "pid={} minor={} state={} args={}",
                l.pid, v.minor, v.state, v.image
            ));
            if let Some(nbd) = &v.nbd {
                out.push_str(&format!(" nbd={nbd}"));
            }
            for x in &v.xen {
                // A Xen frontend: its domain and device, the rings it negotiated, and their state.
                out.push_str(&format!(
                    " xen=dom{}/{}({}):order{}x{}q:{}",
                    x.domid,
                    x.devid,
                    if x.vdev.is_empty() { "-" } else { &x.vdev },
                    x.ring_order,
                    x.queues,
                    x.state.split_whitespace().collect::<Vec<_>>().join("_")
                ));
            }
            out.push('\n');
        }
    }
    out
}

/// The listings as an indented JSON array.
pub fn format_json(listings: &[TapdiskListing]) -> Result<String> {
    Ok(format!("{}\n", serde_json::to_string_pretty(listings)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapdisk_control::proto::VbdState;

    fn vbd(minor: u32, state: VbdState, nbd: Option<&str>) -> VbdSummary {
        VbdSummary {
            minor,
            state,
            image: format!("aio:/var/lib/d{minor}.img").parse().unwrap(),
            device: format!("/run/tapdisk-rs/vbd/tapdev{minor}"),
            nbd: nbd.map(|n| n.parse().unwrap()),
            rings: 1,
            size: 1 << 30,
            read_only: false,
            xen: vec![],
        }
    }

    fn sample() -> Vec<TapdiskListing> {
        vec![
            TapdiskListing {
                pid: 10,
                vbds: vec![
                    vbd(0, VbdState::Running, None),
                    vbd(2, VbdState::Paused, Some("unix:/tmp/s")),
                ],
            },
            TapdiskListing {
                pid: 11,
                vbds: vec![],
            },
        ]
    }

    #[test]
    fn text_lines() {
        assert_eq!(
            format_text(&sample()),
            "pid=10 minor=0 state=running args=aio:/var/lib/d0.img\n\
             pid=10 minor=2 state=paused args=aio:/var/lib/d2.img nbd=unix:/tmp/s\n\
             pid=11 minor=- state=- args=-\n"
        );
        assert_eq!(format_text(&[]), "");
        let mut l = sample();
        l[0].vbds[0]
            .xen
            .push(tapdisk_control::proto::XenAttachmentInfo {
                domid: 5,
                devid: 51712,
                vdev: "xvda".into(),
                abi: blkif::Abi::X86_64,
                ring_order: 4,
                queues: 2,
                grant_mode: blkif::xen::backend::GrantMode::Map,
                state: "connected".into(),
            });
        assert!(format_text(&l).starts_with(
            "pid=10 minor=0 state=running args=aio:/var/lib/d0.img xen=dom5/51712(xvda):order4x2q:connected\n"
        ));
    }

    #[test]
    fn minor_filter() {
        let f = filter_minor(sample(), Some(2));
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].pid, f[0].vbds.len(), f[0].vbds[0].minor), (10, 1, 2));
        assert!(filter_minor(sample(), Some(5)).is_empty());
        assert_eq!(filter_minor(sample(), None), sample());
    }

    #[test]
    fn json_shape() {
        let v: serde_json::Value = serde_json::from_str(&format_json(&sample()).unwrap()).unwrap();
        assert_eq!(v[0]["pid"], 10);
        assert_eq!(v[0]["vbds"][1]["state"], "paused");
        assert_eq!(v[0]["vbds"][1]["nbd"], "unix:/tmp/s");
        assert_eq!(v[1]["vbds"].as_array().unwrap().len(), 0);
    }
}
