//! Errors of the VHD crate.

use std::io;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An IO on an image file failed.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// The IO error (part of the message, so error chains print it once).
        err: io::Error,
    },
    /// The file is not a VHD: no footer cookie at its end nor at its start.
    #[error("not a VHD image: {0}")]
    NotVhd(String),
    /// A field read from the file is out of range. `field` names it as FORMAT.md does.
    #[error("invalid {structure} field '{field}': {reason}")]
    Field {
        /// The structure: footer, dynamic header, BAT, batmap, parent locator N, ...
        structure: String,
        /// The field's name.
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A checksum stored in the file does not match its structure.
    #[error("{structure} checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// footer, dynamic header or batmap.
        structure: &'static str,
        /// The value in the file.
        stored: u32,
        /// The value computed over the structure.
        computed: u32,
    },
    /// The image uses something this crate does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The parent of a differencing disk cannot be found or does not match.
    #[error("parent of {child}: {reason}")]
    Parent {
        /// The child's path.
        child: String,
        /// What is wrong.
        reason: String,
    },
    /// A write or metadata change on an image opened read-only.
    #[error("{0} is opened read-only")]
    ReadOnly(String),
    /// A request outside the disk or not aligned as the call requires.
    #[error("{0}")]
    Range(String),
    /// A bad argument from the caller.
    #[error("{0}")]
    Invalid(String),
    /// The file (or the 32-bit sector offsets of the BAT) cannot hold another block.
    #[error("out of space: {0}")]
    NoSpace(String),
    /// An earlier metadata write failed; the in-memory state may be ahead of the file, so the
    /// image refuses further changes until it is reopened.
    #[error("image stopped after an earlier error ({0}); reopen it")]
    Stopped(String),
}

impl Error {
    /// An IO error while doing `what`.
    pub fn io(what: impl Into<String>, err: io::Error) -> Error {
        if matches!(
            err.raw_os_error(),
            Some(libc::ENOSPC | libc::EFBIG | libc::EDQUOT)
        ) {
            return Error::NoSpace(format!("{}: {err}", what.into()));
        }
        Error::Io {
            what: what.into(),
            err,
        }
    }

    /// A bad field of `structure`.
    pub fn field(
        structure: impl Into<String>,
        field: &'static str,
        reason: impl Into<String>,
    ) -> Error {
        Error::Field {
            structure: structure.into(),
            field,
            reason: reason.into(),
        }
    }

    /// The errno a block driver reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
            Error::NoSpace(_) => libc::ENOSPC,
            Error::ReadOnly(_) => libc::EROFS,
            Error::Range(_) | Error::Invalid(_) => libc::EINVAL,
            _ => libc::EIO,
        }
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
