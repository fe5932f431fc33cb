//! Control messages. One JSON object per line: `{"v":1,"cmd":"open",...}` and a response
//! `{"v":1,"ok":...}` or `{"v":1,"error":"..."}`.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::image::ImageSpec;
use crate::nbd::NbdListen;
use crate::settings::VbdSettings;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// Longest line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;

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
        /// The disk.
        image: ImageSpec,
        /// Settings.
        #[serde(default)]
        settings: VbdSettings,
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
        /// The new disk.
        image: Option<ImageSpec>,
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

impl Command {
    /// Checks what the command carries before anything is done with it: an `open`'s
    /// settings and image ([`VbdSettings::validate_for`]), an `unpause`'s new image. The
    /// daemon calls this on every command it reads; tap-ctl on every command it sends.
    pub fn validate(&self) -> Result<()> {
        match self {
            Command::Open {
                image, settings, ..
            } => settings.validate_for(image),
            Command::Unpause {
                image: Some(image), ..
            } => image.validate(),
            _ => Ok(()),
        }
    }

    /// The command's name on the wire (`pause`), for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Hello => "hello",
            Command::Open { .. } => "open",
            Command::Close { .. } => "close",
            Command::Pause { .. } => "pause",
            Command::Unpause { .. } => "unpause",
            Command::List => "list",
            Command::Stats { .. } => "stats",
            Command::Trace { .. } => "trace",
            Command::Shutdown => "shutdown",
            Command::XenConnect { .. } => "xen_connect",
            Command::XenDisconnect { .. } => "xen_disconnect",
        }
    }

    /// How long a client waits for the whole exchange (request written, reply read) unless
    /// told otherwise. Generous where the tapdisk itself waits: a pause waits up to 30 s for
    /// NBD requests and 30 s for the rings; opening a striped disk may retry its servers for
    /// 30 s; a close or a Xen disconnect finishes the IO in flight.
    pub fn deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(match self {
            Command::Hello | Command::List | Command::Stats { .. } => 10,
            Command::Shutdown | Command::XenConnect { .. } => 30,
            Command::Trace { .. } => 60,
            Command::Pause { .. }
            | Command::Unpause { .. }
            | Command::Close { .. }
            | Command::XenDisconnect { .. } => 75,
            Command::Open { .. } => 120,
        })
    }
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

/// blktap3's VBD state bits (`TD_VBD_*`), as `tap-ctl list` prints them (`state=0x20`) and
/// xapi's storage manager reads them (`Tapdisk.Flags`).
pub mod flags {
    /// The tapdisk serving the VBD is gone.
    pub const DEAD: u32 = 0x0001;
    /// The VBD's image is closed.
    pub const CLOSED: u32 = 0x0002;
    /// A quiesce was asked for.
    pub const QUIESCE_REQUESTED: u32 = 0x0004;
    /// Quiesced.
    pub const QUIESCED: u32 = 0x0008;
    /// A pause was asked for and is under way.
    pub const PAUSE_REQUESTED: u32 = 0x0010;
    /// Paused.
    pub const PAUSED: u32 = 0x0020;
    /// Shutting down.
    pub const SHUTDOWN_REQUESTED: u32 = 0x0040;
}

impl VbdState {
    /// The state as blktap3's flag word ([`flags`]).
    pub fn blktap_flags(self) -> u32 {
        match self {
            VbdState::Running => 0,
            VbdState::Quiescing => flags::PAUSE_REQUESTED,
            VbdState::Paused => flags::PAUSED | flags::QUIESCED,
            VbdState::Closing => flags::SHUTDOWN_REQUESTED,
        }
    }
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
    /// The disk.
    pub image: ImageSpec,
    /// Local-transport socket ("device node").
    pub device: String,
    /// NBD export address asked for with the VBD's settings, if any (with the port a `tcp:`
    /// export got).
    pub nbd: Option<NbdListen>,
    /// The NBD socket every VBD is served on, `<rundir>/nbd<pid>.<minor>` (blktap3's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_socket: Option<std::path::PathBuf>,
    /// Largest ring order a frontend may use (the VBD's setting; a Xen ring above it is
    /// refused).
    #[serde(default)]
    pub max_ring_order: u8,
    /// Segments per indirect request the VBD takes (0: none).
    #[serde(default)]
    pub max_indirect_segments: u16,
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
    /// How request pages are reached: what tapback negotiated for this frontend (`persistent`
    /// when both sides offer persistent grants, else tapback's `map` or `copy`).
    #[serde(default)]
    pub grant_mode: blkif::xen::backend::GrantMode,
    /// Serve this frontend read-only whatever the VBD's setting (the toolstack's `mode = r`).
    #[serde(default)]
    pub read_only: bool,
    /// Persistent grants kept mapped per ring at most (None: the ring's capacity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_persistent_grants: Option<u32>,
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
        let open: RequestMsg = serde_json::from_str(
            r#"{"v":1,"cmd":"open","minor":null,"image":{"driver":"aio","path":"/x"}}"#,
        )
        .unwrap();
        assert_eq!(
            open.command,
            Command::Open {
                minor: None,
                image: "aio:/x".parse().unwrap(),
                settings: VbdSettings::default()
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

    #[test]
    fn opens_and_unpauses_are_validated() {
        let open = |settings: &str| -> Command {
            let line = format!(
                r#"{{"v":1,"cmd":"open","minor":null,"image":{{"driver":"aio","path":"/x"}},"settings":{settings}}}"#
            );
            serde_json::from_str::<RequestMsg>(&line).unwrap().command
        };
        assert!(open("{}").validate().is_ok());
        for (settings, field) in [
            (r#"{"poll_us":4294967295}"#, "poll_us"),
            (r#"{"early":{"percent":250}}"#, "early.percent"),
            (r#"{"early":{"chunk_kb":0}}"#, "early.chunk_kb"),
            (r#"{"faults":{"fail_ppm":1000001}}"#, "faults.fail_ppm"),
            (r#"{"cache_slots":5}"#, "cache_slots"),
        ] {
            let e = open(settings).validate().unwrap_err();
            assert_eq!(e.field(), Some(field), "{settings}: {e}");
        }
        let unpause: RequestMsg = serde_json::from_str(
            r#"{"v":1,"cmd":"unpause","minor":0,"image":{"driver":"aio","path":"/x","volume":"v"}}"#,
        )
        .unwrap();
        assert!(unpause
            .command
            .validate()
            .unwrap_err()
            .to_string()
            .contains("no volumes"));
    }
}
