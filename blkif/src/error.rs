//! The crate's error type: [`Error`], with one variant per module whose operations can fail, each
//! holding that module's own enum so callers can still match on the exact case. The module enums
//! live here (each module re-exports its own: `blkif::ring::RingError`, ...) so that this module
//! depends on no other module that returns it.
//!
//! Two kinds of failure are not errors of this type: a guest request that is refused is data,
//! answered on the ring ([`crate::request::Problem`], [`crate::request::Rejection`]); and the
//! thin wrappers of one system call (gntdev, evtchn, gntalloc, mmap, userfaultfd, the local
//! transport's eventfds) return the operating system's [`std::io::Error`] as it is.

use std::io;

use crate::protocol::GrantRef;
use crate::xen::DomId;

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

/// A frontend broke the ring protocol: its ring must be disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `req_prod` claims more outstanding requests than the ring holds.
    #[error("frontend's req_prod {req_prod} runs more than a ring ({size}) ahead of the responses ({rsp_prod})")]
    ProducerOverflow {
        /// The index the frontend published.
        req_prod: u32,
        /// Our private response producer.
        rsp_prod: u32,
        /// Slots in the ring.
        size: u32,
    },
    /// `req_prod` moved back behind requests already consumed.
    #[error("frontend's req_prod {req_prod} moved back behind the requests already consumed ({req_cons})")]
    ProducerBackwards {
        /// The index the frontend published.
        req_prod: u32,
        /// Our consumer index.
        req_cons: u32,
    },
}

/// Why an attach failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Socket IO failed.
    #[error("local transport: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the handshake.
    #[error("local transport: {0}")]
    Protocol(String),
    /// The backend refused.
    #[error("backend refused the attach: {0}")]
    Refused(String),
}

/// Why the data of an early-answered read cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EarlyReadError {
    /// tapdisk answered the read early and reported later that reading the rest failed.
    #[error("read {0:#x} failed after it was answered early")]
    Failed(u64),
    /// tapdisk went away before the read's pages were filled; they hold a poison pattern.
    #[error("tapdisk went away before read {0:#x} was filled; its pages hold poison")]
    BackendGone(u64),
}

/// Why the frontend's keys cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A required key is missing.
    #[error("frontend key {0} is missing")]
    Missing(String),
    /// A key holds something else than what it must.
    #[error("frontend key {key} = {value:?}: {why}")]
    Bad {
        /// The key.
        key: String,
        /// Its value (cut to 64 bytes).
        value: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// Why a frontend's ring could not be connected.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The ring pages could not be mapped (bad or revoked `ring-ref`).
    #[error("cannot map the ring pages {refs:?} of domain {domid}: {err}")]
    MapRing {
        /// The frontend.
        domid: DomId,
        /// Its ring-refs.
        refs: Vec<GrantRef>,
        /// What gntdev said.
        err: io::Error,
    },
    /// The event channel could not be bound.
    #[error("cannot bind event channel {port} of domain {domid}: {err}")]
    Bind {
        /// The frontend.
        domid: DomId,
        /// Its port.
        port: u32,
        /// What evtchn said.
        err: io::Error,
    },
    /// Something else.
    #[error("{0}")]
    Other(#[from] io::Error),
}

/// What went wrong talking to xenstore.
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    /// The connection failed.
    #[error("xenstore: {0}")]
    Io(#[from] io::Error),
    /// xenstored answered with an error (`ENOENT`, `EACCES`, `EAGAIN`, ...).
    #[error("xenstore: {op} {path}: {errno}")]
    Refused {
        /// The request.
        op: &'static str,
        /// Its path.
        path: String,
        /// xenstored's error name.
        errno: String,
    },
    /// The peer broke the protocol.
    #[error("xenstore: {0}")]
    Protocol(String),
}

impl XsError {
    /// Whether xenstored said `errno`.
    pub fn is(&self, errno: &str) -> bool {
        matches!(self, XsError::Refused { errno: e, .. } if e == errno)
    }
}
