//! Errors of the crate: [`Error`] for setting up and tearing down sessions, [`IoError`] for one
//! command (small and `Copy`, so completions never allocate).

use std::fmt;
use std::io;

use crate::pdu::PduError;
use crate::scsi::{status_name, Sense};
use crate::text::TextError;

/// Why a session could not be set up, or a blocking call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP connect failed.
    #[error("cannot connect to {portal}: {source}")]
    Connect {
        /// host:port.
        portal: String,
        /// The socket error.
        source: io::Error,
    },
    /// A socket error after connecting.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The target refused the login.
    #[error("login to {target} refused: {reason} (status {class:#04x}/{detail:#04x})")]
    LoginRefused {
        /// Target name (or "discovery").
        target: String,
        /// What the status means.
        reason: &'static str,
        /// Status-Class.
        class: u8,
        /// Status-Detail.
        detail: u8,
    },
    /// CHAP was tried and the target refused the answer.
    #[error("CHAP authentication as {user:?} to {target} failed: wrong user name or secret")]
    AuthFailed {
        /// Target name.
        target: String,
        /// CHAP user name.
        user: String,
    },
    /// The target wants authentication we were not configured for, or vice versa.
    #[error("authentication with {target}: {why}")]
    AuthMismatch {
        /// Target name.
        target: String,
        /// What did not match.
        why: String,
    },
    /// The target broke the protocol.
    #[error("protocol error from target: {0}")]
    Protocol(String),
    /// A malformed PDU.
    #[error("malformed PDU from target: {0}")]
    Pdu(#[from] PduError),
    /// Bad login or text keys.
    #[error("{0}")]
    Text(#[from] TextError),
    /// A command completed with an error.
    #[error("{0}")]
    Command(IoError),
    /// Something took longer than allowed.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// A caller error.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A newer writer's reservation key is registered: this one is fenced off the LUN.
    #[error("fenced: {target} LUN {lun} has reservation key {newer:#x} registered, newer than ours ({key:#x}): another writer took the disk over")]
    Fenced {
        /// Target name.
        target: String,
        /// The LUN.
        lun: u16,
        /// Our key.
        key: u64,
        /// The newer key found.
        newer: u64,
    },
}

/// Result type of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why one command failed. `Copy` and allocation-free: it travels in completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// CHECK CONDITION with sense data.
    Check(Sense),
    /// CHECK CONDITION without (valid) sense data.
    CheckNoSense,
    /// Another non-GOOD SCSI status (BUSY, RESERVATION CONFLICT, TASK SET FULL, ...).
    Status(u8),
    /// The target answered with an iSCSI response code other than "command completed".
    Response(u8),
    /// The target rejected the command PDU (reason code).
    Rejected(u8),
    /// The target transferred less or more data than the command asked for.
    Residual {
        /// Bytes asked for.
        expected: u32,
        /// Bytes not transferred (underflow) or not asked for (overflow).
        residual: u32,
    },
    /// The connection was lost and could not be re-established in time.
    Disconnected,
    /// The session was shut down before the command completed.
    Shutdown,
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Check(s) => write!(f, "CHECK CONDITION: {s}"),
            IoError::CheckNoSense => write!(f, "CHECK CONDITION without sense data"),
            IoError::Status(s) => write!(f, "SCSI status {s:#04x} ({})", status_name(*s)),
            IoError::Response(r) => write!(f, "iSCSI response {r:#04x} (target failure)"),
            IoError::Rejected(r) => write!(f, "command rejected by target (reason {r:#04x})"),
            IoError::Residual { expected, residual } => {
                write!(
                    f,
                    "short transfer: {residual} of {expected} bytes missing or extra"
                )
            }
            IoError::Disconnected => write!(f, "connection to target lost"),
            IoError::Shutdown => write!(f, "session shut down"),
        }
    }
}

impl std::error::Error for IoError {}

impl From<IoError> for Error {
    fn from(e: IoError) -> Error {
        Error::Command(e)
    }
}
