//! The crate's error type.

use std::path::PathBuf;

/// What went wrong: a setting out of its range or unreadable, or a control-socket exchange
/// that failed. Every message names what it is about, so an operator can act on one line;
/// the message includes its cause (an IO error's is also a field, to match on).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A number outside its allowed range (see [`crate::limits`]).
    #[error("{what} {value}{unit} is out of range: {field} takes {min}..={max}")]
    OutOfRange {
        /// The setting, as the protocol names it (`max_segments`, `early.percent`).
        field: &'static str,
        /// The setting in words (`max segments`).
        what: &'static str,
        /// Unit after the number (` µs`, ` KiB`; empty for counts).
        unit: &'static str,
        /// The value given.
        value: u64,
        /// Smallest value allowed.
        min: u64,
        /// Largest value allowed.
        max: u64,
    },
    /// A setting that cannot be parsed, or that does not fit the others.
    #[error("{why}")]
    Invalid {
        /// The setting, as the protocol names it (`image`, `nbd`, `faults`).
        field: &'static str,
        /// What is wrong, in words naming the setting.
        why: String,
    },
    /// A setting asks for more than the machine, or the tapdisk's limits, can give.
    #[error("{what} is more than this tapdisk can have: {room}")]
    TooBig {
        /// The setting, as the protocol names it (`early.cache_mb`, `cache_slots`).
        field: &'static str,
        /// What it asks for, in words (`an early-read cache of 65536 MiB`).
        what: String,
        /// What there is, in words (`21034 MiB of available memory (MemAvailable)`).
        room: String,
    },
    /// A tapdisk's control socket cannot be reached.
    #[error("cannot reach tapdisk at {}: {cause}", path.display())]
    Connect {
        /// The control socket.
        path: PathBuf,
        /// Why (its kind tells a refused connection from a missing socket).
        cause: std::io::Error,
    },
    /// Another IO failure, on a control socket or the run directory.
    #[error("{what}: {cause}")]
    Io {
        /// What was being done (`writing to /run/.../tapdisk-12.sock`).
        what: String,
        /// Why it failed.
        cause: std::io::Error,
    },
    /// The tapdisk answered with something that is not a reply of this protocol.
    #[error("bad reply from {}: {cause}", path.display())]
    BadReply {
        /// The control socket.
        path: PathBuf,
        /// Why it does not parse.
        cause: serde_json::Error,
    },
    /// The tapdisk closed the connection without answering.
    #[error("tapdisk at {} closed the connection", path.display())]
    Closed {
        /// The control socket.
        path: PathBuf,
    },
    /// The tapdisk refused the command; its message, as it gave it.
    #[error("{0}")]
    Refused(String),
    /// A tapdisk could not be started, or did not come up.
    #[error("{0}")]
    Spawn(String),
    /// No tapdisk in the run directory serves this minor.
    #[error("no tapdisk serves minor {0}")]
    NoSuchMinor(u32),
    /// A control exchange or a start-up took longer than allowed.
    #[error("{what} did not finish within {secs} s")]
    Timeout {
        /// What was waited for (`pause on /run/.../tapdisk-12.sock`).
        what: String,
        /// The limit.
        secs: f64,
    },
    /// The minor's marker is held by a live process.
    #[error("minor {minor} is in use{}", owner.map(|p| format!(" by tapdisk {p}")).unwrap_or_default())]
    MinorInUse {
        /// The minor.
        minor: u32,
        /// The pid its marker names, if it names one.
        owner: Option<u32>,
    },
    /// The minor has no marker.
    #[error("minor {0} is not allocated")]
    NotAllocated(u32),
    /// Every minor number is taken.
    #[error(
        "no free minor number (all {} are allocated)",
        crate::minor::MAX_MINORS
    )]
    NoFreeMinor,
}

impl Error {
    /// A setting that cannot be parsed or does not fit.
    pub fn invalid(field: &'static str, why: impl Into<String>) -> Error {
        Error::Invalid {
            field,
            why: why.into(),
        }
    }

    /// The setting this error is about, if it is about one (for front ends that name their
    /// own flags).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::OutOfRange { field, .. }
            | Error::Invalid { field, .. }
            | Error::TooBig { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
