//! Errors of the qcow2 crate.

use std::io;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file failed an IO.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// The IO error (part of the message, not a separate source, so that error chains
        /// print it once).
        err: io::Error,
    },
    /// The file is not a qcow2 image (wrong magic).
    #[error("not a qcow2 image: {0}")]
    NotQcow2(String),
    /// A field of the image is invalid; the message names the field.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// The image uses a feature or version this library does not implement; the message names
    /// the feature. Such images are refused at open, never misread.
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
    /// A write, discard or metadata change on an image opened read-only.
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// A bad argument (range outside the disk, bad option).
    #[error("{0}")]
    Invalid(String),
    /// The image cannot grow: no space in the file system, or a qcow2 limit reached.
    #[error("out of space: {0}")]
    NoSpace(String),
    /// Another process holds a conflicting lock on the file (QEMU's byte-range locks).
    #[error("{0}: in use by another process (a conflicting lock is held)")]
    Locked(String),
    /// An earlier metadata write failed; the image refuses further changes until reopened.
    #[error("image stopped after an earlier error ({0}); reopen it to continue")]
    Stopped(String),
}

impl Error {
    /// An IO error while doing `what`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        if matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC | libc::EFBIG | libc::EDQUOT)
        ) {
            return Error::NoSpace(format!("{}: {source}", what.into()));
        }
        Error::Io {
            what: what.into(),
            err: source,
        }
    }

    /// The errno a block driver reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
            Error::ReadOnly(_) => libc::EROFS,
            Error::Invalid(_) => libc::EINVAL,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::Locked(_) => libc::EBUSY,
            Error::NotQcow2(_) | Error::Corrupt(_) | Error::Unsupported(_) | Error::Stopped(_) => {
                libc::EIO
            }
        }
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// A [`Error::Corrupt`] with a formatted message.
macro_rules! corrupt {
    ($($arg:tt)*) => { $crate::error::Error::Corrupt(format!($($arg)*)) };
}
pub(crate) use corrupt;
