//! Errors of the Parallax crate.

use std::io;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed an IO.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// The IO error (part of the message, not a separate source, so that error chains
        /// print it once).
        err: io::Error,
    },
    /// The file is not a Parallax image at all.
    #[error("not a Parallax image: {0}")]
    NotParallax(String),
    /// The image is damaged.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// The image uses a version or feature this build does not know.
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// A write, discard or metadata change on a read-only image or snapshot.
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// No volume has that name.
    #[error("no volume named '{0}' in the image")]
    NoSuchVolume(String),
    /// The name is taken.
    #[error("a volume named '{0}' already exists")]
    VolumeExists(String),
    /// A bad argument (size, block size, name, range).
    #[error("{0}")]
    Invalid(String),
    /// The store is full and cannot grow.
    #[error("out of space: {0}")]
    NoSpace(String),
    /// Memory for something a setting sizes (the metadata cache) cannot be had.
    #[error("out of memory: {0} cannot be allocated")]
    NoMemory(String),
    /// Another process has the image open (the path is in the field).
    #[error("in use by another process")]
    Locked(String),
    /// An earlier metadata error stopped the image; nothing has been committed since.
    #[error(
        "image stopped after an earlier error ({0}); reopen it to continue from the last commit"
    )]
    Stopped(String),
}

impl Error {
    /// An IO error while doing `what`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        // No space, a file size limit, a quota: the store cannot take more.
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

    /// The same error with `context` (where the bytes were, what was being done) in front of
    /// its message, for the kinds whose message is a description (corrupt, invalid,
    /// unsupported); other kinds are returned as they are.
    pub fn within(self, context: impl std::fmt::Display) -> Error {
        match self {
            Error::Corrupt(m) => Error::Corrupt(format!("{context}: {m}")),
            Error::Invalid(m) => Error::Invalid(format!("{context}: {m}")),
            Error::Unsupported(m) => Error::Unsupported(format!("{context}: {m}")),
            other => other,
        }
    }

    /// The message without the words for its kind ("corrupt image: ..."), for reports that
    /// put it in their own.
    pub fn detail(&self) -> String {
        match self {
            Error::NotParallax(m)
            | Error::Corrupt(m)
            | Error::Unsupported(m)
            | Error::Invalid(m)
            | Error::NoSpace(m) => m.clone(),
            other => other.to_string(),
        }
    }

    /// Whether this error leaves the in-memory state untrustworthy, so the image stops.
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Io { .. } | Error::Corrupt(_) | Error::NoSpace(_) | Error::Unsupported(_)
        )
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
