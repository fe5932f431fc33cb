//! Striped disks that span hosts: their durable state in etcd.
//!
//! - [`master::EtcdBackend`]: the extent master's state, one key per LUN, changed with
//!   compare-and-swap transactions, so any number of stateless `stripe-master serve --etcd`
//!   processes can answer allocations and two of them never hand out one extent.
//! - [`record`]: each disk's record (geometry, extents, stale marks, a generation); a mapping
//!   file of format version 2 is a host's cache of it.
//! - [`control::EtcdControl`]: the control plane of a disk being served. The writer role is
//!   a key bound to a lease (TTL, kept alive from a thread of its own); the key's revision at
//!   acquisition is the fencing token, registered as the SCSI persistent reservation key on
//!   every LUN, so a newer writer preempts an older one at the targets themselves. The stale
//!   marks and the write-intent record are stored in transactions that first check that the
//!   writer key is still ours.
//!
//! # The keyspace (under a prefix, `/tapdisk-rs/stripe` by default)
//!
//! | key | value |
//! | --- | --- |
//! | `PREFIX/config` | `{"version":1,"extent_size":N}` |
//! | `PREFIX/next-id` | the id the next registered extent gets (decimal) |
//! | `PREFIX/luns/PORTAL TARGET LUN` | JSON array of that LUN's extents and their owners |
//! | `PREFIX/disks/DISK` | the disk's record ([`record::DiskRecord`], JSON) |
//! | `PREFIX/intent/DISK` | the disk's write-intent record (binary, [`stripe::intent`]) |
//! | `PREFIX/writers/DISK` | the writer: `{"host":..,"pid":..,"since":..}`, bound to its lease |
//!
//! # The client: why `etcd-client`
//!
//! [`etcd_client`] (the `etcd-client` crate) speaks etcd's v3 gRPC API (tonic and prost over
//! tokio), covers everything used here (transactions with compares on revisions, leases and
//! their keep-alive stream), works against the etcd 3.4 Debian packages, and is the most used
//! and most recently maintained Rust etcd client. Its cost: tokio, and protoc at build time
//! (Debian's `protobuf-compiler` and `libprotobuf-dev`). The alternatives were an older
//! `etcd-client` release (bundled protoc, but years of fixes behind), `etcd-rs` (less used,
//! same dependencies), or speaking etcd's JSON gateway by hand (a client of our own to keep).
//! tokio stays off tapdisk's data path: every call here runs on a runtime of this crate's own
//! ([`Etcd`]: one worker thread), and the ring threads never wait for it except on the rare
//! path of a replica that missed a write (as they waited for an fsync of the marks file before).

pub mod control;
pub mod master;
pub mod record;

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

pub use control::EtcdControl;
pub use master::EtcdBackend;
pub use record::DiskRecord;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/tapdisk-rs/stripe";

/// Errors of the crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd could not be reached or refused a call.
    #[error("etcd {endpoints}: {why}")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// What failed.
        why: String,
    },
    /// A value in etcd that does not parse or check.
    #[error("etcd key {key}: {why}")]
    BadValue {
        /// The key.
        key: String,
        /// Why.
        why: String,
    },
    /// The disk has no record.
    #[error("no disk {disk} in etcd (under {prefix})")]
    NoDisk {
        /// The disk id.
        disk: String,
        /// The prefix.
        prefix: String,
    },
    /// Another process holds the disk's writer role.
    #[error("disk {disk} is in use by {holder}; to move it here, pause it there and open it with --takeover")]
    InUse {
        /// The disk id.
        disk: String,
        /// Who, as the writer key says.
        holder: String,
    },
    /// The writer role was lost (taken over, or the lease expired).
    #[error("disk {disk}: lost the writer role: {why}")]
    Lost {
        /// The disk id.
        disk: String,
        /// Why.
        why: String,
    },
    /// A stripe crate error (the mapping, the data path).
    #[error(transparent)]
    Stripe(#[from] stripe::Error),
}

/// A connection to etcd with a runtime of its own: blocking calls for threads that have no
/// runtime (the master's connection threads, tools, tapdisk's control thread).
pub struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Client,
    endpoints: Vec<String>,
    /// The key prefix.
    pub prefix: String,
}

impl Etcd {
    /// Connects to `endpoints` (client URLs, e.g. `http://127.0.0.1:2379`) within
    /// `timeout`; every later call is bounded by `timeout` too.
    pub fn connect(endpoints: &[String], prefix: &str, timeout: Duration) -> Result<Etcd, Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| Error::Etcd {
                endpoints: endpoints.join(","),
                why: format!("cannot start a runtime: {e}"),
            })?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout);
        let client = rt
            .block_on(async {
                tokio::time::timeout(timeout, Client::connect(endpoints, Some(opts))).await
            })
            .map_err(|_| Error::Etcd {
                endpoints: endpoints.join(","),
                why: format!("no answer within {} s", timeout.as_secs_f64()),
            })?
            .map_err(|e| Error::Etcd {
                endpoints: endpoints.join(","),
                why: e.to_string(),
            })?;
        Ok(Etcd {
            rt,
            client,
            endpoints: endpoints.to_vec(),
            prefix: prefix.trim_end_matches('/').to_owned(),
        })
    }

    /// Parses `http://a:2379,http://b:2379` (a scheme is added where missing).
    pub fn parse_endpoints(s: &str) -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.contains("://") {
                    e.to_owned()
                } else {
                    format!("http://{e}")
                }
            })
            .collect()
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client handle (cheap to clone) for calls made inside [`Etcd::block_on`].
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs a future on this connection's runtime, blocking the calling thread.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The runtime (to spawn background tasks such as a lease's keep-alive).
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    /// An etcd failure in an [`Error`].
    pub fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Etcd {
            endpoints: self.endpoints.join(","),
            why: e.to_string(),
        }
    }

    /// `PREFIX/` + `rest`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }
}
