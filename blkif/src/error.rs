//! The crate's error type: [`Error`], with one variant per module whose operations can fail, each
//! holding that module's own enum so callers can still match on the exact case.
//!
//! Two kinds of failure are not errors of this type: a guest request that is refused is data,
//! answered on the ring ([`crate::request::Problem`], [`crate::request::Rejection`]); and the
//! thin wrappers of one system call (gntdev, evtchn, gntalloc, mmap, userfaultfd, the local
//! transport's eventfds) return the operating system's [`std::io::Error`] as it is.

use crate::early::EarlyReadError;
use crate::local::AttachError;
use crate::ring::RingError;
use crate::xen::backend::ConnectError;
use crate::xen::frontend_keys::KeyError;
use crate::xen::xenstore::XsError;

/// What went wrong in blkif.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frontend broke the ring protocol ([`crate::ring`]).
    #[error(transparent)]
    Ring(#[from] RingError),
    /// Attaching over the local transport failed ([`crate::local`]).
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// An early-answered read cannot be trusted ([`crate::early`]).
    #[error(transparent)]
    EarlyRead(#[from] EarlyReadError),
    /// A Xen frontend's xenstore keys cannot be used ([`crate::xen::frontend_keys`]).
    #[error(transparent)]
    FrontendKeys(#[from] KeyError),
    /// Talking to xenstore failed ([`crate::xen::xenstore`]).
    #[error(transparent)]
    Xenstore(#[from] XsError),
    /// A Xen frontend's ring could not be connected ([`crate::xen::backend`]).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A grant mode other than `map` or `copy` ([`crate::xen::backend::GrantMode`]).
    #[error("grant mode '{0}' is not map or copy")]
    GrantMode(String),
}

impl Error {
    /// Whether xenstore refused a request with `errno` (`ENOENT`, `EACCES`, ...).
    pub fn is_xenstore(&self, errno: &str) -> bool {
        matches!(self, Error::Xenstore(e) if e.is(errno))
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
