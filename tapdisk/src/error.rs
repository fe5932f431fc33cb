//! The daemon's one error type: what a command, a VBD or a Xen attachment could not do, in
//! words an operator can act on (the control socket answers with its text).

use std::io;

/// An error of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call or file operation failed; `what` says what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What was being done ("cannot listen on /run/...").
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The image could not be opened (the driver's message names the file and the reason).
    #[error("{0}")]
    Image(io::Error),
    /// A command's settings or image spec were refused.
    #[error(transparent)]
    Settings(#[from] tapdisk_control::Error),
    /// No VBD has this minor in this tapdisk.
    #[error("no VBD with minor {0} in this tapdisk")]
    NoSuchMinor(u32),
    /// The request does not fit the VBD's state or the image ("minor 3 is not paused").
    #[error("{0}")]
    Refused(String),
    /// Something took longer than the daemon waits.
    #[error("{0}")]
    Timeout(String),
}

impl Error {
    /// `source` as an error of doing `what`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// A result of the daemon.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds what was being done to an `io::Error`.
pub trait IoContext<T> {
    /// The error, as an error of doing `what`.
    fn doing(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
