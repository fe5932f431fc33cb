//! Control messages. One JSON object per line: `{"v":1,"cmd":"open",...}` and a response
//! `{"v":1,"ok":...}` or `{"v":1,"error":"..."}`.

use serde::{Deserialize, Serialize};

use crate::driver::model::ModelParams;
use crate::driver::DirectIo;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// Longest line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// Per-VBD settings, given at open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VbdOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// O_DIRECT policy for `aio:` images.
    pub direct: DirectIo,
    /// Largest ring order a frontend may use (local transport up to 8).
    pub max_ring_order: u8,
    /// Segments per direct request offered (1..=11).
    pub max_segments: u8,
    /// Segments per indirect request offered (0: no BLKIF_OP_INDIRECT; at most 4096).
    pub max_indirect_segments: u16,
    /// Sort and merge requests (the thesis's fix for request fragmentation).
    pub merge: bool,
    /// Largest merged IO, KiB.
    pub max_merge_kb: u32,
    /// Requests taken from a ring per batch (0: the ring size).
    pub max_batch: u32,
    /// Backend IOs in flight per ring at most (0: no limit unless the engine asks for one).
    pub max_ios: u32,
    /// Wait up to this many µs for a batch to fill before dispatching it (0: never).
    pub batch_wait_us: u32,
    /// Record a trace of up to this many requests per ring (0: off).
    pub trace: u32,
    /// Serve through the thesis's disk model (see `tapdisk::engine::model`).
    pub model: Option<ModelParams>,
    /// Early read return for frontends that set up the early-read contract (see
    /// `tapdisk::early`), and the host-side read cache.
    pub early: Option<crate::early::EarlyPolicy>,
    /// Faults to inject below the scheduler (testing; see `tapdisk::engine::fault`).
    pub faults: Option<crate::driver::fault::FaultPlan>,
    /// Also export the disk over NBD: `unix:PATH` or `tcp:ADDR:PORT`.
    pub nbd: Option<String>,
    /// Before a ring loop sleeps, it polls the ring for this many microseconds (0: never).
    /// Trades CPU for latency under dense load, like QEMU's iothread `poll-max-ns`.
    pub poll_us: u32,
    /// Metadata cache slots of a `parallax:` image (0: the driver's default, 128).
    pub cache_slots: u32,
    /// A `stripe:` image's iSCSI connections are driven by each ring loop's own thread
    /// instead of one IO thread per server (see `iscsi::Drive`).
    pub iscsi_inline: bool,
}

impl Default for VbdOptions {
    fn default() -> Self {
        VbdOptions {
            read_only: false,
            direct: DirectIo::Auto,
            max_ring_order: 8,
            max_segments: 11,
            max_indirect_segments: 256,
            merge: true,
            max_merge_kb: 1024,
            max_batch: 0,
            max_ios: 0,
            batch_wait_us: 0,
            trace: 0,
            model: None,
            early: None,
            faults: None,
            nbd: None,
            poll_us: 0,
            cache_slots: 0,
            iscsi_inline: false,
        }
    }
}

/// A command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Who are you? Answered with [`Reply::Hello`].
    Hello,
    /// Open an image as a new VBD. Answered with [`Reply::Opened`].
    Open {
        /// Wanted minor number; the lowest free one if absent.
        minor: Option<u32>,
        /// Disk spec, e.g. `aio:/path/disk.img`.
        image: String,
        /// Settings.
        #[serde(default)]
        options: VbdOptions,
    },
    /// Close a VBD: disconnect its rings and NBD clients, close the image.
    Close {
        /// Which VBD.
        minor: u32,
    },
    /// Quiesce a VBD: finish in-flight IO, take no new requests.
    Pause {
        /// Which VBD.
        minor: u32,
    },
    /// Resume a paused VBD, optionally on another image of the same size.
    Unpause {
        /// Which VBD.
        minor: u32,
        /// New disk spec.
        image: Option<String>,
    },
    /// List VBDs. Answered with [`Reply::List`].
    List,
    /// Counters of one VBD. Answered with [`Reply::Stats`].
    Stats {
        /// Which VBD.
        minor: u32,
    },
    /// Write what the VBD's trace buffers hold to a file. Answered with [`Reply::Trace`].
    Trace {
        /// Which VBD.
        minor: u32,
        /// File to write (absolute path; created or truncated).
        path: String,
        /// Chrome trace-event JSON, or the raw records.
        #[serde(default)]
        format: TraceFormat,
    },
    /// Close every VBD and exit.
    Shutdown,
    /// Serve a Xen frontend's rings on a VBD (tapback sends this). Answered with
    /// [`Reply::XenConnected`].
    XenConnect {
        /// Which VBD.
        minor: u32,
        /// The frontend and its rings.
        spec: XenConnectSpec,
    },
    /// Stop serving a Xen frontend: finish its in-flight IO, unmap its rings.
    XenDisconnect {
        /// Which VBD.
        minor: u32,
        /// The frontend's domain.
        domid: u16,
        /// Its device id.
        devid: u32,
    },
}

