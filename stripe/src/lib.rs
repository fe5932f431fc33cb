//! The striped virtual disk of tapdisk-rs (thesis chapters 5 and 6): a disk's address space is
//! cut into extents on several iSCSI storage servers, striped across them, optionally
//! replicated, and served in parallel.
//!
//! - [`master`]: the master daemon's state and RPC server. Storage servers register extents
//!   `<portal, target, LUN, ADDR>`; clients allocate extents for a virtual disk, each locked to
//!   it. ONC RPC over TCP ([`rpc`], [`xdr`]) with the interface in `stripe/master.x`
//!   ([`proto`]), so clients in other languages can be generated with `rpcgen`. The master is
//!   only used to set disks up, never on the IO path. It trusts its network, as the thesis's
//!   did: run it on the storage LAN.
//! - [`client`]: the RPC client, with at-least-once retries that the master's idempotent
//!   procedures make safe.
//! - [`map`]: the mapping file: a disk's geometry and extents, versioned and checksummed,
//!   held under an exclusive lock by the tapdisk that serves it; and the layout arithmetic.
//! - [`path`]: the data path ([`path::Striper`], one per event loop) over a [`disk::Disk`]
//!   that all of them share, whose [`control::Control`] holds the writer role and the durable
//!   marks: a locked mapping file on one host, or etcd (crate `stripe-etcd`) across hosts.
//! - [`intent`], [`intent_log`], [`resync`]: the write-intent record that keeps the replicas
//!   of a disk equal across crashes and takeovers, and the copy that makes them so.
//!
//! `stripe-master` (the daemon and operator commands) and `stripe-img` (create and inspect
//! striped disks) in `tools/` are the front ends.

pub mod client;
pub mod control;
pub mod disk;
pub mod intent;
pub mod intent_log;
pub mod map;
pub mod master;
pub mod master_server;
pub mod options;
pub mod path;
pub mod proto;
pub mod recover;
pub mod resync;
pub mod rpc;
pub mod xdr;

use std::path::{Path, PathBuf};

pub use client::MasterClient;
pub use map::{Geometry, LockedMap, MapExtent, StripeMap};

/// Errors of the crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the lock.
    #[error("{} is in use by {}", path.display(), match holder { Some(p) => format!("pid {p}"), None => "another process".to_owned() })]
    InUse {
        /// The locked file or folder.
        path: PathBuf,
        /// Its holder's pid, when `/proc/locks` tells.
        holder: Option<u32>,
    },
    /// A mapping file that does not parse or validate.
    #[error("{}: bad mapping file: {why}", path.display())]
    BadMap {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A mapping or geometry that breaks the format's rules, before any file is involved
    /// ([`StripeMap::parse`], [`StripeMap::check`], [`Geometry::check`]).
    #[error("{0}")]
    Invalid(String),
    /// The master's state folder is unusable.
    #[error("master state: {0}")]
    BadState(String),
    /// The master refused a call, or could not be reached.
    #[error("{0}")]
    Master(String),
    /// An undecodable RPC reply.
    #[error("bad reply from the master: {0}")]
    Xdr(#[from] xdr::XdrError),
}

impl Error {
    /// An IO error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