/// How a trace is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceFormat {
    /// Chrome trace-event JSON (opens in Perfetto).
    #[default]
    Chrome,
    /// `tapdisk::trace::RingTrace` records as JSON, for tools that join them with their own.
    Raw,
}

/// A request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMsg {
    /// Protocol version.
    pub v: u32,
    /// The command.
    #[serde(flatten)]
    pub command: Command,
}

/// State of a VBD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VbdState {
    /// Serving requests.
    Running,
    /// Pause requested; in-flight IO draining.
    Quiescing,
    /// No IO in flight, none accepted.
    Paused,
    /// Closing.
    Closing,
}

impl std::fmt::Display for VbdState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VbdState::Running => "running",
            VbdState::Quiescing => "quiescing",
            VbdState::Paused => "paused",
            VbdState::Closing => "closing",
        })
    }
}

/// One VBD in a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VbdSummary {
    /// Minor number.
    pub minor: u32,
    /// State.
    pub state: VbdState,
    /// Disk spec.
    pub image: String,
    /// Local-transport socket ("device node").
    pub device: String,
    /// NBD export address, if any.
    pub nbd: Option<String>,
    /// Rings attached.
    pub rings: u32,
    /// Size in bytes.
    pub size: u64,
    /// Read-only.
    pub read_only: bool,
    /// Xen frontends served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xen: Vec<XenAttachmentInfo>,
}

/// A Xen frontend's rings, as tapback hands them to tapdisk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XenConnectSpec {
    /// The frontend's domain.
    pub domid: u16,
    /// Its device id (the `<devid>` of `backend/vbd3/<domid>/<devid>`).
    pub devid: u32,
    /// Its virtual device name (`dev`, e.g. `xvda`), for listings.
    #[serde(default)]
    pub vdev: String,
    /// Its rings, as read from xenstore and checked.
    pub rings: blkif::xen::frontend_keys::FrontendRings,
    /// How request pages are reached.
    #[serde(default)]
    pub grant_mode: blkif::xen::backend::GrantMode,
}

/// A Xen frontend a VBD serves, in listings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XenAttachmentInfo {
    /// The frontend's domain.
    pub domid: u16,
    /// Its device id.
    pub devid: u32,
    /// Its virtual device name.
    pub vdev: String,
    /// Ring layout.
    pub abi: blkif::Abi,
    /// `2^ring_order` pages per ring.
    pub ring_order: u8,
    /// Rings (queues), each served by its own thread.
    pub queues: u32,
    /// How request pages are reached.
    pub grant_mode: blkif::xen::backend::GrantMode,
    /// `connected`, or why the rings are down (a broken frontend is disconnected).
    pub state: String,
}

/// A successful result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// Done.
    Done,
    /// Identity of the tapdisk.
    Hello {
        /// Process id.
        pid: u32,
        /// Control protocol version.
        version: u32,
        /// Crate version.
        build: String,
    },
    /// A VBD was opened.
    Opened {
        /// The VBD.
        vbd: VbdSummary,
    },
    /// The VBDs of this tapdisk.
    List {
        /// VBDs by minor.
        vbds: Vec<VbdSummary>,
    },
    /// A Xen frontend is served.
    XenConnected {
        /// The disk the frontend must be told about.
        disk: blkif::request::DiskInfo,
        /// The attachment.
        xen: XenAttachmentInfo,
    },
    /// A trace was written.
    Trace {
        /// Where.
        path: String,
        /// Requests in it.
        requests: u64,
        /// Requests the buffers had no room for.
        dropped: u64,
    },
    /// Counters (see `tapdisk::stats` for the fields).
    Stats {
        /// The counters as JSON.
        stats: serde_json::Value,
    },
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResponseMsg {
    /// Protocol version.
    pub v: u32,
    /// The result: `{"ok": {...}}` or `{"error": "..."}`.
    #[serde(flatten)]
    pub result: ResultMsg,
}

/// Success or a one-line error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultMsg {
    /// Success.
    Ok(Reply),
    /// Failure, in words an operator can act on.
    Error(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let m = RequestMsg {
            v: 1,
            command: Command::Close { minor: 3 },
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"v":1,"cmd":"close","minor":3}"#
        );
        let open: RequestMsg =
            serde_json::from_str(r#"{"v":1,"cmd":"open","minor":null,"image":"aio:/x"}"#).unwrap();
        assert_eq!(
            open.command,
            Command::Open {
                minor: None,
                image: "aio:/x".into(),
                options: VbdOptions::default()
            }
        );
        let r = ResponseMsg {
            v: 1,
            result: ResultMsg::Error("no such minor 3".into()),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"v":1,"error":"no such minor 3"}"#
        );
        let r = ResponseMsg {
            v: 1,
            result: ResultMsg::Ok(Reply::Done),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"v":1,"ok":{"kind":"done"}}"#
        );
        assert!(serde_json::from_str::<RequestMsg>(r#"{"v":1,"cmd":"explode"}"#).is_err());
    }
}
